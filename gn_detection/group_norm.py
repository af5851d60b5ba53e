"""Group Normalization layers built from the MODEL.GN settings.

Detectron2's own ``"GN"`` norm is always ``nn.GroupNorm(32, C)``. Our components instead build GN layers
from a :class:`GroupNormSpec`, which covers the paper's two ablation axes: a fixed number of groups G
(``NUM_GROUPS``; G=1 is LayerNorm-like) or a fixed number of channels per group (``CHANNELS_PER_GROUP``;
1 is InstanceNorm-like). With G=32 and eps=1e-5 the layers compute what Detectron2's do, and have the same
parameters; they can also apply the ReLU that follows them, and run as fused Triton kernels on CUDA
(:mod:`gn_detection.triton_group_norm`).
"""
import collections.abc
import functools
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from torch import nn

from .recompute import recomputed_outputs

IMPLEMENTATIONS = ("auto", "triton", "torch")
NormSetting = Union[str, Callable[[int], nn.Module]]


class GroupNormChannelsError(ValueError):
    """A GN setting that cannot split a layer's channels into equal groups."""


def is_integer(value) -> bool:
    """Whether a setting's ``value`` is an integer (numpy's too), not a bool (YAML's true is no count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class GroupNormSpec:
    """How to build a GN layer for any channel count. Each field is the config key of its name under MODEL.GN,
    where the errors for a bad value name it.

    Args:
        num_groups: groups per layer (the paper's G); used when ``channels_per_group`` is 0.
        channels_per_group: if > 0, each layer gets ``channels // channels_per_group`` groups instead.
        eps: added to the variance for numerical stability (finite, > 0).
        impl, fuse_relu, autocast_half, recompute_output: see README.md's table of config keys.
    """

    num_groups: int = 32
    channels_per_group: int = 0
    eps: float = 1e-5
    impl: str = "auto"
    fuse_relu: bool = True
    autocast_half: bool = True
    recompute_output: bool = True

    def __post_init__(self):
        if not is_integer(self.num_groups) or self.num_groups < 1:
            raise ValueError(f"MODEL.GN.NUM_GROUPS must be an integer >= 1, got {self.num_groups!r}")
        if not is_integer(self.channels_per_group) or self.channels_per_group < 0:
            raise ValueError(
                f"MODEL.GN.CHANNELS_PER_GROUP must be an integer >= 0 (0 = use NUM_GROUPS), "
                f"got {self.channels_per_group!r}"
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0 < self.eps < math.inf:
            raise ValueError(f"MODEL.GN.EPS must be a finite number > 0, got {self.eps!r}")
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"MODEL.GN.IMPL must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        for name in ("fuse_relu", "autocast_half", "recompute_output"):
            if not isinstance(getattr(self, name), bool):  # "no" would be truthy: the lever on, silently
                raise ValueError(f"MODEL.GN.{name.upper()} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, cfg) -> "GroupNormSpec":
        """The spec described by ``cfg.MODEL.GN`` (see :func:`gn_detection.add_gn_config`).

        Raises:
            KeyError: for a config without gn_detection's keys (Detectron2's own ``get_cfg()``), saying how to add
                them.
        """
        if "GN" not in cfg.MODEL:
            raise KeyError("this config lacks gn_detection's keys (MODEL.GN, MODEL.CUDA_GRAPHS, ...), which its "
                           "components read: make it with gn_detection.config.load_config(file), or call "
                           "gn_detection.add_gn_config(cfg) on Detectron2's get_cfg() before merging a file into it")
        gn = cfg.MODEL.GN
        return cls(
            num_groups=gn.NUM_GROUPS,
            channels_per_group=gn.CHANNELS_PER_GROUP,
            eps=gn.EPS,
            impl=gn.IMPL,
            fuse_relu=gn.FUSE_RELU,
            autocast_half=gn.AUTOCAST_HALF,
            recompute_output=gn.RECOMPUTE_OUTPUT,
        )

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

    def __call__(self, channels: int) -> "FusedGroupNorm":
        """Build the GN layer for ``channels`` channels (usable as a Detectron2 ``norm`` callable)."""
        return FusedGroupNorm(
            self.groups_for(channels), channels, eps=self.eps, impl=self.impl, autocast_half=self.autocast_half,
            recompute_output=self.recompute_output,
        )


class FusedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same function) that can also apply the ReLU after it, runs as
    fused Triton kernels on CUDA, and under autocast can stay in the activations' half precision.

    Args:
        num_groups, num_channels, eps, affine: as in ``nn.GroupNorm``.
        relu: apply ReLU to the output (see :func:`fold_relu`).
        impl: ``"auto"``: Triton kernels for CUDA tensors, ``torch.nn.functional.group_norm`` otherwise;
            ``"triton"``: always the kernels (CPU tensors only under ``TRITON_INTERPRET=1``, for tests);
            ``"torch"``: always ``group_norm``.
        autocast_half: with the Triton kernels under autocast, normalize fp16/bf16 inputs in their own dtype
            (fp32 statistics) and return that dtype. If False, GN runs in fp32 under autocast, as CUDA autocast
            does for torch's group_norm. Torch's group_norm otherwise keeps autocast's own policy (fp32 on
            CUDA), since it would compute the parameter gradients in half precision.
        recompute_output: with the Triton kernels and ``relu``, inside
            :func:`gn_detection.recompute.recomputed_outputs`, the output is not kept for the op that consumes
            it but rebuilt from the input in the backward.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        relu: bool = False,
        impl: str = "auto",
        autocast_half: bool = True,
        recompute_output: bool = True,
    ):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.relu, self.impl, self.autocast_half, self.recompute_output = relu, impl, autocast_half, recompute_output

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, relu={self.relu}, impl={self.impl}, autocast_half={self.autocast_half}, "
                f"recompute_output={self.recompute_output}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.autocast_half and torch.is_autocast_enabled(x.device.type):
            x = x.float()  # GN in fp32 under autocast, as CUDA autocast does for torch's group_norm
        if self.uses_triton(x):
            from . import triton_group_norm

            # a custom autograd function: autocast casts nothing, the kernels keep x's dtype
            # only a fused ReLU's output is kept by its consumer alone (and so worth recomputing)
            return triton_group_norm.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.relu,
                                                self.recompute_output and self.relu)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # autocast picks the dtype
        return F.relu_(y) if self.relu else y

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether this layer runs the Triton kernels on ``x`` (see ``impl``)."""
        if self.impl == "torch":
            return False
        if self.impl == "triton":
            if not triton_available():
                raise RuntimeError("MODEL.GN.IMPL is 'triton' but Triton cannot be imported; install PyTorch's "
                                   "CUDA build (it ships Triton) or set MODEL.GN.IMPL to 'auto' or 'torch'")
            return True
        return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and triton_available()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with PyTorch's CUDA builds for Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fold_relu(conv: nn.Module) -> None:
    """Make the GN layer of a Detectron2 ``Conv2d`` apply the ReLU that follows it: the conv's own
    ``activation`` is dropped; a caller whose ``forward`` applies the ReLU itself must then skip it."""
    if not isinstance(conv.norm, FusedGroupNorm):
        raise TypeError(f"fold_relu needs a FusedGroupNorm as the conv's norm, got {type(conv.norm).__name__}")
    conv.norm.relu = True
    conv.activation = None


def fold_relus(convs: Iterable[nn.Module], norm: NormSetting, gn: GroupNormSpec) -> None:
    """:func:`fold_relu` for each conv+norm+ReLU of a head, when its ``norm`` is GN and ``gn.fuse_relu``."""
    if norm == "GN" and gn.fuse_relu:
        for conv in convs:
            fold_relu(conv)


def recompute_context(convs: Sequence[nn.Module], x: torch.Tensor) -> ContextManager:
    """:func:`gn_detection.recompute.recomputed_outputs` for a module that runs these Detectron2 ``Conv2d`` s on
    ``x``: open when one of them has a GN+ReLU layer (see :func:`fold_relu`) that lets its output be recomputed
    and runs the Triton kernels on inputs like ``x``. Otherwise nothing would be recomputed (a GN output
    followed by a separate ReLU is kept by no one), and a caller's own saved-tensor hooks stay in charge."""
    norm = next((conv.norm for conv in convs
                 if isinstance(conv.norm, FusedGroupNorm) and conv.norm.relu and conv.norm.recompute_output), None)
    return recomputed_outputs(norm is not None and norm.uses_triton(x))


def resolve_norm(norm: NormSetting, spec: GroupNormSpec) -> NormSetting:
    """Map Detectron2's ``"GN"`` to ``spec``; any other norm (``"FrozenBN"``, ``"SyncBN"``, ``""``, a
    callable) is returned unchanged for :func:`detectron2.layers.get_norm` to handle.

    Raises:
        ValueError: for a name :func:`detectron2.layers.get_norm` does not know (it raises a bare KeyError).
    """
    if norm == "GN" and not isinstance(spec, GroupNormSpec):
        raise TypeError(f"gn must be a GroupNormSpec (e.g. GroupNormSpec(num_groups=32)) where norm is 'GN', got "
                        f"{spec!r}")
    if isinstance(norm, str) and norm not in ("", "GN"):
        try:
            get_norm(norm, 32)
        except KeyError:
            raise ValueError(f"norm {norm!r} is not one Detectron2 builds; give e.g. 'GN', 'BN', 'SyncBN', "
                             "'FrozenBN' or '' (none), as the config's NORM keys take") from None
    return spec if norm == "GN" else norm


def check_layer_widths(dims: Sequence[int], name: str, key: str) -> None:
    """Raise a ValueError naming ``name`` (the argument) and ``key`` (the config key that sets it) unless ``dims``
    is a list of integers >= 1 (a zero or negative width fails only when the layer runs, inside torch)."""
    if not isinstance(dims, collections.abc.Sequence) or isinstance(dims, str) or not all(
            is_integer(d) and d >= 1 for d in dims):
        raise ValueError(f"{name} ({key}) must be a list of integers >= 1, got {dims!r}")


@contextmanager
def gn_layer_context(where: str) -> Iterator[None]:
    """Prefix a :class:`GroupNormChannelsError` raised while building ``where`` with that name, so the
    error says which layer (and which config key sets its width) the GN setting does not fit."""
    try:
        yield
    except GroupNormChannelsError as e:
        raise GroupNormChannelsError(f"Cannot build {where}: {e}") from None
