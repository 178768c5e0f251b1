"""How fast a weight-sharing supernet learns the cluttered digits, against the number of candidates per block.

    python benchmarks/supernet_learning.py     # -> benchmarks/results/supernet_learning_mnist_cluttered.json

The same uniform single-path training (`--strategy spos`, `--preset mnist_cluttered`, seed 0) over the first
`--epochs` epochs with 1, 2, 6 and 7 candidates per block (the 7 of the preset; one candidate makes the supernet a
single network trained alone). Reported per run: the mean Phase-1 training accuracy of each epoch (the batches'
accuracy, on the path each batch trained). A supernet whose accuracy stays at chance while a single network's
rises is one that cannot tell paths apart yet: α should not be judged from it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from betanas_fast.runs.provenance import write_results

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "supernet_learning_mnist_cluttered.json")
CANDIDATES = {
    "1 (k3_e3)": ["mb_k3_e3"],
    "2 (k3_e3, k5_e3)": ["mb_k3_e3", "mb_k5_e3"],
    "6 (no skip)": ["mb_k3_e3", "mb_k3_e6", "mb_k5_e3", "mb_k5_e6", "mb_k7_e3", "mb_k7_e6"],
    "7 (the preset's)": None,
}


def run(candidates, epochs: int, out: str) -> list:
    cmd = [sys.executable, "-m", "betanas_fast.search", "--preset", "mnist_cluttered", "--strategy", "spos",
           "--epochs", str(epochs), "--spos-population", "2", "--spos-generations", "1", "--spos-parents", "1",
           "--no-progress", "--no-tensorboard", "--no-plots", "--threads", "1", "--out", out]
    if candidates:
        cmd += ["--candidates", *candidates]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    by_epoch = {}
    with open(os.path.join(out, "history.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            by_epoch.setdefault(r["epoch"], []).append(r["phase1_acc"])
    return [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cands) in enumerate(CANDIDATES.items()):
            rows[name] = run(cands, args.epochs, os.path.join(tmp, str(i)))
            print(name, " ".join(f"{a:.3f}" for a in rows[name]), flush=True)
    write_results(RESULTS, "python benchmarks/supernet_learning.py",
                  {"epochs": args.epochs, "schedule": "the preset's cosine lr over --epochs epochs, no α steps needed",
                   "phase1_accuracy_per_epoch": rows})


if __name__ == "__main__":
    main()
