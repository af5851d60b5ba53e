"""ResNet and ResNet-FPN backbones whose GN layers follow MODEL.GN.

Built from Detectron2's own ResNet, BasicStem, BasicBlock, BottleneckBlock and FPN modules, so the module
tree (and thus every checkpoint key) is the same as Detectron2's ``build_resnet_fpn_backbone``; only the
GN layers differ, and only when MODEL.GN asks for something other than Detectron2's G=32. With
MODEL.GN.FUSE_RELU the GN blocks are subclasses whose GN layers apply the ReLU that follows them, and
(MODEL.GN.RECOMPUTE_OUTPUT) whose convs keep no GN+ReLU output for the backward. With MODEL.CUDA_GRAPHS.BACKBONE
the FPN is a subclass that trains as CUDA graphs (:mod:`gn_detection.cuda_graph`); with
MODEL.BACKBONE.CHANNELS_LAST the ResNet is a subclass that runs in channels-last memory format.
"""
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock

from .cuda_graph import GraphedFPN
from .group_norm import (GroupNormSpec, NormSetting, fold_relu, gn_layer_context, is_integer, recompute_context,
                         resolve_norm)

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# the outputs a ResNet can give (Detectron2's names), fine to coarse
RESNET_OUTPUTS = ("stem", "res2", "res3", "res4", "res5")


class GNReLUStem(BasicStem):
    """Detectron2's stem whose GN layer applies the ReLU before the max-pool."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fold_relu(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with recompute_context([self.conv1], x):
            return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


def _add_shortcut_relu(block, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The residual tail every ResNet block shares: relu(out + shortcut(x)), in place."""
    out += x if block.shortcut is None else block.shortcut(x)
    return F.relu_(out)


class GNReLUBasicBlock(BasicBlock):
    """Detectron2's BasicBlock whose first GN layer applies the ReLU after it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fold_relu(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with recompute_context([self.conv1], x):
            return _add_shortcut_relu(self, self.conv2(self.conv1(x)), x)


class GNReLUBottleneckBlock(BottleneckBlock):
    """Detectron2's BottleneckBlock whose first two GN layers apply the ReLUs after them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fold_relu(self.conv1)
        fold_relu(self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with recompute_context([self.conv1, self.conv2], x):
            return _add_shortcut_relu(self, self.conv3(self.conv2(self.conv1(x))), x)


class ChannelsLastResNet(ResNet):
    """Detectron2's ResNet (the same modules, so the same checkpoint keys) that runs in channels-last (NHWC)
    memory format: its input is converted once, and convolutions, GN layers (with the Triton kernels, which
    keep the layout), residual adds and pooling keep that layout, so its features, and an FPN's and RPN's
    convolutions on them, are NHWC too. On CUDA, cuDNN's tensor-core convolutions work in NHWC and convert NCHW
    inputs and outputs around every call. The conv weights are NHWC too (loading a checkpoint keeps that), so
    that no convolution converts its weight, nor the gradient back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def make_resnet(
    depth: int,
    *,
    norm: NormSetting = "GN",
    gn: GroupNormSpec = GroupNormSpec(),
    in_channels: int = 3,
    stem_out_channels: int = 64,
    res2_out_channels: Optional[int] = None,
    num_groups: int = 1,
    width_per_group: int = 64,
    stride_in_1x1: bool = False,
    res5_dilation: int = 1,
    out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
    freeze_at: int = 0,
    channels_last: bool = False,
) -> ResNet:
    """A ResNet (BasicBlock for depth 18/34, BottleneckBlock for 50+) with GN layers from ``gn`` wherever
    ``norm`` is ``"GN"``. Widths double per stage from ``res2_out_channels`` (default 64 for BasicBlocks, 256 for
    BottleneckBlocks), as in Detectron2. With ``channels_last``, a :class:`ChannelsLastResNet`.

    Raises:
        ValueError, TypeError: naming the argument (and the config key that sets it) and what it takes.
    """
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"depth (MODEL.RESNETS.DEPTH) must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth!r}")
    if not is_integer(res5_dilation) or res5_dilation not in (1, 2):
        raise ValueError(f"res5_dilation (MODEL.RESNETS.RES5_DILATION) must be 1 or 2, got {res5_dilation!r}")
    if not is_integer(freeze_at):
        raise ValueError(f"freeze_at (MODEL.BACKBONE.FREEZE_AT) must be an integer, the stages to freeze (0: none, "
                         f"1: the stem, 2: and res2, ...), got {freeze_at!r}")
    for name, flag, key in (("stride_in_1x1", stride_in_1x1, "MODEL.RESNETS.STRIDE_IN_1X1"),
                            ("channels_last", channels_last, "MODEL.BACKBONE.CHANNELS_LAST")):
        if not isinstance(flag, (bool, np.bool_)):  # a string such as "no" would count as True
            raise TypeError(f"{name} ({key}) must be True or False, got {flag!r}")
    basic = depth < 50
    res2_out_channels = (64 if basic else 256) if res2_out_channels is None else res2_out_channels
    sizes = (("in_channels", in_channels, "the input's channels"),
             ("stem_out_channels", stem_out_channels, "MODEL.RESNETS.STEM_OUT_CHANNELS"),
             ("res2_out_channels", res2_out_channels, "MODEL.RESNETS.RES2_OUT_CHANNELS"),
             ("num_groups", num_groups, "MODEL.RESNETS.NUM_GROUPS"),
             ("width_per_group", width_per_group, "MODEL.RESNETS.WIDTH_PER_GROUP"))
    for name, size, key in sizes:
        if not is_integer(size) or size < 1:
            raise ValueError(f"{name} ({key}) must be an integer >= 1, got {size!r}")
    if isinstance(out_features, str):
        raise TypeError(f"out_features must be a list of stage names, e.g. [{out_features!r}], not a string")
    if not out_features or any(name not in RESNET_OUTPUTS for name in out_features):
        raise ValueError(f"out_features (MODEL.RESNETS.OUT_FEATURES) must name some of {list(RESNET_OUTPUTS)}, got "
                         f"{list(out_features)}")
    if basic and (res2_out_channels != 64 or num_groups != 1 or res5_dilation != 1):
        raise ValueError(
            f"ResNet-{depth} uses BasicBlocks: set res2_out_channels (MODEL.RESNETS.RES2_OUT_CHANNELS) 64 (got "
            f"{res2_out_channels}), num_groups (NUM_GROUPS) 1 (got {num_groups}), res5_dilation (RES5_DILATION) 1 "
            f"(got {res5_dilation})"
        )
    norm = resolve_norm(norm, gn)
    fold = norm is gn and gn.fuse_relu
    stem_class, basic_class, bottleneck_class = (
        (GNReLUStem, GNReLUBasicBlock, GNReLUBottleneckBlock) if fold else (BasicStem, BasicBlock, BottleneckBlock)
    )
    with gn_layer_context(f"the ResNet stem (MODEL.RESNETS.STEM_OUT_CHANNELS={stem_out_channels})"):
        stem = stem_class(in_channels, stem_out_channels, norm=norm)

    stages, stage_in = [], stem_out_channels
    for index, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        scale = 2**index
        stage_out = res2_out_channels * scale
        dilation = res5_dilation if index == 3 else 1
        first_stride = 1 if index == 0 or dilation == 2 else 2
        if basic:
            block_args = {"block_class": basic_class}
            widths = f"{stage_out}"
        else:
            bottleneck = num_groups * width_per_group * scale
            block_args = {
                "block_class": bottleneck_class,
                "bottleneck_channels": bottleneck,
                "stride_in_1x1": stride_in_1x1,
                "dilation": dilation,
                "num_groups": num_groups,
            }
            widths = f"{bottleneck} and {stage_out}"
        where = (
            f"ResNet stage res{index + 2} (GN layers of {widths} channels, set by "
            f"MODEL.RESNETS.RES2_OUT_CHANNELS, NUM_GROUPS and WIDTH_PER_GROUP)"
        )
        with gn_layer_context(where):
            stages.append(
                ResNet.make_stage(
                    num_blocks=num_blocks,
                    stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                    in_channels=stage_in,
                    out_channels=stage_out,
                    norm=norm,
                    **block_args,
                )
            )
        stage_in = stage_out
    resnet_class = ChannelsLastResNet if channels_last else ResNet
    return resnet_class(stem, stages, out_features=list(out_features), freeze_at=freeze_at)


def make_resnet_fpn(
    bottom_up: ResNet,
    *,
    in_features: Sequence[str],
    out_channels: int,
    norm: NormSetting = "GN",
    gn: GroupNormSpec = GroupNormSpec(),
    fuse_type: str = "sum",
    cuda_graph_shapes: Optional[int] = None,
) -> FPN:
    """An FPN (P2-P6, P6 by max-pooling P5) over ``bottom_up`` with GN in its lateral and output convs; with
    ``cuda_graph_shapes``, a :class:`GraphedFPN` that trains on that many input shapes as CUDA graphs. Over a
    :class:`ChannelsLastResNet`, its conv weights are channels last too.

    Raises:
        ValueError: naming the argument (and the config key that sets it) and what it takes.
    """
    _check_fpn_inputs(bottom_up, in_features)
    if fuse_type not in ("sum", "avg"):
        raise ValueError(f"fuse_type (MODEL.FPN.FUSE_TYPE) must be 'sum' or 'avg', got {fuse_type!r}")
    if not is_integer(out_channels) or out_channels < 1:
        raise ValueError(f"out_channels (MODEL.FPN.OUT_CHANNELS) must be an integer >= 1, got {out_channels!r}")
    fpn_class, graphs = (FPN, {}) if cuda_graph_shapes is None else (GraphedFPN, {"max_graphs": cuda_graph_shapes})
    with gn_layer_context(f"the FPN lateral and output convs (MODEL.FPN.OUT_CHANNELS={out_channels})"):
        fpn = fpn_class(
            bottom_up=bottom_up,
            in_features=list(in_features),
            out_channels=out_channels,
            norm=resolve_norm(norm, gn),
            top_block=LastLevelMaxPool(),
            fuse_type=fuse_type,
            **graphs,
        )
    if isinstance(bottom_up, ChannelsLastResNet):  # NHWC features: the FPN's conv weights NHWC too
        fpn.to(memory_format=torch.channels_last)
    return fpn


def _check_fpn_inputs(bottom_up: ResNet, in_features: Sequence[str]) -> None:
    """That ``in_features`` are outputs of ``bottom_up``, each of twice the stride of the one before (the pyramid's
    levels)."""
    shapes = bottom_up.output_shape()
    if isinstance(in_features, str) or not in_features or any(name not in shapes for name in in_features):
        raise ValueError(f"in_features (MODEL.FPN.IN_FEATURES) must name some of the ResNet's outputs "
                         f"(MODEL.RESNETS.OUT_FEATURES) {list(shapes)}, got {in_features!r}")
    strides = [shapes[name].stride for name in in_features]
    if any(coarser != 2 * finer for finer, coarser in zip(strides, strides[1:])):
        raise ValueError(f"in_features (MODEL.FPN.IN_FEATURES) {list(in_features)} have strides {strides}, and an FPN "
                         "needs each twice the one before: consecutive stages, fine to coarse, e.g. ['res2', 'res3', "
                         "'res4', 'res5'], and a res5 without dilation (MODEL.RESNETS.RES5_DILATION 1)")


@BACKBONE_REGISTRY.register()
def build_gn_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet from ``cfg.MODEL.RESNETS``, with GN from ``cfg.MODEL.GN`` where ``RESNETS.NORM`` is "GN"."""
    r = cfg.MODEL.RESNETS
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE is not supported by build_gn_resnet_backbone: deformable "
            "convolution needs Detectron2's compiled _C extension; set it to [False, False, False, False]"
        )
    return make_resnet(
        r.DEPTH,
        norm=r.NORM,
        gn=GroupNormSpec.from_config(cfg),
        in_channels=input_shape.channels,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        stride_in_1x1=r.STRIDE_IN_1X1,
        res5_dilation=r.RES5_DILATION,
        out_features=r.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        channels_last=cfg.MODEL.BACKBONE.CHANNELS_LAST,
    )


@BACKBONE_REGISTRY.register()
def build_gn_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNet-FPN from ``cfg.MODEL.RESNETS`` and ``cfg.MODEL.FPN``, with GN from ``cfg.MODEL.GN``; trained as
    CUDA graphs with ``cfg.MODEL.CUDA_GRAPHS.BACKBONE``."""
    gn = GroupNormSpec.from_config(cfg)  # first: it names a config without gn_detection's keys
    graphs = cfg.MODEL.CUDA_GRAPHS
    return make_resnet_fpn(
        build_gn_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        gn=gn,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        cuda_graph_shapes=graphs.MAX_SHAPES if graphs.BACKBONE else None,
    )
