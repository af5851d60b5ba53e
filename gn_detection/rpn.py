"""Detectron2's RPN with all images' per-level NMS in two kernel launches and one synchronization, and with all
images' anchors labeled and sampled at once, without one, and their losses computed at once."""
import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from fvcore.nn import smooth_l1_loss

from .batched_targets import match, pad_rows, require_detectron2_matcher, sample_labels
from .group_norm import triton_available


@PROPOSAL_GENERATOR_REGISTRY.register()
class BatchedNMSRPN(RPN):
    """Detectron2's :class:`RPN` (same config, parameters and losses) whose proposal selection runs every
    (image, level) NMS at once: ``MODEL.PROPOSAL_GENERATOR.NAME "BatchedNMSRPN"``.

    Detectron2 selects each image's proposals in turn: a top-k per level, clipping, small boxes dropped, a
    torchvision NMS over all levels (boxes of different levels never suppress each other) and the
    POST_NMS_TOPK best of the survivors, with a few host synchronizations per image. Here the same steps run on
    all images together, the NMS as :func:`gn_detection.triton_nms.segmented_nms`, and the host waits once.
    The proposals are the same boxes and scores in the same order, tied scores included (see
    :mod:`gn_detection.triton_nms` on IoUs within float rounding of the threshold). The kernels need
    Triton and CUDA tensors (or CPU tensors with ``TRITON_INTERPRET=1``); otherwise, and while tracing,
    Detectron2's own selection runs.
    """

    def predict_proposals(self, anchors: List[Boxes], pred_objectness_logits: List[torch.Tensor],
                          pred_anchor_deltas: List[torch.Tensor], image_sizes: List[Tuple[int, int]]):
        if torch.jit.is_tracing() or torch.jit.is_scripting() or not kernels_run_on(pred_anchor_deltas[0].device):
            return super().predict_proposals(anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
        with torch.no_grad():  # proposals are constants for the ROI heads, as in Detectron2
            return select_proposals(self._decode_proposals(anchors, pred_anchor_deltas), pred_objectness_logits,
                                    image_sizes, self.nms_thresh, self.pre_nms_topk[self.training],
                                    self.post_nms_topk[self.training], self.min_box_size, self.training)


@PROPOSAL_GENERATOR_REGISTRY.register()
class BatchedRPN(BatchedNMSRPN):
    """:class:`BatchedNMSRPN` whose training targets and losses are computed for all images at once as well:
    ``MODEL.PROPOSAL_GENERATOR.NAME "BatchedRPN"``.

    Detectron2 labels each image's anchors in turn (their IoUs with its GT boxes, the anchor matcher, a random
    subsample of BATCH_SIZE_PER_IMAGE of them), with several host synchronizations per image. Here one padded
    (images, GT boxes, anchors) IoU tensor is matched and one sort of random keys samples every image
    (:mod:`gn_detection.batched_targets`); the host never waits. Labels and matched boxes before sampling are
    Detectron2's, exactly; the sample is drawn from the same distribution (a uniformly random subset of the
    same size per image), not from the same random numbers. The losses (see :meth:`losses`) are Detectron2's
    up to the order of their sums. Runs on the CPU and CUDA, without Triton.
    """

    @configurable
    def __init__(self, **kwargs):
        """As Detectron2's :class:`RPN`; refuses an anchor matcher other than Detectron2's ``Matcher``."""
        super().__init__(**kwargs)
        require_detectron2_matcher(self.anchor_matcher, "BatchedRPN", "anchor_matcher",
                                   "MODEL.PROPOSAL_GENERATOR.NAME BatchedNMSRPN")

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: List[Boxes],
                                 gt_instances: List[Instances]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        anchors = Boxes.cat(anchors)
        gt_boxes, present = pad_rows([x.gt_boxes.tensor for x in gt_instances])
        labels, matches = match(anchors.tensor, gt_boxes, present, self.anchor_matcher)
        # an image without GT gets zeros, as in Detectron2 (its padding row)
        matched_boxes = gt_boxes.gather(1, matches.unsqueeze(-1).expand(-1, -1, 4))
        if self.anchor_boundary_thresh >= 0:  # legacy, off by default (as in Detectron2)
            for image_labels, instances in zip(labels, gt_instances):
                inside = anchors.inside_box(instances.image_size, self.anchor_boundary_thresh)
                image_labels.masked_fill_(~inside, -1)
        labels = sample_labels(labels, self.batch_size_per_image, self.positive_fraction, background=0)
        return list(labels.unbind()), list(matched_boxes.unbind())

    @torch.jit.unused
    def losses(self, anchors: List[Boxes], pred_objectness_logits: List[torch.Tensor], gt_labels: List[torch.Tensor],
               pred_anchor_deltas: List[torch.Tensor], gt_boxes: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Detectron2's RPN losses and logged anchor counts, for all images at once. Detectron2 computes each
        image's regression targets in turn (each :meth:`Box2BoxTransform.get_deltas` asserts on the host) and
        selects the sampled anchors with boolean masks (a host wait each, forward and backward); here the
        targets of all images are one call, the losses are masked sums, and the host waits for the two logged
        counts together. Each anchor's loss and gradient is Detectron2's; only the order of the sums differs.
        Box regression losses other than smooth L1 (GIoU) run Detectron2's own code."""
        if self.box_reg_loss_type != "smooth_l1":
            return super().losses(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        num_images = len(gt_labels)
        labels = torch.stack(gt_labels)  # (images, anchors)
        positive, sampled = labels == 1, labels >= 0
        positive_rows = positive.unsqueeze(-1)  # over the 4 box coordinates
        num_positive, num_negative = torch.stack([positive.sum(), (labels == 0).sum()]).tolist()
        storage = get_event_storage()
        storage.put_scalar("rpn/num_pos_anchors", num_positive / num_images)
        storage.put_scalar("rpn/num_neg_anchors", num_negative / num_images)

        anchors = type(anchors[0]).cat(anchors).tensor
        # an anchor that is not positive regresses onto itself: a finite target (an image without GT matched
        # zero boxes), which the masked prediction below meets exactly (a loss of 0)
        targets = torch.where(positive_rows, torch.stack(gt_boxes), anchors)
        deltas = self.box2box_transform.get_deltas(anchors.expand_as(targets).reshape(-1, 4), targets.reshape(-1, 4))
        deltas = deltas.view_as(targets)
        # the masks go on the predictions, so that those left out get exactly no gradient, as Detectron2's
        # selection gives them, even when they are not finite
        predicted = torch.where(positive_rows, cat(pred_anchor_deltas, dim=1), deltas)
        localization = smooth_l1_loss(predicted, deltas, self.smooth_l1_beta)
        logits = torch.where(sampled, cat(pred_objectness_logits, dim=1), 0)
        objectness = F.binary_cross_entropy_with_logits(logits, labels.to(torch.float32), reduction="none")
        normalizer = self.batch_size_per_image * num_images
        losses = {"loss_rpn_cls": torch.where(sampled, objectness, 0).sum() / normalizer,
                  "loss_rpn_loc": localization.sum() / normalizer}
        return {name: loss * self.loss_weight.get(name, 1.0) for name, loss in losses.items()}


def kernels_run_on(device: torch.device) -> bool:
    """Whether :func:`select_proposals` can run its NMS kernels on tensors of ``device``."""
    if not triton_available():
        return False
    from . import triton_nms

    return device.type == "cuda" or (device.type == "cpu" and triton_nms.INTERPRETED)


def select_proposals(proposals: List[torch.Tensor], logits: List[torch.Tensor], image_sizes: List[Tuple[int, int]],
                     nms_thresh: float, pre_nms_topk: int, post_nms_topk: int, min_box_size: float,
                     training: bool) -> List[Instances]:
    """Each image's proposals as Detectron2's ``find_top_rpn_proposals`` selects them (same arguments: L levels
    of (N, Hi*Wi*A, 4) boxes and (N, Hi*Wi*A) logits), computed for all images at once.

    Raises:
        FloatingPointError: in training, when a top-k box or logit is Inf or NaN (Detectron2 raises too; in
            inference such proposals are dropped).
    """
    from .triton_nms import segmented_nms

    boxes, scores, real = top_k_per_level(proposals, logits, pre_nms_topk)  # (N, L, P, 4), (N, L, P)
    finite = torch.isfinite(boxes).all(dim=-1) & torch.isfinite(scores)
    for image, (height, width) in enumerate(image_sizes):
        boxes[image, ..., 0::2].clamp_(min=0, max=width)
        boxes[image, ..., 1::2].clamp_(min=0, max=height)
    sides = boxes[..., 2:] - boxes[..., :2]
    valid = real & finite & (sides > min_box_size).all(dim=-1)
    num_images, levels, per_level = scores.shape
    keep = segmented_nms(boxes.view(-1, per_level, 4), valid.view(-1, per_level), nms_thresh)
    kept_scores = scores.view(num_images, -1).masked_fill(~keep.view(num_images, -1), -math.inf)
    # a stable sort, not topk: tied scores (common in fp16 under AMP) keep Detectron2's order, level by level
    top_scores, top_index = (t[:, :post_nms_topk] for t in kept_scores.sort(dim=1, descending=True, stable=True))
    counts = keep.view(num_images, -1).sum(dim=1).clamp(max=top_index.shape[1])
    diverged = (real & ~finite).any()
    *counts, diverged = torch.cat([counts, diverged.view(1)]).tolist()  # the one wait for the GPU
    if training and diverged:
        raise FloatingPointError("RPN: predicted proposal boxes or objectness logits contain Inf/NaN; training "
                                 "has diverged (a lower SOLVER.BASE_LR or a longer SOLVER.WARMUP_ITERS may help)")
    flat_boxes = boxes.view(num_images, -1, 4)
    results = []
    for image, (image_size, count) in enumerate(zip(image_sizes, counts)):
        chosen = top_index[image, :count]
        result = Instances(image_size)
        result.proposal_boxes = Boxes(flat_boxes[image, chosen])
        result.objectness_logits = top_scores[image, :count]
        results.append(result)
    return results


def top_k_per_level(proposals: List[torch.Tensor], logits: List[torch.Tensor],
                    k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each level's ``k`` best-scored boxes per image, in descending score, padded to a common length P.

    Returns:
        boxes (N, L, P, 4) float32, scores (N, L, P) and ``real`` (N, L, P) bool, False on padding.
    """
    counts = [min(level.shape[1], k) for level in logits]
    num_images, per_level = logits[0].shape[0], max(counts)
    boxes = proposals[0].new_zeros((num_images, len(logits), per_level, 4), dtype=torch.float32)
    scores = logits[0].new_full((num_images, len(logits), per_level), -math.inf)
    real = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for level, (level_boxes, level_logits, count) in enumerate(zip(proposals, logits, counts)):
        top_scores, index = level_logits.topk(count, dim=1)
        scores[:, level, :count] = top_scores
        boxes[:, level, :count] = level_boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4)).float()
        real[:, level, :count] = True
    return boxes, scores, real
