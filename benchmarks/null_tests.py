"""Null tests of the drop rule, with their positive controls, over more seeds than the test suite runs;
writes benchmarks/results/null_tests.json.

    python benchmarks/null_tests.py [--jobs 2] [--runs-dir DIR]

Three parts, computed by the functions `tests/test_noise_floor.py` tests with:
- `noise_walk`: the demo's real number of α steps (Search(SearchConfig()).alpha_steps), its arch lr, the
  walk lr·sqrt(steps) that noise alone moves α by, the drop threshold and walk / |threshold| (the config
  check warns above 1/2);
- `alpha_pipeline`: zero-mean gate gradients through ArchState.step and the drop at the demo's defaults and
  α steps (null), and the same with a mean shift planted on three paths (positive control): the dropped
  (block, path) pairs per seed;
- `whole_search`: demo searches with β = 0 on permuted labels (null) and on the true labels (positive
  control), drops per run; and the demo as it ships (its β) on the true labels, to compare which paths the
  cost term changes. Each search is stored as <runs-dir>/<labels>_<seed>.json when it ends and reused
  from there when the script is run again (a search takes minutes), so an interrupted run can be continued.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402

from betanas_fast.runs.provenance import write_results  # noqa: E402
from betanas_fast.search import Search, SearchConfig  # noqa: E402
from betanas_fast.search.config import alpha_walk  # noqa: E402
from test_noise_floor import (NULL_MAX_DROPS, NULL_SEEDS, PLANTED, PLANTED_SHIFT, TRUE_MIN_DROPS,  # noqa: E402
                              TRUE_SEEDS, drops_under_noise, whole_search)

RESULTS = os.path.join(HERE, "results", "null_tests.json")
PIPELINE_SEEDS = range(20)
COST_SEEDS = (0,)
DEMO_BETA = SearchConfig().beta


def demo(out: str) -> Search:
    return Search(SearchConfig(out=out, progress=False, plots=False, tensorboard=False, threads=1))


def noise_walk(s: Search) -> dict:
    cfg = s.cfg
    walk = alpha_walk(cfg, s.alpha_steps)
    return {"epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs, "phase_ratio": cfg.phase_ratio,
            "train_images": len(s.data.train), "batch_size": cfg.batch_size,
            "batches_per_epoch": len(s.data.train) // cfg.batch_size, "alpha_steps": s.alpha_steps,
            "arch_lr": cfg.arch_lr, "walk_lr_sqrt_steps": round(walk, 4), "drop_threshold": cfg.drop_threshold,
            "walk_over_abs_threshold": round(walk / abs(cfg.drop_threshold), 4),
            "check_warns_above": 0.5}


def alpha_pipeline(s: Search) -> dict:
    torch.set_num_threads(1)
    allowed = s.space.allowed_mask()
    null = [drops_under_noise(s.cfg, s.alpha_steps, allowed, seed) for seed in PIPELINE_SEEDS]
    planted = [drops_under_noise(s.cfg, s.alpha_steps, allowed, seed, PLANTED, PLANTED_SHIFT)
               for seed in PIPELINE_SEEDS]
    return {"alpha_steps": s.alpha_steps, "paths": int(sum(map(sum, allowed))), "seeds": list(PIPELINE_SEEDS),
            "null_dropped": null, "null_drops_per_seed": [len(d) for d in null],
            "planted_paths": [list(p) for p in PLANTED], "planted_shift_in_noise_std": PLANTED_SHIFT,
            "planted_dropped": planted,
            "planted_all_caught": [set(PLANTED) <= set(d) for d in planted],
            "planted_extra_drops": [len(set(d) - set(PLANTED)) for d in planted]}


def one_search(runs_dir: str, labels: str, seed: int, beta: float = 0.0) -> dict:
    path = os.path.join(runs_dir, f"{labels}_{seed}.json" if beta == 0 else f"{labels}_beta{beta}_{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t = time.time()
    with tempfile.TemporaryDirectory() as out:
        r = whole_search(os.path.join(out, "run"), seed, labels, threads=1, beta=beta)
    r["seconds"] = round(time.time() - t, 1)
    with open(path, "w") as f:
        json.dump(r, f)
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1, help="searches run at once, one thread each")
    p.add_argument("--runs-dir", default=os.path.join("runs", "null_tests"),
                   help="where each search's result is stored and reused from")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    os.makedirs(args.runs_dir, exist_ok=True)
    todo = ([("random", seed, 0.0) for seed in NULL_SEEDS] + [("true", seed, 0.0) for seed in TRUE_SEEDS]
            + [("true", seed, DEMO_BETA) for seed in COST_SEEDS])
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one_search, [args.runs_dir] * len(todo), *zip(*todo)))
    with tempfile.TemporaryDirectory() as out:
        s = demo(os.path.join(out, "run"))
        walk, pipeline = noise_walk(s), alpha_pipeline(s)
    null = [r for r in runs if r["labels"] == "random"]
    true = [r for r in runs if r["labels"] == "true" and r["beta"] == 0]
    cost = [r for r in runs if r["beta"] != 0]
    data = {
        "noise_walk": walk,
        "alpha_pipeline": pipeline,
        "whole_search": {
            "what": "the demo search with beta = 0 (no cost term), on permuted labels (null) and on the true "
                    "labels (positive control), same seeds and schedule (the demo defaults)",
            "null_drops_per_seed": {r["seed"]: r["drops"] for r in null},
            "true_drops_per_seed": {r["seed"]: r["drops"] for r in true},
            "test_bounds": {"null_max_drops": NULL_MAX_DROPS, "true_min_drops": TRUE_MIN_DROPS},
            "runs": [r for r in runs if r["beta"] == 0],
        },
        "demo_with_cost_term": {
            "what": f"the demo search as it ships (beta = {DEMO_BETA} per MFLOP) on the true labels, to compare "
                    f"its drops with the beta = 0 run of the same seed",
            "drops_per_seed": {r["seed"]: r["drops"] for r in cost},
            "runs": cost,
        },
    }
    for r in cost:   # which of its drops the β = 0 run of the same seed made too
        same = next(t for t in true if t["seed"] == r["seed"])
        ops = lambda run: {(b, d.split("@")[0]) for b, ds in run["dropped"].items() for d in ds}  # noqa: E731
        r["also_dropped_at_beta_0"] = sorted(f"{b}:{op}" for b, op in ops(r) & ops(same))
        r["only_with_cost_term"] = sorted(f"{b}:{op}" for b, op in ops(r) - ops(same))
        r["only_at_beta_0"] = sorted(f"{b}:{op}" for b, op in ops(same) - ops(r))
    command = " ".join(["python benchmarks/null_tests.py", *(argv if argv is not None else sys.argv[1:])])
    doc = write_results(args.out, command, data)
    print(json.dumps({k: v for k, v in doc.items() if k != "whole_search"}, indent=1))
    print(json.dumps({k: v for k, v in data["whole_search"].items() if k != "runs"}, indent=1))
    return doc


if __name__ == "__main__":
    main()
