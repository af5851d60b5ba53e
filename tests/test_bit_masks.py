"""GatheredBitMasks against Detectron2's BitMasks of the gathered rows: the same masks, targets and errors."""
import pytest
import torch
from detectron2.structures import BitMasks, Instances

from gn_detection.bit_masks import GatheredBitMasks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def source_and_index(seed=0):
    """Five 60x90 masks (ellipses, one empty) and an index of 9 rows of them, some repeated, on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(60.0), torch.arange(90.0), indexing="ij")
    centers = torch.rand(5, 2, generator=generator) * torch.tensor([90.0, 60.0])
    radii = torch.rand(5, 2, generator=generator) * 30 + 3
    masks = ((xs - centers[:, :1, None]) / radii[:, :1, None]) ** 2 + \
            ((ys - centers[:, 1:, None]) / radii[:, 1:, None]) ** 2 <= 1
    masks[3] = False
    return masks.to(DEVICE), torch.tensor([4, 0, 0, 2, 3, 1, 4, 4, 2], device=DEVICE)


def boxes_for(count, seed=1):
    """``count`` boxes over the 60x90 image, some reaching outside it, one of zero width."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([100.0, 70.0]) - 10
    boxes = torch.cat([corners, corners + torch.rand(count, 2, generator=generator) * 50 + 1], dim=1)
    boxes[-1, 2] = boxes[-1, 0]
    return boxes.to(DEVICE)


@pytest.mark.parametrize("mask_size", [28, 7])
def test_mask_targets_are_detectron2s_from_the_gathered_copies(mask_size):
    source, index = source_and_index()
    boxes = boxes_for(len(index))
    ours = GatheredBitMasks(source, index).crop_and_resize(boxes, mask_size)
    theirs = BitMasks(source[index]).crop_and_resize(boxes, mask_size)
    assert ours.dtype == torch.bool and ours.shape == (len(index), mask_size, mask_size)
    assert torch.equal(ours, theirs) and 0 < theirs.sum() < theirs.numel()


def test_mask_targets_under_autocast_are_detectron2s():
    # the mask loss, and so its targets, run under autocast in AMP training
    source, index = source_and_index()
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    boxes = boxes_for(len(index)).to(dtype)
    with torch.autocast(DEVICE, dtype=dtype):
        ours = GatheredBitMasks(source, index).crop_and_resize(boxes, 28)
        theirs = BitMasks(source[index]).crop_and_resize(boxes, 28)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("items", [
    [slice(2, 7)], [-1], [3], [torch.tensor([True, False] * 4 + [True])], [torch.tensor([8, 0, 0, 5])],
    [slice(1, None), torch.tensor([6, 2, 2])],  # composed twice
], ids=["slice", "negative int", "int", "bool", "int64", "slice then int64"])
def test_indexing_gives_detectron2s_rows_and_shares_the_source(items):
    source, index = source_and_index()
    ours, theirs = GatheredBitMasks(source, index), BitMasks(source[index])
    for item in items:
        ours, theirs = ours[item], theirs[item if not isinstance(item, torch.Tensor) else item.to(DEVICE)]
    assert isinstance(ours, GatheredBitMasks) and ours.source is source  # no mask copied
    assert len(ours) == len(theirs) and torch.equal(ours.tensor, theirs.tensor)
    assert torch.equal(ours.crop_and_resize(boxes_for(len(ours)), 14), theirs.crop_and_resize(boxes_for(len(ours)), 14))


def test_a_tie_at_one_half_is_inside_the_mask_as_in_detectron2():
    # the right half of a 20x20 mask; a box half a pixel to the right samples column 9 halfway between
    # pixels 9 (out) and 10 (in): exactly 0.5
    source = torch.zeros(1, 20, 20, dtype=torch.bool, device=DEVICE)
    source[:, :, 10:] = True
    box = torch.tensor([[0.5, 0.0, 20.5, 20.0]], device=DEVICE)
    ours = GatheredBitMasks(source, torch.tensor([0, 0], device=DEVICE))[:1].crop_and_resize(box, 20)
    assert torch.equal(ours, BitMasks(source).crop_and_resize(box, 20))
    assert ours[0, :, 9].all() and not ours[0, :, 8].any()


def test_rows_past_256_are_exact_with_half_precision_boxes():
    # a bfloat16 row number would round 257 to 256: RoIs are float32, as ROIAlign's input
    source = torch.zeros(300, 8, 8, dtype=torch.bool, device=DEVICE)
    source[257, :4] = True
    index = torch.arange(299, -1, -1, device=DEVICE)  # all rows: the source's own masks are aligned
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=DEVICE).expand(300, 4).to(torch.bfloat16)
    ours = GatheredBitMasks(source, index).crop_and_resize(boxes, 4)
    assert torch.equal(ours, BitMasks(source[index]).crop_and_resize(boxes.float(), 4))
    assert ours[299 - 257, :2].all() and ours.sum() == 8


def test_as_bitmasks_everywhere_else():
    source, index = source_and_index()
    ours, theirs = GatheredBitMasks(BitMasks(source), index), BitMasks(source[index])
    assert isinstance(ours, BitMasks) and ours.device == source.device and ours.image_size == (60, 90)
    assert torch.equal(ours.nonempty(), theirs.nonempty())
    assert torch.equal(ours.get_bounding_boxes().tensor, theirs.get_bounding_boxes().tensor)
    joined = BitMasks.cat([ours, ours[:2]])  # Detectron2 builds type(first)(tensor)
    assert type(joined) is GatheredBitMasks
    assert torch.equal(joined.tensor, torch.cat([theirs.tensor, theirs.tensor[:2]]))
    assert repr(ours) == "GatheredBitMasks(num_instances=9, source_masks=5)"
    moved = ours.to("cpu")
    assert isinstance(moved, GatheredBitMasks) and torch.equal(moved.tensor, theirs.tensor.cpu())
    assert len(GatheredBitMasks(source)) == 5 and torch.equal(GatheredBitMasks(source).tensor, source)


def test_as_an_instances_field_it_is_sliced_and_selected_with_the_boxes():
    source, index = source_and_index()
    instances = Instances((60, 90), gt_masks=GatheredBitMasks(source, index), boxes=boxes_for(len(index)))
    for item in (slice(3, None), instances.boxes[:, 0] > 20):
        part = instances[item]
        assert torch.equal(part.gt_masks.crop_and_resize(part.boxes, 28),
                           BitMasks(source[index][item]).crop_and_resize(part.boxes, 28))


def test_errors_name_what_is_wrong():
    source, index = source_and_index()
    masks = GatheredBitMasks(source, index)
    with pytest.raises(ValueError, match="3 boxes for 9 masks"):
        masks.crop_and_resize(boxes_for(3), 28)
    with pytest.raises(IndexError, match=r"index shape \(3, 1\).*1-d"):
        masks[torch.tensor([[0], [1], [2]], device=DEVICE)]
    with pytest.raises(ValueError, match=r"\(masks, height, width\), got shape \(60, 90\)"):
        GatheredBitMasks(source[0])
    with pytest.raises(ValueError, match=r"index must be 1-d int64 or int32.*torch.bool of shape \(5,\)"):
        GatheredBitMasks(source, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"index must be 1-d.*torch.int64 of shape \(\)"):
        GatheredBitMasks(source, torch.tensor(2))
    for rows in ([0, 5], [-6, 1]):  # 5 source masks; a GPU index is not checked, as that would wait for it
        with pytest.raises(IndexError, match=f"rows {min(rows)}..{max(rows)} are out of range for 5 source masks"):
            GatheredBitMasks(source, torch.tensor(rows))


def test_negative_rows_count_from_the_end():
    source, _ = source_and_index()
    boxes = boxes_for(2)
    masks = GatheredBitMasks(source, torch.tensor([-1, -5], dtype=torch.int32))
    assert masks.index.tolist() == [4, 0] and masks.index.dtype == torch.int64
    assert torch.equal(masks.crop_and_resize(boxes, 28), BitMasks(source[[4, 0]]).crop_and_resize(boxes, 28))
