"""Speed and memory of Mask R-CNN variants: training images/s (full step, optimizer included), inference
seconds per image and peak memory, over images per GPU and precisions, side by side in one process.

Used by ``tools/benchmark.py``; see README "Speed: fused GN kernels and the benchmark". Timing is per
iteration with the device synchronized before and after, after warm-up; the median is reported. Peak memory
is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set (VmHWM, reset per cell) on
the CPU; on CUDA the peak reserved by the allocator is recorded too, since a CUDA graph's replays use memory
its pool reserved without allocating.
"""
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2 import model_zoo as detectron2_zoo
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from .atomic_write import write_atomically
from .config import load_config
from .datasets import check_annotations, check_dataset_files
from .host_work import COUNTED_PARTS, counting_host_work

logger = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}
REFERENCE_VARIANT = "detectron2_gn"
_POLYGON_VERTICES = 32  # per synthetic mask; COCO's polygons have a few dozen
PROGRESS_EVERY_S = 30.0  # how often a long measurement logs how far it is


# The oneDNN probe that says whether this CPU convolves in a half precision natively (AVX512-BF16/AMX, AVX512-FP16).
_CPU_HALF_PROBES = {"amp_bf16": "_is_mkldnn_bf16_supported", "amp_fp16": "_is_mkldnn_fp16_supported"}


def cpu_has_fast(precision: str) -> bool:
    """Whether this CPU runs ``precision``'s (amp_bf16 or amp_fp16) convolutions through oneDNN. Without it they
    take a reference path: a 256-channel 3x3 convolution on 2x256x64x64 took 18 s in bf16 and 20 s in fp16
    against 0.23 s in fp32 on an AVX2-only 2-core VM. With it fp16 may still be far slower than fp32
    (:func:`slow_precision_warning`)."""
    probe = getattr(torch.ops.mkldnn, _CPU_HALF_PROBES[precision], None)
    return bool(probe is not None and probe())


def slow_precision_warning(device: str, precisions: Sequence[str]) -> Optional[str]:
    """A warning, before any measurement, when an AMP precision is asked of the CPU that will be far slower than
    fp32 there; else None. amp_bf16 is warned about without fast convolutions in it (see :func:`cpu_has_fast`);
    amp_fp16 always: oneDNN's fp16 probe does not predict its speed."""
    if device.split(":")[0] != "cpu":
        return None
    slow = [p for p in precisions if p in _CPU_HALF_PROBES and not cpu_has_fast(p)]
    warnings = []
    if slow:
        warnings.append(f"--precision {' '.join(slow)} on this CPU: its convolutions have no fast path in that "
                        "precision (no AVX512-BF16/FP16 or AMX in oneDNN), so those cells take far longer than fp32 "
                        "ones (one 3x3 convolution: about 20 s against 0.23 s on an AVX2 VM); drop them or use a GPU")
    if "amp_fp16" in precisions and "amp_fp16" not in slow:
        warnings.append("--precision amp_fp16 on the CPU is often far slower than fp32 even where oneDNN reports "
                        "fp16 support: on a Xeon with AVX512-FP16 and AMX a 64-channel 3x3 convolution took 149 ms "
                        "forward+backward in fp16 against 2.4 ms in fp32, and the R18 shapes model trained 0.19 "
                        "img/s against 7.09 (amp_bf16: 8.82); prefer fp32 or amp_bf16 there, or use a GPU")
    return "; ".join(warnings) or None


@dataclass(frozen=True)
class Variant:
    """A model to measure: a config file and KEY VALUE overrides."""

    name: str
    config_file: str
    opts: Sequence = ()


BUILTIN_VARIANTS = ("ours", "ours_stock_gn", REFERENCE_VARIANT, "frozen_bn")  # :func:`builtin_variants`' names


def builtin_variants(ours_config: str) -> Dict[str, Variant]:
    """The variants every comparison needs (:data:`BUILTIN_VARIANTS`): ours, ours with stock GN, Detectron2's GN and
    frozen BN (whose statistics the measurements calibrate: :func:`calibrate_frozen_batchnorm`)."""
    return {
        "ours": Variant("ours", ours_config),
        "ours_stock_gn": Variant(
            "ours_stock_gn", ours_config,
            ("MODEL.GN.IMPL", "torch", "MODEL.GN.FUSE_RELU", False, "MODEL.GN.AUTOCAST_HALF", False,
             "MODEL.GN.RECOMPUTE_OUTPUT", False),
        ),
        REFERENCE_VARIANT: Variant(
            REFERENCE_VARIANT, detectron2_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml")
        ),
        "frozen_bn": Variant(
            "frozen_bn", detectron2_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
        ),
    }


def split_outside_brackets(text: str) -> List[str]:
    """``text`` split at the commas outside brackets, parentheses and braces, so that a list value keeps its
    commas: "A=[1,2],B=3" gives "A=[1,2]" and "B=3". Raises ValueError for unbalanced brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if depth < 0:
            break
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in {text!r}")
    return items + [text[start:]]


def variant_overrides(spec: str) -> Tuple[str, List[Tuple[str, str]]]:
    """A variant spec's built-in name and its overrides as (KEY, VALUE) pairs, whitespace around each stripped:
    ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (commas inside a value's brackets belong to it). Raises ValueError,
    naming the spec, for an unknown name or an override that is not KEY=VALUE."""
    name, _, overrides = (part.strip() for part in spec.partition(":"))
    if name not in BUILTIN_VARIANTS:
        raise ValueError(f"Unknown variant {name!r} in {spec!r}; built-in variants: {', '.join(BUILTIN_VARIANTS)}")
    try:
        items = [item.strip() for item in split_outside_brackets(overrides) if item.strip()]
    except ValueError as e:
        raise ValueError(f"Variant {spec!r}: {e}") from None
    pairs = []
    for item in items:
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ValueError(f"Variant {spec!r}: overrides must be KEY=VALUE separated by commas, got {item!r} "
                             "(trailing KEY VALUE pairs after the flags apply to every variant)")
        if key == "MODEL.DEVICE":  # the timing, synchronization and peak memory are --device's
            raise ValueError(f"Variant {spec!r}: every variant runs on --device; give that instead of MODEL.DEVICE")
        pairs.append((key, value))
    return name, pairs


def parse_variant(spec: str, builtins: Dict[str, Variant]) -> Variant:
    """``NAME`` (a built-in) or ``NAME:KEY=VALUE,KEY=VALUE`` (a built-in with overrides, see
    :func:`variant_overrides`), e.g. ``ours:MODEL.GN.FUSE_RELU=False`` to measure one lever."""
    name, pairs = variant_overrides(spec)
    base = builtins[name]
    return Variant(spec, base.config_file, tuple(base.opts) + tuple(item for pair in pairs for item in pair))


def variant_config(variant: Variant, device: str, opts: Sequence = ()) -> CfgNode:
    """The variant's config with random weights on ``device``; the variant's own overrides apply next, then
    ``opts`` (from the command line).

    SOLVER.BASE_LR is 0 unless the overrides set it: the SGD step still runs in full (momentum, weight decay, the
    update), but random weights stay as they are, so every timed iteration does the same work and a model
    without normalization (frozen BN at its identity statistics) cannot blow up to Inf mid-measurement.
    Inference keeps the config's ROI_HEADS.SCORE_THRESH_TEST (Detectron2's 0.05, as in issue 5's table, also
    of random weights): then no or almost no box passes it (class scores near 1/81), so the time is the
    backbone's, the RPN's and the box head's, and each cell records the detections per image returned, i.e.
    the mask head's RoIs. ``opts`` of ``MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0`` make every model return
    TEST.DETECTIONS_PER_IMAGE instead, at the price of a class-wise NMS over all proposals x classes (about
    21 of 70 ms per image on an H200)."""
    fixed = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "SOLVER.BASE_LR", 0.0]
    return load_config(variant.config_file, [*fixed, *variant.opts, *opts])


def synthetic_batch(count: int, height: int, width: int, boxes: int, num_classes: int,
                    mask_format: str = "polygon", seed: int = 0) -> List[dict]:
    """COCO-sized training inputs as Detectron2's mapper produces them: uint8 CHW images on the CPU, each with
    ``boxes`` boxes of random classes whose masks are filled ellipses, given as COCO polygons and made into
    instances by Detectron2's ``annotations_to_instances`` in ``mask_format`` (INPUT.MASK_FORMAT).

    The format matters for memory: with "bitmask" the ROI heads give each of the 512 sampled proposals of an
    image its own full-size copy of its ground-truth mask (0.5 GB per 800x1216 image, alive while the mask
    head runs); with Detectron2's default "polygon", which COCO training uses, they share the polygons."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, _POLYGON_VERTICES, endpoint=False)
    batch = []
    for _ in range(count):
        sizes = rng.uniform(0.05, 0.5, size=(boxes, 2)) * [width, height]
        corners = rng.uniform(0, 1, size=(boxes, 2)) * ([width, height] - sizes)
        annotations = []
        for corner, size, category in zip(corners, sizes, rng.integers(0, num_classes, size=boxes)):
            outline = corner + size / 2 * (1 + np.stack([np.cos(angles), np.sin(angles)], axis=1))  # (x, y) rows
            annotations.append({"bbox": [*corner, *(corner + size)], "bbox_mode": BoxMode.XYXY_ABS,
                                "category_id": int(category), "segmentation": [outline.ravel()]})
        instances = annotations_to_instances(annotations, (height, width), mask_format=mask_format)
        image = torch.from_numpy(rng.integers(0, 256, size=(3, height, width), dtype=np.uint8))
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def dataset_records(dataset: str, count: int) -> List[dict]:
    """The first ``count`` records of a registered dataset, loaded once for all variants (COCO's annotations take
    some 20 s). Raises ValueError for a name no one registered or too few images, and FileNotFoundError, naming the
    path, for files it lacks."""
    check_dataset_files([dataset], named_by="--dataset")
    dicts = DatasetCatalog.get(dataset)
    if len(dicts) < count:
        raise ValueError(f"Dataset {dataset!r} has {len(dicts)} images; the largest --images-per-gpu is {count}")
    return dicts[:count]


def dataset_batch(cfg: CfgNode, records: List[dict], dataset: str) -> List[dict]:
    """``records`` of ``dataset`` (:func:`dataset_records`) through Detectron2's training mapper as ``cfg`` sets it
    (input sizes, mask format); records without boxes or, for a Mask R-CNN, masks readable in INPUT.MASK_FORMAT
    (:func:`check_annotations`) are ValueErrors naming the key."""
    check_annotations(records, f"--dataset {dataset!r}", cfg.MODEL.MASK_ON, cfg.INPUT.MASK_FORMAT)
    mapper = DatasetMapper(cfg, is_train=True)  # it copies each record before changing it
    return [mapper(record) for record in records]


def error_text(e: Exception) -> str:
    """An exception in one line (its message's first), for the JSON; tables show it :func:`brief`."""
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


def brief(text: str, limit: int = 160) -> str:
    """``text`` cut to ``limit`` characters for a table cell, marked with "…" where cut (the JSON has it whole)."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], object], device: str, warmup: int, iters: int, calls: int = 1,
                   label: str = "") -> float:
    """Median wall time per call of ``step`` over ``iters`` samples of ``calls`` calls each, after ``warmup``
    calls, device-synchronized around each sample (``calls`` > 1 keeps the sync out of short ops' times). With
    ``label``, logs how far it is every :data:`PROGRESS_EVERY_S` seconds: on a CPU one cell can take minutes."""
    last_log = time.perf_counter()

    def progress(phase: str, done: int, total: int, times: Sequence[float] = ()) -> None:
        nonlocal last_log
        if label and time.perf_counter() - last_log >= PROGRESS_EVERY_S:
            so_far = f", median so far {statistics.median(times):.3g} s" if times else ""
            logger.info("%s: %s %d/%d%s", label, phase, done, total, so_far)
            last_log = time.perf_counter()

    for done in range(warmup):
        step()
        progress("warm-up", done + 1, warmup)
    times = []
    for done in range(iters):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        synchronize(device)
        times.append((time.perf_counter() - start) / calls)
        progress("timed", done + 1, iters, times)
    return statistics.median(times)


class PeakMemory:
    """Peak memory of the code run inside ``with``: CUDA allocator peak, or the CPU process's peak RSS; on
    CUDA also the peak the allocator reserved (``reserved_bytes``; what CUDA graph pools hold counts here)."""

    def __init__(self, device: str):
        self.device, self.bytes, self.reserved_bytes = device, None, None

    def __enter__(self):
        gc.collect()  # earlier cells' models
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM)
                f.write("5")
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        else:
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            self.bytes = kib * 1024


def training_step(model, optimizer, batch: List[dict], precision: Optional[torch.dtype], scaler, device: str):
    """One full training step as Detectron2's (AMP)Trainer runs it: forward, loss sum, backward, SGD step."""
    with torch.autocast(device.split(":")[0], dtype=precision or torch.float32, enabled=precision is not None):
        losses = sum(model(batch).values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses


@dataclass
class Cell:
    """One measured (variant, precision, images per iteration) combination."""

    variant: str
    precision: str
    images_per_iter: int
    train_images_per_s: Optional[float] = None
    peak_memory_gb: Optional[float] = None
    peak_reserved_gb: Optional[float] = None  # CUDA only
    inference_s_per_image: Optional[float] = None
    inference_detections: Optional[int] = None  # returned per image: the mask head's RoIs inside that time
    nonfinite_losses: int = 0
    error: Optional[str] = None
    repeat: int = 0  # which pass over the variants measured it (--repeats)


def calibrate_frozen_batchnorm(model: torch.nn.Module, inputs: List[dict]) -> int:
    """Sets every ``FrozenBatchNorm2d`` of ``model``'s backbone to the mean and variance of its input on
    ``inputs`` (one no-grad backbone forward in which each layer is set before it runs, so it sees layers
    before it already set), as pretrained statistics would normalize; returns how many were set.

    With random weights and identity statistics a backbone without normalization grows its features to
    about 1e4: the RPN's proposals collapse to a few empty or whole-image boxes (5 per image instead of
    1000) and the heads idle, so the benchmark would time another workload than a trained model's."""
    layers = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]

    def set_statistics(layer, args):
        x = args[0].float()
        layer.running_mean.copy_(x.mean((0, 2, 3)))
        layer.running_var.copy_(x.var((0, 2, 3), unbiased=False))

    handles = [layer.register_forward_pre_hook(set_statistics) for layer in layers]
    try:
        if layers:
            with torch.no_grad():
                model.backbone(model.preprocess_image(inputs).tensor)
    finally:
        for handle in handles:
            handle.remove()
    return len(layers)


def training_setup(cfg: CfgNode, batch: List[dict], precision: str):
    """The model (random weights, the same for every cell of a variant; frozen BN calibrated on ``batch``),
    its optimizer, the autocast dtype (None for fp32) and the grad scaler of a training measurement."""
    torch.manual_seed(0)  # the same random weights, hence the same proposals, in every cell of a variant
    model = build_model(cfg).train()
    calibrate_frozen_batchnorm(model, batch)
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(cfg.MODEL.DEVICE.split(":")[0], enabled=dtype == torch.float16)
    return model, build_optimizer(cfg, model), dtype, scaler


def measure_training(cfg: CfgNode, batch: List[dict], precision: str, warmup: int, iters: int,
                     profile_path: str = "", label: str = "") -> Cell:
    """Training images/s and peak memory for one batch size; losses that are not finite are counted. With
    ``profile_path``, :func:`write_profile` profiles a few more steps there; ``label`` names the progress logged
    (:func:`median_seconds`)."""
    device = cfg.MODEL.DEVICE
    model, optimizer, dtype, scaler = training_setup(cfg, batch, precision)
    cell = Cell("", precision, len(batch))

    def step():
        loss = training_step(model, optimizer, batch, dtype, scaler, device)
        cell.nonfinite_losses += int(not torch.isfinite(loss).item())

    with EventStorage():
        with PeakMemory(device) as peak:
            seconds = median_seconds(step, device, warmup, iters, label=label)
        cell.train_images_per_s = len(batch) / seconds
        cell.peak_memory_gb = peak.bytes / 1e9
        cell.peak_reserved_gb = None if peak.reserved_bytes is None else peak.reserved_bytes / 1e9
        if profile_path:  # after the peak is read: the profiler's own buffers would count on the CPU
            write_profile(profile_path, lambda: training_step(model, optimizer, batch, dtype, scaler, device), device)
    return cell


def count_host_work(cfg: CfgNode, batch: List[dict], precision: str) -> Dict[str, Dict[str, int]]:
    """The aten ops and the host-waiting ops of one training step (after one uncounted step, which sets
    things up lazily), by model part (see :mod:`gn_detection.host_work`): ``{"ops": {part: n}, "waits":
    {part: n}}`` with every part of :data:`~gn_detection.host_work.COUNTED_PARTS`."""
    device = cfg.MODEL.DEVICE
    model, optimizer, dtype, scaler = training_setup(cfg, batch, precision)
    with EventStorage():
        training_step(model, optimizer, batch, dtype, scaler, device)
        synchronize(device)
        with counting_host_work(model) as counter:
            training_step(model, optimizer, batch, dtype, scaler, device)
    return {"ops": {part: counter.ops[part] for part in COUNTED_PARTS},
            "waits": {part: counter.waits[part] for part in COUNTED_PARTS}}


def host_work_table(rows: List[dict]) -> str:
    """Markdown: one row per (variant, precision, images), "ops (waits)" per model part and in all."""
    lines = [f"| variant | precision | images | {' | '.join(COUNTED_PARTS)} | total |",
             "|---|---|---|" + "---|" * (len(COUNTED_PARTS) + 1)]
    for row in rows:
        if row.get("error"):
            cells = [brief(row["error"])] + ["–"] * len(COUNTED_PARTS)
        else:
            cells = [f"{row['ops'][p]} ({row['waits'][p]})" for p in COUNTED_PARTS]
            cells.append(f"{sum(row['ops'].values())} ({sum(row['waits'].values())})")
        lines.append(f"| {row['variant']} | {row['precision']} | {row['images_per_iter']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def measure_inference(cfg: CfgNode, image: dict, precision: str, warmup: int, iters: int,
                      profile_path: str = "", label: str = "") -> Tuple[float, int]:
    """Seconds per image, one image per call as Detectron2's evaluation runs it, and the number of
    detections the model returns for it (the mask head's RoIs); ``profile_path`` as in
    :func:`measure_training`."""
    device = cfg.MODEL.DEVICE
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    dtype = PRECISIONS[precision]
    inputs = [{k: image[k] for k in ("image", "height", "width")}]
    calibrate_frozen_batchnorm(model, inputs)
    detections = []  # of the last call (a shape: no synchronization)

    def step():
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            detections[:] = [len(model(inputs)[0]["instances"])]

    seconds = median_seconds(step, device, warmup, iters, label=label)
    if profile_path:
        write_profile(profile_path, step, device)
    return seconds, detections[0]


def _profiler_activities(device: str) -> List[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])


def profile_table(step: Callable[[], object], device: str, steps: int = 3, rows: int = 25) -> str:
    """``torch.profiler`` over ``steps`` more calls of a warmed-up ``step``: a first line with, per call, the
    wall time, the CPU time spent inside ops and the device time (where the device time is well below the
    wall time, launching work, not the GPU, bounds the step; the profiler itself slows the CPU side), then the
    ``rows`` ops that took the most device time (CPU time on the CPU)."""
    on_cuda = device.startswith("cuda")
    with torch.profiler.profile(activities=_profiler_activities(device)) as profiler:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = profiler.key_averages()
    cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    device_ms = sum(e.self_device_time_total for e in events
                    if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)) / 1e3 / steps
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=80)
    return (f"per step ({steps} steps, under the profiler): {wall_ms:.1f} ms wall, {cpu_ms:.1f} ms of CPU time in "
            f"ops, {device_ms:.1f} ms of device time\n{table}")


def trace_device(device: str) -> Tuple[int, int]:
    """How a profiler trace's memory events name ``device``: ("Device Type", "Device Id"), e.g. (0, -1) for
    the CPU and (1, 0) for cuda:0 (c10's device types)."""
    if not device.startswith("cuda"):
        return int(DeviceType.CPU), -1
    index = torch.device(device).index
    return int(DeviceType.CUDA), torch.cuda.current_device() if index is None else index


def allocations_alive_at_peak(trace_events: List[dict], device: Tuple[int, int]) -> Tuple[int, List[dict]]:
    """From a profiled run's Chrome-trace events (``profile_memory=True``): the peak of the memory allocated
    on ``device`` (see :func:`trace_device`) above what it was when profiling began, and the allocation
    events whose memory was alive at that peak (allocations and frees paired by address)."""
    memory = sorted((e for e in trace_events if e.get("name") == "[memory]"
                     and (e["args"].get("Device Type"), e["args"].get("Device Id")) == device),
                    key=lambda e: e["ts"])
    live, total, peak, alive = {}, 0, 0, []
    for event in memory:
        total += event["args"]["Bytes"]
        if event["args"]["Bytes"] > 0:
            live[event["args"]["Addr"]] = event
        else:
            live.pop(event["args"]["Addr"], None)
        if total > peak:
            peak, alive = total, list(live.values())
    return peak, alive


def allocation_sites(trace_events: List[dict], allocations: List[dict]) -> Counter:
    """Bytes of ``allocations`` by where each was made, in its thread: the outermost op around it (the
    backward's ops are autograd nodes), the innermost ``nn.Module`` and the innermost source line outside
    torch (the backward's have neither)."""
    spans = defaultdict(list)
    for e in trace_events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function"):
            spans[e["tid"]].append(e)
    by_thread = {}
    for tid, events in spans.items():
        starts = np.array([e["ts"] for e in events])
        by_thread[tid] = (events, starts, starts + np.array([e["dur"] for e in events]))
    sites = Counter()
    for allocation in allocations:
        events, starts, ends = by_thread.get(allocation["tid"], ([], np.zeros(0), np.zeros(0)))
        around = [events[i] for i in np.flatnonzero((starts <= allocation["ts"]) & (ends >= allocation["ts"]))]
        ops = [e for e in around if e["cat"] == "cpu_op"]
        modules = [e for e in around if e["name"].startswith("nn.Module: ")]
        lines = [e for e in around if ".py(" in e["name"] and not e["name"].startswith("torch/")]
        site = (max(ops, key=lambda e: e["dur"])["name"] if ops else "?",
                min(modules, key=lambda e: e["dur"])["name"][len("nn.Module: "):] if modules else "",
                min(lines, key=lambda e: e["dur"])["name"] if lines else "")
        sites[site] += allocation["args"]["Bytes"]
    return sites


def peak_memory_table(step: Callable[[], object], device: str, rows: int = 25) -> str:
    """``torch.profiler`` with ``profile_memory`` over one more call of a warmed-up ``step``: the peak memory
    allocated on ``device`` above the call's start, and the ``rows`` largest sites (op, module, source line)
    of the memory allocated in the call and alive at that peak: where the peak goes. Memory held from before
    (weights, optimizer state, a CUDA graph's pool, which its replays reuse) is in neither number; memory
    from before that the call frees (the last step's gradients) lowers the peak, not the rows."""
    with torch.profiler.profile(activities=_profiler_activities(device), profile_memory=True,
                                with_stack=True) as profiler:
        step()
        synchronize(device)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    peak, alive = allocations_alive_at_peak(events, trace_device(device))
    lines = [f"peak memory of one step: {peak / 1e9:.3f} GB above its start; alive then, allocated in the step "
             f"({sum(e['args']['Bytes'] for e in alive) / 1e9:.3f} GB in {len(alive)} allocations), by site:",
             "| GB | op | module | source |", "|---|---|---|---|"]
    for (op, module, source), size in allocation_sites(events, alive).most_common(rows):
        lines.append(f"| {size / 1e9:.3f} | {op} | {module} | {source} |")
    return "\n".join(lines)


def write_profile(path: str, step: Callable[[], object], device: str) -> None:
    """:func:`profile_table` to ``path``, then :func:`peak_memory_table` added to it; a failure is logged
    and loses only what is not written yet, never the measurement."""
    text = ""
    try:
        for table in (profile_table, peak_memory_table):
            text += table(step, device) + "\n\n"
            write_atomically(path, text)
    except Exception as e:  # noqa: BLE001 (the profiler or the disk; the timing is already taken)
        logger.warning("Could not write the profile %s: %s", path, error_text(e))


def machine_description(device: str) -> dict:
    """What the numbers were measured on."""
    import detectron2

    info = {"python": platform.python_version(), "torch": torch.__version__, "detectron2": detectron2.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        import triton

        info["gpu"], info["triton"] = torch.cuda.get_device_name(device), triton.__version__
    return info


def variant_workload(spec: str) -> Tuple[Tuple[str, str], ...]:
    """A variant spec's overrides as a workload: in any order, the last value of a key counting."""
    return tuple(sorted(dict(variant_overrides(spec)[1]).items()))


def reference_of(spec: str, specs: Sequence[str]) -> Optional[str]:
    """Which of ``specs`` the ratios of ``spec``'s rows are to: the detectron2_gn with the same overrides (so that
    ``ours:INPUT.MASK_FORMAT=bitmask`` is compared with ``detectron2_gn:INPUT.MASK_FORMAT=bitmask``, the same
    workload), else the plain detectron2_gn (for overrides of our levers, which Detectron2's GN lacks), else
    None."""
    references = {variant_workload(s): s for s in specs if variant_overrides(s)[0] == REFERENCE_VARIANT}
    return references.get(variant_workload(spec), references.get(()))


def with_ratios(cells: List[Cell]) -> List[dict]:
    """Rows for the table/JSON, with each speed as a ratio to its reference variant's (:func:`reference_of`,
    named in ``reference``) in the same cell of the same pass."""
    specs = list(dict.fromkeys(c.variant for c in cells))
    measured = {(c.variant, c.precision, c.images_per_iter, c.repeat): c for c in cells}
    rows = []
    for cell in cells:
        row = {**asdict(cell), "reference": reference_of(cell.variant, specs)}
        ref = measured.get((row["reference"], cell.precision, cell.images_per_iter, cell.repeat))
        if ref and cell.train_images_per_s and ref.train_images_per_s:
            row["train_speedup"] = cell.train_images_per_s / ref.train_images_per_s
        if ref and cell.inference_s_per_image and ref.inference_s_per_image:
            row["inference_speedup"] = ref.inference_s_per_image / cell.inference_s_per_image
        rows.append(row)
    return rows


def _or_dash(value, pattern: str) -> str:
    return pattern.format(value) if value is not None else "–"


def references_note(rows: List[dict]) -> str:
    """A line under a table saying which rows' ratios are to a detectron2_gn with overrides (see
    :func:`reference_of`); "" when every ratio is to the plain detectron2_gn."""
    by_reference = defaultdict(list)
    for row in rows:
        reference = row.get("reference")
        if reference not in (None, REFERENCE_VARIANT, row["variant"]) and row["variant"] not in by_reference[reference]:
            by_reference[reference].append(row["variant"])
    if not by_reference:
        return ""
    uses = "; ".join(f"{', '.join(variants)} to {reference}" for reference, variants in by_reference.items())
    return (f"\n\n× {REFERENCE_VARIANT}: to the {REFERENCE_VARIANT} with the row's overrides where the run has one, "
            f"else to the plain {REFERENCE_VARIANT}: {uses}")


def markdown_table(rows: List[dict]) -> str:
    """The measurements as a Markdown table, with a pass column when there are several passes; ratios are to
    ``detectron2_gn`` measured in the same pass, the one with the row's overrides where there is one
    (:func:`references_note`)."""
    passes = any(r.get("repeat") for r in rows)
    lines = [
        f"| {'pass | ' if passes else ''}model | precision | images/iter | train img/s | × {REFERENCE_VARIANT} | "
        f"peak memory GB | peak reserved GB | inference s/img | × {REFERENCE_VARIANT} | detections/img |",
        "|---" * (10 + passes) + "|",
    ]
    for r in rows:
        note = f" ({brief(r['error'])})" if r["error"] else (f" ({r['nonfinite_losses']} non-finite losses)"
                                                      if r["nonfinite_losses"] else "")
        which_pass = f"{r['repeat'] + 1} | " if passes else ""
        lines.append(
            f"| {which_pass}{r['variant']}{note} | {r['precision']} | {r['images_per_iter']} | "
            f"{_or_dash(r['train_images_per_s'], '{:.2f}')} | {_or_dash(r.get('train_speedup'), '{:.2f}')} | "
            f"{_or_dash(r['peak_memory_gb'], '{:.2f}')} | {_or_dash(r.get('peak_reserved_gb'), '{:.2f}')} | "
            f"{_or_dash(r['inference_s_per_image'], '{:.3f}')} | "
            f"{_or_dash(r.get('inference_speedup'), '{:.2f}')} | {_or_dash(r['inference_detections'], '{:d}')} |"
        )
    return "\n".join(lines) + references_note(rows)


def summarize_repeats(rows: List[dict]) -> List[dict]:
    """One row per (variant, precision, images per iteration) over the passes of ``rows`` (:func:`with_ratios`
    rows): medians of the speeds, of the ratios (each taken within its pass) and their ranges, the largest peak
    memory. Passes whose cell failed count in ``failed_passes``; what such a cell did measure (training, when only
    its inference failed) still counts."""
    groups: Dict[Tuple[str, str, int], List[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["variant"], row["precision"], row["images_per_iter"])].append(row)

    def spread(measured, key):
        values = [r[key] for r in measured if r.get(key) is not None]
        return (statistics.median(values), min(values), max(values)) if values else (None, None, None)

    summary = []
    for (variant, precision, images), group in groups.items():
        failed = sum(1 for r in group if r["error"])
        memory = [r["peak_memory_gb"] for r in group if r["peak_memory_gb"] is not None]
        summary.append({  # a failed measurement left its values None, which spread() leaves out
            "variant": variant, "precision": precision, "images_per_iter": images, "passes": len(group) - failed,
            "failed_passes": failed, "reference": group[0].get("reference"),
            "train_images_per_s": spread(group, "train_images_per_s")[0],
            "train_speedup": spread(group, "train_speedup"),
            "peak_memory_gb": max(memory) if memory else None,
            "inference_s_per_image": spread(group, "inference_s_per_image")[0],
            "inference_speedup": spread(group, "inference_speedup"),
        })
    return summary


def markdown_summary(summary: List[dict]) -> str:
    """:func:`summarize_repeats` as a Markdown table: each ratio's median over the passes and its range, the
    largest peak memory of any pass."""

    def ratio(median_low_high):
        median, low, high = median_low_high
        return "–" if median is None else f"{median:.2f} ({low:.2f}–{high:.2f})"

    lines = [
        f"| model | precision | images/iter | passes | train img/s (median) | × {REFERENCE_VARIANT} (range) | "
        f"peak memory GB (max) | inference s/img (median) | × {REFERENCE_VARIANT} (range) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        failed = f" ({r['failed_passes']} failed)" if r["failed_passes"] else ""
        lines.append(
            f"| {r['variant']} | {r['precision']} | {r['images_per_iter']} | {r['passes']}{failed} | "
            f"{_or_dash(r['train_images_per_s'], '{:.2f}')} | {ratio(r['train_speedup'])} | "
            f"{_or_dash(r['peak_memory_gb'], '{:.2f}')} | {_or_dash(r['inference_s_per_image'], '{:.3f}')} | "
            f"{ratio(r['inference_speedup'])} |"
        )
    return "\n".join(lines) + references_note(summary)


def measure_group_norm_op(
    shape: Sequence[int], groups: int, dtype: torch.dtype, device: str, warmup: int, iters: int,
    compile_torch: bool = False,
) -> Dict[str, dict]:
    """GroupNorm+ReLU forward and backward on one activation: torch eager, optionally ``torch.compile``, and
    our layer (Triton kernels on CUDA, torch's group_norm elsewhere). Milliseconds per forward+backward and
    the bandwidth that implies for 8 passes over the activation (the fused kernels' floor)."""
    from .group_norm import FusedGroupNorm

    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn_like(x)
    layer = FusedGroupNorm(groups, shape[1], relu=True).to(device)

    def eager(inp):
        weight, bias = layer.weight.to(inp.dtype), layer.bias.to(inp.dtype)
        return torch.relu(torch.nn.functional.group_norm(inp, groups, weight, bias, layer.eps))

    impls = {"torch_eager": eager, "ours": layer}
    if compile_torch:
        impls["torch_compile"] = torch.compile(eager)
    results = {}
    for name, fn in impls.items():
        def step():
            x.grad = layer.weight.grad = layer.bias.grad = None
            fn(x).backward(upstream)

        try:
            seconds = median_seconds(step, device, warmup, iters, calls=10)
        except Exception as e:  # noqa: BLE001  e.g. torch.compile without a working C++ compiler
            results[name] = {"error": error_text(e)}
            continue
        traffic = 8 * x.numel() * x.element_size()
        results[name] = {"ms": seconds * 1e3, "gb_per_s_at_8_passes": traffic / seconds / 1e9}
    return results
