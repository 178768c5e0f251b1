"""`python -m betanas_fast.study seeds` — the paper's Fig. 6 (§4.3.2): searched against random architectures.

N searches with seeds seed .. seed+N-1 (one set of search flags), and N distinct random architectures of
the same space whose MACs lie within ±2 % of the searched ones' median (uniform rejection sampling from a
seeded generator; the tolerance actually reached is reported). All 2N are retrained from scratch by
`python -m betanas_fast.train` with the same recipe, flags and seed, and scored on images no search loaded:
on the digits their fixed test split (300 images; `--score-split test`), with --data val/ or its carve-out.
Reported: per architecture its MACs, params and final top-1 on those images (and the best epoch's, an
optimistic figure: the epoch is chosen on them), per group mean ± std (sample std), and a one-sided
test of "searched > random": Mann–Whitney U (exact permutation p over every relabelling, mid-ranks for ties)
and a permutation test on the mean difference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List, Optional

import numpy as np
import torch

from .. import cost as cost_model
from ..runs.options import option
from ..space import sample_within_budget
from .. import stats
from . import groundtruth
from ..runs import files
from .common import (StudyOptions, StudyRun, arch_file, read_history, run_space, same_data, search_config,
                     short, train_config, write_json)

NAME = "seeds"
SAMPLER_SEED_OFFSET = 7919  # the random architectures' generator: seed + this, apart from every run's own


@dataclass
class SeedsConfig(StudyOptions):
    seeds: int = option(5, "searches (seeds seed .. seed+N-1) and as many random architectures (the paper: 8)")
    tolerance: float = option(0.02, "the random architectures' MACs lie within this fraction of the searched "
                                    "ones' median")
    train_flags: str = option("--epochs 20", "flags of `python -m betanas_fast.train` for every retraining, as one "
                                             "string: the same recipe and seed for all 2N nets, each scored on the "
                                             "digits' test split (default: \"--epochs 20\", the demo recipe cut to "
                                             "20 epochs)")
    groundtruth: Optional[str] = option(None, "a ground-truth table of the same space and recipe (`study "
                                              "groundtruth`): each net's percentile among the table's architectures "
                                              "within ±20 % of its MFLOPs is reported", type=str)

    analysis_only = ("groundtruth",)


def sample_matched(space, count: int, median_mflops: float, tolerance: float, seed: int) -> List[List[int]]:
    """`count` distinct uniformly random architectures of `space` with MFLOPs within ±tolerance of the median."""
    allowed = torch.tensor(space.allowed_mask())
    generator = torch.Generator().manual_seed(seed)
    low, high = median_mflops * (1 - tolerance), median_mflops * (1 + tolerance)

    def mflops(a):
        return cost_model.arch_cost(space, a).mflops

    archs, seen = [], set()
    for _ in range(100 * count):
        if len(archs) == count:
            break
        arch = sample_within_budget(allowed, generator, mflops, high, tries=200_000, floor=low)
        if tuple(arch) not in seen:
            seen.add(tuple(arch))
            archs.append(arch)
    if len(archs) < count:
        raise RuntimeError(f"found only {len(archs)} distinct architectures within ±{tolerance:.1%} of "
                           f"{median_mflops:.4f} MFLOPs")
    return archs


def trained(run_dir: str, split: str) -> dict:
    """A finished retraining's final and best top-1 on its scored split and its curve (from its history, which
    a run continued after its last epoch's checkpoint still holds whole)."""
    history = [{"epoch": h["epoch"], "top1": h[f"{split}_top1"]} for h in read_history(run_dir)]
    return {"top1": history[-1]["top1"], "best_top1": max(h["top1"] for h in history), "history": history}


def _percentile(row: dict) -> str:
    g = row.get("groundtruth_percentile")
    if g is None:
        return ""
    if g["percentile"] is None:
        return f"  (no table architecture within ±{g['band']:.0%} MFLOPs)"
    return f"  ({g['percentile']:.0f}th percentile of {g['neighbours']} table nets at ±{g['band']:.0%} MFLOPs)"


def format_table(result: dict) -> str:
    names = result["candidates"]
    scoring = result["scoring"]
    rows = [f"seeds study: {result['seeds']} searched and {result['seeds']} random architectures, all retrained with "
            f"the same recipe (top-1 on the {scoring['images']} images of the {scoring['split']} split after the "
            f"last epoch; best epoch in brackets)",
            f"{'group':<9} {'#':>2} {'seed':>4} {'MFLOPs':>8} {'params':>8} {'top-1':>7} {'(best)':>8}  architecture"]
    for group in ("searched", "random"):
        for i, r in enumerate(result[group]):
            seed = "-" if r.get("search_seed") is None else str(r["search_seed"])
            rows.append(f"{group:<9} {i:>2} {seed:>4} {r['mflops']:>8.4f} {r['params']:>8d} {r['top1']:>7.4f} "
                        f"{'(' + format(r['best_top1'], '.4f') + ')':>8}  "
                        f"{' '.join(short(names[m]) for m in r['choices'])}" + _percentile(r))
    for group in ("searched", "random"):
        s = result["summary"][group]
        rows.append(f"{group:<9} mean ± std: top-1 {s['top1_mean']:.4f} ± {s['top1_std']:.4f} (best epoch "
                    f"{s['best_top1_mean']:.4f} ± {s['best_top1_std']:.4f}), MFLOPs {s['mflops_mean']:.4f} ± "
                    f"{s['mflops_std']:.4f}")
    t, m = result["tests"], result["matching"]
    rows.append(f"one-sided test of \"searched > random\" (final top-1): Mann–Whitney U = "
                f"{t['mann_whitney']['statistic']:g} of {result['seeds'] ** 2}, p = {t['mann_whitney']['p_value']:.4f} ({t['mann_whitney']['method']}); "
                f"permutation test on the mean difference ({t['permutation']['statistic']:+.4f}): "
                f"p = {t['permutation']['p_value']:.4f} ({t['permutation']['method']})")
    rows.append(f"random architectures: MACs within ±{m['tolerance']:.1%} of the searched median "
                f"{m['median_mflops']:.4f} MFLOPs asked; reached ±{m['reached']:.2%} (largest |MACs/median - 1|); "
                f"the searched ones span {m['searched_min_mflops']:.4f}-{m['searched_max_mflops']:.4f} MFLOPs")
    return "\n".join(rows)


def run(cfg: SeedsConfig) -> dict:
    if cfg.seeds < 2:
        raise ValueError(f"--seeds must be >= 2 (a test needs two samples per group), got {cfg.seeds}")
    if not 0 < cfg.tolerance < 1:
        raise ValueError(f"--tolerance must be in (0, 1), got {cfg.tolerance}")
    study = StudyRun(NAME, cfg)
    base_search = search_config(cfg.search_flags, ("seed", "out", "resume"))
    base_train = train_config(cfg.train_flags, ("arch", "out", "resume"))
    base_train = same_data(base_search, base_train)
    table = None
    if cfg.groundtruth:
        table = groundtruth.load_table(cfg.groundtruth)
    split = base_train.score_split
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    searches = [study.subrun(f"search-{s}", "search", replace(base_search, seed=s)) for s in seeds]
    study.start({"search": base_search.to_dict(), "train": base_train.to_dict()})
    study.run(searches)

    # the random architectures, matched to the searched ones' median MACs
    space = run_space(searches[0].out)
    if table is not None and not groundtruth.same_space(table["space_config"], space.config.to_dict()):
        raise ValueError(f"the ground-truth table is of another space ({table['space']}) than the searches'")
    searched = [files.read_arch(s.out)[2] for s in searches]
    median = float(np.median([a["mflops"] for a in searched]))
    randoms = sample_matched(space, cfg.seeds, median, cfg.tolerance, cfg.seed + SAMPLER_SEED_OFFSET)
    random_files = [study.path("random-archs", f"random-{i}.json") for i in range(cfg.seeds)]
    if study.ranks.is_main:
        os.makedirs(study.path("random-archs"), exist_ok=True)
        for path, arch in zip(random_files, randoms):
            write_json(path, arch_file(space, arch, f"random, MACs within ±{cfg.tolerance:g} of {median:.6f} MFLOPs"))
    study.ranks.barrier()

    trainings = ([study.subrun(f"train-searched-{s}", "train", replace(base_train, arch=[search.out]))
                  for s, search in zip(seeds, searches)]
                 + [study.subrun(f"train-random-{i}", "train", replace(base_train, arch=[path]))
                    for i, path in enumerate(random_files)])
    study.run(trainings)

    rows = {"searched": [], "random": []}
    for s, a, t in zip(seeds, searched, trainings[:cfg.seeds]):
        rows["searched"].append({"search_seed": s, "arch": a["arch"], "choices": a["choices"], "mflops": a["mflops"],
                                 "params": a["params"], "run": os.path.relpath(t.out, study.out),
                                 **trained(t.out, split)})
    for arch, t in zip(randoms, trainings[cfg.seeds:]):
        net = cost_model.arch_cost(space, arch)
        rows["random"].append({"search_seed": None, "arch": space.arch_strings(arch), "choices": arch,
                               "mflops": net.mflops, "params": net.params, "run": os.path.relpath(t.out, study.out),
                               **trained(t.out, split)})
    summary = {}
    for group, rs in rows.items():
        top1, best, mflops = ([r[k] for r in rs] for k in ("top1", "best_top1", "mflops"))
        (tm, ts), (bm, bs), (mm, ms) = stats.mean_std(top1), stats.mean_std(best), stats.mean_std(mflops)
        summary[group] = {"top1_mean": tm, "top1_std": ts, "best_top1_mean": bm, "best_top1_std": bs,
                          "mflops_mean": mm, "mflops_std": ms}
    a, b = [r["top1"] for r in rows["searched"]], [r["top1"] for r in rows["random"]]
    scored = {files.read_result(t.out)["scored_images"] for t in trainings}
    if len(scored) != 1:
        raise RuntimeError(f"the retrainings were scored on different numbers of images: {sorted(scored)}")
    result = {"seeds": cfg.seeds, "search_seeds": seeds, "train_seed": base_train.seed,
              "candidates": space.candidate_names, **rows, "summary": summary,
              "scoring": {"split": split, "images": scored.pop()},
              "tests": {"alternative": f"searched > random (final {split} top-1)",
                        "mann_whitney": stats.mann_whitney_greater(a, b, seed=cfg.seed).to_dict(),
                        "permutation": stats.permutation_greater(a, b, seed=cfg.seed).to_dict()},
              "matching": {"tolerance": cfg.tolerance, "median_mflops": median,
                           "reached": max(abs(r["mflops"] / median - 1) for r in rows["random"]),
                           "searched_min_mflops": min(r["mflops"] for r in rows["searched"]),
                           "searched_max_mflops": max(r["mflops"] for r in rows["searched"]),
                           "sampler_seed": cfg.seed + SAMPLER_SEED_OFFSET}}
    if table is not None:  # each net placed among the table's nets of about its cost
        for r in rows["searched"] + rows["random"]:
            r["groundtruth_percentile"] = groundtruth.percentile_at_flops(table, r["mflops"], r["top1"])
        recipe = ("recipe", "epochs", "batch_size", "lr", "lr_batch", "dataset", "score_split", "seed")
        result["groundtruth"] = {"table": os.path.abspath(cfg.groundtruth), "same_recipe": all(
            table["train"].get(k) == base_train.to_dict().get(k) for k in recipe)}

    def figures(out: str) -> List[str]:
        from . import figures as fig
        path = os.path.join(out, "seeds.png")
        fig.seeds_curves(rows, path, split)
        return [path]

    return study.finish(result, format_table(result), figures)
