"""Detectron2's StandardROIHeads with all images' proposals labeled and sampled at once, with one host
synchronization instead of several per image, its poolers run level-sorted, and bitmask targets shared."""
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import get_event_storage

from .batched_targets import match, pad_rows, require_detectron2_matcher, sample_indices
from .bit_masks import GatheredBitMasks
from .pooler import LevelSortedPooler


@ROI_HEADS_REGISTRY.register()
class BatchedROIHeads(StandardROIHeads):
    """Detectron2's :class:`StandardROIHeads` (same config, parameters, losses and inference) whose training
    proposals are labeled and sampled for all images at once: ``MODEL.ROI_HEADS.NAME "BatchedROIHeads"``.

    Detectron2 takes each image in turn: the IoUs of its GT boxes with its proposals (the GT appended), the
    proposal matcher, ``subsample_labels`` and the indexing of proposals and targets, with several host
    synchronizations per image (the matcher's, two ``nonzero``, a count, and a device-to-host copy of the
    indices for polygon masks). Here one padded IoU tensor is matched and one sort of random keys samples
    every image (:mod:`gn_detection.batched_targets`); the host waits once, for every image's sample sizes
    and matched GT indices together. The mask branch then slices each image's foreground, which comes first,
    instead of selecting it with a host wait per image, and the box and mask poolers pool all levels with one
    host wait instead of one per level (:class:`~gn_detection.pooler.LevelSortedPooler`). With bitmasks
    (``INPUT.MASK_FORMAT bitmask``) the sampled proposals share their image's GT masks
    (:class:`~gn_detection.bit_masks.GatheredBitMasks`) instead of holding a full-size copy each, and get
    the same mask targets. Labels, matched GT and the sample's sizes are Detectron2's, the sampled foreground
    first, then the background; which proposals are sampled is drawn from the same distribution (uniformly
    random subsets), not from the same random numbers. Runs on the CPU and CUDA, without Triton.

    For subclasses: ``_sample_proposals`` is not called, the proposal matcher must be Detectron2's
    ``Matcher`` itself (its thresholds, labels and low-quality rule are applied, not its ``__call__``), and
    the sampled ``gt_classes`` must not change before the mask branch, which trusts the foreground count.
    """

    @configurable
    def __init__(self, **kwargs):
        """As :class:`StandardROIHeads`, with the box and mask poolers run level-sorted
        (:class:`~gn_detection.pooler.LevelSortedPooler`); refuses a proposal matcher other than Detectron2's
        ``Matcher``."""
        super().__init__(**kwargs)
        require_detectron2_matcher(self.proposal_matcher, "BatchedROIHeads", "proposal_matcher",
                                   "MODEL.ROI_HEADS.NAME StandardROIHeads")
        self.box_pooler = LevelSortedPooler(self.box_pooler)
        if self.mask_on and self.mask_pooler is not None:
            self.mask_pooler = LevelSortedPooler(self.mask_pooler)

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances], targets: List[Instances]) -> List[Instances]:
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        classes, matches = self._classes_and_matches(proposals, targets)
        sampled, positive_quota, negative_quota = sample_indices(classes, self.num_classes,
                                                                 self.batch_size_per_image, self.positive_fraction)
        sampled_matches = matches.gather(1, sampled)
        # the one wait: every image's sample sizes, and the matched GT indices for targets kept on the host
        host = torch.cat([positive_quota, negative_quota, sampled_matches], dim=1).tolist()
        results = []
        for image, (image_proposals, image_targets, (foreground, background, *host_matches)) in enumerate(
                zip(proposals, targets, host)):
            count = foreground + background
            index = sampled[image, :count]
            result = image_proposals[index]
            # Detectron2's dtype: the targets' where the image has GT, int64 where it has none
            result.gt_classes = classes[image, index].to(image_targets.gt_classes.dtype if len(image_targets)
                                                         else torch.int64)
            result._num_foreground = foreground  # a plain attribute, not a field: read by _forward_mask
            if len(image_targets):  # as in Detectron2, an image without GT gets no other gt_ field
                copy_gt_fields(image_targets, result, sampled_matches[image, :count], host_matches[:count])
            results.append(result)
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", float(np.mean([sizes[0] for sizes in host])))
        storage.put_scalar("roi_head/num_bg_samples", float(np.mean([sizes[1] for sizes in host])))
        return results

    def _forward_mask(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """Detectron2's mask branch; in training, each image's foreground is the first ``_num_foreground``
        of its sample (see :meth:`label_and_sample_proposals`), so it is sliced instead of selected with
        ``select_foreground_proposals`` and its host wait per image."""
        counts = [getattr(x, "_num_foreground", None) for x in instances]
        if not (self.training and self.mask_on) or None in counts:
            return super()._forward_mask(features, instances)
        foreground = [x[:count] for x, count in zip(instances, counts)]
        if self.mask_pooler is None:
            return self.mask_head({f: features[f] for f in self.mask_in_features}, foreground)
        pooled = self.mask_pooler([features[f] for f in self.mask_in_features], [x.proposal_boxes for x in foreground])
        return self.mask_head(pooled, foreground)

    def _classes_and_matches(self, proposals: List[Instances],
                             targets: List[Instances]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each proposal's class as Detectron2's ``_sample_proposals`` labels it before sampling (its matched
        GT box's class, ``num_classes`` for background, -1 for ignored, and -1 for padding) and its matched GT
        index, (N, P) each, P the most proposals of an image."""
        boxes, real = pad_rows([p.proposal_boxes.tensor for p in proposals])
        gt_boxes, present = pad_rows([t.gt_boxes.tensor for t in targets])
        labels, matches = match(boxes, gt_boxes, present, self.proposal_matcher)
        gt_classes, _ = pad_rows([t.gt_classes.long() for t in targets])
        classes = gt_classes.gather(1, matches)
        classes.masked_fill_(labels == 0, self.num_classes).masked_fill_(labels == -1, -1)
        # an image without GT is all background, whatever the matcher's first label; padding is ignored
        classes.masked_fill_(~present.any(dim=1, keepdim=True), self.num_classes).masked_fill_(~real, -1)
        return classes, matches


def copy_gt_fields(targets: Instances, sampled: Instances, device_matches: torch.Tensor,
                   host_matches: List[int]) -> None:
    """Give ``sampled`` each ``gt_`` field of ``targets`` it lacks, at its proposals' matched GT indices (as
    Detectron2 does): device values indexed on the device, host ones (polygon masks) with the host's copy,
    so that no field needs a copy of its own; bitmasks as :class:`~gn_detection.bit_masks.GatheredBitMasks`,
    sharing the targets' masks instead of a full-size copy per proposal."""
    for name, value in targets.get_fields().items():
        if name.startswith("gt_") and not sampled.has(name):
            if type(value) is BitMasks:  # not a subclass, whose crop_and_resize may differ
                value = GatheredBitMasks(value)
            on_device = getattr(value, "device", torch.device("cpu")) == device_matches.device
            sampled.set(name, value[device_matches if on_device else host_matches])
