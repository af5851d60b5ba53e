"""Activations that are recomputed in the backward instead of being kept from the forward.

A fused GN+ReLU output ``y`` is kept for the backward only by the op that consumes it (the next conv needs
its input for the weight gradient); the GN layer itself keeps its input ``x`` and per-group statistics.
``y`` can be rebuilt from those in one pass, so keeping it costs memory (about a sixth of the activations
a GN Mask R-CNN keeps) for little gain. Inside :func:`recomputed_outputs`, an op that saves a remembered
output (or a view of it) for its backward saves a recipe instead, and the output is rebuilt when that
backward runs. The gradients are unchanged: the recipe rebuilds the output bit for bit.
"""
import contextlib
import functools
import threading
import weakref
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

_state = threading.local()  # per thread: the registry of the open recomputed_outputs() context, or None


class _Recipe:
    """How to rebuild one output: ``rebuild()``, and the versions of the tensors it reads, which must not have
    changed in place by the time it runs."""

    def __init__(self, output: torch.Tensor, rebuild: Callable[[], torch.Tensor], inputs: Tuple[torch.Tensor, ...],
                 on_death: Callable):
        self.output = weakref.ref(output, on_death)
        self.version = output._version
        self.rebuild, self.inputs = rebuild, inputs
        self.input_versions = tuple(t._version for t in inputs)

    def rebuilt(self) -> torch.Tensor:
        if tuple(t._version for t in self.inputs) != self.input_versions:
            raise RuntimeError(
                "A GN layer's input or parameter was modified in place between the forward and the backward, "
                "so its output cannot be recomputed; set MODEL.GN.RECOMPUTE_OUTPUT False, or do not modify "
                "it in place before backward()"
            )
        return self.rebuild()


def active_registry() -> Optional[Dict[int, _Recipe]]:
    """The open context's registry when an output made now could be recomputed (a context is open and grad
    mode is on), else None; ops call :func:`remember` only then, so outside a context they pay nothing."""
    registry = getattr(_state, "registry", None)
    return registry if registry is not None and torch.is_grad_enabled() else None


def remember(registry: Dict[int, _Recipe], output: torch.Tensor, rebuild: Callable[[], torch.Tensor],
             *inputs: torch.Tensor) -> None:
    """Let ops inside the context save a recipe for ``output``: ``rebuild()`` returns a tensor equal to it
    and reads only ``inputs`` (which it keeps alive; they should be ones the producing op saves anyway)."""
    key = id(output)
    registry[key] = _Recipe(output, rebuild, inputs, lambda _: registry.pop(key, None))


def _pack(registry: Dict[int, _Recipe], tensor: torch.Tensor):
    """A recipe for ``tensor`` if it is a remembered output, or a view of one, unchanged since it was made;
    else ``tensor`` itself, kept as autograd would."""
    for candidate in (tensor, tensor._base):
        recipe = registry.get(id(candidate)) if candidate is not None else None
        if recipe is not None and recipe.output() is candidate and candidate._version == recipe.version:
            return recipe, tensor.size(), tensor.stride(), tensor.storage_offset()
    return tensor


def _unpack(packed) -> torch.Tensor:
    """What :func:`_pack` was given: kept as is, or rebuilt (with the saved view's size, strides and offset)."""
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, size, stride, offset = packed
    return recipe.rebuilt().as_strided(size, stride, offset)


@contextlib.contextmanager
def recomputed_outputs(enabled: bool = True) -> Iterator[None]:
    """Ops inside this context save a recipe instead of any remembered output they keep for their backward
    (see the module docstring). Nested contexts share the outermost one's registry. As with any
    ``saved_tensors_hooks``, hooks a caller opened outside (``torch.utils.checkpoint`` without reentrance,
    ``save_on_cpu``, memory profilers) are not applied to tensors saved inside."""
    if not enabled or getattr(_state, "registry", None) is not None:
        yield
        return
    registry = _state.registry = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, registry), _unpack):
            yield
    finally:
        _state.registry = None
        registry.clear()  # recipes already saved live on in the graph; the rest go now, not at a later gc
