"""The studies' figures (matplotlib, Agg): balance (Fig. 5), searched vs random (Fig. 6), rank agreement
under weight sharing (Fig. 7), the ground-truth table and the supernets' ranking quality against it."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..plots import colours_of  # noqa: E402
from ..space import SearchSpace  # noqa: E402

DPI = 90




def balance_counts(space: SearchSpace, histories: Dict[str, List[dict]], factor: float, tolerance: float,
                   path: str) -> None:
    """Per strategy: every path's whole-run Phase-1 count over its block's mean count among the remaining paths
    (1 = its fair share); dropped paths grey."""
    names, colours = space.candidate_names, colours_of(space.num_candidates)
    fig, axes = plt.subplots(len(histories), 1, figsize=(max(6.0, 1.0 * space.num_blocks + 1), 2.4 * len(histories)),
                             squeeze=False, sharey=True)
    width = 0.8 / space.num_candidates
    for ax, (strategy, history) in zip(axes[:, 0], histories.items()):
        last = history[-1]
        for l in range(space.num_blocks):
            remaining = set(last["remaining"][l])
            counts = np.array(last["phase1_counts"][l], dtype=np.float64)
            mean = np.mean([counts[names.index(n)] for n in remaining])
            for m, name in enumerate(names):
                if not space.blocks[l].allowed[m]:
                    continue
                kept = name in remaining
                ax.bar(l + (m - space.num_candidates / 2 + 0.5) * width, counts[m] / mean, width,
                       color=colours[m] if kept else "#bbbbbb", hatch=None if kept else "//")
        ax.axhline(1, color="k", lw=0.8)
        ax.axhspan(1 - tolerance, 1 + tolerance, color="#4c72b0", alpha=0.08, lw=0)
        ax.axhline(factor, color="#c44e52", lw=0.8, ls="--")
        ax.set_xticks(range(space.num_blocks))
        ax.set_xticklabels([f"block {l}" for l in range(space.num_blocks)], fontsize=7)
        ax.set_ylabel("count / fair share", fontsize=8)
        ax.set_title(f"{strategy}: whole-run Phase-1 count / block's mean over the remaining paths", fontsize=9)
        ax.tick_params(labelsize=7)
    handles = [Patch(color=c, label=n) for n, c in zip(names, colours)]
    handles.append(Patch(facecolor="#bbbbbb", hatch="//", label="dropped"))
    fig.legend(handles=handles, fontsize=7, ncol=len(handles), loc="lower center", frameon=False)
    fig.suptitle(f"1 = fair share; shaded: ±{tolerance:.0%}; dashed: {factor:g}x the fair share; grey hatched: "
                 f"dropped paths", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def seeds_curves(groups: Dict[str, List[dict]], path: str, split: str) -> None:
    """Left: top-1 on the scored split per epoch of every retrained net (searched solid, random dotted, as the paper
    draws Fig. 6). Right: final top-1 against MFLOPs."""
    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    style = {"searched": ("-", "#c44e52", "o"), "random": (":", "#4c72b0", "s")}
    for group, runs in groups.items():
        ls, colour, marker = style.get(group, ("--", "#55a868", "^"))
        for i, r in enumerate(runs):
            epochs = [h["epoch"] for h in r["history"]]
            ax.plot(epochs, [100 * h["top1"] for h in r["history"]], ls=ls, color=colour, lw=1.2, alpha=0.8,
                    label=group if i == 0 else None)
        ax_s.scatter([r["mflops"] for r in runs], [100 * r["top1"] for r in runs], color=colour, marker=marker,
                     label=group, s=22)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel(f"{split} top-1 (%)", fontsize=8)
    top = max(100 * h["top1"] for runs in groups.values() for r in runs for h in r["history"])
    finals = [100 * h["top1"] for runs in groups.values() for r in runs for h in r["history"][len(r["history"]) // 3:]]
    ax.set_ylim(max(0.0, min(finals) - 2), min(100.5, top + 0.5))
    ax.set_title("retrained from scratch: searched (solid) vs random (dotted)", fontsize=9)
    ax.legend(fontsize=7)
    ax_s.set_xlabel("MFLOPs (multiply-adds)", fontsize=8)
    ax_s.set_ylabel(f"final {split} top-1 (%)", fontsize=8)
    ax_s.set_title("final accuracy vs size", fontsize=9)
    ax_s.legend(fontsize=7)
    for a in (ax, ax_s):
        a.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def sharing_plot(labels: Sequence[str], accuracy: Dict[str, np.ndarray], taus: Dict[str, dict], path: str,
                 split: str) -> None:
    """Left: each architecture's accuracy per group (points: seeds; line: mean), the architectures ordered by
    their mean NS accuracy. Right: Kendall's τ-b of each shared group's ranking against NS, with its bootstrap
    interval over seeds."""
    groups = list(accuracy)
    order = np.argsort(-accuracy[groups[0]].mean(0), kind="stable")
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1.3]})
    colours = colours_of(len(groups))
    x = np.arange(len(labels))
    for g, colour in zip(groups, colours):
        acc = 100 * accuracy[g][:, order]
        for s in range(acc.shape[0]):
            ax.scatter(x + 0.06 * (groups.index(g) - 1), acc[s], color=colour, s=10, alpha=0.5)
        ax.plot(x, acc.mean(0), color=colour, marker="o", lw=1.4, label=g)
    ax.set_xticks(x)
    ax.set_xticklabels([labels[i] for i in order], fontsize=7, rotation=20 if len(labels) > 4 else 0, ha="right"
                       if len(labels) > 4 else "center")
    ax.set_ylabel(f"{split} top-1 (%)", fontsize=8)
    ax.set_title("accuracy per group (points: seeds; line: mean), ordered by NS", fontsize=9)
    ax.legend(fontsize=7)
    for i, (g, t) in enumerate(taus.items()):
        lo, hi = t["interval"]["low"], t["interval"]["high"]
        ax_t.errorbar([i], [t["tau"]], yerr=[[t["tau"] - lo], [hi - t["tau"]]] if np.isfinite(lo) else None,
                      fmt="o", color=colours[groups.index(g)], capsize=4)
    ax_t.axhline(0, color="k", lw=0.6)
    ax_t.set_xticks(range(len(taus)))
    ax_t.set_xticklabels([f"τ({g}, NS)" for g in taus], fontsize=8)
    ax_t.set_xlim(-0.6, len(taus) - 0.4)
    ax_t.set_ylim(-1.05, 1.05)
    ax_t.set_title("Kendall τ-b, bootstrap 95 % over seeds", fontsize=9)
    for a in (ax, ax_t):
        a.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def groundtruth_scatter(rows: List[dict], path: str, split: str) -> None:
    """Each architecture's top-1 against its MFLOPs: every training (points) and the mean (marker), sampled
    architectures and searched ones apart."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colours = {"sample": "tab:blue", "searched": "tab:red"}
    for source, colour in colours.items():
        rs = [r for r in rows if r["source"] == source]
        if not rs:
            continue
        for r in rs:
            ax.scatter([r["mflops"]] * len(r["top1"]), 100 * np.array(r["top1"]), color=colour, s=8, alpha=0.4)
        ax.scatter([r["mflops"] for r in rs], [100 * r["top1_mean"] for r in rs], color=colour, s=28, marker="D",
                   label=f"{source} (mean; points: train seeds)")
    ax.set_xlabel("MFLOPs (multiply-adds)", fontsize=8)
    ax.set_ylabel(f"{split} top-1 (%), trained alone", fontsize=8)
    ax.set_title("ground truth: stand-alone accuracy against cost", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def ranking_plot(truth: np.ndarray, inherited: Dict[str, np.ndarray], taus: Dict[str, dict], path: str,
                 split: str) -> None:
    """Per supernet (columns): each architecture's inherited-weight top-1 against its stand-alone top-1, with
    Kendall τ-b and Spearman ρ in the title."""
    fig, axes = plt.subplots(1, len(inherited), figsize=(3.4 * len(inherited), 3.2), squeeze=False)
    for ax, (name, acc) in zip(axes[0], inherited.items()):
        ax.scatter(100 * truth, 100 * acc, s=14)
        t = taus[name]
        ax.set_title(f"{name}: τ-b {t['kendall_tau_b']:+.2f}, ρ {t['spearman_rho']:+.2f}", fontsize=9)
        ax.set_xlabel(f"trained alone: {split} top-1 (%)", fontsize=8)
        ax.set_ylabel(f"inherited weights: {split} top-1 (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def compare_scatter(nets: List[dict], strategies: Sequence[str], path: str, split: str,
                    cloud: Optional[List[tuple]] = None) -> None:
    """Each searched net's top-1 against its MFLOPs, one colour per strategy (points: seeds; diamond: the mean),
    over the ground-truth table's architectures (grey) where given."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if cloud:
        ax.scatter([c[0] for c in cloud], [100 * c[1] for c in cloud], color="0.8", s=10,
                   label="ground truth (trained alone)")
    cmap = plt.get_cmap("tab20")
    for i, s in enumerate(strategies):
        rs = [r for r in nets if r["strategy"] == s]
        colour = cmap(i % 20)
        ax.scatter([r["mflops"] for r in rs], [100 * r["top1"] for r in rs], color=colour, s=12, alpha=0.6)
        ax.scatter([np.mean([r["mflops"] for r in rs])], [100 * np.mean([r["top1"] for r in rs])], color=colour,
                   s=40, marker="D", edgecolor="black" if s == "betanas" else None, label=s)
    ax.set_xlabel("MFLOPs (multiply-adds)", fontsize=8)
    ax.set_ylabel(f"{split} top-1 (%), retrained", fontsize=8)
    ax.set_title("searched nets by strategy (points: seeds, diamonds: means)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
