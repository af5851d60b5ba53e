"""A synthetic instance-segmentation dataset of coloured shapes, written in COCO format.

Every image is drawn from its own seed (dataset seed, split, image index), so a split is reproducible
image by image. Objects vary in class, size, rotation, colour and position; they may overlap (the visible
part is annotated, as an RLE mask) but none is hidden so much that it stops being a fair target.
Backgrounds are gradients with noise. A split's images are drawn in a staging folder and its annotation JSON
is written last, atomically: a split whose JSON exists and names settings and images that are all there is
complete.
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from tqdm import tqdm

from .atomic_write import write_atomically
from .group_norm import is_integer

SHAPE_CLASSES = ("circle", "square", "triangle", "star")
SPLIT_SEEDS = {"train": 0, "val": 1}  # mixed into each image's seed, so splits never share an image
MIN_VISIBLE_FRACTION = 0.5  # an object must keep at least this share of its area visible
MIN_CONTRAST = 120  # least L1 distance (0-765) between an object's colour and the background's mean
# Least value of each numeric setting of a split; below 16 pixels the smallest shapes can rasterize to nothing.
MIN_SETTINGS = {"num_images": 1, "image_size": 16, "max_objects": 1, "seed": 0}


@dataclass(frozen=True)
class ShapesSplitSpec:
    """What a split holds; recorded in the JSON's ``info`` so a changed request regenerates it."""

    split: str
    num_images: int
    image_size: int = 192
    max_objects: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.split not in SPLIT_SEEDS:
            raise ValueError(f"shapes split must be one of {sorted(SPLIT_SEEDS)}, got '{self.split}'")
        for name, least in MIN_SETTINGS.items():
            value = getattr(self, name)
            if not is_integer(value) or value < least:  # numpy's integers too, not True
                raise ValueError(f"shapes {self.split} split: {name} must be an integer >= {least}, got {value!r}")


def split_paths(root: str, split: str) -> Tuple[str, str]:
    """(annotation JSON path, image directory) of ``split`` under ``root``."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def _polygon(name: str, center: np.ndarray, radius: float, angle: float) -> List[Tuple[float, float]]:
    if name == "square":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [radius] * 4
    elif name == "triangle":
        corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
        radii = [radius] * 3
    else:  # five-pointed star: alternate outer and inner radius
        corners = [angle + k * math.pi / 5 for k in range(10)]
        radii = [radius if k % 2 == 0 else radius * 0.45 for k in range(10)]
    return [(center[0] + r * math.cos(a), center[1] + r * math.sin(a)) for a, r in zip(corners, radii)]


def _shape_mask(name: str, size: int, center: np.ndarray, radius: float, angle: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "circle":
        x, y = center
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=1)
    else:
        draw.polygon(_polygon(name, center, radius, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    start, end = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xs * math.cos(direction) + ys * math.sin(direction)) * 0.5 + 0.5
    image = start + (end - start) * t[..., None]
    image += rng.normal(0, rng.uniform(2, 12), size=image.shape)
    return image


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    while True:
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background_mean).sum() >= MIN_CONTRAST:
            return colour


def draw_image(spec: ShapesSplitSpec, index: int) -> Tuple[np.ndarray, List[Dict]]:
    """Draw image ``index`` of a split: an HxWx3 uint8 array and its objects, each a dict with
    ``category_id`` (1-based) and a boolean ``mask`` of its visible pixels."""
    if not is_integer(index) or not 0 <= index < spec.num_images:
        raise ValueError(f"image index must be an integer from 0 to {spec.num_images - 1} (the {spec.split} split's "
                         f"num_images - 1), got {index!r}")
    rng = np.random.default_rng([spec.seed, SPLIT_SEEDS[spec.split], index])
    size = spec.image_size
    image = _background(rng, size)
    background_mean = image.mean(axis=(0, 1))
    objects: List[Dict] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _attempt in range(10):
            class_index = int(rng.integers(len(SHAPE_CLASSES)))
            radius = rng.uniform(0.07, 0.25) * size
            center = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
            full = _shape_mask(SHAPE_CLASSES[class_index], size, center, radius, rng.uniform(0, 2 * math.pi))
            occluded = [o["mask"] & ~full for o in objects]
            if all(v.sum() >= MIN_VISIBLE_FRACTION * o["full_area"] for v, o in zip(occluded, objects)):
                break
        else:
            continue  # no placement kept every earlier object visible enough: draw fewer objects
        for o, visible in zip(objects, occluded):
            o["mask"] = visible
        texture = rng.normal(0, 6, size=(size, size, 3))
        image[full] = (_object_colour(rng, background_mean) + texture)[full]
        objects.append({"category_id": class_index + 1, "mask": full, "full_area": int(full.sum())})
    for o in objects:
        del o["full_area"]
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _annotation(obj: Dict, image_id: int, annotation_id: int) -> Dict:
    rle = mask_util.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": obj["category_id"],
        "segmentation": rle,
        "area": float(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": 0,
    }


def _existing_spec(json_file: str) -> Optional[Dict]:
    try:
        with open(json_file) as f:
            return json.load(f).get("info", {}).get("spec")
    except (OSError, ValueError):
        return None


def generate_split(root: str, spec: ShapesSplitSpec, force: bool = False, progress: bool = True) -> str:
    """Write ``spec.split`` under ``root`` (PNG images and a COCO instances JSON) unless a complete split with the
    same spec (its JSON and every image it names) is already there. Returns the JSON path. The images are drawn
    into a staging folder beside the split's and swapped in once all are written, so a regeneration that fails or is
    interrupted while drawing leaves the split that was there as it was; only the swap itself (two renames and the
    JSON) can leave the split incomplete, never mixed: its JSON is moved aside first; a swap that raises puts the
    earlier split back."""
    json_file, image_dir = split_paths(root, spec.split)
    if not force and _is_complete(json_file, image_dir, spec):
        return json_file
    staging, old, old_json = image_dir + ".partial", image_dir + ".old", json_file + ".old"
    for leftover in (staging, old):  # of a run that stopped before its swap ended
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(staging)
    images, annotations = [], []
    for index in tqdm(range(spec.num_images), desc=f"shapes {spec.split}", disable=not progress):
        pixels, objects = draw_image(spec, index)
        file_name = _image_name(index)
        Image.fromarray(pixels).save(os.path.join(staging, file_name))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": spec.image_size,
                       "width": spec.image_size})
        for obj in objects:
            annotations.append(_annotation(obj, image_id, len(annotations) + 1))
    coco = {
        "info": {"description": "gn_detection synthetic shapes", "spec": asdict(spec)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
    }
    moved = []  # the JSON first: from then on the split is incomplete until the new JSON is written
    try:
        for source, target in ((json_file, old_json), (image_dir, old), (staging, image_dir)):
            if os.path.exists(source):
                os.replace(source, target)
                moved.append((source, target))
        write_atomically(json_file, json.dumps(coco))
    except BaseException:
        for source, target in reversed(moved):  # the earlier split back where it was
            os.replace(target, source)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(old_json):
        os.remove(old_json)
    return json_file


def _image_name(index: int) -> str:
    return f"{index:06d}.png"


def _is_complete(json_file: str, image_dir: str, spec: ShapesSplitSpec) -> bool:
    """Whether the split there was generated with ``spec`` and still has every image."""
    return _existing_spec(json_file) == asdict(spec) and all(
        os.path.isfile(os.path.join(image_dir, _image_name(index))) for index in range(spec.num_images))
