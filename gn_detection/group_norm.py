"""Group Normalization layers built from the MODEL.GN settings.

Detectron2's own ``"GN"`` norm is always ``nn.GroupNorm(32, C)``. Our components instead build GN layers
from a :class:`GroupNormSpec`, which covers the paper's two ablation axes: a fixed number of groups G
(``NUM_GROUPS``; G=1 is LayerNorm-like) or a fixed number of channels per group (``CHANNELS_PER_GROUP``;
1 is InstanceNorm-like). With G=32 and eps=1e-5 the layers are identical to Detectron2's.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Union

from torch import nn


class GroupNormChannelsError(ValueError):
    """A GN setting that cannot split a layer's channels into equal groups."""


@dataclass(frozen=True)
class GroupNormSpec:
    """How to build a GN layer for any channel count.

    Args:
        num_groups: groups per layer (the paper's G); used when ``channels_per_group`` is 0.
        channels_per_group: if > 0, each layer gets ``channels // channels_per_group`` groups instead.
        eps: added to the variance for numerical stability.
    """

    num_groups: int = 32
    channels_per_group: int = 0
    eps: float = 1e-5

    def __post_init__(self):
        if self.num_groups < 1:
            raise ValueError(f"MODEL.GN.NUM_GROUPS must be >= 1, got {self.num_groups}")
        if self.channels_per_group < 0:
            raise ValueError(
                f"MODEL.GN.CHANNELS_PER_GROUP must be >= 0 (0 = use NUM_GROUPS), "
                f"got {self.channels_per_group}"
            )
        if not self.eps > 0:
            raise ValueError(f"MODEL.GN.EPS must be > 0, got {self.eps}")

    @classmethod
    def from_config(cls, cfg) -> "GroupNormSpec":
        """The spec described by ``cfg.MODEL.GN`` (see :func:`gn_detection.add_gn_config`)."""
        gn = cfg.MODEL.GN
        return cls(num_groups=gn.NUM_GROUPS, channels_per_group=gn.CHANNELS_PER_GROUP, eps=gn.EPS)

    def setting(self) -> str:
        """The config setting that decides the group count, as a user would write it."""
        if self.channels_per_group:
            return f"MODEL.GN.CHANNELS_PER_GROUP={self.channels_per_group}"
        return f"MODEL.GN.NUM_GROUPS={self.num_groups}"

    def groups_for(self, channels: int) -> int:
        """Number of groups for a layer with ``channels`` channels.

        Raises:
            GroupNormChannelsError: if the setting does not split ``channels`` evenly.
        """
        divisor = self.channels_per_group or self.num_groups
        if channels % divisor:
            raise GroupNormChannelsError(
                f"{self.setting()} does not divide a GN layer's {channels} channels; "
                f"choose a value that divides {channels}"
            )
        return channels // divisor if self.channels_per_group else self.num_groups

    def __call__(self, channels: int) -> nn.GroupNorm:
        """Build the GN layer for ``channels`` channels (usable as a Detectron2 ``norm`` callable)."""
        return nn.GroupNorm(self.groups_for(channels), channels, eps=self.eps)


NormSetting = Union[str, Callable[[int], nn.Module]]


def resolve_norm(norm: NormSetting, spec: GroupNormSpec) -> NormSetting:
    """Map Detectron2's ``"GN"`` to ``spec``; any other norm (``"FrozenBN"``, ``"SyncBN"``, ``""``, a
    callable) is returned unchanged for :func:`detectron2.layers.get_norm` to handle."""
    return spec if norm == "GN" else norm


@contextmanager
def gn_layer_context(where: str) -> Iterator[None]:
    """Prefix a :class:`GroupNormChannelsError` raised while building ``where`` with that name, so the
    error says which layer (and which config key sets its width) the GN setting does not fit."""
    try:
        yield
    except GroupNormChannelsError as e:
        raise GroupNormChannelsError(f"Cannot build {where}: {e}") from None
