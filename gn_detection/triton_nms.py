"""Greedy NMS over many independent segments of boxes at once, as two Triton kernels.

Detectron2's RPN runs one torchvision ``nms`` per image over all its levels' top boxes (about 8,700 per image
in training at 800x1216), and torchvision walks the boxes of a call in a single thread block: about 3.4 ms
per image on an H100, one image after the other, with a synchronization each. Boxes of different levels
never suppress each other (the RPN's NMS is per level), so each (image, level) pair is an independent
segment with a walk of at most the level's top-k boxes, and all of them can walk at the same time:

    1. ``_suppression_mask_kernel``: for every segment, bit j of row i is set when box j comes after box i
       and their IoU exceeds the threshold (32 boxes a word); one launch for all segments.
    2. ``_greedy_keep_kernel``: one program per segment walks its boxes in order and keeps a box that no
       kept box before it suppresses (the rows of the kept boxes OR-ed into a register bit set).

The decisions are torchvision's: IoU = intersection / union, a box suppressed when its IoU with a kept one is
strictly greater than the threshold, computed as its CPU kernel does (rounded division, no fused multiply-adds),
so they match ``torchvision.ops.nms`` on the CPU bit for bit; that is what the tests check (with
``TRITON_INTERPRET=1`` on the CPU). An IoU within float rounding of the threshold may still be decided the
other way by torchvision's CUDA kernel (its compiler may fuse) or by Detectron2's ``batched_nms``, whose
coordinate trick shifts each level's boxes by a large offset before the IoU.
"""
import torch
import triton
import triton.language as tl

# Set when this module was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

_WORD_BITS = 32  # boxes per mask word: the kernels' int32 words (spelled 32 there: a global is no constexpr)
# Rows x words of one mask program: 32 x 4 words = 4,096 IoUs on a GPU. The interpreter runs programs one after
# the other in Python, so there fewer, larger programs are much faster (numpy does a tile in one go).
MASK_BLOCK_ROWS, MASK_BLOCK_WORDS = (128, 16) if INTERPRETED else (32, 4)
# One warp per walk: it is sequential, and a one-warp reduction over the bit set has no shared-memory round trip.
WALK_WARPS = 1


@triton.jit
def _box(BOXES, index, ok):
    """Coordinates (x1, y1, x2, y2) and area of the boxes at ``index`` (fp32)."""
    x1 = tl.load(BOXES + index * 4, mask=ok, other=0.0)
    y1 = tl.load(BOXES + index * 4 + 1, mask=ok, other=0.0)
    x2 = tl.load(BOXES + index * 4 + 2, mask=ok, other=0.0)
    y2 = tl.load(BOXES + index * 4 + 3, mask=ok, other=0.0)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


@triton.jit
def _packed(flags, AXIS: tl.constexpr):
    """``flags`` (bool, its last axis 32 long) packed along that axis into int32 words, flag b as bit b: the
    flags' distinct powers of two summed, which is their OR (bit 31 wraps to the sign as it should)."""
    one = tl.full([32], 1, tl.int32)
    return tl.sum(tl.where(flags, one << tl.arange(0, 32), 0), axis=AXIS)


@triton.jit
def _suppression_mask_kernel(BOXES, MASK, P, WORDS, threshold, BLOCK_ROWS: tl.constexpr,
                             BLOCK_WORDS: tl.constexpr):
    """MASK[segment, i, w] bit b: box 32 w + b comes after box i and overlaps it by more than ``threshold``."""
    segment = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    words = tl.program_id(2) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    bits = tl.arange(0, 32)
    cols = words[:, None] * 32 + bits[None, :]  # [words, bits]
    boxes = BOXES + segment * P * 4
    rx1, ry1, rx2, ry2, rarea = _box(boxes, rows, rows < P)
    cx1, cy1, cx2, cy2, carea = _box(boxes, cols, cols < P)
    # [rows, words, bits]
    width = tl.maximum(tl.minimum(rx2[:, None, None], cx2[None]) - tl.maximum(rx1[:, None, None], cx1[None]), 0.0)
    height = tl.maximum(tl.minimum(ry2[:, None, None], cy2[None]) - tl.maximum(ry1[:, None, None], cy1[None]), 0.0)
    inter = width * height
    iou = tl.div_rn(inter, rarea[:, None, None] + carea[None] - inter)
    later = (cols[None] > rows[:, None, None]) & (cols < P)[None]
    out = MASK + (segment * P + rows[:, None]) * WORDS + words[None, :]
    tl.store(out, _packed((iou > threshold) & later, 2), mask=(rows < P)[:, None] & (words < WORDS)[None, :])


@triton.jit
def _greedy_keep_kernel(MASK, VALID, KEEP, P, WORDS, BLOCK_WORDS: tl.constexpr):
    """KEEP[segment, i] = 1 for each box the greedy walk keeps; invalid boxes start out suppressed."""
    segment = tl.program_id(0).to(tl.int64)
    words = tl.arange(0, BLOCK_WORDS)
    index = words[:, None] * 32 + tl.arange(0, 32)[None, :]
    valid = tl.load(VALID + segment * P + index, mask=index < P, other=0)
    suppressed = _packed(valid == 0, 1)  # past P too, where the walk never looks
    rows = MASK + segment * P * WORDS
    for i in range(0, P):
        word = tl.sum(tl.where(words == i // 32, suppressed, 0))
        if ((word >> (i % 32)) & 1) == 0:
            tl.store(KEEP + segment * P + i, 1)
            suppressed = suppressed | tl.load(rows + i * WORDS + words, mask=words < WORDS, other=0)


def segmented_nms(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS within each segment, all segments in two launches.

    Args:
        boxes: (S, P, 4) float32 (x1, y1, x2, y2); in each of the S segments, sorted by descending score.
        valid: (S, P) bool; an invalid box (e.g. padding) is never kept and suppresses nothing.
        iou_threshold: a box is suppressed by a kept, higher-scoring one when their IoU exceeds this.

    Returns:
        (S, P) bool: the boxes kept, the same as ``torchvision.ops.nms`` on each segment's valid boxes.
    """
    if boxes.dim() != 3 or boxes.shape[2] != 4 or valid.shape != boxes.shape[:2]:
        raise ValueError(f"segmented_nms needs boxes (S, P, 4) and valid (S, P), got {tuple(boxes.shape)} and "
                         f"{tuple(valid.shape)}")
    if boxes.dtype != torch.float32:
        raise TypeError(f"segmented_nms needs float32 boxes, got {boxes.dtype}")
    segments, p = valid.shape
    keep = torch.zeros((segments, p), dtype=torch.int8, device=boxes.device)
    if segments == 0 or p == 0:
        return keep.bool()
    boxes, valid = boxes.contiguous(), valid.to(torch.int8).contiguous()
    words = triton.cdiv(p, _WORD_BITS)
    mask = torch.empty((segments, p, words), dtype=torch.int32, device=boxes.device)
    grid = (segments, triton.cdiv(p, MASK_BLOCK_ROWS), triton.cdiv(words, MASK_BLOCK_WORDS))
    _suppression_mask_kernel[grid](boxes, mask, p, words, float(iou_threshold), BLOCK_ROWS=MASK_BLOCK_ROWS,
                                   BLOCK_WORDS=MASK_BLOCK_WORDS, enable_fp_fusion=False)  # IoUs as on the CPU
    _greedy_keep_kernel[(segments,)](mask, valid, keep, p, words, BLOCK_WORDS=triton.next_power_of_2(words),
                                     num_warps=WALK_WARPS)
    return keep.bool()
