"""COCO evaluation whose result files are replaced whole or not at all."""
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from gn_detection.evaluator import AtomicCOCOEvaluator

RESULT_FILES = ["coco_instances_results.json", "instances_predictions.pth"]


@pytest.fixture(scope="module")
def one_image_dataset(tmp_path_factory):
    image = str(tmp_path_factory.mktemp("images") / "a.png")
    DatasetCatalog.register("evaluated_once", lambda: [{
        "file_name": image, "image_id": 7, "height": 32, "width": 32,
        "annotations": [{"bbox": [4, 4, 20, 20], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]}])
    MetadataCatalog.get("evaluated_once").thing_classes = ["thing"]
    return "evaluated_once"


def evaluated(dataset, output_dir, score=0.9):
    evaluator = AtomicCOCOEvaluator(dataset, tasks=("bbox",), output_dir=str(output_dir), allow_cached_coco=False)
    evaluator.reset()
    predictions = Instances((32, 32), pred_boxes=Boxes(torch.tensor([[4.0, 4.0, 20.0, 20.0]])),
                            scores=torch.tensor([score]), pred_classes=torch.tensor([0]))
    evaluator.process([{"image_id": 7}], [{"instances": predictions}])
    return evaluator.evaluate()


def test_results_are_written_and_no_staging_folder_is_left(one_image_dataset, tmp_path):
    results = evaluated(one_image_dataset, tmp_path)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    files = os.listdir(tmp_path)
    assert set(RESULT_FILES) <= set(files) and not [f for f in files if f.startswith(".evaluating-")]


def test_an_evaluation_that_dies_leaves_the_earlier_results_as_they_were(one_image_dataset, tmp_path, monkeypatch):
    evaluated(one_image_dataset, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in RESULT_FILES}
    real = COCOEvaluator._eval_predictions

    def killed_after_writing(self, predictions, img_ids=None):
        real(self, predictions, img_ids)  # its files written, as far as Detectron2 goes
        raise KeyboardInterrupt

    monkeypatch.setattr(COCOEvaluator, "_eval_predictions", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        evaluated(one_image_dataset, tmp_path, score=0.5)  # other results: in place, they would differ
    assert {name: (tmp_path / name).read_bytes() for name in RESULT_FILES} == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".evaluating-")]


def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next(one_image_dataset, tmp_path):
    (tmp_path / ".evaluating-killed").mkdir()  # SIGKILL leaves it: no finally runs
    (tmp_path / ".evaluating-killed" / "instances_predictions.pth").write_bytes(b"half")
    evaluated(one_image_dataset, tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".evaluating-")]
