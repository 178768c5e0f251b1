"""Figures of a search (matplotlib, Agg): α per block over time, per-path Phase-1 training frequency per
block (the paper's Fig. 5), and the searched architecture (Fig. 3 style)."""
from __future__ import annotations

import math
import os
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .space import SearchSpace  # noqa: E402


def _grid(n: int):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _plot_per_block(space: SearchSpace, history: List[dict], value, ylabel: str, path: str) -> None:
    """One panel per block, one line per allowed path: value(record, block, path) over the α steps."""
    names = space.candidate_names
    fig, axes = _grid(space.num_blocks)
    steps = [r["step"] for r in history]
    for l, ax in zip(range(space.num_blocks), axes):
        for m, name in enumerate(names):
            if space.blocks[l].allowed[m]:
                ax.plot(steps, [value(r, l, m) for r in history], label=name, lw=1.2)
        ax.set_title(f"block {l}", fontsize=9)
        ax.tick_params(labelsize=7)
    # The legend goes where every candidate appears (identity is not allowed everywhere).
    widest = max(range(space.num_blocks), key=lambda l: sum(space.blocks[l].allowed))
    axes[widest].legend(fontsize=6, ncol=2)
    fig.supxlabel("α step")
    fig.supylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_alpha(space: SearchSpace, history: List[dict], path: str) -> None:
    def alpha(r, l, m):
        v = r["alpha"][l][m]
        return float("nan") if v is None else v

    _plot_per_block(space, history, alpha, "α (NaN after drop)", path)


def plot_train_frequency(space: SearchSpace, history: List[dict], path: str) -> None:
    """Fraction of Phase-1 steps each path was trained in, cumulative, per block."""
    _plot_per_block(space, history, lambda r, l, m: r["phase1_counts"][l][m] / max(r["phase1_steps"], 1),
                    "share of Phase-1 steps trained", path)


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


def write_all(space: SearchSpace, history: List[dict], arch: Sequence[int], out: str, caption: str = "") -> List[str]:
    paths = []
    if history:
        paths += [os.path.join(out, "alpha.png"), os.path.join(out, "train_frequency.png")]
        plot_alpha(space, history, paths[0])
        plot_train_frequency(space, history, paths[1])
    paths.append(os.path.join(out, "architecture.png"))
    plot_architecture(space, arch, paths[-1], caption)
    return paths
