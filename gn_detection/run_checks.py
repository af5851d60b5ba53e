"""The checks a training or evaluation run passes before it starts (tools/train_net.py runs them in the launching
process, so that a mistake stops with one line before any worker starts): the config's values against the flags,
this machine's GPUs and ports, the datasets and the weights, each named with the file, key or value at fault and
what to do."""
import argparse
import errno
import logging
import os
import pickle
import re
import socket
import urllib.parse
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.utils.file_io import PathManager

from . import model_zoo
from .atomic_write import not_writable
from .checkpoint import AtomicCheckpointer, LoadCounts
from .config import check_model_builds, gn_settings, load_config
from .datasets import (check_dataset_files, check_evaluation_datasets, check_num_classes, check_same_classes,
                       check_training_image_ids)
from .download import DownloadError


def checked_config(args: argparse.Namespace) -> CfgNode:
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
    if problem := device_problem(cfg, world_size, "--num-gpus 1"):
        raise ValueError(f"{problem} (--num-gpus {args.num_gpus}, --num-machines {args.num_machines})")
    if world_size > 1 and (problem := dist_url_problem(args.dist_url, args.num_machines)):
        raise ValueError(problem)
    if not args.eval_only and reference and reference != world_size and cfg.SOLVER.IMS_PER_BATCH % reference:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not a multiple of SOLVER.REFERENCE_WORLD_SIZE "
            f"{reference}, which Detectron2 needs to rescale the batch, LR and schedule to {world_size} GPU(s); "
            f"give a multiple of {reference}, or SOLVER.REFERENCE_WORLD_SIZE 0 to use them as given"
        )
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
        check_training_image_ids(cfg.DATASETS.TRAIN)  # the rest of the training data is checked once loaded
    resumed = resumed_checkpoint(meta_model, cfg.OUTPUT_DIR, args.resume)
    if args.resume and not resumed and not args.eval_only:
        check_untagged_checkpoints(cfg.OUTPUT_DIR)
    if not resumed:
        check_weights(cfg.MODEL.WEIGHTS)
    if args.eval_only and not resumed:
        check_zoo_inference_settings(cfg)
    if args.eval_only and not resumed and not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a checkpoint file, URL or gn-zoo:// name), or --resume "
                         f"with a checkpoint in OUTPUT_DIR {cfg.OUTPUT_DIR}; it would evaluate a random model")
    # last: it reads (for --eval-only maybe downloads) them
    check_weights_read(meta_model, resumed or cfg.MODEL.WEIGHTS, args.eval_only, bool(resumed),
                       cfg.TEST.ALLOW_PARTIAL_WEIGHTS, gn_settings(cfg))
    return cfg


def device_problem(cfg: CfgNode, processes: int, one_process: str) -> Optional[str]:
    """What keeps a run of ``processes`` processes (``one_process``: how to ask for one) from running on the config's
    MODEL.DEVICE: several processes on the CPU, the Triton GN kernels off CUDA; None if nothing. Whether this machine
    has the GPUs is :func:`gpu_problem`'s to say."""
    device = cfg.MODEL.DEVICE
    if processes > 1 and not device.startswith("cuda"):
        return (f"{processes} processes with MODEL.DEVICE {device}: Detectron2's trainer gives each process's model a "
                f"GPU (DistributedDataParallel device_ids), so several processes need CUDA; on the CPU give "
                f"{one_process}")
    if cfg.MODEL.GN.IMPL == "triton" and not device.startswith("cuda") and not _triton_interpreted():
        return (f"MODEL.GN.IMPL triton runs its kernels on CUDA, but MODEL.DEVICE is {device} (on the CPU only under "
                "TRITON_INTERPRET=1, for tests); set MODEL.GN.IMPL auto")
    return None


def run_problem(cfg: CfgNode, args: argparse.Namespace) -> Optional[str]:
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
    from .triton_group_norm import INTERPRETED  # imports Triton: only when a config asks for it

    return INTERPRETED


def check_weights(weights: str) -> None:
    """That ``MODEL.WEIGHTS`` names something to load: an existing file, a URL, or a ``gn-zoo://`` entry with
    a file.

    Raises:
        FileNotFoundError, ValueError: naming the value and what to give instead.
    """
    if weights.startswith(model_zoo.SCHEME):
        try:
            model_zoo.downloadable(_without_query(weights))
        except (KeyError, DownloadError) as e:
            raise ValueError(f"MODEL.WEIGHTS {weights}: {e.args[0]}") from e
    if "://" in weights and not _path_handled(weights):
        scheme = weights.split("://")[0]
        raise ValueError(f"MODEL.WEIGHTS {weights}: no file there that Detectron2's PathManager can read (no handler "
                         f"for {scheme}://, or no such file); give a checkpoint file, an http(s):// URL or a gn-zoo:// "
                         "name (tools/model_zoo.py list), or register a PathHandler for the scheme")
    if not weights or "://" in weights:  # none, or a URL: read when training loads it
        return
    local_file = _without_query(weights)
    if os.path.isdir(local_file):
        raise ValueError(f"MODEL.WEIGHTS {weights} is a folder; give a checkpoint file in it, e.g. "
                         f"{os.path.join(weights, 'model_final.pth')}")
    if not os.path.isfile(local_file):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights} does not exist; give a checkpoint file, a URL or a "
                                "gn-zoo:// name (tools/model_zoo.py list)")


def _without_query(weights: str) -> str:
    """MODEL.WEIGHTS as Detectron2's checkpointer loads it: without a ``?query`` (``?matching_heuristics=True``)."""
    return urllib.parse.urlparse(weights)._replace(query="").geturl()


def _path_handled(path: str) -> bool:
    """Whether a ``scheme://`` ``path`` may be a file to Detectron2's PathManager: not where the native handler,
    which takes the schemes no handler registered, finds no such file; a URL's handler cannot tell without fetching
    it, and a handler that fails to tell is left for the load to."""
    try:
        return PathManager.isfile(path)
    except Exception:  # noqa: BLE001 (a URL's handler: NotImplementedError; a remote store's own errors)
        return True  # loading it will tell


def check_zoo_inference_settings(cfg: CfgNode) -> None:
    """For evaluating a ``gn-zoo://`` entry (MODEL.WEIGHTS): that the config has the overrides its weights need at
    inference (the entry's ``opts``: Detectron's unaligned ROIAlign for its e2e models), which a config file does not
    give and without which the AP is wrong, silently.

    Raises:
        ValueError: naming the entry and the overrides to add.
    """
    if not cfg.MODEL.WEIGHTS.startswith(model_zoo.SCHEME):
        return
    opts = list(model_zoo.lookup(_without_query(cfg.MODEL.WEIGHTS)).opts)
    expected = cfg.clone()
    expected.defrost()
    expected.merge_from_list(opts)
    if expected != cfg:
        raise ValueError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} is evaluated with {' '.join(map(str, opts))}, as it was "
                         "trained (another setting gives another AP); add those overrides to the command")


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
        raise ValueError(f"--resume: {tag} {named}; restore that checkpoint, write the file name of another one "
                         "into it, or give a new OUTPUT_DIR to start anew")
    return path


def check_untagged_checkpoints(output_dir: str) -> None:
    """For a training ``--resume`` in an ``output_dir`` without ``last_checkpoint``: that it holds no checkpoint of
    a run (``model_final.pth``, ``model_0001999.pth``), which Detectron2 would leave for MODEL.WEIGHTS and then
    overwrite.

    Raises:
        ValueError: naming the checkpoints, the missing tag and what to do.
    """
    try:  # the names Detectron2's checkpointers save under
        saved = sorted(name for name in os.listdir(output_dir) if re.fullmatch(r"model_(final|\d{7})\.pth", name))
    except OSError:  # no such folder (yet): nothing to lose
        return
    if saved:
        tag = os.path.join(output_dir, "last_checkpoint")
        raise ValueError(f"--resume: {output_dir} holds checkpoints ({', '.join(saved[-3:])}) but no {tag} naming the "
                         "one to continue from, so Detectron2 would start from MODEL.WEIGHTS and overwrite them; write "
                         f"that checkpoint's file name into {tag}, or give a new OUTPUT_DIR to start anew")


def check_weights_read(meta_model: torch.nn.Module, weights: str, eval_only: bool, resumed: bool,
                       allow_partial: bool, settings: Dict[str, object]) -> None:
    """That the weights the run starts from (``resumed``: the checkpoint ``--resume`` continues from) can be read (a
    truncated or foreign file otherwise fails after setup), and, for ``--eval-only`` (unless ``allow_partial``) and a
    training ``--resume``, that they set every tensor of the model: a model left partly at its random initialization
    would be evaluated or trained on without a word otherwise (or, resumed, fail in the optimizer); BatchNorm's
    ``num_batches_tracked`` counters, unused at evaluation, may be absent; and, evaluated or resumed, that the
    ``settings`` the checkpoint records (:func:`~gn_detection.config.gn_settings`) are the config's. For training
    from MODEL.WEIGHTS (ImageNet
    weights set the backbone alone) only a local file is read here; a URL or gn-zoo:// name downloads when training
    loads it.

    Raises:
        ValueError: naming the flag or key, the weights, what is wrong and what to do.
    """
    fit_flag = "--eval-only" if eval_only and not allow_partial else "--resume" if resumed and not eval_only else None
    if not weights or not (fit_flag or eval_only or "://" not in weights):
        return
    try:
        counts, extras = load_into_meta_model(meta_model, weights)
    except (ValueError, OSError, DownloadError, pickle.UnpicklingError) as e:
        message = str(e.args[0]) if e.args else type(e).__name__
        if resumed:
            raise ValueError(f"--resume: {message}; to continue from an earlier checkpoint, write its file name into "
                             "last_checkpoint") from e
        raise ValueError(message if message.startswith(weights) else f"MODEL.WEIGHTS {weights}: {message}") from e
    if fit_flag and counts.unset_names:
        raise ValueError(f"{fit_flag}: {counts.unset_summary(weights)}, {FIT_ADVICE[fit_flag]}")
    if (eval_only or resumed) and (problem := settings_problem(extras.get("settings"), settings)):
        raise ValueError(f"{'--eval-only' if eval_only else '--resume'}: {weights} {problem}")


def settings_problem(recorded: Optional[Dict[str, object]], settings: Dict[str, object]) -> Optional[str]:
    """How the settings a checkpoint ``recorded`` differ from the config's ``settings``, said with what to do; None
    if they do not, or it recorded none (saved elsewhere)."""
    recorded = _in_effect(recorded) if isinstance(recorded, dict) else {}
    settings = _in_effect(settings)
    differing = [key for key, value in recorded.items() if key in settings and settings[key] != value]
    if not differing:
        return None
    trained_with = " ".join(f"{key} {recorded[key]}" for key in differing)
    return (f"was trained with {trained_with}, but the config gives "
            f"{' '.join(f'{key} {settings[key]}' for key in differing)}: its GN layers would compute other statistics "
            f"from the same tensors (no load notices). Add {trained_with} to the command")


def _in_effect(settings: Dict[str, object]) -> Dict[str, object]:
    """The GN settings that decide the layers: MODEL.GN.NUM_GROUPS only where CHANNELS_PER_GROUP is 0."""
    if settings.get("MODEL.GN.CHANNELS_PER_GROUP"):
        return {key: value for key, value in settings.items() if key != "MODEL.GN.NUM_GROUPS"}
    return settings


def load_into_meta_model(meta_model: torch.nn.Module, path: str) -> Tuple[LoadCounts, Dict]:
    """Load the checkpoint at ``path`` as training and evaluation will, into the model built on the meta device
    (names and shapes are compared; nothing is copied); what the load placed, and the checkpoint's other data.

    Raises:
        ValueError, pickle.UnpicklingError: for a file that cannot be read or holds Python objects.
    """
    checkpointer = AtomicCheckpointer(meta_model)
    checkpointer.logger = logging.getLogger("gn_detection.weights_check")
    checkpointer.logger.disabled = True  # the run logs the real load
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # the point: no copy
        extras = checkpointer.load(path, checkpointables=[])
    return checkpointer.last_load_counts, extras


# why a checkpoint must set every tensor, and what to do instead, for the flags that need it
FIT_ADVICE = {
    "--eval-only": ("so the AP would not be the checkpoint's. Give the checkpoint trained with this config and these "
                    "overrides (e.g. the same MODEL.ROI_HEADS.NUM_CLASSES and widths), or TEST.ALLOW_PARTIAL_WEIGHTS "
                    "True to evaluate it anyway"),
    "--resume": ("so training would not continue that run (the config or overrides changed since, e.g. a depth, "
                 "width or NUM_CLASSES). Resume with the settings it was trained with, or give a new OUTPUT_DIR to "
                 "start anew"),
}
