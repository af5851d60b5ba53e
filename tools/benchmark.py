#!/usr/bin/env python
"""Benchmark GN Mask R-CNN against Detectron2's GN and frozen-BN models, side by side in one run.

    python tools/benchmark.py                                    # all variants, 1/2/4/8 images, fp32 + AMP fp16
    python tools/benchmark.py --images-per-gpu 2 8 --precision fp32 amp_fp16 amp_bf16 --output bench.json
    python tools/benchmark.py --variants ours "ours:MODEL.GN.FUSE_RELU=False" detectron2_gn   # one lever
    python tools/benchmark.py --dataset shapes_train --config-file configs/shapes/mask_rcnn_R18_FPN_gn_scratch.yaml \
        --variants ours ours_stock_gn                            # like for like: both on the shapes config
    python tools/benchmark.py --task op --op-shape 8 256 200 304 --op-dtype fp16 --compile
    python tools/benchmark.py --images-per-gpu 2 --precision fp32 --profile output/profiles    # where the time goes
    python tools/benchmark.py --images-per-gpu 8 --precision amp_fp16 --repeats 3    # median and range of 3 passes
    python tools/benchmark.py --task host --images-per-gpu 2 8 --precision fp32    # ops and waits per step
    python tools/benchmark.py --replot results/benchmark/h100_r50_800x1216.json    # redraw a run's picture

Model task: training images/s (full step with the optimizer), inference s/image (one image per call, with the
detections it returned: the config's SCORE_THRESH_TEST holds; MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0 returns
TEST.DETECTIONS_PER_IMAGE) and peak memory, random weights, on synthetic COCO-sized inputs (--input-size,
--boxes) or the first images of a registered dataset. Writes JSON (--output) with a picture of it beside it
(.png) and prints a Markdown table whose ratios are to detectron2_gn (the one with the row's overrides where the run
has it, else the plain one). --config-file replaces the config of `ours` (and `ours_stock_gn`); trailing KEY VALUE
pairs apply to every variant. Each variant reads a dataset with its own config's input sizes and INPUT.MASK_FORMAT
(Detectron2's configs: polygons; RLE masks need INPUT.MASK_FORMAT bitmask).

Host task: for the same grid, the aten ops one training step dispatches and how many of them make the host
wait for a CUDA device, by model part (backbone, proposal generator, ROI heads, the rest): the host's work in
a step bound by the CPU, countable on any device (see gn_detection/host_work.py).
"""
import argparse
import gc
import json
import logging
import os
import re
import shlex
import sys
import time
from typing import Optional

import torch
from detectron2.engine import default_argument_parser
from detectron2.utils.logger import setup_logger

import gn_detection  # noqa: F401  (registers our components)
from gn_detection import benchmark as bench
from gn_detection.atomic_write import not_writable, write_atomically
from gn_detection.config import check_model_builds
from gn_detection.model_zoo import CONFIG_DIR
from gn_detection.run_checks import device_problem
from gn_detection.visualize import plot_benchmark

DEFAULT_OURS = os.path.join(CONFIG_DIR, "mask_rcnn_R50_FPN_gn.yaml")
OP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_S_PER_TRAINING_IMAGE = 5.5  # R50-FPN GN, 800x1216, fp32, 2-core EPYC VM (2026-12-01, with model building)


def parse_args(argv=None) -> argparse.Namespace:
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--task", choices=("model", "op", "host"), default="model",
                        help="model: speed and memory; op: the GN+ReLU op alone; host: ops and host waits per step")
    parser.add_argument("--variants", nargs="+", default=["ours", "detectron2_gn", "frozen_bn"],
                        help="built-in variants (ours, ours_stock_gn, detectron2_gn, frozen_bn), each optionally "
                             "NAME:KEY=VALUE,... with overrides (a list value keeps its commas: "
                             "ours:MODEL.PIXEL_MEAN=[100.0,100.0,100.0])")
    parser.add_argument("--images-per-gpu", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--precision", nargs="+", choices=list(bench.PRECISIONS),
                        help="default fp32 amp_fp16 on CUDA, fp32 on the CPU (CPU autocast is far slower)")
    parser.add_argument("--skip", nargs="*", choices=("train", "inference"), default=[],
                        help="leave out training or inference measurements")
    parser.add_argument("--input-size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--boxes", type=int, default=7, help="boxes and masks per synthetic image")
    parser.add_argument("--dataset", default="", help="use this registered dataset's first images instead")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per cell (median reported)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes over the whole grid, the variants in a rotated order each pass; a second "
                             "table gives each ratio's median and range over the passes (the host's speed drifts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="output/benchmark/benchmark.json",
                        help="JSON results file; the model task also draws them beside it, as .png")
    parser.add_argument("--replot", default="", metavar="JSON",
                        help="only redraw the picture of an earlier model-task JSON (beside it, as .png)")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="also profile 3 more steps of every measurement (CPU vs device time per step and "
                             "the top ops) and one more for memory (the peak and what is alive at it, by op, "
                             "module and source line), one text file each in DIR")
    parser.add_argument("--op-shape", type=int, nargs="+", default=[8, 256, 200, 304], metavar="DIM")
    parser.add_argument("--op-groups", type=int, default=32)
    parser.add_argument("--op-dtype", choices=list(OP_DTYPES), default="fp16")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of GN+ReLU (op task)")
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = ["fp32", "amp_fp16"] if args.device.startswith("cuda") else ["fp32"]
    problem = request_problem(args)
    if problem:
        parser.error(problem)
    return args


def request_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the command line's request, naming the flag, or None: checked before any model is built,
    so a mistake never costs a measurement."""
    if args.num_gpus != 1 or args.num_machines != 1:
        return "the benchmark measures one device per process: use --num-gpus 1 (images per GPU is --images-per-gpu)"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return f"--device {args.device!r} is not a device; give cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"--device {args.device}: the benchmark runs on cpu or cuda[:N]"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device} but no CUDA GPU is visible; use --device cpu"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if min(args.images_per_gpu) < 1 or args.iters < 1 or args.repeats < 1 or args.warmup < 0:
        return "--images-per-gpu, --iters and --repeats must be >= 1 and --warmup >= 0"
    if min(args.input_size) < 1 or args.boxes < 1:
        return f"--input-size H W and --boxes must be >= 1, got {args.input_size} and {args.boxes}"
    if args.op_groups < 1 or len(args.op_shape) < 2 or min(args.op_shape) < 1 or args.op_shape[1] % args.op_groups:
        return (f"--op-shape needs positive N C [spatial...] with C divisible by --op-groups {args.op_groups} (>= 1), "
                f"got {args.op_shape}")
    if args.task != "model" and args.repeats > 1:
        return f"--repeats {args.repeats}: only the model task repeats its grid (op and host counts are one pass)"
    if args.task == "model" and set(args.skip) == {"train", "inference"}:
        return "--skip train inference leaves nothing to measure; skip one of them"
    for flag, values in (("--variants", args.variants), ("--images-per-gpu", args.images_per_gpu),
                         ("--precision", args.precision)):
        if repeated := sorted({str(v) for v in values if values.count(v) > 1}):
            return f"{flag} names {', '.join(repeated)} more than once; each is measured once per pass"
    if len(args.opts) % 2:
        return f"the trailing overrides {args.opts} are not KEY VALUE pairs (odd length)"
    if "MODEL.DEVICE" in args.opts[::2]:
        return "every variant runs on --device; give that instead of MODEL.DEVICE"
    if problem := variants_problem(args.variants):
        return problem
    same = {}
    for spec in args.variants:
        twin = same.setdefault((bench.variant_overrides(spec)[0], bench.variant_workload(spec)), spec)
        if twin != spec:
            return f"--variants {twin} and {spec} are one variant (the same overrides in another order); give one"
    names = {bench.variant_overrides(spec)[0] for spec in args.variants}
    if args.config_file and args.task != "op" and not names & {"ours", "ours_stock_gn"}:
        return (f"--config-file {args.config_file} is the config of ours and ours_stock_gn, and --variants has "
                "neither; add one, or leave --config-file out")
    if args.profile and (why := not_writable(args.profile)):
        return f"--profile {args.profile}: cannot write there ({why}); give a writable folder"
    if not args.replot:
        return output_problem(args.output, draws_picture=args.task == "model")
    return None


def variants_problem(specs) -> Optional[str]:
    """What is wrong with the first ill-formed ``--variants`` spec (an unknown name, an override that is not
    KEY=VALUE), or None; the keys and values themselves are checked when the configs are built."""
    for spec in specs:
        try:
            bench.variant_overrides(spec)
        except ValueError as e:
            return f"--variants: {e}"
    return None


def output_problem(path: str, draws_picture: bool) -> Optional[str]:
    """Why ``--output`` cannot take the results (a folder, the picture's own name, an unwritable place), or None."""
    if not os.path.basename(path) or os.path.isdir(path):  # "" or a trailing "/" names a folder too
        return f"--output {path!r}: give a file name for the JSON results, e.g. output/benchmark/benchmark.json"
    if draws_picture and picture_path(path) == path:
        return (f"--output {path}: the picture is written beside the JSON as .png, so the JSON cannot be a .png; "
                f"give e.g. {os.path.splitext(path)[0]}.json")
    folder = os.path.dirname(os.path.abspath(path))
    if why := not_writable(folder):
        return f"--output {path}: cannot write in {folder} ({why}); give a writable place"
    return None


def inputs_for(cfg, args, count, records=None):
    """``count`` inputs for ``cfg``: ``records`` of ``--dataset`` mapped, or synthetic ones."""
    if args.dataset:
        return bench.dataset_batch(cfg, records, args.dataset)
    height, width = args.input_size
    return bench.synthetic_batch(count, height, width, args.boxes, cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                                 cfg.INPUT.MASK_FORMAT)


def prepare_variants(args) -> dict:
    """Each variant's config and inputs, built before any measurement (and its model on the meta device, in a
    fraction of a second) so that a bad name, file, key, model setting or dataset fails at once, naming the
    variant."""
    builtins = bench.builtin_variants(args.config_file or DEFAULT_OURS)
    variants = [bench.parse_variant(spec, builtins) for spec in args.variants]
    configs = {variant: _checked(variant, lambda v=variant: _buildable_config(v, args)) for variant in variants}
    count = max(args.images_per_gpu)
    records = bench.dataset_records(args.dataset, count) if args.dataset else None
    return {variant: (cfg, _checked(variant, lambda c=cfg: inputs_for(c, args, count, records)))
            for variant, cfg in configs.items()}


def _buildable_config(variant, args):
    cfg = bench.variant_config(variant, args.device, args.opts)
    if problem := device_problem(cfg, 1, "--num-gpus 1"):  # as train_net refuses it (one process here)
        raise ValueError(problem)
    check_model_builds(cfg, "its config")  # the error names the variant and its file
    return cfg


def _checked(variant, make):
    try:
        return make()
    except (FileNotFoundError, ValueError) as e:  # a missing file, an unknown key, a bad value, an unbuildable model
        raise ValueError(f"variant {variant.name} ({variant.config_file}): {e}") from None


def variants_record(variants) -> list:
    return [{"name": v.name, "config_file": v.config_file, "opts": list(v.opts)} for v in variants]


def models_report(variants, cells) -> dict:
    rows = bench.with_ratios(cells)
    report = {"variants": variants_record(variants), "rows": rows, "table": bench.markdown_table(rows)}
    if any(cell.repeat for cell in cells):
        report["summary"] = bench.summarize_repeats(rows)
        report["summary_table"] = bench.markdown_summary(report["summary"])
    return report


def passes(variants: dict, repeats: int):
    """(pass, variant, (cfg, batch)) in measuring order: each pass starts one variant later than the one
    before, so that no variant always runs first (or last) while the host's speed drifts."""
    order = list(variants.items())
    for repeat in range(repeats):
        shift = repeat % len(order)
        for variant, prepared in order[shift:] + order[:shift]:
            yield repeat, variant, prepared


def calls_per_batch_size(args, variant_count: int) -> int:
    """Training steps (or inference calls) per batch size over all variants, precisions and passes, warm-up
    included."""
    return args.repeats * variant_count * len(args.precision) * (args.warmup + args.iters)


def workload(args, variant_count: int) -> str:
    """What the model task is about to run: training steps and images, inference calls."""
    calls = calls_per_batch_size(args, variant_count)
    steps, images = (0, 0) if "train" in args.skip else (calls * len(args.images_per_gpu),
                                                          calls * sum(args.images_per_gpu))
    return (f"{variant_count} variant(s) x {len(args.precision)} precision(s) x {len(args.images_per_gpu)} batch "
            f"size(s) x {args.repeats} pass(es): {steps} training steps of {images} images and "
            f"{0 if 'inference' in args.skip else calls} inference calls, warm-up included")


def cpu_time_warning(args, variant_count: int) -> Optional[str]:
    """A warning when a CPU run would train for over half an hour at the rate measured on the project's VM
    (:data:`CPU_S_PER_TRAINING_IMAGE`), with a CPU-sized command instead; else None."""
    if torch.device(args.device).type != "cpu" or "train" in args.skip:
        return None
    images = calls_per_batch_size(args, variant_count) * sum(args.images_per_gpu)
    minutes = images * args.input_size[0] * args.input_size[1] / (800 * 1216) * CPU_S_PER_TRAINING_IMAGE / 60
    if minutes < 30:
        return None
    return (f"on a CPU this is about {minutes / 60:.1f} h of training steps alone (R50-FPN at 800x1216 trains about "
            f"{CPU_S_PER_TRAINING_IMAGE:g} s per image on a 2-core VM); for a CPU-sized run try --images-per-gpu 2 "
            "--input-size 320 480 --warmup 1 --iters 3")


def unreferenced_warning(variants) -> Optional[str]:
    """A warning naming the variants whose ratios will stay empty although the run has a detectron2_gn: one with
    other overrides than theirs, and no plain one (see :func:`gn_detection.benchmark.reference_of`); else None."""
    specs = [variant.name for variant in variants]
    if not any(bench.variant_overrides(spec)[0] == bench.REFERENCE_VARIANT for spec in specs):
        return None
    alone = [spec for spec in specs if bench.reference_of(spec, specs) is None]
    if not alone:
        return None
    return (f"no ratio for {', '.join(alone)}: the run has no {bench.REFERENCE_VARIANT} with the same overrides and "
            f"no plain {bench.REFERENCE_VARIANT}; add one to --variants for their ratios")


def run_models(args, variants, logger, save) -> dict:
    """Measure every (variant, precision, images) cell, ``--repeats`` times; ``save(report)`` after each, so
    an interrupted run keeps what it measured. A cell that fails (out of memory, a dtype the device lacks, a
    kernel that does not compile, divergence) is recorded with its error and the run goes on."""
    logger.info("Measuring %s", workload(args, len(variants)))
    for warning in (cpu_time_warning(args, len(variants)), unreferenced_warning(variants)):
        if warning:
            logger.warning(warning)
    cells, start = [], time.time()
    total = args.repeats * len(variants) * len(args.precision) * len(args.images_per_gpu)
    for repeat, variant, (cfg, batch) in passes(variants, args.repeats):
        profile_folder = args.profile if repeat == 0 else ""  # --profile profiles the first pass
        in_pass = f" (pass {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
        for precision in args.precision:
            inference, detections, inference_error = None, None, None
            if "inference" not in args.skip:
                try:
                    inference, detections = bench.measure_inference(
                        cfg, batch[0], precision, args.warmup, args.iters,
                        profile_path(profile_folder, variant.name, precision, "inference"),
                        label=f"{variant.name} {precision} inference{in_pass}")
                except Exception as e:  # noqa: BLE001 (recorded, the other cells still run)
                    inference_error = f"inference: {bench.error_text(e)}"
            for count in args.images_per_gpu:
                cell = bench.Cell(variant.name, precision, count)
                if "train" not in args.skip:
                    try:
                        cell = bench.measure_training(
                            cfg, batch[:count], precision, args.warmup, args.iters,
                            profile_path(profile_folder, variant.name, precision, f"{count}img", "train"),
                            label=f"{variant.name} {precision} {count} img training{in_pass}")
                    except Exception as e:  # noqa: BLE001
                        cell.error = bench.error_text(e)
                cell.variant, cell.inference_s_per_image, cell.repeat = variant.name, inference, repeat
                cell.inference_detections = detections
                cell.error = "; ".join(filter(None, (cell.error, inference_error))) or None
                cells.append(cell)
                elapsed = time.time() - start
                logger.info("[%d/%d]%s %s %s %d img: %s img/s, peak %s GB (%s reserved), %s s/img inference "
                            "(%s detections)%s; ETA %.0f s", len(cells), total, in_pass, variant.name, precision,
                            count, _short(cell.train_images_per_s), _short(cell.peak_memory_gb),
                            _short(cell.peak_reserved_gb), _short(inference),
                            "–" if detections is None else detections,
                            f" ({cell.error})" if cell.error else "", elapsed / len(cells) * (total - len(cells)))
                save(models_report(variants, cells))
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return models_report(variants, cells)


def host_report(variants, rows) -> dict:
    return {"variants": variants_record(variants), "rows": rows, "table": bench.host_work_table(rows)}


def run_host(args, variants, logger, save) -> dict:
    """Count one training step's ops and host waits for every (variant, precision, images) cell; a cell that
    fails is recorded with its error; ``save(report)`` after each, as in :func:`run_models`."""
    rows = []
    for variant, (cfg, batch) in variants.items():
        for precision in args.precision:
            for count in args.images_per_gpu:
                row = {"variant": variant.name, "precision": precision, "images_per_iter": count, "error": None}
                try:
                    row.update(bench.count_host_work(cfg, batch[:count], precision))
                except Exception as e:  # noqa: BLE001 (recorded, the other cells still run)
                    row["error"] = bench.error_text(e)
                rows.append(row)
                logger.info("%s %s %d img: %s", variant.name, precision, count, row["error"] or (
                    f"{sum(row['ops'].values())} ops, {sum(row['waits'].values())} of them waiting"))
                save(host_report(variants, rows))
    return host_report(variants, rows)


def _short(value):
    return "–" if value is None else f"{value:.3g}"


def run_op(args, logger) -> dict:
    dtype = OP_DTYPES[args.op_dtype]
    logger.info("GroupNorm+ReLU forward+backward on %s %s, G=%d", args.op_shape, args.op_dtype, args.op_groups)
    results = bench.measure_group_norm_op(args.op_shape, args.op_groups, dtype, args.device, args.warmup,
                                          args.iters, compile_torch=args.compile)
    lines = ["| implementation | ms (fwd+bwd) | GB/s at 8 passes |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['ms']:.3f} | {r['gb_per_s_at_8_passes']:.0f} |" if "ms" in r
                     else f"| {name} | {bench.brief(r['error'])} | – |")
    return {"shape": args.op_shape, "groups": args.op_groups, "dtype": args.op_dtype, "results": results,
            "table": "\n".join(lines)}


def write_json(path: str, report: dict) -> None:
    write_atomically(path, json.dumps(report, indent=2))


def incomplete_path(json_path: str) -> str:
    """Where a run in progress keeps what it has measured, so that ``--output`` keeps an earlier run's results
    until this one ends: beside it, as .incomplete.json."""
    return os.path.splitext(json_path)[0] + ".incomplete.json"


class ResultsSoFar:
    """What a model or host run in progress has measured, saved after every cell to :func:`incomplete_path`. A
    file there from an earlier interrupted run is replaced by this run's first save; until then it is left as it
    was and never passed off as this run's."""

    def __init__(self, output: str, header: dict):
        self.path, self.header, self.written = incomplete_path(output), header, False

    def save(self, report: dict) -> None:
        write_json(self.path, {**self.header, **report})
        self.written = True

    def interrupted_note(self) -> str:
        """Where what this run measured is, after Ctrl-C."""
        if self.written:
            return f"what it measured is in {self.path}"
        earlier = f" ({self.path} is an earlier run's, left as it was)" if os.path.isfile(self.path) else ""
        return f"nothing was measured{earlier}"

    def remove(self) -> None:
        """Remove this run's file once its results are in ``--output`` (an earlier run's stays)."""
        if self.written and os.path.isfile(self.path):
            os.remove(self.path)


def picture_path(json_path: str) -> str:
    """Where a results file's picture goes: beside it, as .png."""
    return os.path.splitext(json_path)[0] + ".png"


def replot(json_path: str) -> int:
    """Redraw an earlier model run's picture from its JSON; 2 with a message naming the file if it cannot."""
    try:
        with open(json_path) as f:
            report = json.load(f)
        print(f"Wrote {plot_benchmark(report, picture_path(json_path))}")
    except (OSError, ValueError, TypeError) as e:  # missing, not JSON, not a model run's, nothing measured
        print(f"benchmark: error: --replot {json_path}: {e}", file=sys.stderr)
        return 2
    return 0


def profile_path(folder: str, *parts) -> str:
    """Where ``--profile`` puts one measurement's table in ``folder`` ("" when the folder is); variant specs
    become file names by replacing what is not a letter, digit, '.' or '-'."""
    if not folder:
        return ""
    return os.path.join(folder, re.sub(r"[^\w.-]+", "_", "_".join(map(str, parts))) + ".txt")


def use_device(name: str) -> None:
    """Make ``--device cuda:N`` the current CUDA device (Triton launches there); plain ``cuda`` keeps the
    current one."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot)
    logger = setup_logger(name="gn_detection.benchmark", abbrev_name="bench")
    logger.setLevel(logging.INFO)
    use_device(args.device)
    header = {"task": args.task, "machine": bench.machine_description(args.device), "command": shlex.join(sys.argv),
              "settings": vars(args)}
    so_far = ResultsSoFar(args.output, header)  # where the model and host tasks save as they measure
    if args.task == "op":
        result = run_op(args, logger)
    else:
        warning = bench.slow_precision_warning(args.device, args.precision)
        if warning:
            logger.warning(warning)
        try:
            variants = prepare_variants(args)
        except (ValueError, FileNotFoundError) as e:  # unknown variant, key or dataset, missing file
            print(f"benchmark: error: {e}", file=sys.stderr)
            return 2
        run = run_host if args.task == "host" else run_models
        try:
            result = run(args, variants, logger, so_far.save)
        except KeyboardInterrupt:
            print(f"benchmark: interrupted; {so_far.interrupted_note()}, and {args.output} is as it was",
                  file=sys.stderr)
            return 130  # the shells' status for a command stopped by Ctrl-C
    write_json(args.output, {**header, **result})
    so_far.remove()  # the results are in --output now
    print(result["table"])
    if "summary_table" in result:
        print(f"\nOver {args.repeats} passes:\n{result['summary_table']}")
    logger.info("Wrote %s", args.output)
    if args.task == "model":
        try:
            logger.info("Picture: %s", plot_benchmark({**header, **result}, picture_path(args.output)))
        except Exception as e:  # noqa: BLE001 (the picture is extra: the JSON and the table have the results)
            stale = os.path.isfile(picture_path(args.output))
            if stale:  # an earlier run's, beside results it no longer shows
                os.remove(picture_path(args.output))
            logger.warning("No picture: %s%s", e, f" (removed the earlier run's {picture_path(args.output)})"
                           if stale else "")
    failed = [r for r in result.get("rows", []) if r["error"]] + [
        name for name, r in result.get("results", {}).items() if "error" in r]
    if failed:
        logger.warning("%d measurement(s) failed; their errors are in the table and the JSON", len(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
