#!/usr/bin/env python
"""Re-run the GN paper's comparisons: one tools/train_net.py run per cell, then a table, JSON and plots.

    python tools/run_experiments.py --quick                       # experiment 1 on the CPU (experiments/quick.yaml)
    python tools/run_experiments.py --preset experiments/full.yaml --only batch_size
    python tools/run_experiments.py --quick --dry-run             # list the cells and their settings

Runs go to OUTPUT/<experiment>/<cell>/ (OUTPUT defaults to output/experiments/<preset>). A cell that has
ended (cell.json written) with the settings the preset gives now is skipped when the command runs again, so an
interrupted sweep resumes. Ctrl-C or
SIGTERM stops the runs in progress (they are not recorded, so they run again) and exits with status 130.
Results: OUTPUT/results.json, OUTPUT/results.md and OUTPUT/<experiment>.png.
"""
import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from gn_detection.atomic_write import not_writable, write_atomically
from gn_detection.config import load_config
from gn_detection.datasets import datasets_root
from gn_detection.experiments import EXPERIMENTS, Cell, Preset, build_error
from gn_detection.report import METRICS, RESULT_FILE, collect, final_metrics, write_report
from gn_detection.run_checks import device_problem
from gn_detection.shapes import generate_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILURE_CHARS = 400  # of a failed run's log line kept in its record
STOP_GRACE_S = 30  # how long a stopped run may take to exit on SIGTERM before it is killed


class Children:
    """The train_net runs in progress, so that an interrupted sweep stops them instead of leaving them training
    (a rerun would then start a second run in the same folder). Thread-safe: the cells run in a thread pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Set[subprocess.Popen] = set()
        self._stopped = False

    def start(self, command: List[str], **popen_args) -> Optional[subprocess.Popen]:
        """Start ``command``, or return None once :meth:`stop` was called (a cell that was starting as the sweep
        was interrupted). Each run gets its own session and process group, so stopping it stops the processes it
        spawned (``--num-gpus`` > 1) as well."""
        with self._lock:  # held across Popen, so stop() cannot miss a run that is being started
            if self._stopped:
                return None
            child = subprocess.Popen(command, start_new_session=True, **popen_args)
            self._running.add(child)
            return child

    def wait(self, child: subprocess.Popen) -> int:
        """``child``'s return code, once it has exited."""
        try:
            return child.wait()
        finally:
            with self._lock:
                self._running.discard(child)

    def stop(self) -> None:
        """Start no more runs; stop the running ones (SIGTERM, then SIGKILL after STOP_GRACE_S) and wait for them."""
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for child in running:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S  # one grace period for them all
        for child in running:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.wait()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called: the runs that end from now on were stopped, not finished."""
        return self._stopped


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    if child.poll() is not None:  # exited and reaped: its group id may belong to someone else by now
        return
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:  # exited between poll() and killpg()
        pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # someone stopped the run; it did not fail


def stop_signal(returncode: int) -> Optional[str]:
    """The signal that stopped a run from outside (Ctrl-C, ``kill``, a closed terminal), described (e.g. "signal 15,
    SIGTERM"), or None if the run ended by itself or crashed (SIGSEGV, SIGABRT, ... are failures to record).
    128 + the signal (130 for SIGINT, 143 for SIGTERM) is how shells and launchers report a child it stopped."""
    if returncode in [128 + s for s in STOP_SIGNALS]:
        return f"exit code {returncode}, {signal.Signals(returncode - 128).name}"
    if -returncode in STOP_SIGNALS:
        return f"signal {-returncode}, {signal.Signals(-returncode).name}"
    return None


def killed_by(returncode: int) -> Optional[str]:
    """The signal that ended a run which did not exit by itself, described, or None."""
    if returncode >= 0:
        return None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown signal"
    hint = " (the kernel's out-of-memory killer sends it)" if -returncode == signal.SIGKILL else ""
    return f"killed by signal {-returncode}, {name}{hint}"


def cell_config(preset: Preset, cell: Cell):
    return load_config(os.path.join(REPO, preset.config), preset.overrides(cell))


def cell_settings(preset: Preset, cell: Cell) -> Dict:
    """What a cell's run is made of (config file, GPUs, overrides as passed to train_net), recorded with it so that
    a sweep after the preset changed runs the cell again instead of keeping a result of other settings."""
    return {"config": preset.config, "num_gpus": preset.num_gpus,
            "overrides": [str(x) for x in preset.overrides(cell)]}


def ended_as_set(out_dir: str, preset: Preset, cell: Cell) -> Optional[bool]:
    """None if ``cell`` has not ended under ``out_dir``; else whether its record holds today's settings (records
    written before the config and GPU count were recorded are taken to have today's)."""
    path = os.path.join(out_dir, cell.name, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)  # collect() read every record before the sweep, so this one is whole
    if record["status"] == "ok" and any(math.isnan(value) for value in record.get("metrics", {}).values()):
        return None  # an older runner's record of a run that predicted nothing (AP NaN): run it again
    return has_settings(record, cell_settings(preset, cell))


def has_settings(record: Dict, settings: Dict) -> bool:
    """Whether a run's record is of ``settings`` (:func:`cell_settings`); records written before the config and
    GPU count were recorded are taken to have today's."""
    return all(record.get(key, value) == value for key, value in settings.items())


def current_runs(preset: Preset, records: List[Dict], out_dir: str) -> Tuple[List[Dict], Optional[str]]:
    """The records of the preset's cells at the settings it gives now, and a note saying how many other records
    ``out_dir`` holds and why they are left out of the report (None if it holds none)."""
    settings = {cell.name: cell_settings(preset, cell) for cell in preset.cells()}
    kept, gone, changed = [], 0, 0
    for record in records:
        now = settings.get(Cell(record["experiment"], record["variant"], record["ims_per_gpu"], record["seed"]).name)
        if now is None:
            gone += 1
        elif has_settings(record, now):
            kept.append(record)
        else:
            changed += 1
    why = [f"{gone} of cells the preset no longer has"] * bool(gone) + [
        f"{changed} of settings it no longer gives (config, GPUs, LR, schedule or opts changed), which a sweep "
        "without --report-only runs again"] * bool(changed)
    note = f"{gone + changed} run(s) under {out_dir} are not shown: {'; '.join(why)}" if why else None
    return kept, note


def checked_cells(preset: Preset, path: str, only: Sequence[str]) -> List[Cell]:
    """The preset's cells (of the experiments in ``only``, if given), each one's config and each variant's model
    (on the meta device, so cheap) built so that a bad base config, override or component stops the command
    before any work, with a ValueError naming ``path`` and the cell."""
    absent = [e for e in only if e not in preset.experiments]
    if absent:
        raise ValueError(f"--only {' '.join(absent)}: {path} has no such experiment; "
                         f"it has {list(preset.experiments)}")
    cells = preset.cells(tuple(only))
    names = [cell.name for cell in cells]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"{path}: cell(s) {', '.join(twice)} come more than once (a seed, norm or setting listed "
                         "twice), and would share one run folder; list each once")
    built = set()  # a variant's model is the same at every batch size and seed: built once
    for cell in cells:
        try:
            cfg = cell_config(preset, cell)
            if (cell.experiment, cell.variant) not in built:
                build_error(cfg)  # a G that does not divide is a result; any other build error a mistake
                built.add((cell.experiment, cell.variant))
        except (OSError, ValueError) as e:  # load_config's and the model builder's errors
            raise ValueError(f"{path}: cell {cell.name}: {e}; fix the preset's config or opts") from e
        if problem := device_problem(cfg, preset.num_gpus, "num_gpus: 1"):  # train_net's refusal, for every run
            raise ValueError(f"{path}: {problem}")
    return cells


def prepare_dataset(preset: Preset) -> Dict[str, str]:
    """Generate the preset's shapes dataset if it names one; the environment that points runs at the datasets
    (the runs start in the repository, so a relative $DETECTRON2_DATASETS is made absolute here)."""
    if not preset.dataset:
        given = "DETECTRON2_DATASETS" in os.environ
        return {"DETECTRON2_DATASETS": os.path.abspath(datasets_root())} if given else {}  # ~ expanded, as read
    root = os.path.join(REPO, preset.dataset["root"])
    for spec in preset.shapes_specs():
        generate_split(os.path.join(root, "shapes"), spec)
    return {"DETECTRON2_DATASETS": root}


def run_cell(preset: Preset, cell: Cell, order: int, out_dir: str, env: Dict[str, str],
             children: Optional[Children] = None) -> Dict:
    """Train and evaluate one cell with tools/train_net.py (started through ``children``, so an interrupted sweep
    can stop it); return its record, written as cell.json unless the run was stopped by a signal (status
    "interrupted", with the signal under "stopped_by"): such a cell has not ended, and the next sweep runs it."""
    children = children or Children()
    run_dir = os.path.join(out_dir, cell.name)
    os.makedirs(run_dir, exist_ok=True)
    if os.path.isfile(os.path.join(run_dir, RESULT_FILE)):  # of other settings: no longer this cell's result
        os.remove(os.path.join(run_dir, RESULT_FILE))
    settings = cell_settings(preset, cell)
    record = {"experiment": cell.experiment, "variant": cell.variant, "ims_per_gpu": cell.ims_per_gpu,
              "seed": cell.seed, "order": order, **settings}
    cfg = cell_config(preset, cell)
    error = build_error(cfg)
    start = time.time()
    if error:
        record.update(status="not buildable", error=error)
    else:
        command = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                   os.path.join(REPO, preset.config), "--num-gpus", str(preset.num_gpus),
                   *settings["overrides"], "OUTPUT_DIR", run_dir, "TEST.VIS_NUM_IMAGES", "0"]
        record["command"] = " ".join(shlex.quote(c) for c in command)
        returncode = _train(children, command, run_dir, env)
        _remove_weights(run_dir)
        if returncode is None:
            return {**record, "status": "interrupted", "stopped_by": "the sweep stopped before the run started"}
        signalled = stop_signal(returncode)
        if returncode != 0 and (children.stopped or signalled):  # a run that finished is kept
            stopped_by = signalled or f"the sweep stopped it (exit code {returncode})"
            return {**record, "status": "interrupted", "stopped_by": stopped_by}
        record["metrics"] = final_metrics(os.path.join(run_dir, "metrics.json"))
        if returncode == 0 and record["metrics"]:
            record.update(_evaluated(record["metrics"], run_dir, cfg.MODEL.MASK_ON))
        else:
            record["status"], why = _failure(run_dir)
            if error := killed_by(returncode) or why:
                record["error"] = error
    record["seconds"] = round(time.time() - start, 1)
    write_atomically(os.path.join(run_dir, RESULT_FILE), json.dumps(record, indent=1))  # whole, or not ended
    return record


def _train(children: Children, command: List[str], run_dir: str, env: Dict[str, str]) -> Optional[int]:
    """Run ``command`` logging to run_dir/stdout.txt; its return code, or None if ``children`` was stopped."""
    metrics = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(metrics):  # an interrupted run's: Detectron2 appends, and it is not this run's result
        os.remove(metrics)
    with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
        child = children.start(command, cwd=REPO, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT)
        return None if child is None else children.wait(child)


NO_PREDICTIONS = "No predictions from the model!"  # Detectron2's COCOEvaluator, which then gives AP NaN


def _evaluated(metrics: Dict[str, float], run_dir: str, mask_on: bool) -> Dict:
    """The status and metrics of a run that trained and was evaluated. Detectron2 gives AP NaN when the model
    predicted nothing (it skips COCO's evaluation): by COCO's definition that is AP 0, recorded so, with
    "no_predictions" set for the report to say. A NaN for any other reason (a test set without ground truth)
    is a failure, not a result."""
    if not any(math.isnan(value) for value in metrics.values()):
        return {"status": "ok"}
    with open(os.path.join(run_dir, "stdout.txt"), errors="replace") as f:
        predicted_nothing = any(NO_PREDICTIONS in line for line in f)
    if predicted_nothing:
        keys = [key for key, _ in METRICS if mask_on or key != "segm/AP"]
        return {"status": "ok", "metrics": dict.fromkeys(keys, 0.0), "no_predictions": True}
    return {"status": "failed", "metrics": {key: value for key, value in metrics.items() if not math.isnan(value)},
            "error": "the evaluation gave AP NaN although the model predicted boxes (DATASETS.TEST without "
                     "ground truth?); see the run's stdout.txt"}


def _failure(run_dir: str) -> Tuple[str, Optional[str]]:
    """A run's status ("diverged" or "failed") from its log, and the log's line that says why: train_net's
    ``error:`` line, else the last line (a traceback's exception), or None for an empty log."""
    with open(os.path.join(run_dir, "stdout.txt"), errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    diverged = ("Loss became infinite or NaN", "Training has diverged")  # Detectron2's two NaN checks
    status = "diverged" if any(message in line for line in lines for message in diverged) else "failed"
    why = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else None)
    return status, why and why[:FAILURE_CHARS]


def _remove_weights(run_dir: str) -> None:
    for name in os.listdir(run_dir):  # checkpoints are not needed for the results, and are large
        if name.endswith(".pth") or name == "last_checkpoint":
            os.remove(os.path.join(run_dir, name))


def run_all(preset: Preset, cells: List[Cell], out_dir: str, jobs: int) -> None:
    """Run the cells that have not ended, ``jobs`` at a time, printing a line as each one ends. On
    KeyboardInterrupt no more cells start and the running ones are stopped and waited for before it propagates."""
    env = prepare_dataset(preset)
    if jobs > 1:  # share the cores between the parallel runs instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    order = {}  # position of each variant in the preset, to keep the report in preset order
    for cell in cells:
        order.setdefault((cell.experiment, cell.variant), len(order))
    ended = [ended_as_set(out_dir, preset, c) for c in cells]
    todo = [c for c, as_set in zip(cells, ended) if not as_set]
    changed = ended.count(False)
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run ({jobs} at a time)"
          + (f"; {changed} of them ended with other settings (config, GPUs or overrides) and run again"
             if changed else ""))
    start, finished = time.time(), 0
    children = Children()

    def one(cell: Cell) -> None:
        nonlocal finished
        record = run_cell(preset, cell, order[(cell.experiment, cell.variant)], out_dir, env, children)
        if record["status"] == "interrupted":
            print(f"{cell.name}: interrupted ({record['stopped_by']}); not recorded, the same command runs it again",
                  flush=True)
            return
        finished += 1
        eta = (time.time() - start) / finished * (len(todo) - finished)
        aps = " ".join(f"{k} {v:.1f}" for k, v in record.get("metrics", {}).items())
        aps += " (no predictions: AP 0)" if record.get("no_predictions") else ""
        print(f"[{finished}/{len(todo)}] {cell.name}: {record['status']} {aps} in {record['seconds']:.0f} s; "
              f"about {eta / 60:.0f} min left", flush=True)

    pool = ThreadPoolExecutor(jobs)
    try:
        cells_done, _ = wait([pool.submit(one, cell) for cell in todo], return_when=FIRST_EXCEPTION)
        for cell_done in cells_done:
            cell_done.result()  # a cell's error, as soon as it happens rather than in the cells' order
    except BaseException:  # Ctrl-C, or a cell's own error (a full disk): stop the other runs too, then say why
        pool.shutdown(wait=False, cancel_futures=True)  # the cells not started yet never start
        children.stop()
        raise
    finally:
        pool.shutdown()  # the cells in progress finish (at once if their runs were stopped)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (``kill``, a job scheduler) and SIGHUP (a closed terminal: the runs, in sessions
    of their own, would not get it) interrupt like Ctrl-C: KeyboardInterrupt, on which run_all stops the runs.
    Later such signals are ignored, so that stopping them is not cut short (it takes at most STOP_GRACE_S). Only
    the main thread can set handlers; elsewhere this does nothing."""
    def interrupt(signum, frame):
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a signal ignored from the start stays ignored: nohup's SIGHUP, SIGINT for a command started with `&`
    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def machine() -> str:
    """CPU model, core count and GPU, for the record of where results came from."""
    cpu = platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def interrupted_sweep(preset: Preset, cells: List[Cell], out_dir: str, jobs: int) -> bool:
    """Run the sweep (:func:`run_all`); True, once said on stderr, if Ctrl-C or SIGTERM stopped it."""
    try:
        with signals_interrupt():
            run_all(preset, cells, out_dir, jobs)
        return False
    except KeyboardInterrupt:
        ended = sum(os.path.isfile(os.path.join(out_dir, c.name, RESULT_FILE)) for c in cells)
        print(f"interrupted: {ended} of {len(cells)} cells have ended (cell.json written in {out_dir}); run the "
              "same command again to resume with the others", file=sys.stderr)
        return True


def output_problem(path: str) -> Optional[str]:
    """Why ``--output`` cannot hold the runs (a file, under a file, an unwritable place), or None."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"--output {path} is a file; give a folder for the runs and the report (it is made if missing)"
    if why := not_writable(path):
        return f"--output {path}: cannot write there ({why}); give a folder you can write to"
    return None


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
    if args.output and (why := output_problem(args.output)):
        parser.error(why)

    path = os.path.join(REPO, "experiments", "quick.yaml") if args.quick else args.preset
    try:
        preset = Preset.load(path)
        cells = checked_cells(preset, path, args.only)
        # absolute: the runs start in the repository, not where this command was given
        out_dir = os.path.abspath(args.output) if args.output else os.path.join(REPO, "output", "experiments",
                                                                                 preset.name)
        collect(out_dir)  # an unreadable record of an earlier sweep: said now, not after this one's hours
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        for cell in cells:
            print(cell.name, " ".join(map(str, preset.overrides(cell))))
        return 0
    start = time.time()
    try:
        if not args.report_only and interrupted_sweep(preset, cells, out_dir, args.jobs):
            return 130  # the shells' status for a command stopped by Ctrl-C
    except OSError as e:  # a full disk, a folder that went read-only: the runs in progress were stopped
        print(f"error: {e}; the cells that ended are kept: fix this and run the same command to resume",
              file=sys.stderr)
        return 1
    command = ["python", "tools/run_experiments.py", *(argv or sys.argv[1:])]
    header = {"preset": os.path.relpath(os.path.abspath(path), REPO),
              "command": " ".join(shlex.quote(a) for a in command),
              "machine": machine(), "torch": torch.__version__, "images_per_run": preset.images_per_run,
              "lr_per_image": preset.lr_per_image, "seeds": preset.seeds}
    if not args.report_only:
        header["sweep_minutes"] = round((time.time() - start) / 60, 1)
    try:
        ended = collect(out_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    runs, left_out = current_runs(preset, ended, out_dir)
    if not runs:
        print(f"error: no ended runs of {path}'s cells under {out_dir}" + (f" ({left_out})" if left_out else "")
              + "; run the preset first (without --report-only)", file=sys.stderr)
        return 1
    if left_out:
        print(left_out)
    report = write_report(out_dir, f"GN experiments, preset {preset.name}", header, runs, left_out)
    print(f"wrote {report['markdown']}, {report['json']} and {len(report['plots'])} plot(s) in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
