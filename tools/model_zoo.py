#!/usr/bin/env python
"""The GN model zoo from the command line.

    python tools/model_zoo.py list [--remote]     # every checkpoint: format, published AP, size, config
    python tools/model_zoo.py download NAME ...   # download + verify into the cache, print the local path
    python tools/model_zoo.py download --again NAME   # download anew, replacing a cached copy (damaged, say)
                                                      # only once the new one is whole and verified

The cache is $GN_DETECTION_CACHE (default $XDG_CACHE_HOME/gn_detection, else ~/.cache/gn_detection);
$GN_DETECTION_MIRROR replaces https://dl.fbaipublicfiles.com. Exit status 1 with a one-line reason when a name
or download fails; Ctrl-C exits with 130, keeping what was downloaded for the next try to resume.
"""
import argparse
import http.client
import os
import sys
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from tabulate import tabulate

from gn_detection import model_zoo
from gn_detection.download import DownloadError, cache_path, checked_source, remote_size


def human_size(size: Optional[int]) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def model_size(model: model_zoo.ZooModel, remote: bool) -> str:
    """Size of the cached file; with ``remote``, what the server reports for a file not cached yet."""
    if not model.url:
        return "-"
    local = cache_path(model.url)
    if os.path.isfile(local):
        return human_size(os.path.getsize(local)) + " (cached)"
    if not remote:
        return "not cached"
    try:
        return human_size(remote_size(model.url))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return f"? ({getattr(e, 'reason', e)})"


def list_models(remote: bool) -> None:
    """Print the catalog; with ``remote``, ask the server (all at once) for the size of files not cached. A source
    that cannot be asked (GN_DETECTION_MIRROR malformed or plain HTTP) is a DownloadError, raised before asking."""
    def ap(value):
        return "-" if value is None else f"{value:.1f}"

    models = model_zoo.catalog()
    asked = [m for m in models if remote and m.url and not os.path.isfile(cache_path(m.url))]
    for model in asked:
        checked_source(model.url)  # one message, before asking, for what all rows share: the mirror
    if asked:
        print(f"Asking the server for the size of {len(asked)} files ...", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=8) as pool:  # HEAD requests wait on the network, not the CPU
        sizes = list(pool.map(lambda m: model_size(m, m in asked), models))
    rows = [[m.name, m.file_format if m.url else "- (no file)", ap(m.box_ap), ap(m.mask_ap), size,
             " ".join([m.config, *map(str, m.opts)]), m.note] for m, size in zip(models, sizes)]
    print(tabulate(rows, headers=["name", "format", "box AP", "mask AP", "size", "config (and overrides)", "note"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="show the catalog")
    listing.add_argument("--remote", action="store_true", help="ask the server for the size of files not cached")
    fetching = commands.add_parser("download", help="download and verify checkpoints, print their local paths")
    fetching.add_argument("names", nargs="+", metavar="NAME")
    fetching.add_argument("--again", action="store_true", help="download anew, replacing cached copies once verified")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            list_models(args.remote)
        else:
            for name in args.names:
                print(model_zoo.fetch(name, again=args.again))
    except (KeyError, ValueError, DownloadError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the part downloaded so far stays in the cache and the same command resumes it",
              file=sys.stderr)
        return 130  # the shells' status for a command stopped by Ctrl-C
    return 0


if __name__ == "__main__":
    sys.exit(main())
