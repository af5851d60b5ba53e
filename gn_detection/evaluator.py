"""Detectron2's COCO evaluation, with its result files replaced whole or not at all."""
import glob
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .atomic_write import replace_durably

STAGING_PREFIX = ".evaluating-"


class AtomicCOCOEvaluator(COCOEvaluator):
    """Detectron2's COCOEvaluator (box and mask AP with pycocotools), but the files it writes into ``output_dir``
    (``instances_predictions.pth``, ``coco_instances_results.json``) are written in a staging folder there and
    renamed into place, one after the other, once evaluation has finished: a run killed while evaluating leaves an
    earlier evaluation's files as they were, never a truncated one in their place."""

    def evaluate(self, img_ids: Optional[Sequence[int]] = None) -> Dict:
        output_dir = self._output_dir
        if not output_dir or not comm.is_main_process():  # other ranks write nothing
            return super().evaluate(img_ids)
        os.makedirs(output_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(output_dir, STAGING_PREFIX + "*")):  # of a run killed while evaluating
            shutil.rmtree(stale, ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir)
        # COCOEvaluator writes where _output_dir points (set from its output_dir argument, read in evaluate() and
        # the methods it calls); pointing it at the staging folder for the call is the whole extension
        self._output_dir = staging
        try:
            results = super().evaluate(img_ids)
            for name in os.listdir(staging):
                replace_durably(os.path.join(staging, name), os.path.join(output_dir, name))
            return results
        finally:
            self._output_dir = output_dir
            shutil.rmtree(staging, ignore_errors=True)
