#!/usr/bin/env bash
# The GPU measurements of docs/speed.md in one go, most wanted first, each step time-boxed so that one which
# hangs leaves the others their time; the limits add up to 540 s, so the set fits one 600 s device call
# (a task is lent 15 minutes of device time, the machine's start included). Results land in OUTDIR as they
# are measured (the benchmark writes NAME.incomplete.json after each cell, NAME.json when a step ends; a step
# its time box stops leaves the first).
#   1. the model table: ours, Detectron2's GN, ours batched (BatchedRPN: NMS, anchor labels and sampling for
#      all images at once; BatchedROIHeads: proposal labels and sampling likewise), frozen BN; 8 and 2 images;
#      AMP fp16 and fp32; training and inference
#   2. 8 images under AMP in two passes, the order rotated each pass: ours, ours with batched NMS alone
#      (BatchedNMSRPN), with BatchedRPN, with BatchedRPN and BatchedROIHeads, the last with bit masks
#      (gathered, not copied), Detectron2's GN, frozen BN with both (each ratio's median and range; on an H100
#      single cells of the same model moved by up to 20 % between processes; the CUDA-graph, recompute,
#      channels-last and copied-bit-mask rows, measured there, are left out)
#   3. the GN kernels', recomputation's, CUDA graphs', the channels-last backbone's and the batched RPNs',
#      ROI heads', level-sorted pooler's and gathered bit masks' tests on CUDA (the sm_90 compile check is
#      left to CI)
#   4. the host's work per 8-image AMP step (ops and host waits by model part): ours, batched NMS, batched all
#   5. the GroupNorm+ReLU op on the 8x256x200x304 P2 activation in fp16, against eager and torch.compile
# Profiles (wall, CPU and GPU time per step, top ops, the peak memory and what is alive at it) are left to a
# separate call: tools/benchmark.py ... --profile DIR.
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
batched_nms=MODEL.PROPOSAL_GENERATOR.NAME=BatchedNMSRPN
batched_rpn=MODEL.PROPOSAL_GENERATOR.NAME=BatchedRPN
batched_all=$batched_rpn,MODEL.ROI_HEADS.NAME=BatchedROIHeads
step 220 python3 tools/benchmark.py --images-per-gpu 8 2 --precision amp_fp16 fp32 \
    --variants ours detectron2_gn "ours:$batched_all" frozen_bn --output "$out/models.json"
# 14 cells: at the default 10 + 30 iterations 5 cells took 71 s on an H100, so 8 + 16 keeps them in 160 s
step 160 python3 tools/benchmark.py --images-per-gpu 8 --precision amp_fp16 --skip inference --repeats 2 \
    --warmup 8 --iters 16 \
    --variants ours "ours:$batched_nms" "ours:$batched_rpn" "ours:$batched_all" \
    "ours:$batched_all,INPUT.MASK_FORMAT=bitmask" detectron2_gn "frozen_bn:$batched_all" \
    --output "$out/levers.json"
# --timeout (pytest-timeout, as pytest-xdist in the device image): a test that hangs fails with its traceback
# instead of the step being cut silently
step 100 python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 90 tests/test_triton_group_norm.py \
    tests/test_recompute.py tests/test_cuda_graph.py tests/test_rpn.py tests/test_roi_heads.py tests/test_pooler.py \
    tests/test_bit_masks.py \
    tests/test_models.py \
    -k "not cubins and (not test_models or channels_last_backbone)" \
    tests/test_benchmark.py::test_peak_memory_on_cuda_sees_allocated_and_reserved_memory
step 25 python3 tools/benchmark.py --task host --images-per-gpu 8 --precision amp_fp16 \
    --variants ours "ours:$batched_nms" "ours:$batched_all" --output "$out/host.json"
step 35 python3 tools/benchmark.py --task op --op-dtype fp16 --compile --output "$out/op_fp16.json"
