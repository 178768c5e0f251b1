"""The commands end to end against recorded outputs: a small demo search, the evaluation of its architecture,
the retraining and the export, each run as a user types it (a separate process). Their arch.json, histories
and metrics must be byte-identical to the ones recorded in tests/golden/demo.json, so that moving code between
modules cannot change what a run computes.

Floating-point results depend on the CPU's vector unit and on torch's version (ATen and oneDNN choose their
kernels by them). The commands run with both capped at AVX2 (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`) so
that any x86 machine with AVX2 runs the recording machine's kernels, and the record names the capped vector
unit and torch's version: on a machine like that every file must match byte for byte; on another, the text
must match with every number within a relative 1e-3, and the searched architecture exactly. `python tests/test_golden.py --record` writes the record anew (only when a change of results is
intended, and said in its commit)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, "golden", "demo.json")

SEARCH = ["--stage-depths", "1", "2", "1", "1", "--heldout", "64", "--val", "64", "--batch-size", "32",
          "--heldout-batch-size", "32", "--epochs", "3", "--warmup-epochs", "1", "--phase-ratio", "2",
          "--threads", "2", "--bn-recalib-batches", "2", "--drop-threshold", "-0.004", "--arch-lr", "0.004",
          "--no-progress", "--no-plots", "--no-tensorboard"]
TRAIN = ["--epochs", "2", "--batch-size", "64", "--threads", "2", "--val", "100", "--no-progress",
         "--no-tensorboard"]
TIMED = ("seconds",)  # wall-clock fields: not results


def _has_avx2() -> bool:
    from betanas_fast.runs.provenance import cpu_flags
    return {"avx2", "fma"} <= set(cpu_flags())


ISA_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"} if _has_avx2() else {}


def _cmd(module, *args, cwd):
    r = subprocess.run([sys.executable, "-m", f"betanas_fast.{module}", *args], capture_output=True, text=True,
                       timeout=900, cwd=cwd, env=dict(os.environ, PYTHONHASHSEED="0", **ISA_CAP))
    assert r.returncode == 0, f"{module} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _untimed(text: str) -> str:
    """A JSON-lines or JSON text without its wall-clock fields (re-serialised in the order written)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMED}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        return "\n".join(json.dumps(strip(json.loads(ln))) for ln in lines)
    except json.JSONDecodeError:
        return json.dumps(strip(json.loads(text)))


def _read(path):
    with open(path) as f:
        return f.read()


def produce(work: str) -> dict:
    """Every output the record holds, from a fresh run of the four commands in `work`."""
    run, trained, export = os.path.join(work, "search"), os.path.join(work, "train"), os.path.join(work, "export")
    _cmd("search", *SEARCH, "--out", run, cwd=work)
    evaluation = _cmd("evaluate", run, "--split", "val", cwd=work).strip().splitlines()[-1]
    _cmd("train", "--arch", run, *TRAIN, "--out", trained, cwd=work)
    _cmd("export", run, "--weights", os.path.join(trained, "best.pt"), "--format", "timm", "--out", export,
         cwd=work)
    model = torch.load(os.path.join(export, "model_timm.pt"), map_location="cpu", weights_only=True)
    weights = {k: [round(float(v.double().sum()), 6), list(v.shape)] for k, v in model.items()}
    out = {"search/arch.json": _read(os.path.join(run, "arch.json")),
            "search/history.jsonl": _read(os.path.join(run, "history.jsonl")),
            "evaluate": evaluation,
            "train/history.jsonl": _untimed(_read(os.path.join(trained, "history.jsonl"))),
            "train/result.json": _untimed(_read(os.path.join(trained, "result.json"))),
            "export/model_timm.json": _read(os.path.join(export, "model_timm.json")),
            "export/weights": json.dumps(weights, sort_keys=True)}
    return {k: v.replace(work, "<work>") for k, v in out.items()}  # paths name the temporary folder


def machine() -> dict:
    """The kernels the commands ran: the (capped) vector unit and torch's version."""
    isa = "AVX2" if ISA_CAP else torch.backends.cpu.get_cpu_capability()
    return {"cpu_capability": isa, "torch": torch.__version__.split("+")[0]}


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def assert_close_text(got: str, want: str, name: str, rtol: float = 1e-3, atol: float = 1e-6) -> None:
    """The same text but for numbers, which agree within `rtol` (relative) or `atol`."""
    assert _NUMBER.sub("#", got) == _NUMBER.sub("#", want), f"{name}: the text differs beyond its numbers"
    a = [float(x) for x in _NUMBER.findall(got)]
    b = [float(x) for x in _NUMBER.findall(want)]
    far = [(x, y) for x, y in zip(a, b) if abs(x - y) > atol + rtol * abs(y)]
    assert not far, f"{name}: {len(far)} of {len(b)} numbers differ by more than {rtol:g} (e.g. {far[:3]})"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return produce(str(tmp_path_factory.mktemp("golden")))


@pytest.fixture(scope="module")
def record():
    with open(RECORD) as f:
        return json.load(f)


def test_record_covers_every_output(outputs, record):
    assert sorted(outputs) == sorted(record["outputs"])


@pytest.mark.parametrize("name", ["search/arch.json", "search/history.jsonl", "evaluate", "train/history.jsonl",
                                  "train/result.json", "export/model_timm.json", "export/weights"])
def test_output_matches_record(outputs, record, name):
    got, want = outputs[name], record["outputs"][name]
    if machine() == record["machine"]:
        assert got == want, f"{name} differs from the record made on a machine like this one"
    else:  # another vector unit or torch: the same run up to rounding
        assert_close_text(got, want, name)
    if name == "search/arch.json":
        assert json.loads(got)["choices"] == json.loads(want)["choices"]


def test_the_comparison_across_machines_can_fail():
    want = '{"loss": 2.3392099142074585, "arch": ["ir_r1_k3_s2_e3_c16"], "step": 12}'
    assert_close_text(want.replace("2.3392099142074585", "2.33921"), want, "near")  # 4e-7 relative: the same run
    for other in (want.replace("2.3392099142074585", "2.36"), want.replace("k3", "k5"), want.replace("12", "13")):
        with pytest.raises(AssertionError):
            assert_close_text(other, want, "far")


def test_the_run_searched_something(record):
    """The record is of a run that dropped paths and trained a net that learned (a comparison with a run that
    does nothing would prove nothing)."""
    arch = json.loads(record["outputs"]["search/arch.json"])
    history = [json.loads(ln) for ln in record["outputs"]["search/history.jsonl"].splitlines()]
    assert any(rec["drops"] for rec in history)
    assert any(rec["phase2_loss"] is not None for rec in history)
    assert len(set(arch["choices"])) > 1
    result = json.loads(record["outputs"]["train/result.json"])
    assert result["best_val_top1"] > 0.3  # 10 classes: chance is 0.1


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_golden.py --record")
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        out = produce(work)
    os.makedirs(os.path.dirname(RECORD), exist_ok=True)
    with open(RECORD, "w") as f:
        json.dump({"machine": machine(), "outputs": out}, f, indent=1)
        f.write("\n")
    print(f"wrote {RECORD}")
