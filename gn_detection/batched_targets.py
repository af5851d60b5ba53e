"""Training targets for all images at once: Detectron2's matching of boxes to GT boxes (``pairwise_iou`` and
its ``Matcher``) and its random subsampling (``subsample_labels``), on padded (images, ...) tensors and
without a host synchronization. Used by :class:`gn_detection.rpn.BatchedRPN` and
:class:`gn_detection.roi_heads.BatchedROIHeads`."""
from typing import List, Tuple

import torch
from detectron2.modeling.matcher import Matcher
from detectron2.utils.memory import retry_if_cuda_oom
from torch.nn.utils.rnn import pad_sequence

# elements of the (images, GT boxes, candidates) IoU tensor matched at once: 128 MB per fp32 temporary; an
# image with more GT boxes x candidates than this is matched alone, as Detectron2 matches every image
MATCH_CHUNK_ELEMENTS = 2 ** 25


def require_detectron2_matcher(matcher: Matcher, owner: str, role: str, fallback: str) -> None:
    """Raise a TypeError naming ``owner``'s ``role`` and the ``fallback`` config unless ``matcher`` is
    Detectron2's ``Matcher`` itself: :func:`match` applies its rules, not its ``__call__``, so a subclass or
    another matcher would be silently ignored."""
    if type(matcher) is not Matcher:
        raise TypeError(f"{owner} applies the rules of Detectron2's Matcher itself, so it cannot use "
                        f"{role}={type(matcher).__name__}: pass a Matcher, or use {fallback}")


def pad_rows(rows: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """N tensors of (M_i, ...) rows (an image's boxes, its classes) as one (N, M, ...) tensor, zero rows past
    each image's, and the (N, M) mask of the real rows; M is at least 1, so that reductions and gathers over
    it are defined."""
    padded = pad_sequence(rows, batch_first=True)
    present = pad_sequence([r.new_ones(len(r), dtype=torch.bool) for r in rows], batch_first=True)
    if padded.shape[1] == 0:
        return padded.new_zeros((len(rows), 1, *padded.shape[2:])), present.new_zeros((len(rows), 1))
    return padded, present


def match(candidates: torch.Tensor, gt_boxes: torch.Tensor, present: torch.Tensor,
          matcher: Matcher) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each image i, Detectron2's ``matcher(pairwise_iou(gt, candidates))`` over the real GT rows of
    ``gt_boxes[i]``, computed for as many images at once as :data:`MATCH_CHUNK_ELEMENTS` allows.

    Args:
        candidates: (C, 4) boxes shared by every image (anchors), or (N, C, 4) per image (proposals).
        gt_boxes, present: (N, G, 4) padded GT boxes and their (N, G) mask, as :func:`pad_rows` gives.
        matcher: its thresholds, labels and ``allow_low_quality_matches`` are applied.

    Returns:
        labels (N, C) int8 and matched GT indices (N, C) int64; an image without GT gets ``matcher.labels[0]``
        and index 0 everywhere, as Detectron2's matcher gives.
    """
    num_images, per_image, shared = len(gt_boxes), candidates.shape[-2], candidates.dim() == 2
    per_chunk = max(1, MATCH_CHUNK_ELEMENTS // (gt_boxes.shape[1] * max(1, per_image)))
    # on CUDA out of memory: retried after emptying the cache, then on the CPU, as Detectron2 matches
    match_chunk = retry_if_cuda_oom(_match_chunk)
    chunks = [match_chunk(candidates if shared else candidates[start:start + per_chunk],
                          gt_boxes[start:start + per_chunk], present[start:start + per_chunk], matcher)
              for start in range(0, num_images, per_chunk)]
    return (torch.cat([labels.to(gt_boxes.device) for labels, _ in chunks]),
            torch.cat([matches.to(gt_boxes.device) for _, matches in chunks]))


def _match_chunk(candidates: torch.Tensor, gt: torch.Tensor, present: torch.Tensor,
                 matcher: Matcher) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`match` for one chunk of images."""
    # IoUs as Detectron2's pairwise_iou computes them, operation for operation, so that equal inputs tie alike
    gt_area = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    area = (candidates[..., 2] - candidates[..., 0]) * (candidates[..., 3] - candidates[..., 1])
    width = (torch.min(gt[..., 2, None], candidates[..., None, :, 2])
             - torch.max(gt[..., 0, None], candidates[..., None, :, 0]))
    height = (torch.min(gt[..., 3, None], candidates[..., None, :, 3])
              - torch.max(gt[..., 1, None], candidates[..., None, :, 1]))
    inter = width.clamp_(min=0) * height.clamp_(min=0)
    iou = torch.where(inter > 0, inter / (gt_area[..., None] + area.unsqueeze(-2) - inter), 0.0)
    iou.masked_fill_(~present.unsqueeze(-1), -1.0)  # absent rows never win (an image without GT gets labels[0])
    values, matches = iou.max(dim=1)  # the first of tied GT boxes, as Detectron2's max over its rows
    labels = torch.ones(values.shape, dtype=torch.int8, device=values.device)
    for label, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        labels.masked_fill_((values >= low) & (values < high), label)
    if matcher.allow_low_quality_matches:  # every candidate tied for a GT box's highest IoU, even an IoU of 0
        best = (iou == iou.max(dim=2, keepdim=True).values) & present.unsqueeze(-1)
        labels.masked_fill_(best.any(dim=1), 1)
    return labels, matches


def sample_order(positive: torch.Tensor, negative: torch.Tensor, num_samples: int,
                 positive_fraction: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detectron2's ``subsample_labels`` for each row of the (N, C) masks of positives and negatives at once.

    Returns:
        order (N, C): each row's positives in a uniformly random order, then its negatives likewise, then
            the rest; and, (N, 1) each, the number of positives and how many positives and negatives are
            sampled: ``min(#positives, int(num_samples * positive_fraction))`` and
            ``min(#negatives, num_samples - that)``. The sample is the first positive quota of the order and
            the negative quota after the positives, as Detectron2 samples (and orders) them.
    """
    positives = positive.sum(dim=1, keepdim=True)
    positive_quota = positives.clamp(max=int(num_samples * positive_fraction))
    negative_quota = torch.minimum(negative.sum(dim=1, keepdim=True), num_samples - positive_quota)
    # random float64 keys (ties among ~10^5 candidates: probability ~1e-6) in [0, 1) for positives, [2, 3)
    # for negatives, [4, 5) for the rest
    keys = (torch.rand(positive.shape, dtype=torch.float64, device=positive.device) + 2 * ~positive
            + 2 * ~(positive | negative))
    return keys.argsort(dim=1), positives, positive_quota, negative_quota


def sample_labels(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                  background: int) -> torch.Tensor:
    """Detectron2's ``subsample_labels`` for each row of ``labels`` (N, C) at once, applied as its RPN applies
    it: a sampled positive (a label neither -1 nor ``background``) becomes 1, a sampled negative 0, the rest
    -1 (ignore). See :func:`sample_order`."""
    positive, negative = (labels != -1) & (labels != background), labels == background
    order, positives, positive_quota, negative_quota = sample_order(positive, negative, num_samples,
                                                                    positive_fraction)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(labels.shape[1], device=labels.device)
                                            .expand_as(order))
    sampled = torch.full_like(labels, -1)
    sampled.masked_fill_(positive & (rank < positive_quota), 1)
    sampled.masked_fill_(negative & (rank - positives < negative_quota), 0)
    return sampled


def sample_indices(classes: torch.Tensor, background: int, num_samples: int,
                   positive_fraction: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detectron2's ``subsample_labels`` for each row of ``classes`` (N, C) at once, returned as its ROI heads
    use it: each row's sampled indices, positives (classes neither -1 nor ``background``) first.

    Returns:
        indices (N, S), S = min(num_samples, C), of which row i's first ``positive_quota[i] +
        negative_quota[i]`` are its sample (the rest is filler); and the two (N, 1) quotas (see
        :func:`sample_order`).
    """
    background_mask = classes == background
    order, positives, positive_quota, negative_quota = sample_order(
        (classes != -1) & ~background_mask, background_mask, num_samples, positive_fraction)
    # slot k of a row's sample: its k-th positive while k < its positive quota, then its negatives
    slot = torch.arange(min(num_samples, classes.shape[1]), device=classes.device)
    source = torch.where(slot < positive_quota, slot, slot - positive_quota + positives)
    return order.gather(1, source.clamp_(max=classes.shape[1] - 1)), positive_quota, negative_quota
