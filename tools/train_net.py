#!/usr/bin/env python
"""Train or evaluate a GN Mask R-CNN with Detectron2's trainer and COCO evaluation.

    python tools/train_net.py --config-file configs/mask_rcnn_R50_FPN_gn.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R18_FPN_gn_scratch.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

Detectron2's usual flags apply (--resume, --num-machines, --machine-rank, --dist-url, KEY VALUE ...).
"""
import logging
import multiprocessing
import multiprocessing.queues
import os
import pickle
import sys
from typing import Dict, List, Optional

from torch.multiprocessing import ProcessExitedException
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gn_detection.checkpoint import AtomicCheckpointer, CheckpointNotSaved
from gn_detection.config import gn_settings
from gn_detection.datasets import (NamingDatasetMapper, UnusableRecord, check_annotations, check_images,
                                   check_same_classes)
from gn_detection.download import DownloadError
from gn_detection.evaluator import AtomicCOCOEvaluator
from gn_detection.metrics_log import fresh_run_start
from gn_detection.run_checks import check_class_count, checked_config
from gn_detection.visualize import draw_predictions, plot_loss_curve


class RunStopped(ValueError):
    """A run stopped once started, for a reason the message names with what to do: what it loads then could not be
    used (DATASETS.TRAIN: its records, images and classes, MODEL.WEIGHTS given as a URL or gn-zoo:// name, an image
    of either dataset that fails only when decoded), or a checkpoint could not be written."""


# the exit status of a worker process that stopped on RunStopped, having put its message on the launcher's queue
RUN_STOPPED_EXIT = 3


class Trainer(DefaultTrainer):
    """Detectron2's trainer with COCO (box and mask AP) evaluation, checkpoints and result files written whole."""

    @classmethod
    def build_train_loader(cls, cfg):
        # the training datasets load here, before the first iteration (loading them before launch as well would
        # cost COCO's 20-odd seconds twice): what fails is said as the user's data, not as a crash
        named = f"DATASETS.TRAIN {cfg.DATASETS.TRAIN}"
        try:
            # as Detectron2's trainer builds it, with a mapper that names an image it cannot use
            loader_args = build_detection_train_loader.from_config(cfg, NamingDatasetMapper(cfg, True))
        except (ValueError, OSError, AssertionError, KeyError) as e:  # a broken file, a missing image, no images
            raise RunStopped(f"{named} cannot be trained on: {_load_failure(e)}") from e
        records = loader_args["dataset"]
        try:
            check_class_count(cfg, cfg.DATASETS.TRAIN)  # loaded now, a register_coco_instances dataset has its classes
            check_same_classes(cfg.DATASETS.TRAIN, cfg.DATASETS.TEST)  # those test datasets loaded in this process
            check_annotations(records, named, cfg.MODEL.MASK_ON, cfg.INPUT.MASK_FORMAT)
            if cfg.DATASETS.CHECK_IMAGES:  # each process its share of the images
                check_images(records[comm.get_rank()::comm.get_world_size()], named)
        except ValueError as e:
            raise RunStopped(e.args[0]) from None
        return build_detection_train_loader(**loader_args)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=NamingDatasetMapper(cfg, False))

    def build_hooks(self):
        # Swap in the atomic checkpointer before the checkpoint hooks capture it.
        old = self.checkpointer
        self.checkpointer = AtomicCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, settings=gn_settings(self.cfg),
            **old.checkpointables
        )
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # a dataset without a json_file is converted to COCO format anew: a conversion cached by an earlier run
        # under the same name may be of other images
        return AtomicCOCOEvaluator(dataset_name, allow_cached_coco=False,
                                   output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))


def _load_failure(error: Exception) -> str:
    """A training dataset's loading ``error`` as its reason; a bare key (Detectron2's loader indexing a record) with
    what to do."""
    if isinstance(error, KeyError):
        key = error.args[0] if error.args else None
        if isinstance(key, str) and " " not in key:  # Detectron2's own KeyErrors are sentences
            return (f"KeyError: {key!r}; a record without that key? Detectron2's loader reads it in every record of "
                    "the dataset")
        return f"KeyError: {error}"
    return error.args[0] if error.args else type(error).__name__


def setup(cfg, args) -> None:
    """Detectron2's logging, environment dump and OUTPUT_DIR for a config :func:`checked_config` gave."""
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gn_detection")


def save_pictures(cfg, model, metrics_start: Optional[int]) -> None:
    """Loss curve (after training: ``metrics_start`` is where its run's records begin in metrics.json, None for
    --eval-only) and predictions on the first test images, in OUTPUT_DIR. A picture that cannot be drawn or written
    is a warning, and the other is still drawn: the checkpoint and the metrics, which matter, are already written."""
    if metrics_start is not None:
        _draw("Loss curve", lambda: plot_loss_curve(os.path.join(cfg.OUTPUT_DIR, "metrics.json"),
                                                    os.path.join(cfg.OUTPUT_DIR, "loss_curve.png"), metrics_start))
    if cfg.TEST.VIS_NUM_IMAGES and cfg.DATASETS.TEST:
        _draw("Predictions", lambda: _draw_predictions(cfg, model))


def _draw_predictions(cfg, model) -> str:
    out_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    paths = draw_predictions(model, cfg, cfg.DATASETS.TEST[0], out_dir, cfg.TEST.VIS_NUM_IMAGES,
                             cfg.TEST.VIS_SCORE_THRESH)
    return f"{len(paths)} images (ground truth | prediction) in {out_dir}"


def _draw(what: str, draw) -> None:
    logger = logging.getLogger("gn_detection")
    try:
        logger.info("%s: %s", what, draw())
    except Exception as e:  # noqa: BLE001 (a full disk, a read-only folder, out of memory: the pictures are extra)
        logger.warning("No %s: %s", what.lower(), e)


def main(args, cfg):
    """Train (or with --eval-only, evaluate) in one process of the job, on the config checked before launch."""
    setup(cfg, args)
    metrics_start = None
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # ours, as training's: .pth read with weights_only, and the load's counts logged
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        try:
            results = Trainer.test(cfg, model)
        except UnusableRecord as e:
            raise RunStopped(f"{e.reason()}; replace it (or leave out its record) and evaluate again") from e
    else:
        trainer = Trainer(cfg)
        resumes = args.resume and trainer.checkpointer.has_checkpoint()  # that checkpoint was read before launch
        try:
            trainer.resume_or_load(resume=args.resume)
        # a gn-zoo name's download (DownloadError) or a URL's (Detectron2's: urllib's URLError, an OSError), or its file
        except (ValueError, OSError, pickle.UnpicklingError, DownloadError) as e:
            if resumes:
                raise
            raise RunStopped(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}") from e
        metrics_start = fresh_run_start(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), trainer.start_iter)
        try:
            results = trainer.train()
        except UnusableRecord as e:  # the checkpoints saved so far stay
            raise RunStopped(f"the run stopped: {e.reason()}; replace it (or leave out its record); "
                             f"{resume_note(cfg.OUTPUT_DIR)}") from e
        except CheckpointNotSaved as e:
            raise RunStopped(f"the run stopped: {e}. Free space there (or copy OUTPUT_DIR elsewhere and give that); "
                             f"{resume_note(cfg.OUTPUT_DIR)}") from e
        model = trainer.model
    if comm.is_main_process():
        save_pictures(cfg, getattr(model, "module", model), metrics_start)  # unwrap DDP
    return results


def interrupted_note(output_dir: Optional[str], eval_only: bool) -> str:
    """What a run stopped by Ctrl-C leaves to go on from: for training, :func:`resume_note`; ``output_dir`` None:
    stopped while its settings were being checked, before anything was written."""
    if output_dir is None:
        return "interrupted while checking the settings and data; nothing was started"
    if eval_only:
        return "interrupted; evaluation writes its result files whole, so none were written"
    return f"interrupted; {resume_note(output_dir)}"


def resume_note(output_dir: str) -> str:
    """The checkpoint ``--resume`` continues a stopped training run from (``output_dir/last_checkpoint`` names it),
    or that none was saved yet."""
    tag = os.path.join(output_dir, "last_checkpoint")
    try:
        with open(tag) as f:
            saved = f.read().strip()
    except OSError:  # none (or unreadable: --resume would say so)
        return (f"no checkpoint in {output_dir} yet (one is saved every SOLVER.CHECKPOINT_PERIOD iterations); "
                "running the command again starts anew")
    return f"{tag} names {saved}: add --resume to the command to continue from it"


def worker(args, cfg, errors: multiprocessing.queues.SimpleQueue, test_classes: Dict[str, List[str]]) -> Optional[dict]:
    """:func:`main` in one process of the job, knowing the ``test_classes`` the launcher's checks loaded (a worker
    loads a register_coco_instances test dataset only to evaluate, and compares the training classes with it before
    training). In a job of several processes, RunStopped is put on ``errors`` for :func:`run` to raise in the
    launching process, rather than printed as each worker's traceback."""
    for name, classes in test_classes.items():  # as loading the dataset will set them
        MetadataCatalog.get(name).thing_classes = classes
    try:
        return main(args, cfg)
    except RunStopped as e:
        if comm.get_world_size() == 1:  # run's own process
            raise
        errors.put(e.args[0])
        sys.exit(RUN_STOPPED_EXIT)


def run(args, cfg) -> None:
    """Launch :func:`worker` on this machine's processes of the job (``args.num_gpus``; in this process for one).

    Raises:
        RunStopped: when the training data or the weights loaded once started cannot be used, in any process.
    """
    errors = multiprocessing.get_context("spawn").SimpleQueue()  # the context Detectron2's launch spawns with
    test_classes = {name: classes for name in cfg.DATASETS.TEST
                    if (classes := MetadataCatalog.get(name).get("thing_classes")) is not None}
    try:
        # each worker takes the checked config, rather than loading and checking it again
        launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args, cfg, errors, test_classes))
    except ProcessExitedException as e:  # the other workers are stopped by now
        if e.exit_code == RUN_STOPPED_EXIT and not errors.empty():
            raise RunStopped(errors.get()) from None
        raise


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    config = None
    try:
        try:  # in this process, so that a mistake stops with one line before any worker starts
            config = checked_config(args)
        except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as e:  # --eval-only reads the weights
            sys.exit(f"error: {e}")
        try:
            run(args, config)
        except RunStopped as e:  # before the first iteration
            sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(interrupted_note(config and config.OUTPUT_DIR, args.eval_only), file=sys.stderr)
        sys.exit(130)  # the shells' status for a command stopped by Ctrl-C
