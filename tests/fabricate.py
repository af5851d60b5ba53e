"""Checkpoints in the published formats, fabricated from a model's own parameters.

The Caffe2 blob names follow Detectron's model builders (ResNet.py, FPN.py, fast_rcnn_heads.py,
mask_rcnn_heads.py: ``ConvGN`` adds ``<prefix>_w`` and the GN's ``<prefix>_gn_s``/``<prefix>_gn_b``),
written out here independently of any converter so the tests can check where each weight lands.
"""
import re

import torch

# Detectron's predictors put the background class first: its cls_score has the background row that
# Detectron2 keeps last, its bbox_pred and mask_fcn_logits have background rows Detectron2 drops.
DROPPED_BACKGROUND_ROWS = {"bbox_pred": 4, "mask_fcn_logits": 1}


def _stage_blocks(state_dict):
    """Index of the last block in each ResNet stage: FPN blobs are named after it (res4_5_sum)."""
    last = {}
    for name in state_dict:
        m = re.search(r"bottom_up\.res(\d)\.(\d+)\.", name)
        if m:
            last[int(m[1])] = max(last.get(int(m[1]), 0), int(m[2]))
    return last


def _suffix(param: str, is_norm: bool) -> str:
    if is_norm:
        return {"weight": "_gn_s", "bias": "_gn_b"}[param]
    return {"weight": "_w", "bias": "_b"}[param]


def caffe2_name(d2_name: str, last_block: dict) -> str:
    """The Detectron blob name of one Detectron2 GN Mask R-CNN parameter."""
    parts = d2_name.split(".")
    param, is_norm = parts[-1], parts[-2] == "norm"
    module = parts[:-2] if is_norm else parts[:-1]
    path = ".".join(module)
    rules = [
        (r"backbone\.bottom_up\.stem\.conv1$", lambda m: "conv1"),
        (r"(?:backbone\.)?(?:bottom_up\.)?res(\d)\.(\d+)\.shortcut$", lambda m: f"res{m[1]}_{m[2]}_branch1"),
        (r"(?:backbone\.)?(?:bottom_up\.)?res(\d)\.(\d+)\.conv([123])$",
         lambda m: f"res{m[1]}_{m[2]}_branch2{'abc'[int(m[3]) - 1]}"),
        (r"backbone\.fpn_lateral5$", lambda m: f"fpn_inner_res5_{last_block[5]}_sum"),
        (r"backbone\.fpn_lateral(\d)$", lambda m: f"fpn_inner_res{m[1]}_{last_block[int(m[1])]}_sum_lateral"),
        (r"backbone\.fpn_output(\d)$", lambda m: f"fpn_res{m[1]}_{last_block[int(m[1])]}_sum"),
        (r"proposal_generator\.rpn_head\.conv$", lambda m: "conv_rpn_fpn2"),
        (r"proposal_generator\.rpn_head\.objectness_logits$", lambda m: "rpn_cls_logits_fpn2"),
        (r"proposal_generator\.rpn_head\.anchor_deltas$", lambda m: "rpn_bbox_pred_fpn2"),
        (r"roi_heads\.box_head\.conv(\d)$", lambda m: f"head_conv{m[1]}"),
        (r"roi_heads\.box_head\.fc1$", lambda m: "fc6"),
        (r"roi_heads\.box_predictor\.cls_score$", lambda m: "cls_score"),
        (r"roi_heads\.box_predictor\.bbox_pred$", lambda m: "bbox_pred"),
        (r"roi_heads\.mask_head\.mask_fcn(\d)$", lambda m: f"_mask_fcn{m[1]}"),
        (r"roi_heads\.mask_head\.deconv$", lambda m: "conv5_mask"),
        (r"roi_heads\.mask_head\.predictor$", lambda m: "mask_fcn_logits"),
    ]
    for pattern, prefix in rules:
        m = re.match(pattern, path)
        if m:
            return prefix(m) + _suffix(param, is_norm)
    raise KeyError(f"no Detectron name for {d2_name}")


def detectron_blobs(model_state: dict, seed: int = 0):
    """(blobs, expected): random Detectron-format blobs for every learnable parameter of a Detectron2
    GN model (background rows added first where Detectron has them), and the tensor each Detectron2
    parameter should hold after conversion."""
    gen = torch.Generator().manual_seed(seed)
    last_block = _stage_blocks(model_state)
    blobs, expected = {}, {}
    for d2_name, tensor in model_state.items():
        if not tensor.is_floating_point() or "pixel_" in d2_name:
            continue
        c2 = caffe2_name(d2_name, last_block)
        value = torch.randn(tensor.shape, generator=gen)
        layer = c2.rsplit("_", 1)[0]
        if layer == "cls_score":
            blob = torch.cat([value[-1:], value[:-1]])
        elif layer in DROPPED_BACKGROUND_ROWS:
            background = torch.randn((DROPPED_BACKGROUND_ROWS[layer], *tensor.shape[1:]), generator=gen)
            blob = torch.cat([background, value])
        else:
            blob = value
        blobs[c2] = blob.numpy()
        expected[d2_name] = value
    return blobs, expected
