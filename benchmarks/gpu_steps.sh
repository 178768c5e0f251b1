# shellcheck shell=bash
# The step runner of benchmarks/gpu_check.sh and benchmarks/gpu_check_long.sh (sourced by both; run from the
# repository root), and the steps both take: install the kernel library, preflight, a set of GPU benchmarks.
#
# A script registers its steps in order of value, `gpu_step NAME BUDGET_S MIN_S FLAGS RUN FINISH WHAT`, then calls
# `gpu_main "$@"`:
# - RUN (a shell command line) runs as `bash SCRIPT --run-step NAME` under `timeout -s INT -k 5 T`, where
#   T = min(BUDGET_S, seconds left before the global deadline) - 5: SIGINT first, so that pytest stops and writes
#   what it has, KILL 5 s later. Exit 0: pass; 124 or 137: timeout; anything else: FAIL.
# - FINISH (a shell command line, told the exit code in $GPU_RC) runs after it in this shell, also after a timeout,
#   and prints the step's key result as its last line; it may also merge the step's files into $OUT.
# - A step starts only if at least MIN_S seconds are left before the deadline (GPU_DEADLINE_S, 540 s from the
#   start); otherwise, and after a failed "critical" step, it is skipped ("always" steps run even then).
# - After each step one line goes into $OUT/summary.md (step, status, seconds, key result); the details are in a few
#   files of $OUT that each step writes as it goes, so that whatever finished is kept if the run is cut off.
# `SCRIPT --dry-run` prints the steps with their budgets and, last, their total; it runs nothing.

GPU_DEADLINE_S=${GPU_DEADLINE_S:-540}
GPU_GRACE_S=5
GPU_STEPS=()
declare -A GPU_BUDGET=() GPU_MIN=() GPU_FLAGS=() GPU_RUN=() GPU_FINISH=() GPU_WHAT=()

gpu_step() {  # NAME BUDGET_S MIN_S FLAGS RUN FINISH WHAT
  GPU_STEPS+=("$1")
  GPU_BUDGET[$1]=$2 GPU_MIN[$1]=$3 GPU_FLAGS[$1]=$4 GPU_RUN[$1]=$5 GPU_FINISH[$1]=$6 GPU_WHAT[$1]=$7
}

gpu_plan() {
  local name total=0 i=0
  printf '%-3s %-16s %8s %8s  %s\n' "#" step budget minimum "what runs"
  for name in "${GPU_STEPS[@]}"; do
    i=$((i + 1)) total=$((total + GPU_BUDGET[$name]))
    printf '%-3s %-16s %6d s %6d s  %s\n' "$i" "$name" "${GPU_BUDGET[$name]}" "${GPU_MIN[$name]}" "${GPU_WHAT[$name]}"
  done
  echo "total $total s (deadline $GPU_DEADLINE_S s)"
}

gpu_record() {  # NAME STATUS SECONDS KEY: one line of $OUT/summary.md
  local key=${4//|//}
  key=${key//$'\n'/ }
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "${key:0:500}" >> "$OUT/summary.md"
  echo "--- [${SECONDS} s] $1: $2 after $3 s: ${key:0:500}"
}

gpu_run() {  # every step in order; returns 1 if any failed or timed out
  local name left t t0 rc status key aborted="" failed=0
  for name in "${GPU_STEPS[@]}"; do
    left=$((GPU_DEADLINE_S - SECONDS))
    if [[ -n $aborted && ${GPU_FLAGS[$name]} != *always* ]]; then
      gpu_record "$name" skipped 0 "not run: $aborted failed"
      continue
    fi
    if ((left < GPU_MIN[$name])); then
      gpu_record "$name" skipped 0 "not run: $left s left before the $GPU_DEADLINE_S s deadline, it needs ${GPU_MIN[$name]} s"
      continue
    fi
    t=$((GPU_BUDGET[$name] < left ? GPU_BUDGET[$name] : left))
    echo "=== [${SECONDS} s] $name (at most $t s): ${GPU_WHAT[$name]}"
    t0=$SECONDS
    timeout -s INT -k "$GPU_GRACE_S" "$((t - GPU_GRACE_S))" bash "$GPU_SELF" --run-step "$name" < /dev/null
    rc=$?
    case $rc in
      0) status=pass ;;
      124 | 137) status=timeout ;;
      *) status=FAIL ;;
    esac
    key=$(export GPU_RC=$rc && eval "${GPU_FINISH[$name]}" 2>&1 | tail -n 1)
    gpu_record "$name" "$status" "$((SECONDS - t0))" "${key:-exit code $rc}"
    if [[ $status != pass ]]; then
      failed=1
      [[ ${GPU_FLAGS[$name]} == *critical* && -z $aborted ]] && aborted=$name
    fi
  done
  return $failed
}

gpu_main() {  # [--dry-run | --run-step NAME]
  case ${1:-} in
    --dry-run)
      gpu_plan
      return 0 ;;
    --run-step)
      eval "${GPU_RUN[$2]}"
      return ;;
    "") ;;
    *)
      echo "usage: bash $GPU_SELF [--dry-run]" >&2
      return 2 ;;
  esac
  PY=${PYTHON:-$(command -v python3 || command -v python)}
  OUT=${OUT:-/tmp/$GPU_NAME}
  mkdir -p "$OUT"
  GPU_WORK=$(mktemp -d "/tmp/$GPU_NAME.XXXXXX")
  # the checkout's package (with the library `install` puts into it) in every process, never a fallback to the
  # references; the same string hashing in every run
  export PY OUT GPU_WORK PYTHONHASHSEED=0 PYTHONUNBUFFERED=1 BETANAS_REQUIRE_KERNELS=1
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  rm -f "$OUT/summary.md" "${GPU_OWN_FILES[@]/#/$OUT/}"
  {
    echo "# $GPU_NAME $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2> /dev/null || echo unknown), deadline $GPU_DEADLINE_S s"
    echo
    echo "| step | status | s | result |"
    echo "|---|---|---|---|"
  } > "$OUT/summary.md"
  gpu_run
  local rc=$?
  echo
  cat "$OUT/summary.md"
  echo "details: $OUT (${GPU_OWN_FILES[*]})"
  return $rc
}

# --- install and preflight ---------------------------------------------------------------------------------------

GPU_INSTALL_BUDGET_S=20  # the prebuilt library: a copy and an import
GPU_INSTALL_BUILD_S=240  # no build/gpu/manifest.json: gpu_library.py builds the library in place

gpu_install_budget() {  # the script's arguments: --dry-run shows the prebuilt case
  if [[ ${1:-} == --dry-run || -f build/gpu/manifest.json ]]; then
    echo "$GPU_INSTALL_BUDGET_S"
  else
    echo "$GPU_INSTALL_BUILD_S"
  fi
}

gpu_install() {  # its output is kept for preflight.json
  env -u BETANAS_REQUIRE_KERNELS "$PY" benchmarks/gpu_library.py install > "$GPU_WORK/install.log" 2>&1
}

gpu_install_finish() {
  grep -v '^+ ' "$GPU_WORK/install.log" 2> /dev/null | grep -v '^\s*$' | tail -n 1
}

# preflight.json: the GPU, torch, the install's output, betanas_fast.build_info() and one launch of a kernel on
# the GPU against the CPU kernel. Exit 1 when kernels cannot run on this GPU: then nothing else can mean anything.
gpu_preflight() {
  GPU_SMI=$(timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | head -n 1) \
    "$PY" - "$OUT/preflight.json" "$GPU_WORK/install.log" << 'PY'
import json, os, platform, sys

info = {"nvidia_smi": os.environ.get("GPU_SMI", ""), "python": platform.python_version(), "problems": []}
problems = info["problems"]
try:
    info["install"] = open(sys.argv[2]).read().splitlines()[-20:]
except OSError:
    info["install"] = None
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)
    else:
        problems.append("torch sees no CUDA device")
    import betanas_fast
    from betanas_fast._ext import OP_NAMES
    build = info["build_info"] = betanas_fast.build_info()
    if not (build["kernels_loaded"] and build["cuda_kernels_compiled"]):
        problems.append(f"kernels_loaded={build['kernels_loaded']}, cuda_kernels_compiled="
                        f"{build['cuda_kernels_compiled']}: {build['load_error'] or build['cuda_not_built_because']}")
    missing = [op for op in OP_NAMES if not build["ops"][op]["cuda"]]
    if missing:
        problems.append(f"no CUDA kernel for {', '.join(missing)}")
    archs = build.get("cuda_archs") or ""
    if "capability" in info and info["capability"] not in archs and "PTX" not in archs:
        problems.append(f"the library is built for {archs or 'no arch'}, the GPU is sm {info['capability']}")
    if not problems:  # the first launch of a kernel of this library on this GPU
        x = torch.randn(2, 8, 9, 9)
        w, scale, shift = torch.randn(8, 1, 3, 3), torch.rand(8) + 0.5, torch.randn(8)
        cpu = torch.ops.betanas.dw_bn_act_eval(x, w, scale, shift, 1, 1)
        gpu = torch.ops.betanas.dw_bn_act_eval(*(t.cuda() for t in (x, w, scale, shift)), 1, 1)
        torch.cuda.synchronize()
        info["first_launch_max_diff"] = diff = (gpu.cpu() - cpu).abs().max().item()
        if not diff <= 1e-4:
            problems.append(f"the first launch differs from the CPU kernel by {diff:.3g}")
except Exception as e:  # noqa: BLE001 - whatever it is, it goes into preflight.json
    problems.append(f"{type(e).__name__}: {e}")
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
sys.exit(1 if problems else 0)
PY
}

gpu_preflight_finish() {
  "$PY" - "$OUT/preflight.json" << 'PY'
import json, sys
try:
    info = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no preflight.json ({e})")
build = info.get("build_info") or {}
ops = build.get("ops") or {}
line = (f"{info.get('device') or info.get('nvidia_smi') or 'no GPU'} (sm {info.get('capability', '?')}, "
        f"{info.get('memory_gib', '?')} GiB); torch {info.get('torch', '?')} CUDA {info.get('torch_cuda', '?')}; "
        f"{sum(bool(v.get('cuda')) for v in ops.values())}/{len(ops)} ops with CUDA kernels, archs "
        f"{build.get('cuda_archs')}")
if "first_launch_max_diff" in info:
    line += f"; first launch ok (max diff {info['first_launch_max_diff']:.1e})"
if info.get("problems"):
    line += "; PROBLEMS: " + "; ".join(info["problems"])
print(line)
PY
}

# --- benchmarks --------------------------------------------------------------------------------------------------
# Each call writes its own tables ($GPU_WORK/NAME.md, .json: benchmarks/conftest.py rewrites them after every test,
# so a call stopped by its timeout keeps the rows it finished); gpu_bench_finish then appends them to $OUT/bench.md
# and $OUT/bench.json ({"calls": [{"step", "exit_code", "results"}]}) and prints the key numbers.

gpu_bench() {  # NAME K_EXPRESSION FILE...
  local name=$1 expression=$2
  shift 2
  rm -f "$GPU_WORK/$name.md" "$GPU_WORK/$name.json"
  "$PY" -m pytest "$@" -m cuda -k "$expression" --benchmark-only --benchmark-disable-gc -q -p no:cacheprovider \
    --results-md "$GPU_WORK/$name.md" --results-json "$GPU_WORK/$name.json" > "$GPU_WORK/$name.log" 2>&1
}

gpu_bench_finish() {  # NAME
  "$PY" - "$1" "$GPU_RC" "$GPU_WORK" "$OUT" << 'PY'
import json, os, re, statistics, sys

name, rc, work, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
md, results, log = (os.path.join(work, f"{name}.{ext}") for ext in ("md", "json", "log"))
doc = json.load(open(results)) if os.path.exists(results) else None
log_text = open(log).read() if os.path.exists(log) else ""
with open(os.path.join(out, "bench.md"), "a") as f:
    f.write(f"\n## {name} (exit code {rc})\n\n")
    f.write(open(md).read() if os.path.exists(md) else "no rows\n")
    if rc:
        f.write("\n```\n" + "\n".join(log_text.splitlines()[-30:]) + "\n```\n")
merged_path = os.path.join(out, "bench.json")
merged = json.load(open(merged_path)) if os.path.exists(merged_path) else {"calls": []}
merged["calls"].append({"step": name, "exit_code": rc, "results": doc})
with open(merged_path + ".tmp", "w") as f:
    json.dump(merged, f, indent=1)
os.replace(merged_path + ".tmp", merged_path)

parts = []
if rc == 5:
    parts.append("no benchmark selected")
summary = re.findall(r"^=* ?(\d+ (?:passed|failed|error|skipped).*?) ?=*$", log_text, re.M)
if summary:
    parts.append(summary[-1].split(" in ")[0])
if doc:
    speedups = {}
    for suite in doc["suites"].values():
        for row in suite["cases"]:
            for impl, ratio in row.get("speedup", {}).items():
                speedups.setdefault(impl, []).append(ratio)
    for impl, ratios in speedups.items():
        parts.append(f"{impl}/betanas_fast {statistics.median(ratios):.2f}x median ({min(ratios):.2f}-"
                     f"{max(ratios):.2f}x, {len(ratios)} cases)")
    lines = doc.get("report_lines", [])
    required = [l for l in lines if l.startswith("- required ratio:")]
    if required:
        parts.append(f"{sum('BELOW' in l for l in required)} of {len(required)} required ratios missed")
    bandwidth = [int(m) for l in lines for m in re.findall(r"= (\d+)% of copy bandwidth", l)]
    if bandwidth:
        parts.append(f"eval k3 at {min(bandwidth)}-{max(bandwidth)}% of copy bandwidth")
    parts += [m.group(0) for l in lines for m in [re.search(r"projected GPU-hours[^:]*: \d+", l)] if m]
print("; ".join(parts) or "no results")
PY
}

# The two steps every GPU call begins with: the library in place (prebuilt, or built), then the preflight, which
# stops the call when the kernels cannot run.
gpu_first_steps() {
  gpu_step install "$(gpu_install_budget "$@")" 10 "" gpu_install gpu_install_finish \
    "python benchmarks/gpu_library.py install (${GPU_INSTALL_BUILD_S} s when build/gpu/manifest.json is missing: it builds)"
  gpu_step preflight 15 10 critical,always gpu_preflight gpu_preflight_finish \
    "nvidia-smi, torch, betanas_fast.build_info(): kernels_loaded and cuda_kernels_compiled, one launch -> preflight.json"
}
