"""Detectron2's multi-level ROI pooling with the boxes sorted by level, so that the host waits once per call
instead of once per level."""
from typing import List

import torch
from detectron2.layers import cat
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from detectron2.utils.tracing import is_fx_tracing
from torch import nn


class LevelSortedPooler(nn.Module):
    """Runs a Detectron2 :class:`ROIPooler` (its level poolers and level rule) with the boxes sorted by level.

    Detectron2 pools level by level, selecting each level's boxes with a ``nonzero`` (a host wait each) after a
    ``repeat_interleave`` that numbers the boxes' images (another). Here the boxes are sorted by level (a
    stable sort: each level's boxes keep their order), one ``.tolist()`` of the levels' counts cuts them, and
    the pooled rows are put back in the boxes' order: one wait per call. Every row and every gradient is
    Detectron2's, with the rows of a level pooled in Detectron2's order. A single level, no image, inputs
    that do not fit the pooler, tracing and scripting go to the wrapped pooler itself (which raises its own
    errors), and so do boxes that no level takes (a NaN or negative area: Detectron2 pools them to zeros),
    after the one wait. The wrapped pooler's attributes (``output_size``, ``level_poolers``, ...) read
    through this module.
    """

    def __init__(self, pooler: ROIPooler):
        super().__init__()
        self.pooler = pooler

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # this module's own parameters, buffers and submodules
        except AttributeError:
            return getattr(super().__getattr__("pooler"), name)

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """``pooler(x, box_lists)``: (boxes of all images, channels, output size, output size)."""
        pooler, levels = self.pooler, len(self.pooler.level_poolers)
        if (levels == 1 or not box_lists or len(x) != levels or len(box_lists) != x[0].size(0)
                or torch.jit.is_scripting() or torch.jit.is_tracing() or is_fx_tracing()):
            return pooler(x, box_lists)
        boxes = cat([b.tensor for b in box_lists])
        images = cat([torch.full((len(b),), image, dtype=boxes.dtype, device=boxes.device)
                      for image, b in enumerate(box_lists)])  # filled, not repeat_interleave'd: no wait
        rois = torch.cat([images[:, None], boxes], dim=1)
        level = assign_boxes_to_levels(box_lists, pooler.min_level, pooler.max_level, pooler.canonical_box_size,
                                       pooler.canonical_level)
        order = torch.argsort(level, stable=True)
        counts = (level == torch.arange(levels, device=level.device)[:, None]).sum(1).tolist()  # the one wait
        if sum(counts) != len(level):  # boxes of no level
            return pooler(x, box_lists)
        pooled = cat([level_pooler(features, level_rois) for level_pooler, features, level_rois
                      in zip(pooler.level_poolers, x, rois[order].split(counts))])
        return torch.empty_like(pooled).index_put_((order,), pooled)
