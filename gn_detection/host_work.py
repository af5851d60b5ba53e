"""The host's share of a training step: how many aten ops it dispatches and how many of them make the host
wait for the device, by part of the model.

On a GPU whose step is bound by the CPU (the H100 profiles in docs/speed.md: 164-192 ms of wall time per
8-image step against 108.6 ms of GPU time), these two counts are what a lever on the host side changes: every
op costs the host a dispatch (and most a kernel launch), and every wait drains the device's queue, which then
idles while the host launches what follows. The counts do not depend on the device's speed, so the CPU
measures them too. Two differences: a copy between host and device is one op and one wait on CUDA but nothing
on the CPU (where both sides are the host), and a few ops take other paths on the CPU (torchvision's
``batched_nms`` loops over the levels there, one NMS per level, and does one NMS with offset boxes on CUDA).
"""
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# GeneralizedRCNN's parts, counted while their forward runs; all else (preprocessing, the losses' sum, the
# backward, the optimizer) is "other"
MODEL_PARTS: Tuple[str, ...] = ("backbone", "proposal_generator", "roi_heads")
OTHER = "other"
COUNTED_PARTS: Tuple[str, ...] = (*MODEL_PARTS, OTHER)  # every part a count can go to

# ops whose output's value or size the host needs before it can go on: a CUDA stream synchronization each
_WAITING_OPS = frozenset({
    "aten._local_scalar_dense",  # .item(), bool(), int() of a tensor
    "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
    "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.repeat_interleave",
})
_INDEXING_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})


def makes_host_wait(func, args, kwargs) -> bool:
    """Whether the aten op ``func`` on ``args``/``kwargs`` makes the host wait for a CUDA device: it returns
    a host value or a data-dependent size (indexing with a boolean mask is a ``nonzero``), or it is a blocking
    copy between host and device memory."""
    name = str(func.overloadpacket)
    if name in _WAITING_OPS:
        return True
    if name in _INDEXING_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "aten.copy_":
        destination, source = args[:2]
        return _crosses_host_and_device(source.device, destination.device) and not (
            args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    if name == "aten._to_copy":
        target = kwargs.get("device")
        return (target is not None and _crosses_host_and_device(args[0].device, torch.device(target))
                and not kwargs.get("non_blocking", False))
    return False


def _crosses_host_and_device(a: torch.device, b: torch.device) -> bool:
    return (a.type == "cpu") != (b.type == "cpu")


class HostWorkCounter(TorchDispatchMode):
    """A dispatch mode counting, per model part, the aten ops dispatched (``ops``) and those among them that
    make the host wait (``waits``, see :func:`makes_host_wait`). ``part`` names where counts go now."""

    def __init__(self):
        super().__init__()
        self.ops, self.waits, self.part = Counter(), Counter(), OTHER

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[self.part] += 1
        if makes_host_wait(func, args, kwargs):
            self.waits[self.part] += 1
        return func(*args, **kwargs)


@contextmanager
def counting_host_work(model: torch.nn.Module) -> Iterator[HostWorkCounter]:
    """Count the host work of what runs inside, attributing the forward of each of ``model``'s
    :data:`MODEL_PARTS` that it has to that part (hooks, removed on exit)."""
    counter = HostWorkCounter()

    def enter(part):
        def hook(module, args):
            counter.part = part
        return hook

    def leave(module, args, output):
        counter.part = OTHER

    handles = []
    for part in MODEL_PARTS:
        module = getattr(model, part, None)
        if module is not None:
            handles += [module.register_forward_pre_hook(enter(part)), module.register_forward_hook(leave)]
    try:
        with counter:
            yield counter
    finally:
        for handle in handles:
            handle.remove()
