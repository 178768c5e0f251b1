"""`python -m betanas_fast.study balance` — the paper's Fig. 5 (§4.3.1).

The same supernet searched with `betanas` and `proxyless` (same seed, data and schedule: one set of search
flags for both); per choice block, α over time and the Phase-1 training counts of the paths still
remaining at the end. Per strategy, over the blocks: the mean of max/mean count, the worst max/min, and the
top path's share of its block's steps against the fair share 1/M' (M' paths remaining), over the whole
run and from the first α step on (after the warm-up, where the strategies differ). Two claims are checked
and reported whichever way they go: betanas keeps every remaining path within ±20 % of its block's mean
count; proxyless gives its top path at least 2x its fair share in at least half of the blocks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List, Optional

import numpy as np

from ..runs.options import option
from ..runs import files
from .common import StudyOptions, StudyRun, read_history, run_space, search_config

NAME = "balance"


@dataclass
class BalanceConfig(StudyOptions):
    strategies: List[str] = option(["betanas", "proxyless"], "the strategies compared, each one search with the "
                                                             "same flags and seed", type=str, nargs="+")
    blocks: Optional[List[int]] = option(None, "the choice blocks drawn in balance.png (default: the first two, as "
                                               "the paper's figure)", type=int, nargs="+")
    tolerance: float = option(0.2, "claim checked for betanas: every remaining path's Phase-1 count within this "
                                   "fraction of its block's mean")
    fair_share_factor: float = option(2.0, "claim checked for proxyless: the top path's count at least this multiple "
                                           "of its fair share (1/remaining paths) in at least half of the blocks")

    analysis_only = ("blocks", "tolerance", "fair_share_factor")


def block_balance(counts: np.ndarray) -> dict:
    """Balance of one block's Phase-1 counts over its remaining paths."""
    mean = float(counts.mean())
    top, low = float(counts.max()), float(counts.min())
    return {"counts": counts.astype(int).tolist(), "mean": mean,
            "max_over_mean": top / mean if mean else None,
            "max_over_min": top / low if low else None,  # None: a remaining path never trained
            "largest_deviation": float(np.abs(counts / mean - 1).max()) if mean else None,
            "top_share": top / float(counts.sum()) if mean else None, "fair_share": 1.0 / len(counts)}


def summarize(blocks: List[dict], factor: float) -> dict:
    def values(key):
        return [b[key] for b in blocks]
    ratios = [b["max_over_min"] for b in blocks]
    return {"mean_max_over_mean": float(np.mean(values("max_over_mean"))),
            "worst_max_over_min": None if None in ratios else float(max(ratios)),
            "mean_top_share": float(np.mean(values("top_share"))),
            "mean_fair_share": float(np.mean(values("fair_share"))),
            "largest_deviation": float(max(values("largest_deviation"))),
            "blocks_top_at_least_factor_fair": int(sum(r >= factor for r in values("max_over_mean"))),
            "blocks": len(blocks)}


def analyse(run_dir: str, factor: float) -> dict:
    """One search's α history and Phase-1 counts among the paths remaining at its end."""
    history, summary = read_history(run_dir), files.read_arch(run_dir)[2]
    names = summary["candidates"]
    last = history[-1]
    remaining = [[names.index(n) for n in row] for row in last["remaining"]]
    final = np.array(last["phase1_counts"], dtype=np.float64)
    first_alpha = next((i for i, r in enumerate(history) if r["phase2_loss"] is not None), None)
    before = np.array(history[first_alpha - 1]["phase1_counts"], dtype=np.float64) if first_alpha else \
        np.zeros_like(final)
    windows = {"whole_run": final}
    if first_alpha is not None:
        windows["after_warmup"] = final - before
    result = {"arch": summary["arch"], "val_acc": summary["val_acc"], "mflops": summary["mflops"],
              "remaining": last["remaining"], "paths_remaining": sum(len(r) for r in remaining),
              "paths_dropped": sum(len(b["dropped"]) for b in summary["blocks"]),
              "first_alpha_step": history[first_alpha]["step"] if first_alpha is not None else None,
              "iterations": last["step"], "phase1_steps": last["phase1_steps"]}
    for window, counts in windows.items():
        blocks = [block_balance(counts[l, rem]) for l, rem in enumerate(remaining)]
        result[window] = {"summary": summarize(blocks, factor), "per_block": blocks}
    return result


def check_claims(per_strategy: dict, tolerance: float, factor: float) -> List[dict]:
    """The paper's two claims about the whole-run counts, each with the numbers that decide it."""
    claims = []
    if "betanas" in per_strategy:
        s = per_strategy["betanas"]["whole_run"]["summary"]
        claims.append({"claim": f"betanas trains every remaining path within ±{tolerance:.0%} of its block's mean count",
                       "holds": s["largest_deviation"] <= tolerance,
                       "evidence": f"largest deviation from a block's mean: {s['largest_deviation']:.1%}"})
    if "proxyless" in per_strategy:
        s = per_strategy["proxyless"]["whole_run"]["summary"]
        n, k = s["blocks"], s["blocks_top_at_least_factor_fair"]
        claims.append({"claim": f"proxyless gives its top path >= {factor:g}x its fair share in at least half of the "
                                f"blocks",
                       "holds": k >= n / 2,
                       "evidence": f"{k} of {n} blocks; mean top/fair {s['mean_max_over_mean']:.2f}"})
    return claims


def format_table(result: dict) -> str:
    rows = ["balance study: Phase-1 training counts of the paths remaining at the end of each search "
            "(max/mean = the top path's count against its fair share)"]
    header = (f"{'strategy':<10} {'window':<13} {'mean max/mean':>13} {'worst max/min':>13} {'top share':>9} "
              f"{'fair':>6} {'blocks >= ' + format(result['fair_share_factor'], 'g') + 'x fair':>16} {'max dev':>8}")
    rows.append(header)
    for name, r in result["strategies"].items():
        for window in ("whole_run", "after_warmup"):
            if window not in r:
                continue
            s = r[window]["summary"]
            worst = "inf" if s["worst_max_over_min"] is None else f"{s['worst_max_over_min']:.3f}"
            rows.append(f"{name:<10} {window.replace('_', ' '):<13} {s['mean_max_over_mean']:>13.3f} {worst:>13} "
                        f"{s['mean_top_share']:>9.3f} {s['mean_fair_share']:>6.3f} "
                        f"{str(s['blocks_top_at_least_factor_fair']) + ' of ' + str(s['blocks']):>16} "
                        f"{s['largest_deviation']:>8.1%}")
    rows.append("")
    for name, r in result["strategies"].items():
        acc = "-" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        rows.append(f"{name}: {r['paths_remaining']} paths remaining ({r['paths_dropped']} dropped), searched net "
                    f"{r['mflops']:.3f} MFLOPs, validation {acc} (inherited weights)")
    for c in result["claims"]:
        rows.append(f"claim: {c['claim']}: {'HOLDS' if c['holds'] else 'DOES NOT HOLD'} ({c['evidence']})")
    return "\n".join(rows)


def run(cfg: BalanceConfig) -> dict:
    from ..search.strategies import STRATEGIES
    if len(set(cfg.strategies)) != len(cfg.strategies) or len(cfg.strategies) < 1:
        raise ValueError(f"--strategies must name distinct strategies, got {cfg.strategies}")
    for s in cfg.strategies:
        if s not in STRATEGIES or not STRATEGIES[s].trains_weights:
            raise ValueError(f"--strategies: {s!r} is not a strategy that trains the supernet "
                             f"({[k for k, v in STRATEGIES.items() if v.trains_weights]})")
    study = StudyRun(NAME, cfg)
    base = search_config(cfg.search_flags, ("strategy", "seed", "out", "resume"))
    subruns = [study.subrun(s, "search", replace(base, strategy=s, seed=cfg.seed)) for s in cfg.strategies]
    study.start({"search": base.to_dict()})
    study.run(subruns)
    space = run_space(subruns[0].out)
    blocks = cfg.blocks or list(range(min(2, space.num_blocks)))
    if not all(0 <= b < space.num_blocks for b in blocks):
        raise ValueError(f"--blocks {blocks}: the space has choice blocks 0-{space.num_blocks - 1}")
    per_strategy = {s.name: analyse(s.out, cfg.fair_share_factor) for s in subruns}
    result = {"seed": cfg.seed, "fair_share_factor": cfg.fair_share_factor, "tolerance": cfg.tolerance,
              "runs": {s.name: os.path.relpath(s.out, study.out) for s in subruns},
              "strategies": per_strategy,
              "claims": check_claims(per_strategy, cfg.tolerance, cfg.fair_share_factor)}

    def figures(out: str) -> List[str]:
        from ..plots import plot_balance
        from . import figures as fig
        histories = {s.name: read_history(s.out) for s in subruns}
        paths = [os.path.join(out, "balance.png"), os.path.join(out, "balance_counts.png")]
        plot_balance(space, histories, paths[0], blocks=blocks)
        fig.balance_counts(space, histories, cfg.fair_share_factor, cfg.tolerance, paths[1])
        return paths

    return study.finish(result, format_table(result), figures)
