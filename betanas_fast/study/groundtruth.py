"""`python -m betanas_fast.study groundtruth` — a ground-truth table: architectures trained alone, from scratch.

N architectures of one space, sampled from a seeded generator so that their MFLOPs spread evenly over the
space's range (a pool of uniformly random architectures, and for each of N evenly spaced MFLOPs values the
nearest one not yet taken), plus any searched architectures given (`--searched RUN ...`). Each is trained
`--train-seeds` times (train seeds seed .. seed+K-1) by `python -m betanas_fast.train` with one recipe and
scored on images no search loads (the embedded data set's test split). Reported per architecture: MACs,
params, the predicted latency when a table is given, the final top-1 of every training, their mean and
std. And what makes the table worth using as a ground truth (the calibration of a task):
- the spread: mean top-1 of the top decile of architectures minus that of the bottom decile;
- the noise floor: the pooled standard deviation of one architecture's top-1 over train seeds, and the
  mean absolute difference between two trainings of one architecture;
- the reliability: Kendall τ-b and Spearman ρ between the rankings that two train seeds give.
The supernets' ranking quality (`study ranking`) and the seeds study's percentiles are measured against it.

    python -m betanas_fast.study groundtruth --jobs 2       # the default table, on mnist-cluttered
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from typing import List, Optional

import numpy as np
import torch

from .. import cost as cost_model
from .. import stats
from ..runs.options import option
from ..space import SPACES, build_space
from ..runs import files
from .common import StudyOptions, StudyRun, arch_file, read_json, train_config, write_json

NAME = "groundtruth"
SAMPLER_SEED_OFFSET = 104729  # the architectures' generator: seed + this, apart from every run's own
POOL = 20_000  # uniformly random architectures the evenly spread sample is picked from
DEFAULT_TRAIN_FLAGS = "--dataset mnist-cluttered --recipe cluttered"


@dataclass
class GroundtruthConfig(StudyOptions):
    archs: int = option(24, "architectures sampled, their MFLOPs spread evenly over the space's range")
    train_seeds: int = option(2, "trainings of each architecture (train seeds seed .. seed+N-1)")
    space: str = option("cluttered", "the space the architectures are sampled from", choices=tuple(SPACES))
    searched: List[str] = option([], "searched architectures added to the table: search run directories or their "
                                     "arch.json (of the same space)", type=str, nargs="+")
    latency_table: Optional[str] = option(None, "a latency table (`python -m betanas_fast.latency build`) of the "
                                                "space: each architecture's predicted ms is recorded", type=str)
    train_flags: str = option(DEFAULT_TRAIN_FLAGS, "flags of `python -m betanas_fast.train` for every training, as "
                                                   "one string; every net is scored on the data set's test split "
                                                   f"(default: \"{DEFAULT_TRAIN_FLAGS}\")")
    decile: float = option(0.1, "the share of architectures at the top and at the bottom whose mean top-1 give the "
                                "spread")

    analysis_only = ("decile",)


def spread_sample(space, count: int, seed: int) -> List[List[int]]:
    """`count` distinct architectures whose MFLOPs spread evenly over the range of a seeded pool of uniformly
    random architectures: for each of `count` evenly spaced MFLOPs values, the nearest one not yet taken."""
    allowed = torch.tensor(space.allowed_mask())
    generator = torch.Generator().manual_seed(seed)
    table = np.array(cost_model.mflops_table(space))
    logits = torch.where(allowed, 0.0, float("-inf"))
    pool = torch.multinomial(torch.softmax(logits, 1), POOL, replacement=True, generator=generator).T.numpy()
    pool = np.unique(pool, axis=0)  # sorted, so the order no longer depends on the draw order
    mflops = table[np.arange(space.num_blocks), pool].sum(1)
    if len(pool) < count:
        raise ValueError(f"the {space.num_blocks}-block space gave only {len(pool)} distinct architectures in "
                         f"{POOL} draws; ask for fewer than {count}")
    taken = np.zeros(len(pool), dtype=bool)
    archs = []
    for target in np.linspace(mflops.min(), mflops.max(), count):
        distance = np.where(taken, np.inf, np.abs(mflops - target))
        i = int(np.argmin(distance))
        taken[i] = True
        archs.append([int(m) for m in pool[i]])
    return archs


def same_space(a: dict, b: dict) -> bool:
    """Whether two spaces' configurations (SpaceConfig.to_dict()) describe the same architectures (the
    classifier's width, set by the data, aside)."""
    return {k: v for k, v in a.items() if k != "num_classes"} == {k: v for k, v in b.items() if k != "num_classes"}


def top1_of(run_dir: str, split: str) -> dict:
    result = files.read_result(run_dir)
    return {"top1": result["last"][f"{split}_top1"], "best_top1": result[f"best_{split}_top1"]}


def calibration(means: np.ndarray, per_seed: np.ndarray, decile: float) -> dict:
    """Spread between the top and bottom deciles of the architectures' mean top-1, the noise floor of one
    architecture over train seeds, and how well one seed's ranking repeats in another's."""
    k = max(1, int(round(decile * len(means))))
    order = np.sort(means)
    out = {"architectures": len(means), "decile_size": k, "top_decile_mean": float(order[-k:].mean()),
           "bottom_decile_mean": float(order[:k].mean()), "best_mean": float(order[-1]), "worst_mean": float(order[0]),
           "best_single": float(per_seed.max())}
    out["decile_spread"] = out["top_decile_mean"] - out["bottom_decile_mean"]
    if per_seed.shape[1] > 1:
        out["noise_std"] = float(np.sqrt(per_seed.var(axis=1, ddof=1).mean()))  # pooled within-architecture std
        pairs = list(itertools.combinations(range(per_seed.shape[1]), 2))
        out["seed_abs_diff_mean"] = float(np.mean([np.abs(per_seed[:, a] - per_seed[:, b]).mean() for a, b in pairs]))
        out["seed_rank_agreement"] = {
            "kendall_tau_b": float(np.mean([stats.kendall_tau_b(per_seed[:, a], per_seed[:, b]) for a, b in pairs])),
            "spearman_rho": float(np.mean([stats.spearman_rho(per_seed[:, a], per_seed[:, b]) for a, b in pairs])),
            "pairs_of_seeds": len(pairs)}
        out["spread_over_noise"] = out["decile_spread"] / out["noise_std"] if out["noise_std"] > 0 else None
    return out


def format_table(result: dict) -> str:
    scoring, c = result["scoring"], result["calibration"]
    rows = [f"ground truth: {len(result['architectures'])} architectures of the {result['space']} space, each trained "
            f"{result['train_seeds']} times alone (final top-1 on the {scoring['images']} images of the "
            f"{scoring['split']} split)",
            f"{'#':>3} {'source':<8} {'MFLOPs':>7} {'params':>7} " + ("   ms   " if result["latency"] else "")
            + f"{'mean':>7} {'std':>7}  per seed          architecture"]
    for i, a in enumerate(result["architectures"]):
        ms = f"{a['latency_ms']:7.3f} " if result["latency"] else ""
        seeds = " ".join(f"{v:.4f}" for v in a["top1"])
        rows.append(f"{i:>3} {a['source']:<8} {a['mflops']:>7.3f} {a['params']:>7d} {ms}{a['top1_mean']:>7.4f} "
                    f"{a['top1_std']:>7.4f}  {seeds:<17} {' '.join(n.replace('mb_', '') for n in a['names'])}")
    rows.append(f"spread: top {c['decile_size']} mean {c['top_decile_mean']:.4f} - bottom {c['decile_size']} mean "
                f"{c['bottom_decile_mean']:.4f} = {c['decile_spread']:.4f}; best mean {c['best_mean']:.4f}")
    if "noise_std" in c:
        r = c["seed_rank_agreement"]
        rows.append(f"noise floor: pooled std over train seeds {c['noise_std']:.4f}, mean |difference| between two "
                    f"trainings {c['seed_abs_diff_mean']:.4f}; spread / noise std = {c['spread_over_noise']:.1f}; "
                    f"rankings of two train seeds agree with τ-b {r['kendall_tau_b']:+.3f}, ρ {r['spearman_rho']:+.3f}")
    return "\n".join(rows)


def run(cfg: GroundtruthConfig) -> dict:
    if cfg.archs < 2:
        raise ValueError(f"--archs must be >= 2, got {cfg.archs}")
    if cfg.train_seeds < 1:
        raise ValueError(f"--train-seeds must be >= 1, got {cfg.train_seeds}")
    if not 0 < cfg.decile <= 0.5:
        raise ValueError(f"--decile must be in (0, 0.5], got {cfg.decile}")
    study = StudyRun(NAME, cfg)
    base_train = train_config(cfg.train_flags, ("arch", "out", "resume", "seed"))
    if base_train.data is None and base_train.dataset == "auto":
        raise ValueError("--train-flags must name the data set (--dataset mnist-cluttered or digits): the "
                         "architectures of the table come from no search that would tell it")
    split = base_train.score_split
    space = build_space(cfg.space)
    table = None
    if cfg.latency_table:
        table = cost_model.LatencyTable.load(cfg.latency_table)
        table.check_space(space)

    entries = [("sample", a) for a in spread_sample(space, cfg.archs, cfg.seed + SAMPLER_SEED_OFFSET)]
    for path in cfg.searched:
        try:
            searched_space, arch, _ = files.read_arch(path)
        except files.RunFileError as e:
            raise ValueError(f"--searched: {e}") from None
        if not same_space(searched_space.config.to_dict(), space.config.to_dict()):
            raise ValueError(f"--searched {path}: its space is not the {cfg.space} space of the table")
        entries.append(("searched", arch))
    study.start({"train": base_train.to_dict(), "space": space.config.to_dict(),
                 "searched": [os.path.abspath(p) for p in cfg.searched]})

    arch_paths = [study.path("archs", f"arch-{i:02d}.json") for i in range(len(entries))]
    if study.ranks.is_main:
        os.makedirs(study.path("archs"), exist_ok=True)
        for path, (source, arch) in zip(arch_paths, entries):
            write_json(path, arch_file(space, arch, "ground truth: " + source))
    study.ranks.barrier()
    seeds = [cfg.seed + k for k in range(cfg.train_seeds)]
    trainings = [[study.subrun(f"train-{i:02d}-s{s}", "train", replace(base_train, arch=[path], seed=s))
                  for s in seeds] for i, path in enumerate(arch_paths)]
    study.run([t for row in zip(*trainings) for t in row])  # every architecture's first seed first

    rows = []
    for (source, arch), runs in zip(entries, trainings):
        net = cost_model.arch_cost(space, arch)
        scores = [top1_of(t.out, split) for t in runs]
        top1 = [s["top1"] for s in scores]
        mean, std = stats.mean_std(top1)
        rows.append({"source": source, "arch": space.arch_strings(arch), "choices": arch,
                     "names": [space.candidate_names[m] for m in arch], "mflops": net.mflops, "macs": net.macs,
                     "params": net.params, **({"latency_ms": table.predict_ms(space, arch)} if table else {}),
                     "top1": top1, "best_top1": [s["best_top1"] for s in scores], "top1_mean": mean, "top1_std": std,
                     "runs": [os.path.relpath(t.out, study.out) for t in runs]})
    per_seed = np.array([r["top1"] for r in rows if r["source"] == "sample"])
    scored = {files.read_result(t.out)["scored_images"] for row in trainings for t in row}
    result = {"space": cfg.space, "space_config": space.config.to_dict(), "candidates": space.candidate_names,
              "train_seeds": cfg.train_seeds, "seeds": seeds, "train": base_train.to_dict(),
              "dataset": base_train.dataset, "scoring": {"split": split, "images": sorted(scored)[0]},
              "sampler_seed": cfg.seed + SAMPLER_SEED_OFFSET, "latency": table is not None,
              "architectures": rows, "calibration": calibration(per_seed.mean(1), per_seed, cfg.decile),
              "mflops_vs_top1": {"kendall_tau_b": stats.kendall_tau_b([r["mflops"] for r in rows],
                                                                      [r["top1_mean"] for r in rows]),
                                 "spearman_rho": stats.spearman_rho([r["mflops"] for r in rows],
                                                                    [r["top1_mean"] for r in rows])}}

    def figures(out: str) -> List[str]:
        from . import figures as fig
        path = os.path.join(out, "groundtruth.png")
        fig.groundtruth_scatter(rows, path, split)
        return [path]

    return study.finish(result, format_table(result), figures)


def load_table(path: str) -> dict:
    """A finished ground-truth table: its study directory or study.json (or a results file holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "study.json")
    if not os.path.isfile(path):
        raise ValueError(f"--groundtruth {path}: no such file (python -m betanas_fast.study groundtruth writes "
                         f"study.json into its directory)")
    d = read_json(path)
    d = d.get("data", d)  # a stamped results file
    if d.get("study") != NAME or "architectures" not in d:
        raise ValueError(f"--groundtruth {path} is not a ground-truth table")
    return d


def percentile_at_flops(table: dict, mflops: float, top1: float, band: float = 0.2) -> dict:
    """Where a net's top-1 falls among the table's sampled architectures within ±band of its MFLOPs: the share
    whose mean top-1 is below it (ties count half)."""
    near = [a["top1_mean"] for a in table["architectures"] if a["source"] == "sample"
            and abs(a["mflops"] / mflops - 1) <= band]
    if not near:
        return {"percentile": None, "neighbours": 0, "band": band}
    near = np.array(near)
    below = float((near < top1).sum() + 0.5 * (near == top1).sum())
    return {"percentile": 100.0 * below / len(near), "neighbours": len(near), "band": band}
