"""Where each strategy ends when nothing can be learned: the spread of the final argmax over seeds on permuted labels
with the cost term off, with its positive control; writes benchmarks/results/strategy_null.json.

    python benchmarks/strategy_null.py [--seeds 5] [--epochs 10] [--warmup-epochs 2] [--jobs 2] [--runs-dir DIR]

Three conditions, every strategy, the same seeds and a shortened demo schedule:
- `null`: the digits' labels permuted in every split (nothing is learnable), no cost pressure (β = 0; fbnet's
  b = 0, its loss then CE·a). A strategy whose argmax still agrees across seeds chooses by something other than
  the data (the DARTS family's pull toward the identity path, a parameter-rich path, the order of the candidates);
- `cost` (the positive control): the same permuted labels with the cost term on (β = 10x the demo's; fbnet's own
  b): one pressure common to every seed, which the agreement measure must register, or it could not fail;
- `true`: the true labels, β = 0: what the data alone make the seeds agree on.
Per strategy and condition: each block's modal choice and its share of the seeds, the mean over blocks of the
fraction of seed pairs choosing alike (chance: the mean of 1/M over the blocks, M a block's candidates), the
identity path's share of the skip-legal blocks, and for pdarts the paths dropped beyond what its schedule forces.
Each search is stored as <runs-dir>/<strategy>_<condition>_<seed>.json when it ends and reused from there, so an
interrupted run can be continued.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "strategy_null.json")
STRATEGIES = ("betanas", "darts", "fbnet", "pdarts", "dartsplus", "hmnas")
CONDITIONS = ("null", "cost", "true")
CONTROL_BETA = 0.5  # the positive control's cost weight per MFLOP: 10x the demo's


def search(out: str, strategy: str, condition: str, seed: int, epochs: int, warmup: int) -> dict:
    """One search of `strategy` under `condition`; what it chose and how."""
    from betanas_fast.search import Search, SearchConfig
    cost_on = condition == "cost"
    cfg = SearchConfig(out=out, strategy=strategy, seed=seed, epochs=epochs, warmup_epochs=warmup, threads=1,
                       progress=False, plots=False, tensorboard=False,
                       **({"beta": CONTROL_BETA} if cost_on else {"beta": 0.0, "fbnet_b": 0.0}))
    start = time.time()
    s = Search(cfg)
    if condition in ("null", "cost"):
        g = torch.Generator().manual_seed(100 + seed)
        for split in (s.data.train, s.data.heldout, s.data.val):
            split.labels = split.labels[torch.randperm(len(split.labels), generator=g)]
    res = s.run()
    allowed = torch.tensor(s.space.allowed_mask())
    forced = None
    if strategy == "pdarts":  # the schedule's drops: each stage end cuts every block to its keep
        left, forced = allowed.sum(1), 0
        for keep in s.cfg.pdarts_keep:
            forced += int((left - left.clamp(max=keep)).sum())
            left = left.clamp(max=keep)
    return {"strategy": strategy, "condition": condition, "seed": seed, "choices": res["choices"],
            "skips": res["skips"], "drops": len(s.state.drops), "forced_drops": forced,
            "stopped": res.get("stopped"), "val_acc": res["val_acc"], "mflops": res["mflops"],
            "candidates_per_block": allowed.sum(1).tolist(), "skip_column": s.space.index_of("skip"),
            "skip_legal": allowed[:, s.space.index_of("skip")].tolist(),
            "seconds": round(time.time() - start, 1)}


def one(args) -> dict:
    runs_dir, strategy, condition, seed, epochs, warmup = args
    path = os.path.join(runs_dir, f"{strategy}_{condition}_{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        rec = search(os.path.join(out, "run"), strategy, condition, seed, epochs, warmup)
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)
    print(f"{strategy} {condition} seed {seed}: {rec['choices']} ({rec['seconds']} s)", flush=True)
    return rec


def spread(runs: list) -> dict:
    """The agreement of the seeds' final choices, block by block, against uniform chance."""
    choices = torch.tensor([r["choices"] for r in runs])  # [seeds, blocks]
    m = torch.tensor(runs[0]["candidates_per_block"], dtype=torch.float64)
    pairs = list(itertools.combinations(range(len(runs)), 2))
    per_block = [sum(int(choices[i, l] == choices[j, l]) for i, j in pairs) / len(pairs)
                 for l in range(choices.shape[1])]
    modal = [max(choices[:, l].tolist().count(c) for c in set(choices[:, l].tolist())) / len(runs)
             for l in range(choices.shape[1])]
    legal = torch.tensor(runs[0]["skip_legal"])
    out = {"seeds": [r["seed"] for r in runs], "choices": choices.tolist(),
           "pair_agreement": round(sum(per_block) / len(per_block), 4), "pair_agreement_per_block": per_block,
           "chance": round(float((1 / m).mean()), 4), "modal_share_per_block": modal,
           "mean_val_acc": round(sum(r["val_acc"] for r in runs) / len(runs), 4),
           "mean_mflops": round(sum(r["mflops"] for r in runs) / len(runs), 4)}
    if legal.any():
        picks = [int(choices[i, l]) for i in range(len(runs)) for l in legal.nonzero().flatten().tolist()]
        out["identity_share_of_skip_legal"] = round(sum(p == runs[0]["skip_column"] for p in picks) / len(picks), 4)
        out["identity_chance"] = round(float((1 / m[legal]).mean()), 4)
    if runs[0]["forced_drops"] is not None:
        out["drops_beyond_schedule"] = [r["drops"] - r["forced_drops"] for r in runs]
    stops = [r["stopped"] for r in runs if r["stopped"]]
    if stops:
        out["stopped"] = [{"seed": r["seed"], "epoch": r["stopped"]["epoch"], "reason": r["stopped"]["reason"]}
                          for r in runs if r["stopped"]]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--runs-dir", default=None, help="where each finished search is kept (default: a temporary one)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    from betanas_fast.runs.provenance import write_results
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs_dir or tmp
        os.makedirs(runs_dir, exist_ok=True)
        jobs = [(runs_dir, s, c, seed, args.epochs, args.warmup_epochs)
                for seed in range(args.seeds) for c in CONDITIONS for s in args.strategies]
        with ProcessPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(one, jobs))
    table = {s: {c: spread([r for r in runs if r["strategy"] == s and r["condition"] == c]) for c in CONDITIONS}
             for s in args.strategies}
    data = {"settings": {"control_beta": CONTROL_BETA, "seeds": args.seeds, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                         "space": "demo", "data": "digits", "threads_per_search": 1, "jobs": args.jobs},
            "strategies": table,
            "seconds": {s: round(sum(r["seconds"] for r in runs if r["strategy"] == s), 1) for s in args.strategies}}
    given = list(sys.argv[1:] if argv is None else argv)
    if "--runs-dir" in given:  # where the finished searches were kept changes no number (and names a local folder)
        i = given.index("--runs-dir")
        del given[i:i + 2]
    command = " ".join(["python benchmarks/strategy_null.py", *given])
    return write_results(args.out, command, data)


if __name__ == "__main__":
    main()
