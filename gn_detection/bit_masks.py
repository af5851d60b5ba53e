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
    directly: the same ROIAlign on the same mask and box, so the same targets, from one float32 copy of the
    image's masks. Indexing composes the index and copies no mask; everything else reads ``tensor``."""

    def __init__(self, source: Union[torch.Tensor, BitMasks], index: Optional[torch.Tensor] = None):
        """``source``: (G, H, W) masks (any dtype, read as bool) or a :class:`BitMasks`; ``index``: (N,) int64
        rows of it, on its device; all G rows in order if None (as ``type(masks)(tensor)`` in
        ``BitMasks.cat`` builds one)."""
        if isinstance(source, GatheredBitMasks):
            source, index = source.source, source.index if index is None else source.index[index]
        elif isinstance(source, BitMasks):
            source = source.tensor
        if source.dim() != 3:
            raise ValueError(f"GatheredBitMasks: source must be (masks, height, width), got shape "
                             f"{tuple(source.shape)}")
        self.source = source.to(torch.bool)
        self.index = torch.arange(len(source), device=source.device) if index is None else index
        self.image_size = source.shape[1:]

    @property
    def tensor(self) -> torch.Tensor:
        """The masks, (N, H, W) bool, gathered (a copy) at each read."""
        return self.source[self.index]

    @property
    def device(self) -> torch.device:
        return self.source.device

    def to(self, *args: Any, **kwargs: Any) -> "GatheredBitMasks":
        source = self.source.to(*args, **kwargs)
        return GatheredBitMasks(source, self.index.to(source.device))

    def __getitem__(self, item: Union[int, slice, torch.Tensor]) -> "GatheredBitMasks":
        """Rows as :class:`BitMasks` gives them (an int gives one row), sharing the source masks."""
        index = self.index[item].reshape(1) if isinstance(item, int) else self.index[item]
        if index.dim() != 1:
            raise IndexError(f"Indexing GatheredBitMasks with {item} gives index shape {tuple(index.shape)}; "
                             "use an int, a slice, or a 1-d bool or int64 tensor")
        return GatheredBitMasks(self.source, index)

    def __len__(self) -> int:
        return len(self.index)

    def crop_and_resize(self, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
        """Each row's mask inside its box, (N, mask_size, mask_size) bool: Detectron2's
        ``BitMasks.crop_and_resize`` of the gathered masks, without gathering them."""
        if len(boxes) != len(self):
            raise ValueError(f"GatheredBitMasks.crop_and_resize: {len(boxes)} boxes for {len(self)} masks")
        rois = torch.cat([self.index.to(boxes.dtype)[:, None], boxes], dim=1).to(self.source.device)
        aligned = ROIAlign((mask_size, mask_size), 1.0, 0, aligned=True)(self.source.float()[:, None], rois)
        return aligned.squeeze(1) >= 0.5
