"""Registration, config keys, every shipped config building, and key-for-key compatibility with
Detectron2's own GN Mask R-CNN."""
import ast
import glob
import os
import re

import pytest
import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import (BACKBONE_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, ROI_BOX_HEAD_REGISTRY,
                                 ROI_HEADS_REGISTRY, ROI_MASK_HEAD_REGISTRY, build_model)
from torch import nn

import gn_detection
from gn_detection.config import load_config
from gn_detection.group_norm import GroupNormChannelsError, GroupNormSpec

from .conftest import CONFIGS, REPO, SHAPES_CONFIG, backbone_features_and_gradients, make_cfg

ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))


README = os.path.join(REPO, "README.md")


def readme_table_rows(first_cell_pattern):
    """The cells of README.md's table rows whose first cell matches ``first_cell_pattern``."""
    with open(README) as f:
        rows = [[cell.strip().strip("`") for cell in line.strip().strip("|").split("|")] for line in f
                if line.startswith("|")]
    return [row for row in rows if re.fullmatch(first_cell_pattern, row[0])]


def test_components_are_registered():
    assert "build_gn_resnet_fpn_backbone" in BACKBONE_REGISTRY
    assert "build_gn_resnet_backbone" in BACKBONE_REGISTRY
    assert "GNConvFCHead" in ROI_BOX_HEAD_REGISTRY
    assert "GNMaskRCNNConvUpsampleHead" in ROI_MASK_HEAD_REGISTRY
    assert "BatchedNMSRPN" in PROPOSAL_GENERATOR_REGISTRY and "BatchedRPN" in PROPOSAL_GENERATOR_REGISTRY
    assert "BatchedROIHeads" in ROI_HEADS_REGISTRY


def test_readme_registry_table_names_what_is_registered():
    registries = {r._name: r for r in (BACKBONE_REGISTRY, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY,
                                        PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY)}
    rows = readme_table_rows(r"[A-Z_]+_REGISTRY")
    listed = {(registry, name) for registry, name, *_ in rows}
    ours = {(f"{r._name}_REGISTRY", name) for r in registries.values() for name, obj in r
            if obj.__module__.startswith("gn_detection.")}
    assert listed == ours


def flat_config(cfg, prefix=""):
    """{"MODEL.GN.EPS": 1e-05, ...}: every leaf of a config."""
    leaves = {}
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            leaves.update(flat_config(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_adding_our_keys_again_keeps_the_values_set_since():
    cfg = get_cfg()
    gn_detection.add_gn_config(cfg)
    cfg.merge_from_list(["MODEL.GN.NUM_GROUPS", 8, "MODEL.BACKBONE.CHANNELS_LAST", True])
    gn_detection.add_gn_config(cfg)  # e.g. a second project's setup calling it too
    assert cfg.MODEL.GN.NUM_GROUPS == 8 and cfg.MODEL.BACKBONE.CHANNELS_LAST
    partial = get_cfg()
    partial.MODEL.GN = CfgNode({"NUM_GROUPS": 16})  # e.g. another plugin's MODEL.GN
    gn_detection.add_gn_config(partial)
    assert partial.MODEL.GN.NUM_GROUPS == 16 and partial.MODEL.GN.EPS == 1e-5 and "CUDA_GRAPHS" in partial.MODEL


def test_readme_config_table_gives_every_added_key_and_its_default():
    cfg = get_cfg()
    gn_detection.add_gn_config(cfg)
    detectron2_keys = flat_config(get_cfg()).keys()
    added = {key: value for key, value in flat_config(cfg).items() if key not in detectron2_keys}
    assert {"MODEL.GN.NUM_GROUPS", "MODEL.BACKBONE.CHANNELS_LAST", "TEST.VIS_NUM_IMAGES"} <= added.keys()
    documented = {}
    for key, default, *_ in readme_table_rows(r"(MODEL|TEST|SOLVER|INPUT|DATASETS)\.[A-Z_.]+"):
        try:
            documented[key] = ast.literal_eval(default)
        except (ValueError, SyntaxError):  # a word: auto
            documented[key] = default
    assert documented == added


def gn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_config_builds(path):
    cfg = make_cfg(path)
    model = build_model(cfg)
    has_gn = bool(gn_layers(model))
    assert has_gn == (cfg.MODEL.RESNETS.NORM == "GN")
    assert all(m.num_groups == 32 for m in gn_layers(model))


def test_gn_everywhere_means_backbone_fpn_and_both_heads():
    model = build_model(make_cfg(SHAPES_CONFIG))
    names = {n.split(".")[0] + "." + n.split(".")[1] for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    assert names == {"backbone.bottom_up", "backbone.fpn_lateral2", "backbone.fpn_lateral3", "backbone.fpn_lateral4",
                     "backbone.fpn_lateral5", "backbone.fpn_output2", "backbone.fpn_output3", "backbone.fpn_output4",
                     "backbone.fpn_output5", "roi_heads.box_head", "roi_heads.mask_head"}
    box_head = model.roi_heads.box_head
    assert len(box_head.conv_norm_relus) == 4 and len(box_head.fcs) == 1  # 4conv1fc
    assert len(model.roi_heads.mask_head.conv_norm_relus) == 4


@pytest.mark.parametrize(
    "opts, expect_groups",
    [
        (["MODEL.GN.NUM_GROUPS", 1], lambda m: m.num_groups == 1),  # LayerNorm-like
        (["MODEL.GN.CHANNELS_PER_GROUP", 1], lambda m: m.num_groups == m.num_channels),  # InstanceNorm-like
        (["MODEL.GN.CHANNELS_PER_GROUP", 16], lambda m: m.num_groups == m.num_channels // 16),
        (["MODEL.GN.NUM_GROUPS", 8, "MODEL.GN.EPS", 1e-3], lambda m: m.num_groups == 8 and m.eps == 1e-3),
    ],
)
def test_every_gn_layer_follows_model_gn(opts, expect_groups):
    layers = gn_layers(build_model(make_cfg(SHAPES_CONFIG, *opts)))
    assert len(layers) == 36 and all(expect_groups(m) for m in layers)  # 20, FPN: 8, heads: 4 + 4


@pytest.mark.parametrize(
    "opts, names",
    [
        (["MODEL.FPN.OUT_CHANNELS", 48], ["FPN", "MODEL.FPN.OUT_CHANNELS=48", "48 channels", "NUM_GROUPS=32"]),
        (["MODEL.ROI_BOX_HEAD.CONV_DIM", 40], ["box head", "ROI_BOX_HEAD.CONV_DIM", "40 channels"]),
        (["MODEL.ROI_MASK_HEAD.CONV_DIM", 40], ["mask head", "ROI_MASK_HEAD.CONV_DIM", "40 channels"]),
        (["MODEL.RESNETS.STEM_OUT_CHANNELS", 48], ["stem", "STEM_OUT_CHANNELS=48", "48 channels"]),
        (["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "MODEL.RESNETS.WIDTH_PER_GROUP", 48],
         ["ResNet stage res2", "48 and 256 channels", "WIDTH_PER_GROUP", "NUM_GROUPS=32"]),
        (["MODEL.GN.CHANNELS_PER_GROUP", 48], ["ResNet stem", "64 channels", "CHANNELS_PER_GROUP=48"]),
    ],
)
def test_indivisible_width_fails_at_build_naming_layer_channels_and_setting(opts, names):
    with pytest.raises(GroupNormChannelsError) as e:
        build_model(make_cfg(SHAPES_CONFIG, *opts))
    for name in names:
        assert name in str(e.value)


def test_deformable_conv_is_refused_with_the_key():
    cfg = make_cfg(SHAPES_CONFIG, "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256,
                   "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True])
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEFORM_ON_PER_STAGE"):
        build_model(cfg)


def detectron2_cfg(zoo_config, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def state_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "ours, theirs, opts",
    [
        ("mask_rcnn_R50_FPN_gn.yaml", "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", []),
        ("scratch_mask_rcnn_R50_FPN_gn_3x.yaml", "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml", []),
        ("mask_rcnn_R101_FPN_gn.yaml", "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", ["MODEL.RESNETS.DEPTH", 101]),
    ],
)
def test_same_keys_shapes_and_frozen_params_as_detectron2_gn(ours, theirs, opts):
    our_model = build_model(make_cfg(os.path.join(CONFIGS, ours)))
    their_model = build_model(detectron2_cfg(theirs, *opts))
    assert state_shapes(our_model) == state_shapes(their_model)
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(our_model) == trainable(their_model)


def test_detectron2_gn_weights_load_and_give_identical_outputs():
    torch.manual_seed(0)
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "INPUT.MIN_SIZE_TEST", 256, "INPUT.MAX_SIZE_TEST", 320]
    theirs = build_model(detectron2_cfg("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", *opts)).eval()
    ours = build_model(make_cfg(os.path.join(CONFIGS, "mask_rcnn_R50_FPN_gn_3x.yaml"), *opts)).eval()
    # perturb GN affine parameters so a misplaced GN weight would show in the outputs
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    incompatible = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    image = torch.randint(0, 255, (3, 256, 320), dtype=torch.uint8)
    inputs = [{"image": image, "height": 256, "width": 320}]
    with torch.no_grad():
        a, b = theirs(inputs)[0]["instances"], ours(inputs)[0]["instances"]
        features_a = theirs.backbone(theirs.preprocess_image(inputs).tensor)
        features_b = ours.backbone(ours.preprocess_image(inputs).tensor)
    for level in features_a:
        torch.testing.assert_close(features_a[level], features_b[level], rtol=0, atol=0)
    assert len(a) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=0, atol=0)


def test_frozen_bn_baseline_matches_detectron2_builder():
    ours = build_model(make_cfg(os.path.join(CONFIGS, "mask_rcnn_R50_FPN_frozenbn_4conv1fc.yaml")))
    theirs = build_model(detectron2_cfg(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        "MODEL.ROI_BOX_HEAD.NUM_CONV", 4, "MODEL.ROI_BOX_HEAD.NUM_FC", 1,
    ))
    assert state_shapes(ours) == state_shapes(theirs)
    assert not gn_layers(ours)


def test_components_are_usable_from_python_without_a_config():
    from detectron2.layers import ShapeSpec

    from gn_detection import GroupNormSpec
    from gn_detection.backbone import make_resnet, make_resnet_fpn
    from gn_detection.box_head import GNConvFCHead
    from gn_detection.mask_head import GNMaskRCNNConvUpsampleHead

    box_head = GNConvFCHead(ShapeSpec(channels=32, height=7, width=7), conv_dims=[32] * 4, fc_dims=[64],
                            gn=GroupNormSpec(num_groups=16))
    assert box_head(torch.randn(5, 32, 7, 7)).shape == (5, 64)
    assert {m.num_groups for m in gn_layers(box_head)} == {16}
    mask_head = GNMaskRCNNConvUpsampleHead(ShapeSpec(channels=32, height=14, width=14), num_classes=3,
                                           conv_dims=[32] * 5, gn=GroupNormSpec(channels_per_group=8))
    assert mask_head.layers(torch.randn(2, 32, 14, 14)).shape == (2, 3, 28, 28)
    assert {m.num_groups for m in gn_layers(mask_head)} == {4}
    fpn = make_resnet_fpn(make_resnet(18, res2_out_channels=64, gn=GroupNormSpec(num_groups=8)),
                          in_features=["res2", "res3", "res4", "res5"], out_channels=32,
                          gn=GroupNormSpec(num_groups=8))
    features = fpn(torch.randn(1, 3, 64, 64))
    assert sorted(features) == ["p2", "p3", "p4", "p5", "p6"] and features["p2"].shape == (1, 32, 16, 16)


def spatial_conv_weights(module):
    """The 3x3 and 7x7 conv weights of ``module`` (a 1x1 weight is laid out alike either way)."""
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_channels_last_backbone_computes_what_the_nchw_one_does(impl):
    # Against the NCHW model with torch's GN; "triton": the kernels in their channels-last layout (in the
    # interpreter without a GPU). Convolutions sum in another order channels last, and GN of small groups
    # magnifies that: hence tolerances of 1e-3.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    nchw = build_model(make_cfg(SHAPES_CONFIG, "MODEL.GN.IMPL", "torch", "MODEL.FPN.OUT_CHANNELS", 32))
    nhwc = build_model(make_cfg(SHAPES_CONFIG, "MODEL.GN.IMPL", impl, "MODEL.FPN.OUT_CHANNELS", 32,
                                "MODEL.BACKBONE.CHANNELS_LAST", True))
    incompatible = nhwc.load_state_dict(nchw.state_dict(), strict=True)  # the same checkpoint keys
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    kernels = spatial_conv_weights(nhwc.backbone)
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    images = torch.randn(1, 3, 64, 96, device=device)  # one small image: the kernels run in the interpreter
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):  # fp32 as on the CPU
        want_features, want_grads = backbone_features_and_gradients(nchw.to(device), images)
        features, grads = backbone_features_and_gradients(nhwc.to(device), images)
    # torch's group_norm keeps the layout only on the CPU; on CUDA it returns NCHW (hence the kernels' layout)
    keeps_layout = impl == "triton" or device == "cpu"
    for level, want in want_features.items():
        assert features[level].is_contiguous(memory_format=torch.channels_last) or not keeps_layout, level
        assert want.is_contiguous(), level  # the default stays NCHW
        torch.testing.assert_close(features[level], want, rtol=1e-3, atol=1e-3, msg=lambda m: f"{level}: {m}")
    for name, want in want_grads.items():
        scale = want.abs().max().item() + 1e-6
        torch.testing.assert_close(grads[name], want, rtol=1e-3, atol=1e-3 * scale, msg=lambda m: f"{name}: {m}")


def test_a_channels_last_resnet_keeps_its_conv_weights_channels_last():
    from gn_detection.backbone import make_resnet

    resnet = make_resnet(18, res2_out_channels=64, gn=GroupNormSpec(num_groups=8), channels_last=True)
    kernels = spatial_conv_weights(resnet)
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    resnet.load_state_dict(make_resnet(18, res2_out_channels=64, gn=GroupNormSpec(num_groups=8)).state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)  # loading keeps the layout


def test_channels_last_is_refused_for_a_backbone_that_would_ignore_it():
    with pytest.raises(ValueError, match="MODEL.BACKBONE.CHANNELS_LAST needs MODEL.BACKBONE.NAME"):
        make_cfg(SHAPES_CONFIG, "MODEL.BACKBONE.CHANNELS_LAST", True,
                 "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone")


@pytest.mark.parametrize("config, opts, message", [
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml",
     ["MODEL.BACKBONE.NAME", "build_gn_resnet_backbone", "MODEL.RESNETS.NORM", "GN"],
     "MODEL.ROI_HEADS.NAME 'Res5ROIHeads' builds res5 (MODEL.RESNETS.NORM GN) with Detectron2's own GN"),
    ("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", [],  # Detectron2's GN model: its components read no MODEL.GN key
     "MODEL.BACKBONE.NAME 'build_resnet_fpn_backbone' builds the ResNet (MODEL.RESNETS.NORM GN) with Detectron2's"),
    ("configs/mask_rcnn_R50_FPN_gn.yaml", ["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"],
     "MODEL.ROI_BOX_HEAD.NAME 'FastRCNNConvFCHead' builds the box head (MODEL.ROI_BOX_HEAD.NORM GN)"),
    ("COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml", [],  # its semantic head's NORM is GN by default
     "MODEL.SEM_SEG_HEAD.NAME 'SemSegFPNHead' builds the semantic segmentation head (MODEL.SEM_SEG_HEAD.NORM GN)"),
])
def test_group_settings_a_detectron2_component_would_ignore_are_refused(config, opts, message):
    path = config if config.startswith("configs/") else model_zoo.get_config_file(config)
    assert load_config(path, opts).MODEL.GN.NUM_GROUPS == 32  # Detectron2's own GN: the same groups
    for groups in (["MODEL.GN.NUM_GROUPS", 16], ["MODEL.GN.CHANNELS_PER_GROUP", 16], ["MODEL.GN.EPS", 0.001]):
        with pytest.raises(ValueError) as error:
            load_config(path, [*opts, *groups])
        assert f"{groups[0]} {groups[1]} set the GN layers gn_detection builds, but {message}" in str(error.value)
        assert str(error.value).endswith("or leave MODEL.GN.NUM_GROUPS 32, CHANNELS_PER_GROUP 0 and EPS 1e-05") == (
            "Panoptic" not in config)  # no GN semantic head of ours to use instead
    assert load_config("configs/mask_rcnn_R50_FPN_gn.yaml", ["MODEL.GN.NUM_GROUPS", 16])  # ours, all of them


@pytest.mark.parametrize("opts", [
    ["MODEL.BACKBONE.NAME", "build_my_gn_backbone"],  # a user's, which may read MODEL.GN (e.g. via make_resnet)
    ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"],  # no box head there
    ["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_CONV", 0],  # no GN layer in it
    ["MODEL.MASK_ON", False, "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"],  # no mask head
])
def test_group_settings_no_detectron2_gn_layer_would_ignore_pass(opts):
    assert load_config("configs/mask_rcnn_R50_FPN_gn.yaml", [*opts, "MODEL.GN.NUM_GROUPS", 16])
    # Detectron2's 256-channel box head convs get 32 groups of 8 channels: the layers asked for
    assert load_config("configs/mask_rcnn_R50_FPN_gn.yaml", ["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
                                                             "MODEL.GN.CHANNELS_PER_GROUP", 8])


@pytest.mark.parametrize("key, name", [("MODEL.BACKBONE.NAME", "build_gn_resnet_fpn_backbone"),
                                       ("MODEL.BACKBONE.NAME", "build_gn_resnet_backbone"),
                                       ("MODEL.ROI_BOX_HEAD.NAME", "GNConvFCHead"),
                                       ("MODEL.ROI_MASK_HEAD.NAME", "GNMaskRCNNConvUpsampleHead")])
def test_a_config_without_our_keys_says_how_to_add_them(key, name):
    cfg = get_cfg()  # Detectron2's own, without add_gn_config
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", key, name])
    with pytest.raises(KeyError, match="lacks gn_detection's keys .* call gn_detection.add_gn_config"):
        with torch.device("meta"):
            build_model(cfg)


def test_make_resnet_from_python_defaults_its_widths_to_the_depth_and_names_bad_arguments():
    from gn_detection.backbone import make_resnet

    assert make_resnet(18).res2[0].conv1.in_channels == 64 and make_resnet(50).res5[0].conv3.out_channels == 2048
    for kwargs, message in (({"res2_out_channels": 0}, r"res2_out_channels \(MODEL.RESNETS.RES2_OUT_CHANNELS\) must "
                                                      r"be an integer >= 1, got 0"),
                            ({"in_channels": -3}, r"in_channels \(the input's channels\) must be an integer >= 1"),
                            ({"res2_out_channels": 256}, r"ResNet-18 uses BasicBlocks: set res2_out_channels"),
                            ({"res5_dilation": 2.0}, r"res5_dilation \(MODEL.RESNETS.RES5_DILATION\) must be 1 or 2"),
                            ({"res5_dilation": True}, r"res5_dilation .* must be 1 or 2, got True"),
                            ({"freeze_at": "2"}, r"freeze_at \(MODEL.BACKBONE.FREEZE_AT\) must be an integer, the "
                                                 r"stages to freeze .* got '2'")):
        with pytest.raises(ValueError, match=message):
            make_resnet(18, **kwargs)
    for flag in ("stride_in_1x1", "channels_last"):  # "no" would count as True
        with pytest.raises(TypeError, match=f"{flag} \\(MODEL.* must be True or False, got 'no'"):
            make_resnet(50, **{flag: "no"})
    assert make_resnet(18, freeze_at=np.int64(6), stride_in_1x1=np.bool_(True))  # numpy's, as arrays give them
    with pytest.raises(ValueError, match=r"depth \(MODEL.RESNETS.DEPTH\) must be one of .*, got '50'"):
        make_resnet("50")
    with pytest.raises(TypeError, match=r"out_features must be a list of stage names, e.g. \['res5'\]"):
        make_resnet(50, out_features="res5")
    with pytest.raises(ValueError, match=r"out_features \(MODEL.RESNETS.OUT_FEATURES\) must name some of \['stem', "
                                         r"'res2', 'res3', 'res4', 'res5'\], got \['res6'\]"):
        make_resnet(50, out_features=["res6"])


@pytest.mark.parametrize("kwargs, message", [
    ({"in_features": ["res2", "res3", "res7"]}, r"in_features \(MODEL.FPN.IN_FEATURES\) must name some of the "
                                                r"ResNet's outputs \(MODEL.RESNETS.OUT_FEATURES\) \['res2', 'res3', "
                                                r"'res4'\], got \['res2', 'res3', 'res7'\]"),
    ({"in_features": []}, r"in_features .* got \[\]"),
    ({"in_features": "res2"}, r"in_features .* got 'res2'"),
    ({"in_features": ["res3", "res2"]}, r"\['res3', 'res2'\] have strides \[8, 4\], and an FPN needs each twice"),
    ({"in_features": ["res2", "res4"]}, r"have strides \[4, 16\]"),
    ({"fuse_type": "max"}, r"fuse_type \(MODEL.FPN.FUSE_TYPE\) must be 'sum' or 'avg', got 'max'"),
    ({"out_channels": 0}, r"out_channels \(MODEL.FPN.OUT_CHANNELS\) must be an integer >= 1, got 0"),
])
def test_make_resnet_fpn_from_python_names_bad_arguments(kwargs, message):
    from gn_detection.backbone import make_resnet, make_resnet_fpn

    with torch.device("meta"):
        resnet = make_resnet(18, out_features=["res2", "res3", "res4"])
        make_resnet_fpn(resnet, **{"in_features": ["res2", "res3", "res4"], "out_channels": 32})  # builds
        with pytest.raises(ValueError, match=message):
            make_resnet_fpn(resnet, **{"in_features": ["res2", "res3", "res4"], "out_channels": 32, **kwargs})


def test_heads_and_norms_from_python_name_bad_arguments():
    from detectron2.layers import ShapeSpec

    from gn_detection.box_head import GNConvFCHead
    from gn_detection.mask_head import GNMaskRCNNConvUpsampleHead

    rois = ShapeSpec(channels=64, height=7, width=7)
    for kwargs, message in (({"conv_dims": [0, 0], "fc_dims": [16]}, r"conv_dims \(MODEL.ROI_BOX_HEAD.NUM_CONV x "
                                                                      r"CONV_DIM\) must be a list of integers >= 1"),
                            ({"conv_dims": [], "fc_dims": [-5]}, r"fc_dims .* must be a list of integers >= 1"),
                            ({"conv_dims": [], "fc_dims": []}, "conv_dims and fc_dims are both empty"),
                            ({"conv_dims": [64], "fc_dims": [16], "conv_norm": "gn"}, "norm 'gn' is not one"),
                            ({"conv_dims": 256, "fc_dims": [16]}, r"conv_dims .* must be a list of integers >= 1, got "
                                                                  "256"),
                            ({"conv_dims": [64], "fc_dims": None}, r"fc_dims .* got None")):
        with pytest.raises(ValueError, match=message):
            GNConvFCHead(rois, **kwargs)
    for gn in (None, 16):
        with pytest.raises(TypeError, match=rf"gn must be a GroupNormSpec \(e.g. GroupNormSpec\(num_groups=32\)\) "
                                            rf"where norm is 'GN', got {gn}"):
            GNConvFCHead(rois, conv_dims=[64], fc_dims=[16], gn=gn)
    with pytest.raises(ValueError, match=r"num_classes \(MODEL.ROI_HEADS.NUM_CLASSES\) be an integer >= 1; got "
                                         r"\[64, 64\] and 0"):
        GNMaskRCNNConvUpsampleHead(ShapeSpec(channels=64, height=14, width=14), num_classes=0, conv_dims=[64, 64])
    assert GNConvFCHead(rois, conv_dims=[64], fc_dims=[16], conv_norm="FrozenBN").output_shape.channels == 16
    assert GNConvFCHead(rois, conv_dims=range(32, 96, 32), fc_dims=(16,)).output_shape.channels == 16  # a sequence
