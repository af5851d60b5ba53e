"""Compile the GN Triton kernels ahead of time for a CUDA GPU, with no GPU present: Triton's whole pipeline
(TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin) runs on the CPU. Catches what the interpreter cannot:
typing and lowering errors of the real compiler. Where a layer's pixel count is a multiple of 16 (as
Triton's launcher then tells the compiler), also checks that every kernel reads the activations in 16-byte
vectors, the access pattern that streaming at full bandwidth needs. Run in a process without
TRITON_INTERPRET.

    python tests/compile_triton_kernels.py 90      # compute capability (90 = H100)
"""
import re
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gn_detection import triton_group_norm as gn

# (images, channels, pixels, channels per group) of real layers: FPN P2 at 800x1216 for 2 and 8 images, the
# stem's 64 channels, a box-head conv on 512 7x7 RoIs, G = 1 and G = C on small maps, G = 1 (the paper's
# LayerNorm-like ablation) on a 7x7 res5 map and in the box head
LAYERS = [(2, 256, 200 * 304, 8), (8, 256, 200 * 304, 8), (1, 64, 400 * 608, 2), (512, 256, 7 * 7, 8),
          (2, 48, 25 * 38, 48), (1, 16, 9, 1), (1, 2048, 7 * 7, 2048), (512, 256, 7 * 7, 256)]
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def compile_kernel(target, kernel, pointers, ints, constexprs, aligned):
    """Compile ``kernel`` as Triton's launcher would for these int arguments: an int equal to 1 becomes a
    constant; ``aligned``: pointers, HW and CHUNK divisible by 16."""
    ints = {name: value for name, value in ints.items() if name in kernel.arg_names}
    constexprs = {**constexprs, **{name: 1 for name, value in ints.items() if value == 1}}
    signature = {name: "*fp32" for name in kernel.arg_names if name.isupper() and name not in ints
                 and name not in constexprs}
    signature.update(pointers)
    signature.update({name: "i32" for name in ints})
    signature.update({name: "fp32" for name in kernel.arg_names if name == "eps"})
    signature.update({name: "constexpr" for name in constexprs})
    signature = {name: signature[name] for name in kernel.arg_names}  # in argument order
    divisible = [name for name, kind in signature.items() if kind.startswith("*") or name in ("HW", "CHUNK")]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible} if aligned else None
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target)
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin produced"
    if aligned and not re.search(r"ld\.global(\.\w+)*\.v4", compiled.asm["ptx"]):
        raise AssertionError(f"{kernel.__name__} {constexprs}: no 16-byte vector loads with aligned rows")
    return compiled


def main(capability: int) -> None:
    target = GPUTarget("cuda", capability, 32)
    count, start = 0, time.time()
    for images, channels, pixels, cpg in LAYERS:
        grid, chunk, chunks, blocks = gn._launch_shape(images, channels, pixels, cpg)
        ints = {"C": channels, "HW": pixels, "CPG": cpg, "CHUNK": chunk, "S": chunks}
        aligned = pixels % 16 == 0
        for dtype, pointer in DTYPES.items():
            activations = {"X": pointer, "Y": pointer, "DY": pointer, "DX": pointer}
            stats_blocks = {"BLOCK_C": blocks["BLOCK_C"], "BLOCK_HW": blocks["BLOCK_HW"]}
            compiled = [compile_kernel(target, gn._slot_stats_kernel, {"X": pointer}, ints, stats_blocks,
                                       aligned)]
            for kernel in (gn._forward_kernel, gn._backward_sums_kernel, gn._backward_dx_kernel):
                pointers = {k: v for k, v in activations.items() if k in kernel.arg_names}
                for relu in (False, True):
                    compiled.append(compile_kernel(target, kernel, pointers, ints, {"RELU": relu, **blocks},
                                                   aligned))
            count += len(compiled)
            print(f"sm_{capability} N={images} C={channels} HW={pixels} cpg={cpg} {dtype} grid {grid} {blocks}: "
                  f"{len(compiled)} kernels"
                  f"{', 16-byte vector loads' if aligned else ''}", flush=True)
    print(f"compiled {count} kernels for sm_{capability} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
