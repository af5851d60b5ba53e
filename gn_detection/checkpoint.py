"""A checkpointer that never leaves a half-written file where a good one was."""
import os

from detectron2.checkpoint import DetectionCheckpointer

PARTIAL = ".partial"  # suffix of files still being written; never loaded or tagged as the last checkpoint


class AtomicCheckpointer(DetectionCheckpointer):
    """Detectron2's DetectionCheckpointer, but each checkpoint and the ``last_checkpoint`` tag are written
    under a temporary name and renamed into place once complete. A run killed while saving leaves the
    previous checkpoint and tag exactly as they were, so ``--resume`` never meets a truncated file."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        partial = os.path.join(self.save_dir, f"{name}{PARTIAL}.pth")
        try:
            super().save(f"{name}{PARTIAL}", **kwargs)  # tag_last_checkpoint below ignores this name
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        final = os.path.join(self.save_dir, f"{name}.pth")
        os.replace(partial, final)
        self.logger.info("Checkpoint complete: %s", final)
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if last_filename_basename.endswith(f"{PARTIAL}.pth"):
            return
        tag = os.path.join(self.save_dir, "last_checkpoint")
        with open(tag + PARTIAL, "w") as f:
            f.write(last_filename_basename)
        os.replace(tag + PARTIAL, tag)
