"""Compile the GN and NMS Triton kernels ahead of time for a CUDA GPU, with no GPU present: Triton's whole pipeline
(TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin) runs on the CPU. Catches what the interpreter cannot:
typing and lowering errors of the real compiler. Where a layer's pixel count is a multiple of 16 (as
Triton's launcher then tells the compiler), also checks that every kernel reads the activations in 16-byte
vectors, the access pattern that streaming at full bandwidth needs; likewise in the channels-last (NHWC)
layout where the channel count is a multiple of 16 (there by comparing with a compile whose activations
are not aligned). Run in a process without TRITON_INTERPRET.

    python tests/compile_triton_kernels.py 90      # compute capability (90 = H100)
"""
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gn_detection import triton_group_norm as gn
from gn_detection import triton_nms

# (images, channels, pixels, channels per group) of real layers: FPN P2 at 800x1216 for 2 and 8 images, the
# stem's 64 channels, a box-head conv on 512 7x7 RoIs, G = 1 and G = C on small maps, G = 1 (the paper's
# LayerNorm-like ablation) on a 7x7 res5 map and in the box head
LAYERS = [(2, 256, 200 * 304, 8), (8, 256, 200 * 304, 8), (1, 64, 400 * 608, 2), (512, 256, 7 * 7, 8),
          (2, 48, 25 * 38, 48), (1, 16, 9, 1), (1, 2048, 7 * 7, 2048), (512, 256, 7 * 7, 256)]
# channels last: FPN P2 at 8 images (32 channels x 64 pixels a program, as the stem's), a res5 map at 2 (16 x 128)
CHANNELS_LAST_LAYERS = [(8, 256, 200 * 304, 8), (2, 2048, 25 * 38, 64)]
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


ACTIVATIONS = ("X", "Y", "DY", "DX")


def compile_kernel(target, kernel, pointers, ints, constexprs, misaligned=(), options=None):
    """Compile ``kernel`` as Triton's launcher would for these int arguments: an int equal to 1 becomes a
    constant, and the ints that are multiples of 16 and the pointers (torch's allocations are aligned), except
    the ``misaligned`` ones, are marked divisible by 16. ``options``: the launch's compile options (num_warps)."""
    ints = {name: value for name, value in ints.items() if name in kernel.arg_names}
    constexprs = {**constexprs, **{name: 1 for name, value in ints.items() if value == 1}}
    signature = {name: "*fp32" for name in kernel.arg_names if name.isupper() and name not in ints
                 and name not in constexprs}
    signature.update(pointers)
    signature.update({name: "i32" for name in ints})
    signature.update({name: "fp32" for name in kernel.arg_names if name in ("eps", "threshold")})
    signature.update({name: "constexpr" for name in constexprs})
    signature = {name: signature[name] for name in kernel.arg_names}  # in argument order
    divisible = [name for name, kind in signature.items()
                 if (kind.startswith("*") and name not in misaligned) or ints.get(name, 1) % 16 == 0]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options)
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin produced"
    return compiled


def vector_loads(compiled) -> int:
    """How many 16-byte vector loads a compiled kernel's PTX has."""
    return len(re.findall(r"ld\.global(?:\.\w+)*\.v4", compiled.asm["ptx"]))


def compile_layer(capability: int, layer: tuple, channels_last: bool, dtype: str) -> int:
    """Compile every kernel variant one layer needs in one dtype, checking the activations' vector loads where
    the contiguous axis' length is a multiple of 16; print what was checked; return the count."""
    target = GPUTarget("cuda", capability, 32)
    images, channels, pixels, cpg = layer
    grid, chunk, chunks, blocks, stats_blocks = gn._launch_shape(images, channels, pixels, cpg, channels_last)
    ints = {"C": channels, "HW": pixels, "CPG": cpg, "CHUNK": chunk, "S": chunks}
    aligned = (channels if channels_last else pixels) % 16 == 0
    pointer = DTYPES[dtype]
    activations = {name: pointer for name in ACTIVATIONS}
    variants = [(gn._slot_stats_kernel, {"X": pointer}, dict(stats_blocks))] + [
        (kernel, {k: v for k, v in activations.items() if k in kernel.arg_names}, {"RELU": relu, **blocks})
        for kernel in (gn._forward_kernel, gn._backward_sums_kernel, gn._backward_dx_kernel) for relu in (False, True)]
    for kernel, pointers, constexprs in variants:
        compiled = compile_kernel(target, kernel, pointers, ints, constexprs)
        if aligned:
            # NCHW, a program's few channels of weight, bias and statistics make no vector loads: any is the
            # activations'. Channels last, 16 or more channels a program may: count those without the activations'.
            others = (vector_loads(compile_kernel(target, kernel, pointers, ints, constexprs, ACTIVATIONS))
                      if channels_last else 0)
            if vector_loads(compiled) <= others:
                raise AssertionError(f"{kernel.__name__} {constexprs}: activations not read in 16-byte vectors")
    print(f"sm_{capability} N={images} C={channels} HW={pixels} cpg={cpg} {dtype} grid {grid} {dict(blocks)}: "
          f"{len(variants)} kernels{', activations read in 16-byte vectors' if aligned else ''}", flush=True)
    return len(variants)


def compile_nms(capability: int, per_level: int) -> int:
    """Compile both NMS kernels for segments of ``per_level`` boxes (the RPN's PRE_NMS_TOPK); return the count."""
    target = GPUTarget("cuda", capability, 32)
    words = triton.cdiv(per_level, triton_nms._WORD_BITS)
    ints = {"P": per_level, "WORDS": words}
    pointers = {"BOXES": "*fp32", "MASK": "*i32", "VALID": "*i8", "KEEP": "*i8"}
    # with the options segmented_nms launches them with
    variants = [(triton_nms._suppression_mask_kernel, dict(BLOCK_ROWS=triton_nms.MASK_BLOCK_ROWS,
                                                           BLOCK_WORDS=triton_nms.MASK_BLOCK_WORDS),
                 {"enable_fp_fusion": False}),
                (triton_nms._greedy_keep_kernel, dict(BLOCK_WORDS=triton.next_power_of_2(words)),
                 {"num_warps": triton_nms.WALK_WARPS})]
    for kernel, constexprs, options in variants:
        pointers_used = {k: v for k, v in pointers.items() if k in kernel.arg_names}
        compiled = compile_kernel(target, kernel, pointers_used, ints, constexprs, options=options)
        if options.get("enable_fp_fusion") is False and "fma.rn.f32" in compiled.asm["ptx"]:
            raise AssertionError(f"{kernel.__name__}: fused multiply-adds, so IoUs differ from the CPU's")
    print(f"sm_{capability} NMS, {per_level} boxes a segment: {len(variants)} kernels, IoUs without fused "
          "multiply-adds", flush=True)
    return len(variants)


def main(capability: int) -> None:
    """Compile every layer and dtype, in as many processes as there are CPUs (ptxas runs one kernel at a time)."""
    start = time.time()
    jobs = [(layer, channels_last, dtype) for layers, channels_last in ((LAYERS, False), (CHANNELS_LAST_LAYERS, True))
            for layer in layers for dtype in DTYPES]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        count = sum(pool.map(compile_layer, *zip(*[(capability, *job) for job in jobs])))
        # the RPN's PRE_NMS_TOPK in training and inference, and one not a multiple of 32
        count += sum(pool.map(compile_nms, [capability] * 3, [2000, 1000, 741]))
    print(f"compiled {count} kernels for sm_{capability} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
