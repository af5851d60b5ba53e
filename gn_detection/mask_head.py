"""The mask head with GN after each of its convs."""
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from .group_norm import (GroupNormSpec, NormSetting, check_layer_widths, fold_relus, gn_layer_context, is_integer,
                         recompute_context, resolve_norm)


@ROI_MASK_HEAD_REGISTRY.register()
class GNMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """Detectron2's mask head (convs, 2x deconv, per-class predictor) whose conv norms follow MODEL.GN.

    With ``ROI_MASK_HEAD.NORM "GN"`` each of its ``NUM_CONV`` (4) convs is followed by GN and ReLU.
    Parameter names equal Detectron2's MaskRCNNConvUpsampleHead.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dims: List[int],
        conv_norm: NormSetting = "GN",
        gn: GroupNormSpec = GroupNormSpec(),
        **kwargs,
    ):
        """
        Args:
            input_shape, num_classes, conv_dims, kwargs: as in :class:`MaskRCNNConvUpsampleHead`.
            conv_norm: norm after each conv; ``"GN"`` builds it from ``gn``.
            gn: the group setting for GN layers.

        Raises:
            ValueError: for widths or a class count below 1, naming the argument and its config key.
        """
        check_layer_widths(conv_dims, "conv_dims", "MODEL.ROI_MASK_HEAD.NUM_CONV x CONV_DIM, then the deconv's")
        if not conv_dims or not is_integer(num_classes) or num_classes < 1:
            raise ValueError(f"conv_dims must end in the deconv's width and num_classes (MODEL.ROI_HEADS.NUM_CLASSES) "
                             f"be an integer >= 1; got {conv_dims!r} and {num_classes!r}")
        with gn_layer_context(f"the mask head convs ({conv_dims[:-1]} channels, MODEL.ROI_MASK_HEAD.CONV_DIM)"):
            super().__init__(
                input_shape,
                num_classes=num_classes,
                conv_dims=conv_dims,
                conv_norm=resolve_norm(conv_norm, gn),
                **kwargs,
            )
        fold_relus(self.conv_norm_relus, conv_norm, gn)

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        with recompute_context(self.conv_norm_relus, x):
            return super().layers(x)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "gn": GroupNormSpec.from_config(cfg)}
