"""LevelSortedPooler against Detectron2's ROIPooler: the same rows and gradients, one host wait."""
import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from gn_detection.host_work import HostWorkCounter
from gn_detection.pooler import LevelSortedPooler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def features_and_boxes(sizes=(50, 0, 80), seed=0):
    """FPN-like features of three 256-pixel images, requiring gradients, and boxes with sides of 2 to 250
    pixels (every level gets some), a few of them equal; ``sizes`` boxes per image."""
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(len(sizes), 8, int(256 * scale), int(256 * scale), generator=generator)
                .to(DEVICE).requires_grad_() for scale in SCALES]
    box_lists = []
    for count in sizes:
        corners = torch.rand(count, 2, generator=generator) * 200
        sides = torch.exp(torch.rand(count, 2, generator=generator) * 5.5) + 1  # 2 to 250 pixels a side
        boxes = torch.cat([corners, corners + sides], dim=1)
        boxes[1::7] = boxes[:1]  # ties (none in an image without boxes)
        box_lists.append(Boxes(boxes.to(DEVICE)))
    return features, box_lists


def pooled_gradients_and_waits(pooler, features, box_lists):
    with HostWorkCounter() as counter:
        pooled = pooler(features, box_lists)
    upstream = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return pooled, torch.autograd.grad(pooled, features, upstream), counter.waits["other"]


@pytest.mark.parametrize("pooler_type, sampling_ratio", [("ROIAlignV2", 0), ("ROIAlign", 2), ("ROIPool", 0)])
def test_every_row_and_gradient_is_detectron2s_with_one_host_wait(pooler_type, sampling_ratio):
    theirs = ROIPooler(7, SCALES, sampling_ratio, pooler_type, canonical_box_size=56, canonical_level=3)
    features, box_lists = features_and_boxes()
    ours_pooled, our_gradients, our_waits = pooled_gradients_and_waits(LevelSortedPooler(theirs), features,
                                                                         box_lists)
    their_pooled, their_gradients, their_waits = pooled_gradients_and_waits(theirs, features, box_lists)
    assert torch.equal(ours_pooled, their_pooled)
    for mine, reference in zip(our_gradients, their_gradients):  # CUDA's atomic adds sum in any order
        assert torch.equal(mine, reference) if DEVICE == "cpu" else torch.allclose(mine, reference, atol=1e-6)
    assert all(gradient.abs().sum() > 0 for gradient in their_gradients)  # boxes pooled at every level
    # Detectron2: a repeat_interleave and a nonzero per level; ours: the counts' copy to the host (no wait on
    # the CPU)
    assert their_waits == len(SCALES) + 1 and our_waits == (1 if DEVICE == "cuda" else 0)


def test_no_boxes_at_all_pool_to_no_rows():
    theirs = ROIPooler(7, SCALES, 0, "ROIAlignV2")
    features, box_lists = features_and_boxes(sizes=(0, 0, 0))
    pooled = LevelSortedPooler(theirs)(features, box_lists)
    assert pooled.shape == theirs(features, box_lists).shape == (0, 8, 7, 7)


def test_what_does_not_fit_goes_to_detectron2s_pooler_and_its_errors():
    features, box_lists = features_and_boxes()
    single = ROIPooler(7, SCALES[:1], 0, "ROIAlignV2")
    assert torch.equal(LevelSortedPooler(single)(features[:1], box_lists), single(features[:1], box_lists))
    with pytest.raises(AssertionError, match="num_level_assignments=4, but x is list of 3"):
        LevelSortedPooler(ROIPooler(7, SCALES, 0, "ROIAlignV2"))(features[:3], box_lists)


def test_boxes_of_no_level_go_to_detectron2s_pooler_which_pools_them_to_zeros():
    theirs = ROIPooler(7, SCALES, 0, "ROIAlignV2")
    features, box_lists = features_and_boxes()
    box_lists[0].tensor[3] = float("nan")  # no area, no level
    box_lists[2].tensor[5, 2] = box_lists[2].tensor[5, 0] - 10  # a negative area
    pooled = LevelSortedPooler(theirs)(features, box_lists)
    assert torch.equal(pooled, theirs(features, box_lists))
    assert (pooled[3] == 0).all() and (pooled[50 + 5] == 0).all()


def test_a_traced_pooler_is_detectron2s_for_any_number_of_boxes():
    theirs = ROIPooler(7, SCALES, 0, "ROIAlignV2")
    features, box_lists = features_and_boxes(sizes=(30, 0, 20))
    with torch.no_grad():
        traced = torch.jit.trace(lambda x, boxes: LevelSortedPooler(theirs)(x, [Boxes(b) for b in boxes]),
                                 ([f.detach() for f in features], [b.tensor for b in box_lists]))
        features, box_lists = features_and_boxes(sizes=(50, 10, 0), seed=1)
        features = [f.detach() for f in features]
        assert torch.equal(traced(features, [b.tensor for b in box_lists]), theirs(features, box_lists))


def test_the_wrapped_poolers_attributes_read_through():
    theirs = ROIPooler(14, SCALES, 0, "ROIAlignV2", canonical_box_size=112)
    ours = LevelSortedPooler(theirs)
    assert ours.output_size == (14, 14) and ours.canonical_box_size == 112
    assert ours.level_poolers is theirs.level_poolers and ours.pooler is theirs
    assert not list(ours.state_dict())  # no parameters: checkpoints are Detectron2's
    with pytest.raises(AttributeError, match="no_such_thing"):
        ours.no_such_thing


def test_under_autocast_rows_keep_the_features_half_precision_as_detectron2s():
    half = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    theirs = ROIPooler(7, SCALES, 0, "ROIAlignV2")
    features, box_lists = features_and_boxes()
    features = [f.detach().to(half) for f in features]
    with torch.autocast(DEVICE, dtype=half):
        mine, reference = LevelSortedPooler(theirs)(features, box_lists), theirs(features, box_lists)
    assert mine.dtype == reference.dtype == half and torch.equal(mine, reference)
