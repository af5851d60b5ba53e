"""Training and evaluation end to end on the synthetic dataset, through Detectron2's trainer and
COCOEvaluator, as a user runs them (tools/train_net.py in a fresh process)."""
import importlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from gn_detection import model_zoo, run_checks, triton_group_norm
from gn_detection.config import load_config
from gn_detection.metrics_log import read_metrics
from gn_detection.shapes import SHAPE_CLASSES, split_paths

from .conftest import REPO, SHAPES_CONFIG, TINY_OVERRIDES, load_tool, run_tool

ITERS = 40


def train_net(datasets_root, output_dir, *extra, max_iter=ITERS):
    opts = [str(v) for v in TINY_OVERRIDES]
    return run_tool(
        ["tools/train_net.py", "--config-file", SHAPES_CONFIG, *extra, *opts, "OUTPUT_DIR", str(output_dir),
         "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "5",
         "SOLVER.CHECKPOINT_PERIOD", str(ITERS), "TEST.VIS_NUM_IMAGES", "2", "TEST.VIS_SCORE_THRESH", "0.0"],
        {"DETECTRON2_DATASETS": str(datasets_root)},
    )


def read_output_metrics(output_dir):
    return read_metrics(os.path.join(output_dir, "metrics.json"))


@pytest.fixture(scope="module")
def trained(tiny_shapes_root, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train")
    result = train_net(tiny_shapes_root, output_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir, result


def test_training_loss_falls(trained):
    output_dir, _ = trained
    rows = [row for row in read_output_metrics(output_dir) if "total_loss" in row]
    first, last = rows[0], rows[-1]  # medians over iterations 0-19 and 20-39
    # Seen over seeds 1-3: total falls to 0.68-0.85x, RPN classification to 0.13x. The box regression
    # loss may rise meanwhile: it grows with the foreground proposals the improving RPN supplies.
    assert last["total_loss"] < 0.9 * first["total_loss"], rows
    assert last["loss_rpn_cls"] < first["loss_rpn_cls"] / 3, rows
    assert last["loss_mask"] < first["loss_mask"], rows


def test_training_writes_checkpoint_logs_tensorboard_and_pictures(trained):
    output_dir, _ = trained
    files = os.listdir(output_dir)
    assert "model_final.pth" in files and "last_checkpoint" in files and "log.txt" in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert os.path.getsize(output_dir / "loss_curve.png") > 1000
    pictures = os.listdir(output_dir / "predictions")
    assert len(pictures) == 2 and all(p.endswith(".png") for p in pictures)
    log = (output_dir / "log.txt").read_text()
    assert "Loss curve:" in log and "Predictions: 2 images" in log


def test_evaluation_reports_box_and_mask_ap_from_coco_evaluator(trained):
    output_dir, result = trained
    final = [row for row in read_output_metrics(output_dir) if "bbox/AP" in row][-1]
    for task in ("bbox", "segm"):
        assert 0.0 <= final[f"{task}/AP"] <= 100.0 and f"{task}/AP50" in final and f"{task}/APs" in final
    assert "Evaluation results for segm" in result.stdout + result.stderr
    assert os.path.isfile(output_dir / "inference" / "coco_instances_results.json")


def test_eval_only_reproduces_the_trained_models_ap(trained, tiny_shapes_root, tmp_path):
    output_dir, _ = trained
    final = [row for row in read_output_metrics(output_dir) if "bbox/AP" in row][-1]
    result = train_net(tiny_shapes_root, tmp_path, "--eval-only", "MODEL.WEIGHTS", str(output_dir / "model_final.pth"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for task in ("bbox", "segm"):
        assert f"copypaste: {final[f'{task}/AP']:.4f}" in log
    assert "Loaded " in log and "missing 0, unused 0" in log  # through AtomicCheckpointer, which counts


def test_checkpoints_record_the_gn_settings_evaluating_or_resuming_them_needs(trained, tmp_path):
    output_dir, _ = trained
    assert torch.load(output_dir / "model_final.pth", weights_only=True)["settings"] == {
        "MODEL.GN.NUM_GROUPS": 8, "MODEL.GN.CHANNELS_PER_GROUP": 0, "MODEL.GN.EPS": 1e-5}  # TINY_OVERRIDES' 8 groups
    as_trained = [*(str(v) for v in TINY_OVERRIDES), "MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
    assert checked_config(tmp_path / "out", ["--eval-only"], as_trained)
    with pytest.raises(ValueError, match=f"^--eval-only: {output_dir}/model_final.pth was trained with "
                                         "MODEL.GN.NUM_GROUPS 8, but the config gives MODEL.GN.NUM_GROUPS 4: its GN "
                                         r"layers would compute other statistics from the same tensors \(no load "
                                         r"notices\). Add MODEL.GN.NUM_GROUPS 8 to the command$"):
        checked_config(tmp_path / "out", ["--eval-only"], [*as_trained, "MODEL.GN.NUM_GROUPS", "4"])
    shutil.copytree(output_dir, tmp_path / "resumed")
    with pytest.raises(ValueError, match="^--resume: .*model_final.pth was trained with MODEL.GN.EPS 1e-05, but the "
                                         "config gives MODEL.GN.EPS 0.001"):
        checked_config(tmp_path / "resumed", ["--resume"], [*as_trained[:-2], "MODEL.GN.EPS", "0.001"])


def test_eval_only_refuses_a_checkpoint_holding_python_objects(tiny_shapes_root, tmp_path):
    weights = tmp_path / "untrusted.pth"
    torch.save({"model": {}, "note": object()}, weights)
    result = train_net(tiny_shapes_root, tmp_path / "out", "--eval-only", "MODEL.WEIGHTS", str(weights))
    assert result.returncode == 1 and f"{weights}: refused to load" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()  # refused before any work


def test_resume_continues_from_the_last_checkpoint(trained, tiny_shapes_root, tmp_path):
    output_dir, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(output_dir, resumed)
    result = train_net(tiny_shapes_root, resumed, "--resume", max_iter=ITERS + 10)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"Loading from {resumed}/model_final.pth" in log and f"Starting training from iteration {ITERS}" in log
    # the first run's records (19, 39), then the resumed run's: one curve, with the new evaluation last
    rows = read_output_metrics(resumed)
    assert [r["iteration"] for r in rows if "total_loss" in r] == [19, 39, ITERS + 9]
    assert "bbox/AP" in rows[-1] and rows[-1]["iteration"] == ITERS + 10  # Detectron2 logs it after the last step


def test_a_training_image_that_is_gone_stops_the_run_with_one_line(tiny_shapes_root, tmp_path):
    shutil.copytree(tiny_shapes_root / "shapes", tmp_path / "data" / "shapes")
    os.remove(tmp_path / "data" / "shapes" / "train" / "000003.png")
    result = train_net(tmp_path / "data", tmp_path / "out", max_iter=1)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("error: DATASETS.TRAIN ('shapes_train',) cannot be trained on: ") and "000003.png" in last


@pytest.mark.parametrize("weights", ["gn-zoo://ImageNetPretrained/R-50-GN", "http://127.0.0.1:9/model_final.pth"])
def test_weights_that_cannot_be_downloaded_stop_the_run_with_one_line(tiny_shapes_root, tmp_path, monkeypatch,
                                                                      weights):
    for key, value in (("MIRROR", "http://127.0.0.1:9"), ("ALLOW_HTTP", "1"), ("RETRIES", "1"),
                       ("CACHE", str(tmp_path / "cache"))):  # port 9 (discard): nothing listens there
        monkeypatch.setenv(f"GN_DETECTION_{key}", value)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "fvcore"))  # where Detectron2 caches a plain URL's file
    result = train_net(tiny_shapes_root, tmp_path / "out", "MODEL.WEIGHTS", weights)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith(f"error: MODEL.WEIGHTS {weights}: ") and "refused" in last.lower()


@pytest.mark.parametrize("dicts, reason", [
    ([], "Dataset 'train_dicts_0' is empty!"),
    ([{"file_name": "a.png", "image_id": 1, "height": 8, "width": 8, "annotations": []}],
     "No valid data found in train_dicts_1."),  # Detectron2 leaves images without annotations out of training
])
def test_training_data_without_images_is_named_as_such(dicts, reason):
    name = f"train_dicts_{len(dicts)}"
    DatasetCatalog.register(name, lambda: dicts)
    train_net = load_tool("train_net")
    cfg = load_config(SHAPES_CONFIG, ["DATASETS.TRAIN", f"('{name}',)", "DATALOADER.NUM_WORKERS", 0])
    with pytest.raises(train_net.RunStopped, match=rf"^DATASETS.TRAIN \('{name}',\) cannot be trained on: "
                                                          + re.escape(reason)):
        train_net.Trainer.build_train_loader(cfg)


def test_training_classes_known_once_loaded_are_counted_before_the_first_iteration(tiny_shapes_root):
    json_file, image_root = split_paths(str(tiny_shapes_root / "shapes"), "train")
    register_coco_instances("shapes_as_coco_instances", {}, json_file, image_root)  # 4 classes, set when loaded
    train_net = load_tool("train_net")
    cfg = load_config(SHAPES_CONFIG, ["DATASETS.TRAIN", "('shapes_as_coco_instances',)", "DATALOADER.NUM_WORKERS", 0,
                                      "MODEL.ROI_HEADS.NUM_CLASSES", 3])
    with pytest.raises(train_net.RunStopped, match=r"^Dataset 'shapes_as_coco_instances' has 4 classes \(circle, "
                                                   r"square, triangle, star\) but MODEL.ROI_HEADS.NUM_CLASSES is 3"):
        train_net.Trainer.build_train_loader(cfg)
    DatasetCatalog.register("shapes_reversed", list)  # a test dataset, its classes known in this process
    MetadataCatalog.get("shapes_reversed").thing_classes = list(reversed(SHAPE_CLASSES))
    cfg = load_config(SHAPES_CONFIG, ["DATASETS.TRAIN", "('shapes_as_coco_instances',)", "DATASETS.TEST",
                                      "('shapes_reversed',)", "DATALOADER.NUM_WORKERS", 0])
    with pytest.raises(train_net.RunStopped, match=r"^Dataset 'shapes_reversed' \(DATASETS.TEST\) and "
                                                   r"'shapes_as_coco_instances' \(DATASETS.TRAIN\) list the same "
                                                   r"classes in another order"):
        train_net.Trainer.build_train_loader(cfg)


def test_training_records_without_boxes_masks_or_readable_images_are_named_before_the_first_iteration(tmp_path):
    box = {"bbox": [1, 1, 4, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    masked = {**box, "segmentation": [[1, 1, 5, 1, 5, 5]]}
    dicts = [{"file_name": str(tmp_path / f"{i}.png"), "image_id": i, "height": 8, "width": 8,
              "annotations": annotations} for i, annotations in enumerate([[masked], [masked, box], [box]])]
    for record in dicts:
        Image.new("RGB", (8, 8)).save(record["file_name"])
    DatasetCatalog.register("boxes_and_masks", lambda: dicts)
    MetadataCatalog.get("boxes_and_masks").thing_classes = ["thing"]
    train_net = load_tool("train_net")
    opts = ["DATASETS.TRAIN", "('boxes_and_masks',)", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", 0,
            "MODEL.ROI_HEADS.NUM_CLASSES", 1]
    with pytest.raises(train_net.RunStopped, match=r"^DATASETS.TRAIN \('boxes_and_masks',\): 2 of 3 images have "
                                                   r"annotations without a mask \(no or an empty 'segmentation'\), "
                                                   r"and MODEL.MASK_ON is True, e.g. .*1.png; .* or set "
                                                   r"MODEL.MASK_ON False"):
        train_net.Trainer.build_train_loader(load_config(SHAPES_CONFIG, opts))
    assert train_net.Trainer.build_train_loader(load_config(SHAPES_CONFIG, [*opts, "MODEL.MASK_ON", False]))
    del box["bbox"]  # in images 1 and 2; Detectron2's mapper reads it: a KeyError at such an image's iteration
    with pytest.raises(train_net.RunStopped, match=r"^DATASETS.TRAIN \('boxes_and_masks',\): 2 of 3 images have "
                                                   r"annotations without a box \('bbox'\), e.g. .*1.png; give"):
        train_net.Trainer.build_train_loader(load_config(SHAPES_CONFIG, [*opts, "MODEL.MASK_ON", False]))
    box["bbox"] = [1, 1, 4, 4]
    Image.new("I;16", (8, 8), 4000).save(dicts[2]["file_name"])  # read clipped to 8 bits: all white
    with pytest.raises(train_net.RunStopped, match=r"^DATASETS.TRAIN \('boxes_and_masks',\): .*2.png has PIL mode "
                                                   r"I;16 with values from 4000 to 4000"):
        train_net.Trainer.build_train_loader(load_config(SHAPES_CONFIG, [*opts, "MODEL.MASK_ON", False]))
    assert train_net.Trainer.build_train_loader(load_config(SHAPES_CONFIG, [*opts, "MODEL.MASK_ON", False,
                                                                            "DATASETS.CHECK_IMAGES", False]))


def test_rle_masks_read_as_polygons_are_named_before_the_first_iteration(tiny_shapes_root):
    train_net = load_tool("train_net")  # the shapes datasets hold RLE masks; Detectron2's configs read polygons
    cfg = load_config(SHAPES_CONFIG, ["DATASETS.TRAIN", "('tiny_shapes_train',)", "DATASETS.TEST", "()",
                                      "INPUT.MASK_FORMAT", "polygon"])
    with pytest.raises(train_net.RunStopped, match=r"^DATASETS.TRAIN \('tiny_shapes_train',\): 48 of 48 images "
                                                   r"have masks as RLE .* set INPUT.MASK_FORMAT bitmask$"):
        train_net.Trainer.build_train_loader(cfg)


@pytest.mark.parametrize("spoil, reason", [
    (lambda data: data["images"][0].pop("height"), "KeyError: 'height'; a record without that key? Detectron2's "
                                                   "loader reads it in every record of the dataset"),
    (lambda data: data["annotations"][0].update(category_id=99), "KeyError: \"Encountered category_id=99 but this id "
                                                                 "does not exist in 'categories' of the json file.\""),
])
def test_training_records_the_loader_finds_a_key_missing_in_are_named(tiny_shapes_root, tmp_path, spoil, reason):
    json_file, image_root = split_paths(str(tiny_shapes_root / "shapes"), "train")
    with open(json_file) as f:
        data = json.load(f)
    spoil(data)
    name = f"spoiled_{len(DatasetCatalog.list())}"
    (tmp_path / "spoiled.json").write_text(json.dumps(data))
    register_coco_instances(name, {}, str(tmp_path / "spoiled.json"), image_root)
    train_net = load_tool("train_net")
    cfg = load_config(SHAPES_CONFIG, ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"])
    with pytest.raises(train_net.RunStopped) as error:
        train_net.Trainer.build_train_loader(cfg)
    assert str(error.value) == f"DATASETS.TRAIN ('{name}',) cannot be trained on: {reason}"


def test_training_images_sharing_an_id_are_named_before_any_work(tiny_shapes_root, tmp_path):
    json_file, image_root = split_paths(str(tiny_shapes_root / "shapes"), "train")
    with open(json_file) as f:
        data = json.load(f)
    data["images"][1]["id"] = data["images"][0]["id"]  # two images, one id: their annotations go to one of them
    (tmp_path / "shared_ids.json").write_text(json.dumps(data))
    name = f"shared_ids_{len(DatasetCatalog.list())}"
    register_coco_instances(name, {}, str(tmp_path / "shared_ids.json"), image_root)
    assert len(DatasetCatalog.get(name)) == len(data["images"]) - 1  # what Detectron2 would train on
    with pytest.raises(ValueError) as error:
        checked_config(tmp_path / "out", [], ["DATASETS.TRAIN", f"('{name}',)"])
    assert str(error.value).startswith(f"Dataset '{name}' (DATASETS.TRAIN): {tmp_path / 'shared_ids.json'}: image id "
                                       f"{data['images'][0]['id']} is given to 2 images")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken, message", [
    ("training image", r"^DATASETS.TRAIN \('shapes_train',\) cannot be trained on: .*000003.png"),
    # the test dataset's classes are known to the launcher alone, as a register_coco_instances dataset's are
    ("test classes", r"^Dataset 'reversed_in_the_launcher' \(DATASETS.TEST\) and 'shapes_train' \(DATASETS.TRAIN\) "
                     r"list the same classes in another order"),
])
def test_unusable_training_data_in_a_run_of_several_processes_is_one_error(tiny_shapes_root, tmp_path, monkeypatch,
                                                                           broken, message):
    shutil.copytree(tiny_shapes_root / "shapes", tmp_path / "data" / "shapes")
    opts = [*(str(v) for v in TINY_OVERRIDES), "OUTPUT_DIR", str(tmp_path / "out")]
    if broken == "training image":
        os.remove(tmp_path / "data" / "shapes" / "train" / "000003.png")
    else:
        MetadataCatalog.get("reversed_in_the_launcher").thing_classes = list(reversed(SHAPE_CLASSES))
        opts += ["DATASETS.TEST", "('reversed_in_the_launcher',)"]
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))  # import gn_detection registers shapes_* there
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))  # the spawned workers import train_net by name
    train_net = importlib.import_module("train_net")
    args = train_net.default_argument_parser().parse_args(["--num-gpus", "2", "--dist-url", "auto"])
    # two CPU processes over gloo: checked_config refuses them, as Detectron2's trainer fails on them at
    # DistributedDataParallel, but the training data is loaded and checked (and fails) before that
    with pytest.raises(train_net.RunStopped, match=message):
        train_net.run(args, load_config(SHAPES_CONFIG, opts))


def test_a_test_image_found_damaged_after_training_is_named_and_resume_evaluates_again(tiny_shapes_root, tmp_path):
    shutil.copytree(tiny_shapes_root / "shapes", tmp_path / "data" / "shapes")
    image = tmp_path / "data" / "shapes" / "val" / "000002.png"
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) * 3 // 4])  # its header passes the check before training
    out = tmp_path / "out"
    result = train_net(tmp_path / "data", out, max_iter=2)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the run stopped: test image {image} cannot be used (OSError: image file is truncated); "
        f"replace it (or leave out its record); {out}/last_checkpoint names model_final.pth: add --resume to the "
        "command to continue from it")
    result = train_net(tmp_path / "data", tmp_path / "eval", "--eval-only", "MODEL.WEIGHTS",
                       str(out / "model_final.pth"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: test image {image} cannot be used (OSError: image file is truncated); replace it (or leave out its "
        "record) and evaluate again")
    image.write_bytes(whole)
    result = train_net(tmp_path / "data", out, "--resume", max_iter=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Evaluation results for segm" in result.stdout + result.stderr  # of the model trained before
    assert "bbox/AP" in read_output_metrics(out)[-1]


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_the_one_resume_continues_from(
        tiny_shapes_root, tmp_path, monkeypatch):
    train_net = load_tool("train_net")
    out = tmp_path / "out"
    cfg = load_config(SHAPES_CONFIG, [*TINY_OVERRIDES, "DATASETS.TRAIN", "('tiny_shapes_train',)", "DATASETS.TEST",
                                      "()", "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1,
                                      "OUTPUT_DIR", str(out)])
    real_save, saves = torch.save, []

    def full_disk_at_the_second(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3021312 vs 3021200")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_the_second)
    with pytest.raises(train_net.RunStopped) as error:
        train_net.main(default_argument_parser().parse_args([]), cfg)
    assert re.fullmatch(
        f"the run stopped: cannot save the checkpoint {out}/model_0000001.pth \\(RuntimeError: .* unexpected pos "
        r"3021312 vs 3021200; 0.0 MB written, [\d.]+ MB left free on its file system\); the checkpoints saved before, "
        r"and last_checkpoint, "
        rf"are as they were. Free space there .*; {out}/last_checkpoint names model_0000000.pth: add --resume to the "
        "command to continue from it", str(error.value)), str(error.value)
    assert sorted(p.name for p in out.glob("model_*")) == ["model_0000000.pth"]


def test_ctrl_c_in_training_says_which_checkpoint_resume_continues_from(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "tools/train_net.py", "--config-file", SHAPES_CONFIG, *(str(v) for v in TINY_OVERRIDES),
               "DATASETS.TEST", "()", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "100000",
               "SOLVER.CHECKPOINT_PERIOD", "2"]
    env = {**os.environ, "DETECTRON2_DATASETS": str(tiny_shapes_root)}
    with subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) as run:
        deadline = time.monotonic() + 300
        while not (out / "last_checkpoint").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 130, stderr[-3000:]
    saved = (out / "last_checkpoint").read_text()
    assert stderr.strip().splitlines()[-1] == (f"interrupted; {out}/last_checkpoint names {saved}: add --resume to "
                                                "the command to continue from it")
    train_net = load_tool("train_net")
    assert train_net.interrupted_note(str(tmp_path), eval_only=False).startswith(
        f"interrupted; no checkpoint in {tmp_path} yet (one is saved every SOLVER.CHECKPOINT_PERIOD iterations)")
    assert train_net.interrupted_note(None, eval_only=False) == ("interrupted while checking the settings and data; "
                                                                 "nothing was started")


def test_missing_coco_stops_at_once_naming_the_path(tmp_path):
    result = run_tool(
        ["tools/train_net.py", "--config-file", "configs/mask_rcnn_R50_FPN_gn.yaml", "MODEL.DEVICE", "cpu",
         "OUTPUT_DIR", str(tmp_path / "out")],
        {"DETECTRON2_DATASETS": str(tmp_path)},
    )
    assert result.returncode != 0
    assert f"{tmp_path}/coco/annotations/instances_train2017.json" in result.stderr
    assert "datasets/README.md" in result.stderr and "make demo" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


ON_GPUS = ["MODEL.DEVICE", "cuda"]  # several processes need CUDA
TINY_DATASETS = ["DATASETS.TRAIN", "('tiny_shapes_train',)", "DATASETS.TEST", "('tiny_shapes_val',)"]


def checked_config(out, flags, opts):
    """tools/train_net.py's checks (gn_detection.run_checks) of these flags and overrides, on the tiny shapes
    datasets."""
    args = default_argument_parser().parse_args(
        ["--config-file", SHAPES_CONFIG, *flags, *TINY_DATASETS, "OUTPUT_DIR", str(out), *opts])
    return run_checks.checked_config(args)


@pytest.mark.parametrize("flags, opts, message", [
    ([], ["MODEL.GN.NUM_GROUP", "16"], "Non-existent key: MODEL.GN.NUM_GROUP; give KEY VALUE pairs"),
    ([], ["MODEL.GN.NUM_GROUPS"], "Override list has odd length"),
    ([], ["MODEL.GN.NUM_GROUPS", "16", "--eval-only"], "overrides: --eval-only comes after the KEY VALUE pairs, "
                                                       "which take it for a key; give the flags"),
    ([], ["MODEL.GN.IMPL", "fast"], "MODEL.GN.IMPL must be one of ('auto', 'triton', 'torch'), got 'fast'"),
    ([], ["TEST.VIS_NUM_IMAGES", "-1"], "TEST.VIS_NUM_IMAGES must be >= 0"),
    ([], ["TEST.VIS_SCORE_THRESH", "1.5"], "TEST.VIS_SCORE_THRESH must be a score from 0 to 1, got 1.5"),
    ([], ["DATASETS.TEST", "('tiny_shapes_vla',)"], "Dataset 'tiny_shapes_vla' (DATASETS.TRAIN / DATASETS.TEST) is "
                                                    "not registered; did you mean tiny_shapes_val"),
    ([], ["MODEL.WEIGHTS", "missing.pth"], "MODEL.WEIGHTS missing.pth does not exist"),
    ([], ["MODEL.WEIGHTS", "s3://bucket/model.pth"], "MODEL.WEIGHTS s3://bucket/model.pth: no file there that "
                                                     "Detectron2's PathManager can read (no handler for s3://"),
    (["--eval-only"], ["MODEL.WEIGHTS", "http://127.0.0.1:9/model.pth"],  # nothing listens there
     "MODEL.WEIGHTS http://127.0.0.1:9/model.pth: "),
    ([], ["MODEL.WEIGHTS", "gn-zoo://ImageNetPretrained/R-50-G"], "'ImageNetPretrained/R-50-G' is not in the GN "
                                                                  "model zoo. Did you mean ImageNetPretrained/R-50-GN"),
    ([], ["MODEL.WEIGHTS", "gn-zoo://Detectron/scratch_e2e_mask_rcnn_R-50-FPN_3x_gn"], "published as results only"),
    ([], ["MODEL.GN.NUM_GROUPS", "7"], "cannot be built: Cannot build the ResNet stem "
                                       "(MODEL.RESNETS.STEM_OUT_CHANNELS=64): MODEL.GN.NUM_GROUPS=7 does not divide"),
    ([], ["MODEL.ROI_HEADS.NAME", "GNROIHeads"], "cannot be built: No object named 'GNROIHeads' found in "
                                                 "'ROI_HEADS' registry"),
    ([], ["MODEL.ROI_BOX_HEAD.NUM_CONV", "0", "MODEL.ROI_BOX_HEAD.NUM_FC", "0"],
     "cannot be built: conv_dims and fc_dims are both empty: the box head needs at least one conv or fc"),
    ([], ["MODEL.RPN.IOU_LABELS", "[0, 1]"],  # Detectron2's bare assert, named by its source line
     "cannot be built: `assert len(labels) == len(thresholds) - 1` failed in matcher.py, __init__()"),
    ([], ["MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res6']"], "cannot be built: in_features "
                                                                       "(MODEL.FPN.IN_FEATURES) must name some"),
    ([], ["SOLVER.REFERENCE_WORLD_SIZE", "3"],
     "SOLVER.IMS_PER_BATCH 4 is not a multiple of SOLVER.REFERENCE_WORLD_SIZE 3"),
    ([], ["MODEL.ROI_HEADS.NUM_CLASSES", "80"], "Dataset 'tiny_shapes_train' has 4 classes (circle, square, "
                                                "triangle, star) but MODEL.ROI_HEADS.NUM_CLASSES is 80"),
    ([], ["OUTPUT_DIR", "/proc/version/out"], "OUTPUT_DIR /proc/version/out: cannot write there (/proc/version is a "
                                              "file); give a writable folder"),
    ([], ["DATASETS.TEST", "('shapes_in_reverse',)"], "Dataset 'shapes_in_reverse' (DATASETS.TEST) and "
                                                       "'tiny_shapes_train' (DATASETS.TRAIN) list the same "
                                                       "classes in another order (class 0 is 'star' in one, 'circle'"),
    ([], ["DATASETS.TEST", "('dicts_without_classes',)"], "Dataset 'dicts_without_classes' (DATASETS.TEST) has "
                                                          "neither a json_file nor thing_classes"),
    ([], ["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD is 0; it must be >= 1"),
    ([], ["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER is 0; it must be >= 1"),
    ([], ["SOLVER.BASE_LR", "-1.0"], "SOLVER.BASE_LR is -1.0; it must be >= 0"),
    ([], ["INPUT.MIN_SIZE_TRAIN", "()"], "INPUT.MIN_SIZE_TRAIN is (); it must be at least one size"),
    (["--eval-only"], ["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS is -1; it must be >= 0"),
    ([], ["MODEL.DEVICE", "gpu"], "MODEL.DEVICE 'gpu' is not a device; give cpu, cuda or cuda:N"),
    ([], ["OUTPUT_DIR", ""], "OUTPUT_DIR is empty; give a folder"),
    (["--num-gpus", "0"], [], "--num-gpus 0, --num-machines 1, --machine-rank 0: give at least one GPU"),
    (["--machine-rank", "1"], [], "a rank from 0 to --num-machines - 1"),
    (["--eval-only"], ["DATASETS.TEST", "()"], "--eval-only with DATASETS.TEST () has nothing to evaluate"),
    (["--eval-only"], [], "--eval-only needs MODEL.WEIGHTS"),
    (["--eval-only", "--resume"], [], "--eval-only needs MODEL.WEIGHTS"),  # nothing to resume from
    (["--num-gpus", "2"], [], "several processes need CUDA; on the CPU give --num-gpus 1"),
])
def test_a_mistake_in_the_settings_is_named_before_any_work(tiny_shapes_root, tmp_path, flags, opts, message):
    if "dicts_without_classes" not in DatasetCatalog:  # evaluated after training, but its classes are unknown
        DatasetCatalog.register("dicts_without_classes", lambda: [{"file_name": "a.png", "image_id": 1}])
        image = str(tiny_shapes_root / "shapes" / "val" / "000000.png")
        DatasetCatalog.register("shapes_in_reverse", lambda: [{"file_name": image, "image_id": 1}])
        MetadataCatalog.get("shapes_in_reverse").thing_classes = list(reversed(SHAPE_CLASSES))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        checked_config(tmp_path / "out", flags, opts)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, opts", [
    ([], ["MODEL.WEIGHTS", "gn-zoo://ImageNetPretrained/R-50-GN"]),
    ([], ["MODEL.WEIGHTS", "gn-zoo://ImageNetPretrained/R-50-GN?matching_heuristics=True"]),  # as Detectron2 reads
    ([], ["MODEL.WEIGHTS", "https://example.com/model_final.pth"]),
    ([], ["MODEL.WEIGHTS", "catalog://ImageNetPretrained/FAIR/R-50-GN"]),
    ([], ["MODEL.WEIGHTS", "{out}/model.pth"]),
    ([], ["MODEL.WEIGHTS", "{out}/model.pth?matching_heuristics=True"]),  # Detectron2 drops the query to load it
    (["--resume"], ["MODEL.WEIGHTS", "missing.pth"]),  # OUTPUT_DIR's last checkpoint is loaded instead
    (["--eval-only", "--resume"], []),
    (["--eval-only", "--resume"], ["SOLVER.REFERENCE_WORLD_SIZE", "3"]),  # no training, no rescaling
    (["--num-gpus", "3"], ["SOLVER.REFERENCE_WORLD_SIZE", "3", "SOLVER.IMS_PER_BATCH", "2", *ON_GPUS]),  # its size
    (["--num-gpus", "2", "--num-machines", "2"],
     ["SOLVER.REFERENCE_WORLD_SIZE", "4", "SOLVER.IMS_PER_BATCH", "6", *ON_GPUS]),
    (["--num-gpus", "4", "--dist-url", "auto"], ON_GPUS),
    (["--num-gpus", "2", "--dist-url", "tcp://[::1]:{free_port}"], ON_GPUS),
    (["--num-gpus", "2", "--dist-url", "tcp://localhost:{free_port}"], ON_GPUS),
    ([], ["MODEL.DEVICE", "cuda:3"]),
])
def test_settings_detectron2_accepts_pass_the_checks(tiny_shapes_root, tmp_path, monkeypatch, flags, opts):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # for the multi-process cases' MODEL.DEVICE
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    out = tmp_path / "out"
    out.mkdir()
    save_tiny_checkpoint(out / "model.pth")  # --eval-only --resume loads it
    (out / "last_checkpoint").write_text("model.pth")
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))  # not listening: the port is free
        flags = [f.format(free_port=other.getsockname()[1]) for f in flags]
    assert checked_config(out, flags, [o.format(out=out) for o in opts]).OUTPUT_DIR == str(out)


@pytest.mark.parametrize("flags, opts, message", [
    (["--num-gpus", "4"], ON_GPUS, "--num-gpus 4, but 2 CUDA GPU(s) are visible; give --num-gpus 2 or fewer"),
    (["--num-gpus", "2"], ["MODEL.DEVICE", "cuda:1"], "MODEL.DEVICE cuda:1 with --num-gpus 2: each process runs on "
                                                      "the GPU of its rank; give MODEL.DEVICE cuda"),
    ([], ["MODEL.DEVICE", "cuda:2"], "MODEL.DEVICE cuda:2, but 2 CUDA GPU(s) are visible: give cuda:0 to cuda:1"),
    (["--num-gpus", "2", "--dist-url", "tcp://127.0.0.1:{port}"], ON_GPUS,
     "--dist-url tcp://127.0.0.1:{port}: port {port} is in use on this machine (another multi-GPU run?); give "
     "--dist-url auto"),
    (["--num-gpus", "2", "--dist-url", "tcp://localhost:{port}"], ON_GPUS, "port {port} is in use on this machine"),
    (["--num-gpus", "2", "--dist-url", "tcp://127.0.0.1:99999"], ON_GPUS,
     "--dist-url tcp://127.0.0.1:99999: its port is not a number from 1 to 65535"),
])
def test_gpus_and_ports_this_machine_cannot_give_are_named_before_any_work(tiny_shapes_root, tmp_path, monkeypatch,
                                                                           flags, opts, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with socket.socket() as other_run:  # listening on a port, as a running job's processes meet there
        other_run.bind(("127.0.0.1", 0))
        other_run.listen()
        port = other_run.getsockname()[1]
        with pytest.raises((ValueError, RuntimeError)) as error:
            checked_config(tmp_path / "out", [f.format(port=port) for f in flags], opts)
    assert message.format(port=port) in str(error.value)
    assert not (tmp_path / "out").exists()


def save_tiny_checkpoint(path, opts=(), leave_out="no such suffix"):
    """A checkpoint of the model checked_config's settings (and ``opts``) build, as training saves one, without
    the tensors whose names end in ``leave_out``."""
    cfg = load_config(SHAPES_CONFIG, [*TINY_DATASETS, *opts])
    state = build_model(cfg).state_dict()  # keeps its _metadata: torch fills in no BatchNorm counter it lacks
    for name in [name for name in state if name.endswith(leave_out)]:
        del state[name]
    torch.save({"model": state, "iteration": 1}, path)


def test_eval_only_refuses_weights_that_leave_tensors_at_random(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    other_classes = tmp_path / "three_classes.pth"
    save_tiny_checkpoint(other_classes, ["MODEL.ROI_HEADS.NUM_CLASSES", 3])  # the shapes datasets have 4
    with pytest.raises(ValueError) as error:
        checked_config(out, ["--eval-only"], ["MODEL.WEIGHTS", str(other_classes)])
    message = str(error.value)
    assert message.startswith(f"--eval-only: {other_classes} sets ") and "TEST.ALLOW_PARTIAL_WEIGHTS True" in message
    # the box predictor's class scores and box deltas and the mask predictor: weight and bias each
    assert " 6 would keep their random initialization" in message and "roi_heads.box_predictor" in message
    assert not out.exists()
    assert checked_config(out, ["--eval-only"], ["MODEL.WEIGHTS", str(other_classes),
                                                 "TEST.ALLOW_PARTIAL_WEIGHTS", "True"])
    same = tmp_path / "same.pth"
    save_tiny_checkpoint(same)
    assert checked_config(out, ["--eval-only"], ["MODEL.WEIGHTS", str(same)])
    assert checked_config(out, [], ["MODEL.WEIGHTS", str(other_classes)])  # training from it is fine-tuning
    out.mkdir()
    torch.save({"model": {}}, out / "model_0000009.pth")  # --resume takes OUTPUT_DIR's last checkpoint instead
    (out / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(ValueError, match=f"{out}/model_0000009.pth sets 0 of the model's"):
        checked_config(out, ["--eval-only", "--resume"], ["MODEL.WEIGHTS", str(same)])
    (out / "last_checkpoint").write_text("model_gone.pth")
    with pytest.raises(ValueError, match=f"--resume: {out}/last_checkpoint names {out}/model_gone.pth, which does "
                                         "not exist; restore that checkpoint, write the file name of another one "
                                         "into it, or give a new OUTPUT_DIR"):
        checked_config(out, ["--resume"], [])


def test_evaluating_a_zoo_entry_needs_the_settings_it_was_trained_with(tiny_shapes_root, tmp_path):
    weights = "gn-zoo://Detectron/e2e_mask_rcnn_R-50-FPN_2x_gn"  # Detectron's RoIAlign, unaligned
    with pytest.raises(ValueError, match=f"^MODEL.WEIGHTS {weights} is evaluated with MODEL.ROI_BOX_HEAD.POOLER_TYPE "
                                         "ROIAlign MODEL.ROI_MASK_HEAD.POOLER_TYPE ROIAlign, as it was trained"):
        checked_config(tmp_path / "out", ["--eval-only"], ["MODEL.WEIGHTS", weights])
    cfg = load_config(SHAPES_CONFIG, ["MODEL.WEIGHTS", weights, *model_zoo.lookup(weights).opts])
    run_checks.check_zoo_inference_settings(cfg)  # as model_zoo.get_config gives it
    run_checks.check_zoo_inference_settings(load_config(SHAPES_CONFIG, ["MODEL.WEIGHTS",
                                                                        "gn-zoo://ImageNetPretrained/R-50-GN"]))


def test_resume_refuses_checkpoints_without_a_last_checkpoint_rather_than_overwrite_them(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    checked_config(out, ["--resume"], [])  # nothing saved yet: starts from MODEL.WEIGHTS
    save_tiny_checkpoint(out / "model_final.pth")
    with pytest.raises(ValueError, match=f"^--resume: {out} holds checkpoints \\(model_final.pth\\) but no "
                                         f"{out}/last_checkpoint naming the one to continue from, so Detectron2 would "
                                         "start from MODEL.WEIGHTS and overwrite them; write"):
        checked_config(out, ["--resume"], [])
    (out / "last_checkpoint").write_text("model_final.pth")
    assert checked_config(out, ["--resume"], [])
    (out / "last_checkpoint").unlink()
    weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    assert checked_config(out, ["--eval-only", "--resume"], weights)  # evaluation overwrites no checkpoint
    (out / "model_final.pth").rename(out / "model_from_a_colleague.pth")  # a name Detectron2 never saves under
    assert checked_config(out, ["--resume"], [])


def test_gn_settings_are_compared_as_they_decide_the_layers():
    trained = {"MODEL.GN.NUM_GROUPS": 32, "MODEL.GN.CHANNELS_PER_GROUP": 16, "MODEL.GN.EPS": 1e-5}
    assert run_checks.settings_problem(trained, {**trained, "MODEL.GN.NUM_GROUPS": 8}) is None  # groups of 16 all
    assert run_checks.settings_problem(trained, {**trained, "MODEL.GN.CHANNELS_PER_GROUP": 0}).startswith(
        "was trained with MODEL.GN.CHANNELS_PER_GROUP 16, but the config gives MODEL.GN.CHANNELS_PER_GROUP 0")
    assert run_checks.settings_problem(None, trained) is None  # a checkpoint saved elsewhere records none


def test_weights_a_path_handler_cannot_tell_about_are_left_for_the_load(monkeypatch):
    def unreachable(path, **kwargs):
        raise ConnectionError("the store is down")

    monkeypatch.setattr(run_checks.PathManager, "isfile", unreachable)
    run_checks.check_weights("s3://bucket/model_final.pth")  # loading it will say


@pytest.mark.parametrize("tag", ["", b"\xff\xfe\x00", "folder"])
def test_a_last_checkpoint_that_names_no_checkpoint_is_named(tiny_shapes_root, tmp_path, tag):
    out = tmp_path / "out"
    out.mkdir()
    if tag == "folder":
        (out / "last_checkpoint").mkdir()
    else:
        (out / "last_checkpoint").write_bytes(tag.encode() if isinstance(tag, str) else tag)
    with pytest.raises(ValueError, match=f"^--resume: {out}/last_checkpoint names no checkpoint \\(empty, a folder or "
                                         f"not text\\); restore that checkpoint, write the file name of another "
                                         "one into it"):
        checked_config(out, ["--resume"], [])


def test_weights_that_are_a_folder_are_named(tiny_shapes_root, tmp_path):
    with pytest.raises(ValueError, match=f"MODEL.WEIGHTS {tmp_path} is a folder; give a checkpoint file in it"):
        checked_config(tmp_path / "out", [], ["MODEL.WEIGHTS", str(tmp_path)])


def test_resume_refuses_a_checkpoint_of_another_model(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_tiny_checkpoint(out / "model_0000009.pth", ["MODEL.ROI_BOX_HEAD.FC_DIM", 128])  # the settings changed since
    (out / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(ValueError, match=f"^--resume: {out}/model_0000009.pth sets .* e.g. roi_heads.box_head.fc1"
                                         ".* so training would not continue that run .* give a new OUTPUT_DIR"):
        checked_config(out, ["--resume"], [])
    save_tiny_checkpoint(out / "model_0000009.pth")
    assert checked_config(out, ["--resume"], [])


@pytest.mark.parametrize("flags", [[], ["--eval-only", "TEST.ALLOW_PARTIAL_WEIGHTS", "True"]])
def test_weights_that_cannot_be_read_are_named_before_training(tiny_shapes_root, tmp_path, flags):
    weights = tmp_path / "model.pth"
    weights.write_text("hello\n")  # e.g. an HTML error page saved under the checkpoint's name
    with pytest.raises(ValueError, match=f"^{weights}: not a readable checkpoint"):
        checked_config(tmp_path / "out", flags[:1], [*flags[1:], "MODEL.WEIGHTS", str(weights)])
    weights = tmp_path / "model.pkl"
    with open(weights, "wb") as f:  # Detectron2's .pkl format without its "__author__": read as another kind
        pickle.dump({"model": {"backbone.stem.conv1.weight": np.zeros(3)}}, f)
    with pytest.raises(ValueError, match=f"^MODEL.WEIGHTS {weights}: Unsupported type found in checkpoint"):
        checked_config(tmp_path / "out", flags[:1], [*flags[1:], "MODEL.WEIGHTS", str(weights)])
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_resume_cannot_read_is_named_with_how_to_continue_from_another(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_tiny_checkpoint(out / "model_0000009.pth")
    (out / "model_final.pth").write_bytes((out / "model_0000009.pth").read_bytes()[:1000])  # the last save, damaged
    (out / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(ValueError, match=f"^--resume: {out}/model_final.pth: not a readable checkpoint .* to continue "
                                         "from an earlier checkpoint, write its file name into last_checkpoint$"):
        checked_config(out, ["--resume"], [])
    (out / "last_checkpoint").write_text("model_0000009.pth")
    assert checked_config(out, ["--resume"], [])


def test_eval_only_accepts_weights_without_batchnorm_counters(tiny_shapes_root, tmp_path):
    weights = tmp_path / "older.pth"  # files saved before torch counted batches lack num_batches_tracked
    save_tiny_checkpoint(weights, ["MODEL.FPN.NORM", "BN"], leave_out=".num_batches_tracked")
    assert checked_config(tmp_path / "out", ["--eval-only"], ["MODEL.WEIGHTS", str(weights), "MODEL.FPN.NORM", "BN"])
    save_tiny_checkpoint(weights, ["MODEL.FPN.NORM", "BN"], leave_out=".running_var")  # these it does use
    with pytest.raises(ValueError, match="fpn_lateral2.norm.running_var"):
        checked_config(tmp_path / "out", ["--eval-only"], ["MODEL.WEIGHTS", str(weights), "MODEL.FPN.NORM", "BN"])


def test_evaluation_converts_a_dataset_without_json_anew(tmp_path):
    def one_image(name):
        return [{"file_name": str(tmp_path / f"{name}.png"), "image_id": 7, "height": 8, "width": 8,
                 "annotations": [{"bbox": [1, 1, 4, 4], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]}]

    DatasetCatalog.register("dicts_only_val", lambda: one_image("now"))
    MetadataCatalog.get("dicts_only_val").thing_classes = ["thing"]
    stale = tmp_path / "dicts_only_val_coco_format.json"  # an earlier run's conversion of other images
    stale.write_text(json.dumps({"images": [{"id": 1, "file_name": "then.png", "height": 8, "width": 8}],
                                 "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    load_tool("train_net").Trainer.build_evaluator(load_config(SHAPES_CONFIG), "dicts_only_val", str(tmp_path))
    assert [image["file_name"] for image in json.loads(stale.read_text())["images"]] == [str(tmp_path / "now.png")]


def test_pictures_that_cannot_be_written_are_a_warning(tmp_path, monkeypatch, caplog):
    train_net = load_tool("train_net")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_net, "draw_predictions", disk_full)
    monkeypatch.setattr(logging.getLogger("gn_detection"), "propagate", True)  # as before any setup_logger()
    cfg = load_config(SHAPES_CONFIG, ["OUTPUT_DIR", str(tmp_path), "TEST.VIS_NUM_IMAGES", 2])
    train_net.save_pictures(cfg, model=None, metrics_start=None)  # after evaluation: nothing to lose by stopping
    assert "No predictions: [Errno 28] No space left on device" in caplog.text


def test_a_loss_curve_that_cannot_be_drawn_leaves_the_predictions(tmp_path, monkeypatch, caplog):
    train_net = load_tool("train_net")
    monkeypatch.setattr(train_net, "draw_predictions", lambda model, cfg, dataset, out_dir, n, thresh: ["a.png"] * n)
    monkeypatch.setattr(logging.getLogger("gn_detection"), "propagate", True)
    (tmp_path / "metrics.json").write_text("")  # e.g. left by a run that stopped before its first losses
    cfg = load_config(SHAPES_CONFIG, ["OUTPUT_DIR", str(tmp_path), "TEST.VIS_NUM_IMAGES", 2])
    with caplog.at_level(logging.INFO, logger="gn_detection"):
        train_net.save_pictures(cfg, model=None, metrics_start=None)  # --eval-only: no loss curve to draw
        assert "loss curve" not in caplog.text.lower()
        train_net.save_pictures(cfg, model=None, metrics_start=0)
    assert "No loss curve: " in caplog.text
    assert f"Predictions: 2 images (ground truth | prediction) in {tmp_path / 'predictions'}" in caplog.text


def test_triton_gn_on_the_cpu_is_named_unless_interpreted(tiny_shapes_root, tmp_path, monkeypatch):
    assert checked_config(tmp_path / "out", [], ["MODEL.GN.IMPL", "triton"])  # the tests run the interpreter
    monkeypatch.setattr(triton_group_norm, "INTERPRETED", False)
    with pytest.raises(ValueError, match="MODEL.GN.IMPL triton runs its kernels on CUDA, but MODEL.DEVICE is cpu"):
        checked_config(tmp_path / "out", [], ["MODEL.GN.IMPL", "triton"])


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("MODEL:\n  GN: {NUM_GROUPS: 16\n")
    with pytest.raises(ValueError, match=f"{config}: not valid YAML"):
        load_config(str(config))


@pytest.mark.parametrize("text, held", [("", "nothing"), ("just a string\n", "a str"), ("- MODEL\n- GN\n", "a list")])
def test_a_config_file_that_holds_no_mapping_is_named(text, held, tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=f"{config}: a config must be a YAML mapping .* this file holds {held} "):
        load_config(str(config))
    child = tmp_path / "child.yaml"  # the same through _BASE_: the child is a mapping, its base is not
    child.write_text("_BASE_: empty.yaml\nMODEL:\n  GN:\n    NUM_GROUPS: 16\n")
    with pytest.raises(ValueError, match=f"{child}: each section .* _BASE_ must name a config file whose own"):
        load_config(str(child))


def test_a_section_left_empty_is_named_as_such(tmp_path):
    config = tmp_path / "commented.yaml"
    config.write_text("MODEL:\n#  GN:\n#    NUM_GROUPS: 16\nSOLVER:\n  BASE_LR: 0.01\n")
    with pytest.raises(ValueError, match=f"{config}: each section \\(e.g. MODEL:\\) must hold KEY: value pairs"):
        load_config(str(config))


def test_a_misspelled_key_in_a_config_file_is_named(tmp_path):
    config = tmp_path / "typo.yaml"  # yacs raises KeyError for a file's unknown key, AssertionError for an override's
    config.write_text(f"_BASE_: {os.path.abspath(SHAPES_CONFIG)}\nMODEL:\n  RESNETS:\n    DEPHT: 34\n")
    with pytest.raises(ValueError, match=f"^{config}: Non-existent config key: MODEL.RESNETS.DEPHT; a key must be"):
        load_config(str(config))


def test_a_value_of_another_type_than_the_default_is_named_with_what_to_write(tmp_path):
    config = tmp_path / "types.yaml"
    config.write_text(f"_BASE_: {os.path.abspath(SHAPES_CONFIG)}\nSOLVER:\n  MAX_ITER: ten\n")
    with pytest.raises(ValueError, match=f"^{config}: Type mismatch .* for config key: SOLVER.MAX_ITER; give the key "
                                         "a value of its default's type"):
        load_config(str(config))
    with pytest.raises(ValueError, match=r"^overrides: Type mismatch \(<class 'float'> vs. <class 'int'>\) .* "
                                         r"SOLVER.BASE_LR; .* \(a float is written with a point: 1.0, not 1\)$"):
        load_config(SHAPES_CONFIG, ["SOLVER.BASE_LR", "1"])


def test_a_key_set_to_null_is_named(tmp_path):
    config = tmp_path / "nulls.yaml"  # yacs takes null for any key; Detectron2 fails on it later, mid-run
    config.write_text(f"_BASE_: {os.path.abspath(SHAPES_CONFIG)}\nMODEL:\n  WEIGHTS: null\nDATASETS:\n  TEST: ~\n")
    with pytest.raises(ValueError, match=f"^{config}: MODEL.WEIGHTS, DATASETS.TEST set to null"):
        load_config(str(config))
    with pytest.raises(ValueError, match="^overrides: SOLVER.BASE_LR set to null .* give a value, or leave the key"):
        load_config(SHAPES_CONFIG, ["SOLVER.BASE_LR", "None"])
    assert load_config(SHAPES_CONFIG, ["SOLVER.WEIGHT_DECAY_BIAS", "None"]).SOLVER.WEIGHT_DECAY_BIAS is None  # default
    # Detectron2 reads None here: norm layers take SOLVER.WEIGHT_DECAY
    assert load_config(SHAPES_CONFIG, ["SOLVER.WEIGHT_DECAY_NORM", "None"]).SOLVER.WEIGHT_DECAY_NORM is None


def test_no_config_file_names_the_flag():
    with pytest.raises(FileNotFoundError, match="^--config-file: no such config file"):
        load_config("")


def test_a_mistake_stops_the_script_with_one_line(tmp_path):
    result = run_tool(["tools/train_net.py", "--config-file", "configs/shapes/missing.yaml"], {})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: configs/shapes/missing.yaml: no such config file; "
                                                       "give one such as configs/mask_rcnn_R50_FPN_gn.yaml")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_device_without_gpu_is_named(tmp_path, tiny_shapes_root):
    result = train_net(tiny_shapes_root, tmp_path, "MODEL.DEVICE", "cuda")
    assert result.returncode != 0 and "MODEL.DEVICE" in result.stderr and "MODEL.DEVICE cpu" in result.stderr


def test_prediction_pictures_of_files_sharing_a_name_are_kept_apart(tiny_shapes_root, tmp_path):
    from gn_detection.visualize import draw_predictions

    image = tiny_shapes_root / "shapes" / "val" / "000000.png"
    records = []
    for image_id, folder in enumerate(("a", "b"), 1):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "img.png")
        records.append({"file_name": str(tmp_path / folder / "img.png"), "image_id": image_id, "height": 128,
                        "width": 128, "annotations": []})
    DatasetCatalog.register("same_file_names", lambda: records)
    MetadataCatalog.get("same_file_names").thing_classes = ["circle", "square", "triangle", "star"]
    cfg = load_config(SHAPES_CONFIG, [str(v) for v in TINY_OVERRIDES])
    model = build_model(cfg)
    out = tmp_path / "pictures"
    assert draw_predictions(model, cfg, "same_file_names", str(out), 2, 0.5) == [str(out / "img.png"),
                                                                                   str(out / "img_2.png")]
    with pytest.raises(ValueError, match=r"num_images \(TEST.VIS_NUM_IMAGES\) must be an integer >= 0, got -1"):
        draw_predictions(model, cfg, "same_file_names", str(out), -1, 0.5)
    assert len(draw_predictions(model, cfg, "same_file_names", str(out), 1, np.float32(0.5))) == 1  # numpy's too
    for thresh in (50, "0.5"):  # a percentage, a string
        with pytest.raises(ValueError, match=r"score_thresh \(TEST.VIS_SCORE_THRESH\) must be a score from 0 to 1"):
            draw_predictions(model, cfg, "same_file_names", str(out), 1, thresh)
