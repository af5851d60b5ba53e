"""BatchedROIHeads' labeled and sampled proposals against Detectron2's StandardROIHeads."""
import copy
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from gn_detection import batched_targets
from gn_detection import benchmark as bench
from gn_detection.batched_targets import sample_indices
from gn_detection.host_work import counting_host_work
from gn_detection.pooler import LevelSortedPooler
from gn_detection.roi_heads import BatchedROIHeads, copy_gt_fields

from .conftest import SHAPES_CONFIG, TINY_OVERRIDES, make_cfg

SAMPLE_ALL = ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 10 ** 6]  # every candidate sampled, whatever the draw
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU polygon masks stay on the host


def model_and_inputs(*opts):
    """The tiny model (its ROI heads Detectron2's), BatchedROIHeads with the same weights, and three 128-pixel
    images' targets (polygon masks unless ``opts`` set INPUT.MASK_FORMAT; the second image without GT) and
    random proposals, 60 per image, all on DEVICE."""
    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES, "INPUT.MASK_FORMAT", "polygon", *opts)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE)
    assert type(model.roi_heads) is StandardROIHeads
    ours = BatchedROIHeads(cfg, model.backbone.output_shape()).to(DEVICE)
    ours.load_state_dict(model.roi_heads.state_dict())
    batch = bench.synthetic_batch(3, 128, 128, 4, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.INPUT.MASK_FORMAT)
    targets = [item["instances"].to(DEVICE) for item in batch]
    targets[1] = targets[1][:0]
    proposals = []
    for _ in targets:
        corners = torch.rand(60, 2, device=DEVICE) * 100
        boxes = torch.cat([corners, corners + torch.rand(60, 2, device=DEVICE) * 60 + 1], dim=1)
        proposals.append(Instances((128, 128), proposal_boxes=Boxes(boxes),
                                   objectness_logits=torch.randn(60, device=DEVICE)))
    return model, ours, batch, targets, proposals


def images_and_features(model, batch):
    """The batch's images on DEVICE and the model's backbone features of them (no autograd graph)."""
    images = ImageList.from_tensors([item["image"].float().to(DEVICE) for item in batch])
    with torch.no_grad():
        return images, model.backbone(images.tensor)


def rows(instances):
    """The sampled proposals as a sorted list of their fields' values (the sample's order is random)."""
    fields = instances.get_fields()
    table = []
    for i in range(len(instances)):
        row = [tuple(fields["proposal_boxes"].tensor[i].tolist()), fields["objectness_logits"][i].item(),
               fields["gt_classes"][i].item()]
        if "gt_boxes" in fields:
            row += [tuple(fields["gt_boxes"].tensor[i].tolist()), mask_bytes(fields["gt_masks"], i)]
        table.append(tuple(row))
    return sorted(table)


def mask_bytes(masks, i):
    """The ``i``th mask of PolygonMasks or BitMasks, as bytes."""
    if isinstance(masks, BitMasks):
        return masks[i].tensor.cpu().numpy().tobytes()
    return tuple(polygon.tobytes() for polygon in masks.polygons[i])


def label_and_sample(heads, proposals, targets):
    with EventStorage() as storage:
        sampled = heads.label_and_sample_proposals(copy.deepcopy(proposals), targets)
        logged = {name: storage.latest()[f"roi_head/num_{name}_samples"][0] for name in ("fg", "bg")}
    return sampled, logged


def assert_foreground_first(instances, num_classes):
    background = (instances.gt_classes == num_classes).int()
    assert torch.equal(background, background.sort().values)  # 0s (foreground) then 1s


@pytest.mark.parametrize("chunk_elements", [
    batched_targets.MATCH_CHUNK_ELEMENTS,  # all images at once
    1,  # each image alone (its proposals, not shared anchors, sliced per chunk)
])
def test_batched_roi_heads_label_the_proposals_detectron2_does(monkeypatch, chunk_elements):
    monkeypatch.setattr(batched_targets, "MATCH_CHUNK_ELEMENTS", chunk_elements)
    model, ours, _, targets, proposals = model_and_inputs(*SAMPLE_ALL)
    theirs = model.roi_heads
    our_samples, our_log = label_and_sample(ours, proposals, targets)
    their_samples, their_log = label_and_sample(theirs, proposals, targets)
    assert our_log == their_log
    for image, (mine, reference) in enumerate(zip(our_samples, their_samples)):
        assert list(mine.get_fields()) == list(reference.get_fields()), image  # no gt_ field without GT
        assert mine.image_size == reference.image_size and rows(mine) == rows(reference), image
        assert_foreground_first(mine, ours.num_classes)
    assert 0 < (our_samples[0].gt_classes < ours.num_classes).sum() < len(our_samples[0])


def without_gt(model, ours, targets, proposals):
    targets[:] = [t[:0] for t in targets]


def with_an_image_without_proposals(model, ours, targets, proposals):
    proposals[2] = proposals[2][:0]


def with_low_quality_matches(model, ours, targets, proposals):
    for heads in (model.roi_heads, ours):
        heads.proposal_matcher.allow_low_quality_matches = True


def with_int32_classes(model, ours, targets, proposals):
    for t in targets:
        t.gt_classes = t.gt_classes.int()


@pytest.mark.parametrize("opts, change", [
    (["MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.3, 0.5], "MODEL.ROI_HEADS.IOU_LABELS", [0, -1, 1]], None),
    # background below 0.3 ignored; an image without GT is still all background in Detectron2
    (["MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.3, 0.7], "MODEL.ROI_HEADS.IOU_LABELS", [-1, 0, 1]], None),
    (["MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", False], None),
    ([], without_gt),
    ([], with_an_image_without_proposals),
    ([], with_low_quality_matches),
    ([], with_int32_classes),  # Detectron2 keeps the targets' dtype, and gives int64 where there is no GT
    (["INPUT.MASK_FORMAT", "bitmask"], None),
], ids=["ignored band", "ignored background", "GT not appended", "no image with GT", "image without proposals",
        "low-quality matches", "int32 classes", "bitmasks"])
def test_batched_roi_heads_label_as_detectron2_in_other_settings(opts, change):
    model, ours, _, targets, proposals = model_and_inputs(*SAMPLE_ALL, *opts)
    if change:
        change(model, ours, targets, proposals)
    our_samples, our_log = label_and_sample(ours, proposals, targets)
    their_samples, their_log = label_and_sample(model.roi_heads, proposals, targets)
    assert our_log == their_log
    for image, (mine, reference) in enumerate(zip(our_samples, their_samples)):
        assert list(mine.get_fields()) == list(reference.get_fields()), image
        assert mine.gt_classes.dtype == reference.gt_classes.dtype, image
        assert rows(mine) == rows(reference), image


def test_batched_roi_heads_refuse_a_matcher_whose_rules_they_would_not_apply():
    class MyMatcher(Matcher):
        pass

    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES)
    model = build_model(cfg)
    arguments = BatchedROIHeads.from_config(cfg, model.backbone.output_shape())
    arguments["proposal_matcher"] = MyMatcher([0.5], [0, 1])
    with pytest.raises(TypeError, match="proposal_matcher=MyMatcher.*StandardROIHeads"):
        BatchedROIHeads(**arguments)


def test_batched_roi_heads_sample_as_many_proposals_as_detectron2():
    model, ours, _, targets, proposals = model_and_inputs("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16)
    candidates, _ = label_and_sample(BatchedROIHeads(make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES, *SAMPLE_ALL),
                                                     model.backbone.output_shape()), proposals, targets)
    our_samples, our_log = label_and_sample(ours, proposals, targets)
    their_samples, their_log = label_and_sample(model.roi_heads, proposals, targets)
    assert our_log == their_log
    for mine, reference, candidate in zip(our_samples, their_samples, candidates):
        for foreground in (True, False):
            ours_kept = (mine.gt_classes < ours.num_classes) == foreground
            assert ours_kept.sum() == ((reference.gt_classes < ours.num_classes) == foreground).sum()
        assert set(rows(mine)) <= set(rows(candidate)) and len(mine) == 16
        assert_foreground_first(mine, ours.num_classes)
    foreground = [(c.gt_classes < ours.num_classes).sum().item() for c in (our_samples[0], candidates[0])]
    assert foreground[0] == 4 < foreground[1]  # 25 % of 16: the quota binds


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_model_from_yaml_gets_detectron2s_roi_head_losses_without_host_waits_in_sampling(mask_format):
    # every candidate sampled, so the losses are Detectron2's up to the order of their sums
    model, _, batch, targets, proposals = model_and_inputs(*SAMPLE_ALL, "INPUT.MASK_FORMAT", mask_format)
    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES, *SAMPLE_ALL, "MODEL.ROI_HEADS.NAME", "BatchedROIHeads")
    torch.manual_seed(0)
    ours = build_model(cfg).roi_heads.to(DEVICE)
    assert type(ours) is BatchedROIHeads
    ours.load_state_dict(model.roi_heads.state_dict())
    images, features = images_and_features(model, batch)
    losses, waits = [], []
    for heads in (ours, model.roi_heads):
        with EventStorage(), counting_host_work(torch.nn.Module()) as counter:
            heads.label_and_sample_proposals(copy.deepcopy(proposals), targets)
        waits.append(counter.waits["other"])
        with EventStorage():
            losses.append(heads.train()(images, features, copy.deepcopy(proposals), targets)[1])
    # ours: one copy to the host, which is no wait on the CPU
    assert waits[0] == (1 if DEVICE == "cuda" else 0) < 3 * len(targets) <= waits[1]
    assert losses[0].keys() == losses[1].keys() == {"loss_cls", "loss_box_reg", "loss_mask"}
    for name, loss in losses[1].items():
        assert losses[0][name].item() == pytest.approx(loss.item(), rel=1e-5), name


def test_inference_with_level_sorted_poolers_returns_detectron2s_detections():
    model, ours, batch, _, proposals = model_and_inputs("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    assert type(ours.box_pooler) is type(ours.mask_pooler) is LevelSortedPooler
    _, features = images_and_features(model, batch)
    with torch.no_grad():
        mine, reference = (heads.eval()(None, features, copy.deepcopy(proposals))[0]
                           for heads in (ours, model.roi_heads))
    assert sum(len(x) for x in reference) > 0
    for our_image, their_image in zip(mine, reference):
        assert our_image.get_fields().keys() == their_image.get_fields().keys()
        for name, value in their_image.get_fields().items():
            assert torch.equal(as_tensor(our_image.get(name)), as_tensor(value)), name


def as_tensor(field):
    """An Instances field's values as one tensor."""
    return field.tensor if isinstance(field, Boxes) else field


def test_gt_fields_on_the_host_are_indexed_with_the_hosts_copy_of_the_matches():
    # on a GPU polygon masks stay on the host: indexed with the host's list, never with a device tensor (which
    # would copy it back to the host, a wait per image); "meta" stands for the device here
    _, _, _, targets, _ = model_and_inputs()
    sampled = Instances(targets[0].image_size, gt_classes=torch.zeros(3, dtype=torch.int64))
    copy_gt_fields(targets[0], sampled, torch.tensor([2, 0, 2], device="meta"), [2, 0, 2])
    assert list(sampled.get_fields()) == ["gt_classes", "gt_boxes", "gt_masks"]
    assert torch.equal(sampled.gt_boxes.tensor, targets[0].gt_boxes.tensor[[2, 0, 2]])
    assert [polygons[0].tobytes() for polygons in sampled.gt_masks.polygons] == [
        targets[0].gt_masks.polygons[i][0].tobytes() for i in (2, 0, 2)]


def test_sampled_bitmasks_share_their_images_masks():
    model, ours, _, targets, proposals = model_and_inputs("INPUT.MASK_FORMAT", "bitmask")
    our_samples, _ = label_and_sample(ours, proposals, targets)
    their_samples, _ = label_and_sample(model.roi_heads, proposals, targets)
    for image, (mine, reference, target) in enumerate(zip(our_samples, their_samples, targets)):
        if not len(target):
            assert not mine.has("gt_masks"), image
            continue
        # Detectron2 copies an image-sized mask per proposal; ours index the image's own masks, at the rows
        # of the matched GT boxes
        assert type(reference.gt_masks) is BitMasks and mine.gt_masks.source is target.gt_masks.tensor
        assert torch.equal(mine.gt_boxes.tensor, target.gt_boxes.tensor[mine.gt_masks.index])


def test_mask_branch_slices_the_sampled_foreground_without_a_host_wait_per_image():
    model, ours, batch, targets, proposals = model_and_inputs(*SAMPLE_ALL)
    _, features = images_and_features(model, batch)
    runs = {}
    for name, heads in (("ours", ours), ("theirs", model.roi_heads)):
        sampled, _ = label_and_sample(heads.train(), proposals, targets)
        # the second run: instances that did not come from our sampling take Detectron2's way
        for variant, instances in ((name, sampled), (name + " re-indexed", [x[:] for x in sampled])):
            with EventStorage(), counting_host_work(torch.nn.Module()) as counter:
                loss = heads._forward_mask(features, instances)["loss_mask"]
            runs[variant] = (counter.waits["other"], loss.item())
    # our mask pooler waits once (a copy to the host: no wait on the CPU) where Detectron2's waits for a
    # repeat_interleave and a nonzero per level
    pooler_saving = len(model.roi_heads.mask_pooler.level_poolers) + 1 - (DEVICE == "cuda")
    # and without select_foreground_proposals' nonzero per image
    assert runs["ours"][0] == runs["theirs"][0] - len(targets) - pooler_saving
    assert runs["ours re-indexed"][0] == runs["theirs"][0] - pooler_saving
    assert runs["theirs re-indexed"][0] == runs["theirs"][0]
    for variant, (_, loss) in runs.items():
        assert loss == pytest.approx(runs["theirs"][1], rel=1e-5), variant


def test_sample_indices_draw_uniformly_random_subsets_foreground_first():
    # 4000 independent draws in one call, classes as the ROI heads label them (4 = background, -1 ignored):
    # each of 10 foreground candidates kept with probability 5/10, each of 100 background ones with 15/100
    draws, background = 4000, 4
    row = torch.tensor([2] * 10 + [background] * 100 + [-1] * 30)[torch.randperm(140)]
    torch.manual_seed(0)
    indices, positive_quota, negative_quota = sample_indices(row.expand(draws, -1), background, 20, 0.25)
    assert indices.shape == (draws, 20) and (positive_quota == 5).all() and (negative_quota == 15).all()
    assert (row[indices[:, :5]] == 2).all() and (row[indices[:, 5:]] == background).all()
    assert all(len(set(draw)) == 20 for draw in indices.tolist())  # no candidate twice
    for value, probability in ((2, 0.5), (background, 15 / 100)):
        counts = torch.zeros(len(row)).index_add_(0, indices.flatten(), torch.ones(indices.numel()))
        frequency = counts[row == value] / draws
        sigma = math.sqrt(probability * (1 - probability) / draws)
        assert (frequency - probability).abs().max() < 5 * sigma, value
