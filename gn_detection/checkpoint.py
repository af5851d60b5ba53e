"""Detectron2's checkpointer, made safe to interrupt and explicit about what a load placed."""
import os
import pickle
import pickletools
import shutil
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

# a PARTIAL file is never loaded or tagged as the last one
from .atomic_write import PARTIAL, replace_durably, write_atomically
from .download import cache_dir


@dataclass(frozen=True)
class LoadCounts:
    """What loading a checkpoint did: tensors of the model it set (``loaded``), model tensors it left at
    their initial values (``missing``, shape mismatches included; their names in ``missing_names``), and
    tensors of the file that went nowhere (``unused``)."""

    loaded: int
    missing_names: Tuple[str, ...]
    unused: int

    @property
    def missing(self) -> int:
        return len(self.missing_names)

    @property
    def unset_names(self) -> Tuple[str, ...]:
        """``missing_names`` but BatchNorm's ``num_batches_tracked`` counters: files saved before torch counted
        batches lack them, and nothing at evaluation reads them."""
        return tuple(name for name in self.missing_names if not name.endswith(".num_batches_tracked"))

    def unset_summary(self, source: str) -> str:
        """"``source`` sets L of the model's T tensors; U would keep their random initialization (..., e.g. ...)",
        for the errors of loads that must set every tensor."""
        unset = self.unset_names
        return (f"{source} sets {self.loaded} of the model's {self.loaded + self.missing} tensors; {len(unset)} would "
                f"keep their random initialization (missing from the file or of another shape, e.g. "
                f"{', '.join(unset[:3])})")

    def __str__(self) -> str:
        return f"loaded {self.loaded}, missing {self.missing}, unused {self.unused}"


class CheckpointNotSaved(OSError):
    """A checkpoint could not be written (a full disk, say); the message names it and the space left."""


class AtomicCheckpointer(DetectionCheckpointer):
    """Detectron2's DetectionCheckpointer, but each checkpoint and the ``last_checkpoint`` tag are written
    under a temporary name and renamed into place once complete. A run killed while saving leaves the
    previous checkpoint and tag exactly as they were, so ``--resume`` never meets a truncated file.

    Loading converts Detectron and Detectron2 ``.pkl`` files as Detectron2 does, reads ``.pth`` files
    with ``weights_only=True`` (no code runs), and records :class:`LoadCounts` in ``last_load_counts``."""

    last_load_counts = None

    def __init__(self, model: nn.Module, save_dir: str = "", *, settings: Optional[Dict[str, object]] = None,
                 **kwargs):
        """``settings``: saved with each checkpoint as ``"settings"`` (the config values it was trained with that
        its tensors do not show, for a load to compare: :func:`gn_detection.config.gn_settings`)."""
        super().__init__(model, save_dir, **kwargs)
        self.settings = settings

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if self.settings:
            kwargs.setdefault("settings", self.settings)
        partial = os.path.join(self.save_dir, f"{name}{PARTIAL}.pth")
        final = os.path.join(self.save_dir, f"{name}.pth")
        try:
            super().save(f"{name}{PARTIAL}", **kwargs)  # tag_last_checkpoint below ignores this name
            replace_durably(partial, final)
        except BaseException as e:
            space = _space_note(partial, self.save_dir)  # before the part is removed
            if os.path.exists(partial):
                os.remove(partial)
            if not isinstance(e, Exception):  # Ctrl-C, say: as it is
                raise
            raise CheckpointNotSaved(f"cannot save the checkpoint {final} ({type(e).__name__}: {_first_line(e)}"
                                     f"{space}); the checkpoints saved before, and last_checkpoint, are as they "
                                     "were") from e
        self.logger.info("Checkpoint complete: %s", final)
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if last_filename_basename.endswith(f"{PARTIAL}.pth"):
            return
        write_atomically(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except (pickle.UnpicklingError, EOFError) as e:
            if filename.endswith(".pkl"):  # .pth files are handled in _torch_load
                raise _unreadable(filename, e) from e
            raise

    def _torch_load(self, f: str):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not _is_whole_pickle(f):
                raise _unreadable(f, e) from e
            # a well-formed file that weights_only refused: it holds objects that unpickling would construct
            raise pickle.UnpicklingError(
                f"{f}: refused to load, it holds Python objects besides tensors and unpickling them could run "
                "code. If you trust the file, re-save its tensors (torch.save(state_dict)) and load that."
            ) from e
        # torch's errors for a truncated or foreign zip archive, and (KeyError) for bytes that are no pickle
        except (RuntimeError, EOFError, KeyError) as e:
            raise _unreadable(f, e) from e

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)  # converts names where the file needs it
        model_keys = set(self.model.state_dict())
        loaded = len(model_keys) - len(incompatible.missing_keys)
        # the file's tensors that went nowhere: names the model lacks and shapes it does not have (counting them
        # from the file's size instead would subtract the BatchNorm counters torch fills in for old files)
        unused = len(incompatible.unexpected_keys) + len(incompatible.incorrect_shapes)
        self.last_load_counts = LoadCounts(loaded, tuple(incompatible.missing_keys), unused)
        self.logger.info("Loaded %d of the model's %d tensors (%s)", loaded, len(model_keys), self.last_load_counts)
        return incompatible


def _unreadable(path: str, error: BaseException) -> ValueError:
    """The error for a checkpoint file that cannot be read: it names the file and says what to do."""
    if isinstance(error, (pickle.UnpicklingError, KeyError)):  # torch's text suggests weights_only=False: no use
        reason = "not a complete pickle"
    else:
        reason = _first_line(error)
    if path.endswith(".pkl") and zipfile.is_zipfile(path):  # Detectron2 unpickles .pkl files as they are
        return ValueError(f"{path}: not a readable .pkl checkpoint: it is a torch.save archive, which Detectron2 "
                          "loads from a .pth file; rename it to .pth")
    cached = os.path.abspath(path).startswith(os.path.join(os.path.abspath(cache_dir()), ""))
    what_to_do = ("it is a cached download: `python tools/model_zoo.py download --again` with its gn-zoo:// name "
                  "fetches it anew, or delete the file and run again" if cached else "download or save it again")
    return ValueError(f"{path}: not a readable checkpoint ({reason}); the file is truncated or of another kind: "
                      f"{what_to_do}")


def _space_note(partial: str, save_dir: str) -> str:
    """How much of a failed save reached ``partial`` and how much space is left where it was written (torch says
    "unexpected pos 3021312 vs 3021200" for a full disk: these tell); "" where that cannot be read (a remote
    folder, one removed since)."""
    try:
        written, free = os.path.getsize(partial) if os.path.exists(partial) else 0, shutil.disk_usage(save_dir).free
    except OSError:
        return ""
    return f"; {written / 2**20:.1f} MB written, {free / 2**20:.1f} MB left free on its file system"


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (torch's carry C++ backtraces), or its type's name."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _is_whole_pickle(path: str) -> bool:
    """Whether ``path`` is a complete pickle, or a torch zip archive around one, read opcode by opcode without
    running any (so a refused file can be told from a corrupt one without trusting torch's wording)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        else:
            with open(path, "rb") as f:
                data = f.read()
        for _ in pickletools.genops(data):
            pass
        return True
    except (ValueError, UnicodeDecodeError, StopIteration, zipfile.BadZipFile, OSError):
        return False


def load_weights(model: nn.Module, path: str) -> LoadCounts:
    """Load a checkpoint (any path, URL or ``gn-zoo://`` name Detectron2 resolves) into ``model``."""
    checkpointer = AtomicCheckpointer(model)
    checkpointer.load(path)
    return checkpointer.last_load_counts
