"""Runs the README's own commands as a new user types them and writes what they measured to results files.

    python benchmarks/record.py install    # `pip install .` in a fresh venv from a fresh clone -> results/install.json
    python benchmarks/record.py demo       # search, evaluate, train, export on the demo        -> results/demo.json
    python benchmarks/record.py latency    # latency build, search --cost latency, validate      -> results/latency.json
    python benchmarks/record.py studies [--dir D] [--studies ...]   # each study's study.json + timing.json
                                           # -> results/study_<name>.json, groundtruth_/ranking_mnist_cluttered.json

Every command runs in a fresh temporary directory (nothing of an earlier run is reused) with the Python that
runs this script, i.e. the installed package with its compiled kernels. Wall times are of the whole command as
typed, start-up included. The files carry a stamp (date, commit, machine and its load average while measuring)
from `betanas_fast.runs.provenance`; `python benchmarks/render_readme.py` renders them into the README.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import List

from betanas_fast.runs.provenance import write_results

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def run(cmd: List[str], cwd: str, env=None, timeout=3600) -> dict:
    """Runs one command as typed; returns its wall time, load average before it, and output."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    shown = " ".join(shlex.quote(c) for c in cmd).replace(shlex.quote(sys.executable), "python")
    print(f"[{seconds:7.1f} s] {shown}", flush=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"record: `{shown}` failed with exit code {r.returncode}")
    return {"command": shown, "seconds": round(seconds, 1), "load_before": round(load, 2), "stdout": r.stdout}


def py(*args: str) -> List[str]:
    return [sys.executable, "-m", *args]


# --- install -------------------------------------------------------------------------------------------------
def record_install(args) -> dict:
    """`pip install .` from a fresh clone of HEAD into a fresh venv, as the README's first command; the
    torch wheel comes from wherever pip finds it on this machine (recorded)."""
    with tempfile.TemporaryDirectory() as tmp:
        clone = os.path.join(tmp, "clone")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        venv = os.path.join(tmp, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip"]
        subprocess.run(pip + ["install", "-q", "--upgrade", "pip"], check=True)
        env = dict(os.environ, PIP_NO_CACHE_DIR="1")
        env.pop("BETANAS_FORCE_CUDA", None)
        env.pop("BETANAS_FORCE_CPU", None)
        step = run(pip + ["install", "."], cwd=clone, env=env, timeout=3600)
        info = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                               "import json, betanas_fast; print(json.dumps(betanas_fast.build_info()))"],
                              cwd=tmp, capture_output=True, text=True, check=True)
        build = json.loads(info.stdout.strip().splitlines()[-1])
    data = {"pip_install": {"command": "pip install .", "seconds": step["seconds"], "load_before": step["load_before"],
                            "pip_cache": "off", "kernels_loaded": build["kernels_loaded"],
                            "cuda_kernels_compiled": build["cuda_kernels_compiled"],
                            "built_with_torch": build["built_with_torch"]}}
    return write_results(os.path.join(RESULTS, "install.json"), "python benchmarks/record.py install", data)


# --- demo ----------------------------------------------------------------------------------------------------
def _last_json_line(text: str) -> dict:
    return json.loads([ln for ln in text.strip().splitlines() if ln.startswith("{")][-1])


def _logit_diff(text: str):
    m = re.search(r"max \|logit difference\| from the net: (.+)", text)
    return ast.literal_eval(m.group(1).strip()) if m else None


def record_demo(args) -> dict:
    """The README's demo, typed in a clean directory: the search (seed 0), evaluate, train, export."""
    with tempfile.TemporaryDirectory() as tmp:
        search = run(py("betanas_fast.search", "--amp", "--out", "runs/demo"), cwd=tmp)
        arch = json.load(open(os.path.join(tmp, "runs", "demo", "arch.json")))
        amp_line = next((ln for ln in search["stdout"].splitlines() if ln.startswith("--amp")), None)
        ev = run(py("betanas_fast.evaluate", "runs/demo"), cwd=tmp)
        evaluation = _last_json_line(ev["stdout"])
        train = run(py("betanas_fast.train", "--arch", "runs/demo/arch.json", "--out", "runs/demo-train"), cwd=tmp)
        result = json.load(open(os.path.join(tmp, "runs", "demo-train", "result.json")))
        history = [json.loads(ln) for ln in open(os.path.join(tmp, "runs", "demo-train", "history.jsonl"))]
        exports = {}
        for fmt in ("timm", "onnx"):
            e = run(py("betanas_fast.export", "runs/demo-train", "--weights", "runs/demo-train/best.pt",
                       "--format", fmt), cwd=tmp)
            exports[fmt] = {"command": e["command"], "seconds": e["seconds"],
                            "max_abs_logit_diff": _logit_diff(e["stdout"])}
    drops = sorted(({"block": b["block"], "op": d["op"], "step": d["step"]} for b in arch["blocks"]
                    for d in b["dropped"]), key=lambda d: (d["step"], d["block"]))
    data = {
        "search": {"command": search["command"], "seconds": search["seconds"], "load_before": search["load_before"],
                   "amp": amp_line, "drops": drops, "paths_dropped": len(drops),
                   "paths": sum(len(b["alpha"]) for b in arch["blocks"]) + len(drops),
                   "val_acc": arch["val_acc"], "mflops": arch["mflops"], "params": arch["params"],
                   "arch": arch["arch"]},
        "evaluate": {"command": ev["command"], "seconds": ev["seconds"], "load_before": ev["load_before"],
                     "top1": evaluation["top1"],
                     "agrees_with_search": evaluation["top1"] == arch["val_acc"]},
        "train": {"command": train["command"], "seconds": train["seconds"], "load_before": train["load_before"],
                  "epochs": result["epochs"],
                  "best_val_top1": result["best_val_top1"], "last_val_top1": result["last"]["val_top1"],
                  "val_top1_per_epoch": [h["val_top1"] for h in history]},
        "export": exports,
    }
    return write_results(os.path.join(RESULTS, "demo.json"), "python benchmarks/record.py demo", data)


# --- latency -------------------------------------------------------------------------------------------------
def record_latency(args) -> dict:
    """The README's three latency commands, typed in a clean directory."""
    with tempfile.TemporaryDirectory() as tmp:
        build = run(py("betanas_fast.latency", "build", "--space", "demo", "--out", "latency-demo.json"), cwd=tmp)
        search = run(py("betanas_fast.search", "--cost", "latency", "--latency-table", "latency-demo.json",
                        "--out", "runs/demo-latency"), cwd=tmp)
        arch = json.load(open(os.path.join(tmp, "runs", "demo-latency", "arch.json")))
        validate = run(py("betanas_fast.latency", "validate", "--table", "latency-demo.json", "--archs", "30",
                          "--arch", "runs/demo-latency"), cwd=tmp)
        table = json.load(open(os.path.join(tmp, "latency-demo.json")))
        found = [os.path.join(d, f) for d, _, fs in os.walk(tmp) for f in fs if f == "validate.json"]
        report = json.load(open(found[0]))
    searched = [r for r in report["rows"][report["archs"]:]]
    report = {k: v for k, v in report.items() if k not in ("rows", "table_meta", "table")}
    report["searched"] = [{k: r[k] for k in ("arch", "predicted_ms", "measured_ms", "error_pct",
                                             "within_table_mape", "random_nets_predicted_better")} for r in searched]
    data = {"build": {"command": build["command"], "seconds": build["seconds"], "entries": len(table["entries"]),
                      "overhead_ms": table["network"]["overhead_ms"]},
            "search": {"command": search["command"], "seconds": search["seconds"], "mflops": arch["mflops"],
                       "predicted_ms": arch["latency_ms"], "val_acc": arch["val_acc"]},
            "validate": {"command": validate["command"], "seconds": validate["seconds"], "report": report}}
    return write_results(os.path.join(RESULTS, "latency.json"), "python benchmarks/record.py latency", data)


# --- studies -------------------------------------------------------------------------------------------------
# name -> (results file, the study's command line after `python -m betanas_fast.study`; {dir} is --dir)
CLUTTERED = ("--search-flags=--preset mnist_cluttered", "--train-flags=--recipe cluttered")
STUDIES = {
    "balance": ("study_balance.json", ["balance"]),
    "sharing": ("study_sharing.json", ["sharing"]),
    "seeds": ("study_seeds.json", ["seeds"]),
    "groundtruth": ("groundtruth_mnist_cluttered.json", ["groundtruth", "--jobs", "2"]),
    "ranking": ("ranking_mnist_cluttered.json", ["ranking", "--jobs", "2", "--groundtruth", "{dir}/study-groundtruth"]),
    "seeds-cluttered": ("study_seeds_mnist_cluttered.json",
                        ["seeds", "--jobs", "2", *CLUTTERED, "--groundtruth", "{dir}/study-groundtruth"]),
    # every strategy on the digits demo cut to 20 search epochs (5 of warm-up; the full cluttered run takes hours
    # on 2 cores)
    "compare": ("compare_digits.json", ["compare", "--jobs", "2", "--search-flags=--epochs 20 --warmup-epochs 5"]),
    # every strategy on the cluttered digits, the preset cut to 16 search epochs (8 of warm-up) and SPOS's
    # evolution to 3 generations of 8 (the full preset for 33 searches takes most of a day on 2 cores); P-DARTS's
    # first stage ends at epoch 5, so it warms up for 2 (its own 10 of a 25-epoch stage); retrained with the
    # ground-truth table's recipe, so the nets sit over its cloud
    "compare-cluttered": ("compare_mnist_cluttered.json",
                          ["compare", "--jobs", "2", "--search-flags=--preset mnist_cluttered --epochs 16 "
                           "--warmup-epochs 8 --spos-population 8 --spos-generations 3 --spos-parents 2",
                           "--strategy-flags", "pdarts=--warmup-epochs 2",
                           CLUTTERED[1], "--groundtruth", "{dir}/study-groundtruth"]),
    # at equal wall time: DARTS as above, betanas given about DARTS's search time (the whole preset, 60 epochs)
    "compare-cluttered-wall": ("compare_mnist_cluttered_wall.json",
                               ["compare", "--jobs", "2", "--strategies", "betanas", "darts",
                                "--search-flags=--preset mnist_cluttered --epochs 16 --warmup-epochs 8",
                                "--strategy-flags", "betanas=--epochs 60 --warmup-epochs 30",
                                CLUTTERED[1], "--groundtruth", "{dir}/study-groundtruth"]),
}


def _under_runs(value, base: str):
    """`value` with every path under this machine's study folder written as runs/...: a results file names no
    local path."""
    if isinstance(value, dict):
        return {k: _under_runs(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_under_runs(v, base) for v in value]
    if isinstance(value, str) and value.startswith(base + "/"):
        return "runs/" + value[len(base) + 1:]
    return value


def record_studies(args) -> dict:
    """Runs each study with the README's command (a finished study in --dir is reused, a killed one continued)
    and writes its study.json and timing.json to its results file as soon as it ends."""
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    doc = None
    for name in args.studies:
        filename, argv = STUDIES[name]
        argv = [a.replace("{dir}", base) for a in argv]
        out = os.path.join(base, f"study-{name}")
        step = run(py("betanas_fast.study", *argv, "--no-progress", "--out", out), cwd=base, timeout=4 * 3600)
        timing = os.path.join(out, "timing.json")
        shown = [a.replace(base + "/", "runs/") for a in argv]
        data = {"command": "python -m betanas_fast.study " + shlex.join(shown), "seconds": step["seconds"],
                "load_before": step["load_before"],
                "study": _under_runs(json.load(open(os.path.join(out, "study.json"))), base),
                "timing": json.load(open(timing)) if os.path.exists(timing) else None}
        doc = write_results(os.path.join(RESULTS, filename),
                            f"python benchmarks/record.py studies --studies {name}", data)
    return doc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/record.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("install", help=record_install.__doc__)
    sub.add_parser("demo", help=record_demo.__doc__)
    sub.add_parser("latency", help=record_latency.__doc__)
    s = sub.add_parser("studies", help=record_studies.__doc__)
    s.add_argument("--dir", default="runs", help="where the study directories go (a finished study is reused)")
    s.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES), help="which studies")
    args = p.parse_args(argv)
    doc = {"install": record_install, "demo": record_demo, "latency": record_latency,
           "studies": record_studies}[args.what](args)
    print(json.dumps({k: v for k, v in doc.items() if k != "stamp"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
