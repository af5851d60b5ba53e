"""The experiment runner: its cell matrix, every variant building, and tiny end-to-end sweeps collected
into a table, JSON and plots."""
import builtins
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from torch import nn

from gn_detection import run_checks
from gn_detection.experiments import NORMS, Cell, Preset, build_error
from gn_detection.report import collect, markdown_table, summarize, write_report

from .conftest import REPO, SHAPES_CONFIG, TINY_OVERRIDES, load_tool, run_tool

PRESETS = ["experiments/quick.yaml", "experiments/cpu_ablations.yaml", "experiments/full.yaml"]
# The tiny sweeps' config overrides: narrow model, 64-pixel images, no loader workers.
TINY_SWEEP_OPTS = [*TINY_OVERRIDES[:-4], "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64,
                   "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64, "DATALOADER.NUM_WORKERS", 0]


def test_quick_preset_is_experiment_1_with_two_seeds():
    preset = Preset.load(os.path.join(REPO, "experiments/quick.yaml"))
    cells = preset.cells()
    expected = {(n, b) for n in ("GN", "BN", "FrozenBN") for b in (1, 2, 4, 8)}
    assert {(c.variant, c.ims_per_gpu) for c in cells} == expected
    assert len(cells) == 24 and {c.seed for c in cells} == {1, 2}


@pytest.mark.parametrize("ims", [1, 2, 4, 8])
def test_schedule_holds_images_fixed_and_scales_lr_linearly(ims):
    preset = Preset.load(os.path.join(REPO, "experiments/quick.yaml"))
    opts = dict(zip(*[iter(preset.schedule(ims))] * 2))
    assert opts["SOLVER.MAX_ITER"] * opts["SOLVER.IMS_PER_BATCH"] == preset.images_per_run
    assert opts["SOLVER.BASE_LR"] == pytest.approx(preset.lr_per_image * ims)
    assert [s * ims for s in opts["SOLVER.STEPS"]] == [448, 576]  # same point in images seen


@pytest.mark.parametrize("path", PRESETS)
def test_every_variant_of_every_preset_builds(path):
    tool = load_tool("run_experiments")
    preset = Preset.load(os.path.join(REPO, path))
    seen = {}
    for cell in preset.cells():
        if (cell.experiment, cell.variant) in seen:
            continue
        cfg = tool.cell_config(preset, cell)
        seen[(cell.experiment, cell.variant)] = build_error(cfg)
        norms = [cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM]
        if cell.experiment in ("batch_size", "scratch"):
            assert tuple(norms) == NORMS[cell.variant]
    assert all(error == "" for error in seen.values()), seen


def gn_parts(model) -> set:
    """Which parts of a model have GN layers: backbone (the ResNet), FPN, box_head, mask_head."""
    def part(name):
        top, sub = name.split(".")[:2]
        if top == "roi_heads":
            return sub
        return "backbone" if sub == "bottom_up" else "FPN"

    return {part(name) for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


def test_gn_placement_puts_gn_where_it_says():
    from detectron2.modeling import build_model

    tool = load_tool("run_experiments")
    preset = Preset.load(os.path.join(REPO, "experiments/cpu_ablations.yaml"))
    found = {c.variant: gn_parts(build_model(tool.cell_config(preset, c))) for c in preset.cells(("gn_placement",))}
    assert found == {"backbone": {"backbone"}, "backbone+FPN": {"backbone", "FPN"},
                     "+box head": {"backbone", "FPN", "box_head"},
                     "+mask head": {"backbone", "FPN", "box_head", "mask_head"}}


def test_a_group_count_that_does_not_divide_is_reported_not_built():
    cell = Cell("groups", "G=3", 2, 1, ("MODEL.GN.NUM_GROUPS", 3))
    preset = Preset.load(os.path.join(REPO, "experiments/cpu_ablations.yaml"))
    error = build_error(load_tool("run_experiments").cell_config(preset, cell))
    assert "MODEL.GN.NUM_GROUPS=3 does not divide" in error and "Cannot build" in error


def test_bad_presets_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"config": "x.yaml", "experiments": {"batchsize": {}}, "seeds": [1],
                                    "images_per_run": 2, "lr_per_image": 0.01}))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown experiment\(s\) \['batchsize'\]"):
        Preset.load(str(path))
    path.write_text(yaml.safe_dump({"config": "x.yaml", "seeds": [1], "imgs": 3}))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['imgs'\]"):
        Preset.load(str(path))


def test_summary_means_and_stds_over_seeds_and_statuses():
    def run(variant, seed, ap, status="ok"):
        return {"experiment": "batch_size", "variant": variant, "ims_per_gpu": 2, "seed": seed, "order": 0,
                "status": status, "metrics": {} if ap is None else {"segm/AP": ap, "bbox/AP": ap + 1}}

    rows = summarize([run("GN", 1, 10.0), run("GN", 2, 14.0), run("BN", 1, None, "diverged")])
    gn = next(r for r in rows if r["variant"] == "GN")
    assert gn["segm/AP"]["mean"] == 12.0 and gn["segm/AP"]["std"] == pytest.approx(2.8284, abs=1e-4)
    table = markdown_table(rows)
    assert "| GN | 2 | 2 | 12.0 ± 2.8 | 13.0 ± 2.8 |" in table and "| BN | 2 | 1 | diverged | diverged |" in table


def test_tiny_sweep_runs_collects_and_plots(tmp_path):
    preset = {
        "config": os.path.relpath(SHAPES_CONFIG, REPO),
        "opts": TINY_SWEEP_OPTS,
        "dataset": {"root": str(tmp_path / "data"), "image_size": 64, "max_objects": 2, "num_train": 4, "num_val": 2},
        "images_per_run": 2, "lr_per_image": 0.001, "seeds": [1, 2],
        "experiments": {"batch_size": {"norms": ["GN", "BN"], "ims_per_gpu": [1, 2]},
                        "groups": {"num_groups": [3, 8], "ims_per_gpu": 1}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    out = tmp_path / "out"
    done = run_tool(["tools/run_experiments.py", "--preset", str(path), "--output", str(out), "--jobs", "2"], {})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[12/12]" in done.stdout  # progress per run

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 12
    ok = [r for r in runs if r["status"] == "ok"]
    assert len(ok) == 10 and all(0 <= r["metrics"]["segm/AP"] <= 100 for r in ok)
    assert {r["variant"] for r in runs if r["status"] == "not buildable"} == {"G=3"}
    iters = {(r["variant"], r["ims_per_gpu"]): r["overrides"][r["overrides"].index("SOLVER.MAX_ITER") + 1] for r in ok}
    assert iters[("GN", 1)] == "2" and iters[("GN", 2)] == "1"
    table = (out / "results.md").read_text()
    assert "### batch_size" in table and "| GN | 1 | 2 |" in table and "not buildable" in table
    assert results["machine"] and results["command"].startswith("python tools/run_experiments.py")
    for plot in ("batch_size.png", "groups.png"):
        assert (out / plot).stat().st_size > 10_000
    assert not list(out.rglob("model_*.pth"))  # checkpoints removed

    again = run_tool(["tools/run_experiments.py", "--preset", str(path), "--output", str(out)], {})
    assert "12 already done, 0 to run" in again.stdout  # an interrupted sweep resumes


def write_preset(tmp_path, **changes) -> str:
    """A one-cell preset on the shapes config (with a 4-image dataset under tmp_path), with ``changes`` applied."""
    preset = {"config": os.path.relpath(SHAPES_CONFIG, REPO), "images_per_run": 2, "lr_per_image": 0.001,
              "seeds": [1], "experiments": {"batch_size": {"norms": ["GN"], "ims_per_gpu": [1]}},
              "dataset": {"root": str(tmp_path / "data"), "image_size": 64, "num_train": 2, "num_val": 2},
              **changes}
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return str(path)


@pytest.mark.parametrize("change, message", [
    ({"experiments": {"batch_size": {"ims_per_gpu": [1]}}}, r"experiments.batch_size: missing key\(s\) \['norms'\]"),
    ({"experiments": {"groups": {"num_group": [8], "ims_per_gpu": 1}}},
     r"experiments.groups: unknown key\(s\) \['num_group'\]"),
    ({"experiments": {"scratch": {"norms": ["GN"], "ims_per_gpu": 0}}},
     r"experiments.scratch: ims_per_gpu must be integers >= 1, got 0"),
    ({"dataset": {"root": "data", "num_train": 0, "num_val": 2}}, r"dataset: shapes train split: num_images must be"),
    ({"dataset": {"root": "data", "num_train": 2}}, r"dataset: missing key\(s\) \['num_val'\]"),
    ({"dataset": {"root": None, "num_train": 2, "num_val": 2}}, r"dataset.root: expected a folder, got None"),
    ({"experiments": ["batch_size"]}, r"experiments: expected a mapping of experiment names"),
    ({"seeds": 1}, r"seeds: expected a list of integers, got 1"),
    ({"experiments": {"scratch": {"norms": "GN", "ims_per_gpu": 1}}}, r"experiments.scratch.norms: expected a list"),
    ({"experiments": {"batch_size": {"norms": ["GN"], "ims_per_gpu": [True]}}},
     r"experiments.batch_size: ims_per_gpu must be integers >= 1, got True"),
    ({"experiments": {}}, r"experiments: none given"),
    ({"images_per_run": "abc"}, r"images_per_run: expected an integer >= 1, got 'abc'"),
    ({"images_per_run": 0}, r"images_per_run: expected an integer >= 1, got 0"),
    ({"num_gpus": 0}, r"num_gpus: expected an integer >= 1, got 0"),
    ({"warmup_images": -16}, r"warmup_images: expected an integer >= 0, got -16"),
    ({"lr_per_image": "0.01"}, r"lr_per_image: expected a finite number > 0, got '0.01'"),
    ({"lr_per_image": float("inf")}, r"lr_per_image: expected a finite number > 0, got inf"),
    ({"config": 5}, r"config: expected a config file, relative to the repository, got 5"),
    ({"opts": None}, r"opts: expected a list of config KEY, VALUE items, got None"),
    ({"opts": "SOLVER.MAX_ITER 2"}, r"opts: expected a list of config KEY, VALUE items, got 'SOLVER.MAX_ITER 2'"),
])
def test_bad_experiment_and_dataset_settings_name_the_file_and_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=r"preset.yaml: " + message):
        Preset.load(write_preset(tmp_path, **change))


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("change, message", [
    ({"opts": ["MODEL.GN.NUM_GROUP", 16]}, "Non-existent key: MODEL.GN.NUM_GROUP"),
    ({"config": "configs/nowhere.yaml"}, "configs/nowhere.yaml"),
    ({"opts": ["MODEL.ROI_HEADS.NAME", "NopeHeads"]}, "No object named 'NopeHeads' found in 'ROI_HEADS' registry"),
])
def test_a_bad_override_or_config_stops_the_command_before_any_work(tmp_path, capsys, change, message, dry_run):
    path = write_preset(tmp_path, **change)
    out = tmp_path / "out"
    assert load_tool("run_experiments").main(["--preset", path, "--output", str(out)] + ["--dry-run"] * dry_run) == 1
    error = capsys.readouterr().err
    assert f"{path}: cell batch_size/GN_ims1_seed1:" in error and message in error and "fix the preset" in error
    assert not (tmp_path / "data").exists() and not out.exists()  # no dataset generated, no run folder made


def test_jobs_below_one_is_refused_when_parsed(capsys):
    with pytest.raises(SystemExit):
        load_tool("run_experiments").main(["--quick", "--jobs", "0", "--dry-run"])
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err


def test_only_an_experiment_the_preset_lacks_is_refused_with_the_ones_it_has(capsys):
    assert load_tool("run_experiments").main(["--quick", "--only", "groups", "--dry-run"]) == 1
    assert "--only groups: " in (error := capsys.readouterr().err) and "quick.yaml" in error
    assert "it has ['batch_size']" in error


def fail_writing(monkeypatch, name):
    """Make writing a file whose name starts with ``name`` stop halfway with a full disk, as a crash would."""
    real_open = builtins.open

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_that_fails(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWritten(f) if "w" in mode and os.path.basename(path).startswith(name) else f

    monkeypatch.setattr(builtins, "open", open_that_fails)


def fake_train_net(monkeypatch, tool, returncode: int, log: str = "") -> list:
    """Make the runner's train_net runs exit at once with ``returncode`` (negative: killed by that signal), having
    written ``log`` to their output and a checkpoint in their OUTPUT_DIR as a real run would. Returns the list the
    runs' commands are appended to."""
    commands = []

    class FakeRun:
        def __init__(self, command, **kwargs):
            self.pid, self.returncode = -1, returncode
            commands.append(command)
            kwargs["stdout"].write(log)
            open(os.path.join(command[command.index("OUTPUT_DIR") + 1], "model_final.pth"), "w").close()

        def wait(self, timeout=None):
            return self.returncode

        poll = wait

    monkeypatch.setattr(tool.subprocess, "Popen", FakeRun)
    return commands


@pytest.mark.parametrize("returncode, stopped_by", [
    (-signal.SIGINT, "signal 2, SIGINT"), (-signal.SIGTERM, "signal 15, SIGTERM"),
    (-signal.SIGHUP, "signal 1, SIGHUP"), (130, "exit code 130, SIGINT")])
def test_a_cell_whose_run_a_signal_stopped_has_not_ended(tmp_path, monkeypatch, returncode, stopped_by):
    tool = load_tool("run_experiments")
    fake_train_net(monkeypatch, tool, returncode)
    preset = Preset.load(write_preset(tmp_path))
    cell = preset.cells()[0]
    record = tool.run_cell(preset, cell, 0, str(tmp_path), {})
    assert record["status"] == "interrupted" and record["stopped_by"].startswith(stopped_by)
    assert sorted(os.listdir(tmp_path / cell.name)) == ["stdout.txt"]  # no cell.json, so it runs again; no weights


@pytest.mark.parametrize("returncode, error", [
    (1, None), (-signal.SIGSEGV, "killed by signal 11, SIGSEGV"),
    (-signal.SIGKILL, "killed by signal 9, SIGKILL (the kernel's out-of-memory killer sends it)")])
def test_a_cell_whose_run_fails_or_crashes_by_itself_has_ended(tmp_path, monkeypatch, returncode, error):
    tool = load_tool("run_experiments")
    fake_train_net(monkeypatch, tool, returncode)
    preset = Preset.load(write_preset(tmp_path))
    cell = preset.cells()[0]
    assert tool.run_cell(preset, cell, 0, str(tmp_path), {})["status"] == "failed"
    record = json.loads((tmp_path / cell.name / "cell.json").read_text())
    assert record["status"] == "failed" and record.get("error") == error


def test_a_failed_runs_reason_is_recorded_and_reported(tmp_path, monkeypatch):
    tool = load_tool("run_experiments")
    why = "error: 2 processes (--num-gpus 2, --num-machines 1) with MODEL.DEVICE cpu: ... use --num-gpus 1"
    fake_train_net(monkeypatch, tool, 1, log=f"[12/02 10:00:00] starting\n{why}\n")
    preset = Preset.load(write_preset(tmp_path))
    assert tool.run_cell(preset, preset.cells()[0], 0, str(tmp_path), {})["error"] == why
    write_report(str(tmp_path), "sweep")
    assert f"- batch_size, GN, 1 images/GPU, seed 1: failed: {why}" in (tmp_path / "results.md").read_text()


def test_a_relative_output_holds_the_runs_and_a_changed_preset_runs_its_cells_again(tmp_path, monkeypatch, capsys):
    tool = load_tool("run_experiments")
    commands = fake_train_net(monkeypatch, tool, 0)
    monkeypatch.setattr(tool, "final_metrics", lambda path: {"segm/AP": 1.0, "bbox/AP": 2.0})
    path = write_preset(tmp_path)
    monkeypatch.chdir(tmp_path)  # the runs start in the repository: a relative --output must not land there
    assert tool.main(["--preset", path, "--output", "sweep"]) == 0
    record = json.loads((tmp_path / "sweep" / "batch_size" / "GN_ims1_seed1" / "cell.json").read_text())
    assert record["status"] == "ok" and not os.path.exists(os.path.join(REPO, "sweep"))
    assert commands[0][commands[0].index("OUTPUT_DIR") + 1] == str(tmp_path / "sweep" / "batch_size/GN_ims1_seed1")
    assert tool.main(["--preset", path, "--output", "sweep"]) == 0 and len(commands) == 1  # ended: kept
    assert "1 already done, 0 to run" in capsys.readouterr().out
    path = write_preset(tmp_path, lr_per_image=0.01)  # 0.001 before: the record is not of these settings
    assert tool.main(["--preset", path, "--output", "sweep"]) == 0 and len(commands) == 2
    assert "1 of them ended with other settings (config, GPUs or overrides) and run again" in capsys.readouterr().out
    record = json.loads((tmp_path / "sweep" / "batch_size" / "GN_ims1_seed1" / "cell.json").read_text())
    assert record["overrides"][record["overrides"].index("SOLVER.BASE_LR") + 1] == "0.01"


def test_a_relative_datasets_root_reaches_the_runs_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    preset = Preset.load(write_preset(tmp_path, dataset=None))
    tool = load_tool("run_experiments")
    for given, meant in (("data", tmp_path / "data"), ("~/d2", tmp_path / "home" / "d2")):
        monkeypatch.setenv("DETECTRON2_DATASETS", given)
        assert tool.prepare_dataset(preset) == {"DETECTRON2_DATASETS": str(meant)}


def test_a_cell_listed_twice_is_refused(tmp_path):
    path = write_preset(tmp_path, seeds=[1, 2, 1])
    with pytest.raises(ValueError, match=r"cell\(s\) batch_size/GN_ims1_seed1 come more than once .* list each once"):
        load_tool("run_experiments").checked_cells(Preset.load(path), path, ())


@pytest.mark.parametrize("returncode, status", [(1, "interrupted"), (0, "ok")])
def test_a_run_that_ends_after_the_sweep_stopped_it_has_not_ended_unless_it_finished(tmp_path, monkeypatch,
                                                                                       returncode, status):
    tool = load_tool("run_experiments")
    fake_train_net(monkeypatch, tool, returncode)  # 1: e.g. a launcher that turns SIGTERM into exit code 1
    monkeypatch.setattr(tool, "final_metrics", lambda path: {"segm/AP": 1.0})
    children = tool.Children()
    children.stop()
    monkeypatch.setattr(children, "start", lambda command, **kw: tool.subprocess.Popen(command, **kw))
    preset = Preset.load(write_preset(tmp_path))
    cell = preset.cells()[0]
    record = tool.run_cell(preset, cell, 0, str(tmp_path), {}, children)
    assert record["status"] == status and (tmp_path / cell.name / "cell.json").exists() == (status == "ok")
    if status == "interrupted":
        assert record["stopped_by"] == "the sweep stopped it (exit code 1)"


def test_a_cell_that_raises_stops_the_sweep_at_once(tmp_path, monkeypatch, capsys):
    tool = load_tool("run_experiments")
    path = write_preset(tmp_path, seeds=[1, 2, 3, 4])
    preset = Preset.load(path)
    cells = preset.cells()
    saw_the_stop = []

    def run_cell(preset, cell, order, out_dir, env, children):
        if cell == cells[1]:
            raise OSError(28, "No space left on device")
        deadline = time.time() + 10  # a run in progress, until the sweep stops it
        while not children.stopped and time.time() < deadline:
            time.sleep(0.01)
        saw_the_stop.append(children.stopped)
        return {"status": "interrupted", "stopped_by": "test"}

    monkeypatch.setattr(tool, "run_cell", run_cell)
    start = time.time()
    with pytest.raises(OSError, match="No space left"):
        tool.run_all(preset, cells, str(tmp_path / "out"), 2)
    assert saw_the_stop and all(saw_the_stop) and time.time() - start < 8  # not after the first cell's 10 s
    saw_the_stop.clear()
    assert tool.main(["--preset", path, "--output", str(tmp_path / "out"), "--jobs", "2"]) == 1
    assert "error: [Errno 28] No space left on device; the cells that ended are kept" in capsys.readouterr().err


def test_signals_ignored_from_the_start_stay_ignored():
    tool = load_tool("run_experiments")
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a command
    try:
        with tool.signals_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGHUP)  # a closed terminal: nohup's sweep goes on
                time.sleep(0.1)
            except KeyboardInterrupt:
                pytest.fail("SIGHUP stopped a sweep started with it ignored (under nohup)")
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def process_state(pid: int) -> str:
    """A process's state letter from /proc (R, S, Z for a zombie, ...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def ended(pid: int, timeout: float = 5) -> bool:
    """Whether a process is gone or a zombie within ``timeout`` s (a signalled process may take a moment to die)."""
    deadline = time.time() + timeout
    while process_state(pid) not in ("gone", "Z"):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_if_running(pid) -> None:
    """Kill a process a failing test left running (a training run would hold the cores for hours)."""
    if pid and process_state(pid) not in ("gone", "Z"):
        os.kill(pid, signal.SIGKILL)


def test_stopped_children_end_with_what_they_spawned_and_no_more_start():
    tool = load_tool("run_experiments")
    children = tool.Children()
    child = children.start(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    children.stop()
    child.stdout.close()
    try:
        assert child.returncode == -signal.SIGTERM
        assert ended(grandchild)  # its group was stopped, not just the process started
    finally:
        kill_if_running(grandchild)
    late = children.start(["sleep", "60"])
    if late:
        late.kill()
    assert late is None  # a cell starting as the sweep stops does not run


def test_a_cell_interrupted_while_its_record_is_written_has_not_ended(tmp_path, monkeypatch):
    tool = load_tool("run_experiments")
    fake_train_net(monkeypatch, tool, 0)
    monkeypatch.setattr(tool, "final_metrics", lambda path: {"segm/AP": 1.0})
    preset = Preset.load(write_preset(tmp_path))
    cell = preset.cells()[0]
    fail_writing(monkeypatch, "cell.json")
    with pytest.raises(OSError, match="No space left"):
        tool.run_cell(preset, cell, 0, str(tmp_path), {})
    assert sorted(os.listdir(tmp_path / cell.name)) == ["stdout.txt"]  # no cell.json, so the cell runs again


def train_net_of(run_dir: str, timeout: float) -> int:
    """The pid of the train_net process writing to ``run_dir``, once it has started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().decode().split("\0")
            except OSError:  # exited while listed
                continue
            if "tools/train_net.py" in " ".join(args) and run_dir in args:
                return int(pid)
        time.sleep(0.2)
    pytest.fail(f"no train_net run for {run_dir} after {timeout} s")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the train_net run in /proc")
@pytest.mark.parametrize("how", ["SIGTERM to the runner", "Ctrl-C"])
def test_an_interrupted_sweep_stops_its_run_and_records_nothing(tmp_path, how):
    path = write_preset(tmp_path, opts=TINY_SWEEP_OPTS, images_per_run=100_000)  # far more than the test waits
    out = tmp_path / "out"
    run_dir = out / "batch_size" / "GN_ims1_seed1"
    # Its own process group, as a terminal gives a command: Ctrl-C sends SIGINT to that group.
    runner = subprocess.Popen([sys.executable, "tools/run_experiments.py", "--preset", path, "--output", str(out)],
                              cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    train_net = None
    try:
        train_net = train_net_of(str(run_dir), timeout=120)
        if how == "Ctrl-C":
            os.killpg(runner.pid, signal.SIGINT)
        else:
            os.kill(runner.pid, signal.SIGTERM)
        stdout, stderr = runner.communicate(timeout=60)
        train_net_state = process_state(train_net)
    finally:
        runner.kill()
        kill_if_running(train_net)
    assert runner.returncode == 130, stdout + stderr
    assert "interrupted: 0 of 1 cells have ended" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert "batch_size/GN_ims1_seed1: interrupted (signal 15, SIGTERM); not recorded" in stdout
    assert train_net_state == "gone"  # stopped, and waited for by the runner
    assert os.listdir(run_dir) == ["stdout.txt"]  # no cell.json: the next sweep runs the cell again


@pytest.mark.parametrize("under", [False, True])
def test_an_output_that_is_a_file_is_refused_when_parsed(tmp_path, capsys, under):
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    output = str(a_file / "sweep" if under else a_file)
    with pytest.raises(SystemExit):
        load_tool("run_experiments").main(["--quick", "--output", output, "--dry-run"])
    error = capsys.readouterr().err
    assert f"--output {output}" in error and f"{a_file} is a file" in error


def ended_record(out_dir, variant="GN") -> str:
    """Write a cell.json as the runner does for one ended run; returns its path."""
    run_dir = os.path.join(out_dir, "batch_size", f"{variant}_ims1_seed1")
    os.makedirs(run_dir)
    record = {"experiment": "batch_size", "variant": variant, "ims_per_gpu": 1, "seed": 1, "order": 0,
              "status": "ok", "metrics": {"segm/AP": 10.0, "bbox/AP": 11.0}}
    with open(os.path.join(run_dir, "cell.json"), "w") as f:
        json.dump(record, f)
    return os.path.join(run_dir, "cell.json")


def test_an_unreadable_cell_record_is_named_with_what_to_do_before_a_sweep(tmp_path, capsys, monkeypatch):
    bad = ended_record(str(tmp_path))
    text = open(bad).read()
    open(bad, "w").write(text[: len(text) // 2])
    with pytest.raises(ValueError, match="delete it and run the preset again") as e:
        collect(str(tmp_path))
    assert bad in str(e.value)
    preset = write_preset(tmp_path)
    tool = load_tool("run_experiments")
    monkeypatch.setattr(tool, "run_all", lambda *args: pytest.fail("the sweep started"))
    for mode in (["--report-only"], []):
        assert tool.main(["--preset", preset, "--output", str(tmp_path), *mode]) == 1
        assert bad in capsys.readouterr().err


@pytest.mark.parametrize("failing", ["results.json", "results.md"])
def test_a_report_that_fails_to_write_leaves_the_previous_one(tmp_path, monkeypatch, failing):
    ended_record(str(tmp_path))
    write_report(str(tmp_path), "first")
    before = {name: (tmp_path / name).read_text() for name in ("results.json", "results.md")}
    fail_writing(monkeypatch, failing)
    with pytest.raises(OSError, match="No space left"):
        write_report(str(tmp_path), "second", {"machine": "another"})
    assert (tmp_path / failing).read_text() == before[failing]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("log, status", [("WARNING: No predictions from the model!\n", "ok"),
                                         ("evaluated\n", "failed")])
def test_a_run_that_predicts_nothing_scores_ap_0_and_the_report_says_so(tmp_path, monkeypatch, log, status):
    tool = load_tool("run_experiments")
    fake_train_net(monkeypatch, tool, 0, log=log)
    monkeypatch.setattr(tool, "final_metrics", lambda path: {"bbox/AP": float("nan")})  # Detectron2's, then
    preset = Preset.load(write_preset(tmp_path))
    cell = preset.cells()[0]
    record = tool.run_cell(preset, cell, 0, str(tmp_path), {})
    assert record["status"] == status
    assert tool.ended_as_set(str(tmp_path), preset, cell)  # not NaN, so kept by the next sweep
    write_report(str(tmp_path), "sweep")
    table = (tmp_path / "results.md").read_text()
    if status == "ok":  # COCO's AP of no detections, for box and mask AP
        assert record["metrics"] == {"segm/AP": 0.0, "bbox/AP": 0.0} and record["no_predictions"]
        assert "| GN | 1 | 1 | 0.0 (no predictions) | 0.0 (no predictions) |" in table
        assert "### Runs that predicted nothing" in table and "- batch_size, GN, 1 images/GPU, seed 1" in table
    else:  # NaN although it predicted: no result to report as one
        assert record["metrics"] == {} and "the evaluation gave AP NaN" in record["error"]
        assert "| GN | 1 | 1 | failed | failed |" in table and "### Runs that did not finish" in table


def test_a_record_of_ap_nan_from_an_older_runner_runs_again(tmp_path):
    record_path = ended_record(str(tmp_path))
    record = json.loads(open(record_path).read())
    record["metrics"] = {"bbox/AP": float("nan")}
    open(record_path, "w").write(json.dumps(record))
    preset = Preset.load(write_preset(tmp_path))
    assert load_tool("run_experiments").ended_as_set(str(tmp_path), preset, preset.cells()[0]) is None


def test_bars_leave_out_runs_without_a_result_and_say_why():
    from matplotlib.figure import Figure

    from gn_detection.report import _bar_plot

    def run(variant, status, ap):
        return {"experiment": "gn_placement", "variant": variant, "ims_per_gpu": 2, "seed": 1, "order": 0,
                "status": status, "metrics": {} if ap is None else {"segm/AP": ap}}

    rows = summarize([run("backbone", "ok", 5.0), run("+box head", "not buildable", None),
                      run("+mask head", "ok", 0.0)])
    ax = Figure().subplots()
    _bar_plot(ax, rows, "segm/AP")
    assert [(p.get_x() + p.get_width() / 2, p.get_height()) for p in ax.patches] == [(0, 5.0), (2, 0.0)]
    texts = {t.get_text(): t.get_position() for t in ax.texts}  # each bar's value, and why one has no bar
    assert sorted(texts) == ["0.0", "5.0", "not buildable"] and texts["not buildable"] == (1, 0)


def test_the_report_shows_the_presets_current_cells_and_says_what_it_leaves_out(tmp_path, monkeypatch, capsys):
    tool = load_tool("run_experiments")
    fake_train_net(monkeypatch, tool, 0)
    monkeypatch.setattr(tool, "final_metrics", lambda path: {"segm/AP": 1.0, "bbox/AP": 2.0})
    out = str(tmp_path / "out")
    assert tool.main(["--preset", write_preset(tmp_path, seeds=[1, 2]), "--output", out]) == 0
    path = write_preset(tmp_path, seeds=[1], lr_per_image=0.01)  # seed 2 removed, seed 1's LR changed
    assert tool.main(["--preset", path, "--output", out, "--report-only"]) == 1
    error = capsys.readouterr().err
    assert f"error: no ended runs of {path}'s cells under {out} (2 run(s) under {out} are not shown: " in error
    assert "1 of cells the preset no longer has; 1 of settings it no longer gives" in error
    assert tool.main(["--preset", write_preset(tmp_path, seeds=[1]), "--output", out, "--report-only"]) == 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"Note: 1 run(s) under {out} are not shown: 1 of cells the preset no longer has." in table
    assert "| GN | 1 | 1 | 1.0 | 2.0 |" in table  # seed 1 only
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [1] and results["left_out"].startswith("1 run(s)")


@pytest.mark.parametrize("change, message", [
    ({"num_gpus": 2}, "2 processes with MODEL.DEVICE cpu: Detectron2's trainer gives each process's model a GPU "
                      r"\(DistributedDataParallel device_ids\), so several processes need CUDA; on the CPU give "
                      "num_gpus: 1"),
    ({"opts": ["MODEL.GN.IMPL", "triton"]}, "MODEL.GN.IMPL triton runs its kernels on CUDA, but MODEL.DEVICE is cpu"),
])
def test_a_preset_train_net_would_refuse_on_its_device_is_refused_before_any_run(tmp_path, monkeypatch, capsys,
                                                                                   change, message):
    tool = load_tool("run_experiments")
    monkeypatch.setattr(run_checks, "_triton_interpreted", lambda: False)  # the tests run Triton interpreted
    path = write_preset(tmp_path, **change)
    assert tool.main(["--preset", path, "--output", str(tmp_path / "out"), "--dry-run"]) == 1
    error = capsys.readouterr().err
    assert re.match(f"error: {path}: {message}", error) and error.count("\n") == 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
