#!/usr/bin/env python
"""Train or evaluate a GN Mask R-CNN with Detectron2's trainer and COCO evaluation.

    python tools/train_net.py --config-file configs/mask_rcnn_R50_FPN_gn.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R18_FPN_gn_scratch.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

Detectron2's usual flags apply (--resume, --num-machines, --machine-rank, --dist-url, KEY VALUE ...).
"""
import errno
import logging
import multiprocessing
import multiprocessing.queues
import os
import pickle
import socket
import sys
import urllib.parse
import warnings
from typing import Optional, Sequence

import torch
from torch.multiprocessing import ProcessExitedException
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gn_detection.atomic_write import not_writable
from gn_detection.config import check_model_builds, load_config
from gn_detection.checkpoint import AtomicCheckpointer, LoadCounts
from gn_detection.datasets import (check_annotations, check_dataset_files, check_evaluation_datasets, check_images,
                                   check_num_classes, check_same_classes)
from gn_detection.download import DownloadError
from gn_detection.evaluator import AtomicCOCOEvaluator
from gn_detection.metrics_log import fresh_run_start
from gn_detection import model_zoo
from gn_detection.visualize import draw_predictions, plot_loss_curve


class UnusableInput(ValueError):
    """What a training run loads once started (DATASETS.TRAIN, whose class count may be known only then, and
    MODEL.WEIGHTS given as a URL or gn-zoo:// name) could not be used; the message says which and why."""


# the exit status of a worker process that stopped on UnusableInput, having put its message on the launcher's queue
UNUSABLE_INPUT_EXIT = 3


class Trainer(DefaultTrainer):
    """Detectron2's trainer with COCO (box and mask AP) evaluation, checkpoints and result files written whole."""

    @classmethod
    def build_train_loader(cls, cfg):
        # the training datasets load here, before the first iteration (loading them before launch as well would
        # cost COCO's 20-odd seconds twice): what fails is said as the user's data, not as a crash
        named = f"DATASETS.TRAIN {cfg.DATASETS.TRAIN}"
        try:
            loader_args = build_detection_train_loader.from_config(cfg)  # as Detectron2's trainer builds it
        except (ValueError, OSError, AssertionError, KeyError) as e:  # a broken file, a missing image, no images
            raise UnusableInput(f"{named} cannot be trained on: {_load_failure(e)}") from e
        records = loader_args["dataset"]
        try:
            check_class_count(cfg, cfg.DATASETS.TRAIN)  # loaded now, a register_coco_instances dataset has its classes
            check_same_classes(cfg.DATASETS.TRAIN, cfg.DATASETS.TEST)  # those test datasets loaded in this process
            check_annotations(records, named, cfg.MODEL.MASK_ON, cfg.INPUT.MASK_FORMAT)
            if cfg.DATASETS.CHECK_IMAGES:  # each process its share of the images
                check_images(records[comm.get_rank()::comm.get_world_size()], named)
        except ValueError as e:
            raise UnusableInput(e.args[0]) from None
        return build_detection_train_loader(**loader_args)

    def build_hooks(self):
        # Swap in the atomic checkpointer before the checkpoint hooks capture it.
        old = self.checkpointer
        self.checkpointer = AtomicCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
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


def checked_config(args):
    """Config from gn_detection's defaults, the file and the command-line overrides, checked against the
    device, the datasets, the weights and the GPU count before any work starts.

    Raises:
        ValueError, OSError, RuntimeError, pickle.UnpicklingError: naming the file, key or value at fault.
    """
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    if problem := run_problem(cfg, args):
        raise ValueError(problem)
    if cfg.MODEL.DEVICE.startswith("cuda") and (problem := gpu_problem(cfg.MODEL.DEVICE, args.num_gpus)):
        raise RuntimeError(problem)
    world_size, reference = args.num_gpus * args.num_machines, cfg.SOLVER.REFERENCE_WORLD_SIZE
    if world_size > 1 and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError(f"{world_size} processes (--num-gpus {args.num_gpus}, --num-machines {args.num_machines}) "
                         f"with MODEL.DEVICE {cfg.MODEL.DEVICE}: Detectron2's trainer gives each process's model a "
                         "GPU (DistributedDataParallel device_ids), so several processes need CUDA; on the CPU "
                         "use --num-gpus 1")
    if world_size > 1 and (problem := dist_url_problem(args.dist_url, args.num_machines)):
        raise ValueError(problem)
    if not args.eval_only and reference and reference != world_size and cfg.SOLVER.IMS_PER_BATCH % reference:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not a multiple of SOLVER.REFERENCE_WORLD_SIZE "
            f"{reference}, which Detectron2 needs to rescale the batch, LR and schedule to {world_size} GPU(s); "
            f"give a multiple of {reference}, or SOLVER.REFERENCE_WORLD_SIZE 0 to use them as given"
        )
    if cfg.MODEL.GN.IMPL == "triton" and not cfg.MODEL.DEVICE.startswith("cuda") and not _triton_interpreted():
        raise ValueError(f"MODEL.GN.IMPL triton runs its kernels on CUDA, but MODEL.DEVICE is {cfg.MODEL.DEVICE} "
                         "(on the CPU only under TRITON_INTERPRET=1, for tests); set MODEL.GN.IMPL auto")
    if "://" not in cfg.OUTPUT_DIR and (why := not_writable(cfg.OUTPUT_DIR)):  # a local folder: try it
        raise ValueError(f"OUTPUT_DIR {cfg.OUTPUT_DIR}: cannot write there ({why}); give a writable folder")
    meta_model = check_model_builds(cfg, args.config_file)
    datasets = cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
    check_dataset_files(datasets)
    # before the class count: loading may set a dataset's classes
    check_evaluation_datasets(cfg.DATASETS.TEST, masks=cfg.MODEL.MASK_ON, images=cfg.DATASETS.CHECK_IMAGES)
    check_class_count(cfg, datasets)
    if not args.eval_only:
        check_same_classes(cfg.DATASETS.TRAIN, cfg.DATASETS.TEST)
    resumed = resumed_checkpoint(meta_model, cfg.OUTPUT_DIR, args.resume)
    if not resumed:
        check_weights(cfg.MODEL.WEIGHTS)
    if args.eval_only and not resumed and not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a checkpoint file, URL or gn-zoo:// name), or --resume "
                         f"with a checkpoint in OUTPUT_DIR {cfg.OUTPUT_DIR}; it would evaluate a random model")
    check_weights_read(meta_model, resumed or cfg.MODEL.WEIGHTS, args.eval_only, bool(resumed),
                       cfg.TEST.ALLOW_PARTIAL_WEIGHTS)  # last: it reads (for --eval-only maybe downloads) them
    return cfg


def run_problem(cfg, args) -> Optional[str]:
    """What makes the run impossible in the flags or in values Detectron2 fails on only once it is under way
    (a zero period divides by zero after the first iteration), naming the flag or key; None if nothing."""
    if args.num_gpus < 1 or args.num_machines < 1 or not 0 <= args.machine_rank < args.num_machines:
        return (f"--num-gpus {args.num_gpus}, --num-machines {args.num_machines}, --machine-rank {args.machine_rank}: "
                "give at least one GPU per machine, one machine, and a rank from 0 to --num-machines - 1")
    try:
        torch.device(cfg.MODEL.DEVICE)
    except RuntimeError:
        return f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is not a device; give cpu, cuda or cuda:N"
    if not cfg.OUTPUT_DIR:
        return "OUTPUT_DIR is empty; give a folder for the checkpoints, logs and results"
    if args.eval_only and not cfg.DATASETS.TEST:
        return "--eval-only with DATASETS.TEST () has nothing to evaluate; give a dataset to evaluate on"
    needs = [("DATALOADER.NUM_WORKERS", lambda v: v >= 0, ">= 0")]
    if not args.eval_only:
        needs += [("SOLVER.MAX_ITER", lambda v: v >= 1, ">= 1"), ("SOLVER.IMS_PER_BATCH", lambda v: v >= 1, ">= 1"),
                  ("SOLVER.CHECKPOINT_PERIOD", lambda v: v >= 1, ">= 1"), ("SOLVER.BASE_LR", lambda v: v >= 0, ">= 0"),
                  ("INPUT.MIN_SIZE_TRAIN", len, "at least one size, e.g. (800,)")]
    for key, ok, must in needs:
        section, name = key.split(".")
        if not ok(value := cfg[section][name]):
            return f"{key} is {value!r}; it must be {must}"
    return None


def gpu_problem(device: str, num_gpus: int) -> Optional[str]:
    """What keeps a CUDA ``device`` (MODEL.DEVICE) and ``num_gpus`` (--num-gpus) from running on this machine's
    GPUs, naming the flag or key; None if nothing."""
    if not torch.cuda.is_available():
        return (f"MODEL.DEVICE is '{device}' but no CUDA GPU is visible; add `MODEL.DEVICE cpu` to the command line "
                "to run on the CPU.")
    visible, index = torch.cuda.device_count(), torch.device(device).index
    if num_gpus > visible:  # Detectron2's launch asserts this in every worker
        return (f"--num-gpus {num_gpus}, but {visible} CUDA GPU(s) are visible; give --num-gpus {visible} or fewer "
                "(CUDA_VISIBLE_DEVICES chooses which)")
    if index is not None and num_gpus > 1:  # DistributedDataParallel would find every model on that one GPU
        return (f"MODEL.DEVICE {device} with --num-gpus {num_gpus}: each process runs on the GPU of its rank; "
                "give MODEL.DEVICE cuda")
    if index is not None and index >= visible:
        return f"MODEL.DEVICE {device}, but {visible} CUDA GPU(s) are visible: give cuda:0 to cuda:{visible - 1}"
    return None


def dist_url_problem(dist_url: str, num_machines: int) -> Optional[str]:
    """For a job on this machine alone, why its processes could not meet at ``dist_url`` (--dist-url): a port that
    is no port, or one another run listens on (each worker otherwise fails with the same traceback); None if
    nothing, or the URL is no tcp:// one."""
    url = urllib.parse.urlparse(dist_url)
    try:
        port = url.port
    except ValueError:
        return f"--dist-url {dist_url}: its port is not a number from 1 to 65535; give one, or --dist-url auto"
    if num_machines > 1 or url.scheme != "tcp" or not port:
        return None
    if _port_in_use(port, ipv6_host=":" in (url.hostname or "")):
        return (f"--dist-url {dist_url}: port {port} is in use on this machine (another multi-GPU run?); give "
                "--dist-url auto to use a free port")
    return None


def _port_in_use(port: int, ipv6_host: bool) -> bool:
    """Whether torch.distributed's store could not listen on ``port``, or the workers would meet another listener
    there: the store listens on every IPv6 address (IPv4 too), else on every IPv4 one; workers given an IPv6 host
    find it only on the first."""
    ipv6 = _bind_refused(socket.AF_INET6, "::", port)  # None: no IPv6 here
    if ipv6_host:
        return bool(ipv6)
    return ipv6 is not False and bool(_bind_refused(socket.AF_INET, "", port))


def _bind_refused(family: socket.AddressFamily, address: str, port: int) -> Optional[bool]:
    """Whether binding ``address``:``port`` finds it in use, as the store binds (SO_REUSEADDR: a port an ended run
    left waiting is free; IPv6 with IPv4); None if the machine has no such ``family``."""
    try:
        probe = socket.socket(family)
    except OSError:
        return None
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            probe.bind((address, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


# the config key that sets how many classes a meta-architecture's predictors have, to check against the datasets
CLASS_COUNT_KEYS = {"GeneralizedRCNN": "ROI_HEADS", "PanopticFPN": "ROI_HEADS", "RetinaNet": "RETINANET"}


def check_class_count(cfg: CfgNode, datasets: Sequence[str]) -> None:
    """:func:`check_num_classes` of ``datasets`` against the class count key of the config's meta-architecture."""
    if count_key := CLASS_COUNT_KEYS.get(cfg.MODEL.META_ARCHITECTURE):
        check_num_classes(datasets, cfg.MODEL[count_key].NUM_CLASSES, f"MODEL.{count_key}.NUM_CLASSES")


def _triton_interpreted() -> bool:
    from gn_detection.triton_group_norm import INTERPRETED  # imports Triton: only when a config asks for it

    return INTERPRETED


def check_weights(weights: str) -> None:
    """That ``MODEL.WEIGHTS`` names something to load: an existing file, a URL, or a ``gn-zoo://`` entry with
    a file.

    Raises:
        FileNotFoundError, ValueError: naming the value and what to give instead.
    """
    if weights.startswith(model_zoo.SCHEME):
        try:
            model_zoo.downloadable(weights)
        except (KeyError, DownloadError) as e:
            raise ValueError(f"MODEL.WEIGHTS {weights}: {e.args[0]}") from e
    if not weights or "://" in weights:  # none, or a URL: read when training loads it
        return
    local_file = urllib.parse.urlparse(weights)._replace(query="").geturl()  # Detectron2 drops a ?query
    if os.path.isdir(local_file):
        raise ValueError(f"MODEL.WEIGHTS {weights} is a folder; give a checkpoint file in it, e.g. "
                         f"{os.path.join(weights, 'model_final.pth')}")
    if not os.path.isfile(local_file):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights} does not exist; give a checkpoint file, a URL or a "
                                "gn-zoo:// name (tools/model_zoo.py list)")


def resumed_checkpoint(meta_model: torch.nn.Module, output_dir: str, resume: bool) -> Optional[str]:
    """The checkpoint ``--resume`` continues from, the one ``output_dir/last_checkpoint`` names (read by the
    checkpointer training resumes with); None without ``resume`` or that file (Detectron2 then starts from
    MODEL.WEIGHTS).

    Raises:
        ValueError: if last_checkpoint names a file that is not there.
    """
    checkpointer = AtomicCheckpointer(meta_model, save_dir=output_dir)
    if not (resume and checkpointer.has_checkpoint()):
        return None
    try:
        path = checkpointer.get_checkpoint_file()  # "" for a tag it cannot open (a folder)
    except UnicodeDecodeError:  # not text
        path = ""
    if not os.path.isfile(path):
        tag = os.path.join(output_dir, "last_checkpoint")
        names_one = path and os.path.normpath(path) != os.path.normpath(output_dir)  # an empty tag names the folder
        named = (f"names {path}, which does not exist" if names_one
                 else "names no checkpoint (empty, a folder or not text)")
        raise ValueError(f"--resume: {tag} {named}; restore that checkpoint, or delete {tag} to start from "
                         "MODEL.WEIGHTS")
    return path


def check_weights_read(meta_model: torch.nn.Module, weights: str, eval_only: bool, resumed: bool,
                       allow_partial: bool) -> None:
    """That the weights the run starts from can be read (a truncated or foreign file otherwise fails after setup),
    and, for ``--eval-only`` (unless ``allow_partial``) and a training ``--resume``, that they set every tensor of
    the model: see :func:`check_weights_fit`. For training from MODEL.WEIGHTS (ImageNet weights set the backbone
    alone) only a local file is read here; a URL or gn-zoo:// name downloads when training loads it."""
    if eval_only and not allow_partial:
        check_weights_fit(meta_model, weights, "--eval-only")
    elif resumed and not eval_only:
        check_weights_fit(meta_model, weights, "--resume")
    elif weights and (eval_only or "://" not in weights):
        load_into_meta_model(meta_model, weights)


def load_into_meta_model(meta_model: torch.nn.Module, path: str) -> LoadCounts:
    """Load the checkpoint at ``path`` as training and evaluation will, into the model built on the meta device
    (names and shapes are compared; nothing is copied); what the load placed.

    Raises:
        ValueError, pickle.UnpicklingError: for a file that cannot be read or holds Python objects.
    """
    checkpointer = AtomicCheckpointer(meta_model)
    checkpointer.logger = logging.getLogger("gn_detection.weights_check")
    checkpointer.logger.disabled = True  # the run logs the real load
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # the point: no copy
        checkpointer.load(path, checkpointables=[])
    return checkpointer.last_load_counts


# why a checkpoint must set every tensor, and what to do instead, for the flags that need it
FIT_ADVICE = {
    "--eval-only": ("so the AP would not be the checkpoint's. Give the checkpoint trained with this config and these "
                    "overrides (e.g. the same MODEL.ROI_HEADS.NUM_CLASSES and widths), or TEST.ALLOW_PARTIAL_WEIGHTS "
                    "True to evaluate it anyway"),
    "--resume": ("so training would not continue that run (the config or overrides changed since, e.g. a depth, "
                 "width or NUM_CLASSES). Resume with the settings it was trained with, or give a new OUTPUT_DIR to "
                 "start anew"),
}


def check_weights_fit(meta_model: torch.nn.Module, path: str, flag: str) -> None:
    """For ``--eval-only`` and ``--resume`` (``flag``): that the checkpoint at ``path`` sets every tensor of the
    model (:func:`load_into_meta_model`). A model left partly at its random initialization would be evaluated or
    trained on without a word otherwise (or, resumed, fail in the optimizer). BatchNorm's ``num_batches_tracked``
    counters, unused at evaluation, may be absent.

    Raises:
        ValueError: naming the flag, the checkpoint, the counts, the first tensors it leaves unset and what to do.
    """
    counts = load_into_meta_model(meta_model, path)
    if counts.unset_names:
        raise ValueError(f"{flag}: {counts.unset_summary(path)}, {FIT_ADVICE[flag]}")


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
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        resumes = args.resume and trainer.checkpointer.has_checkpoint()  # that checkpoint was read before launch
        try:
            trainer.resume_or_load(resume=args.resume)
        # a gn-zoo name's download (DownloadError) or a URL's (Detectron2's: urllib's URLError, an OSError), or its file
        except (ValueError, OSError, pickle.UnpicklingError, DownloadError) as e:
            if resumes:
                raise
            raise UnusableInput(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}") from e
        metrics_start = fresh_run_start(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), trainer.start_iter)
        results = trainer.train()
        model = trainer.model
    if comm.is_main_process():
        save_pictures(cfg, getattr(model, "module", model), metrics_start)  # unwrap DDP
    return results


def interrupted_note(output_dir: Optional[str], eval_only: bool) -> str:
    """What a run stopped by Ctrl-C leaves to go on from: for training, the checkpoint ``--resume`` continues from
    (``output_dir/last_checkpoint`` names it), if one was saved; ``output_dir`` None: stopped while its settings were
    being checked, before anything was written."""
    if output_dir is None:
        return "interrupted while checking the settings and data; nothing was started"
    if eval_only:
        return "interrupted; evaluation writes its result files whole, so none were written"
    tag = os.path.join(output_dir, "last_checkpoint")
    try:
        with open(tag) as f:
            saved = f.read().strip()
    except OSError:  # none (or unreadable: --resume would say so)
        return (f"interrupted before the first checkpoint in {output_dir} (every SOLVER.CHECKPOINT_PERIOD "
                "iterations); running the command again starts anew")
    return f"interrupted; {tag} names {saved}: add --resume to the command to continue from it"


def worker(args, cfg, errors: multiprocessing.queues.SimpleQueue) -> Optional[dict]:
    """:func:`main` in one process of the job. In a job of several processes, UnusableInput is put on ``errors`` for
    :func:`run` to raise in the launching process, rather than printed as each worker's traceback."""
    try:
        return main(args, cfg)
    except UnusableInput as e:
        if comm.get_world_size() == 1:  # run's own process
            raise
        errors.put(e.args[0])
        sys.exit(UNUSABLE_INPUT_EXIT)


def run(args, cfg) -> None:
    """Launch :func:`worker` on this machine's processes of the job (``args.num_gpus``; in this process for one).

    Raises:
        UnusableInput: when the training data or the weights loaded once started cannot be used, in any process.
    """
    errors = multiprocessing.get_context("spawn").SimpleQueue()  # the context Detectron2's launch spawns with
    try:
        # each worker takes the checked config, rather than loading and checking it again
        launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args, cfg, errors))
    except ProcessExitedException as e:  # the other workers are stopped by now
        if e.exit_code == UNUSABLE_INPUT_EXIT and not errors.empty():
            raise UnusableInput(errors.get()) from None
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
        except UnusableInput as e:  # before the first iteration
            sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(interrupted_note(config and config.OUTPUT_DIR, args.eval_only), file=sys.stderr)
        sys.exit(130)  # the shells' status for a command stopped by Ctrl-C
