#!/usr/bin/env bash
# The GPU measurements of docs/speed.md in one go, most wanted first, each step time-boxed so that one which
# hangs leaves the others their time (about 19 minutes if every step ran to its limit, 5 on an H200 as
# measured before steps 3 and 6 were added); results land in OUTDIR as they are measured (the benchmark
# writes JSON after each cell).
#   1. the kernels', recomputation's, CUDA graphs' and the channels-last backbone's tests on CUDA (the sm_90
#      compile check is left to CI)
#   2. the levers one at a time at 8 images under AMP, beside Detectron2's GN (the fused ReLU and GN in half
#      precision were measured before: h200_levers_amp8.json), and both GN models with bit masks, as every
#      run before polygons became the benchmark's default
#   3. the backbone as CUDA graphs at 2 images, fp32 and AMP fp16, beside ours and Detectron2's GN
#   4. the model table: ours, Detectron2's GN and frozen BN; 2 and 8 images; fp32 and AMP fp16
#   5. the GroupNorm+ReLU op on the 8x256x200x304 P2 activation, fp16 and fp32, against eager and torch.compile
#   6. profiles (wall, CPU and GPU time per step, top ops; the peak memory and what is alive at it): training
#      at 8 images under AMP for ours, ours with CUDA graphs and frozen BN (is the step bound by the CPU there
#      too? where is the peak?), and ours' inference in fp32 and AMP fp16 (why AMP inference was slower in
#      one run)
#
#   tools/benchmark_gpu.sh OUTDIR
set -u
out=$(realpath -m "${1:?usage: tools/benchmark_gpu.sh OUTDIR}")  # before the cd below
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

step() {  # step SECONDS COMMAND...: run it, at most SECONDS, and say how it ended
    local seconds=$1; shift
    echo "== $* (at most ${seconds} s)"
    local start=$SECONDS
    timeout "$seconds" "$@"
    echo "== exit $? after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# --timeout (pytest-timeout, as pytest-xdist in the device image): a test that hangs fails with its traceback
# instead of the step being cut silently
step 180 python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 120 tests/test_triton_group_norm.py \
    tests/test_recompute.py tests/test_cuda_graph.py tests/test_models.py -k "not cubins and (not test_models or \
    channels_last_backbone)" tests/test_benchmark.py::test_peak_memory_on_cuda_sees_allocated_and_reserved_memory
step 180 python3 tools/benchmark.py --images-per-gpu 8 --precision amp_fp16 --skip inference \
    --variants ours "ours:MODEL.GN.RECOMPUTE_OUTPUT=False" "ours:MODEL.CUDA_GRAPHS.BACKBONE=True" \
    "ours:MODEL.BACKBONE.CHANNELS_LAST=True" ours_stock_gn detectron2_gn \
    "ours:INPUT.MASK_FORMAT=bitmask" "detectron2_gn:INPUT.MASK_FORMAT=bitmask" \
    --output "$out/levers.json"
step 150 python3 tools/benchmark.py --images-per-gpu 2 --precision fp32 amp_fp16 --skip inference \
    --variants ours "ours:MODEL.CUDA_GRAPHS.BACKBONE=True" detectron2_gn --output "$out/graphs_2img.json"
step 240 python3 tools/benchmark.py --images-per-gpu 2 8 --precision fp32 amp_fp16 \
    --variants ours detectron2_gn frozen_bn --output "$out/models.json"
step 90 python3 tools/benchmark.py --task op --op-dtype fp16 --compile --output "$out/op_fp16.json"
step 70 python3 tools/benchmark.py --task op --op-dtype fp32 --compile --output "$out/op_fp32.json"
step 150 python3 tools/benchmark.py --images-per-gpu 8 --precision amp_fp16 --skip inference --warmup 5 --iters 10 \
    --variants ours "ours:MODEL.CUDA_GRAPHS.BACKBONE=True" frozen_bn --profile "$out/profiles" \
    --output "$out/profiles_train.json"
step 60 python3 tools/benchmark.py --images-per-gpu 1 --precision fp32 amp_fp16 --skip train --warmup 5 --iters 10 \
    --variants ours --profile "$out/profiles" --output "$out/profiles_inference.json"
