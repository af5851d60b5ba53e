"""Dataset registration (the synthetic shapes splits) and checks that give clear errors for missing or
broken dataset files before any training starts."""
import difflib
import json
import logging
import os
import time
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import read_image
from detectron2.utils.file_io import PathManager
from PIL import Image

from .shapes import SHAPE_CLASSES, split_paths

SHAPES_HINT = "Generate it with: python datasets/prepare_shapes.py (or run `make demo`)."
COCO_HINT = (
    "Detectron2 looks for COCO under $DETECTRON2_DATASETS/coco (now {root}/coco); see datasets/README.md "
    "for the expected layout. To try gn_detection without COCO, run the synthetic demo: `make demo`."
)


def datasets_root() -> str:
    """Detectron2's dataset root: ``$DETECTRON2_DATASETS``, default ``datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def read_coco_json(json_file: str, keys: Sequence[str] = ("images", "annotations", "categories")) -> Dict:
    """Parse a COCO instances JSON that holds ``keys``, with errors that name the file and what is wrong in it."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{json_file}: malformed annotation JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Fix or regenerate the file."
        ) from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{json_file}: not a COCO instances file, it lacks the key(s) {missing}")
    return data


def load_checked_coco_json(json_file: str, image_root: str, dataset_name: str) -> List[Dict]:
    """Detectron2's ``load_coco_json``, after checking that the JSON parses and every image it names
    exists under ``image_root`` (a missing image otherwise surfaces mid-training)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset '{dataset_name}': its annotation file {json_file} does not exist"
                                f"{_relative_note(json_file)}. {SHAPES_HINT}")
    data = read_coco_json(json_file)
    missing = [
        im["file_name"] for im in data["images"] if not os.path.isfile(os.path.join(image_root, im["file_name"]))
    ]
    if missing:
        raise FileNotFoundError(
            f"{json_file} names {len(missing)} image file(s) that do not exist under {image_root}, "
            f"e.g. {os.path.join(image_root, missing[0])}. Restore them or regenerate the dataset."
        )
    return load_coco_json(json_file, image_root, dataset_name)


def register_shapes(root: str, prefix: str = "shapes") -> None:
    """Register ``{prefix}_train`` and ``{prefix}_val`` from ``root`` (made by datasets/prepare_shapes.py).

    Raises:
        ValueError: if either name is registered already (``import gn_detection`` registers ``shapes_*``).
    """
    taken = [f"{prefix}_{split}" for split in ("train", "val") if f"{prefix}_{split}" in DatasetCatalog]
    if taken:
        raise ValueError(f"Dataset(s) {', '.join(taken)} are registered already (import gn_detection registers "
                         "shapes_train and shapes_val under $DETECTRON2_DATASETS/shapes); give another prefix, e.g. "
                         f"register_shapes({root!r}, prefix='my_shapes')")
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        json_file, image_root = split_paths(root, split)
        DatasetCatalog.register(
            name, lambda j=json_file, i=image_root, n=name: load_checked_coco_json(j, i, n)
        )
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(SHAPE_CLASSES),
            missing_hint=SHAPES_HINT,
        )


def check_dataset_files(names: Iterable[str], named_by: str = "DATASETS.TRAIN / DATASETS.TEST") -> None:
    """Raise a clear FileNotFoundError for the first dataset whose annotation file or image directory
    is missing, naming the expected path and how to get it, and a ValueError for a name no one registered
    (saying where it was given: ``named_by``). Datasets without files are skipped."""
    for name in names:
        if name not in DatasetCatalog:
            close = difflib.get_close_matches(name, DatasetCatalog.list(), n=3)
            raise ValueError(f"Dataset '{name}' ({named_by}) is not registered"
                             + (f"; did you mean {', '.join(close)}?" if close else ".")
                             + " Register it first, e.g. with detectron2.data.datasets.register_coco_instances.")
        metadata = MetadataCatalog.get(name)
        hint = metadata.get("missing_hint") or COCO_HINT.format(root=datasets_root())
        files = (("annotation file", metadata.get("json_file")), ("image directory", metadata.get("image_root")))
        for what, path in files:
            if path and not os.path.exists(path):
                raise FileNotFoundError(f"Dataset '{name}': its {what} {path} does not exist"
                                        f"{_relative_note(path)}. {hint}")


def _relative_note(path: str) -> str:
    """Where a missing relative ``path`` was looked for, and how to point elsewhere; "" for an absolute one."""
    if os.path.isabs(path):
        return ""
    return (f" under the working directory {os.getcwd()} (a relative path: run from the folder it is relative to, "
            "or set DETECTRON2_DATASETS to the datasets folder)")


def check_annotations(dicts: List[Dict], datasets: str, masks: bool,
                      training_format: Optional[str] = None) -> None:
    """That every annotation in ``dicts`` (of ``datasets``, as the message names them) has a box, and with ``masks``
    (a Mask R-CNN) a mask: for evaluation (``training_format`` None), which reads every ground truth's; for training
    in INPUT.MASK_FORMAT ``training_format``, every annotation but crowds (Detectron2's training mapper leaves them
    out), with masks it can read in that format. The mapper reads each annotation's ``bbox`` (a KeyError
    mid-training otherwise), gives an image's instances masks only if its first annotation has one (the mask head's
    loss then fails on the image), and turns no RLE mask into polygons (a ValueError when one comes up).

    Raises:
        ValueError: naming the datasets, how many images have such annotations, one of them, and what to do.
    """
    checks = [(lambda a: "bbox" not in a, "annotations without a box ('bbox')",
               "give every annotation a bbox [x, y, width, height]")]
    if masks:
        checks.append((lambda a: "segmentation" not in a,
                       "annotations without a mask (no or an empty 'segmentation'), and MODEL.MASK_ON is True",
                       "give every annotation a mask, or set MODEL.MASK_ON False to train and evaluate boxes alone"))
    if masks and training_format == "polygon":
        checks.append((lambda a: isinstance(a["segmentation"], dict),
                       "masks as RLE (a dict 'segmentation'), and INPUT.MASK_FORMAT is polygon",
                       "set INPUT.MASK_FORMAT bitmask"))
    for broken, what, remedy in checks:
        hit = [d for d in dicts if any(broken(a) for a in d.get("annotations", ())
                                       if training_format is None or not a.get("iscrowd"))]
        if hit:
            raise ValueError(f"{datasets}: {len(hit)} of {len(dicts)} images have {what}, e.g. {hit[0]['file_name']}; "
                             f"{remedy}")


# PIL modes of more than 8 bits per channel: Detectron2's read_image converts them to 8-bit RGB, clipping at 255
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
EXIF_ORIENTATION = 0x0112
ROTATED_BY_90 = (5, 6, 7, 8)  # EXIF orientations that Detectron2's read_image turns by 90 degrees: w and h swap


def image_problem(record: Dict) -> Optional[str]:
    """What keeps a record's image from being read as annotated: not an image, values past 255 in more than 8 bits
    per channel (read clipped, e.g. all white), or a size (upright, as Detectron2 turns EXIF-rotated photos) other
    than the record's ``width`` and ``height`` (Detectron2's SizeMismatchError when it comes up); None if nothing,
    or the image is remote (``scheme://``: read when used, rather than all downloaded here). The header tells; an
    image it finds fault with is decoded as Detectron2 decodes it, and judged by that."""
    path = record["file_name"]
    if "://" in path:
        return None
    try:
        with PathManager.open(path, "rb") as f, Image.open(f) as image:  # the header; the pixels only where needed
            mode, size, orientation = image.mode, image.size, _orientation(image)
            extrema = image.getextrema() if mode in WIDE_MODES else None  # decodes: such images alone
        width, height = size[::-1] if orientation in ROTATED_BY_90 else size
        expected = (record.get("width", width), record.get("height", height))
        if (width, height) != expected:  # as read for training (some formats' orientation is past the header)
            height, width = read_image(path).shape[:2]
    except Image.DecompressionBombError as e:
        return f"{path} has more pixels than Pillow opens ({e}); downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS"
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        return f"{path} cannot be read as an image ({e}); replace it"
    if extrema and (extrema[0] < 0 or extrema[1] > 255):
        return (f"{path} has PIL mode {mode} with values from {extrema[0]} to {extrema[1]}, which Detectron2 reads "
                "as 8-bit RGB by clipping to 0-255 (e.g. all white); convert the images to 8 bits")
    if (width, height) != expected:
        return (f"{path} is {width}x{height} pixels as Detectron2 reads it (upright, if its metadata turns it), but "
                f"its record says {expected[0]}x{expected[1]}; correct the width and height in the annotations")
    return None


def _orientation(image: Image.Image) -> Optional[int]:
    """The orientation in ``image``'s header (EXIF, XMP; for a PNG read as Pillow's base class reads it, which
    decodes nothing), that Detectron2's read_image turns the image by; None if none or unreadable."""
    try:
        exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
        return exif.get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 (as Detectron2's read_image: damaged metadata turns nothing)
        return None


def check_images(dicts: List[Dict], datasets: str, progress_every_s: float = 10.0) -> None:
    """:func:`image_problem` of every record in ``dicts`` (of ``datasets``, as the message names them), logging
    progress every ``progress_every_s`` seconds (a network file system may take milliseconds an image).

    Raises:
        ValueError: naming the datasets, the image and what to do about it.
    """
    logger = logging.getLogger(__name__)
    started = last_said = time.perf_counter()
    for index, record in enumerate(dicts):
        if problem := image_problem(record):
            raise ValueError(f"{datasets}: {problem} (DATASETS.CHECK_IMAGES False skips this check)")
        if time.perf_counter() - last_said > progress_every_s:
            last_said = time.perf_counter()
            logger.info("Checked %d of %d images of %s (DATASETS.CHECK_IMAGES False skips this)", index + 1,
                        len(dicts), datasets)
    logger.info("Checked the %d images of %s in %.1f s", len(dicts), datasets, time.perf_counter() - started)


class UnusableRecord(ValueError):
    """Detectron2's DatasetMapper failed on a record once the run was under way (an image damaged past its header,
    say); the message names the record's image. A DataLoader worker's failure is raised again in the training
    process with the worker's traceback around the message: :meth:`reason` is the message as raised."""

    def reason(self) -> str:
        """The message as :class:`NamingDatasetMapper` raised it, without a DataLoader worker's traceback."""
        return str(self).rpartition(f"{type(self).__name__}: ")[2].strip()


class NamingDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper, whose failure on a record names the record's image: an image that fails only
    when decoded (Pillow's "image file is truncated") otherwise stops a run mid-way without saying which it is."""

    def __call__(self, dataset_dict: Dict) -> Dict:
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, ValueError, KeyError, IndexError) as e:  # what a record's data can cause
            raise UnusableRecord(f"{'training' if self.is_train else 'test'} image {dataset_dict.get('file_name')} "
                                 f"cannot be used ({type(e).__name__}: {e})") from e


def check_evaluation_datasets(names: Iterable[str], masks: bool = False, images: bool = True) -> None:
    """Load each dataset to evaluate on, as evaluation will after training, and raise a ValueError naming the first
    that cannot be loaded (malformed JSON, missing images), is empty, has annotations without a box or, when
    ``masks`` are evaluated, a mask (:func:`check_annotations`), whose ``json_file`` pycocotools would fail on or
    score wrongly (:func:`coco_ground_truth_problem`), with ``images`` an image that cannot be read as annotated
    (:func:`check_images`), or has neither a ``json_file`` nor ``thing_classes``:
    COCOEvaluator converts such a dataset to COCO format and names its categories from ``thing_classes`` (read after
    loading, as a dataset's loader may set them)."""
    for name in names:
        try:
            dicts = DatasetCatalog.get(name)
        except Exception as e:  # noqa: BLE001 (a user's loader or files: any error, told with the dataset's name)
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST) cannot be loaded, so evaluation would fail after "
                             f"training: {type(e).__name__}: {e}") from e
        if not dicts:
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST) has no images; give a dataset with images to "
                             "evaluate on, or DATASETS.TEST () to evaluate none")
        check_annotations(dicts, f"Dataset '{name}' (DATASETS.TEST)", masks)
        json_file = MetadataCatalog.get(name).get("json_file")
        if json_file and (problem := coco_ground_truth_problem(json_file, masks)):
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST): {json_file}: {problem}. COCO evaluation "
                             "(pycocotools) reads this file after training")
        if not json_file and MetadataCatalog.get(name).get("thing_classes") is None:
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST) has neither a json_file nor thing_classes in its "
                             "metadata, and COCO evaluation names the categories from thing_classes; set them where "
                             f"it is registered: MetadataCatalog.get('{name}').thing_classes = [...]")
        if images:  # last: it reads every image's header
            check_images(dicts, f"Dataset '{name}' (DATASETS.TEST)")


# the keys pycocotools' COCOeval reads in every ground-truth annotation (a KeyError after training otherwise)
EVALUATED_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")


def coco_ground_truth_problem(json_file: str, masks: bool) -> Optional[str]:
    """What in a COCO instances file makes pycocotools' evaluation on it fail or score wrongly (``masks``: segm
    too), said with what to do; None if nothing. Detectron2's loader forgives these (it drops polygons of fewer
    than three points, needs no ``area``), pycocotools reads the file as it is: it keeps one image of an id given
    twice (with both images' annotations), counts a detection matched to a ground truth of id 0 as a false
    positive, and fails on a missing key or on a mask whose first polygon has two points or fewer. A file without
    annotations (COCO's test-dev image info) is not evaluated: COCOEvaluator writes the predictions alone."""
    data = read_coco_json(json_file, keys=("images",))
    if "annotations" not in data:
        return None
    if problem := shared_image_id_problem(data["images"]):
        return problem
    annotation_ids = Counter(a["id"] for a in data["annotations"] if "id" in a)  # a missing one: named below
    for i in annotation_ids:
        if (number := _as_number(i)) is None:
            return f"an annotation has id {i!r}, which pycocotools cannot store as a number; give numbers"
        if number == 0:
            return ("an annotation has id 0, and pycocotools takes a match to ground truth id 0 for no match (the "
                    "detection then counts as a false positive); number the annotations from 1")
    if shared := [i for i, n in annotation_ids.items() if n > 1]:
        return f"annotation id {shared[0]} is given to {annotation_ids[shared[0]]} annotations; give each its own id"
    keys = EVALUATED_KEYS + (("segmentation",) if masks else ())
    for annotation in data["annotations"]:
        if missing := [key for key in keys if key not in annotation]:
            return (f"annotation {annotation.get('id')} lacks {', '.join(missing)}, which COCO evaluation reads in "
                    "every annotation; add them (area: the mask's or box's area, iscrowd: 0)")
        segmentation = annotation.get("segmentation") if masks else None
        # pycocotools reads a list by its first item: 4 numbers as a box (and then fails), fewer as nothing it knows
        if isinstance(segmentation, list) and (not segmentation or len(segmentation[0]) <= 4):
            return (f"annotation {annotation['id']} has no polygon, or a first polygon of two points or fewer (4 "
                    "numbers or fewer), which pycocotools cannot read; remove that polygon (or the annotation)")
    return None


def shared_image_id_problem(images: List[Dict]) -> Optional[str]:
    """That an id is given to more than one of a COCO file's ``images``, and what comes of it; None if none is.
    pycocotools (and Detectron2's loader, which reads the file with it) keeps one image of an id, with the others'
    annotations."""
    image_ids = Counter(image.get("id") for image in images)
    if shared := [i for i, n in image_ids.items() if n > 1]:
        return (f"image id {shared[0]!r} is given to {image_ids[shared[0]]} images ({len(shared)} id(s) given twice or "
                "more), and one image of an id is kept, with the others' annotations; give each image its own id")
    return None


def check_training_image_ids(names: Iterable[str]) -> None:
    """That no dataset of ``names`` (DATASETS.TRAIN) registered with a ``json_file`` gives an image id to two images
    (:func:`shared_image_id_problem`): the model would be trained on boxes and masks of one image drawn on another,
    without a word.

    Raises:
        ValueError: naming the dataset, its file, the id and what to do.
    """
    for name in names:
        if json_file := MetadataCatalog.get(name).get("json_file"):
            if problem := shared_image_id_problem(read_coco_json(json_file, keys=("images",))["images"]):
                raise ValueError(f"Dataset '{name}' (DATASETS.TRAIN): {json_file}: {problem}. Detectron2's loader "
                                 "reads the file with pycocotools, so training would see those annotations on the "
                                 "wrong image")


def _as_number(value) -> Optional[float]:
    """``value`` as the number pycocotools' match arrays hold it (a string of digits too); None if it is none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_num_classes(names: Iterable[str], num_classes: int, key: str = "MODEL.ROI_HEADS.NUM_CLASSES") -> None:
    """Raise a ValueError for the first dataset whose registered ``thing_classes`` are not ``num_classes`` many
    (the config's ``key``): more classes index past the classifier mid-training, fewer leave the model predicting
    classes the evaluator cannot map back, after training. A dataset that registers its classes only when loaded
    (``register_coco_instances``) is checked only once loaded."""
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"Dataset '{name}' has {len(classes)} classes ({_listed(classes)}) but {key} is "
                             f"{num_classes}; set {key} {len(classes)}")


def check_same_classes(trained: Iterable[str], evaluated: Iterable[str]) -> None:
    """That no dataset ``evaluated`` lists the classes of the ``trained`` ones in another order: COCO evaluation
    scores the model's i-th class as the test dataset's i-th, so the same names (letter case aside) in another
    order give a wrong AP without a word. Lists of other names (a renamed class, say) are left alone, as are
    datasets whose classes are not known yet (``register_coco_instances`` sets them when loaded).

    Raises:
        ValueError: naming both datasets and the first class they place differently.
    """
    known = [(name, MetadataCatalog.get(name).get("thing_classes")) for name in trained]
    reference, reference_classes = next(((n, c) for n, c in known if c is not None), (None, None))
    for name in evaluated if reference else ():
        classes = MetadataCatalog.get(name).get("thing_classes")
        tested, trained_as = ([c.lower() for c in listed] for listed in (classes or [], reference_classes))
        if tested != trained_as and sorted(tested) == sorted(trained_as):
            index = next(i for i, (a, b) in enumerate(zip(tested, trained_as)) if a != b)
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST) and '{reference}' (DATASETS.TRAIN) list the same "
                             f"classes in another order (class {index} is {classes[index]!r} in one, "
                             f"{reference_classes[index]!r} in the other): the model's i-th class would be scored as "
                             "the test dataset's i-th. Register them with their categories in the same order")


def _listed(classes: List[str], shown: int = 5) -> str:
    """The first ``shown`` class names, and "..." for more."""
    return ", ".join(classes[:shown]) + (", ..." if len(classes) > shown else "")
