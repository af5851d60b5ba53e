"""Files written whole or not at all: under a temporary name beside the target, renamed into place once
complete and on disk, so an interrupted run (or a crash) never leaves a truncated file where a good one was."""
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

PARTIAL = ".partial"  # suffix of a file still being written; never read as the finished file


@contextmanager
def replaced_atomically(path: str) -> Iterator[str]:
    """Yield the temporary path (``path + PARTIAL``) to write ``path``'s new content to: renamed over ``path``
    when the block ends, removed if it or the rename raises. Creates ``path``'s folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + PARTIAL
    try:
        yield partial
        replace_durably(partial, path)
    except BaseException:  # the block failed, or the rename did (``path`` is a folder, say): leave no partial
        if os.path.exists(partial):
            os.remove(partial)
        raise


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (see :func:`replaced_atomically`)."""
    with replaced_atomically(path) as partial, open(partial, "w") as f:
        f.write(text)


def replace_durably(partial: str, path: str) -> None:
    """Rename the complete file ``partial`` over ``path`` once its bytes are on disk, then sync the folder: after
    a crash or power loss ``path`` is the old file or the new one, never an empty or torn one."""
    _sync(partial)
    os.replace(partial, path)
    try:
        _sync(os.path.dirname(os.path.abspath(path)))
    except OSError:  # some network and FUSE file systems cannot sync a folder; the file itself is whole
        pass


def not_writable(folder: str) -> Optional[str]:
    """Why files cannot be written in ``folder``, or None. A folder that does not exist yet counts as its nearest
    existing parent, which is tried with a temporary file: nothing is left behind, the folders are made on writing."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


def _sync(path: str) -> None:
    """fsync a file or folder by path."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
