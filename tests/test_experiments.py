"""The experiment runner: its cell matrix, every variant building, and tiny end-to-end sweeps collected
into a table, JSON and plots."""
import json
import os

import pytest
import yaml
from torch import nn

from gn_detection.experiments import NORMS, Cell, Preset, build_error
from gn_detection.report import markdown_table, summarize

from .conftest import REPO, SHAPES_CONFIG, TINY_OVERRIDES, run_tool

PRESETS = ["experiments/quick.yaml", "experiments/cpu_ablations.yaml", "experiments/full.yaml"]


def load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_experiments", os.path.join(REPO, "tools", "run_experiments.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_preset_is_experiment_1_with_two_seeds():
    preset = Preset.load(os.path.join(REPO, "experiments/quick.yaml"))
    cells = preset.cells()
    assert {(c.variant, c.ims_per_gpu) for c in cells} == {(n, b) for n in ("GN", "BN", "FrozenBN") for b in (1, 2, 4, 8)}
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
    tool = load_tool()
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

    tool = load_tool()
    preset = Preset.load(os.path.join(REPO, "experiments/cpu_ablations.yaml"))
    found = {c.variant: gn_parts(build_model(tool.cell_config(preset, c))) for c in preset.cells(("gn_placement",))}
    assert found == {"backbone": {"backbone"}, "backbone+FPN": {"backbone", "FPN"},
                     "+box head": {"backbone", "FPN", "box_head"},
                     "+mask head": {"backbone", "FPN", "box_head", "mask_head"}}


def test_a_group_count_that_does_not_divide_is_reported_not_built():
    cell = Cell("groups", "G=3", 2, 1, ("MODEL.GN.NUM_GROUPS", 3))
    preset = Preset.load(os.path.join(REPO, "experiments/cpu_ablations.yaml"))
    error = build_error(load_tool().cell_config(preset, cell))
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
        "opts": [*TINY_OVERRIDES[:-4], "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64,
                 "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64, "DATALOADER.NUM_WORKERS", 0],
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
