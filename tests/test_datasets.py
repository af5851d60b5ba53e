import io
import json
import logging
import os
import re
import runpy
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image
from PIL import Image, PngImagePlugin
from pycocotools import mask as mask_util

import gn_detection
from gn_detection.datasets import (NamingDatasetMapper, UnusableRecord, check_annotations, check_dataset_files,
                                   check_evaluation_datasets, check_images, check_num_classes, check_same_classes,
                                   coco_ground_truth_problem, image_problem, load_checked_coco_json)
from gn_detection.shapes import SHAPE_CLASSES, ShapesSplitSpec, draw_image, generate_split, split_paths

from .conftest import REPO


def test_images_are_deterministic_per_seed_and_differ_across_seeds_and_splits():
    spec = ShapesSplitSpec("train", 10, image_size=96)
    a, objects_a = draw_image(spec, 3)
    b, objects_b = draw_image(spec, 3)
    assert np.array_equal(a, b) and len(objects_a) == len(objects_b)
    assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(objects_a, objects_b))
    assert not np.array_equal(a, draw_image(ShapesSplitSpec("train", 10, image_size=96, seed=1), 3)[0])
    assert not np.array_equal(a, draw_image(ShapesSplitSpec("val", 10, image_size=96), 3)[0])


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="'test'"):
        ShapesSplitSpec("test", 3)


def test_split_is_valid_coco_with_varied_objects(tiny_shapes_root):
    json_file, image_dir = split_paths(str(tiny_shapes_root / "shapes"), "train")
    coco = json.load(open(json_file))
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    assert len(coco["images"]) == 48 and all(os.path.isfile(os.path.join(image_dir, im["file_name"]))
                                             for im in coco["images"])
    per_image = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
        x, y, w, h = ann["bbox"]
        assert ann["area"] > 0 and w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert mask_util.area(ann["segmentation"]) == ann["area"]
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4}
    assert max(len(v) for v in per_image.values()) > 1  # several objects per image occur
    areas = [a["area"] for a in coco["annotations"]]
    assert max(areas) > 4 * min(areas)  # sizes vary


def test_overlapping_objects_are_annotated_by_their_visible_part():
    spec = ShapesSplitSpec("train", 200, image_size=96)
    for index in range(200):
        _, objects = draw_image(spec, index)
        masks = [o["mask"] for o in objects]
        total = sum(m.astype(int) for m in masks) if masks else 0
        assert np.max(total) <= 1  # no pixel belongs to two instances
        assert all(m.sum() > 0 for m in masks)


def test_generate_split_skips_a_complete_split_and_regenerates_a_changed_one(tmp_path):
    spec = ShapesSplitSpec("val", 3, image_size=64)
    json_file = generate_split(str(tmp_path), spec, progress=False)
    stamp = os.stat(json_file).st_mtime_ns
    generate_split(str(tmp_path), spec, progress=False)
    assert os.stat(json_file).st_mtime_ns == stamp
    generate_split(str(tmp_path), ShapesSplitSpec("val", 4, image_size=64), progress=False)
    assert len(json.load(open(json_file))["images"]) == 4
    assert not os.path.exists(json_file + ".partial")
    generate_split(str(tmp_path), ShapesSplitSpec("val", 2, image_size=64), progress=False)
    assert sorted(os.listdir(tmp_path / "val")) == ["000000.png", "000001.png"]  # none left from the 4-image split


def test_registered_split_loads_through_detectron2(tiny_shapes_root):
    records = DatasetCatalog.get("tiny_shapes_val")
    assert len(records) == 12
    assert all(len(r["annotations"]) >= 1 for r in records)
    assert records[0]["annotations"][0]["segmentation"]["size"] == [128, 128]


@pytest.fixture
def copied_split(tiny_shapes_root, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes_root / "shapes", root)
    return split_paths(str(root), "val")


def test_malformed_json_error_names_the_file_and_position(copied_split):
    json_file, image_dir = copied_split
    text = open(json_file).read()
    open(json_file, "w").write(text[: len(text) // 2])
    with pytest.raises(ValueError) as e:
        load_checked_coco_json(json_file, image_dir, "broken")
    assert json_file in str(e.value) and "malformed annotation JSON" in str(e.value) and "line 1" in str(e.value)


def test_json_without_coco_keys_is_named(copied_split):
    json_file, image_dir = copied_split
    json.dump({"images": []}, open(json_file, "w"))
    with pytest.raises(ValueError, match="lacks the key"):
        load_checked_coco_json(json_file, image_dir, "broken")


def test_missing_image_error_names_the_image(copied_split):
    json_file, image_dir = copied_split
    os.remove(os.path.join(image_dir, "000005.png"))
    with pytest.raises(FileNotFoundError) as e:
        load_checked_coco_json(json_file, image_dir, "broken")
    assert os.path.join(image_dir, "000005.png") in str(e.value) and json_file in str(e.value)


def test_missing_coco_error_names_expected_path_readme_and_demo(tmp_path):
    # a dataset registered as Detectron2 registers its COCO splits: metadata with json_file and image_root only
    json_file = str(tmp_path / "coco" / "annotations" / "instances_train2017.json")
    register_coco_instances("coco_like_missing", {}, json_file, str(tmp_path / "coco" / "train2017"))
    with pytest.raises(FileNotFoundError) as e:
        check_dataset_files(["coco_like_missing"])
    message = str(e.value)
    assert "coco_like_missing" in message and json_file in message
    assert "$DETECTRON2_DATASETS/coco" in message and "datasets/README.md" in message and "make demo" in message


def test_a_class_count_other_than_the_datasets_is_named(tmp_path):
    gn_detection.register_shapes(str(tmp_path), prefix="counted_shapes")
    check_num_classes(["counted_shapes_train", "counted_shapes_val"], len(SHAPE_CLASSES))
    with pytest.raises(ValueError, match=r"Dataset 'counted_shapes_val' has 4 classes \(circle, square, triangle, "
                                         r"star\) but MODEL.ROI_HEADS.NUM_CLASSES is 80; set .*NUM_CLASSES 4$"):
        check_num_classes(["counted_shapes_val"], 80)
    register_coco_instances("classes_known_when_loaded", {}, str(tmp_path / "a.json"), str(tmp_path))
    check_num_classes(["classes_known_when_loaded"], 80)  # not read for this: no thing_classes until loaded


def test_test_classes_in_another_order_than_the_training_ones_are_named():
    for name, classes in (("trained_on", ["circle", "square", "star"]), ("tested_on", ["circle", "star", "square"]),
                          ("tested_on_fewer", ["circle"]), ("tested_alike", ["Circle", "Square", "Star"]),
                          ("tested_on_renamed", ["circle", "box", "star"])):
        DatasetCatalog.register(name, list)
        MetadataCatalog.get(name).thing_classes = classes
    register_coco_instances("classes_unknown_yet", {}, "a.json", ".")
    # the same classes in the same order (letter case aside), others (a count the class-count check sees, a renamed
    # class), and classes unknown yet pass
    check_same_classes(["classes_unknown_yet", "trained_on"],
                       ["tested_alike", "tested_on_fewer", "tested_on_renamed", "classes_unknown_yet"])
    check_same_classes(["classes_unknown_yet"], ["tested_on"])  # nothing known to compare with
    with pytest.raises(ValueError, match=r"^Dataset 'tested_on' \(DATASETS.TEST\) and 'trained_on' "
                                         r"\(DATASETS.TRAIN\) list the same classes in another order \(class 1 is "
                                         r"'star' in one, 'square' in the other\): the model's i-th class"):
        check_same_classes(["trained_on"], ["tested_alike", "tested_on"])


def test_annotations_detectron2_cannot_train_on_are_named():
    box = {"bbox": [1, 1, 4, 4], "category_id": 0}
    rle = {"size": [8, 8], "counts": "0`0"}
    crowd = [{"file_name": "a.png", "annotations": [{**box, "segmentation": rle, "iscrowd": 1},
                                                    {**box, "segmentation": [[1, 1, 5, 1, 5, 5]]}]}]
    check_annotations(crowd, "crowd", masks=True, training_format="polygon")  # training leaves crowds out, as COCO's
    bare_crowd = [{"file_name": "b.png", "annotations": [{"category_id": 0, "iscrowd": 1}, crowd[0]["annotations"][1]]}]
    check_annotations(bare_crowd, "bare", masks=True, training_format="bitmask")
    with pytest.raises(ValueError, match=r"^bare: 1 of 1 images have annotations without a box"):  # evaluation reads it
        check_annotations(bare_crowd, "bare", masks=True)
    rle_masks = [{"file_name": "c.png", "annotations": [{**box, "segmentation": rle}]}]
    check_annotations(rle_masks, "rle", masks=True, training_format="bitmask")
    check_annotations(rle_masks, "rle", masks=True)  # evaluation reads RLE
    with pytest.raises(ValueError, match=r"^rle: 1 of 1 images have masks as RLE \(a dict 'segmentation'\), and "
                                         r"INPUT.MASK_FORMAT is polygon, e.g. c.png; set INPUT.MASK_FORMAT bitmask$"):
        check_annotations(rle_masks, "rle", masks=True, training_format="polygon")
    check_annotations([{"file_name": "d.png", "annotations": [box]}], "boxes", masks=False)
    with pytest.raises(ValueError, match=r"^boxes: 1 of 1 images have annotations without a mask"):
        check_annotations([{"file_name": "d.png", "annotations": [box]}], "boxes", True, training_format="polygon")


def shapes_ground_truth(tiny_shapes_root):
    """The tiny shapes training split's COCO file, parsed (a valid ground truth to spoil)."""
    with open(split_paths(str(tiny_shapes_root / "shapes"), "train")[0]) as f:
        return json.load(f)


def _spoil_image_ids(data):
    data["images"][1]["id"] = data["images"][0]["id"]


def _spoil_annotation_ids(data):
    data["annotations"][0]["id"] = 0


def _share_annotation_ids(data):
    data["annotations"][1]["id"] = data["annotations"][0]["id"]


def _drop_area(data):
    del data["annotations"][2]["area"], data["annotations"][2]["iscrowd"]


def _lead_with_a_short_polygon(data):
    data["annotations"][0]["segmentation"] = [[1, 1, 5, 5], [1, 1, 9, 1, 9, 9]]  # polygons in place of the RLE


def _follow_with_a_short_polygon(data):  # pycocotools reads the list by its first polygon
    data["annotations"][0]["segmentation"] = [[1, 1, 9, 1, 9, 9], [1, 1, 5, 5]]


def _empty_the_polygons(data):
    data["annotations"][0]["segmentation"] = []


def _leave_out_the_annotations(data):  # COCO's test-dev image info: predictions are written, not evaluated
    del data["annotations"]


@pytest.mark.parametrize("spoil, masks, problem", [
    (_spoil_image_ids, False, r"^image id 1 is given to 2 images \(1 id\(s\) given twice or more\), and one image"),
    (_spoil_annotation_ids, False, r"^an annotation has id 0, and pycocotools takes a match to ground truth id 0 for "
                                   r"no match .* number the annotations from 1$"),
    (_share_annotation_ids, False, r"^annotation id 1 is given to 2 annotations; give each its own id$"),
    (_drop_area, False, r"^annotation 3 lacks area, iscrowd, which COCO evaluation reads in every annotation"),
    (lambda data: data["annotations"][0].update(id=-5), True, None),  # pycocotools scores any other number right
    (lambda data: data["annotations"][0].update(id="7"), True, None),
    (lambda data: data["annotations"][0].update(id="seven"), True, r"^an annotation has id 'seven', which pycocotools "
                                                                   r"cannot store as a number; give numbers$"),
    (_lead_with_a_short_polygon, True, r"^annotation 1 has no polygon, or a first polygon of two points or fewer "
                                       r"\(4 numbers or fewer\), which pycocotools cannot read"),
    (_lead_with_a_short_polygon, False, None),  # boxes alone: pycocotools reads no polygon
    (_follow_with_a_short_polygon, True, None),
    (_empty_the_polygons, True, r"^annotation 1 has no polygon, or a first polygon"),
    (_leave_out_the_annotations, True, None),
])
def test_ground_truth_pycocotools_would_fail_on_or_score_wrongly_is_named(tiny_shapes_root, tmp_path, spoil, masks,
                                                                          problem):
    data = shapes_ground_truth(tiny_shapes_root)
    json_file = tmp_path / "spoiled.json"
    json_file.write_text(json.dumps(data))
    assert coco_ground_truth_problem(str(json_file), masks=True) is None
    spoil(data)
    json_file.write_text(json.dumps(data))
    found = coco_ground_truth_problem(str(json_file), masks)
    assert found is None if problem is None else re.search(problem, found), found


def test_a_test_dataset_whose_ground_truth_pycocotools_misreads_is_named_before_training(tiny_shapes_root,
                                                                                        tmp_path):
    data = shapes_ground_truth(tiny_shapes_root)
    _spoil_annotation_ids(data)
    (tmp_path / "ids_from_0.json").write_text(json.dumps(data))
    image_root = split_paths(str(tiny_shapes_root / "shapes"), "train")[1]
    register_coco_instances("ids_from_0", {}, str(tmp_path / "ids_from_0.json"), image_root)
    with pytest.raises(ValueError, match=rf"^Dataset 'ids_from_0' \(DATASETS.TEST\): {tmp_path}/ids_from_0.json: an "
                                         r"annotation has id 0, .* COCO evaluation \(pycocotools\) reads this file"):
        check_evaluation_datasets(["ids_from_0"], masks=True)


def _rotated_photo(path):
    """A 64x48 JPEG whose EXIF orientation (6) has it shown, and read by Detectron2, turned upright: 48x64."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48)).save(path, format="JPEG", exif=exif)


def _photo_turned_by_xmp(path):
    """A 64x48 JPEG whose XMP orientation alone (6) has Detectron2 read it upright: 48x64."""
    Image.new("RGB", (64, 48)).save(path, format="JPEG", xmp=XMP_TURNED)


XMP_TURNED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
              b'</x:xmpmeta>')


def _png_turned_by_xmp(path):
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP_TURNED.decode())
    Image.new("RGB", (64, 48)).save(path, format="PNG", pnginfo=info)


def _png_turned_after_its_pixels(path):
    """A 64x48 PNG whose eXIf chunk (orientation 6) follows the pixels: only decoding finds it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = exif.tobytes()[6:]  # without the "Exif\0\0" prefix
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, format="PNG")
    png = buffer.getvalue()
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    with open(path, "wb") as f:
        f.write(png[:-12] + chunk + png[-12:])  # before IEND


def _tiff_with_an_orientation(path):
    """A 64x48 TIFF of orientation 6, which Detectron2 reads 64x48 (Pillow turns TIFFs as it decodes them)."""
    Image.new("RGB", (64, 48)).save(path, format="TIFF", tiffinfo={0x0112: 6})


def _too_many_pixels(path):
    Image.new("L", (5000, 5000)).save(path, format="PNG")  # over 2x the limit the test's fixture sets


@pytest.mark.parametrize("make, width, height, problem", [
    (lambda path: Image.new("RGB", (64, 48)).save(path, format="PNG"), 64, 48, None),
    (lambda path: Image.new("L", (64, 48)).save(path, format="PNG"), None, None, None),  # need not give the size
    (lambda path: Image.new("RGB", (64, 48)).save(path, format="JPEG"), 48, 64,
     r"a.img is 64x48 pixels as Detectron2 reads it \(upright, if its metadata turns it\), but its record says 48x64; "
     r"correct the width and height in the annotations$"),
    (_rotated_photo, 48, 64, None),
    (_photo_turned_by_xmp, 48, 64, None),
    (_photo_turned_by_xmp, 64, 48, r"is 48x64 pixels as Detectron2 reads it"),
    (_png_turned_by_xmp, 48, 64, None),
    (_png_turned_by_xmp, 64, 48, r"is 48x64 pixels as Detectron2 reads it"),
    (_png_turned_after_its_pixels, 48, 64, None),  # the header disagrees; decoding, as Detectron2 does, agrees
    (_tiff_with_an_orientation, 64, 48, None),
    (_tiff_with_an_orientation, 48, 64, r"is 64x48 pixels as Detectron2 reads it"),
    (_too_many_pixels, 5000, 5000, r"a.img has more pixels than Pillow opens \(.*\); downscale it, or raise "
                                   r"PIL.Image.MAX_IMAGE_PIXELS$"),
    (_rotated_photo, 64, 48, r"is 48x64 pixels as Detectron2 reads it \(upright, .*\), but its record says 64x48"),
    (lambda path: Image.new("I;16", (64, 48), 1000).save(path, format="PNG"), 64, 48,
     r"a.img has PIL mode I;16 with values from 1000 to 1000, which Detectron2 reads as 8-bit RGB by clipping"),
    (lambda path: Image.new("I;16", (64, 48), 200).save(path, format="PNG"), 64, 48, None),  # read as they are
    (lambda path: open(path, "wb").close(), 64, 48, r"a.img cannot be read as an image \(cannot identify"),
])
def test_an_image_that_cannot_be_read_as_annotated_is_named_from_its_header(tmp_path, monkeypatch, make, width,
                                                                            height, problem):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000_000)  # Pillow refuses images of over twice as many
    make(str(tmp_path / "a.img"))
    record = {"file_name": str(tmp_path / "a.img"), **({"width": width, "height": height} if width else {})}
    found = image_problem(record)
    assert found is None if problem is None else re.search(problem, found), found
    if problem is None:  # as Detectron2 reads it
        assert read_image(record["file_name"]).shape[:2] == ((height, width) if width else (48, 64))
    assert image_problem({**record, "file_name": "http://127.0.0.1:9/a.img"}) is None  # remote: read when used


def test_images_are_checked_before_evaluation_unless_the_config_says_not_to(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    record = {"file_name": str(tmp_path / "a.png"), "image_id": 1, "width": 48, "height": 64, "annotations": []}
    DatasetCatalog.register("turned_sizes", lambda: [record])
    MetadataCatalog.get("turned_sizes").thing_classes = ["thing"]
    with pytest.raises(ValueError, match=r"^Dataset 'turned_sizes' \(DATASETS.TEST\): .*a.png is 64x48 pixels .* but "
                                         r"its record says 48x64; .* \(DATASETS.CHECK_IMAGES False skips this check\)"):
        check_evaluation_datasets(["turned_sizes"])
    check_evaluation_datasets(["turned_sizes"], images=False)


def test_checking_many_images_says_how_far_it_got(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"file_name": str(tmp_path / "a.png"), "width": 8, "height": 8}] * 3
    with caplog.at_level(logging.INFO, logger="gn_detection.datasets"):
        check_images(records, "three_images", progress_every_s=0.0)
    assert [r.getMessage() for r in caplog.records][:3] == [
        f"Checked {n} of 3 images of three_images (DATASETS.CHECK_IMAGES False skips this)" for n in (1, 2, 3)]
    assert caplog.records[-1].getMessage().startswith("Checked the 3 images of three_images in ")


def test_a_record_the_mapper_fails_on_mid_run_is_named_also_from_a_dataloader_worker(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    box = {"bbox": [1, 1, 20, 20], "bbox_mode": 1, "category_id": 0, "segmentation": [[1, 1, 20, 1, 20, 20]]}
    record = {"file_name": str(tmp_path / "a.png"), "image_id": 1, "width": 64, "height": 48, "annotations": [box]}
    settings = dict(augmentations=[], image_format="BGR", use_instance_mask=True)
    mapped, expected = (mapper(True, **settings)(dict(record)) for mapper in (NamingDatasetMapper, DatasetMapper))
    assert torch.equal(mapped["image"], expected["image"])
    assert torch.equal(mapped["instances"].gt_boxes.tensor, expected["instances"].gt_boxes.tensor)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[:len(data) * 3 // 4])  # the header is whole: found only when decoded
    assert image_problem(record) is None
    message = f"training image {tmp_path / 'a.png'} cannot be used (OSError: image file is truncated"
    with pytest.raises(UnusableRecord) as error:
        NamingDatasetMapper(True, **settings)(dict(record))
    assert error.value.reason().startswith(message)
    loader = torch.utils.data.DataLoader([record], batch_size=None, num_workers=1,
                                         collate_fn=NamingDatasetMapper(True, **settings))
    with pytest.raises(UnusableRecord) as error:  # raised again here, with the worker's traceback around it
        next(iter(loader))
    assert "Traceback" in str(error.value)
    assert error.value.reason().startswith(message) and "\n" not in error.value.reason()


ONE_IMAGE = [{"file_name": "a.png", "image_id": 1, "height": 8, "width": 8, "annotations": []}]


def test_a_dataset_evaluation_would_fail_on_is_named_before_training(tmp_path):
    def loader_that_names_its_classes():
        MetadataCatalog.get("classes_set_by_loader").thing_classes = ["thing"]
        return ONE_IMAGE

    DatasetCatalog.register("classes_set_by_loader", loader_that_names_its_classes)
    check_evaluation_datasets(["classes_set_by_loader"], images=False)  # its a.png is no file
    assert MetadataCatalog.get("classes_set_by_loader").thing_classes == ["thing"]
    DatasetCatalog.register("classes_nowhere", lambda: ONE_IMAGE)
    with pytest.raises(ValueError, match=r"Dataset 'classes_nowhere' \(DATASETS.TEST\) has neither a json_file nor "
                                         r"thing_classes .* MetadataCatalog.get\('classes_nowhere'\).thing_classes"):
        check_evaluation_datasets(["classes_nowhere"])
    DatasetCatalog.register("no_images", list)
    with pytest.raises(ValueError, match=r"Dataset 'no_images' \(DATASETS.TEST\) has no images; .* DATASETS.TEST \(\)"):
        check_evaluation_datasets(["no_images"])
    (tmp_path / "cut.json").write_text('{"images": [')
    register_coco_instances("cut_json", {}, str(tmp_path / "cut.json"), str(tmp_path))
    with pytest.raises(ValueError, match=r"Dataset 'cut_json' \(DATASETS.TEST\) cannot be loaded, so evaluation would "
                                         r"fail after training: JSONDecodeError: Expecting value"):
        check_evaluation_datasets(["cut_json"])
    boxes_only = [{**ONE_IMAGE[0], "annotations": [{"bbox": [1, 1, 4, 4], "bbox_mode": 1, "category_id": 0}]}]
    DatasetCatalog.register("boxes_only", lambda: boxes_only)
    MetadataCatalog.get("boxes_only").thing_classes = ["thing"]
    check_evaluation_datasets(["boxes_only"], images=False)  # a box model evaluates it
    with pytest.raises(ValueError, match=r"^Dataset 'boxes_only' \(DATASETS.TEST\): 1 of 1 images have annotations "
                                         r"without a mask"):
        check_evaluation_datasets(["boxes_only"], masks=True)


def test_missing_shapes_error_says_how_to_generate(tmp_path):
    gn_detection.register_shapes(str(tmp_path / "nowhere"), prefix="absent_shapes")
    with pytest.raises(FileNotFoundError, match="prepare_shapes.py"):
        check_dataset_files(["absent_shapes_train"])


def test_a_relative_dataset_path_that_is_missing_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as when a tool runs from another folder than the one holding datasets/
    gn_detection.register_shapes("datasets/shapes", prefix="relative_shapes")
    with pytest.raises(FileNotFoundError) as error:
        check_dataset_files(["relative_shapes_train"])
    assert str(error.value).startswith(
        f"Dataset 'relative_shapes_train': its annotation file datasets/shapes/annotations/instances_train.json does "
        f"not exist under the working directory {tmp_path} (a relative path: run from the folder it is relative to, "
        "or set DETECTRON2_DATASETS to the datasets folder)")
    with pytest.raises(FileNotFoundError) as error:  # loaded without the check, as DatasetCatalog.get does
        DatasetCatalog.get("relative_shapes_val")
    assert str(error.value).startswith(f"Dataset 'relative_shapes_val': its annotation file datasets/shapes/"
                                       f"annotations/instances_val.json does not exist under the working directory "
                                       f"{tmp_path} ")
    assert "prepare_shapes.py" in str(error.value)


def test_a_regeneration_that_fails_while_drawing_leaves_the_split_that_was_there(tmp_path, monkeypatch):
    import gn_detection.shapes as shapes

    small = ShapesSplitSpec("val", 4, image_size=64)
    json_file = generate_split(str(tmp_path), small, progress=False)
    before = open(json_file).read()
    draw = shapes.draw_image

    def interrupted_at_image_2(spec, index):
        if index == 2:
            raise KeyboardInterrupt  # or a full disk, or out of memory for a huge --image-size
        return draw(spec, index)

    monkeypatch.setattr(shapes, "draw_image", interrupted_at_image_2)
    bigger = ShapesSplitSpec("val", 4, image_size=96)
    with pytest.raises(KeyboardInterrupt):
        generate_split(str(tmp_path), bigger, progress=False)
    image_dir = split_paths(str(tmp_path), "val")[1]
    assert open(json_file).read() == before  # the 64-pixel split, whole
    assert {Image.open(os.path.join(image_dir, f"{i:06d}.png")).size for i in range(4)} == {(64, 64)}
    monkeypatch.setattr(shapes, "draw_image", draw)
    generate_split(str(tmp_path), bigger, progress=False)
    assert {Image.open(os.path.join(image_dir, f"{i:06d}.png")).size for i in range(4)} == {(96, 96)}
    assert sorted(os.listdir(tmp_path)) == ["annotations", "val"]  # no staging folder left


def test_a_split_missing_an_image_is_not_complete(tmp_path):
    spec = ShapesSplitSpec("val", 3, image_size=64)
    json_file = generate_split(str(tmp_path), spec, progress=False)
    image_dir = split_paths(str(tmp_path), "val")[1]
    os.remove(os.path.join(image_dir, "000001.png"))
    generate_split(str(tmp_path), spec, progress=False)
    assert sorted(os.listdir(image_dir)) == ["000000.png", "000001.png", "000002.png"]
    load_checked_coco_json(json_file, image_dir, "regenerated")


@pytest.mark.parametrize("setting", [{"num_images": 0}, {"image_size": 8}, {"max_objects": 0}, {"seed": -1},
                                     {"num_images": 2.5}, {"num_images": True}])
def test_settings_no_split_could_have_are_refused_by_name(setting):
    spec = {"split": "train", "num_images": 3, **setting}
    name, value = next(iter(setting.items()))
    with pytest.raises(ValueError, match=rf"shapes train split: {name} must be an integer >= \d+, got {value}"):
        ShapesSplitSpec(**spec)


def test_numpy_integers_make_a_split_and_images_outside_it_are_named():
    spec = ShapesSplitSpec("train", np.int64(5), image_size=np.int64(32))
    assert draw_image(spec, np.int64(4))[0].shape == (32, 32, 3)
    for index in (-1, 5, 1.0):
        with pytest.raises(ValueError, match=rf"image index must be an integer from 0 to 4 \(the train split's "
                                             rf"num_images - 1\), got {index}"):
            draw_image(spec, index)


@pytest.mark.parametrize("flag, value, least", [("--num-train", "0", 1), ("--num-val", "0", 1),
                                                ("--image-size", "8", 16), ("--max-objects", "0", 1),
                                                ("--seed", "-1", 0)])
def test_prepare_shapes_names_the_flag_at_fault_and_writes_nothing(tmp_path, monkeypatch, capsys, flag, value, least):
    script = os.path.join(REPO, "datasets", "prepare_shapes.py")
    monkeypatch.setattr(sys, "argv", [script, "--root", str(tmp_path / "shapes"), "--num-val", "1", flag, value])
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    assert f"argument {flag}: must be at least {least}, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists()


@pytest.mark.parametrize("root", ["{tmp}/a_file", "{tmp}/a_file/shapes"])
def test_prepare_shapes_names_a_root_it_cannot_write_in(tmp_path, monkeypatch, capsys, root):
    script = os.path.join(REPO, "datasets", "prepare_shapes.py")
    (tmp_path / "a_file").write_text("")
    root = root.format(tmp=tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--root", root])
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    assert f"--root {root}: cannot write there ({tmp_path}/a_file is a file)" in capsys.readouterr().err


def test_an_unregistered_dataset_is_named_with_close_matches():
    with pytest.raises(ValueError, match="Dataset 'shapes_trian' .* is not registered; did you mean shapes_train"):
        check_dataset_files(["shapes_trian"])
    with pytest.raises(ValueError, match=r"Dataset 'qqzzxx' \(DATASETS.TRAIN / DATASETS.TEST\) is not registered. "
                                         r"Register it first"):
        check_dataset_files(["qqzzxx"])


def test_prepare_shapes_expands_a_tilde_in_the_datasets_root_as_the_registration_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DETECTRON2_DATASETS", "~/d2")
    monkeypatch.chdir(tmp_path)
    script = os.path.join(REPO, "datasets", "prepare_shapes.py")
    monkeypatch.setattr(sys, "argv", [script, "--num-train", "1", "--num-val", "1", "--image-size", "32"])
    runpy.run_path(script, run_name="__main__")
    assert (tmp_path / "home" / "d2" / "shapes" / "annotations" / "instances_val.json").is_file()
    assert not (tmp_path / "~").exists()


def test_prepare_shapes_names_a_path_it_cannot_write_and_keeps_the_split(tmp_path, monkeypatch):
    script = os.path.join(REPO, "datasets", "prepare_shapes.py")
    root = tmp_path / "shapes"
    monkeypatch.setattr(sys, "argv", [script, "--root", str(root), "--num-train", "1", "--num-val", "1",
                                      "--image-size", "32"])
    runpy.run_path(script, run_name="__main__")
    (root / "val.partial").write_text("")  # a file where the staging folder goes: os.makedirs cannot make it
    monkeypatch.setattr(sys, "argv", [script, "--root", str(root), "--num-train", "1", "--num-val", "1",
                                      "--image-size", "48"])
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: None)  # so that it stays in the way
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(script, run_name="__main__")
    assert str(stop.value.code).startswith("error: [Errno 17] File exists: ") and "left as it was" in stop.value.code
    assert len(json.load(open(root / "annotations" / "instances_val.json"))["images"]) == 1


def test_registering_shapes_under_a_taken_name_says_to_give_another_prefix(tmp_path):
    with pytest.raises(ValueError, match=r"shapes_train, shapes_val are registered already .* give another prefix"):
        gn_detection.register_shapes(str(tmp_path))
    assert MetadataCatalog.get("shapes_val").image_root != os.path.join(str(tmp_path), "val")  # untouched


def test_a_swap_that_fails_puts_the_earlier_split_back(tmp_path, monkeypatch):
    import gn_detection.shapes as shapes

    json_file = generate_split(str(tmp_path), ShapesSplitSpec("val", 2, image_size=64), progress=False)
    before = open(json_file).read()

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shapes, "write_atomically", full_disk)
    with pytest.raises(OSError, match="No space left"):
        generate_split(str(tmp_path), ShapesSplitSpec("val", 2, image_size=96), progress=False)
    image_dir = split_paths(str(tmp_path), "val")[1]
    assert open(json_file).read() == before and sorted(os.listdir(tmp_path)) == ["annotations", "val", "val.partial"]
    assert {Image.open(os.path.join(image_dir, f"{i:06d}.png")).size for i in range(2)} == {(64, 64)}
