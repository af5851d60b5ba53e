"""Dataset registration (the synthetic shapes splits) and checks that give clear errors for missing or
broken dataset files before any training starts."""
import difflib
import json
import os
from typing import Dict, Iterable, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import SHAPE_CLASSES, split_paths

SHAPES_HINT = "Generate it with: python datasets/prepare_shapes.py (or run `make demo`)."
COCO_HINT = (
    "Detectron2 looks for COCO under $DETECTRON2_DATASETS/coco (now {root}/coco); see datasets/README.md "
    "for the expected layout. To try gn_detection without COCO, run the synthetic demo: `make demo`."
)


def datasets_root() -> str:
    """Detectron2's dataset root: ``$DETECTRON2_DATASETS``, default ``datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def read_coco_json(json_file: str) -> Dict:
    """Parse a COCO instances JSON, with errors that name the file and what is wrong in it."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{json_file}: malformed annotation JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Fix or regenerate the file."
        ) from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{json_file}: not a COCO instances file, it lacks the key(s) {missing}")
    return data


def load_checked_coco_json(json_file: str, image_root: str, dataset_name: str) -> List[Dict]:
    """Detectron2's ``load_coco_json``, after checking that the JSON parses and every image it names
    exists under ``image_root`` (a missing image otherwise surfaces mid-training)."""
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
                raise FileNotFoundError(f"Dataset '{name}': its {what} {path} does not exist. {hint}")


def check_masks(dicts: List[Dict], datasets: str) -> None:
    """For a Mask R-CNN: that every annotation in ``dicts`` (of ``datasets``, as the message names them) has a mask
    (``segmentation``). Detectron2 gives an image's instances masks only if its first annotation has one (the mask
    head's loss then fails on the image), and COCO's segm evaluation reads every ground truth's.

    Raises:
        ValueError: naming the datasets, how many images lack masks, one of them, and what to do.
    """
    lacking = [d for d in dicts if any("segmentation" not in a for a in d.get("annotations", ()))]
    if lacking:
        raise ValueError(f"{datasets}: {len(lacking)} of {len(dicts)} images have annotations without a mask "
                         f"('segmentation'), e.g. {lacking[0]['file_name']}, and MODEL.MASK_ON is True; give every "
                         "annotation a mask, or set MODEL.MASK_ON False to train and evaluate boxes alone")


def check_evaluation_datasets(names: Iterable[str], masks: bool = False) -> None:
    """Load each dataset to evaluate on, as evaluation will after training, and raise a ValueError naming the first
    that cannot be loaded (malformed JSON, missing images), is empty, has annotations without a mask when ``masks``
    are evaluated (:func:`check_masks`), or has neither a ``json_file`` nor ``thing_classes``: COCOEvaluator
    converts such a dataset to COCO format and names its categories from ``thing_classes`` (read after loading, as
    a dataset's loader may set them)."""
    for name in names:
        try:
            dicts = DatasetCatalog.get(name)
        except Exception as e:  # noqa: BLE001 (a user's loader or files: any error, told with the dataset's name)
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST) cannot be loaded, so evaluation would fail after "
                             f"training: {type(e).__name__}: {e}") from e
        if not dicts:
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST) has no images; give a dataset with images to "
                             "evaluate on, or DATASETS.TEST () to evaluate none")
        if masks:
            check_masks(dicts, f"Dataset '{name}' (DATASETS.TEST)")
        metadata = MetadataCatalog.get(name)
        if not metadata.get("json_file") and metadata.get("thing_classes") is None:
            raise ValueError(f"Dataset '{name}' (DATASETS.TEST) has neither a json_file nor thing_classes in its "
                             "metadata, and COCO evaluation names the categories from thing_classes; set them where "
                             f"it is registered: MetadataCatalog.get('{name}').thing_classes = [...]")


def check_num_classes(names: Iterable[str], num_classes: int, key: str = "MODEL.ROI_HEADS.NUM_CLASSES") -> None:
    """Raise a ValueError for the first dataset whose registered ``thing_classes`` are not ``num_classes`` many
    (the config's ``key``): more classes index past the classifier mid-training, fewer leave the model predicting
    classes the evaluator cannot map back, after training. A dataset that registers its classes only when loaded
    (``register_coco_instances``) is checked only once loaded."""
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise ValueError(f"Dataset '{name}' has {len(classes)} classes ({shown}) but {key} is {num_classes}; "
                             f"set {key} {len(classes)}")
