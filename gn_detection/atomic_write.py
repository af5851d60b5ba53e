"""Files written whole or not at all: under a temporary name beside the target, renamed into place once
complete, so an interrupted run never leaves a truncated file where a good one was."""
import os

PARTIAL = ".partial"  # suffix of a file still being written; never read as the finished file


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: to ``path + PARTIAL`` first (removed if writing fails),
    then renamed over ``path``. Creates ``path``'s folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + PARTIAL
    try:
        with open(partial, "w") as f:
            f.write(text)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, path)
