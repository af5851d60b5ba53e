"""Collecting experiment runs into a JSON file, a Markdown table and the paper's plots."""
import json
import math
import os
import statistics
from collections import defaultdict
from typing import Dict, List, Optional

from matplotlib.figure import Figure  # drawn to files without pyplot: a user's backend stays as it was

from .atomic_write import write_atomically
from .experiments import LABELS
from .metrics_log import read_metrics
from .visualize import save_figure

RESULT_FILE = "cell.json"  # written by the runner into each run's directory once the run has ended
METRICS = (("segm/AP", "mask AP"), ("bbox/AP", "box AP"))


def final_metrics(metrics_json: str) -> Dict[str, float]:
    """The last evaluation (box and mask AP) of the latest run in a Detectron2 ``metrics.json``
    (:func:`~gn_detection.metrics_log.read_metrics`); {} if it has none."""
    last = {}
    if os.path.isfile(metrics_json):
        evaluations = [r for r in read_metrics(metrics_json) if "segm/AP" in r or "bbox/AP" in r]
        last = evaluations[-1] if evaluations else {}
    return {key: last[key] for key, _ in METRICS if key in last}


def collect(out_dir: str) -> List[Dict]:
    """Every ended run under ``out_dir`` (the records the runner wrote), sorted by experiment and cell.
    A record that cannot be read is a ValueError naming it: deleting it makes the next sweep re-run that cell."""
    records = []
    for root, _, files in os.walk(out_dir):
        if RESULT_FILE in files:
            path = os.path.join(root, RESULT_FILE)
            with open(path) as f:
                try:
                    records.append(json.load(f))
                except ValueError as e:  # e.g. cut short by an older runner that wrote it in place
                    raise ValueError(f"{path}: unreadable run record ({e}); delete it and run the preset again "
                                     "to re-run this cell") from e
    return sorted(records, key=lambda r: (r["experiment"], r["order"], r["ims_per_gpu"], r["seed"]))


def summarize(records: List[Dict]) -> List[Dict]:
    """One row per (experiment, variant, images per GPU): mean, std and values over seeds of each AP, or
    the status of runs that did not finish (diverged, failed, not buildable)."""
    groups = defaultdict(list)
    for r in records:  # records come sorted by experiment and preset order
        groups[(r["experiment"], r["variant"], r["ims_per_gpu"])].append(r)
    rows = []
    for (experiment, variant, ims), runs in groups.items():
        row = {"experiment": experiment, "variant": variant, "ims_per_gpu": ims,
               "seeds": [r["seed"] for r in runs], "status": sorted({r["status"] for r in runs}),
               "no_predictions": sum(bool(r.get("no_predictions")) for r in runs)}
        for key, _ in METRICS:
            values = [r["metrics"][key] for r in runs if key in r.get("metrics", {})]
            values = [v for v in values if not math.isnan(v)]
            row[key] = {"values": values, "mean": statistics.fmean(values) if values else None,
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None}
        rows.append(row)
    return rows


def _cell_text(row: Dict, key: str) -> str:
    stats = row[key]
    if stats["mean"] is None:
        return _no_result(row)
    text = f"{stats['mean']:.1f}"
    if len(stats["values"]) > 1:
        text += f" ± {stats['std']:.1f}"
    failed = [s for s in row["status"] if s != "ok"]
    text += f" ({'/'.join(failed)} in some seeds)" if failed else ""
    if row["no_predictions"]:
        some = " in some seeds" if row["no_predictions"] < len(row["seeds"]) else ""
        text += f" (no predictions{some})"
    return text


def _no_result(row: Dict) -> str:
    """Why a row has no AP: its runs' statuses (failed, diverged, not buildable), or "-" (e.g. no mask AP)."""
    return "/".join(s for s in row["status"] if s != "ok") or "-"


def markdown_table(rows: List[Dict]) -> str:
    """The rows as Markdown: one table per experiment, mean ± std over seeds of mask AP and box AP."""
    out = []
    for experiment in dict.fromkeys(r["experiment"] for r in rows):
        part = [r for r in rows if r["experiment"] == experiment]
        out += [f"### {experiment}", "", "| variant | images/GPU | seeds | mask AP | box AP |", "|---|---|---|---|---|"]
        for r in part:
            label = LABELS.get(r["variant"], r["variant"])
            out.append(f"| {label} | {r['ims_per_gpu']} | {len(r['seeds'])} | {_cell_text(r, 'segm/AP')} | "
                       f"{_cell_text(r, 'bbox/AP')} |")
        out.append("")
    return "\n".join(out)


def _line_plot(ax, rows: List[Dict], key: str, x_of, series_of, xlabel: str) -> None:
    series = defaultdict(list)
    for r in rows:
        if r[key]["mean"] is not None:
            series[series_of(r)].append((x_of(r), r[key]["mean"], r[key]["std"]))
    for name, points in series.items():
        points.sort()
        xs, ys, errs = zip(*points)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=LABELS.get(name, name))
    ax.set_xscale("log", base=2)
    ticks = sorted({x for points in series.values() for x, _, _ in points})
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{dict(METRICS)[key]} (%)")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()


def _bar_plot(ax, rows: List[Dict], key: str) -> None:
    """One bar per row, labelled with its mean; a row without a result gets no bar (a 0 would read as a result)
    but its status, written upwards from the axis where its bar would be."""
    names = [LABELS.get(r["variant"], r["variant"]) for r in rows]
    for x, r in enumerate(rows):
        if r[key]["mean"] is None:
            ax.text(x, 0, _no_result(r), rotation=90, ha="center", va="bottom", color="0.4")
        else:
            ax.bar_label(ax.bar(x, r[key]["mean"], yerr=r[key]["std"], capsize=3, color="C0"), fmt="%.1f")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel(f"{dict(METRICS)[key]} (%)")
    ax.grid(True, axis="y", alpha=0.3)


def plot(rows: List[Dict], out_dir: str, title: str) -> List[str]:
    """Draw each experiment's plot as ``<experiment>.png`` in ``out_dir``; returns the paths."""
    paths = []
    for experiment in dict.fromkeys(r["experiment"] for r in rows):
        part = [r for r in rows if r["experiment"] == experiment]
        if experiment == "groups":
            by_g = [r for r in part if r["variant"].startswith("G=")]
            by_c = [r for r in part if r["variant"].startswith("C=")]
            panels = [p for p in (by_g, by_c) if p]
        else:
            panels = [part]
        fig = Figure(figsize=(10, 4 * len(panels)))
        axes = fig.subplots(len(panels), 2, squeeze=False)
        for panel, ax_row in zip(panels, axes):
            for ax, (key, _) in zip(ax_row, METRICS):
                _draw_panel(ax, experiment, panel, key)
        fig.suptitle(f"{title}: {experiment} (mean ± std over seeds)")
        fig.tight_layout()
        paths.append(save_figure(fig, os.path.join(out_dir, f"{experiment}.png")))
    return paths


def _draw_panel(ax, experiment: str, rows: List[Dict], key: str) -> None:
    if experiment == "batch_size":
        _line_plot(ax, rows, key, lambda r: r["ims_per_gpu"], lambda r: r["variant"], "images per GPU")
    elif experiment == "groups":
        by_groups = rows[0]["variant"].startswith("G=")
        _line_plot(ax, rows, key, lambda r: int(r["variant"][2:]), lambda r: "GN",
                   "groups per layer (G)" if by_groups else "channels per group")
    else:
        _bar_plot(ax, rows, key)


def _run_name(record: Dict) -> str:
    """A run as the report's lists name it: experiment, variant, images per GPU and seed."""
    return (f"{record['experiment']}, {LABELS.get(record['variant'], record['variant'])}, "
            f"{record['ims_per_gpu']} images/GPU, seed {record['seed']}")


def unfinished_runs(records: List[Dict]) -> List[str]:
    """Markdown lines listing each run that did not finish, with why (its record's error), if any."""
    lines = [f"- {_run_name(r)}: {r['status']}" + (f": {r['error']}" if r.get("error") else "")
             for r in records if r["status"] != "ok"]
    return ["### Runs that did not finish", "", *lines, ""] if lines else []


def no_prediction_runs(records: List[Dict]) -> List[str]:
    """Markdown lines listing each run that predicted nothing (scored AP 0), if any."""
    lines = [f"- {_run_name(r)}" for r in records if r.get("no_predictions")]
    return ["### Runs that predicted nothing", "", "The model detected no object in the test set: AP 0 by COCO's "
            "definition, counted so in the means (Detectron2's evaluator reports NaN and skips the evaluation).",
            "", *lines, ""] if lines else []


def write_report(out_dir: str, title: str, header: Optional[Dict] = None, records: Optional[List[Dict]] = None,
                 left_out: Optional[str] = None) -> Dict[str, str]:
    """Write ``results.json``, ``results.md`` and the plots in ``out_dir`` of ``records`` (by default every run
    under ``out_dir``, :func:`collect`); ``left_out`` says which runs there the report leaves out, and why."""
    records = collect(out_dir) if records is None else records
    rows = summarize(records)
    header = header or {}
    results = {**header, **({"left_out": left_out} if left_out else {}), "summary": rows, "runs": records}
    write_atomically(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += [f"Note: {left_out}.", ""] if left_out else []
    lines += [markdown_table(rows)] + unfinished_runs(records) + no_prediction_runs(records)
    write_atomically(os.path.join(out_dir, "results.md"), "\n".join(lines))
    plots = plot(rows, out_dir, title)
    return {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md"),
            "plots": plots}
