#!/usr/bin/env bash
# The GPU fast path in one go, on one GPU (about 9 minutes on an H200): build the csrc/ kernels, run
# the GPU tests, time each kernel against megatron-core's path, then the training step (130M and 3B,
# dense and LPA, fused vs CUDA graph, median of 3 runs), a profile by kernel family and GEMM shape,
# and the step split into forward-backward and optimizer. Logs and JSON land in OUT_DIR.
#
#   bash benchmarks/gpu_fastpath_check.sh OUT_DIR [quick]     # quick: 130M only
#   MODES_130M=baseline,fused,fast bash benchmarks/gpu_fastpath_check.sh OUT_DIR   # with megatron's path
set -uo pipefail
out=${1:?usage: gpu_fastpath_check.sh OUT_DIR [quick]}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run() { echo "== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log" | tail -"${TAIL:-12}"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv >> "$log"
start=$(date +%s)
if ! MAX_JOBS=$(nproc) python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
    tail -40 "$out/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$log"
TAIL=6 run python3 -m pytest -q -m gpu tests/ops tests/training tests/layers
TAIL=10 run python3 benchmarks/bench_kernels.py --output "$out/bench_kernels.json"
TAIL=7 run python3 benchmarks/bench_train.py --shape 130m --variants dense,lpa \
    --modes "${MODES_130M:-fused,fast}" --steps 30 --warmup 8 --repeats 3 \
    --output "$out/bench_130m.json"
TAIL=60 run python3 benchmarks/bench_train.py --shape 130m --variants dense,lpa --modes fused \
    --steps 3 --warmup 5 --profile 3 --output "$out/profile_130m.json"
TAIL=2 run python3 benchmarks/step_phases.py --shape 130m
if [ "${2:-}" != quick ]; then
    TAIL=7 run python3 benchmarks/bench_train.py --shape 3b --variants dense,lpa \
        --modes "${MODES_3B:-fused,fast}" --steps 8 --warmup 4 --repeats 3 \
        --output "$out/bench_3b.json"
    TAIL=60 run python3 benchmarks/bench_train.py --shape 3b --variants dense,lpa --modes fused \
        --steps 1 --warmup 3 --profile 1 --output "$out/profile_3b.json"
    TAIL=2 run python3 benchmarks/step_phases.py --shape 3b
fi
echo "total: $(( $(date +%s) - start )) s" | tee -a "$log"
