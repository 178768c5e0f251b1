"""The commands end to end against recorded outputs: a small demo search, the evaluation of its architecture,
the retraining and the export, each run as a user types it (a separate process). Their arch.json, histories
and metrics must be byte-identical to the ones recorded in tests/golden/demo.json, so that moving code between
modules cannot change what a run computes.

Floating-point results depend on the CPU's vector unit and on torch's version (oneDNN chooses its kernels by
them), so the record names both: on a machine like the recording one every file must match byte for byte; on
another, the text with every number rounded to 4 significant digits must match, and the searched architecture
exactly. `python tests/test_golden.py --record` writes the record anew (only when a change of results is
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


def _cmd(module, *args, cwd):
    r = subprocess.run([sys.executable, "-m", f"betanas_fast.{module}", *args], capture_output=True, text=True,
                       timeout=900, cwd=cwd, env=dict(os.environ, PYTHONHASHSEED="0"))
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
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__.split("+")[0]}


_NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")


def rounded(text: str) -> str:
    return _NUMBER.sub(lambda m: f"{float(m.group()):.4g}", text)


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
        assert rounded(got) == rounded(want), f"{name} differs from the record beyond rounding"
    if name == "search/arch.json":
        assert json.loads(got)["choices"] == json.loads(want)["choices"]


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
