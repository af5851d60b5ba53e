"""Config keys added by gn_detection, and loading and checking a config."""
import os
import traceback
from typing import Dict, List, Optional, Sequence

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from .group_norm import GroupNormSpec


def add_gn_config(cfg: CN) -> None:
    """Add gn_detection's keys, with their defaults, to a Detectron2 config (in place); a key it has already keeps
    its value (a second call would otherwise reset what was set since)."""
    _add_missing(cfg, _gn_keys())


def _add_missing(cfg: CN, keys: CN) -> None:
    """Set each of ``keys`` that ``cfg`` lacks, section by section."""
    for key, value in keys.items():
        if key not in cfg:
            cfg[key] = value
        elif isinstance(value, CN):
            _add_missing(cfg[key], value)


def _gn_keys() -> CN:
    """gn_detection's keys with their defaults, in the sections of Detectron2's config they go in."""
    cfg = CN()
    cfg.MODEL, cfg.DATASETS, cfg.TEST = CN(), CN(), CN()
    cfg.MODEL.BACKBONE = CN()
    cfg.MODEL.GN = CN()
    # Groups per GN layer, the paper's G (32 in all its main results); 1 gives LayerNorm-like GN.
    cfg.MODEL.GN.NUM_GROUPS = 32
    # If > 0, use channels // CHANNELS_PER_GROUP groups instead of NUM_GROUPS; 1 gives InstanceNorm-like GN.
    cfg.MODEL.GN.CHANNELS_PER_GROUP = 0
    # Added to each group's variance before the square root.
    cfg.MODEL.GN.EPS = 1e-5
    # "auto": fused Triton GN kernels on CUDA, torch's group_norm elsewhere; "triton": always the kernels
    # (on the CPU only with TRITON_INTERPRET=1, for tests); "torch": always torch's group_norm.
    cfg.MODEL.GN.IMPL = "auto"
    # Fold the ReLU that follows a GN layer (ResNet blocks and stem, box and mask head convs) into it.
    cfg.MODEL.GN.FUSE_RELU = True
    # Under AMP, the Triton kernels keep GN in fp16/bf16 (fp32 statistics) rather than casting to fp32 and back;
    # False runs GN in fp32 under AMP. torch's group_norm follows autocast's own policy.
    cfg.MODEL.GN.AUTOCAST_HALF = True
    # With the Triton kernels and FUSE_RELU (and AUTOCAST_HALF under AMP), keep no GN+ReLU output for the conv
    # after it: rebuild it from the GN input in the backward (bit for bit; about a sixth of the activations kept).
    cfg.MODEL.GN.RECOMPUTE_OUTPUT = True
    # Run build_gn_resnet(_fpn)_backbone's ResNet, and so the FPN and RPN after it, in channels-last (NHWC) memory
    # format, the layout cuDNN's tensor-core convolutions use (NCHW ones convert around each); the GN kernels keep it.
    cfg.MODEL.BACKBONE.CHANNELS_LAST = False
    cfg.MODEL.CUDA_GRAPHS = CN()
    # Train build_gn_resnet_fpn_backbone's ResNet-FPN as CUDA graphs on CUDA: its forward and backward replay in
    # one launch each instead of hundreds (which bound steps of few images); the same kernels, the same results.
    cfg.MODEL.CUDA_GRAPHS.BACKBONE = False
    # Input shapes given graphs (captured when first seen; each keeps its own activation memory); others run eagerly.
    cfg.MODEL.CUDA_GRAPHS.MAX_SHAPES = 2
    # Before training and evaluation, read each image's header: an unreadable image, one of more than 8 bits per
    # channel, or a size other than its record's is named up front rather than met mid-run (COCO: 123k headers).
    cfg.DATASETS.CHECK_IMAGES = True
    # After evaluation, draw predictions on this many images of the first test dataset (0 = none).
    cfg.TEST.VIS_NUM_IMAGES = 0
    # Score threshold for the predictions drawn on those images.
    cfg.TEST.VIS_SCORE_THRESH = 0.5
    # --eval-only refuses weights that leave any model tensor unset (its AP would be a random model's); True allows it.
    cfg.TEST.ALLOW_PARTIAL_WEIGHTS = False
    return cfg


# The keys that change what GN layers compute but none of their tensors' shapes: each checkpoint a training run saves
# records them, so evaluating or resuming it under other values is named (no load of its tensors could notice).
GN_SETTING_KEYS = ("MODEL.GN.NUM_GROUPS", "MODEL.GN.CHANNELS_PER_GROUP", "MODEL.GN.EPS")


def gn_settings(cfg: CN) -> Dict[str, object]:
    """``cfg``'s values of :data:`GN_SETTING_KEYS`, by key."""
    return {key: _value(cfg, key) for key in GN_SETTING_KEYS}


def _value(cfg: CN, key: str) -> object:
    """The value of a dotted ``key`` (``MODEL.GN.EPS``) in ``cfg``."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


# What Detectron2's own components build for NORM "GN": torch's GroupNorm of 32 groups and eps 1e-5
DETECTRON2_GN = {"MODEL.GN.NUM_GROUPS": 32, "MODEL.GN.CHANNELS_PER_GROUP": 0, "MODEL.GN.EPS": 1e-5}
FPN_BACKBONE = "build_gn_resnet_fpn_backbone"
OUR_BACKBONES = (FPN_BACKBONE, "build_gn_resnet_backbone")
RCNN = ("GeneralizedRCNN", "PanopticFPN")
DETECTRON2_FPN_BACKBONES = ("build_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone")
DETECTRON2_BACKBONES = ("build_resnet_backbone", *DETECTRON2_FPN_BACKBONES)
# Detectron2's own components that build GN layers where a NORM key is "GN" (with DETECTRON2_GN, reading no MODEL.GN
# key): the layers, that key, the key naming the component, whether the config builds such layers with it, their
# width where they share one (None: several), and gn_detection's component to use instead (None: none)
DETECTRON2_GN_BUILDERS = (
    ("the ResNet", "MODEL.RESNETS.NORM", "MODEL.BACKBONE.NAME",
     lambda c: c.MODEL.BACKBONE.NAME in DETECTRON2_BACKBONES, lambda c: None, f"MODEL.BACKBONE.NAME {FPN_BACKBONE}"),
    ("res5", "MODEL.RESNETS.NORM", "MODEL.ROI_HEADS.NAME",
     lambda c: c.MODEL.META_ARCHITECTURE in RCNN and c.MODEL.ROI_HEADS.NAME == "Res5ROIHeads", lambda c: None,
     "an FPN model (configs/mask_rcnn_R50_FPN_gn.yaml)"),
    ("the FPN", "MODEL.FPN.NORM", "MODEL.BACKBONE.NAME", lambda c: c.MODEL.BACKBONE.NAME in DETECTRON2_FPN_BACKBONES,
     lambda c: c.MODEL.FPN.OUT_CHANNELS, f"MODEL.BACKBONE.NAME {FPN_BACKBONE}"),
    ("the box head", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_BOX_HEAD.NAME",
     lambda c: (c.MODEL.META_ARCHITECTURE in RCNN and c.MODEL.ROI_HEADS.NAME != "Res5ROIHeads"
                and c.MODEL.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead" and c.MODEL.ROI_BOX_HEAD.NUM_CONV > 0),
     lambda c: c.MODEL.ROI_BOX_HEAD.CONV_DIM, "MODEL.ROI_BOX_HEAD.NAME GNConvFCHead"),
    ("the mask head", "MODEL.ROI_MASK_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NAME",
     lambda c: (c.MODEL.MASK_ON and c.MODEL.META_ARCHITECTURE in RCNN
                and c.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead" and c.MODEL.ROI_MASK_HEAD.NUM_CONV > 0),
     lambda c: c.MODEL.ROI_MASK_HEAD.CONV_DIM, "MODEL.ROI_MASK_HEAD.NAME GNMaskRCNNConvUpsampleHead"),
    ("the semantic segmentation head", "MODEL.SEM_SEG_HEAD.NORM", "MODEL.SEM_SEG_HEAD.NAME",
     lambda c: (c.MODEL.META_ARCHITECTURE in ("PanopticFPN", "SemanticSegmentor")
                and c.MODEL.SEM_SEG_HEAD.NAME == "SemSegFPNHead"),
     lambda c: c.MODEL.SEM_SEG_HEAD.CONVS_DIM, None),
    ("the RetinaNet head", "MODEL.RETINANET.NORM", "MODEL.META_ARCHITECTURE",
     lambda c: c.MODEL.META_ARCHITECTURE == "RetinaNet", lambda c: c.MODEL.FPN.OUT_CHANNELS, None),
)


def ignored_gn_settings_problem(cfg: CN) -> Optional[str]:
    """That MODEL.GN's group setting or eps would not reach GN layers one of Detectron2's own components builds
    (:data:`DETECTRON2_GN_BUILDERS`) where they would differ from its GN (32 groups, eps 1e-5): the model would have
    other GN layers than asked for, silently; None if they reach every GN layer, or make the same ones."""
    settings = gn_settings(cfg)
    if settings == DETECTRON2_GN:
        return None
    for layers, norm_key, builder_key, builds, width_of, instead in DETECTRON2_GN_BUILDERS:
        if _value(cfg, norm_key) != "GN" or not builds(cfg) or _same_as_detectron2s(settings, width_of(cfg)):
            continue
        changed = ", ".join(f"{key} {value}" for key, value in settings.items() if value != DETECTRON2_GN[key])
        use = f"use {instead}, or " if instead else ""
        return (f"{changed} set the GN layers gn_detection builds, but {builder_key} {_value(cfg, builder_key)!r} "
                f"builds {layers} ({norm_key} GN) with Detectron2's own GN of 32 groups and eps 1e-5, which reads no "
                f"MODEL.GN key; {use}leave MODEL.GN.NUM_GROUPS 32, CHANNELS_PER_GROUP 0 and EPS 1e-05")
    return None


def _same_as_detectron2s(settings: Dict[str, object], width: Optional[int]) -> bool:
    """Whether ``settings`` make the GN layers of ``width`` channels (None: of several widths) Detectron2 makes."""
    channels_per_group = settings["MODEL.GN.CHANNELS_PER_GROUP"]
    groups = (width // channels_per_group if width else None) if channels_per_group else settings["MODEL.GN.NUM_GROUPS"]
    return groups == 32 and settings["MODEL.GN.EPS"] == 1e-5


def _structure_problem(config_file: str) -> str:
    """What is wrong with the shape of a config file yacs could not merge: not a mapping at all, or a section or
    _BASE_ holding the wrong kind of value."""
    try:
        with PathManager.open(config_file) as f:
            top = yaml.load(f, Loader=yaml.BaseLoader)  # structure only: every value a string, no tags run
    except yaml.YAMLError:
        top = {}
    if not isinstance(top, dict):
        held = "nothing" if top is None else f"a {type(top).__name__}"
        return f"a config must be a YAML mapping of KEY: value (e.g. MODEL: {{GN: ...}}), and this file holds {held}"
    return ("each section (e.g. MODEL:) must hold KEY: value pairs, and _BASE_ must name a config file whose own "
            "content is such a mapping")


# Keys with a value by default that Detectron2 also reads None in: norm layers then take SOLVER.WEIGHT_DECAY.
NULLABLE_KEYS = {"SOLVER.WEIGHT_DECAY_NORM"}


def _nulls_where_defaults_are_not(cfg: CN, defaults: CN, prefix: str = "") -> List[str]:
    """The keys a file or override set to None (yacs takes YAML's null for any key) whose default is a value and
    which Detectron2 does not read None in (:data:`NULLABLE_KEYS`)."""
    nulls = []
    for key, default in defaults.items():
        value = cfg[key]
        if isinstance(default, CN) and isinstance(value, CN):
            nulls += _nulls_where_defaults_are_not(value, default, f"{prefix}{key}.")
        elif value is None and default is not None and prefix + key not in NULLABLE_KEYS:
            nulls.append(prefix + key)
    return nulls


def _check_no_nulls(cfg: CN, defaults: CN, source: str) -> None:
    if nulls := _nulls_where_defaults_are_not(cfg, defaults):
        raise ValueError(f"{source}: {', '.join(nulls)} set to null (None), which Detectron2 cannot use where the "
                         "default is a value; give a value, or leave the key out to keep the default")


def _with_type_hint(error: ValueError) -> str:
    """yacs' error, with what to do about a "Type mismatch" (yacs converts no int to float: 1 for a float key is
    one)."""
    hint = "; give the key a value of its default's type (a float is written with a point: 1.0, not 1)"
    return f"{error}{hint if 'Type mismatch' in str(error) else ''}"


def load_config(config_file: str, opts: Sequence = ()) -> CN:
    """Detectron2's defaults plus gn_detection's keys, merged with ``config_file`` and KEY VALUE ``opts``.

    Raises:
        FileNotFoundError: if ``config_file`` does not exist.
        ValueError: naming the file or key at fault, for a file that is not a YAML mapping, an unknown key, a value
            of another type than the key's default, a key set to null where its default is a value, an odd-length
            ``opts``, an invalid ``MODEL.GN`` or ``TEST.VIS_NUM_IMAGES`` value, and settings that would be ignored
            (CUDA graphs or channels last for a backbone that has neither, a group count for Res5ROIHeads' res5).
    """
    cfg = get_cfg()
    add_gn_config(cfg)
    defaults = cfg.clone()
    if not PathManager.isfile(config_file):
        raise FileNotFoundError(f"{config_file or '--config-file'}: no such config file; give one such as "
                                "configs/mask_rcnn_R50_FPN_gn.yaml")
    try:  # yacs asserts; a user's mistake deserves a ValueError that says what to do
        cfg.merge_from_file(config_file)
    except ValueError as e:  # yacs: a value of another type than the key's default
        raise ValueError(f"{config_file}: {_with_type_hint(e)}") from e
    except (AssertionError, KeyError) as e:  # yacs' other checks; a key that does not exist
        raise ValueError(f"{config_file}: {e.args[0]}; a key must be one of Detectron2's defaults or "
                         "gn_detection's (README.md lists those)") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{config_file}: not valid YAML: {e}") from e
    except (TypeError, AttributeError) as e:  # yacs met a value where it expects a mapping or a file name
        raise ValueError(f"{config_file}: {_structure_problem(config_file)} ({e})") from e
    _check_no_nulls(cfg, defaults, config_file)
    if flags := [key for key in list(opts)[::2] if isinstance(key, str) and key.startswith("--")]:
        raise ValueError(f"overrides: {flags[0]} comes after the KEY VALUE pairs, which take it for a key; give the "
                         "flags (--eval-only, --resume, --num-gpus N, ...) before them")
    try:
        cfg.merge_from_list(list(opts))
    except ValueError as e:
        raise ValueError(f"overrides: {_with_type_hint(e)}") from e
    except AssertionError as e:
        raise ValueError(f"overrides: {e}; give KEY VALUE pairs of existing keys, e.g. "
                         "MODEL.GN.NUM_GROUPS 16") from e
    _check_no_nulls(cfg, defaults, "overrides")
    try:
        GroupNormSpec.from_config(cfg)  # checks the MODEL.GN values
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    if cfg.TEST.VIS_NUM_IMAGES < 0:
        raise ValueError(f"{config_file}: TEST.VIS_NUM_IMAGES must be >= 0 (0 draws none), "
                         f"got {cfg.TEST.VIS_NUM_IMAGES}")
    if not 0 <= cfg.TEST.VIS_SCORE_THRESH <= 1:
        raise ValueError(f"{config_file}: TEST.VIS_SCORE_THRESH must be a score from 0 to 1, "
                         f"got {cfg.TEST.VIS_SCORE_THRESH}")
    if problem := ignored_gn_settings_problem(cfg):
        raise ValueError(f"{config_file}: {problem}")
    if cfg.MODEL.CUDA_GRAPHS.BACKBONE and cfg.MODEL.BACKBONE.NAME != FPN_BACKBONE:
        raise ValueError(f"{config_file}: MODEL.CUDA_GRAPHS.BACKBONE needs MODEL.BACKBONE.NAME {FPN_BACKBONE!r}, "
                         f"got {cfg.MODEL.BACKBONE.NAME!r}; set MODEL.CUDA_GRAPHS.BACKBONE False")
    if cfg.MODEL.BACKBONE.CHANNELS_LAST and cfg.MODEL.BACKBONE.NAME not in OUR_BACKBONES:
        raise ValueError(f"{config_file}: MODEL.BACKBONE.CHANNELS_LAST needs MODEL.BACKBONE.NAME to be one of "
                         f"{OUR_BACKBONES}, got {cfg.MODEL.BACKBONE.NAME!r}; set MODEL.BACKBONE.CHANNELS_LAST False")
    return cfg


def check_model_builds(cfg: CN, config_file: str) -> torch.nn.Module:
    """Build the model on PyTorch's meta device (no memory, no initialization: a fraction of a second), so that
    settings it cannot be built from (a group count that does not divide a layer's channels, an unregistered
    component name) are named before any work starts. Returns that model: its tensors' names and shapes.

    Raises:
        ValueError: with the builder's message.
    """
    meta = cfg.clone()
    meta.defrost()
    meta.MODEL.DEVICE = "meta"
    try:
        with torch.device("meta"):
            return build_model(meta)
    except (ValueError, KeyError, AssertionError) as e:
        reason = e.args[0] if e.args else _failed_check(e)  # a KeyError's str() is its message quoted
        raise ValueError(f"{config_file} and the overrides give a model that cannot be built: {reason}") from e


def _failed_check(error: BaseException) -> str:
    """A bare ``assert``'s failure told by its source line and place (Detectron2's builders assert without a
    message, e.g. a box head with neither convs nor fcs)."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"`{frame.line}` failed in {os.path.basename(frame.filename)}, {frame.name}()"
