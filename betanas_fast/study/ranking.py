"""`python -m betanas_fast.study ranking` — how well a trained supernet ranks architectures.

Every architecture of a ground-truth table (`study groundtruth`) is scored with the weights it inherits
from each supernet (BatchNorm recalibrated exactly, as `python -m betanas_fast.evaluate` does) on the images
the table scored its stand-alone trainings on (the embedded data set's test split, which no search loads).
Reported per supernet: Kendall τ-b and Spearman ρ between its inherited-weight accuracies and the
architectures' mean stand-alone accuracies, each with a percentile bootstrap interval over the
architectures; against it, the baseline that needs no supernet (ranking the architectures by their MFLOPs) and
the table's own ceiling (how well two train seeds of the table agree with each other). A supernet earns its
training only where it ranks better than the baseline.

The supernets are either given (`--supernet RUN ...`, search run directories of the table's space and data)
or trained by the study itself: one search per `--strategies` (betanas, proxyless, spos by default) with the
same `--search-flags` and seed, i.e. the same data, space and schedule.

    python -m betanas_fast.study ranking --groundtruth runs/study-groundtruth --jobs 2
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List

import numpy as np

from .. import stats
from ..data.load import data_source
from ..runs.options import option
from ..runs import files
from .common import StudyOptions, StudyRun, search_config
from .groundtruth import load_table, same_space
from .sharing import score_supernet

NAME = "ranking"
DEFAULT_SEARCH_FLAGS = "--preset mnist_cluttered"


@dataclass
class RankingConfig(StudyOptions):
    search_flags: str = option(DEFAULT_SEARCH_FLAGS, "flags of `python -m betanas_fast.search` for the supernets the "
                                                     "study trains, as one string (default: \"--preset "
                                                     "mnist_cluttered\")")
    groundtruth: str = option("runs/study-groundtruth", "the ground-truth table: a `study groundtruth` directory, its "
                                                        "study.json, or a results file holding one")
    supernet: List[str] = option([], "trained supernets to rank (search run directories); default: one search per "
                                     "--strategies, run by the study", type=str, nargs="+")
    strategies: List[str] = option(["betanas", "proxyless", "spos"], "the strategies whose supernets the study "
                                                                     "trains when no --supernet is given",
                                   type=str, nargs="+")
    bootstrap: int = option(10_000, "bootstrap resamples (over architectures) of each interval")

    analysis_only = ("bootstrap",)


def rank_quality(inherited: np.ndarray, truth: np.ndarray, resamples: int, seed: int) -> dict:
    """τ-b and ρ of two accuracy vectors over the same architectures, with bootstrap intervals over them."""
    out = {"kendall_tau_b": stats.kendall_tau_b(inherited, truth), "spearman_rho": stats.spearman_rho(inherited, truth)}
    for key, fn in (("kendall_tau_b", stats.kendall_tau_b), ("spearman_rho", stats.spearman_rho)):
        out[key + "_interval"] = stats.bootstrap_interval(lambda idx: fn(inherited[idx], truth[idx]), len(truth),
                                                          resamples, seed=seed).to_dict()
    return out


def format_table(result: dict) -> str:
    rows = [f"ranking study: {result['architectures']} architectures of the ground-truth table, top-1 on the "
            f"{result['scoring']['images']} images of the {result['scoring']['split']} split with inherited weights "
            f"(BatchNorm recalibrated) against trained alone (mean of {result['train_seeds']} train seeds)"]
    for name, r in result["supernets"].items():
        t, ti, rho, ri = (r["kendall_tau_b"], r["kendall_tau_b_interval"], r["spearman_rho"],
                          r["spearman_rho_interval"])
        rows.append(f"{name:<12} τ-b {t:+.3f} [{ti['low']:+.3f}, {ti['high']:+.3f}]  ρ {rho:+.3f} [{ri['low']:+.3f}, "
                    f"{ri['high']:+.3f}]  inherited top-1 mean {r['inherited_mean']:.4f} (range "
                    f"{r['inherited_min']:.4f}-{r['inherited_max']:.4f}); {r['run']}")
    b = result["baselines"]["mflops"]
    rows.append(f"{'MFLOPs':<12} τ-b {b['kendall_tau_b']:+.3f} [{b['kendall_tau_b_interval']['low']:+.3f}, "
                f"{b['kendall_tau_b_interval']['high']:+.3f}]  ρ {b['spearman_rho']:+.3f} "
                f"[{b['spearman_rho_interval']['low']:+.3f}, {b['spearman_rho_interval']['high']:+.3f}]  (the "
                f"baseline: ranking by cost alone, no training)")
    c = result.get("ceiling")
    if c:
        rows.append(f"ceiling: two train seeds of the table agree with τ-b {c['kendall_tau_b']:+.3f}, ρ "
                    f"{c['spearman_rho']:+.3f}")
    rows.append("intervals: percentile bootstrap 95 % over the architectures")
    return "\n".join(rows)


def run(cfg: RankingConfig) -> dict:
    table = load_table(cfg.groundtruth)
    study = StudyRun(NAME, cfg)
    archs = [a["names"] for a in table["architectures"]]
    truth = np.array([a["top1_mean"] for a in table["architectures"]])
    split = table["scoring"]["split"]
    runs = {}
    if cfg.supernet:
        study.start({"groundtruth": os.path.abspath(cfg.groundtruth), "supernets": [os.path.abspath(p)
                                                                                   for p in cfg.supernet]})
        for path in cfg.supernet:
            name = files.read_config(path)["strategy"]
            runs[name if name not in runs else f"{name}:{os.path.basename(os.path.normpath(path))}"] = path
    else:
        base = search_config(cfg.search_flags, ("strategy", "seed", "out", "resume"))
        base = replace(base, seed=cfg.seed)
        searches = [study.subrun(f"search-{s}", "search", replace(base, strategy=s)) for s in cfg.strategies]
        study.start({"groundtruth": os.path.abspath(cfg.groundtruth), "search": base.to_dict(),
                     "strategies": list(cfg.strategies)})
        study.run(searches)
        runs = {s: sub.out for s, sub in zip(cfg.strategies, searches)}

    supernets, inherited = {}, {}
    for name, path in runs.items():
        saved = files.read_config(path)
        dataset = data_source(saved.get("dataset", "digits"), saved.get("data"))
        if table.get("dataset") and dataset != table["dataset"]:
            raise ValueError(f"supernet {path} was trained on {dataset}, the table on {table['dataset']}")
        space = files.read_arch(path)[2]["space"] if files.finished(path, "search") else None
        if space is not None and not same_space(space, table["space_config"]):
            raise ValueError(f"supernet {path}: its space is not the table's {table['space']} space")
        acc = np.array(score_supernet(path, archs, split, study.path("scores", f"{name.replace(':', '_')}_{split}.json")))
        inherited[name] = acc
        supernets[name] = {"run": os.path.relpath(path, study.out) if not cfg.supernet else os.path.abspath(path),
                           "inherited_top1": acc.tolist(), "inherited_mean": float(acc.mean()),
                           "inherited_min": float(acc.min()), "inherited_max": float(acc.max()),
                           **rank_quality(acc, truth, cfg.bootstrap, cfg.seed)}
    ceiling = table["calibration"].get("seed_rank_agreement")
    mflops = np.array([a["mflops"] for a in table["architectures"]])
    result = {"groundtruth": os.path.abspath(cfg.groundtruth), "architectures": len(archs),
              "train_seeds": table["train_seeds"], "truth_top1_mean": truth.tolist(),
              "scoring": table["scoring"], "supernets": supernets, "ceiling": ceiling,
              "baselines": {"mflops": rank_quality(mflops, truth, cfg.bootstrap, cfg.seed)}}

    def figures(out: str) -> List[str]:
        from . import figures as fig
        path = os.path.join(out, "ranking.png")
        fig.ranking_plot(truth, inherited, supernets, path, split)
        return [path]

    return study.finish(result, format_table(result), figures)
