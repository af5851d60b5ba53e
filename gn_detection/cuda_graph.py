"""A backbone's training forward and backward replayed as CUDA graphs (MODEL.CUDA_GRAPHS).

At 2 images per GPU a GN Mask R-CNN step is bound by the CPU that launches its kernels, not by the GPU
(docs/speed.md): ResNet-50-FPN alone makes some 60 GN layers' and 60 convs' launches going forward and more
going back, each costing Python and dispatch time. Captured once per input shape with
:func:`torch.cuda.make_graphed_callables`, they replay as one graph forward and one backward, and the CPU is
free for the heads. The graphs run the same kernels on the same inputs: what is computed does not change.
"""
import contextlib
import logging
import time
from typing import Callable, Dict, Hashable, Optional

import torch
from detectron2.modeling.backbone import FPN
from torch import nn

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], Dict[str, torch.Tensor]]
DISABLE_HINT = "or set MODEL.CUDA_GRAPHS.BACKBONE False to train the backbone eagerly"


def capture_cuda_graphs(module: nn.Module, sample: torch.Tensor) -> Callable:
    """``module``'s forward and backward on inputs like ``sample`` as CUDA graphs (see
    :func:`torch.cuda.make_graphed_callables`, which gives each capture a memory pool and a stream of its own);
    the returned callable takes such an input."""
    return torch.cuda.make_graphed_callables(module, (sample,), allow_unused_input=True)


class _EagerRunner(nn.Module):
    """What a capture records: ``forward`` on ``owner``'s parameters (registered here so that the graph
    takes them as inputs and returns their gradients). A throw-away module, so that the capture replaces
    its ``forward``, not the owner's; it is not part of the owner's module tree or checkpoint."""

    def __init__(self, owner: nn.Module, forward: Forward):
        super().__init__()
        self.owner = owner
        self.eager_forward = forward

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.eager_forward(x)


class _Graph:
    """One capture, replayed; each replay's backward first checks what the graph's fixed memory needs: that no
    later replay has overwritten this call's saved activations, and that no trainable parameter holds a
    gradient (after a replay it may be the graph's own output buffer, which the backward overwrites)."""

    def __init__(self, graphed: Callable, owner: nn.Module):
        self.graphed = graphed
        # per parameter the graph reads: its module, its name there, the tensor, and where it lived and whether
        # it was trained at the capture
        self.captured = []
        for qualified, p in owner.named_parameters():
            module, _, name = qualified.rpartition(".")
            self.captured.append((owner.get_submodule(module), name, p, p.data_ptr(), p.requires_grad))
        self.trainable = [p for *_, p, _, trained in self.captured if trained]
        self.calls = 0

    def reads_current_parameters(self) -> bool:
        """Whether the owner's parameters are still the tensors the capture read, where it read them, with the
        same ``requires_grad`` (``.to()``, ``.data =``, a new ``Parameter`` or unfreezing change that). A
        lookup in each parameter's module: a fifth of the cost of walking ``owner.parameters()`` every step."""
        return all(module._parameters.get(name) is p and p.data_ptr() == pointer and p.requires_grad == trained
                   for module, name, p, pointer, trained in self.captured)

    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.calls += 1
        call = self.calls
        outputs = self.graphed(x)
        node = next(iter(outputs.values())).grad_fn  # the replay's backward (one node for all outputs)
        if node is not None:
            node.register_prehook(lambda grads: self._check_backward(call))
        return outputs

    def _check_backward(self, call: int) -> None:
        if call != self.calls:
            raise RuntimeError(
                "The backbone ran again on an input of the same shape before this call's backward, and its CUDA "
                "graph keeps one set of activations per shape; run each step's backward before the next forward, "
                + DISABLE_HINT)
        if any(p.grad is not None for p in self.trainable):
            raise RuntimeError(
                "The backbone's CUDA graph writes its parameter gradients to the same memory at every backward, so "
                "they cannot be added to gradients already there; set them to None before each backward "
                "(optimizer.zero_grad(), whose default set_to_none=True Detectron2's trainers use), " + DISABLE_HINT)


class TrainingGraphs:
    """The CUDA graphs of one module's training forward and backward, one per kind of input (shape,
    strides, dtype, device and autocast setting), at most ``max_graphs``; other inputs, and every call
    outside training (eval mode, no grad), run the eager forward.

    What a graph needs of the training loop, as Detectron2's trainers run it: each call's backward runs
    before the next call, with the parameters' gradients set to None (both checked, with an error); the
    parameters are updated in place (if they are replaced, moved or (un)frozen, the graphs are captured
    again).

    Args:
        max_graphs: captures kept; each holds the memory of its input, outputs, parameter gradients and
            activations.
        capture: ``capture(module, sample) -> callable`` (default :func:`capture_cuda_graphs`).
        device_type: tensors on this device type are graphed.
    """

    def __init__(self, max_graphs: int, capture: Callable = capture_cuda_graphs, device_type: str = "cuda"):
        if max_graphs < 1:
            raise ValueError(f"MODEL.CUDA_GRAPHS.MAX_SHAPES must be >= 1, got {max_graphs}")
        self.max_graphs, self.capture, self.device_type = max_graphs, capture, device_type
        self.graphs: Dict[Hashable, _Graph] = {}
        self._warned_full = False

    def __getstate__(self):  # a copy (deepcopy, pickle) captures its own graphs when it trains
        return {"max_graphs": self.max_graphs, "capture": self.capture, "device_type": self.device_type}

    def __setstate__(self, state):
        self.__init__(**state)

    def __call__(self, owner: nn.Module, forward: Forward, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``forward(x)`` for ``owner`` (whose parameters it reads), replayed from a graph where it can be."""
        if not (owner.training and torch.is_grad_enabled() and x.device.type == self.device_type):
            return forward(x)
        key = self._key(x)
        graph = self.graphs.get(key)
        if graph is not None and not graph.reads_current_parameters():
            logger.info("%s's parameters were replaced, moved or (un)frozen since its CUDA graphs were captured; "
                        "capturing them again", type(owner).__name__)
            self.graphs.clear()
            graph = None
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                self._warn_full(x)
                return forward(x)
            graph = self.graphs[key] = self._capture(owner, forward, x)
        return graph(x)

    def _key(self, x: torch.Tensor) -> Hashable:
        device = self.device_type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        return tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad, autocast

    def _capture(self, owner: nn.Module, forward: Forward, x: torch.Tensor) -> _Graph:
        start = time.perf_counter()
        device = self.device_type
        reserved = self._reserved_bytes()
        sample = x.detach().clone().requires_grad_(x.requires_grad)
        # under autocast, a capture needs autocast's cast cache off (the trainer's autocast keeps it on)
        recast = (torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)
                  if torch.is_autocast_enabled(device) else contextlib.nullcontext())
        try:
            with recast:
                graphed = self.capture(_EagerRunner(owner, forward), sample)
        except Exception as e:
            message = (f"Capturing {type(owner).__name__}'s training step on an input of shape {tuple(x.shape)} as "
                       f"CUDA graphs failed ({e}); lower MODEL.CUDA_GRAPHS.MAX_SHAPES if memory ran out, "
                       + DISABLE_HINT)
            out_of_memory = any(isinstance(error, torch.OutOfMemoryError) for error in (e, e.__context__))
            raise (torch.OutOfMemoryError if out_of_memory else RuntimeError)(message) from e
        logger.info("Captured %s's training forward and backward for inputs of shape %s as CUDA graphs in %.1f s "
                    "(%d of MODEL.CUDA_GRAPHS.MAX_SHAPES=%d; %.2f GB more memory reserved)", type(owner).__name__,
                    tuple(x.shape), time.perf_counter() - start, len(self.graphs) + 1, self.max_graphs,
                    (self._reserved_bytes() - reserved) / 1e9)
        return _Graph(graphed, owner)

    def _reserved_bytes(self) -> int:
        return torch.cuda.memory_reserved() if self.device_type == "cuda" else 0

    def _warn_full(self, x: torch.Tensor) -> None:
        if not self._warned_full:
            self._warned_full = True
            logger.warning("MODEL.CUDA_GRAPHS.MAX_SHAPES=%d input shapes have CUDA graphs; inputs of other shapes "
                           "(first: %s) run eagerly. Raise it (each graph keeps its own memory) or fix the "
                           "input size.", self.max_graphs, tuple(x.shape))


class GraphedFPN(FPN):
    """Detectron2's FPN (the same modules, so the same checkpoint keys) whose training forward and backward,
    bottom-up network included, replay as CUDA graphs on CUDA inputs (see :class:`TrainingGraphs`).

    Args:
        *args, **kwargs: as for ``FPN``.
        max_graphs: input shapes that get graphs (MODEL.CUDA_GRAPHS.MAX_SHAPES).
        graphs: the graphs' keeper; by default ``TrainingGraphs(max_graphs)``.
    """

    def __init__(self, *args, max_graphs: int = 2, graphs: Optional[TrainingGraphs] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.graphs = TrainingGraphs(max_graphs) if graphs is None else graphs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.graphs(self, super().forward, x)
