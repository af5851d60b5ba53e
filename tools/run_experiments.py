#!/usr/bin/env python
"""Re-run the GN paper's comparisons: one tools/train_net.py run per cell, then a table, JSON and plots.

    python tools/run_experiments.py --quick                       # experiment 1 on the CPU (experiments/quick.yaml)
    python tools/run_experiments.py --preset experiments/full.yaml --only batch_size
    python tools/run_experiments.py --quick --dry-run             # list the cells and their settings

Runs go to OUTPUT/<experiment>/<cell>/ (OUTPUT defaults to output/experiments/<preset>). A cell that has
ended (cell.json written) is skipped when the command runs again, so an interrupted sweep resumes.
Results: OUTPUT/results.json, OUTPUT/results.md and OUTPUT/<experiment>.png.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence

import torch

from gn_detection.atomic_write import write_atomically
from gn_detection.config import load_config
from gn_detection.experiments import EXPERIMENTS, Cell, Preset, build_error
from gn_detection.report import RESULT_FILE, collect, final_metrics, write_report
from gn_detection.shapes import generate_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cell_config(preset: Preset, cell: Cell):
    return load_config(os.path.join(REPO, preset.config), preset.overrides(cell))


def checked_cells(preset: Preset, path: str, only: Sequence[str]) -> List[Cell]:
    """The preset's cells (of the experiments in ``only``, if given), each one's config built (no model, so
    cheap) so that a bad base config or override stops the command before any work, with a ValueError naming
    ``path`` and the cell."""
    absent = [e for e in only if e not in preset.experiments]
    if absent:
        raise ValueError(f"--only {' '.join(absent)}: {path} has no such experiment; "
                         f"it has {list(preset.experiments)}")
    cells = preset.cells(tuple(only))
    for cell in cells:
        try:
            cell_config(preset, cell)
        except (OSError, ValueError) as e:  # load_config's errors
            raise ValueError(f"{path}: cell {cell.name}: {e}; fix the preset's config or opts") from e
    return cells


def prepare_dataset(preset: Preset) -> Dict[str, str]:
    """Generate the preset's shapes dataset if it names one; the environment that points runs at it."""
    if not preset.dataset:
        return {}
    root = os.path.join(REPO, preset.dataset["root"])
    for spec in preset.shapes_specs():
        generate_split(os.path.join(root, "shapes"), spec)
    return {"DETECTRON2_DATASETS": root}


def run_cell(preset: Preset, cell: Cell, order: int, out_dir: str, env: Dict[str, str]) -> Dict:
    """Train and evaluate one cell with tools/train_net.py; write and return its record."""
    run_dir = os.path.join(out_dir, cell.name)
    os.makedirs(run_dir, exist_ok=True)
    overrides = [str(x) for x in preset.overrides(cell)]
    record = {"experiment": cell.experiment, "variant": cell.variant, "ims_per_gpu": cell.ims_per_gpu,
              "seed": cell.seed, "order": order, "overrides": overrides}
    error = build_error(cell_config(preset, cell))
    start = time.time()
    if error:
        record.update(status="not buildable", error=error)
    else:
        command = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                   os.path.join(REPO, preset.config), "--num-gpus", str(preset.num_gpus),
                   *overrides, "OUTPUT_DIR", run_dir, "TEST.VIS_NUM_IMAGES", "0"]
        record["command"] = " ".join(shlex.quote(c) for c in command)
        with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
            done = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        record["metrics"] = final_metrics(os.path.join(run_dir, "metrics.json"))
        record["status"] = "ok" if done.returncode == 0 and record["metrics"] else _failure(run_dir)
        _remove_weights(run_dir)
    record["seconds"] = round(time.time() - start, 1)
    write_atomically(os.path.join(run_dir, RESULT_FILE), json.dumps(record, indent=1))  # whole, or not ended
    return record


def _failure(run_dir: str) -> str:
    with open(os.path.join(run_dir, "stdout.txt")) as f:
        log = f.read()
    diverged = ("Loss became infinite or NaN", "Training has diverged")  # Detectron2's two NaN checks
    return "diverged" if any(message in log for message in diverged) else "failed"


def _remove_weights(run_dir: str) -> None:
    for name in os.listdir(run_dir):  # checkpoints are not needed for the results, and are large
        if name.endswith(".pth") or name == "last_checkpoint":
            os.remove(os.path.join(run_dir, name))


def run_all(preset: Preset, cells: List[Cell], out_dir: str, jobs: int) -> None:
    env = prepare_dataset(preset)
    if jobs > 1:  # share the cores between the parallel runs instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    order = {}  # position of each variant in the preset, to keep the report in preset order
    for cell in cells:
        order.setdefault((cell.experiment, cell.variant), len(order))
    todo = [c for c in cells if not os.path.isfile(os.path.join(out_dir, c.name, RESULT_FILE))]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run ({jobs} at a time)")
    start, finished = time.time(), 0

    def one(cell: Cell) -> None:
        nonlocal finished
        record = run_cell(preset, cell, order[(cell.experiment, cell.variant)], out_dir, env)
        finished += 1
        eta = (time.time() - start) / finished * (len(todo) - finished)
        aps = " ".join(f"{k} {v:.1f}" for k, v in record.get("metrics", {}).items())
        print(f"[{finished}/{len(todo)}] {cell.name}: {record['status']} {aps} in {record['seconds']:.0f} s; "
              f"about {eta / 60:.0f} min left", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def machine() -> str:
    """CPU model, core count and GPU, for the record of where results came from."""
    cpu = platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--preset", help="preset YAML (see experiments/)")
    choice.add_argument("--quick", action="store_true", help="the CPU preset experiments/quick.yaml")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=(), help="run only these experiments")
    parser.add_argument("--output", help="output directory (default: output/experiments/<preset>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (on a CPU they share its cores)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their overrides, run nothing")
    parser.add_argument("--report-only", action="store_true", help="only collect the ended runs and write the report")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    path = os.path.join(REPO, "experiments", "quick.yaml") if args.quick else args.preset
    try:
        preset = Preset.load(path)
        cells = checked_cells(preset, path, args.only)
        out_dir = args.output or os.path.join(REPO, "output", "experiments", preset.name)
        collect(out_dir)  # an unreadable record of an earlier sweep: said now, not after this one's hours
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        for cell in cells:
            print(cell.name, " ".join(map(str, preset.overrides(cell))))
        return 0
    start = time.time()
    if not args.report_only:
        run_all(preset, cells, out_dir, args.jobs)
    header = {"preset": os.path.relpath(os.path.abspath(path), REPO),
              "command": " ".join(shlex.quote(a) for a in ["python", "tools/run_experiments.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "torch": torch.__version__, "images_per_run": preset.images_per_run,
              "lr_per_image": preset.lr_per_image, "seeds": preset.seeds}
    if not args.report_only:
        header["sweep_minutes"] = round((time.time() - start) / 60, 1)
    try:
        ended = collect(out_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not ended:
        print(f"error: no ended runs under {out_dir}; run the preset first (without --report-only)", file=sys.stderr)
        return 1
    report = write_report(out_dir, f"GN experiments, preset {preset.name}", header)
    print(f"wrote {report['markdown']}, {report['json']} and {len(report['plots'])} plot(s) in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
