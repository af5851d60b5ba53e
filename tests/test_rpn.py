"""BatchedNMSRPN and its NMS kernels against Detectron2's RPN and torchvision's nms, and BatchedRPN's anchor
labels, samples and losses against Detectron2's. Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on
the CPU in Triton's interpreter; with one they run on CUDA."""
import math

import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from gn_detection import batched_targets
from gn_detection import rpn as batched_rpn
from gn_detection import triton_nms
from gn_detection.batched_targets import sample_labels
from gn_detection.host_work import HostWorkCounter
from gn_detection.rpn import BatchedNMSRPN, BatchedRPN, select_proposals
from gn_detection.triton_nms import segmented_nms

from .conftest import SHAPES_CONFIG, TINY_OVERRIDES, make_cfg

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_boxes(shape, extent=100.0, max_side=40.0, device=DEVICE):
    """Boxes (x1, y1, x2, y2) of ``shape`` (..., 4), corners in [-10, extent), sides in [0, max_side)."""
    corner = torch.rand(*shape, 2, device=device) * (extent + 10) - 10
    return torch.cat([corner, corner + torch.rand(*shape, 2, device=device) * max_side], dim=-1)


@pytest.mark.parametrize("segments, per_segment, threshold", [
    (5, 150, 0.7),  # several words a row, a last word part-filled
    (3, 33, 0.5),  # one box past a word
    (2, 1, 0.7),
    (4, 64, 0.0),  # any overlap suppresses
    (2, 70, 1.0),  # nothing suppresses (IoU > 1 never holds), identical boxes included
])
def test_segmented_nms_keeps_what_torchvision_nms_keeps(segments, per_segment, threshold):
    torch.manual_seed(per_segment)
    boxes = random_boxes((segments, per_segment))
    boxes[:, 1::7] = boxes[:, 0:1]  # exact duplicates of each segment's best box: IoU 1
    valid = torch.rand(segments, per_segment, device=DEVICE) > 0.15
    if segments > 2:
        valid[-1] = False  # a segment with no valid box
    keep = segmented_nms(boxes, valid, threshold)
    assert keep.shape == valid.shape and keep.dtype == torch.bool
    scores = torch.linspace(1, 0, per_segment)  # segments are sorted by descending score
    boxes, valid, keep = boxes.cpu(), valid.cpu(), keep.cpu()
    for segment in range(segments):
        # the CPU kernel is the reference on a GPU too: the kernels compute IoUs as it does, no fused multiply-adds
        candidates = valid[segment].nonzero()[:, 0]
        kept = candidates[torchvision.ops.nms(boxes[segment, candidates], scores[candidates], threshold)]
        assert torch.equal(keep[segment].nonzero()[:, 0], kept.sort().values), segment
    if threshold < 1 and per_segment > 1:
        assert (keep.sum(1) < valid.sum(1)).any()  # the case suppressed something


def test_segmented_nms_with_the_gpus_tiles(monkeypatch):
    # The interpreter's default tiles cover a whole row of words; the GPU's (32 rows x 4 words) need several
    # programs along both axes of the mask, with partial ones at the ends.
    monkeypatch.setattr(triton_nms, "MASK_BLOCK_ROWS", 32)
    monkeypatch.setattr(triton_nms, "MASK_BLOCK_WORDS", 4)
    test_segmented_nms_keeps_what_torchvision_nms_keeps(2, 300, 0.5)


def test_segmented_nms_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"boxes \(S, P, 4\).*\(3, 4\)"):
        segmented_nms(torch.zeros(3, 4, device=DEVICE), torch.ones(3, dtype=torch.bool, device=DEVICE), 0.5)
    with pytest.raises(TypeError, match="float32 boxes, got torch.float16"):
        segmented_nms(torch.zeros(1, 3, 4, dtype=torch.float16, device=DEVICE),
                      torch.ones(1, 3, dtype=torch.bool, device=DEVICE), 0.5)


def rpn_outputs(level_sizes, num_images=3, device=DEVICE):
    """Decoded proposals and objectness logits as the RPN gives them, for levels of ``level_sizes`` anchors:
    boxes partly outside 128-pixel images and some small, for clipping and the minimum size to matter."""
    torch.manual_seed(sum(level_sizes))
    proposals = [random_boxes((num_images, size), extent=130, max_side=50, device=device) for size in level_sizes]
    logits = [torch.randn(num_images, size, device=device) for size in level_sizes]
    return proposals, logits


IMAGE_SIZES = [(120, 100), (90, 128), (128, 128)]


def detectron2_selection(proposals, logits, *args):
    """Detectron2's find_top_rpn_proposals on CPU copies: on a GPU its sort of a few hundred tied scores need
    not be stable, and its NMS kernel may fuse multiply-adds; on the CPU neither."""
    return find_top_rpn_proposals([p.cpu() for p in proposals], [x.cpu() for x in logits], IMAGE_SIZES, *args)


def assert_same_proposals(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        assert mine.image_size == reference.image_size
        assert torch.equal(mine.proposal_boxes.tensor.cpu(), reference.proposal_boxes.tensor.cpu())
        assert torch.equal(mine.objectness_logits.cpu(), reference.objectness_logits.cpu())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pre_nms_topk, post_nms_topk, min_box_size, score_step", [
    (100, 1000, 0.0, None),
    (64, 40, 3.0, None),
    (100, 60, 0.0, "fp16"),  # logits of fp16 values, as under AMP: some tie
    (100, 60, 0.0, 0.25),  # many ties, across levels and at the cut
])
def test_selected_proposals_equal_detectron2s(training, pre_nms_topk, post_nms_topk, min_box_size, score_step):
    # levels of more, as many and fewer anchors than the top-k (the last is padded)
    level_sizes = [400, pre_nms_topk, 40, 12]
    proposals, logits = rpn_outputs(level_sizes)
    if score_step == "fp16":
        logits = [level.half().float() for level in logits]
    elif score_step:
        logits = [(level / score_step).round() * score_step for level in logits]
    ours = select_proposals(proposals, logits, IMAGE_SIZES, 0.7, pre_nms_topk, post_nms_topk, min_box_size,
                            training)
    assert_same_proposals(ours, detectron2_selection(proposals, logits, 0.7, pre_nms_topk, post_nms_topk,
                                                     min_box_size, training))
    assert len(ours) == len(IMAGE_SIZES)
    for mine in ours:
        assert 0 < len(mine) <= post_nms_topk
        assert len(mine) < sum(min(size, pre_nms_topk) for size in level_sizes)  # NMS dropped boxes


def test_non_finite_proposals_are_dropped_in_inference_and_stop_training():
    proposals, logits = rpn_outputs([200, 50])
    proposals[0][0, 3, 2] = math.inf
    proposals[1][1, 0] = math.nan
    logits[0][2, 5] = math.inf  # a top-k logit (the highest)
    ours = select_proposals(proposals, logits, IMAGE_SIZES, 0.7, 80, 1000, 0.0, False)
    assert_same_proposals(ours, detectron2_selection(proposals, logits, 0.7, 80, 1000, 0.0, False))
    assert all(torch.isfinite(mine.objectness_logits).all() for mine in ours)
    with pytest.raises(FloatingPointError, match="Inf/NaN; training has diverged.*SOLVER.BASE_LR"):
        select_proposals(proposals, logits, IMAGE_SIZES, 0.7, 80, 1000, 0.0, True)


TINY_RPN = ["MODEL.RPN.PRE_NMS_TOPK_TRAIN", 120, "MODEL.RPN.PRE_NMS_TOPK_TEST", 60,
            "MODEL.RPN.POST_NMS_TOPK_TEST", 50]  # a short walk for the interpreter; a cut at test time


def rpn_inputs(cfg):
    """FPN features of two 128x128 noise images (noise: no two anchors tie in score) and their GT."""
    torch.manual_seed(0)
    model = build_model(cfg)
    images = ImageList(torch.rand(2, 3, 128, 128, device=cfg.MODEL.DEVICE) * 255, [(128, 128), (112, 128)])
    with torch.no_grad():
        features = model.backbone(images.tensor)
    gt = [Instances(size, gt_boxes=Boxes(torch.tensor([[10.0, 12, 70, 90], [50, 40, 120, 100]])),
                    gt_classes=torch.tensor([0, 1])).to(cfg.MODEL.DEVICE) for size in images.image_sizes]
    return model, images, features, gt


# every candidate anchor sampled: BatchedRPN's sample is then Detectron2's whatever the random numbers
SAMPLE_ALL = ["MODEL.RPN.BATCH_SIZE_PER_IMAGE", 10 ** 6]


@pytest.mark.parametrize("rpn_class, training, opts", [
    (BatchedNMSRPN, True, []),
    (BatchedNMSRPN, False, []),
    (BatchedRPN, True, SAMPLE_ALL),
])
def test_model_from_yaml_gets_the_proposals_and_losses_of_detectron2s_rpn(rpn_class, training, opts):
    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES, *TINY_RPN, *opts,
                   "MODEL.PROPOSAL_GENERATOR.NAME", rpn_class.__name__)
    cfg.MODEL.DEVICE = DEVICE
    model, images, features, gt = rpn_inputs(cfg)
    ours = model.proposal_generator
    assert type(ours) is rpn_class
    theirs = RPN(cfg, model.backbone.output_shape()).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    ours.train(training), theirs.train(training)
    with EventStorage():  # the RPN logs its anchor counts in training
        torch.manual_seed(1)  # the same anchors sampled for the losses
        our_proposals, our_losses = ours(images, features, gt if training else None)
        torch.manual_seed(1)
        their_proposals, their_losses = theirs(images, features, gt if training else None)
    assert our_losses.keys() == their_losses.keys() == ({"loss_rpn_cls", "loss_rpn_loc"} if training else set())
    for name, loss in their_losses.items():  # BatchedRPN sums its losses in another order
        assert torch.allclose(our_losses[name], loss, rtol=1e-6, atol=0), name
    assert_same_proposals(our_proposals, their_proposals)
    assert all(len(mine) > 1 for mine in our_proposals)


def test_without_the_kernels_detectron2s_selection_runs(monkeypatch):
    # A CPU without Triton's interpreter: the kernels cannot run, so Detectron2's per-image selection does.
    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES, *TINY_RPN, "MODEL.PROPOSAL_GENERATOR.NAME", "BatchedNMSRPN")
    model, images, features, _ = rpn_inputs(cfg)
    monkeypatch.setattr(triton_nms, "INTERPRETED", False)
    assert not batched_rpn.kernels_run_on(torch.device("cpu"))

    def no_kernels(*args):
        raise AssertionError("select_proposals ran without kernels to run on")

    monkeypatch.setattr(batched_rpn, "select_proposals", no_kernels)
    theirs = RPN(cfg, model.backbone.output_shape())
    theirs.load_state_dict(model.proposal_generator.state_dict())
    ours = model.proposal_generator.eval()
    assert_same_proposals(ours(images, features)[0], theirs.eval()(images, features)[0])


def anchors_and_gt(device=DEVICE):
    """400 random anchors in a 200-pixel square (two equal) and the GT of five images: 3 boxes; none; 5, two of
    them equal; one box that overlaps no anchor (so ties at an IoU of 0 for its best anchor, which Detectron2's
    matcher makes every anchor); 2 boxes, one of them an anchor (IoU 1)."""
    torch.manual_seed(5)
    anchors = random_boxes((400,), extent=190, max_side=60, device=device)
    anchors[7] = anchors[3]
    gt = [random_boxes((count,), extent=190, max_side=90, device=device) for count in (3, 0, 5, 1, 2)]
    gt[2][1] = gt[2][0]
    gt[3][0] = torch.tensor([1000.0, 1000, 1010, 1010])
    gt[4][1] = anchors[11]
    return [Boxes(anchors)], [Instances((200, 200), gt_boxes=Boxes(boxes)) for boxes in gt]


def both_rpns(*opts):
    """Detectron2's RPN and BatchedRPN from the tiny config with ``opts``; labeling needs neither's weights."""
    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES, *opts)
    features = cfg.MODEL.RPN.IN_FEATURES
    shapes = {name: ShapeSpec(channels=32, stride=2 ** (level + 2)) for level, name in enumerate(features)}
    return RPN(cfg, shapes).to(DEVICE), BatchedRPN(cfg, shapes).to(DEVICE)


def test_batched_rpn_refuses_a_matcher_whose_rules_it_would_not_apply():
    class MyMatcher(Matcher):
        pass

    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES)
    shapes = {name: ShapeSpec(channels=32, stride=4) for name in cfg.MODEL.RPN.IN_FEATURES}
    arguments = BatchedRPN.from_config(cfg, shapes)
    BatchedRPN(**arguments)  # Detectron2's Matcher is fine
    arguments["anchor_matcher"] = MyMatcher([0.3, 0.7], [0, -1, 1])
    with pytest.raises(TypeError, match="anchor_matcher=MyMatcher.*BatchedNMSRPN"):
        BatchedRPN(**arguments)


@pytest.mark.parametrize("boundary, chunk_elements", [
    (-1, 2 ** 25),  # all images in one IoU tensor
    (-1, 1000),  # one image at a time
    (0, 2 * 5 * 400),  # two images at a time; anchors crossing the image's border ignored (legacy option)
])
def test_batched_rpn_labels_anchors_as_detectron2_does(monkeypatch, boundary, chunk_elements):
    monkeypatch.setattr(batched_targets, "MATCH_CHUNK_ELEMENTS", chunk_elements)
    theirs, ours = both_rpns(*SAMPLE_ALL, "MODEL.RPN.BOUNDARY_THRESH", boundary)
    anchors, gt = anchors_and_gt()
    their_labels, their_boxes = theirs.label_and_sample_anchors(anchors, gt)
    our_labels, our_boxes = ours.label_and_sample_anchors(anchors, gt)
    for image, (mine, reference) in enumerate(zip(our_labels, their_labels)):
        assert mine.dtype == reference.dtype and torch.equal(mine, reference), image
        assert torch.equal(our_boxes[image], their_boxes[image]), image
    counts = [[(labels == value).sum().item() for value in (1, 0, -1)] for labels in our_labels]
    assert counts[1][0] == 0  # no GT: no positive
    assert counts[3][:2] == [400 - counts[3][2], 0]  # the IoU-0 box: every anchor positive (unless ignored)
    assert (counts[3][2] > 0) == (boundary >= 0)  # some anchors cross the border
    assert all(positives > 0 and negatives > 0 for positives, negatives, _ in counts[:1] + counts[2:3])
    assert sum(ignored for *_, ignored in counts) > 0  # IoUs between the thresholds (and the border)


def test_matching_is_retried_after_cuda_out_of_memory_as_detectron2s(monkeypatch):
    _, ours = both_rpns(*SAMPLE_ALL)  # every anchor sampled: labels do not depend on the draw
    anchors, gt = anchors_and_gt()
    expected, _ = ours.label_and_sample_anchors(anchors, gt)
    match_chunk, devices = batched_targets._match_chunk, []

    def out_of_memory_twice(candidates, *args):
        devices.append(candidates.device)
        if len(devices) <= 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return match_chunk(candidates, *args)

    monkeypatch.setattr(batched_targets, "_match_chunk", out_of_memory_twice)
    labels, _ = ours.label_and_sample_anchors(anchors, gt)
    assert len(devices) == 3 and devices[2].type == "cpu"  # the third try on the CPU
    for mine, reference in zip(labels, expected):
        assert mine.device == reference.device and torch.equal(mine, reference)

    def broken(*args):
        raise RuntimeError("not a memory error")

    monkeypatch.setattr(batched_targets, "_match_chunk", broken)
    with pytest.raises(RuntimeError, match="not a memory error"):
        ours.label_and_sample_anchors(anchors, gt)


def test_batched_rpn_labels_images_without_any_gt():
    theirs, ours = both_rpns(*SAMPLE_ALL)
    anchors, gt = anchors_and_gt()
    gt = [gt[1], gt[1]]
    for mine, reference in zip(*(rpn.label_and_sample_anchors(anchors, gt)[0] for rpn in (ours, theirs))):
        assert torch.equal(mine, reference) and (mine == 0).all()


def test_batched_rpn_samples_as_many_anchors_as_detectron2():
    theirs, ours = both_rpns("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64, "MODEL.RPN.POSITIVE_FRACTION", 0.25)
    anchors, gt = anchors_and_gt()
    candidates, _ = both_rpns(*SAMPLE_ALL)[0].label_and_sample_anchors(anchors, gt)
    their_labels, their_boxes = theirs.label_and_sample_anchors(anchors, gt)
    our_labels, our_boxes = ours.label_and_sample_anchors(anchors, gt)
    for mine, reference, candidate in zip(our_labels, their_labels, candidates):
        for value in (1, 0):
            assert (mine == value).sum() == (reference == value).sum(), value
            assert ((mine == value) <= (candidate == value)).all(), value  # drawn from that label's anchors
        assert (mine >= 0).sum() <= 64
    positives = [(labels == 1).sum().item() for labels in our_labels]
    assert positives[3] == 16  # 400 candidates: the 25 % bound binds; elsewhere every positive is kept
    kept_all = [(labels == 1).sum().item() for image, labels in enumerate(candidates) if image != 3]
    assert positives[:3] + positives[4:] == kept_all
    for mine, reference in zip(our_boxes, their_boxes):
        assert torch.equal(mine, reference)  # matching does not depend on the sample


def test_sample_labels_draws_uniformly_random_subsets():
    # 4000 independent draws in one call: each of 10 positives is kept with probability 5/10, each of 200
    # negatives with 15/200; a sampler that favoured some anchors (the first ones, say) fails by far
    draws = 4000
    row = torch.tensor([1] * 10 + [0] * 200 + [-1] * 30, dtype=torch.int8, device=DEVICE)[torch.randperm(240)]
    torch.manual_seed(0)
    sampled = sample_labels(row.expand(draws, -1), 20, 0.25, background=0).cpu()
    row = row.cpu()
    assert ((sampled == 1).sum(1) == 5).all() and ((sampled == 0).sum(1) == 15).all()
    assert (sampled[:, row == -1] == -1).all()
    for value, probability in ((1, 0.5), (0, 15 / 200)):
        frequency = (sampled[:, row == value] == value).double().mean(0)
        sigma = math.sqrt(probability * (1 - probability) / draws)
        assert (frequency - probability).abs().max() < 5 * sigma, value


def rpn_predictions(anchors, num_images, seed=3):
    """Random objectness logits and anchor deltas for ``anchors`` (one Boxes per level) as the RPN head gives
    them, (images, anchors of the level) and (images, anchors of the level, 4), requiring gradients."""
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(num_images, len(level), generator=generator).to(DEVICE).requires_grad_()
              for level in anchors]
    deltas = [torch.randn(num_images, len(level), 4, generator=generator).mul(0.5).to(DEVICE).requires_grad_()
              for level in anchors]
    return logits, deltas


def losses_and_gradients(rpn, anchors, labels, boxes, logits, deltas):
    """``rpn.losses`` on these inputs, their sum's gradients on the predictions, the logged anchor counts, and
    the host waits of it all (forward and backward)."""
    with EventStorage() as storage, HostWorkCounter() as counter:
        losses = rpn.losses(anchors, logits, labels, deltas, boxes)
        gradients = torch.autograd.grad(sum(losses.values()), logits + deltas)
    logged = {name: history.latest() for name, history in storage.histories().items() if name.startswith("rpn/")}
    return losses, gradients, logged, counter.waits["other"]


@pytest.mark.parametrize("opts", [
    [],
    # a smooth L1 beta: the image without GT would give NaN gradients unless its targets were kept finite
    ["MODEL.RPN.SMOOTH_L1_BETA", 0.5, "MODEL.RPN.LOSS_WEIGHT", 2.0, "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", 0.5],
    ["MODEL.RPN.BBOX_REG_LOSS_TYPE", "giou"],  # Detectron2's own code
])
def test_batched_rpn_losses_and_logged_counts_are_detectron2s(opts):
    theirs, ours = both_rpns("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64, *opts)
    (anchors,), gt = anchors_and_gt()  # five images, one without GT
    levels = [Boxes(anchors.tensor[:150]), Boxes(anchors.tensor[150:])]
    labels, boxes = theirs.label_and_sample_anchors(levels, gt)  # one sample, fed to both
    logits, deltas = rpn_predictions(levels, len(gt))
    our_losses, our_gradients, our_logged, our_waits = losses_and_gradients(ours, levels, labels, boxes, logits, deltas)
    their_losses, their_gradients, their_logged, their_waits = losses_and_gradients(
        theirs, levels, labels, boxes, logits, deltas)
    assert our_losses.keys() == their_losses.keys() == {"loss_rpn_cls", "loss_rpn_loc"}
    for name, loss in their_losses.items():
        assert loss > 0 and torch.allclose(our_losses[name], loss, rtol=1e-6, atol=0), name
    for mine, reference in zip(our_gradients, their_gradients):
        assert torch.allclose(mine, reference, rtol=1e-6, atol=1e-12)
    assert any((gradient != 0).any() for gradient in their_gradients[2:])  # the regression loss reached deltas
    assert our_logged == their_logged and set(their_logged) == {"rpn/num_pos_anchors", "rpn/num_neg_anchors"}
    if not opts or opts[1] != "giou":
        # ours: one get_deltas assert, and the counts' copy to the host (no wait on the CPU); Detectron2: an
        # assert per image, the two counts, four boolean-mask selections and their two backwards
        assert our_waits == (2 if DEVICE == "cuda" else 1) and their_waits == len(gt) + 8


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_batched_rpn_gives_predictions_left_out_of_the_losses_no_gradient_even_if_not_finite(beta):
    theirs, ours = both_rpns("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64, "MODEL.RPN.SMOOTH_L1_BETA", beta)
    (anchors,), gt = anchors_and_gt()
    labels, boxes = theirs.label_and_sample_anchors([anchors], gt)
    logits, deltas = rpn_predictions([anchors], len(gt))
    with torch.no_grad():  # an overflow where the losses do not look: a negative anchor, an unsampled one
        deltas[0][0, (labels[0] == 0).nonzero()[0, 0]] = float("inf")
        logits[0][0, (labels[0] == -1).nonzero()[0, 0]] = float("nan")
    results = [losses_and_gradients(rpn, [anchors], labels, boxes, logits, deltas) for rpn in (ours, theirs)]
    (our_losses, our_gradients, *_), (their_losses, their_gradients, *_) = results
    for name, loss in their_losses.items():
        assert torch.isfinite(loss) and torch.allclose(our_losses[name], loss, rtol=1e-6, atol=0), name
    for mine, reference in zip(our_gradients, their_gradients):
        assert torch.isfinite(reference).all() and torch.allclose(mine, reference, rtol=1e-6, atol=1e-12)


def test_batched_rpn_losses_under_autocast_are_detectron2s():
    half = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    theirs, ours = both_rpns("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64, "MODEL.RPN.SMOOTH_L1_BETA", 0.1)
    (anchors,), gt = anchors_and_gt()
    labels, boxes = theirs.label_and_sample_anchors([anchors], gt)
    logits, deltas = rpn_predictions([anchors], len(gt))
    logits, deltas = ([x.detach().to(half).requires_grad_() for x in xs] for xs in (logits, deltas))  # the head's
    with torch.autocast(DEVICE, dtype=half):
        results = [losses_and_gradients(rpn, [anchors], labels, boxes, logits, deltas) for rpn in (ours, theirs)]
    (our_losses, our_gradients, *_), (their_losses, their_gradients, *_) = results
    for name, loss in their_losses.items():
        assert our_losses[name].dtype == loss.dtype and torch.allclose(our_losses[name], loss, rtol=1e-5), name
    for mine, reference in zip(our_gradients, their_gradients):  # each element's gradient is computed alike
        assert mine.dtype == reference.dtype == half
        assert torch.equal(mine, reference) if DEVICE == "cpu" else torch.allclose(mine, reference, rtol=1e-3)
