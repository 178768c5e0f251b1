"""`python -m betanas_fast.study compare` — the policies of the paper's Table 3 side by side under one budget.

Every strategy of `--strategies` searches with every seed seed .. seed+N-1, on the same data, supernet, cost and
schedule (`--search-flags`, the strategy and seed set by the study). Each search reports its wall time and its
path-epochs: epochs × the paths each choice block runs per weight step (1 for the single-path strategies, the
remaining candidates for the mixtures, which so do about 6x the work per step). Every searched net is retrained
from scratch by `python -m betanas_fast.train` with one recipe and seed (`--train-flags`) and scored on images no
search loaded (the digits' test split). Reported: per net its strategy, seed, MFLOPs, params and final top-1; per
strategy mean ± std of top-1, MFLOPs, search time and path-epochs; and one-sided tests of "betanas > S" for every
other strategy S (Mann–Whitney U, exact over the relabellings, and a permutation test on the mean difference),
with Holm's step-down adjustment over the family of comparisons. With N seeds no exact one-sided test of N against
N nets can give p below 1/C(2N, N) (0.05 for 3 seeds, 0.5 after Holm over 10 comparisons): the study reports that
floor, and a test with more power for the question "better than the field": betanas against the nets of every other
strategy pooled. The figure puts each net's top-1 against its
MFLOPs per strategy, over the ground-truth cloud when `--groundtruth` names a table of the same space and recipe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from .. import stats
from ..runs import files
from ..runs.options import option
from . import groundtruth
from .common import StudyOptions, StudyRun, read_history, run_space, same_data, search_config, short, train_config

NAME = "compare"
REFERENCE = "betanas"
# what every search of the study shares: the data, the space, the cost and its pressure
SAME_FOR_ALL = ("dataset", "data", "heldout", "val", "space", "stage_depths", "width_mult", "resolution", "candidates",
                "cost", "latency_table", "flops_target", "beta", "latency_target", "beta_latency")
DEFAULT_STRATEGIES = ["betanas", "proxyless", "spos", "random", "darts", "fbnet", "pdarts", "dartsplus", "hmnas",
                      "gdas", "enas"]


@dataclass
class CompareConfig(StudyOptions):
    strategies: List[str] = option(list(DEFAULT_STRATEGIES), "the strategies compared (betanas among them: every "
                                                             "other is tested against it)", type=str, nargs="+")
    seeds: int = option(3, "searches per strategy (seeds seed .. seed+N-1)")
    strategy_flags: List[str] = option([], "more search flags for one strategy, as STRATEGY=FLAGS, e.g. "
                                           "\"darts=--epochs 15 --warmup-epochs 4\": to compare at equal wall time "
                                           "or equal path-epochs (the mixtures run ~6.5 paths per block per step)",
                                       type=str, nargs="+")
    train_flags: str = option("--epochs 20", "flags of `python -m betanas_fast.train` for every retraining, as one "
                                             "string: one recipe and seed for every net (default: \"--epochs 20\", "
                                             "the demo recipe cut to 20 epochs)")
    groundtruth: Optional[str] = option(None, "a ground-truth table of the same space and recipe (`study "
                                              "groundtruth`): the figure draws its architectures beneath, and each "
                                              "net's percentile among those of about its MFLOPs is reported",
                                        type=str)

    analysis_only = ("groundtruth",)


def holm(p_values: List[float]) -> List[float]:
    """Holm's step-down adjustment of a family of p-values (strong control of the family-wise error rate): the
    i-th smallest is multiplied by (m − i), made monotone, capped at 1; returned in the input's order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def strategy_flags(entries: List[str], strategies: List[str]) -> Dict[str, str]:
    """--strategy-flags STRATEGY=FLAGS ... as {strategy: flags}."""
    out: Dict[str, str] = {}
    for entry in entries:
        name, sep, flags = entry.partition("=")
        if not sep or name not in strategies:
            raise ValueError(f"--strategy-flags {entry!r}: expected STRATEGY=FLAGS with STRATEGY one of {strategies}")
        if name in out:
            raise ValueError(f"--strategy-flags gives {name} twice")
        out[name] = flags
    return out


def path_epochs(search_dir: str, config: dict) -> dict:
    """What a search trained: the epochs it ran (an early stop ends sooner), the paths each block ran per weight
    step on average, and their product."""
    history = read_history(search_dir)
    if not history or not history[-1]["phase1_steps"]:
        return {"epochs": 0.0, "paths_per_step": 0.0, "path_epochs": 0.0}
    last = history[-1]
    blocks = len(last["phase1_counts"])
    per_step = sum(map(sum, last["phase1_counts"])) / (blocks * last["phase1_steps"])
    if config.get("path_sampling") == "per-sample":  # counted in samples: a step's samples share one batch's work
        per_step /= config["batch_size"]
    epochs = last["epoch"] + 1
    return {"epochs": epochs, "paths_per_step": round(per_step, 4), "path_epochs": round(epochs * per_step, 4)}


def format_table(result: dict) -> str:
    names = result["candidates"]
    scoring = result["scoring"]
    rows = [f"compare study: {len(result['strategies'])} strategies x {result['seeds']} seeds, every searched net "
            f"retrained with one recipe (top-1 on the {scoring['images']} images of the {scoring['split']} split)",
            f"{'strategy':<10} {'seed':>4} {'MFLOPs':>8} {'top-1':>7} {'search s':>9} {'path-ep':>8}  architecture"]
    for r in result["nets"]:
        rows.append(f"{r['strategy']:<10} {r['search_seed']:>4} {r['mflops']:>8.4f} {r['top1']:>7.4f} "
                    f"{r['search_seconds'] if r['search_seconds'] is not None else float('nan'):>9.1f} "
                    f"{r['path_epochs']:>8.2f}  {' '.join(short(names[m]) for m in r['choices'])}")
    rows.append(f"{'strategy':<10} {'top-1 mean ± std':>18} {'MFLOPs':>8} {'search s':>9} {'path-ep':>8}  "
                f"p(betanas > it): Mann–Whitney, Holm-adjusted")
    for s, g in result["summary"].items():
        t = result["tests"]["against"].get(s)
        test = "" if t is None else (f"U = {t['mann_whitney']['statistic']:g}, p = {t['mann_whitney']['p_value']:.4f}, "
                                     f"Holm p = {t['holm_p']:.4f}")
        rows.append(f"{s:<10} {g['top1_mean']:>9.4f} ± {g['top1_std']:<6.4f} {g['mflops_mean']:>8.4f} "
                    f"{g['search_seconds_mean']:>9.1f} {g['path_epochs_mean']:>8.2f}  {test}")
    tests = result["tests"]
    pooled = tests["pooled"]
    rows.append(f"betanas against the {pooled['nets']} nets of the other strategies pooled: Mann–Whitney "
                f"U = {pooled['mann_whitney']['statistic']:g}, p = {pooled['mann_whitney']['p_value']:.4f}; "
                f"permutation p = {pooled['permutation']['p_value']:.4f} (smallest attainable "
                f"{pooled['smallest_p']:.4f})")
    rows.append(f"note: {tests['power_note']}")
    return "\n".join(rows)


def run(cfg: CompareConfig) -> dict:
    from ..search.config import validate_config
    from ..search.strategies import STRATEGIES
    unknown = [s for s in cfg.strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; expected some of {tuple(STRATEGIES)}")
    if REFERENCE not in cfg.strategies or len(set(cfg.strategies)) < 2:
        raise ValueError(f"--strategies must hold {REFERENCE} and at least one other strategy, got {cfg.strategies}")
    if len(set(cfg.strategies)) != len(cfg.strategies):
        raise ValueError(f"--strategies names a strategy twice: {cfg.strategies}")
    extra = strategy_flags(cfg.strategy_flags, cfg.strategies)
    if cfg.seeds < 2:
        raise ValueError(f"--seeds must be >= 2 (a test needs two samples per strategy), got {cfg.seeds}")
    study = StudyRun(NAME, cfg)
    set_by_study = ("strategy", "seed", "out", "resume")
    base_search = search_config(cfg.search_flags, set_by_study)
    base_train = same_data(base_search, train_config(cfg.train_flags, ("arch", "out", "resume")))
    table = groundtruth.load_table(cfg.groundtruth) if cfg.groundtruth else None
    split = base_train.score_split
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    pairs = [(s, seed) for s in cfg.strategies for seed in seeds]
    bases = {s: search_config(f"{cfg.search_flags} {extra[s]}", set_by_study) if s in extra else base_search
             for s in cfg.strategies}
    for s in extra:  # one data set, supernet and cost for all: a strategy's own flags may change its schedule only
        differ = [f for f in SAME_FOR_ALL if getattr(bases[s], f) != getattr(base_search, f)]
        if differ:
            raise ValueError(f"--strategy-flags {s}: {', '.join(differ)} must be the same for every strategy")
    for s in cfg.strategies:  # a strategy's own checks (P-DARTS's stages against the warm-up...) before any sub-run
        try:
            validate_config(replace(bases[s], strategy=s))
        except ValueError as e:
            raise ValueError(f"--strategies {s}: {e}" + ("" if s in extra else f"; give it its own schedule with "
                                                                             f"--strategy-flags \"{s}=...\"")) from e
    searches = [study.subrun(f"search-{s}-{seed}", "search", replace(bases[s], strategy=s, seed=seed))
                for s, seed in pairs]
    study.start({"search": base_search.to_dict(), "train": base_train.to_dict(),
                 **({"search_per_strategy": {s: bases[s].to_dict() for s in extra}} if extra else {})})
    study.run(searches)
    space = run_space(searches[0].out)
    if table is not None and not groundtruth.same_space(table["space_config"], space.config.to_dict()):
        raise ValueError(f"the ground-truth table is of another space ({table['space']}) than the searches'")
    trainings = [study.subrun(f"train-{s}-{seed}", "train", replace(base_train, arch=[search.out]))
                 for (s, seed), search in zip(pairs, searches)]
    study.run(trainings)

    nets = []
    for (s, seed), search, training in zip(pairs, searches, trainings):
        arch = files.read_arch(search.out)[2]
        result = files.read_result(training.out)
        nets.append({"strategy": s, "search_seed": seed, "arch": arch["arch"], "choices": arch["choices"],
                     "mflops": arch["mflops"], "params": arch["params"], "skips": arch.get("skips"),
                     "stopped": arch.get("stopped"), "top1": result["last"][f"{split}_top1"],
                     "best_top1": result[f"best_{split}_top1"],
                     "search_seconds": (None if search.name in study.timing.get("continued", [])
                                        else study.timing.get(search.name)),
                     **path_epochs(search.out, files.read_config(search.out)),
                     "run": os.path.relpath(training.out, study.out)})
    summary: Dict[str, dict] = {}
    for s in cfg.strategies:
        rs = [r for r in nets if r["strategy"] == s]
        (tm, ts), (mm, ms) = stats.mean_std([r["top1"] for r in rs]), stats.mean_std([r["mflops"] for r in rs])
        timed = [r["search_seconds"] for r in rs if r["search_seconds"] is not None]
        summary[s] = {"top1_mean": tm, "top1_std": ts, "mflops_mean": mm, "mflops_std": ms,
                      "search_seconds_mean": sum(timed) / len(timed) if timed else float("nan"),
                      "searches_timed": len(timed),
                      "path_epochs_mean": sum(r["path_epochs"] for r in rs) / len(rs)}
    reference = [r["top1"] for r in nets if r["strategy"] == REFERENCE]
    others = [s for s in cfg.strategies if s != REFERENCE]
    against = {}
    for s in others:
        b = [r["top1"] for r in nets if r["strategy"] == s]
        against[s] = {"mann_whitney": stats.mann_whitney_greater(reference, b, seed=cfg.seed).to_dict(),
                      "permutation": stats.permutation_greater(reference, b, seed=cfg.seed).to_dict()}
    for s, p in zip(others, holm([against[s]["mann_whitney"]["p_value"] for s in others])):
        against[s]["holm_p"] = p
    pool = [r["top1"] for r in nets if r["strategy"] != REFERENCE]
    pooled = {"nets": len(pool), "smallest_p": stats.smallest_p(len(reference), len(pool)),
              "mann_whitney": stats.mann_whitney_greater(reference, pool, seed=cfg.seed).to_dict(),
              "permutation": stats.permutation_greater(reference, pool, seed=cfg.seed).to_dict()}
    floor = stats.smallest_p(len(reference), cfg.seeds)
    scored = {files.read_result(t.out)["scored_images"] for t in trainings}
    if len(scored) != 1:
        raise RuntimeError(f"the retrainings were scored on different numbers of images: {sorted(scored)}")
    result = {"strategies": list(cfg.strategies), "seeds": cfg.seeds, "search_seeds": seeds,
              "train_seed": base_train.seed, "candidates": space.candidate_names, "nets": nets, "summary": summary,
              "scoring": {"split": split, "images": scored.pop()},
              "tests": {"alternative": f"{REFERENCE} > S (final {split} top-1), one-sided, for each other strategy S",
                        "multiple_comparisons": f"Holm's step-down adjustment over the {len(others)} Mann–Whitney "
                                                f"p-values (family-wise error rate)",
                        "against": against,
                        "smallest_p": floor, "smallest_holm_p": min(1.0, len(others) * floor),
                        "power_note": f"an exact one-sided test of {len(reference)} against {cfg.seeds} nets cannot "
                                      f"give p below 1/C({len(reference) + cfg.seeds}, {len(reference)}) = "
                                      f"{floor:.4f}, nor Holm's adjustment over {len(others)} below "
                                      f"{min(1.0, len(others) * floor):.4f}: more seeds, or the pooled test",
                        "pooled": {"alternative": f"{REFERENCE} > a net of any other strategy (all their nets "
                                                  f"pooled), one-sided", **pooled}},
              "timing_note": "search_seconds are wall times on the machine that ran the study (timing.json; none for a "
                             "search continued after the study was killed, whose first part is unknown), with "
                             f"--jobs {cfg.jobs}: compare them within one study only"}
    if table is not None:
        for r in nets:
            r["groundtruth_percentile"] = groundtruth.percentile_at_flops(table, r["mflops"], r["top1"])

    def figures(out: str) -> List[str]:
        from . import figures as fig
        path = os.path.join(out, "compare.png")
        cloud = None if table is None else [(a["mflops"], a["top1_mean"]) for a in table["architectures"]
                                            if a["source"] == "sample"]
        fig.compare_scatter(nets, cfg.strategies, path, split, cloud)
        return [path]

    return study.finish(result, format_table(result), figures)
