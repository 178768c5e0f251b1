"""`python -m betanas_fast.study sharing` — the paper's Fig. 7 (§4.3.3): how the number of candidates that
share a supernet changes the ranking it gives.

A space of a few choice blocks (default 2) and k ops (default 2); the architectures are every combination
of the ops over the blocks (k^blocks: the paper's 4). Each is trained three ways, for every seed:
- NS: alone, from scratch, by `python -m betanas_fast.train`;
- B<k>: one supernet whose blocks hold only the k ops;
- B<k+x>: one supernet whose blocks hold the k ops and x others (default 2: the paper's B4).
A supernet is trained by `python -m betanas_fast.search --strategy spos` (uniform single-path training over
its blocks' candidates; its evolution is cut to one generation that scores exactly the architectures of the
study), and each architecture is then scored with the weights it inherits, BatchNorm recalibrated exactly
(`evaluate`). The epochs scale with the candidates per block (NS E, B<k> k·E, B<k+x> (k+x)·E: the paper's
30 / 60 / 120), so that each candidate's weights get about E epochs of steps. NS and the supernets are
scored on the same images, which none of them trains on: on the digits their fixed test split (300 images,
which no search loads; NS trains on all the others, a supernet on all but its one held-out image, with no
validation split), with --data val/ (or its carve-out). They by default train with the same SGD settings
(the search flags set the training recipe's lr, label smoothing and weight decay; the train flags turn off
its warm-up and dropout, which the search does not have).

Reported: every architecture's accuracy per group and seed, Kendall's τ-b of each supernet's ranking (mean
over seeds) against NS's, with a percentile bootstrap 95 % interval over seeds (the seeds resampled with
replacement, all groups together), τ per seed, and the mean accuracy per group.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from typing import List

import numpy as np

from ..runs.options import option
from ..space import build_space, parse_candidate
from .. import stats
from ..runs import files
from ..scoring import load_search
from .common import (StudyOptions, StudyRun, arch_file, read_history, read_json, same_data, search_config, short,
                     train_config, write_json)

NAME = "sharing"


@dataclass
class SharingConfig(StudyOptions):
    seeds: int = option(5, "seeds: for each, every architecture alone (NS) and both supernets")
    ops: List[str] = option(["mb_k3_e1", "mb_k3_e6"], "the ops the architectures are made of (every combination "
                                                      "over the choice blocks is one architecture): 2 ops on 2 blocks "
                                                      "give the paper's 4, 4 ops give 16", type=str, nargs="+")
    extra_ops: List[str] = option(["mb_k5_e3", "mb_k7_e6"], "the candidates the larger supernet adds to the ops "
                                                            "(the paper's B4: the 2 ops and 2 others)",
                                  type=str, nargs="+")
    stage_depths: List[int] = option([1, 1, 0, 0], "choice blocks per stage of the search flags' space (1 1 0 0: the "
                                                   "demo space cut to its first two blocks)", type=int, nargs="+")
    epochs: int = option(15, "epochs of each architecture trained alone (NS); a supernet with k candidates per "
                            "block trains k times as many")
    bootstrap: int = option(10_000, "bootstrap resamples of the seeds for τ's interval")
    search_flags: str = option("--lr 0.05 --label-smoothing 0.1 --weight-decay 4e-5",
                               "flags of `python -m betanas_fast.search` for both supernets, as one string "
                               "(default: \"--lr 0.05 --label-smoothing 0.1 --weight-decay 4e-5\", the NS recipe's "
                               "SGD settings)")
    train_flags: str = option("--dropout 0 --warmup-epochs 0",
                              "flags of `python -m betanas_fast.train` for the NS trainings, as one string (default: "
                              "\"--dropout 0 --warmup-epochs 0\", the demo recipe without the warm-up and dropout that "
                              "the search has not)")

    analysis_only = ("bootstrap",)


SET_BY_STUDY_SEARCH = ("strategy", "seed", "out", "resume", "candidates", "stage_depths", "epochs", "heldout",
                       "heldout_batch_size", "val", "spos_population", "spos_generations", "spos_parents", "flops_target",
                       "latency_target")
SET_BY_STUDY_TRAIN = ("arch", "out", "resume", "seed", "epochs")


def arch_label(names) -> str:
    return "-".join(short(n) for n in names)


def score_supernet(run_dir: str, archs: List[List[str]], split: str, cache: str) -> List[float]:
    """Top-1 of each architecture (block candidate names) with the weights it inherits from the supernet of
    `run_dir`, BatchNorm recalibrated exactly, on `split`: "test", the embedded data set's test split, or "val", the
    search's validation split (its held-out one if it has none); cached in the study's file `cache` (the search's
    run directory is the search's alone)."""
    labels = [arch_label(a) for a in archs]
    if os.path.exists(cache):
        saved = read_json(cache)
        if all(label in saved for label in labels):
            return [saved[label] for label in labels]
    search = load_search(run_dir)
    images = search.split(split)
    names = search.space.candidate_names
    scores = [search.evaluate([names.index(n) for n in a], images).top1 for a in archs]
    if search.ranks.is_main:
        write_json(cache, dict(zip(labels, scores)))
    search.ranks.barrier()
    return scores


def tau_with_interval(group: np.ndarray, reference: np.ndarray, resamples: int, seed: int) -> dict:
    """τ-b between the seed-mean rankings of two [seeds, archs] accuracy tables, its bootstrap interval over seeds
    (the same resampled seeds for both), and τ per seed."""
    interval = stats.bootstrap_interval(
        lambda idx: stats.kendall_tau_b(group[idx].mean(0), reference[idx].mean(0)), len(group), resamples, seed=seed)
    return {"tau": stats.kendall_tau_b(group.mean(0), reference.mean(0)), "interval": interval.to_dict(),
            "per_seed": [stats.kendall_tau_b(g, r) for g, r in zip(group, reference)]}


def format_table(result: dict) -> str:
    groups, labels = result["groups"], result["labels"]
    scoring = result["scoring"]
    rows = [f"sharing study: {len(labels)} architectures x {result['seeds']} seeds; top-1 on the {scoring['images']} "
            f"images of the {scoring['split']} split, mean ± std over seeds (NS: alone, {result['epochs']['NS']} "
            f"epochs; "
            + "; ".join(f"{g}: supernet of {result['candidates'][g]}, {result['epochs'][g]} epochs, inherited weights"
                        for g in groups[1:]) + ")",
            f"{'architecture':<{max(12, max(map(len, labels)))}} " + " ".join(f"{g:>17}" for g in groups)]
    for i, label in enumerate(labels):
        cells = [f"{result['accuracy'][g]['mean'][i]:.4f} ± {result['accuracy'][g]['std'][i]:.4f}" for g in groups]
        rows.append(f"{label:<{max(12, max(map(len, labels)))}} " + " ".join(f"{c:>17}" for c in cells))
    rows.append(f"{'mean':<{max(12, max(map(len, labels)))}} "
                + " ".join(f"{result['accuracy'][g]['overall_mean']:>17.4f}" for g in groups))
    for g, t in result["tau"].items():
        iv = t["interval"]
        per_seed = ", ".join("nan" if np.isnan(v) else f"{v:+.2f}" for v in t["per_seed"])
        rows.append(f"Kendall τ-b({g}, NS) = {t['tau']:+.3f}, bootstrap 95 % over seeds [{iv['low']:+.3f}, "
                    f"{iv['high']:+.3f}] ({iv['undefined']} of {iv['resamples']} resamples undefined); per seed: "
                    f"{per_seed}")
    for c in result["claims"]:
        rows.append(f"claim: {c['claim']}: {'HOLDS' if c['holds'] else 'DOES NOT HOLD'} ({c['evidence']})")
    rows.append("ops: " + "; ".join(f"{short(n)} = {d}" for n, d in result["op_definitions"].items()))
    return "\n".join(rows)


def describe_op(name: str) -> str:
    c = parse_candidate(name)
    if c.is_skip:
        return "identity"
    expand = "no expansion" if c.expand_ratio == 1 else f"1x1 expand to {c.expand_ratio:g}x (BN, ReLU6)"
    return (f"MBConv: {expand}, {c.kernel_size}x{c.kernel_size} depthwise (BN, ReLU6), 1x1 project (BN), "
            f"residual where shapes allow")


def run(cfg: SharingConfig) -> dict:
    if cfg.seeds < 1 or cfg.epochs < 1:
        raise ValueError("--seeds and --epochs must be >= 1")
    if len(set(cfg.ops + cfg.extra_ops)) != len(cfg.ops + cfg.extra_ops):
        raise ValueError(f"--ops {cfg.ops} and --extra-ops {cfg.extra_ops} must be distinct candidates")
    if len(cfg.ops) < 2:
        raise ValueError("--ops needs at least 2 candidates (one ranking of at least 2 architectures)")
    for name in cfg.ops + cfg.extra_ops:
        parse_candidate(name)
    study = StudyRun(NAME, cfg)
    base_search = search_config(cfg.search_flags, SET_BY_STUDY_SEARCH)
    base_train = train_config(cfg.train_flags, SET_BY_STUDY_TRAIN)
    k, big = len(cfg.ops), len(cfg.ops) + len(cfg.extra_ops)
    groups = ["NS", f"B{k}", f"B{big}"]
    candidates = {groups[1]: list(cfg.ops), groups[2]: list(cfg.ops) + list(cfg.extra_ops)}
    epochs = {"NS": cfg.epochs, groups[1]: k * cfg.epochs, groups[2]: big * cfg.epochs}
    space = build_space(base_search.space, stage_depths=cfg.stage_depths, width_mult=base_search.width_mult,
                        resolution=base_search.resolution, candidates=list(cfg.ops))
    if not all(all(b.allowed) for b in space.blocks):
        raise ValueError("every op must be legal in every choice block ('skip' is not where the shape changes)")
    archs = [list(a) for a in itertools.product(cfg.ops, repeat=space.num_blocks)]
    labels = [arch_label(a) for a in archs]
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    base_train = same_data(base_search, base_train)
    embedded = base_search.data is None
    split = base_train.score_split  # the embedded set's test split (val/ with --data), which none of them trains on
    supernets, singles = {}, {}
    for s in seeds:
        for g in groups[1:]:
            c = replace(base_search, strategy="spos", seed=s, candidates=candidates[g],
                        stage_depths=list(cfg.stage_depths), epochs=epochs[g], spos_population=len(archs),
                        spos_generations=1, spos_parents=1, flops_target=None, latency_target=None,
                        **({"heldout": 1, "heldout_batch_size": 1, "val": 0} if embedded else {}))
            supernets[g, s] = study.subrun(f"{g}-seed{s}", "search", c)
        for a, label in zip(archs, labels):
            singles[label, s] = study.subrun(f"NS-{label}-seed{s}", "train",
                                             replace(base_train, arch=[study.path("archs", f"{label}.json")], seed=s,
                                                     epochs=cfg.epochs))
    study.start({"search": base_search.to_dict(), "train": base_train.to_dict()})
    if study.ranks.is_main:
        os.makedirs(study.path("archs"), exist_ok=True)
        for a, label in zip(archs, labels):
            write_json(study.path("archs", f"{label}.json"),
                       arch_file(space, [space.index_of(n) for n in a], "sharing study architecture"))
    study.ranks.barrier()
    study.run([r for s in seeds for r in [supernets[g, s] for g in groups[1:]]
               + [singles[label, s] for label in labels]])

    accuracy = {"NS": np.array([[read_history(singles[label, s].out)[-1][f"{split}_top1"] for label in labels]
                                for s in seeds])}
    for g in groups[1:]:
        accuracy[g] = np.array([score_supernet(supernets[g, s].out, archs, split,
                                               study.path("scores", f"{supernets[g, s].name}_{split}.json"))
                                for s in seeds])
    scored = {files.read_result(r.out)["scored_images"] for r in singles.values()}
    if len(scored) != 1:
        raise RuntimeError(f"the NS trainings were scored on different numbers of images: {sorted(scored)}")
    taus = {g: tau_with_interval(accuracy[g], accuracy["NS"], cfg.bootstrap, cfg.seed) for g in groups[1:]}
    small, large = groups[1], groups[2]
    claims = [{"claim": f"{small} (fewer candidates) trains the shared weights to higher accuracy than {large}",
               "holds": bool(accuracy[small].mean() > accuracy[large].mean()),
               "evidence": f"mean top-1 {accuracy[small].mean():.4f} against {accuracy[large].mean():.4f}"},
              {"claim": f"{small}'s ranking agrees with NS better than {large}'s",
               "holds": bool(taus[small]["tau"] > taus[large]["tau"]),
               "evidence": f"τ-b {taus[small]['tau']:+.3f} against {taus[large]['tau']:+.3f}; the intervals "
                           + ("overlap" if taus[small]["interval"]["low"] <= taus[large]["interval"]["high"]
                              else "do not overlap")}]
    result = {"seeds": cfg.seeds, "seed_list": seeds, "groups": groups, "labels": labels, "architectures": archs,
              "candidates": {"NS": list(cfg.ops), **candidates}, "epochs": epochs,
              "blocks": [{"in_channels": b.in_channels, "out_channels": b.out_channels, "stride": b.stride,
                          "in_resolution": b.in_resolution} for b in space.blocks],
              "op_definitions": {n: describe_op(n) for n in candidates[large]},
              "accuracy": {g: {"per_seed": accuracy[g].tolist(), "mean": accuracy[g].mean(0).tolist(),
                               "std": (accuracy[g].std(0, ddof=1) if cfg.seeds > 1 else 0 * accuracy[g][0]).tolist(),
                               "overall_mean": float(accuracy[g].mean())} for g in groups},
              "tau": taus, "claims": claims, "scoring": {"split": split, "images": scored.pop()}}

    def figures(out: str) -> List[str]:
        from . import figures as fig
        path = os.path.join(out, "sharing.png")
        fig.sharing_plot(labels, accuracy, taus, path, split)
        return [path]

    return study.finish(result, format_table(result), figures)
