"""The 4conv1fc box head with GN after each conv."""
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead

from .group_norm import (GroupNormSpec, NormSetting, check_layer_widths, fold_relus, gn_layer_context,
                         recompute_context, resolve_norm)


@ROI_BOX_HEAD_REGISTRY.register()
class GNConvFCHead(FastRCNNConvFCHead):
    """Detectron2's conv+fc box head whose conv norms follow MODEL.GN.

    The paper's head is 4 convs (3x3, each followed by GN and ReLU) and 1 fc: ``ROI_BOX_HEAD.NUM_CONV 4``,
    ``NUM_FC 1``, ``NORM "GN"`` in the configs. Parameter names equal Detectron2's FastRCNNConvFCHead.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        conv_dims: List[int],
        fc_dims: List[int],
        conv_norm: NormSetting = "GN",
        gn: GroupNormSpec = GroupNormSpec(),
    ):
        """
        Args:
            input_shape, conv_dims, fc_dims: as in :class:`FastRCNNConvFCHead`.
            conv_norm: norm after each conv; ``"GN"`` builds it from ``gn``.
            gn: the group setting for GN layers.

        Raises:
            ValueError: for widths below 1 or no layer at all, naming the argument and its config key.
        """
        check_layer_widths(conv_dims, "conv_dims", "MODEL.ROI_BOX_HEAD.NUM_CONV x CONV_DIM")
        check_layer_widths(fc_dims, "fc_dims", "MODEL.ROI_BOX_HEAD.NUM_FC x FC_DIM")
        if not len(conv_dims) + len(fc_dims):
            raise ValueError("conv_dims and fc_dims are both empty: the box head needs at least one conv or fc "
                             "(MODEL.ROI_BOX_HEAD.NUM_CONV, NUM_FC)")
        with gn_layer_context(f"the box head convs ({conv_dims} channels, MODEL.ROI_BOX_HEAD.CONV_DIM)"):
            super().__init__(
                input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=resolve_norm(conv_norm, gn)
            )
        fold_relus(self.conv_norm_relus, conv_norm, gn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with recompute_context(self.conv_norm_relus, x):
            return super().forward(x)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "gn": GroupNormSpec.from_config(cfg)}
