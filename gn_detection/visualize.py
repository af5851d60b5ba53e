"""Pictures: predictions beside ground truth on dataset images, the training loss curve, and the benchmark's
speed and memory."""
import numbers
import os
from collections import defaultdict
from typing import Dict, List, Tuple

import matplotlib.image
import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils
from detectron2.utils.visualizer import Visualizer
from matplotlib.figure import Figure  # drawn to files without pyplot: a user's backend stays as it was

from .atomic_write import replaced_atomically
from .group_norm import is_integer
from .metrics_log import read_metrics

MIN_PICTURE_SIDE = 480  # pixels; smaller images are drawn enlarged


def draw_predictions(
    model: torch.nn.Module, cfg, dataset_name: str, out_dir: str, num_images: int, score_thresh: float
) -> List[str]:
    """Run ``model`` on the first ``num_images`` images of ``dataset_name`` and save, for each, a PNG
    with the ground truth (left) beside the predictions scoring at least ``score_thresh`` (right), named for the
    image's file (and its image_id where two images' files share a name). Returns the written paths.

    Raises:
        ValueError: for a ``num_images`` that is not an integer >= 0 (TEST.VIS_NUM_IMAGES), a ``score_thresh``
            that is not from 0 to 1 (TEST.VIS_SCORE_THRESH).
    """
    if not is_integer(num_images) or num_images < 0:
        raise ValueError(f"num_images (TEST.VIS_NUM_IMAGES) must be an integer >= 0, got {num_images!r}")
    if isinstance(score_thresh, bool) or not isinstance(score_thresh, numbers.Real) or not 0 <= score_thresh <= 1:
        raise ValueError(f"score_thresh (TEST.VIS_SCORE_THRESH) must be a score from 0 to 1, got {score_thresh!r}")
    metadata = MetadataCatalog.get(dataset_name)
    mapper = DatasetMapper(cfg, is_train=False)  # the test-time resize and format that evaluation uses
    os.makedirs(out_dir, exist_ok=True)
    paths, was_training = [], model.training
    model.eval()
    try:
        for record in DatasetCatalog.get(dataset_name)[:num_images]:
            with torch.no_grad():
                output = model([mapper(record)])[0]
            rgb = detection_utils.read_image(record["file_name"], format="RGB")
            instances = output["instances"].to("cpu")
            instances = instances[instances.scores >= score_thresh]
            scale = max(1.0, MIN_PICTURE_SIDE / max(rgb.shape[:2]))  # small images: labels stay legible
            truth = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(record).get_image()
            predicted = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances).get_image()
            stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
            path = os.path.join(out_dir, f"{stem}.png")
            if path in paths:  # a.png of another folder
                path = os.path.join(out_dir, f"{stem}_{record.get('image_id', len(paths))}.png")
            with replaced_atomically(path) as partial:
                matplotlib.image.imsave(partial, np.concatenate([truth, predicted], axis=1), format="png")
            paths.append(path)
    finally:
        model.train(was_training)
    return paths


def plot_loss_curve(metrics_file: str, out_png: str, start: int = 0) -> str:
    """Plot every ``*loss*`` series in Detectron2's ``metrics.json`` (its latest run, read from byte ``start``, see
    :func:`~gn_detection.metrics_log.read_metrics`) against the iteration."""
    rows = [r for r in read_metrics(metrics_file, start) if "total_loss" in r]
    if not rows:
        raise ValueError(f"{metrics_file} holds no training losses to plot")
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for key in sorted({k for r in rows for k in r if "loss" in k}):
        points = [(r["iteration"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), label=key, linewidth=2.5 if key == "total_loss" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the logging window)")
    ax.set_yscale("log")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_file))))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str) -> str:
    """Save ``fig`` as a PNG whole or not at all (an older picture stays if saving fails)."""
    with replaced_atomically(out_png) as partial:
        fig.savefig(partial, dpi=100, format="png")
    return out_png


PRECISION_LINES = {"fp32": "-", "amp_fp16": "--", "amp_bf16": ":"}  # line style of each benchmark precision
BENCHMARK_MEASUREMENTS = ("train_images_per_s", "train_speedup", "peak_memory_gb", "inference_s_per_image")
BENCHMARK_CELL = ("variant", "precision", "images_per_iter")  # what names a benchmark cell


def benchmark_series(report: Dict) -> Dict[Tuple[str, str], List[Dict]]:
    """A model-task report of ``tools/benchmark.py`` as one series per (variant, precision): its cells in order
    of images per iteration, each with the :data:`BENCHMARK_MEASUREMENTS`, None where that measurement failed
    (or an older report lacks it); ``train_speedup`` is (median, low, high): the range over passes, or the
    single value three times. The summary over passes is used when the report has one. Raises ValueError
    for anything else."""
    if not isinstance(report, dict):
        raise ValueError(f"not a tools/benchmark.py results file (its JSON is a {type(report).__name__})")
    if report.get("task", "model") != "model":
        raise ValueError(f"only the model task's results can be plotted, not the {report['task']!r} task's")
    cells = []
    for row in report["summary"] if "summary" in report else report.get("rows", []):
        missing = [key for key in BENCHMARK_CELL if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"a cell lacks {', '.join(missing)}: not a tools/benchmark.py results file")
        speedup = row.get("train_speedup")
        cells.append({**{key: row.get(key) for key in (*BENCHMARK_MEASUREMENTS, *BENCHMARK_CELL)},
                      "train_speedup": tuple(speedup) if isinstance(speedup, (list, tuple)) else (speedup,) * 3})
    if all(_value(cell[key]) is None for cell in cells for key in BENCHMARK_MEASUREMENTS):
        raise ValueError("the report holds no measurement to plot")
    series = defaultdict(list)
    for cell in sorted(cells, key=lambda c: c["images_per_iter"]):
        series[(cell["variant"], cell["precision"])].append(cell)
    return dict(series)


def plot_benchmark(report: Dict, out_png: str) -> str:
    """Save :func:`benchmark_figure` of ``report`` as ``out_png``; returns ``out_png``."""
    return save_figure(benchmark_figure(report), out_png)


def benchmark_figure(report: Dict):
    """A ``tools/benchmark.py`` model-task report drawn: training images/s, its ratio to Detectron2's GN (with
    the same overrides where the run has it, else plain; with the range over passes), and peak memory (what it
    is depends on the device: :func:`memory_label`) against images per iteration, a line per variant and
    precision (the style says the precision), and inference seconds per image."""
    series = benchmark_series(report)
    fig = Figure(figsize=(12, 8.5))
    axes = fig.subplots(2, 2)
    colors = {variant: f"C{i}" for i, variant in enumerate(dict.fromkeys(v for v, _ in series))}
    images = sorted({c["images_per_iter"] for cells in series.values() for c in cells})
    panels = ((axes[0, 0], "train_images_per_s", "training images/s", "training not measured"),
              (axes[0, 1], "train_speedup", "training speed × detectron2_gn\n(same overrides, else plain; same pass)",
               "no detectron2_gn to compare with in this run"),
              (axes[1, 0], "peak_memory_gb", memory_label(report), "training not measured"))
    for ax, key, label, missing in panels:
        drawn = [_draw_series(ax, key, cells, colors[variant], precision, f"{variant}, {precision}")
                 for (variant, precision), cells in series.items()]
        ax.set_xscale("log", base=2)
        ax.set_xticks(images, [str(n) for n in images])
        ax.minorticks_off()
        ax.set_xlabel("images per iteration")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if not any(drawn):
            _note(ax, missing)
    _inference_bars(axes[1, 1], series, colors)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    machine, settings = report.get("machine", {}), report.get("settings", {})
    passes = f" · medians of {settings.get('repeats', '?')} passes (memory: max)" if "summary" in report else ""
    fig.suptitle(f"{machine.get('gpu') or machine.get('cpu', '?')} · torch {machine.get('torch', '?')} · "
                 f"{_inputs(settings)}{passes}")
    fig.tight_layout(rect=(0, 0.015 + 0.022 * ((len(series) + 1) // 2), 1, 1))  # room for the legend
    return fig


def memory_label(report: Dict) -> str:
    """The memory axis's label: the CUDA allocator's peak on a GPU, the process's peak resident set on the CPU
    (weights, framework and allocator caches included), the largest of any pass with a summary."""
    device = str(report.get("machine", {}).get("device") or report.get("settings", {}).get("device") or "")
    what = {"cuda": "GB allocated", "cpu": "GB, process peak RSS"}.get(device.split(":")[0], "GB")
    return f"peak memory ({what}{', max over passes' if 'summary' in report else ''})"


def _draw_series(ax, key: str, cells: List[Dict], color: str, precision: str, label: str) -> bool:
    """One variant and precision's line of ``key`` against images per iteration (a ratio with its range as
    error bars); whether it had any point to draw."""
    points = [(c["images_per_iter"], c[key]) for c in cells if _value(c[key]) is not None]
    if not points:
        return False
    xs, values = zip(*points)
    style = {"color": color, "linestyle": PRECISION_LINES.get(precision, "-."), "marker": "o", "label": label}
    if key == "train_speedup":
        ax.errorbar(xs, [median for median, _, _ in values], capsize=3, **style,
                    yerr=[[median - low for median, low, _ in values], [high - median for median, _, high in values]])
    else:
        ax.plot(xs, values, **style)
    return True


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks([])


def _value(measurement):
    """A cell's plotted value: the median of a (median, low, high) ratio, else the measurement itself."""
    return measurement[0] if isinstance(measurement, tuple) else measurement


def _inference_bars(ax, series: Dict[Tuple[str, str], List[Dict]], colors: Dict[str, str]) -> None:
    measured = {name: next((c["inference_s_per_image"] for c in cells if c["inference_s_per_image"] is not None), None)
                for name, cells in series.items()}  # one inference measurement per variant and precision
    bars = [(f"{variant}, {precision}", measured[variant, precision], colors[variant])
            for variant, precision in series if measured[variant, precision] is not None]
    ax.set_xlabel("inference seconds per image")
    ax.grid(True, axis="x", alpha=0.3)
    if not bars:
        _note(ax, "inference not measured")
        return
    labels, seconds, bar_colors = zip(*bars)
    ax.barh(range(len(bars)), seconds, color=bar_colors)
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()  # first variant on top, as in the legend


def _inputs(settings: Dict) -> str:
    if settings.get("dataset"):
        return f"dataset {settings['dataset']}"
    height, width = settings.get("input_size", ("?", "?"))
    return f"synthetic {height}×{width}, {settings.get('boxes', '?')} boxes"
