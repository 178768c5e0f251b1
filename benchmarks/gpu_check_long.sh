#!/usr/bin/env bash
# The second GPU call, after benchmarks/gpu_check.sh: the GPU latency tables of the mobile space (batch 1 and 256, the
# paper's BetaNet-B setting) with their validation, then the full GPU benchmark grids at the default rounds; within
# 540 s, with the same step runner (benchmarks/gpu_steps.sh: one global deadline, each step under `timeout`, one line
# per step in $OUT/summary.md as it finishes).
#
#   bash benchmarks/gpu_check_long.sh             # results in $OUT (default /tmp/gpu_check_long)
#   bash benchmarks/gpu_check_long.sh --dry-run   # the steps and their budgets; runs nothing
#
# $OUT holds 7 files: summary.md preflight.json latency.log latency-mobile-cuda-b1.json latency-mobile-cuda-b256.json
# bench.md bench.json. The tables are what `--cost latency --latency-table FILE` searches with on this GPU.
#
# How the budgets were sized (seconds): install 20 and preflight 15 as in gpu_check.sh. A table times 74 entries
# (71 choice-block shapes x candidates + 3 fixed parts) in interleaved 5 ms rounds until each median is known to
# +-1 % (at most 200 passes), then 16 whole networks for the per-network overhead; validate times 30 random networks
# end to end. A GPU's timings are steady, so a few dozen passes are expected: batch 1 is launch-bound (~1 min),
# batch 256 (fp32, 224x224: tens of ms a network) about twice that; 110 and 150 s. The rest, 240 s, goes to the
# benchmark grids in two calls; each keeps the rows it finished when its time is up.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
GPU_SELF=$PWD/benchmarks/gpu_check_long.sh
GPU_NAME=gpu_check_long
GPU_OWN_FILES=(preflight.json latency.log latency-mobile-cuda-b1.json latency-mobile-cuda-b256.json bench.md bench.json)
# shellcheck source=benchmarks/gpu_steps.sh
source benchmarks/gpu_steps.sh

latency() {  # BATCH: build the table into $OUT, validate it (validate.json stays in the work folder)
  local table=$OUT/latency-mobile-cuda-b$1.json
  echo "===== latency build, batch $1 =====" >> "$OUT/latency.log"
  "$PY" -m betanas_fast.latency build --space mobile --device cuda --batch "$1" --no-progress --out "$table" \
    >> "$OUT/latency.log" 2>&1 || return
  echo "===== latency validate, batch $1 =====" >> "$OUT/latency.log"
  "$PY" -m betanas_fast.latency validate --table "$table" --archs 30 --no-progress --out "$GPU_WORK/validate-b$1" \
    >> "$OUT/latency.log" 2>&1
}

latency_finish() {  # BATCH
  "$PY" - "$OUT/latency.log" "$GPU_WORK/validate-b$1/validate.json" "$1" << 'PY'
import json, os, re, sys
log, validate, batch = sys.argv[1:4]
marker = f"===== latency build, batch {batch} ====="
text = open(log).read() if os.path.exists(log) else ""
text = text.rsplit(marker, 1)[-1].split("===== latency build", 1)[0] if marker in text else ""
built = re.findall(r"^wrote \S+: (.*)", text, re.M)
parts = [built[0] if built else "no table"]
if os.path.exists(validate):
    v = json.load(open(validate))
    lo, hi = v["measured_range_ms"]
    parts.append(f"validate: {len(v['rows'])} nets {lo:.3f}-{hi:.3f} ms, table MAPE {v['table_mape']:.2f} % "
                 f"(tau {v['table_tau']:.3f}), MFLOPs tau {v['mflops_tau']:.3f}")
elif built:
    parts.append("no validate.json")
print("; ".join(parts))
PY
}

K_REST="not latency and not test_batch_stream and not test_cuda_imagenet_shapes and not bandwidth"
F_REST="benchmarks/test_bench_grouped_cuda.py benchmarks/test_bench_phase2_memory.py benchmarks/test_bench_iteration.py benchmarks/test_bench_search_step.py benchmarks/test_bench_alpha_grad.py benchmarks/test_bench_phase1.py benchmarks/test_bench_gpu_projection.py"

gpu_first_steps "$@"
gpu_step latency-b1 110 60 "" "latency 1" "latency_finish 1" \
  "python -m betanas_fast.latency build --space mobile --device cuda --batch 1; validate --archs 30 -> latency-mobile-cuda-b1.json"
gpu_step latency-b256 150 90 "" "latency 256" "latency_finish 256" \
  "python -m betanas_fast.latency build --space mobile --device cuda --batch 256; validate --archs 30 -> latency-mobile-cuda-b256.json"
gpu_step bench-dw-grid 120 40 "" "gpu_bench bench-dw-grid 'imagenet_shapes or bandwidth' benchmarks/test_bench_dw_bn_act.py" \
  "gpu_bench_finish bench-dw-grid" \
  "every ImageNet shape of the fused depthwise stage vs cuDNN and the eval k3 bandwidth, default rounds -> bench.md"
gpu_step bench-rest 120 40 "" "gpu_bench bench-rest '$K_REST' $F_REST" "gpu_bench_finish bench-rest" \
  "every other GPU benchmark but the latency and data ones (grouped ops, Phase-2 memory, steps), default rounds -> bench.md"

gpu_main "$@"
