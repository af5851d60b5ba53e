"""tools/benchmark.py and gn_detection.benchmark on the CPU: tiny inputs, one timed iteration."""
import argparse
import json
import logging
import math
import re

import matplotlib.image
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, PolygonMasks
from detectron2.utils.events import EventStorage

from gn_detection import benchmark as bench
from gn_detection import host_work
from gn_detection.host_work import counting_host_work
from gn_detection.visualize import benchmark_figure

from .conftest import SHAPES_CONFIG, TINY_OVERRIDES, load_tool, make_cfg, run_tool

# Shrink the per-image work of every variant (Detectron2's R-50 ones included) to CPU-test size.
SMALL_WORK = ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
              "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "TEST.DETECTIONS_PER_IMAGE", 5]


def test_cli_measures_every_variant_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    result = run_tool(
        ["tools/benchmark.py", "--config-file", SHAPES_CONFIG, "--variants", "ours", "detectron2_gn", "frozen_bn",
         "ours:MODEL.GN.FUSE_RELU=False", "--images-per-gpu", "1", "2", "--precision", "fp32",
         "--input-size", "96", "128", "--boxes", "2", "--warmup", "0", "--iters", "1", "--output", str(out),
         *map(str, SMALL_WORK)],
        {},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["variant"], r["images_per_iter"]): r for r in report["rows"]}
    variants = ["ours", "detectron2_gn", "frozen_bn", "ours:MODEL.GN.FUSE_RELU=False"]
    assert set(rows) == {(v, n) for v in variants for n in (1, 2)}
    for row in rows.values():
        assert row["error"] is None and row["nonfinite_losses"] == 0
        assert row["train_images_per_s"] > 0 and row["peak_memory_gb"] > 0.1 and row["inference_s_per_image"] > 0
        assert row["peak_reserved_gb"] is None  # the CUDA allocator's; nothing on the CPU
        assert 0 <= row["inference_detections"] <= 5  # TEST.DETECTIONS_PER_IMAGE of SMALL_WORK
    for n in (1, 2):
        reference, ours = rows[("detectron2_gn", n)], rows[("ours", n)]
        assert reference["train_speedup"] == 1.0
        assert ours["train_speedup"] == pytest.approx(ours["train_images_per_s"] / reference["train_images_per_s"])
        assert ours["inference_speedup"] == pytest.approx(
            reference["inference_s_per_image"] / ours["inference_s_per_image"])
    lever = next(v for v in report["variants"] if v["name"].startswith("ours:"))
    assert lever["opts"][-2:] == ["MODEL.GN.FUSE_RELU", "False"] and lever["config_file"] == SHAPES_CONFIG
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] == torch.__version__
    for variant in variants:
        assert f"| {variant} | fp32 | 2 |" in result.stdout
    picture = matplotlib.image.imread(tmp_path / "bench.png")  # drawn beside the JSON
    assert picture.shape[0] > 400 and picture.shape[1] > 600


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path):
    # two pixel means give a model that builds (a 2-channel stem) but fails at run time on 3-channel images
    out = tmp_path / "bench.json"
    two_channels = "ours:MODEL.PIXEL_MEAN=[0.0,0.0],MODEL.PIXEL_STD=[1.0,1.0]"
    result = run_tool(
        ["tools/benchmark.py", "--config-file", SHAPES_CONFIG, "--variants", two_channels, "ours",
         "--images-per-gpu", "1", "--precision", "fp32", "--input-size", "96", "128", "--boxes", "2",
         "--warmup", "0", "--iters", "1", "--output", str(out), "--profile", str(tmp_path / "profiles"),
         *map(str, SMALL_WORK)],
        {"TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    failed, measured = json.loads(out.read_text())["rows"]
    assert "must match the size of tensor" in failed["error"] and failed["train_images_per_s"] is None
    assert measured["variant"] == "ours" and measured["error"] is None and measured["train_images_per_s"] > 0
    # --profile: a table for each measurement that ran, none for the failed ones
    profiles = {p.name: p.read_text() for p in (tmp_path / "profiles").iterdir()}
    assert set(profiles) == {"ours_fp32_1img_train.txt", "ours_fp32_inference.txt"}
    for text in profiles.values():
        peak = re.search(r"^peak memory of one step: ([\d.]+) GB above its start", text, re.M)
        rows = text[peak.end():].strip().splitlines()[3:] if peak else []
        assert peak and float(peak.group(1)) > 0.001 and rows and all(row.startswith("| 0.") for row in rows)
        times = re.match(r"per step \(3 steps, under the profiler\): ([\d.]+) ms wall, ([\d.]+) ms of CPU time in "
                         r"ops, 0\.0 ms of device time\n", text)
        assert times and float(times.group(1)) > 0 and float(times.group(2)) > 0 and "convolution" in text
    assert "1 measurement(s) failed" in result.stdout + result.stderr


def test_repeated_passes_rotate_the_variants_and_give_each_ratio_its_median_and_range(tmp_path):
    out = tmp_path / "bench.json"
    result = run_tool(
        ["tools/benchmark.py", "--config-file", SHAPES_CONFIG, "--variants", "ours", "detectron2_gn",
         "--images-per-gpu", "1", "--precision", "fp32", "--skip", "inference", "--repeats", "2",
         "--input-size", "96", "128", "--boxes", "2", "--warmup", "0", "--iters", "1", "--output", str(out),
         *map(str, SMALL_WORK)],
        {},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["variant"], r["repeat"]) for r in report["rows"]] == [
        ("ours", 0), ("detectron2_gn", 0), ("detectron2_gn", 1), ("ours", 1)]
    speed = {(r["variant"], r["repeat"]): r["train_images_per_s"] for r in report["rows"]}
    ratios = [speed[("ours", k)] / speed[("detectron2_gn", k)] for k in (0, 1)]  # each within its own pass
    ours = next(r for r in report["summary"] if r["variant"] == "ours")
    assert ours["passes"] == 2 and ours["failed_passes"] == 0
    assert ours["train_speedup"] == pytest.approx([sum(ratios) / 2, min(ratios), max(ratios)])
    assert ours["train_images_per_s"] == pytest.approx((speed[("ours", 0)] + speed[("ours", 1)]) / 2)
    assert "Over 2 passes:" in result.stdout and "| ours | fp32 | 1 | 2 |" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--device", "tpu0"], "--device 'tpu0' is not a device"),
        (["--device", "meta"], "--device meta: the benchmark runs on cpu or cuda"),
        (["--input-size", "0", "64"], "--input-size H W and --boxes must be >= 1"),
        (["--boxes", "-1"], "--boxes must be >= 1, got [800, 1216] and -1"),
        (["--task", "op", "--op-groups", "0"], "--op-groups 0 (>= 1)"),
        (["--task", "op", "--op-shape", "2", "0", "4"], "positive N C"),
        (["--skip", "train", "inference"], "leaves nothing to measure"),
        (["--task", "host", "--repeats", "2"], "--repeats 2: only the model task repeats its grid"),
        (["--variants", "ours", "frozen_bn", "ours"], "--variants names ours more than once"),
        (["--variants", "ours:MODEL.GN.EPS=0.001,MODEL.GN.NUM_GROUPS=16",
          "ours:MODEL.GN.NUM_GROUPS=16, MODEL.GN.EPS=0.001"],
         "--variants ours:MODEL.GN.EPS=0.001,MODEL.GN.NUM_GROUPS=16 and ours:MODEL.GN.NUM_GROUPS=16, "
         "MODEL.GN.EPS=0.001 are one variant (the same overrides in another order); give one"),
        (["--images-per-gpu", "1", "2", "1"], "--images-per-gpu names 1 more than once"),
        (["--precision", "fp32", "fp32"], "--precision names fp32 more than once"),
        (["MODEL.GN.NUM_GROUPS"], "the trailing overrides ['MODEL.GN.NUM_GROUPS'] are not KEY VALUE pairs"),
        (["MODEL.DEVICE", "cuda"], "every variant runs on --device; give that instead of MODEL.DEVICE"),
        (["--config-file", "c.yaml", "--variants", "frozen_bn"], "--config-file c.yaml is the config of ours and "
                                                                  "ours_stock_gn, and --variants has neither"),
        (["--config-file", "c.yaml", "--variants", "ourz"], "--variants: Unknown variant 'ourz' in 'ourz'"),
        (["--variants", "ours:MODEL.PIXEL_MEAN=[1.0,2.0"], "--variants: Variant 'ours:MODEL.PIXEL_MEAN=[1.0,2.0': "
                                                          "unbalanced brackets"),
        (["--variants", "ours:MODEL.GN.EPS=1,2"], "got '2' (trailing KEY VALUE pairs"),
        (["--output", ""], "--output '': give a file name"),
        (["--output", "{tmp}"], "give a file name for the JSON results"),
        (["--output", "{tmp}/run.png"], "the JSON cannot be a .png; give e.g. {tmp}/run.json"),
        (["--output", "{tmp}/a_file/run.json"], "cannot write in {tmp}/a_file"),
        (["--output", "{tmp}/new/"], "give a file name for the JSON results"),
        (["--output", "{tmp}/new/deeper/b.json", "--variants", "ours", "ours"], "more than once"),
    ],
)
def test_bad_requests_are_refused_before_any_work(args, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    args = [arg.format(tmp=tmp_path) for arg in args]
    output = [] if "--output" in args else ["--output", str(tmp_path / "b.json")]
    with pytest.raises(SystemExit) as exit_:
        load_tool("benchmark").parse_args(["--device", "cpu", *output, *args])
    assert exit_.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_summary_over_passes_leaves_failed_cells_out_of_the_statistics():
    cells = [bench.Cell("ours", "fp32", 2, train_images_per_s=3.0, peak_memory_gb=1.0, repeat=0),
             bench.Cell("detectron2_gn", "fp32", 2, train_images_per_s=2.0, peak_memory_gb=2.0, repeat=0),
             bench.Cell("detectron2_gn", "fp32", 2, train_images_per_s=1.0, peak_memory_gb=2.0, repeat=1),
             bench.Cell("ours", "fp32", 2, train_images_per_s=2.0, peak_memory_gb=1.5, repeat=1),
             bench.Cell("ours", "fp32", 2, error="out of memory", repeat=2),
             bench.Cell("detectron2_gn", "fp32", 2, train_images_per_s=9.0, peak_memory_gb=2.0, repeat=2)]
    ours, theirs = bench.summarize_repeats(bench.with_ratios(cells))
    assert (ours["variant"], ours["passes"], ours["failed_passes"]) == ("ours", 2, 1)
    assert ours["train_speedup"] == (1.75, 1.5, 2.0) and ours["train_images_per_s"] == 2.5
    assert ours["peak_memory_gb"] == 1.5 and ours["inference_speedup"] == (None, None, None)
    assert theirs["train_speedup"] == (1.0, 1.0, 1.0) and theirs["passes"] == 3
    table = bench.markdown_summary([ours, theirs])
    assert "| ours | fp32 | 2 | 2 (1 failed) | 2.50 | 1.75 (1.50–2.00) | 1.50 | – | – |" in table


def test_summary_over_passes_keeps_the_training_of_a_pass_whose_inference_failed():
    cells = [bench.Cell("ours", "fp32", 2, train_images_per_s=3.0, inference_s_per_image=0.1, repeat=0),
             bench.Cell("detectron2_gn", "fp32", 2, train_images_per_s=2.0, inference_s_per_image=0.2, repeat=0),
             bench.Cell("ours", "fp32", 2, train_images_per_s=4.0, error="inference: RuntimeError: ...", repeat=1),
             bench.Cell("detectron2_gn", "fp32", 2, train_images_per_s=2.0, inference_s_per_image=0.2, repeat=1)]
    ours, _ = bench.summarize_repeats(bench.with_ratios(cells))
    assert (ours["passes"], ours["failed_passes"]) == (1, 1)
    assert ours["train_speedup"] == (1.75, 1.5, 2.0) and ours["train_images_per_s"] == 3.5
    assert ours["inference_speedup"] == (2.0, 2.0, 2.0)


def model_row(variant, precision, images, speed, memory, inference, speedup=None, error=None):
    return {"variant": variant, "precision": precision, "images_per_iter": images, "train_images_per_s": speed,
            "peak_memory_gb": memory, "inference_s_per_image": inference, "train_speedup": speedup, "error": error}


def drawn_lines(ax):
    """{legend label: (x, y)} of the data lines an axis holds."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
            if not line.get_label().startswith("_")}


def test_the_picture_draws_each_variant_and_precision_with_what_each_cell_measured():
    rows = [model_row("ours", "fp32", 8, 4.0, 6.0, 0.5, 1.6), model_row("ours", "fp32", 2, 2.0, 2.0, 0.5, 1.25),
            model_row("detectron2_gn", "fp32", 2, 1.6, 3.0, None, 1.0, error="inference: out of memory"),
            model_row("detectron2_gn", "fp32", 8, None, None, 0.7, error="out of memory"),
            model_row("ours", "amp_fp16", 2, 3.0, 1.0, 0.25)]
    fig = benchmark_figure({"task": "model", "rows": rows, "machine": {"gpu": "GPU-X", "torch": "9.9"},
                            "settings": {"input_size": [800, 1216], "boxes": 7}})
    speed, ratio, memory, inference = fig.axes[:4]
    assert drawn_lines(speed) == {"ours, fp32": ([2, 8], [2.0, 4.0]), "detectron2_gn, fp32": ([2], [1.6]),
                                  "ours, amp_fp16": ([2], [3.0])}
    assert drawn_lines(memory) == {"ours, fp32": ([2, 8], [2.0, 6.0]), "detectron2_gn, fp32": ([2], [3.0]),
                                   "ours, amp_fp16": ([2], [1.0])}
    assert {bars.get_label(): (list(bars.lines[0].get_xdata()), list(bars.lines[0].get_ydata()))
            for bars in ratio.containers} == {"ours, fp32": ([2, 8], [1.25, 1.6]), "detectron2_gn, fp32": ([2], [1.0])}
    assert [bar.get_width() for bar in inference.patches] == [0.5, 0.7, 0.25]
    assert [t.get_text() for t in inference.get_yticklabels()] == ["ours, fp32", "detectron2_gn, fp32",
                                                                    "ours, amp_fp16"]
    assert speed.lines[0].get_color() == speed.lines[2].get_color() != speed.lines[1].get_color()  # a variant
    assert speed.lines[0].get_linestyle() == "-" and speed.lines[2].get_linestyle() == "--"  # fp32, AMP
    assert fig._suptitle.get_text() == "GPU-X · torch 9.9 · synthetic 800×1216, 7 boxes"


def test_the_picture_of_repeated_passes_draws_medians_with_each_ratios_range():
    summary = [{**model_row("ours", "fp32", 2, 2.5, 1.5, None, (1.75, 1.5, 2.0)), "passes": 2},
               {**model_row("frozen_bn", "fp32", 2, None, None, None, (None, None, None)), "passes": 0}]
    fig = benchmark_figure({"task": "model", "rows": [], "summary": summary, "settings": {"repeats": 3}})
    speed, ratio, _, inference = fig.axes[:4]
    assert drawn_lines(speed) == {"ours, fp32": ([2], [2.5])}  # a cell failed in every pass is left out
    (bars,) = ratio.containers
    assert list(bars.lines[0].get_ydata()) == [1.75]
    (segment,) = bars.lines[2][0].get_segments()
    assert [y for _, y in segment] == [1.5, 2.0]
    assert [t.get_text() for t in inference.texts] == ["inference not measured"]
    assert fig._suptitle.get_text().endswith("medians of 3 passes (memory: max)")


@pytest.mark.parametrize("report, message", [
    ({"task": "host", "rows": []}, "only the model task's results can be plotted, not the 'host' task's"),
    ({"task": "model", "rows": [model_row("ours", "fp32", 2, None, None, None, error="boom")]},
     "no measurement to plot"),
    ({"task": "model", "rows": [{"precision": "fp32", "images_per_iter": 2}]},
     "a cell lacks variant: not a tools/benchmark.py results file"),
    ([1, 2], "not a tools/benchmark.py results file (its JSON is a list)"),
    ("not json", "--replot {path}: Expecting value"),
    (None, "No such file or directory: '{path}'"),
])
def test_replot_redraws_a_run_or_names_the_file_it_cannot_draw(report, message, tmp_path, capsys):
    path = tmp_path / "run.json"
    if report is not None:
        path.write_text(report if isinstance(report, str) else json.dumps(report))
    assert load_tool("benchmark").main(["--replot", str(path)]) == 2
    assert message.format(path=path) in capsys.readouterr().err
    assert not (tmp_path / "run.png").exists()
    path.write_text(json.dumps({"task": "model", "rows": [model_row("ours", "fp32", 2, 2.0, 1.0, 0.5)]}))
    assert load_tool("benchmark").main(["--replot", str(path)]) == 0
    assert matplotlib.image.imread(tmp_path / "run.png").shape[1] > 600


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "resnet"], "Unknown variant 'resnet'"),
        (["--variants", "ours:MODEL.NOT_A_KEY=1"], "MODEL.NOT_A_KEY"),
        (["--variants", "ours:MODEL.GN.IMPL"], "KEY=VALUE"),
        (["--variants", "ours:MODEL.DEVICE=cuda"], "every variant runs on --device; give that instead"),
        (["--variants", "detectron2_gn", "ours:MODEL.GN.NUM_GROUPS=7"],  # built on the meta device, not measured
         "mask_rcnn_R50_FPN_gn.yaml): its config and the overrides give a model that cannot be built: Cannot build"),
        (["--config-file", "missing.yaml"], "missing.yaml"),
        (["--num-gpus", "2"], "one device per process"),
        (["--iters", "0"], "--iters"),
        (["--dataset", "shapes_trian"],
         "Dataset 'shapes_trian' (--dataset) is not registered; did you mean shapes_train"),
        (["--task", "op", "--op-shape", "2", "30", "4", "4"], "divisible by --op-groups 32"),
        (["--profile", "/proc/gn_profiles"], "--profile /proc/gn_profiles: cannot write there"),
    ],
)
def test_cli_rejects_bad_requests_naming_what_is_wrong(args, message, tmp_path, capsys):
    try:  # in this process: the tool in a fresh one costs 6 s of imports (one case below runs it so)
        code = load_tool("benchmark").main([*args, "--output", str(tmp_path / "b.json")])
    except SystemExit as stop:  # the parser's refusals
        code = stop.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_the_cli_refuses_a_bad_request_in_one_line(tmp_path):
    # refused by the parser, and once the variants are built
    for args, message in ((["--iters", "0"], "--iters and --repeats must be >= 1"),
                          (["--variants", "ours:MODEL.NOT_A_KEY=1"], "error: variant ours:MODEL.NOT_A_KEY=1 (")):
        result = run_tool(["tools/benchmark.py", *args, "--output", str(tmp_path / "b.json")], {}, timeout=120)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr


def test_amp_on_a_cpu_without_fast_half_convolutions_is_warned_about(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "cpu_has_fast", lambda precision: False)
    assert "--precision amp_bf16 on this CPU" in bench.slow_precision_warning("cpu", ["fp32", "amp_bf16"])
    assert "--precision amp_fp16 amp_bf16 on" in bench.slow_precision_warning("cpu:0", ["amp_fp16", "amp_bf16"])
    assert bench.slow_precision_warning("cpu", ["fp32"]) is None
    assert bench.slow_precision_warning("cuda", ["amp_bf16", "amp_fp16"]) is None
    monkeypatch.setattr(bench, "cpu_has_fast", lambda precision: precision == "amp_bf16")
    assert bench.slow_precision_warning("cpu", ["amp_bf16"]) is None
    assert "--precision amp_fp16 on" in bench.slow_precision_warning("cpu", ["amp_bf16", "amp_fp16"])
    # the CLI says it before anything else (here the unknown key stops it once the variants are built)
    result = run_tool(["tools/benchmark.py", "--device", "cpu", "--precision", "amp_fp16", "--variants",
                       "ours:MODEL.NOT_A_KEY=1", "--output", str(tmp_path / "b.json")], {}, timeout=120)
    assert result.returncode == 2 and "MODEL.NOT_A_KEY" in result.stderr
    assert "--precision amp_fp16 on" in result.stdout + result.stderr  # with fast fp16 convolutions or without


def test_the_default_precisions_leave_cpu_autocast_out(tmp_path):
    parse = load_tool("benchmark").parse_args
    output = ["--output", str(tmp_path / "b.json")]
    assert parse(["--device", "cpu", *output]).precision == ["fp32"]
    assert parse(["--device", "cpu", "--precision", "amp_fp16", *output]).precision == ["amp_fp16"]


def test_a_cuda_request_is_checked_against_the_devices_there_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as far as the checks can tell
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    parse = load_tool("benchmark").parse_args
    output = ["--output", str(tmp_path / "b.json")]
    assert parse(["--device", "cuda:0", *output]).precision == ["fp32", "amp_fp16"]
    assert parse(["--device", "cuda", "--task", "op", *output]).device == "cuda"
    with pytest.raises(SystemExit):
        parse(["--device", "cuda:1", *output])
    assert "--device cuda:1: this machine has 1 CUDA device(s)" in capsys.readouterr().err


def test_each_amp_precision_asks_its_own_probe(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert bench.cpu_has_fast("amp_fp16") and not bench.cpu_has_fast("amp_bf16")
    assert bench.slow_precision_warning("cpu", ["amp_fp16", "amp_bf16"]).startswith("--precision amp_bf16 on")


def test_amp_fp16_on_the_cpu_is_warned_about_even_where_onednn_has_fp16(monkeypatch):
    # oneDNN's probe said yes on a Xeon with AVX512-FP16 and AMX, where fp16 trained 37x slower than fp32
    monkeypatch.setattr(bench, "cpu_has_fast", lambda precision: True)
    warning = bench.slow_precision_warning("cpu", ["fp32", "amp_fp16", "amp_bf16"])
    assert warning.startswith("--precision amp_fp16 on the CPU is often far slower than fp32 even where oneDNN")
    assert "149 ms" in warning and "amp_bf16 on this CPU" not in warning and "no fast path" not in warning
    assert bench.slow_precision_warning("cpu", ["fp32", "amp_bf16"]) is None
    assert bench.slow_precision_warning("cuda:0", ["amp_fp16"]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_says_to_use_the_cpu(tmp_path):
    result = run_tool(["tools/benchmark.py", "--device", "cuda"], {}, timeout=120)
    assert result.returncode == 2 and "--device cpu" in result.stderr


@pytest.mark.parametrize("name, selected", [("cuda", []), ("cuda:1", [1]), ("cpu", [])])
def test_only_an_indexed_cuda_device_is_made_current(name, selected, monkeypatch):
    # the default --device cuda has no index, and torch.cuda.set_device refuses an unindexed device
    tool = load_tool("benchmark")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device).index))
    tool.use_device(name)
    assert calls == selected


def test_op_task_times_eager_and_our_layer(tmp_path):
    out = tmp_path / "op.json"
    result = run_tool(["tools/benchmark.py", "--task", "op", "--op-shape", "2", "16", "24", "24", "--op-groups",
                       "4", "--op-dtype", "fp32", "--warmup", "1", "--iters", "3", "--output", str(out)], {})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["shape"] == [2, 16, 24, 24]
    for name in ("torch_eager", "ours"):
        assert report["results"][name]["ms"] > 0 and f"| {name} |" in result.stdout


def test_the_workload_is_told_and_a_long_cpu_run_is_warned_about(tmp_path):
    tool = load_tool("benchmark")
    args = tool.parse_args(["--device", "cpu", "--output", str(tmp_path / "b.json")])  # the defaults
    assert tool.workload(args, 3) == ("3 variant(s) x 1 precision(s) x 4 batch size(s) x 1 pass(es): 480 training "
                                      "steps of 1800 images and 120 inference calls, warm-up included")
    assert tool.cpu_time_warning(args, 3).startswith("on a CPU this is about 2.8 h of training steps alone")
    assert tool.cpu_time_warning(argparse.Namespace(**{**vars(args), "device": "cuda"}), 3) is None
    args = tool.parse_args(["--device", "cpu", "--output", str(tmp_path / "b.json"), "--skip", "train"])
    assert tool.workload(args, 3).endswith("0 training steps of 0 images and 120 inference calls, warm-up included")
    assert tool.cpu_time_warning(args, 3) is None
    args = tool.parse_args(["--device", "cpu", "--output", str(tmp_path / "b.json"), "--images-per-gpu", "2",
                            "--input-size", "320", "480", "--warmup", "1", "--iters", "3"])  # what it suggests
    assert tool.cpu_time_warning(args, 3) is None


def test_long_measurements_log_how_far_they_are(monkeypatch, caplog):
    caplog.set_level("INFO", logger=bench.logger.name)
    monkeypatch.setattr(bench, "PROGRESS_EVERY_S", 0.0)
    bench.median_seconds(lambda: None, "cpu", warmup=2, iters=3, label="ours fp32 2 img training")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["ours fp32 2 img training: warm-up 1/2", "ours fp32 2 img training: warm-up 2/2"]
    assert lines[2].startswith("ours fp32 2 img training: timed 1/3, median so far ")
    assert len(lines) == 5 and lines[-1].startswith("ours fp32 2 img training: timed 3/3")
    caplog.clear()
    bench.median_seconds(lambda: None, "cpu", warmup=2, iters=3)  # no label, no progress
    assert not caplog.records
    clock = iter(range(0, 1000, 20))  # each reading 20 s later: a report every other step at the 30 s default
    monkeypatch.setattr(bench, "PROGRESS_EVERY_S", 30.0)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.median_seconds(lambda: None, "cpu", warmup=4, iters=1, label="slow") == 20
    assert [r.getMessage() for r in caplog.records] == ["slow: warm-up 2/4", "slow: warm-up 4/4",
                                                        "slow: timed 1/1, median so far 20 s"]


def test_a_dataset_without_its_files_is_named_before_any_measurement(tmp_path):
    empty_root = tmp_path / "datasets"
    empty_root.mkdir()
    result = run_tool(["tools/benchmark.py", "--device", "cpu", "--dataset", "shapes_train", "--output",
                       str(tmp_path / "b.json")], {"DETECTRON2_DATASETS": str(empty_root)}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"Dataset 'shapes_train': its annotation file {empty_root}/shapes/annotations" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "b.json").exists()


def test_training_measurement_on_a_registered_dataset_under_cpu_autocast(tiny_shapes_root, tmp_path, monkeypatch,
                                                                         caplog):
    variant = bench.Variant("ours", SHAPES_CONFIG, tuple(TINY_OVERRIDES))
    cfg = bench.variant_config(variant, "cpu")
    assert cfg.SOLVER.BASE_LR == 0.0 and cfg.MODEL.WEIGHTS == ""
    batch = bench.dataset_batch(cfg, bench.dataset_records("tiny_shapes_train", 2), "tiny_shapes_train")
    assert len(batch) == 2 and batch[0]["image"].shape[1:] == (128, 128)
    cell = bench.measure_training(cfg, batch, "amp_bf16", warmup=0, iters=1)
    assert cell.images_per_iter == 2 and cell.train_images_per_s > 0 and cell.nonfinite_losses == 0
    # a profile that cannot be made costs only the profile, not the measurement
    monkeypatch.setattr(bench, "profile_table", lambda step, device: 1 / 0)
    cell = bench.measure_training(cfg, batch, "fp32", warmup=0, iters=1, profile_path=str(tmp_path / "p.txt"))
    assert cell.train_images_per_s > 0 and not (tmp_path / "p.txt").exists()
    assert "Could not write the profile" in caplog.text and "ZeroDivisionError" in caplog.text
    # nor does a failing memory table cost the timing table before it
    monkeypatch.undo()
    monkeypatch.setattr(bench, "peak_memory_table", lambda step, device: 1 / 0)
    bench.measure_training(cfg, batch, "fp32", warmup=0, iters=1, profile_path=str(tmp_path / "p.txt"))
    assert (tmp_path / "p.txt").read_text().startswith("per step (3 steps, under the profiler)")
    with pytest.raises(ValueError, match="has 48 images; the largest --images-per-gpu is 100"):
        bench.dataset_records("tiny_shapes_train", 100)
    polygons = bench.variant_config(variant, "cpu", ["INPUT.MASK_FORMAT", "polygon"])  # as Detectron2's configs
    with pytest.raises(ValueError, match=r"^--dataset 'tiny_shapes_train': 2 of 2 images have masks as RLE \(a dict "
                                         r"'segmentation'\), and INPUT.MASK_FORMAT is polygon, e.g. .*; set "
                                         r"INPUT.MASK_FORMAT bitmask$"):
        bench.dataset_batch(polygons, bench.dataset_records("tiny_shapes_train", 2), "tiny_shapes_train")
    boxes_only = [{**record, "annotations": [{k: v for k, v in a.items() if k != "segmentation"}
                                             for a in record["annotations"]]}
                  for record in bench.dataset_records("tiny_shapes_train", 2)]
    with pytest.raises(ValueError, match="^--dataset 'boxes': 2 of 2 images have annotations without a mask"):
        bench.dataset_batch(cfg, boxes_only, "boxes")


@pytest.mark.parametrize("threshold, detections", [(0.0, 5), (1.0, 0)])
def test_inference_counts_the_detections_that_pass_the_configs_score_threshold(threshold, detections):
    variant = bench.Variant("ours", SHAPES_CONFIG, tuple(TINY_OVERRIDES))
    cfg = bench.variant_config(variant, "cpu", ["TEST.DETECTIONS_PER_IMAGE", 5,
                                                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", threshold])
    image = bench.synthetic_batch(1, 96, 128, boxes=2, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)[0]
    seconds, found = bench.measure_inference(cfg, image, "fp32", warmup=0, iters=1)
    assert seconds > 0 and found == detections


def test_inference_keeps_the_configs_score_threshold():
    # issue 5's table ran Detectron2's configs as they are; a threshold of 0 would add a class-wise NMS over
    # every proposal x class to each model's inference time
    builtins = bench.builtin_variants(SHAPES_CONFIG)
    for name in ("detectron2_gn", "frozen_bn"):
        assert bench.variant_config(builtins[name], "cpu").MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.05
    assert (bench.variant_config(builtins["ours"], "cpu").MODEL.ROI_HEADS.SCORE_THRESH_TEST
            == make_cfg(SHAPES_CONFIG).MODEL.ROI_HEADS.SCORE_THRESH_TEST)


def test_frozen_batchnorm_is_calibrated_so_that_the_rpn_proposes_as_with_trained_weights():
    cfg = bench.variant_config(bench.builtin_variants(SHAPES_CONFIG)["frozen_bn"], "cpu", SMALL_WORK)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = bench.synthetic_batch(2, 256, 384, boxes=2, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)

    def proposals_per_image():
        with EventStorage(), torch.no_grad():
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, features, [item["instances"] for item in batch])
        return [len(p) for p in proposals]

    assert max(proposals_per_image()) < 20  # identity statistics: features near 1e4, boxes clipped to nothing
    assert bench.calibrate_frozen_batchnorm(model, batch) == 53  # stem, 16 blocks x 3, 4 shortcuts
    assert proposals_per_image() == [100, 100]  # RPN.POST_NMS_TOPK_TRAIN of SMALL_WORK
    gn_model = build_model(make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES))
    assert bench.calibrate_frozen_batchnorm(gn_model, batch) == 0


def memory_event(ts, addr, size, device=(0, -1), tid=1):
    return {"name": "[memory]", "ph": "i", "ts": ts, "tid": tid,
            "args": {"Addr": addr, "Bytes": size, "Device Type": device[0], "Device Id": device[1]}}


def span(name, ts, dur, tid=1, cat="cpu_op"):
    return {"name": name, "ph": "X", "cat": cat, "ts": ts, "dur": dur, "tid": tid}


def test_the_peak_is_found_with_what_is_alive_at_it_on_one_device():
    events = [memory_event(1, 1, 100), memory_event(2, 2, 50), memory_event(2.5, 4, 1000, device=(1, 0)),
              memory_event(2.6, 5, 3000, device=(1, 1)), memory_event(3, 1, -100), memory_event(4, 3, 120),
              memory_event(5, 9, -30), memory_event(6, 3, -120), span("aten::add", 0, 9)]  # 9: from before
    peak, alive = bench.allocations_alive_at_peak(events, bench.trace_device("cpu"))
    assert peak == 170 and sorted(e["args"]["Addr"] for e in alive) == [2, 3]
    peak, alive = bench.allocations_alive_at_peak(events, (1, 0))  # cuda:0, not cuda:1's 3000 bytes
    assert peak == 1000 and [e["args"]["Addr"] for e in alive] == [4]
    assert bench.trace_device("cuda:1") == (1, 1)


def test_allocations_are_placed_in_their_own_threads_ops():
    # on CUDA the backward runs in autograd's device thread while the main thread waits inside backward()
    forward = [span("aten::conv2d", 0, 10), span("aten::empty", 1, 1), span("nn.Module: Conv2d_3", 0, 10,
               cat="python_function"), span("detectron2/layers/wrappers.py(109): forward", 0, 10,
               cat="python_function"), span("torch/nn/functional.py(1): conv2d", 0.5, 9, cat="python_function")]
    backward = [span("gn_detection/benchmark.py(200): training_step", 20, 50, cat="python_function"),
                span("autograd::engine::evaluate_function: ConvolutionBackward0", 30, 5, tid=2)]
    allocations = [memory_event(1.5, 1, 100), memory_event(31, 2, 40, tid=2), memory_event(31, 3, 2, tid=3)]
    sites = bench.allocation_sites(forward + backward + allocations, allocations)
    assert sites == {("aten::conv2d", "Conv2d_3", "detectron2/layers/wrappers.py(109): forward"): 100,
                     ("autograd::engine::evaluate_function: ConvolutionBackward0", "", ""): 40, ("?", "", ""): 2}


class HoldsATemporary(torch.nn.Module):
    def forward(self, x):
        temporary = torch.ones(8 * 1024 * 1024)  # 33.6 MB, alive until the sum is taken
        return x + temporary.sum()


def test_peak_memory_table_names_the_op_module_and_line_that_hold_the_peak():
    model, x = HoldsATemporary(), torch.ones(4)
    text = bench.peak_memory_table(lambda: model(x), "cpu")
    peak = float(re.match(r"peak memory of one step: ([\d.]+) GB above its start", text).group(1))
    assert 0.0335 <= peak < 0.04
    top = text.splitlines()[3].split(" | ")
    assert top[0] == "| 0.034" and top[1] == "aten::ones" and top[2].startswith("HoldsATemporary")
    assert "test_benchmark.py" in top[3] and "forward" in top[3]


def test_synthetic_batch_has_boxes_inside_the_image_and_the_same_masks_in_both_formats():
    polygons, bitmasks = (bench.synthetic_batch(2, 80, 120, boxes=5, num_classes=3, mask_format=f)
                          for f in ("polygon", "bitmask"))
    for item, same in zip(polygons, bitmasks):
        assert item["image"].shape == (3, 80, 120) and item["image"].dtype == torch.uint8
        assert torch.equal(item["image"], same["image"])
        boxes = item["instances"].gt_boxes.tensor
        assert torch.equal(boxes, same["instances"].gt_boxes.tensor)
        assert torch.equal(item["instances"].gt_classes, same["instances"].gt_classes)
        assert len(boxes) == 5 and (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 120).all()
        assert (boxes[:, 3] <= 80).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        masks = same["instances"].gt_masks
        assert isinstance(item["instances"].gt_masks, PolygonMasks) and isinstance(masks, BitMasks)
        areas = item["instances"].gt_masks.area()
        for mask, area, (x0, y0, x1, y1) in zip(masks.tensor, areas.tolist(), boxes.tolist()):
            ys, xs = np.nonzero(mask.numpy())
            assert len(xs) and xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
            assert abs(len(xs) - area) <= 0.1 * area + 4  # the rasterized polygon is the polygon
            assert area == pytest.approx(math.pi * (x1 - x0) * (y1 - y0) / 4, rel=0.02)  # an ellipse in its box


@pytest.mark.parametrize("mask_format, masks_type", [("polygon", PolygonMasks), ("bitmask", BitMasks)])
def test_benchmark_inputs_follow_the_configs_mask_format(mask_format, masks_type):
    # "bitmask" gives each sampled proposal a full-size mask: 0.5 GB per 800x1216 image on the GPU
    cfg = make_cfg(SHAPES_CONFIG, "INPUT.MASK_FORMAT", mask_format)
    args = argparse.Namespace(dataset="", input_size=(64, 96), boxes=3)
    (item,) = load_tool("benchmark").inputs_for(cfg, args, 1)
    assert isinstance(item["instances"].gt_masks, masks_type) and len(item["instances"]) == 3


def test_peak_memory_sees_a_large_temporary_allocation_on_the_cpu():
    with bench.PeakMemory("cpu") as small:
        pass
    with bench.PeakMemory("cpu") as large:
        block = torch.ones(64 * 1024 * 1024)  # 256 MB
        del block
    assert large.bytes - small.bytes > 200e6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_cuda_sees_allocated_and_reserved_memory():
    with bench.PeakMemory("cuda") as peak:
        block = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        del block
    assert peak.reserved_bytes >= peak.bytes >= 256 * 1024 * 1024


def test_variant_overrides_reach_the_config():
    builtins = bench.builtin_variants(SHAPES_CONFIG)
    assert bench.variant_config(bench.parse_variant("ours:SOLVER.BASE_LR=0.02", builtins), "cpu").SOLVER.BASE_LR == 0.02
    variant = bench.parse_variant("ours:MODEL.GN.IMPL=torch,MODEL.GN.AUTOCAST_HALF=False", builtins)
    cfg = bench.variant_config(variant, "cpu", ["MODEL.GN.NUM_GROUPS", 16])
    assert (cfg.MODEL.GN.IMPL, cfg.MODEL.GN.AUTOCAST_HALF, cfg.MODEL.GN.NUM_GROUPS) == ("torch", False, 16)
    stock = bench.variant_config(builtins["ours_stock_gn"], "cpu")
    gn = stock.MODEL.GN
    assert (gn.IMPL, gn.FUSE_RELU, gn.AUTOCAST_HALF, gn.RECOMPUTE_OUTPUT) == ("torch", False, False, False)
    assert make_cfg(SHAPES_CONFIG).MODEL.GN.IMPL == "auto"


def test_variant_overrides_keep_a_lists_commas_and_drop_the_spaces_around_keys_and_values():
    builtins = bench.builtin_variants(SHAPES_CONFIG)
    variant = bench.parse_variant(" ours : MODEL.PIXEL_MEAN=[100.0,100.0, 100.0], MODEL.GN.EPS = 0.001,", builtins)
    assert variant.opts == ("MODEL.PIXEL_MEAN", "[100.0,100.0, 100.0]", "MODEL.GN.EPS", "0.001")
    cfg = bench.variant_config(variant, "cpu")
    assert (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.GN.EPS) == ([100.0, 100.0, 100.0], 0.001)
    assert bench.split_outside_brackets("A=(1,(2,3)),B={'x':1,'y':2},C=3") == ["A=(1,(2,3))", "B={'x':1,'y':2}", "C=3"]
    for unbalanced in ("A=[1,2", "A=1],B=[2"):
        with pytest.raises(ValueError, match="unbalanced brackets"):
            bench.split_outside_brackets(unbalanced)


def test_a_triton_variant_on_the_cpu_is_refused_before_any_measurement(monkeypatch, tmp_path, capsys):
    import gn_detection.triton_group_norm as triton_group_norm

    tool = load_tool("benchmark")
    args = ["--device", "cpu", "--config-file", SHAPES_CONFIG, "--variants", "ours", "ours:MODEL.GN.IMPL=triton",
            "--output", str(tmp_path / "b.json")]
    monkeypatch.setattr(triton_group_norm, "INTERPRETED", False)
    monkeypatch.setattr(tool, "run_models", lambda *a: pytest.fail("measured"))
    assert tool.main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"benchmark: error: variant ours:MODEL.GN.IMPL=triton ({SHAPES_CONFIG}): MODEL.GN.IMPL triton runs its "
        "kernels on CUDA, but MODEL.DEVICE is cpu (on the CPU only under TRITON_INTERPRET=1, for tests); set "
        "MODEL.GN.IMPL auto")
    monkeypatch.setattr(triton_group_norm, "INTERPRETED", True)  # the tests' interpreter runs them
    assert len(tool.prepare_variants(tool.parse_args(args))) == 2


def ratio_cells(*specs, repeat=0):
    """A training speed of 1, 2, 3... img/s for each spec, in one pass."""
    return [bench.Cell(spec, "fp32", 2, train_images_per_s=float(i + 1), repeat=repeat) for i, spec in enumerate(specs)]


def test_ratios_are_to_the_detectron2_gn_of_the_same_overrides_else_to_the_plain_one():
    bitmask = "INPUT.MASK_FORMAT=bitmask"
    cells = ratio_cells("detectron2_gn", f"detectron2_gn:{bitmask}", "ours", f"ours:{bitmask}",
                        f"ours:{bitmask},MODEL.GN.FUSE_RELU=False", "ours:MODEL.GN.FUSE_RELU=False",
                        f"ours:MODEL.GN.EPS=0.1, {bitmask}", f"detectron2_gn:{bitmask},MODEL.GN.EPS=0.1")
    rows = bench.with_ratios(cells)
    assert [(r["reference"], r["train_speedup"]) for r in rows] == [
        ("detectron2_gn", 1.0), (f"detectron2_gn:{bitmask}", 1.0), ("detectron2_gn", 3.0),
        (f"detectron2_gn:{bitmask}", 2.0), ("detectron2_gn", 5.0), ("detectron2_gn", 6.0),
        (f"detectron2_gn:{bitmask},MODEL.GN.EPS=0.1", 7 / 8), (f"detectron2_gn:{bitmask},MODEL.GN.EPS=0.1", 1.0)]
    table = bench.markdown_table(rows)
    assert table.endswith(f"\n\n× detectron2_gn: to the detectron2_gn with the row's overrides where the run has "
                          f"one, else to the plain detectron2_gn: ours:{bitmask} to detectron2_gn:{bitmask}; "
                          f"ours:MODEL.GN.EPS=0.1, {bitmask} to detectron2_gn:{bitmask},MODEL.GN.EPS=0.1")
    assert "× detectron2_gn:" not in bench.markdown_table(bench.with_ratios(ratio_cells("detectron2_gn", "ours")))


def test_a_run_whose_detectron2_gn_has_other_overrides_says_which_rows_get_no_ratio():
    tool = load_tool("benchmark")
    cells = ratio_cells("detectron2_gn:INPUT.MASK_FORMAT=bitmask", "ours", "frozen_bn:INPUT.MASK_FORMAT=bitmask")
    rows = bench.with_ratios(cells)
    assert [r.get("train_speedup") for r in rows] == [1.0, None, 3.0] and rows[1]["reference"] is None
    variants = [bench.Variant(c.variant, SHAPES_CONFIG) for c in cells]
    assert tool.unreferenced_warning(variants) == (
        "no ratio for ours: the run has no detectron2_gn with the same overrides and no plain detectron2_gn; add "
        "one to --variants for their ratios")
    assert tool.unreferenced_warning(variants[1:]) is None  # no detectron2_gn at all: nothing to compare with
    assert tool.unreferenced_warning([*variants, bench.Variant("detectron2_gn", SHAPES_CONFIG)]) is None


def test_the_table_of_several_passes_says_which_pass_each_row_is():
    rows = bench.with_ratios(ratio_cells("ours", "detectron2_gn") + ratio_cells("detectron2_gn", "ours", repeat=1))
    lines = bench.markdown_table(rows).splitlines()
    assert lines[0].startswith("| pass | model | precision |") and lines[1] == "|---" * 11 + "|"
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| 1", "ours"], ["| 1", "detectron2_gn"],
                                                             ["| 2", "detectron2_gn"], ["| 2", "ours"]]
    assert bench.markdown_table(rows[:2]).startswith("| model | precision |")  # one pass: no column


@pytest.mark.parametrize("device, summary, label", [
    ("cuda:0", False, "peak memory (GB allocated)"), ("cpu", False, "peak memory (GB, process peak RSS)"),
    ("cpu", True, "peak memory (GB, process peak RSS, max over passes)"), (None, False, "peak memory (GB)")])
def test_the_pictures_memory_axis_says_what_was_measured_on_the_device(device, summary, label):
    report = {"task": "model", "rows": [model_row("ours", "fp32", 2, 2.0, 1.0, 0.5)], "machine": {"device": device}}
    if summary:
        report["summary"] = [{**model_row("ours", "fp32", 2, 2.0, 1.0, 0.5), "passes": 2}]
    fig = benchmark_figure(report)
    assert fig.axes[2].get_ylabel() == label


def test_host_task_counts_ops_and_waits_by_model_part(tmp_path):
    out = tmp_path / "host.json"
    batched = "ours:MODEL.PROPOSAL_GENERATOR.NAME=BatchedRPN"
    result = run_tool(["tools/benchmark.py", "--task", "host", "--config-file", SHAPES_CONFIG, "--variants", "ours",
                       batched, "--images-per-gpu", "1", "2", "--precision", "fp32", "--input-size", "96", "128",
                       "--boxes", "2", "--output", str(out), *map(str, SMALL_WORK)],
                      {"TRITON_INTERPRET": "0"})  # what a CPU user runs: Detectron2's NMS, not the interpreter's
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["variant"], r["images_per_iter"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(v, n) for v in ("ours", batched) for n in (1, 2)}
    parts = ["backbone", "proposal_generator", "roi_heads", "other"]
    for row in rows.values():
        assert row["error"] is None and list(row["ops"]) == parts == list(row["waits"])
        assert all(row["ops"][part] > row["waits"][part] >= 0 for part in parts)
        assert row["waits"]["backbone"] == 0  # convs, GN and ReLUs never wait
    for n in (1, 2):
        ours, theirs = rows[(batched, n)], rows[("ours", n)]
        assert ours["ops"]["backbone"] == theirs["ops"]["backbone"]
        # BatchedRPN labels anchors without waiting, where Detectron2 waits several times per image
        assert ours["waits"]["proposal_generator"] < theirs["waits"]["proposal_generator"]
    assert rows[("ours", 2)]["ops"]["roi_heads"] > rows[("ours", 1)]["ops"]["roi_heads"]  # per-image work
    assert f"| {batched} | fp32 | 2 |" in result.stdout


def test_the_host_task_saves_after_every_cell(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    args = tool.parse_args(["--device", "cpu", "--task", "host", "--images-per-gpu", "1", "2", "--output",
                            str(tmp_path / "b.json")])
    parts = host_work.COUNTED_PARTS
    counts = iter([{"ops": dict.fromkeys(parts, 3), "waits": dict.fromkeys(parts, 1)}, RuntimeError("out of memory")])

    def count(cfg, batch, precision):
        outcome = next(counts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(tool.bench, "count_host_work", count)
    saved = []
    variants = {bench.Variant("ours", SHAPES_CONFIG): (None, [None, None])}
    report = tool.run_host(args, variants, tool.logging.getLogger("test"),
                           lambda r: saved.append(json.loads(json.dumps(r))))  # as written at that moment
    assert [len(r["rows"]) for r in saved] == [1, 2] and saved[-1] == report
    assert saved[0]["rows"][0]["ops"]["backbone"] == 3 and "RuntimeError: out of memory" in report["rows"][1]["error"]


def test_host_work_counts_the_ops_that_make_a_gpu_host_wait():
    x = torch.arange(6.0)
    with counting_host_work(torch.nn.Module()) as counter:
        y = x * 2 + 1  # two ops, no wait
        y[torch.tensor([1, 3])] = 0.0  # indices: no wait
        kept = y[y > 4]  # a boolean mask: a nonzero
        total = y.sum().item()  # a host value
    assert kept.tolist() == [5.0, 9.0, 11.0] and total == 26.0
    assert counter.waits["other"] == 2 and counter.ops["other"] > 6


def test_host_work_counts_blocking_copies_between_host_and_device_only():
    meta = torch.device("meta")  # stands for a device here: a copy across is a wait unless non_blocking
    host = torch.zeros(3)
    to_device = torch.ops.aten._to_copy.default
    assert host_work.makes_host_wait(to_device, (host,), {"device": meta})
    assert not host_work.makes_host_wait(to_device, (host,), {"device": meta, "non_blocking": True})
    assert not host_work.makes_host_wait(to_device, (host,), {"device": torch.device("cpu")})
    assert not host_work.makes_host_wait(to_device, (host,), {"dtype": torch.float16})
    copy = torch.ops.aten.copy_.default
    assert host_work.makes_host_wait(copy, (host, torch.zeros(3, device=meta)), {})
    assert not host_work.makes_host_wait(copy, (host, torch.zeros(3, device=meta), True), {})
    assert not host_work.makes_host_wait(copy, (host, torch.zeros(3)), {})


def test_host_work_goes_to_the_model_part_whose_forward_runs():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.roi_heads = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.roi_heads(self.backbone(x)).nonzero()

    model = Model()
    with counting_host_work(model) as counter:
        model(torch.ones(2, 3))
    assert counter.ops["backbone"] > 0 and counter.ops["roi_heads"] > 0 and counter.ops["proposal_generator"] == 0
    assert counter.waits == {"other": 1}  # the nonzero, after the parts' forwards
    assert not model.backbone._forward_hooks and not model.backbone._forward_pre_hooks  # hooks removed


def test_an_error_is_whole_in_the_json_and_cut_visibly_in_the_table():
    text = bench.error_text(ValueError("MODEL.GN.NUM_GROUPS=7 does not divide " + "x" * 200 + " 64 channels\nmore"))
    assert text.endswith("64 channels") and text.startswith("ValueError: MODEL.GN.NUM_GROUPS=7")
    assert bench.brief(text) == text[:159] + "…" and bench.brief("short") == "short"


def test_a_rerun_keeps_the_earlier_results_until_it_ends_and_ctrl_c_says_where_its_cells_are(tmp_path, monkeypatch,
                                                                                           capsys, caplog):
    tool = load_tool("benchmark")
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    out.write_text('{"rows": ["an earlier run"]}')
    picture.write_bytes(b"an earlier run's picture")
    monkeypatch.setattr(tool, "prepare_variants", lambda args: {})

    def interrupted(args, variants, logger, save):
        save({"rows": ["cell 1"]})
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "run_models", interrupted)
    assert tool.main(["--device", "cpu", "--output", str(out)]) == 130
    incomplete = tmp_path / "bench.incomplete.json"
    assert f"interrupted; what it measured is in {incomplete}, and {out} is as it was" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"] == ["an earlier run"]
    assert json.loads(incomplete.read_text())["rows"] == ["cell 1"]

    def every_cell_failed(args, variants, logger, save):
        save({"rows": []})
        return {"rows": [], "table": "(no cells)"}  # nothing to draw: the earlier picture would be all there is

    monkeypatch.setattr(tool, "run_models", every_cell_failed)
    monkeypatch.setattr(logging.getLogger("gn_detection.benchmark"), "propagate", True)
    assert tool.main(["--device", "cpu", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["rows"] == [] and not incomplete.exists()
    assert not picture.exists() and f"(removed the earlier run's {picture})" in caplog.text


def test_an_interrupted_rerun_never_passes_an_earlier_runs_cells_off_as_its_own(tmp_path, monkeypatch, capsys):
    tool = load_tool("benchmark")
    out, incomplete = tmp_path / "bench.json", tmp_path / "bench.incomplete.json"
    earlier = json.dumps({"rows": ["an earlier interrupted run's cell"]})
    incomplete.write_text(earlier)
    monkeypatch.setattr(tool, "prepare_variants", lambda args: {})
    saves = []

    def interrupted(args, variants, logger, save):
        for report in saves:
            save(report)
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "run_models", interrupted)
    assert tool.main(["--device", "cpu", "--output", str(out)]) == 130  # before its first cell ended
    assert (f"interrupted; nothing was measured ({incomplete} is an earlier run's, left as it was), and {out} is "
            "as it was") in capsys.readouterr().err
    assert incomplete.read_text() == earlier and not out.exists()
    saves.append({"rows": ["cell 1"]})  # after its first cell: its own file replaces the earlier one
    assert tool.main(["--device", "cpu", "--output", str(out)]) == 130
    assert f"interrupted; what it measured is in {incomplete}, and" in capsys.readouterr().err
    assert json.loads(incomplete.read_text())["rows"] == ["cell 1"]
    incomplete.unlink()
    saves.clear()
    assert tool.main(["--device", "cpu", "--output", str(out)]) == 130
    assert "interrupted; nothing was measured, and" in capsys.readouterr().err


def test_a_dataset_is_loaded_once_for_every_variant(tiny_shapes_root, tmp_path):
    loads = []
    DatasetCatalog.register("load_counted_train", lambda: loads.append(1) or DatasetCatalog.get("tiny_shapes_train"))
    tool = load_tool("benchmark")
    args = tool.parse_args(["--device", "cpu", "--dataset", "load_counted_train", "--config-file", SHAPES_CONFIG,
                            "--variants", "ours", "ours_stock_gn", "--images-per-gpu", "1", "2",
                            "--output", str(tmp_path / "b.json"), *map(str, TINY_OVERRIDES)])
    prepared = tool.prepare_variants(args)
    assert len(loads) == 1 and [len(batch) for _, batch in prepared.values()] == [2, 2]
