"""The DARTS family against betanas on the demo; writes benchmarks/results/mixture_demo.json.

    python benchmarks/mixture_demo.py [--epochs 6] [--warmup-epochs 1] [--seed 0] [--threads 2]

Each strategy (betanas, darts first and second order, fbnet, pdarts, dartsplus, hmnas) runs the demo search with the same settings, each in
a process of its own: its peak resident memory (the process's maximum RSS, torch and the data included), the mean
wall time of an iteration (its weight steps and, after the warm-up, its α step), where it ends (the architecture,
the blocks whose argmax is the identity, the validation accuracy with inherited weights, the paths each block still
holds, an early stop), and, for the mixtures,
the activation estimate the search makes before it starts. Then the α-gradient checks of tests/mixture_oracle.py
(the engine against the float64 oracle), in float64 and, for darts first order, in float32. The load average
before and after is recorded: another job on the machine inflates the times.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402

from betanas_fast.runs.provenance import write_results  # noqa: E402

RESULTS = os.path.join(HERE, "results", "mixture_demo.json")
RUNS = {"betanas": [], "darts": ["--strategy", "darts"], "darts-2nd-order": ["--strategy", "darts", "--darts-order", "2"],
        "fbnet": ["--strategy", "fbnet"], "pdarts": ["--strategy", "pdarts"], "dartsplus": ["--strategy", "dartsplus"],
        "hmnas": ["--strategy", "hmnas"]}


def one(argv) -> None:
    """In the child: the search, each iteration timed; one JSON line on stdout."""
    from betanas_fast.search import Search, parse_config
    s = Search(parse_config(argv))
    times, original = [], s._iteration

    def timed():
        start = time.perf_counter()
        rec = original()
        times.append(time.perf_counter() - start)
        return rec
    s._iteration = timed
    result = s.run()
    history = [json.loads(ln) for ln in open(os.path.join(s.out, "history.jsonl"))]
    print(json.dumps({"iterations": len(times), "iteration_ms_mean": 1e3 * sum(times) / len(times),
                      "alpha_steps": sum(r["phase2_loss"] is not None for r in history),
                      "arch": result["arch"], "argmax_skips": result["skips"], "val_acc": result["val_acc"],
                      "remaining_paths": [len(r) for r in history[-1]["remaining"]],
                      "stopped": result.get("stopped"),
                      "mflops": result["mflops"], "mixture_memory": s.mixture_memory,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--warmup-epochs", type=int, default=1, help="(pdarts: before its first stage ends)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        return one(args.one)
    load_before = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        for name, flags in RUNS.items():
            search = [*flags, "--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs), "--seed",
                      str(args.seed), "--threads", str(args.threads), "--out", os.path.join(work, name),
                      "--no-progress", "--no-plots", "--no-tensorboard"]
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one", *search],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
            rec = json.loads(out.strip().splitlines()[-1])
            runs[name] = rec
            print(f"{name}: {rec['iteration_ms_mean']:.0f} ms per iteration, peak RSS {rec['peak_rss_mib']:.0f} MiB, "
                  f"identity argmax in {rec['argmax_skips']} blocks, val {rec['val_acc']:.4f}", flush=True)
    from mixture_oracle import CHECKS, check
    checks = {}
    with tempfile.TemporaryDirectory() as work:
        for i, name in enumerate(CHECKS):
            r = check(name, pathlib.Path(work) / str(i))
            checks[name] = {"float64_error": r["error"], "oracle_largest": r["scale"]}
        checks["darts first order"]["float32_error"] = check("darts first order", pathlib.Path(work) / "f32",
                                                             dtype=torch.float32)["error"]
    data = {"settings": {"epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "seed": args.seed,
                         "threads": args.threads, "space": "demo", "data": "digits"},
            "runs": runs, "gradient_checks": checks,
            "load_average": {"before": [round(v, 2) for v in load_before],
                             "after": [round(v, 2) for v in os.getloadavg()]}}
    command = " ".join(["python benchmarks/mixture_demo.py", *(sys.argv[1:] if argv is None else argv)])
    return write_results(args.out, command, data)


if __name__ == "__main__":
    main()
