"""Sampled proposals' ground-truth bitmasks as an index into the image's masks, not a full-size copy each."""
from typing import Any, Optional, Union

import torch
from detectron2.layers import ROIAlign
from detectron2.structures import BitMasks


class GatheredBitMasks(BitMasks):
    """Detectron2's :class:`BitMasks` whose rows are ``source[index]``, gathered only when ``tensor`` is read.

    Detectron2 gives each sampled proposal a copy of its matched GT bitmask, image-sized: 512 per image, 0.5 GB
    per 800x1216 image, and then a float32 copy of each foreground one to crop its mask target from. Here the
    proposals share the image's masks, and :meth:`crop_and_resize` aligns each box on its own source row
    directly: the same ROIAlign on the same mask and box, so the same targets, from a float32 copy of the
    image's masks or of the rows', whichever are fewer. Indexing composes the index and copies no mask;
    everything else reads ``tensor``, a gathered copy."""

    def __init__(self, source: Union[torch.Tensor, BitMasks], index: Optional[torch.Tensor] = None):
        """``source``: (G, H, W) masks (any dtype, read as bool) or a :class:`BitMasks`; ``index``: (N,)
        integer rows of it (negative ones count from the end; in range, which is checked for an index on the
        CPU only, as checking a GPU one would wait for it); all G rows in order if None (as ``type(masks)(tensor)`` in ``BitMasks.cat`` builds
        one)."""
        if isinstance(source, GatheredBitMasks):
            source, index = source.source, source.index if index is None else source.index[index]
        elif isinstance(source, BitMasks):
            source = source.tensor
        if source.dim() != 3:
            raise ValueError(f"GatheredBitMasks: source must be (masks, height, width), got shape "
                             f"{tuple(source.shape)}")
        if index is None:
            index = torch.arange(len(source), device=source.device)
        elif index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GatheredBitMasks: index must be 1-d int64 or int32 rows of the source, got "
                             f"{index.dtype} of shape {tuple(index.shape)}")
        else:
            if index.device.type == "cpu" and len(index):  # reading a GPU index's range would wait for the GPU
                low, high = int(index.min()), int(index.max())
                if not -len(source) <= low <= high < len(source):
                    raise IndexError(f"GatheredBitMasks: index rows {low}..{high} are out of range for "
                                     f"{len(source)} source masks")
            index = index.to(source.device, torch.int64)
            index = torch.where(index < 0, index + len(source), index)
        self.source, self.index, self.image_size = source.to(torch.bool), index, source.shape[1:]

    @classmethod
    def _sharing(cls, source: torch.Tensor, index: torch.Tensor) -> "GatheredBitMasks":
        """Rows ``index`` of a checked ``source``, the index taken from a checked one (no negatives, on the
        source's device): without :meth:`__init__`'s checks, which cost ops on the host at every indexing."""
        masks = cls.__new__(cls)
        masks.source, masks.index, masks.image_size = source, index, source.shape[1:]
        return masks

    @property
    def tensor(self) -> torch.Tensor:
        """The masks, (N, H, W) bool, gathered at each read: a copy, so writes to it are lost."""
        return self.source[self.index]

    @property
    def device(self) -> torch.device:
        """The source masks' device."""
        return self.source.device

    def to(self, *args: Any, **kwargs: Any) -> "GatheredBitMasks":
        """The source masks moved as ``Tensor.to`` moves them (still bool), and the index with them."""
        return GatheredBitMasks(self.source.to(*args, **kwargs), self.index)

    def __getitem__(self, item: Union[int, slice, torch.Tensor]) -> "GatheredBitMasks":
        """Rows as :class:`BitMasks` gives them (an int gives one row), sharing the source masks."""
        index = self.index[item].reshape(1) if isinstance(item, int) else self.index[item]
        if index.dim() != 1:
            raise IndexError(f"Indexing GatheredBitMasks with {item} gives index shape {tuple(index.shape)}; "
                             "use an int, a slice, or a 1-d bool or int64 tensor")
        return self._sharing(self.source, index)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_instances={len(self)}, source_masks={len(self.source)})"

    def crop_and_resize(self, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
        """Each row's mask inside its box, (N, mask_size, mask_size) bool: Detectron2's
        ``BitMasks.crop_and_resize`` of the gathered masks. Only the rows' masks are made float32, as there,
        or the source's if it has fewer."""
        if len(boxes) != len(self):
            raise ValueError(f"GatheredBitMasks.crop_and_resize: {len(boxes)} boxes for {len(self)} masks")
        masks, rows = self.source, self.index
        if len(rows) < len(masks):  # sizes the host knows: no wait
            masks, rows = masks[rows], torch.arange(len(rows), device=masks.device)
        # float32 RoIs, as ROIAlign casts them to its float32 input anyway; a half-precision row number would
        # round above 256 (bfloat16) or 2048 (float16)
        rois = torch.cat([rows.float()[:, None], boxes.float().to(masks.device)], dim=1)
        aligned = ROIAlign((mask_size, mask_size), 1.0, 0, aligned=True)(masks.float()[:, None], rois)
        return aligned.squeeze(1) >= 0.5
