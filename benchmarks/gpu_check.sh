#!/usr/bin/env bash
# The GPU day in one call: everything this package needs a GPU to know, in order of value, within 540 s.
#
#   bash benchmarks/gpu_check.sh             # results in $OUT (default /tmp/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run   # the steps and their budgets; runs nothing
#
# Steps (benchmarks/gpu_steps.sh runs them: one global deadline, each step under `timeout` with its own budget, one
# line per step in $OUT/summary.md as it finishes):
#  1. install    benchmarks/gpu_library.py install: the prebuilt library for this torch into betanas_fast/
#  2. preflight  GPU, torch, build_info() and one kernel launch (preflight.json); if it fails, nothing else runs
#  3. smoke      benchmarks/gpu_smoke.py: every op at production shapes against the CPU kernels (smoke.log)
#  4-6.          compute-sanitizer memcheck, racecheck, synccheck over gpu_smoke.py --tiny, only this package's
#                kernels instrumented (appended to smoke.log)
#  7. tests      pytest tests/ -m cuda: every CUDA op test (tests.log)
#  8-10.        the GPU benchmarks in three pytest calls, 3 rounds each (bench.md, bench.json)
#  11. torchrun  a 1-GPU torchrun search of the demo (torchrun.log; its run directory under /tmp)
# $OUT holds 7 files: summary.md preflight.json smoke.log tests.log bench.md bench.json torchrun.log.
# Exit code 1 if any step failed or timed out. benchmarks/gpu_check_long.sh is the second call (latency tables, the
# rest of the benchmarks).
#
# How the budgets were sized (seconds; the total, 520, leaves 20 s of the 540 for the steps' bookkeeping):
# - install 20: the prebuilt library is a copy and one import to probe it (240 when build/gpu/manifest.json is
#   missing and gpu_library.py has to compile: then the last steps fall to the deadline and are skipped).
# - preflight 15: torch is warm after install; CUDA init and one launch.
# - smoke 55: ~10 s of start-up and CUDA init; its CPU oracle (the CPU kernels in float64/float32 on the same
#   inputs) took ~50 s for all the production-shape cases on this project's 2-core machines, ~10 s on 16 cores;
#   the GPU side (inputs, the kernels, PyTorch's composites, the 2**31-element forward) a few seconds.
# - memcheck 50, racecheck 50, synccheck 35: the tool's start and torch's import and CUDA init under it (PyTorch
#   programs take ~20-30 s there) plus ~45 checks at tiny shapes (--repeats 2), only betanas kernels instrumented;
#   racecheck, which tracks every shared-memory access, is the slowest, synccheck the lightest.
# - tests 120: collection (17 s here) and 595 small CUDA cases, each with a float64 CPU oracle (their 264 CPU twins
#   took 105 s on 2 cores, half of it bf16 arithmetic that this CPU emulates; the GPU machine has 16 cores).
# - benchmarks 35 + 35 + 65: a pytest start (~8 s) each plus 3 rounds of a few cases: one shape per stage
#   resolution, not the full grids (gpu_check_long.sh runs those); the ImageNet-shaped steps (projection, Phase 2
#   at batch 256) are the slow ones.
# - torchrun 40: the same search took 51 s on a 2-core CPU; on the GPU it is mostly torchrun, NCCL and CUDA start.
# A step gets min(budget, time left) and starts only if its minimum is left.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
GPU_SELF=$PWD/benchmarks/gpu_check.sh
GPU_NAME=gpu_check
GPU_OWN_FILES=(preflight.json smoke.log tests.log bench.md bench.json torchrun.log)
# shellcheck source=benchmarks/gpu_steps.sh
source benchmarks/gpu_steps.sh
export BETANAS_BENCH_ROUNDS=${BETANAS_BENCH_ROUNDS:-3}

# --- steps of this script ----------------------------------------------------------------------------------------

smoke() {
  "$PY" benchmarks/gpu_smoke.py --device cuda > "$OUT/smoke.log" 2>&1
}

# The checks' counts (the RESULT line, or the lines so far if cut off) and the first failures.
smoke_finish() {  # SECTION_MARKER (the part of smoke.log after its last occurrence; "" for all of it)
  "$PY" - "$OUT/smoke.log" "${1:-}" "$GPU_RC" << 'PY'
import os, re, sys
text = open(sys.argv[1]).read() if os.path.exists(sys.argv[1]) else ""
marker, rc = sys.argv[2], int(sys.argv[3])
section = text.rsplit(marker, 1)[-1] if marker else text.split("\n===== compute-sanitizer", 1)[0]
parts = []
summaries = re.findall(r"ERROR SUMMARY: (\d+) errors?", section)
races = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", section)
if marker:
    tool = marker.split()[-1]
    if races:
        parts.append("{}: {} hazards ({} errors, {} warnings)".format(tool, *races[-1]))
    elif summaries:
        parts.append(f"{tool}: {summaries[-1]} errors")
    else:
        parts.append(f"{tool}: no summary")
result = re.findall(r"^RESULT (.*)", section, re.M)
lines = re.findall(r"^(PASS|FAIL|SKIP) ", section, re.M)
if result:
    parts.append(result[-1])
elif lines:
    parts.append(f"cut off after {lines.count('PASS')} PASS, {lines.count('FAIL')} FAIL")
parts += [f"FAIL {name[:140]}" for name in re.findall(r"^FAIL (.*)", section, re.M)[:2]]
if rc and not result and not lines:
    parts.append(" / ".join(section.strip().splitlines()[-2:])[-300:] or f"no output (exit code {rc})")
print("; ".join(parts))
PY
}

# gpu_smoke.py --tiny under a compute-sanitizer tool, with only this package's kernels checked (their mangled names
# all start with _ZN7betanas: namespace betanas) and each allocation its own cudaMalloc (no caching allocator), so
# that an access past a tensor's end is one. --repeats 2: the determinism checks need only two runs here.
sanitize() {  # TOOL
  echo "===== compute-sanitizer --tool $1: gpu_smoke.py --tiny =====" >> "$OUT/smoke.log"
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$1" --kernel-name kns=betanas --print-limit 20 \
    --error-exitcode 99 "$PY" benchmarks/gpu_smoke.py --device cuda --tiny --repeats 2 >> "$OUT/smoke.log" 2>&1
}

# -p no:cacheprovider: the copied tree stays clean. Each test gets 60 s (pytest-timeout): tests/conftest.py gives
# every test without a timeout marker one of 900 s, which pytest-timeout prefers to --timeout, so a plugin written
# here marks them first.
tests() {
  cat > "$GPU_WORK/gpu_check_timeout.py" << 'PY'
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))
PY
  PYTHONPATH=$GPU_WORK:$PYTHONPATH "$PY" -m pytest tests/ -m cuda -q -rfE -p no:cacheprovider -p gpu_check_timeout \
    --durations 5 > "$OUT/tests.log" 2>&1
}

tests_finish() {
  "$PY" - "$OUT/tests.log" << 'PY'
import os, re, sys
text = open(sys.argv[1]).read() if os.path.exists(sys.argv[1]) else ""
counts = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+)(?: in [\d.]+s.*)?\s*=*$", text, re.M)
progress = re.findall(r"\[\s*(\d+)%\]", text)
parts = [counts[-1].strip() if counts else f"cut off at {progress[-1] if progress else 0}%"]
failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
if failed:
    parts.append("first: " + ", ".join(f.split("::", 1)[-1] for f in failed[:3]))
print("; ".join(parts))
PY
}

GPU_TORCHRUN_ARGS="--device cuda --epochs 2 --warmup-epochs 1 --stage-depths 1 2 1 1 --digest-every 5 --no-progress --no-plots --no-tensorboard"

torchrun_search() {  # the run directory is outside $OUT: only its log comes back
  # shellcheck disable=SC2086
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m betanas_fast.search $GPU_TORCHRUN_ARGS \
    --out "$GPU_WORK/torchrun_search" > "$OUT/torchrun.log" 2>&1
}

torchrun_finish() {
  "$PY" - "$OUT/torchrun.log" "$GPU_RC" << 'PY'
import os, re, sys
text, rc = open(sys.argv[1]).read() if os.path.exists(sys.argv[1]) else "", sys.argv[2]
chosen = re.findall(r"^\s*\d+\s+\d+->\d+\s+\d\s+(\S+)\s", text, re.M)
final = re.findall(r"^strategy .*", text, re.M)
parts = [f"exit {rc}"]
if chosen:
    parts.append("searched " + " ".join(chosen))
parts.append(final[-1] if final else " / ".join(l for l in text.strip().splitlines()[-2:])[-300:])
print("; ".join(parts))
PY
}

# --- the steps, in order of value --------------------------------------------------------------------------------
K_DW="(96-56 or 144-28 or 240-14) and (train-fwd+bwd or eval-fwd] or bandwidth)"
K_GROUPED="demo-32x32 or demo-8x8-16to16 or imagenet-56x56 or imagenet-14x14"
K_STEPS="projected or (test_phase2_step and (cuda or fp32)) or test_alpha_grad or test_phase1_step or test_search_step"
F_STEPS="benchmarks/test_bench_gpu_projection.py benchmarks/test_bench_search_step.py benchmarks/test_bench_alpha_grad.py benchmarks/test_bench_phase1.py"

gpu_first_steps "$@"
gpu_step smoke 55 30 "" smoke smoke_finish \
  "python benchmarks/gpu_smoke.py: every op at production shapes vs the CPU kernels -> smoke.log"
for tool in memcheck racecheck synccheck; do
  budget=$([[ $tool == synccheck ]] && echo 35 || echo 50)
  gpu_step "$tool" "$budget" 30 "" "sanitize $tool" "smoke_finish '===== compute-sanitizer --tool $tool'" \
    "compute-sanitizer --tool $tool --kernel-name kns=betanas: gpu_smoke.py --tiny -> smoke.log"
done
gpu_step tests 120 45 "" tests tests_finish \
  "pytest tests/ -m cuda (every CUDA op test, 60 s each at most) -> tests.log"
gpu_step bench-dw 35 20 "" "gpu_bench bench-dw '$K_DW' benchmarks/test_bench_dw_bn_act.py" \
  "gpu_bench_finish bench-dw" \
  "fused depthwise stage vs cuDNN composite at 3 ImageNet shapes x k 3/5/7; eval k3 vs copy bandwidth -> bench.md"
gpu_step bench-grouped 35 20 "" "gpu_bench bench-grouped '$K_GROUPED' benchmarks/test_bench_grouped_cuda.py" \
  "gpu_bench_finish bench-grouped" \
  "ragged grouped op vs per-group loops; block_gate_grads vs torch modules (demo and ImageNet) -> bench.md"
gpu_step bench-steps 65 25 "" "gpu_bench bench-steps '$K_STEPS' $F_STEPS" "gpu_bench_finish bench-steps" \
  "projected GPU-hours; Phase-2 step (all-candidate op vs recompute loop), alpha_grad, Phase-1 and search steps -> bench.md"
gpu_step torchrun 40 30 "" torchrun_search torchrun_finish \
  "torchrun --nproc-per-node 1 -m betanas_fast.search $GPU_TORCHRUN_ARGS -> torchrun.log"

gpu_main "$@"
