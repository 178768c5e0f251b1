"""The GPU day's scripts, checked without a GPU: benchmarks/gpu_check.sh and gpu_check_long.sh (their plans fit the
540 s deadline, in order of value; the step runner keeps to budgets, deadline and aborts, and reads the tools'
summaries), and benchmarks/gpu_smoke.py (its checks pass with the CPU kernels against the references, and its
comparison fails when an op's output is wrong)."""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from betanas_fast._ext import OP_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = ["gpu_check.sh", "gpu_check_long.sh", "gpu_steps.sh"]
DEADLINE_S = 540
CHECK_ORDER = ["install", "preflight", "smoke", "memcheck", "racecheck", "synccheck", "tests", "bench-dw",
               "bench-grouped", "bench-steps", "torchrun"]
LONG_ORDER = ["install", "preflight", "latency-b1", "latency-b256", "bench-dw-grid", "bench-rest"]


def bash(*args, env=None, timeout=120, cwd=ROOT):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    result = bash("-n", os.path.join(BENCH, script))
    assert result.returncode == 0, result.stderr


def plan(script, tmp_path):
    """The steps of `script --dry-run` as (name, budget, minimum), and its total; the dry run must create nothing."""
    out = tmp_path / "out"
    result = bash(os.path.join(BENCH, script), "--dry-run", env={"OUT": str(out)})
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    lines = result.stdout.strip().splitlines()
    total = re.fullmatch(r"total (\d+) s \(deadline (\d+) s\)", lines[-1])
    assert total, lines[-1]
    steps = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in
             (re.match(r"\d+\s+(\S+)\s+(\d+) s\s+(\d+) s\s", line) for line in lines[1:-1]) if m]
    assert len(steps) == len(lines) - 2
    assert int(total.group(2)) == DEADLINE_S
    return steps, int(total.group(1))


@pytest.mark.parametrize("script,order", [("gpu_check.sh", CHECK_ORDER), ("gpu_check_long.sh", LONG_ORDER)])
def test_dry_run_fits_the_deadline_in_order_of_value(script, order, tmp_path):
    steps, total = plan(script, tmp_path)
    assert [name for name, _, _ in steps] == order
    assert total == sum(budget for _, budget, _ in steps) <= DEADLINE_S
    assert all(minimum <= budget for _, budget, minimum in steps)
    assert steps[0][1] == 20  # the dry run shows the prebuilt library's install
    # at most 7 files come back: summary.md and the script's own
    own = re.search(r"^GPU_OWN_FILES=\((.*)\)$", open(os.path.join(BENCH, script)).read(), re.M).group(1).split()
    assert len(own) + 1 <= 7 and "summary.md" not in own


FAKE_STEPS = """\
set -u
GPU_SELF={self}
GPU_NAME=fake_check
GPU_OWN_FILES=(log.txt)
source {steps}
gpu_step ok 10 1 "" 'echo ran > "$OUT/log.txt"' 'echo "ok rc=$GPU_RC"' "passes"
gpu_step slow 7 1 "" '"$PY" -c "
import os, time
try:
    time.sleep(60)
except KeyboardInterrupt:  # what pytest does: keep what finished, then stop
    open(os.path.join(os.environ[\\"OUT\\"], \\"log.txt\\"), \\"a\\").write(\\"interrupted\\")
"' 'echo "slow rc=$GPU_RC"' "runs past its budget"
gpu_step late 10 1000 "" 'true' 'echo never' "needs more time than is left"
gpu_step broken 10 1 critical 'exit 3' 'echo "broken rc=$GPU_RC"' "fails"
gpu_step after 10 1 "" 'true' 'echo never' "skipped after a critical failure"
gpu_step always 10 1 always 'true' 'echo "always rc=$GPU_RC"' "runs even so"
gpu_main "$@"
"""


def test_runner_keeps_budgets_deadline_and_aborts(tmp_path):
    """A step past its budget gets SIGINT (its finished work kept) and is a timeout; a step whose minimum exceeds the
    time left is skipped; a critical failure skips the rest but the "always" steps; one summary line per step; exit
    code 1."""
    script = tmp_path / "fake.sh"
    script.write_text(FAKE_STEPS.format(self=script, steps=os.path.join(BENCH, "gpu_steps.sh")))
    out = tmp_path / "out"
    result = bash(str(script), env={"OUT": str(out), "PYTHON": sys.executable}, timeout=60, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = [line.split(" | ") for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| step |")]
    status = {row[0].strip("| "): (row[1], row[3].strip(" |")) for row in rows}
    assert list(status) == ["ok", "slow", "late", "broken", "after", "always"]
    assert status["ok"] == ("pass", "ok rc=0")
    assert status["slow"] == ("timeout", "slow rc=124")
    assert status["late"][0] == "skipped" and "deadline" in status["late"][1]
    assert status["broken"] == ("FAIL", "broken rc=3")
    assert status["after"] == ("skipped", "not run: broken failed")
    assert status["always"] == ("pass", "always rc=0")
    assert (out / "log.txt").read_text() == "ran\ninterrupted"
    assert int(rows[1][2]) <= 7  # the slow step was stopped within its budget


def finish(step_line: str, rc: int, out, tmp_path) -> str:
    """The key result gpu_check.sh's finish command `step_line` prints for files in `out`."""
    harness = tmp_path / "finish.sh"
    harness.write_text(f"source {os.path.join(BENCH, 'gpu_check.sh')} --dry-run > /dev/null\n"
                       f"export GPU_RC={rc}\n{step_line}\n")
    result = bash(str(harness), env={"OUT": str(out), "GPU_WORK": str(tmp_path), "PY": sys.executable})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_smoke_and_sanitizer_summaries(tmp_path):
    (tmp_path / "smoke.log").write_text(textwrap.dedent("""\
        gpu_smoke: cuda (NVIDIA H100), full shapes
        PASS dw_bn_act_train[a]  1.0e-06/2.0e-05 (out)  0.10s
        RESULT 1 PASS, 0 FAIL, 0 SKIP (cuda, full) in 9.0s
        ===== compute-sanitizer --tool memcheck: gpu_smoke.py --tiny =====
        ========= COMPUTE-SANITIZER
        PASS dw_bn_act_train[a]  1.0e-06/2.0e-05 (out)  0.10s
        FAIL block_gate_grads[b]  1.0e-01/2.0e-04 (identity)  0.10s
        RESULT 1 PASS, 1 FAIL, 0 SKIP (cuda, tiny) in 9.0s
        ========= ERROR SUMMARY: 2 errors
        ===== compute-sanitizer --tool racecheck: gpu_smoke.py --tiny =====
        ========= COMPUTE-SANITIZER
        PASS dw_bn_act_train[a]  1.0e-06/2.0e-05 (out)  0.10s
        """))
    assert finish("smoke_finish", 0, tmp_path, tmp_path) == "1 PASS, 0 FAIL, 0 SKIP (cuda, full) in 9.0s"
    memcheck = finish("smoke_finish '===== compute-sanitizer --tool memcheck'", 99, tmp_path, tmp_path)
    assert memcheck.startswith("memcheck: 2 errors; 1 PASS, 1 FAIL") and "FAIL block_gate_grads[b]" in memcheck
    racecheck = finish("smoke_finish '===== compute-sanitizer --tool racecheck'", 124, tmp_path, tmp_path)
    assert racecheck == "racecheck: no summary; cut off after 1 PASS, 0 FAIL"


def test_tests_summary(tmp_path):
    (tmp_path / "tests.log").write_text("....F. [ 97%]\n.. [100%]\nFAILED tests/test_x.py::test_y[cuda] - boom\n"
                                        "1 failed, 7 passed, 810 deselected in 30.02s\n")
    assert finish("tests_finish", 1, tmp_path, tmp_path) == "1 failed, 7 passed, 810 deselected; first: test_y[cuda]"
    (tmp_path / "tests.log").write_text("....F. [ 12%]\n")
    assert finish("tests_finish", 124, tmp_path, tmp_path) == "cut off at 12%"


def smoke(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(BENCH, "gpu_smoke.py"), "--device", "cpu", "--tiny", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_smoke_tiny_on_cpu_passes_every_op():
    result = smoke()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    passed = [line for line in lines if line.startswith("PASS ")]
    for op in OP_NAMES:
        assert any(line.startswith(f"PASS {op}[") for line in passed), op
    assert sum(line.startswith("PASS determinism[") for line in passed) >= 4
    assert not any(line.startswith("FAIL") for line in lines)
    assert re.fullmatch(r"RESULT \d+ PASS, 0 FAIL, \d+ SKIP \(cpu, tiny\) in [\d.]+s", lines[-1])


def load_smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", os.path.join(BENCH, "gpu_smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("op,case", [("dw_bn_act_eval", "unaligned view, NCHW"),
                                     ("dw_bn_act_grouped_train_backward", "empty and single-sample groups"),
                                     ("alpha_grad", "mobile supernet")])
def test_smoke_fails_a_wrong_op(op, case, monkeypatch, capsys):
    """The positive control: one element of the op's first output moved by 5 % of its largest value must fail."""
    monkeypatch.setenv("BETANAS_SMOKE_PERTURB", op)
    assert load_smoke().main(["--device", "cpu", "--tiny", "--only", case]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^FAIL {op}\[{re.escape(case)}", out, re.M), out
    assert re.search(r"^RESULT \d+ PASS, 1 FAIL", out, re.M), out


def test_compare_judges_against_the_composites_error():
    gpu_smoke = load_smoke()
    exact = torch.linspace(-3, 3, 1000, dtype=torch.float64)
    got = exact.float()
    worst = gpu_smoke.compare("dw_bn_act_train", [got], [exact], [got], ["out"], torch.float32, "forward")
    assert worst["ok"] and worst["tol"] == pytest.approx(2e-5)
    wrong = got.clone()
    wrong[500] += 1e-3
    assert not gpu_smoke.compare("dw_bn_act_train", [wrong], [exact], [got], ["out"], torch.float32, "forward")["ok"]
    assert not gpu_smoke.compare("alpha_grad", [got[:10]], [exact], [got], ["p"], torch.float32, "backward")["ok"]
    nan = got.clone()
    nan[3] = float("nan")
    assert not gpu_smoke.compare("dw_bn_act_train", [nan], [exact], [got], ["out"], torch.float32, "forward")["ok"]
    # low precision: 2x PyTorch's own error, but never more than a few roundings for the ops that round once
    bf16 = exact.bfloat16()
    worst = gpu_smoke.compare("dw_bn_act_eval", [bf16], [exact], [bf16 + 0.5], ["out"], torch.bfloat16, "forward")
    assert worst["ok"] and worst["tol"] == pytest.approx(4 * torch.finfo(torch.bfloat16).eps)


def test_smoke_cases_cross_the_kernels_thresholds():
    """What the cases' comments claim: tiny shapes still make CUDA blocks walk several items (more than kTargetBlocks =
    2048 of them), split block_gate_grads' reductions (more than kRedMinChunk = 8192 values per channel), stage more
    than 32 samples of a group; the huge forward has more than 2**31 elements."""
    cases = load_smoke().CASES
    by_why = {case.why: case for case in cases}
    assert by_why["multi-item blocks"].tiny["N"] > 2048 and by_why["multi-item blocks, N>2048"].full["N"] > 2048
    assert by_why["multi-item blocks"].full["C"] > 1024
    for why in ("56x56 block, split reductions", "112->56 widen"):
        p = by_why[why].tiny
        assert p["N"] * p["H"] ** 2 > 8192
    assert max(by_why["Phase 1, a batch over six paths"].tiny["samples"]) > 32
    huge = [case for case in cases if case.family == "huge_eval"]
    assert {case.opts["layout"] for case in huge} == {"nchw", "nhwc"}
    for case in huge:
        assert case.full["N"] * case.full["C"] * case.full["H"] * case.full["W"] > 2 ** 31 and case.tiny is None
    for case in cases:
        if case.opts.get("unaligned"):
            assert case.opts["layout"] in ("nchw", "nhwc")
    assert {op for case in cases for op in case_ops(case)} == set(OP_NAMES)


def case_ops(case):
    if case.family == "dense":
        mode = "train" if case.opts["mode"] == "train" else "eval"
        return {f"dw_bn_act_{mode}", f"dw_bn_act_{mode}_backward"}
    return {"grouped": {"dw_bn_act_grouped_train", "dw_bn_act_grouped_train_backward"}, "gate": {"block_gate_grads"},
            "alpha": {"alpha_grad"}, "huge_eval": {"dw_bn_act_eval"}}[case.family]


def test_huge_eval_check_runs_at_a_small_size(capsys):
    """The 2**31-element check's code (chunks compared bit for bit, the ends against the oracle) at a size this
    machine can afford, on the CPU kernel."""
    gpu_smoke = load_smoke()
    runner = gpu_smoke.Runner("cpu", repeats=2, only=None)
    for layout in ("nchw", "nhwc"):
        case = gpu_smoke.Case("huge_eval", "small", torch.bfloat16, dict(N=5, C=8, H=6, W=7), None,
                              dict(k=3, s=1, layout=layout, act="relu6", chunk_numel=2 * 8 * 6 * 7))
        runner.run_case(case, {**case.opts, **case.full})
    out = capsys.readouterr().out
    assert runner.counts == {"PASS": 2, "FAIL": 0, "SKIP": 0}, out
    assert out.count("chunks of 2 images bit for bit equal") == 2, out


def test_every_benchmark_step_selects_what_it_names():
    """The GPU day's benchmark steps select by -k expressions over the benchmarks' ids: each must still select the
    cases it names (a renamed benchmark would otherwise leave a step timing nothing, and its summary line empty)."""
    script = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    expr = dict(re.findall(r'^(K_\w+|F_\w+)="([^"]*)"', script, re.M))
    steps = {"K_DW": ("benchmarks/test_bench_dw_bn_act.py", ["test_cuda_imagenet_shapes", "test_cuda_eval_k3_bandwidth"]),
             "K_GROUPED": ("benchmarks/test_bench_grouped_cuda.py",
                           ["test_cuda_grouped_fwd_bwd", "test_cuda_block_gate_grads"]),
             "K_STEPS": (expr["F_STEPS"], ["test_cuda_projected_gpu_hours", "test_phase2_step_imagenet_shapes",
                                           "test_phase1_step_layouts_imagenet_shapes", "test_phase2_step[cuda]"])}
    for name, (files, wanted) in steps.items():
        out = subprocess.run([sys.executable, "-m", "pytest", *files.split(), "-m", "cuda", "-k", expr[name],
                              "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        selected = [line for line in out.stdout.splitlines() if "::" in line]
        for want in wanted:
            assert any(want in line for line in selected), (name, want, out.stdout[-2000:], out.stderr[-2000:])
