"""GroupNorm, optionally fused with the ReLU that follows it, as Triton kernels (forward and backward).

A GN group (e.g. 8 channels x 200 x 304 pixels) is far too large to keep on-chip, so the kernels go over
the activation in as few passes as that allows. Each program takes a block of channels and a chunk of
their pixels ("a slot"); large maps are cut into several chunks so that even one or two images give the
GPU enough programs:

    forward:  1. per-slot mean and M2 (Chan's parallel update, fp32)      reads x
              2. group statistics merged from the slots' ones; normalize,
                 scale and shift (+ ReLU)                                 reads x, writes y
    backward: 3. per-slot sums of dz and dz * x_hat (dz = dy masked by
                 the recomputed ReLU)                                     reads x, dy
              4. dx from the group's sums                                 reads x, dy, writes dx

A 4-D input laid out channels last (NHWC) is read and written in that layout, as are the output and the
input gradient, so a channels-last network needs no conversions around its GN layers; any other input is
made NCHW-contiguous. Nothing of activation size is saved for the backward: x_hat and the ReLU mask are
recomputed from x and the slots' statistics. Statistics and sums are fp32 whatever the activation's dtype
(fp32/fp16/bf16), which stays as it is. ``torch.nn.functional.group_norm`` is the reference these kernels
are tested against (in float64, with ``TRITON_INTERPRET=1`` on the CPU).
"""
import contextlib
import functools
import math
import types
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .recompute import active_registry, remember

# Set when this module was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 2048  # elements per program per step: channels x pixels
_MAX_PIXEL_BLOCK = 1024
_MAX_MEMBER_TILE = 4096  # channels x group slots per program, see _launch_shape
_MIN_PROGRAMS = 1024  # cut maps into pixel chunks until a launch has this many programs (H100: 132 SMs)
_CHANNELS_LAST_BLOCK = 64  # channels per program in NHWC: 128 adjacent bytes of each pixel in fp16


@triton.jit
def _slot(C, HW, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """This program's sample, chunk, channels and their mask, and the offset of each channel's first pixel
    (NCHW: channels HW apart, pixels adjacent; CHANNELS_LAST, i.e. NHWC: channels adjacent, pixels C apart)."""
    n = tl.program_id(0)
    chunk = tl.program_id(2)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    if CHANNELS_LAST:
        rows = n.to(tl.int64) * C * HW + channels
    else:
        rows = (n * C + channels).to(tl.int64) * HW
    return n, chunk, channels, channel_ok, rows


@triton.jit
def _pixel_tile(rows, channel_ok, start, end, C, BLOCK_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Offsets and mask of the [channels, BLOCK_HW] tile that starts at pixel ``start`` (and stops before
    ``end``) of each channel."""
    pixels = start + tl.arange(0, BLOCK_HW)
    if CHANNELS_LAST:
        offsets = rows[:, None] + pixels.to(tl.int64)[None, :] * C
    else:
        offsets = rows[:, None] + pixels[None, :]
    return offsets, channel_ok[:, None] & (pixels < end)[None, :]


@triton.jit
def _slot_stats_kernel(X, MEAN, M2, C, HW, CHUNK, S, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr):
    """Per (sample, channel, chunk): mean and sum of squared deviations over the chunk's pixels."""
    n, chunk, channels, channel_ok, rows = _slot(C, HW, BLOCK_C, CHANNELS_LAST)
    first = chunk * CHUNK
    end = tl.minimum(first + CHUNK, HW)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for start in range(first, end, BLOCK_HW):
        offsets, mask = _pixel_tile(rows, channel_ok, start, end, C, BLOCK_HW, CHANNELS_LAST)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(end - start, BLOCK_HW).to(tl.float32)
        block_mean = tl.sum(x, axis=1) / count
        deviation = tl.where(mask, x - block_mean[:, None], 0.0)
        block_m2 = tl.sum(deviation * deviation, axis=1)
        # Chan et al.: merge (seen pixels, mean, m2) with (count, block_mean, block_m2)
        seen = (start - first) * 1.0
        total = seen + count
        delta = block_mean - mean
        mean += delta * (count / total)
        m2 += block_m2 + delta * delta * (seen * count / total)
    slots = (n * C + channels) * S + chunk
    tl.store(MEAN + slots, mean, mask=channel_ok)
    tl.store(M2 + slots, m2, mask=channel_ok)


@triton.jit
def _group_slots(n, channels, channel_ok, C, HW, CPG, CHUNK, S, BLOCK_MEMBERS: tl.constexpr):
    """For each given channel, every (channel, chunk) slot of its group: indices into (N, C, S) arrays, mask,
    the slot's channel and its pixel count."""
    member = tl.arange(0, BLOCK_MEMBERS)
    chunk = member % S
    member_channel = ((channels // CPG) * CPG)[:, None] + (member // S)[None, :]
    index = (n * C + member_channel) * S + chunk[None, :]
    mask = channel_ok[:, None] & (member < CPG * S)[None, :]
    count = tl.minimum(CHUNK, HW - chunk * CHUNK).to(tl.float32)[None, :]
    return index, mask, member_channel, count


@triton.jit
def _channel_block(W, B, MEAN, M2, n, channels, channel_ok, C, HW, CPG, CHUNK, S, eps,
                   BLOCK_MEMBERS: tl.constexpr):
    """Per given channel: the mean and 1/std of its group, merged exactly from the group's slot statistics
    (Chan's update with each slot's pixel count), and its weight and bias, in fp32."""
    index, mask, _, count = _group_slots(n, channels, channel_ok, C, HW, CPG, CHUNK, S, BLOCK_MEMBERS)
    slot_mean = tl.load(MEAN + index, mask=mask, other=0.0)
    slot_m2 = tl.load(M2 + index, mask=mask, other=0.0)
    mean = tl.sum(slot_mean * count, axis=1) / (CPG * 1.0 * HW)
    spread = tl.where(mask, slot_mean - mean[:, None], 0.0)
    m2 = tl.sum(slot_m2, axis=1) + tl.sum(count * spread * spread, axis=1)
    rstd = 1.0 / tl.sqrt(m2 / (CPG * 1.0 * HW) + eps)
    weight = tl.load(W + channels, mask=channel_ok, other=0.0).to(tl.float32)
    bias = tl.load(B + channels, mask=channel_ok, other=0.0).to(tl.float32)
    return mean, rstd, weight, bias


@triton.jit
def _normalized(x, mean, scale, bias):
    """(x - mean) * scale + bias per channel row; the forward and both backward kernels use this one
    expression, so the recomputed ReLU mask is bit-identical to the forward's (and mean is subtracted
    first, which keeps precision when the mean is large)."""
    return (x - mean[:, None]) * scale[:, None] + bias[:, None]


@triton.jit
def _load_x_dz(X, DY, offsets, mask, mean, scale, bias, RELU: tl.constexpr):
    """A tile of x and of dz (dy through the recomputed ReLU), in fp32."""
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        dz = tl.where(_normalized(x, mean, scale, bias) > 0.0, dz, 0.0)
    return x, dz


@triton.jit
def _forward_kernel(
    X, Y, W, B, MEAN, M2, C, HW, CPG, CHUNK, S, eps,
    RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_MEMBERS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """y = x_hat * w + b (then ReLU), one slot per program."""
    n, chunk, channels, channel_ok, rows = _slot(C, HW, BLOCK_C, CHANNELS_LAST)
    mean, rstd, weight, bias = _channel_block(W, B, MEAN, M2, n, channels, channel_ok, C, HW, CPG, CHUNK, S,
                                              eps, BLOCK_MEMBERS)
    scale = weight * rstd
    end = tl.minimum(chunk * CHUNK + CHUNK, HW)
    for start in range(chunk * CHUNK, end, BLOCK_HW):
        offsets, mask = _pixel_tile(rows, channel_ok, start, end, C, BLOCK_HW, CHANNELS_LAST)
        y = _normalized(tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32), mean, scale, bias)
        if RELU:  # NaN stays NaN, as with torch.relu, so a diverging run is still seen
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_sums_kernel(
    X, DY, W, B, MEAN, M2, DZ_SUM, DZ_XHAT_SUM, C, HW, CPG, CHUNK, S, eps,
    RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_MEMBERS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """Per slot: sum of dz and of dz * x_hat."""
    n, chunk, channels, channel_ok, rows = _slot(C, HW, BLOCK_C, CHANNELS_LAST)
    mean, rstd, weight, bias = _channel_block(W, B, MEAN, M2, n, channels, channel_ok, C, HW, CPG, CHUNK, S,
                                              eps, BLOCK_MEMBERS)
    scale = weight * rstd
    dz_acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    dz_xhat_acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    end = tl.minimum(chunk * CHUNK + CHUNK, HW)
    for start in range(chunk * CHUNK, end, BLOCK_HW):
        offsets, mask = _pixel_tile(rows, channel_ok, start, end, C, BLOCK_HW, CHANNELS_LAST)
        x, dz = _load_x_dz(X, DY, offsets, mask, mean, scale, bias, RELU)
        dz_acc += dz
        dz_xhat_acc += dz * ((x - mean[:, None]) * rstd[:, None])
    slots = (n * C + channels) * S + chunk
    tl.store(DZ_SUM + slots, tl.sum(dz_acc, axis=1), mask=channel_ok)
    tl.store(DZ_XHAT_SUM + slots, tl.sum(dz_xhat_acc, axis=1), mask=channel_ok)


@triton.jit
def _backward_dx_kernel(
    X, DY, DX, W, B, MEAN, M2, DZ_SUM, DZ_XHAT_SUM, C, HW, CPG, CHUNK, S, eps,
    RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_MEMBERS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """dx = rstd * (dz * w - mean(dz * w) - x_hat * mean(dz * w * x_hat)), means over the group."""
    n, chunk, channels, channel_ok, rows = _slot(C, HW, BLOCK_C, CHANNELS_LAST)
    mean, rstd, weight, bias = _channel_block(W, B, MEAN, M2, n, channels, channel_ok, C, HW, CPG, CHUNK, S,
                                              eps, BLOCK_MEMBERS)
    scale = weight * rstd
    # The group means of dz * w and dz * w * x_hat, from the slot sums of the previous kernel.
    index, members, member_channel, _ = _group_slots(n, channels, channel_ok, C, HW, CPG, CHUNK, S,
                                                     BLOCK_MEMBERS)
    member_w = tl.load(W + member_channel, mask=members, other=0.0).to(tl.float32)
    count = CPG * 1.0 * HW
    mean_dxhat = tl.sum(member_w * tl.load(DZ_SUM + index, mask=members, other=0.0), axis=1) / count
    mean_dxhat_xhat = tl.sum(member_w * tl.load(DZ_XHAT_SUM + index, mask=members, other=0.0), axis=1) / count
    end = tl.minimum(chunk * CHUNK + CHUNK, HW)
    for start in range(chunk * CHUNK, end, BLOCK_HW):
        offsets, mask = _pixel_tile(rows, channel_ok, start, end, C, BLOCK_HW, CHANNELS_LAST)
        x, dz = _load_x_dz(X, DY, offsets, mask, mean, scale, bias, RELU)
        x_hat = (x - mean[:, None]) * rstd[:, None]
        dx = rstd[:, None] * (dz * weight[:, None] - mean_dxhat[:, None] - x_hat * mean_dxhat_xhat[:, None])
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


# A layer's shape recurs every step and this Python costs as much as a launch; bounded, since the mask head's
# RoI count and the image sizes make new keys over a training run.
@functools.lru_cache(maxsize=4096)
def _launch_shape(samples: int, channels: int, pixels: int, channels_per_group: int,
                  channels_last: bool = False):
    """Grid, CHUNK and S, the block sizes for every kernel, and those for the statistics kernel. A program
    takes a block of channels and a chunk of their pixels: in NCHW whole channel rows (several when the maps
    are small), channels last up to _CHANNELS_LAST_BLOCK adjacent channels; the pixels are cut into S chunks
    of CHUNK pixels when the launch would have few programs. Fewer channels go in a program while its
    [channels, group slots] tile would exceed _MAX_MEMBER_TILE (large groups, e.g. G=1, on small maps): such
    tiles sit in registers, and one of 32 x 2048 took ptxas over 6 minutes."""
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), _CHANNELS_LAST_BLOCK)
    else:
        block_hw = min(triton.next_power_of_2(pixels), _MAX_PIXEL_BLOCK)
        block_c = min(triton.next_power_of_2(channels), max(1, _TILE // block_hw))
    while True:
        if channels_last:  # the channels' axis is the contiguous one; pixels fill the rest of the tile
            block_hw = min(triton.next_power_of_2(pixels), max(1, _TILE // block_c))
        columns = triton.cdiv(channels, block_c)
        wanted = min(triton.cdiv(pixels, block_hw), triton.cdiv(_MIN_PROGRAMS, samples * columns))
        chunk = triton.cdiv(triton.cdiv(pixels, max(1, wanted)), block_hw) * block_hw  # a multiple of the block
        chunks = triton.cdiv(pixels, chunk)
        members = triton.next_power_of_2(channels_per_group * chunks)
        if block_c == 1 or block_c * members <= _MAX_MEMBER_TILE:
            break
        block_c //= 2
    stats_blocks = {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "CHANNELS_LAST": channels_last}
    blocks = types.MappingProxyType({**stats_blocks, "BLOCK_MEMBERS": members})
    return (samples, columns, chunks), chunk, chunks, blocks, types.MappingProxyType(stats_blocks)


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-D map laid out channels last (NHWC) and not also NCHW-contiguous (as 1x1 maps
    are); the kernels then run in that layout, and every other input is made NCHW-contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _memory_format(channels_last: bool) -> torch.memory_format:
    """The layout the kernels run in (see :func:`_is_channels_last`)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's (switching only when it is not, since
    entering ``torch.cuda.device`` costs a few microseconds per launch)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _normalized_output(x, weight, bias, stats, pixels, cpg, launch, eps, relu) -> torch.Tensor:
    """The forward's output from x and its slot statistics (kernel 2, with the forward's ``_launch_shape``);
    also what a recomputation runs."""
    grid, chunk, chunks, blocks, _ = launch
    y = torch.empty_like(x)  # in x's layout
    with _on_device_of(x):
        _forward_kernel[grid](x, y, weight, bias, *stats, x.shape[1], pixels, cpg, chunk, chunks, eps, relu,
                              **blocks)
    return y


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, relu, registry):
        channels_last = _is_channels_last(x)
        x = x.contiguous(memory_format=_memory_format(channels_last))
        n, c = x.shape[:2]
        if x.numel():
            pixels, cpg = math.prod(x.shape[2:]), c // num_groups
            launch = grid, chunk, chunks, _, stats_blocks = _launch_shape(n, c, pixels, cpg, channels_last)
            stats = x.new_empty((2, n * c * chunks), dtype=torch.float32)  # per-slot mean, M2
            mean, m2 = slot_stats = tuple(stats)  # views, made once: each indexing is a dispatched op
            with _on_device_of(x):
                _slot_stats_kernel[grid](x, mean, m2, c, pixels, chunk, chunks, **stats_blocks)
            normalize_args = (x, weight, bias, slot_stats, pixels, cpg, launch, eps, relu)
            y = _normalized_output(*normalize_args)
            if registry is not None:  # what this function saves below is all a recomputation reads
                remember(registry, y, functools.partial(_normalized_output, *normalize_args), x, weight, bias)
        else:
            y, stats = torch.empty_like(x), x.new_zeros((2, 0), dtype=torch.float32)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.num_groups, ctx.eps, ctx.relu, ctx.channels_last = num_groups, eps, relu, channels_last
        return y

    @staticmethod
    @once_differentiable  # the kernels' backward is not differentiable: a second derivative is refused by name
    def backward(ctx, dy):
        x, weight, bias, stats = ctx.saved_tensors
        # the forward's layout, whatever a caller's saved-tensor hooks gave x back in: the slot statistics were
        # cut by that layout's launch shape
        layout = _memory_format(ctx.channels_last)
        x = x.contiguous(memory_format=layout)
        n, c = x.shape[:2]
        dx = torch.empty_like(x)
        if x.numel():
            dy = dy.contiguous(memory_format=layout)
            pixels, cpg = math.prod(x.shape[2:]), c // ctx.num_groups
            grid, chunk, chunks, blocks, _ = _launch_shape(n, c, pixels, cpg, ctx.channels_last)
            sums = x.new_empty((2, n, c, chunks), dtype=torch.float32)  # per-slot sums of dz, of dz * x_hat
            args = (weight, bias, *stats, *sums, c, pixels, cpg, chunk, chunks, ctx.eps, ctx.relu)
            with _on_device_of(x):
                _backward_sums_kernel[grid](x, dy, *args, **blocks)
                _backward_dx_kernel[grid](x, dy, dx, *args, **blocks)
        else:
            sums = x.new_zeros((2, n, c, 1), dtype=torch.float32)
        # a reduction each: each gradient gets its own storage, and only a needed one is computed
        grad_weight = sums[1].sum((0, 2)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sums[0].sum((0, 2)).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, grad_weight, grad_bias, None, None, None, None


def _per_channel(name: str, parameter: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``parameter`` checked to hold one value per channel of ``x`` on its device; contiguous, as the kernels
    index it."""
    if parameter.shape != (x.shape[1],) or parameter.device != x.device:
        raise ValueError(f"group_norm: {name} must have shape ({x.shape[1]},) on {x.device} for an input of "
                         f"shape {tuple(x.shape)}, got shape {tuple(parameter.shape)} on {parameter.device}")
    return parameter.contiguous()


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    relu: bool = False,
    recompute: bool = False,
) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, then ReLU if ``relu``, by the Triton kernels.

    ``x`` is (N, C, *) in fp32, fp16 or bf16 and the output has its dtype (and, for a channels-last 4-D ``x``,
    its layout); statistics are fp32. ``x`` must be on a CUDA device, or on the CPU when this module was
    imported with ``TRITON_INTERPRET=1``. With ``recompute``, an op inside a
    :func:`gn_detection.recompute.recomputed_outputs` context that saves the output for its backward saves a
    recipe instead, and the output is rebuilt from ``x`` then.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"The Triton GroupNorm kernels take {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups do not divide the channels of an input of shape "
                         f"{tuple(x.shape)}")
    if not (x.is_cuda or INTERPRETED):
        raise RuntimeError(
            f"The Triton GroupNorm kernels need a CUDA tensor (got one on {x.device}); set MODEL.GN.IMPL to "
            "'torch' or 'auto', or run with TRITON_INTERPRET=1 to execute them on the CPU (slow; for tests)"
        )
    channels = x.shape[1]
    weight = x.new_ones(channels, dtype=torch.float32) if weight is None else _per_channel("weight", weight, x)
    bias = x.new_zeros(channels, dtype=torch.float32) if bias is None else _per_channel("bias", bias, x)
    registry = active_registry() if recompute else None
    return _GroupNormFunction.apply(x, weight, bias, num_groups, float(eps), bool(relu), registry)
