"""Figures of a search (matplotlib, Agg): α and each path's share of the Phase-1 steps per block over the run
(the paper's Fig. 5; the balance study draws its strategies side by side with the same function), and the
searched architecture (Fig. 3 style)."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .space import SearchSpace  # noqa: E402


WINDOWS = 40  # the training-share curves: each path's share of its block's Phase-1 steps per window of the run


def colours_of(n: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_balance(space: SearchSpace, histories: Dict[str, List[dict]], path: str,
                 blocks: Optional[Sequence[int]] = None, per_row: int = 4, dpi: int = 75) -> None:
    """The paper's Fig. 5, for one search or several (`histories`: strategy -> history.jsonl records): per block
    (all, or `blocks`), α over the run and each path's share of the block's Phase-1 steps in consecutive windows
    of the run (a dropped path's α ends, its share falls to 0). Two panels per block, `per_row` blocks a row,
    the strategies one under the other."""
    names, colours = space.candidate_names, colours_of(space.num_candidates)
    blocks = list(range(space.num_blocks)) if blocks is None else list(blocks)
    cols = min(per_row, len(blocks))
    rows_per = math.ceil(len(blocks) / cols)
    fig, axes = plt.subplots(len(histories) * rows_per, 2 * cols,
                             figsize=(3.4 * 2 * cols, 2.6 * len(histories) * rows_per), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for s, (strategy, history) in enumerate(histories.items()):
        steps = np.array([r["step"] for r in history])
        edges = np.unique(np.linspace(0, len(history) - 1, WINDOWS + 1).round().astype(int))
        for k, l in enumerate(blocks):
            row, col = s * rows_per + k // cols, k % cols
            ax_a, ax_f = axes[row, 2 * col], axes[row, 2 * col + 1]
            counts = np.array([r["phase1_counts"][l] for r in history], dtype=np.float64)
            delta = counts[edges[1:]] - counts[edges[:-1]]
            share = delta / np.maximum(delta.sum(1, keepdims=True), 1)
            for m, name in enumerate(names):
                if not space.blocks[l].allowed[m]:
                    continue
                alpha = [np.nan if r["alpha"][l][m] is None else r["alpha"][l][m] for r in history]
                ax_a.plot(steps, alpha, color=colours[m], lw=1.1, label=name)
                ax_f.plot(steps[edges[1:]], share[:, m], color=colours[m], lw=1.1)
            ax_a.set_title(f"{strategy}: α, block {l}", fontsize=9)
            ax_f.set_title(f"{strategy}: training share, block {l}", fontsize=9)
            for ax in (ax_a, ax_f):
                ax.axis("on")
                ax.tick_params(labelsize=7)
                ax.set_xlabel("iteration", fontsize=7)
    fig.legend(handles=[Line2D([], [], color=c, label=n) for n, c in zip(names, colours)], fontsize=7,
               ncol=len(names), loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=dpi)  # many thin lines: keep the PNG small
    plt.close(fig)


def plot_architecture(space: SearchSpace, arch: Sequence[int], path: str, caption: str = "") -> None:
    """One box per block: colour by kernel size, width by expansion ratio; skip as a thin grey line; `caption`
    (the net's cost) under the title."""
    colours = {3: "#4c72b0", 5: "#55a868", 7: "#c44e52"}
    n = len(arch)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * n + 2), 3))
    for l, m in enumerate(arch):
        c, b = space.candidates[m], space.blocks[l]
        if c.is_skip:
            ax.add_patch(Rectangle((l + 0.45, 0.1), 0.1, 0.8, color="#999999"))
            label = "skip"
        else:
            w = 0.35 + 0.1 * c.expand_ratio
            ax.add_patch(Rectangle((l + 0.5 - w / 2, 0.1), w, 0.8, color=colours.get(c.kernel_size, "k")))
            label = f"k{c.kernel_size}e{c.expand_ratio:g}"
        ax.text(l + 0.5, 0.5, label, rotation=90, ha="center", va="center", fontsize=7, color="white"
                if not c.is_skip else "black")
        ax.text(l + 0.5, -0.08, f"{b.out_channels}" + ("/2" if b.stride == 2 else ""), ha="center", fontsize=6)
    ax.set_xlim(0, n)
    ax.set_ylim(-0.2, 1.0)
    ax.axis("off")
    ax.set_title("searched architecture (colour: kernel 3/5/7; width: expansion; below: channels, /2 = stride 2)"
                 + (f"\n{caption}" if caption else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(space: SearchSpace, history: List[dict], arch: Sequence[int], out: str, caption: str = "",
              strategy: str = "search") -> List[str]:
    paths = []
    if history:
        paths.append(os.path.join(out, "balance.png"))
        plot_balance(space, {strategy: history}, paths[0])
    paths.append(os.path.join(out, "architecture.png"))
    plot_architecture(space, arch, paths[-1], caption)
    return paths
