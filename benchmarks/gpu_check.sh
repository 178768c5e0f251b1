#!/usr/bin/env bash
# On a machine with a GPU: build the kernels for that GPU against the torch installed there, run the
# CUDA tests and the GPU benchmarks, and print a short table last. Results go to $OUT (or /tmp).
#   bash benchmarks/gpu_check.sh
# Set TORCH_CUDA_ARCH_LIST for another GPU than an H200 (sm_90).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/betanas_gpu_check}"
mkdir -p "$out"
start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - start ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
stamp "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    python3 -m pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"; echo "BUILD FAILED"; exit 1
fi
(cd "$out" && python3 -c "import betanas_fast, json; print(json.dumps(betanas_fast.build_info()))") | tee "$out/build_info.json"

stamp "CUDA tests"
# The op-level tests run every case on CPU and CUDA; only the CUDA ones are selected here.
python3 -m pytest tests/test_dw_bn_act.py tests/test_nn.py tests/test_build.py tests/test_alpha_grad.py \
  tests/test_grouped_ops.py tests/test_per_sample.py -q -k "cuda or build" \
  -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}

stamp "1-GPU torchrun smoke run (NCCL process group, digest checks, rank-0 outputs)"
timeout 600 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m betanas_fast.search --device cuda \
  --epochs 2 --warmup-epochs 1 --stage-depths 1 2 1 1 --digest-every 5 --no-progress --no-plots \
  --out "$out/torchrun_smoke" > "$out/torchrun_smoke.log" 2>&1
smoke_rc=$?
tail -n 3 "$out/torchrun_smoke.log"

stamp "GPU benchmarks"
BETANAS_BENCH_ROUNDS="${BETANAS_BENCH_ROUNDS:-10}" python3 -m pytest benchmarks/ --benchmark-only -q -k cuda \
  -p no:cacheprovider --benchmark-disable-gc --results-md "$out/gpu.md" --results-json "$out/gpu.json" \
  > "$out/bench.log" 2>&1
bench_rc=$?
tail -n 5 "$out/bench.log"

stamp "summary (full table: $out/gpu.md)"
echo "tests exit code: $tests_rc; torchrun smoke exit code: $smoke_rc; benchmarks exit code: $bench_rc"
python3 - "$out/gpu.md" <<'PY'
import re, sys
rows = [l for l in open(sys.argv[1]) if l.startswith("|") and "---" not in l] if len(sys.argv) > 1 else []
print("\n".join(r.rstrip() for r in rows[:1]))
for r in rows[1:]:
    if "fwd+bwd" in r or "eval" in r or "cuda" in r:
        print(r.rstrip())
for l in open(sys.argv[1]):
    if l.startswith("- eval k=3"):
        print(l.rstrip())
# The grouped ops' ragged kernels (benchmarks/test_bench_grouped_cuda.py): ratio of each other implementation
# (the reference oracle excepted) to the kernel and the required minimum (ragged >= 2x the per-group loop of the
# dense fused kernel, block_gate_grads >= 3x the eager loop of torch modules).
required = [l.rstrip() for l in open(sys.argv[1]) if l.startswith("- required ratio:")]
if required:
    print("grouped ops, ratio other implementation / betanas_fast kernel:")
    print("\n".join(required))
    print(f"{sum('BELOW' in l for l in required)} of {sum('required >=' in l for l in required)} required ratios missed")
# The paper's search schedule projected from timed ImageNet-shaped steps (test_bench_gpu_projection.py).
print("\n".join(l.rstrip() for l in open(sys.argv[1]) if l.startswith("- projected GPU-hours")))
# Latency tables of the mobile space on this GPU at batch 1 and 256, and validate (test_bench_latency.py).
print("\n".join(l.rstrip() for l in open(sys.argv[1]) if l.startswith("- latency")))
PY
exit $(( tests_rc != 0 || bench_rc != 0 || smoke_rc != 0 ))
