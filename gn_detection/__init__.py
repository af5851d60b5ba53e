"""Group Normalization for Mask R-CNN in Detectron2.

Importing this package registers the GN backbones, box head and mask head, RPNs and ROI heads that work on all
images at once, and the synthetic ``shapes_train``/``shapes_val`` datasets in Detectron2's registries; nothing
of Detectron2 is modified.
"""
import os

from . import backbone, box_head, mask_head, model_zoo, roi_heads, rpn  # noqa: F401  (registration)
from .config import add_gn_config
from .datasets import datasets_root, register_shapes
from .group_norm import GroupNormChannelsError, GroupNormSpec

register_shapes(os.path.join(datasets_root(), "shapes"))

__all__ = ["add_gn_config", "GroupNormSpec", "GroupNormChannelsError", "register_shapes"]
