"""The paper's comparisons as a matrix of training runs ("cells"), described by a preset YAML.

A preset names a base config, the images each run sees, the learning rate per image, the seeds and the
experiments to run:

- ``batch_size``: normalizations x images per GPU (the paper's BN-vs-GN batch-size sweep);
- ``groups``: GN with G groups, and with C channels per group (the paper's group ablation);
- ``scratch``: normalizations trained from random initialization at one batch size;
- ``gn_placement``: GN in the backbone only, then adding the FPN, the box head and the mask head.

Every run of a preset sees the same number of images, so a run at b images per GPU has
``images_per_run / (b * num_gpus)`` iterations, with the learning rate scaled linearly with the batch and
the LR steps at the same fractions of the schedule.
"""
import math
import os
from dataclasses import dataclass, field, fields
from typing import Dict, List, Set, Tuple

import yaml
from detectron2.config import CfgNode

from .config import check_model_builds
from .group_norm import GroupNormChannelsError, is_integer
from .shapes import ShapesSplitSpec

NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")
# Normalization variants: the NORM of (backbone, FPN, box head, mask head). Frozen BN from random
# initialization is a fixed affine map, i.e. no normalization; Detectron2 has no FrozenBN for the heads.
NORMS: Dict[str, Tuple[str, str, str, str]] = {
    "GN": ("GN", "GN", "GN", "GN"),
    "BN": ("BN", "BN", "BN", "BN"),  # batch statistics of each GPU's own images
    "SyncBN": ("SyncBN", "SyncBN", "SyncBN", "SyncBN"),  # statistics over all GPUs; on one GPU or CPU: BN
    "FrozenBN": ("FrozenBN", "", "", ""),
}
PLACEMENTS: Dict[str, Tuple[str, str, str, str]] = {
    "backbone": ("GN", "", "", ""),
    "backbone+FPN": ("GN", "GN", "", ""),
    "+box head": ("GN", "GN", "GN", ""),
    "+mask head": ("GN", "GN", "GN", "GN"),
}
LABELS = {"FrozenBN": "frozen BN (no normalization)"}
# Keys of each experiment's entry in a preset: (required, optional).
EXPERIMENT_KEYS: Dict[str, Tuple[Set[str], Set[str]]] = {
    "batch_size": ({"norms", "ims_per_gpu"}, set()),
    "groups": ({"ims_per_gpu"}, {"num_groups", "channels_per_group"}),
    "scratch": ({"norms", "ims_per_gpu"}, set()),
    "gn_placement": ({"placements", "ims_per_gpu"}, set()),
}
EXPERIMENTS = tuple(EXPERIMENT_KEYS)
# The keys of each experiment that hold a list (the others hold one value).
LIST_KEYS = {"batch_size": {"norms", "ims_per_gpu"}, "groups": {"num_groups", "channels_per_group"},
             "scratch": {"norms"}, "gn_placement": {"placements"}}
PRESET_KEYS = {"config", "experiments", "seeds", "images_per_run", "lr_per_image"}  # the keys every preset has
# Keys of a preset's ``dataset``: required, then optional (the shapes settings both splits share).
DATASET_KEYS = {"root", "num_train", "num_val"}
SHAPES_SETTINGS = {f.name for f in fields(ShapesSplitSpec)} - {"split", "num_images"}


@dataclass(frozen=True)
class Cell:
    """One training run: a variant of an experiment at ``ims_per_gpu`` images per GPU with one seed."""

    experiment: str
    variant: str
    ims_per_gpu: int
    seed: int
    opts: Tuple = ()  # config overrides that make the variant (KEY VALUE ...)

    @property
    def name(self) -> str:
        """A directory name unique within the preset."""
        variant = self.variant.replace("+", "plus_").replace(" ", "_").replace("=", "")
        return f"{self.experiment}/{variant}_ims{self.ims_per_gpu}_seed{self.seed}"


@dataclass
class Preset:
    """A preset YAML (see experiments/quick.yaml), with paths relative to the repository."""

    name: str
    config: str
    experiments: Dict[str, Dict]
    seeds: List[int]
    images_per_run: int
    lr_per_image: float
    warmup_images: int = 0
    num_gpus: int = 1
    opts: List = field(default_factory=list)
    dataset: Dict = field(default_factory=dict)  # shapes dataset to generate: root, image_size, num_train, ...

    @classmethod
    def load(cls, path: str) -> "Preset":
        """Read a preset YAML; unknown or missing keys, unknown experiments and settings no run could use
        (an unknown normalization, a dataset of 0 images, ...) are ValueErrors naming the file."""
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {e}") from e
        _check_preset_keys(path, data, set(cls.__dataclass_fields__) - {"name"})
        preset = cls(name=os.path.splitext(os.path.basename(path))[0], **data)
        for where, check in (("", preset.cells), ("dataset: ", preset.shapes_specs)):  # values, now keys are there
            try:
                check()
            except ValueError as e:
                raise ValueError(f"{path}: {where}{e}") from e
        return preset

    def cells(self, only: Tuple[str, ...] = ()) -> List[Cell]:
        """Every run of the preset (of the experiments in ``only``, if given), seeds innermost."""
        cells = []
        for experiment, spec in self.experiments.items():
            if only and experiment not in only:
                continue
            for variant, ims, opts in _variants(experiment, spec):
                if not is_integer(ims) or ims < 1:
                    raise ValueError(f"experiments.{experiment}: ims_per_gpu must be integers >= 1, got {ims!r}")
                cells += [Cell(experiment, variant, ims, seed, opts) for seed in self.seeds]
        return cells

    def shapes_specs(self) -> List[ShapesSplitSpec]:
        """The train and val splits of the shapes dataset the preset generates (none if it names none)."""
        if not self.dataset:
            return []
        settings = {key: value for key, value in self.dataset.items() if key in SHAPES_SETTINGS}
        return [ShapesSplitSpec(split, self.dataset[f"num_{split}"], **settings) for split in ("train", "val")]

    def schedule(self, ims_per_gpu: int) -> List:
        """Solver overrides for a run at ``ims_per_gpu``: the same images seen, LR linear in the batch."""
        batch = ims_per_gpu * self.num_gpus
        iters = max(1, self.images_per_run // batch)
        steps = tuple(sorted({max(1, int(iters * f)) for f in (0.7, 0.9)} - {iters}))
        return ["SOLVER.IMS_PER_BATCH", batch, "SOLVER.REFERENCE_WORLD_SIZE", 0,
                "SOLVER.BASE_LR", self.lr_per_image * batch, "SOLVER.MAX_ITER", iters, "SOLVER.STEPS", steps,
                "SOLVER.WARMUP_ITERS", min(iters - 1, self.warmup_images // batch), "SOLVER.CHECKPOINT_PERIOD", iters + 1]

    def overrides(self, cell: Cell) -> List:
        """All config overrides of a cell, in the order they apply: preset, variant, schedule, seed."""
        return [*self.opts, *cell.opts, *self.schedule(cell.ims_per_gpu), "SEED", cell.seed]


def _norm_opts(norms: Tuple[str, str, str, str]) -> Tuple:
    return tuple(x for key, norm in zip(NORM_KEYS, norms) for x in (key, norm))


def _variants(experiment: str, spec: Dict):
    """(variant name, images per GPU, config overrides) of each variant of an experiment."""
    if experiment == "batch_size":
        for norm in spec["norms"]:
            for ims in spec["ims_per_gpu"]:
                yield norm, ims, _norm_opts(_norm(norm))
    elif experiment == "groups":
        for g in spec.get("num_groups", []):
            yield f"G={g}", spec["ims_per_gpu"], ("MODEL.GN.NUM_GROUPS", g, "MODEL.GN.CHANNELS_PER_GROUP", 0)
        for c in spec.get("channels_per_group", []):
            yield f"C={c}", spec["ims_per_gpu"], ("MODEL.GN.CHANNELS_PER_GROUP", c)
    elif experiment == "scratch":
        scratch = ("MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", 0)
        for norm in spec["norms"]:
            yield norm, spec["ims_per_gpu"], _norm_opts(_norm(norm)) + scratch
    else:
        for placement in spec["placements"]:
            if placement not in PLACEMENTS:
                raise ValueError(f"experiments.gn_placement: unknown placement {placement!r}; "
                                 f"choose from {list(PLACEMENTS)}")
            yield placement, spec["ims_per_gpu"], _norm_opts(PLACEMENTS[placement])


def _check_preset_keys(path: str, data, known: Set[str]) -> None:
    """Raise a ValueError naming ``path`` and the key unless the preset, its experiments and its dataset have
    every key they need and only keys they take (``known``: the preset's own)."""
    _check_keys(path, data, PRESET_KEYS, known)
    if not isinstance(data["experiments"], dict):
        raise ValueError(f"{path}: experiments: expected a mapping of experiment names to their settings, got "
                         f"{data['experiments']!r}")
    bad = set(data["experiments"]) - set(EXPERIMENTS)
    if bad:
        raise ValueError(f"{path}: unknown experiment(s) {sorted(bad)}; choose from {list(EXPERIMENTS)}")
    if not data["experiments"]:
        raise ValueError(f"{path}: experiments: none given; give at least one of {list(EXPERIMENTS)}")
    seeds = data["seeds"]
    if not (isinstance(seeds, list) and seeds and all(is_integer(seed) for seed in seeds)):
        raise ValueError(f"{path}: seeds: expected a list of integers, got {seeds!r}")
    for key, (ok, expected) in SCALAR_KEYS.items():
        if key in data and not ok(data[key]):
            raise ValueError(f"{path}: {key}: expected {expected}, got {data[key]!r}")
    for experiment, spec in data["experiments"].items():
        where = f"{path}: experiments.{experiment}"
        _check_keys(where, spec, *EXPERIMENT_KEYS[experiment])
        for key in LIST_KEYS[experiment] & set(spec):
            if not isinstance(spec[key], list):
                raise ValueError(f"{where}.{key}: expected a list, got {spec[key]!r}")
    if data.get("dataset"):
        _check_keys(f"{path}: dataset", data["dataset"], DATASET_KEYS, SHAPES_SETTINGS)
        if not isinstance(data["dataset"]["root"], str):
            raise ValueError(f"{path}: dataset.root: expected a folder, got {data['dataset']['root']!r}")


# The preset's single-valued keys: a check of the value, and what it should be.
SCALAR_KEYS = {
    "config": (lambda v: isinstance(v, str) and v, "a config file, relative to the repository"),
    "images_per_run": (lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
    "lr_per_image": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
                     "a finite number > 0"),
    "warmup_images": (lambda v: is_integer(v) and v >= 0, "an integer >= 0"),
    "num_gpus": (lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
    "opts": (lambda v: isinstance(v, list), "a list of config KEY, VALUE items"),
}


def _check_keys(where: str, data, required: Set[str], optional: Set[str]) -> None:
    """Raise a ValueError starting with ``where`` unless ``data`` is a mapping with every ``required`` key
    and no key outside ``required`` and ``optional``."""
    allowed = sorted(required | optional)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with keys {allowed}, got {data!r}")
    unknown = set(data) - required - optional
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; it takes {allowed}")
    missing = required - set(data)
    if missing:
        raise ValueError(f"{where}: missing key(s) {sorted(missing)}")


def _norm(name: str) -> Tuple[str, str, str, str]:
    if name not in NORMS:
        raise ValueError(f"unknown normalization {name!r}; choose from {list(NORMS)}")
    return NORMS[name]


def build_error(cfg: CfgNode) -> str:
    """Why the model of ``cfg`` cannot be built because a GN setting does not divide a layer's width (a result
    of the group ablation, recorded as "not buildable"), or ''. Built on the meta device: no GPU, no memory.

    Raises:
        ValueError: for any other reason it cannot be built (an unregistered component, say): a preset's mistake.
    """
    try:
        check_model_builds(cfg, "the preset's config")
    except ValueError as e:
        if isinstance(e.__cause__, GroupNormChannelsError):
            return str(e.__cause__)
        raise
    return ""
