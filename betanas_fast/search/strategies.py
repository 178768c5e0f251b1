"""The search strategies: one class each, saying how Phase 1 samples paths, whether α is trained, what
follows an α step, and how the final architecture is chosen. The two-phase loop (engine.py) asks these
questions and knows no strategy by name.

- `BetaNAS`: balanced training (uniform over the remaining paths, by shuffled cycles), α by the
  binary-gate gradient, selective drop after each α step, argmax at the end.
- `Proxyless`: BetaNAS without the two ideas: Phase 1 draws paths from p, nothing is dropped.
- `SPOS`: uniform training of every path for the whole run, no α; evolution under the cost budget.
- `Random`: no training; a random architecture under the budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .arch_state import ArchState
from .evolution import evolution_search, sample_within_budget

Paths = Union[List[int], torch.Tensor]  # one path per block, or [blocks, batch] for per-sample sampling


@dataclass
class Selection:
    """What the final choice may use: score a sub-net on held-out data (BN recalibrated), its cost (MFLOPs
    or predicted ms), the budget in that unit (or None), a seeded generator, a log line sink."""
    score: Callable[[List[int]], float]
    cost: Callable[[List[int]], float]
    budget: Optional[float]
    generator: torch.Generator
    log: Callable[[str], None] = print
    unit: str = "MFLOPs"


class Strategy:
    name = ""
    trains_weights = True   # Phase 1 runs
    trains_alpha = False    # Phase 2 runs after the warm-up
    drops_paths = False     # selective drop after each α step

    def __init__(self, cfg):
        self.cfg = cfg

    def sample_phase1(self, state: ArchState, generator: torch.Generator, batch_size: int, per_sample: bool,
                      shards: int = 1) -> Paths:
        """Uniform over the remaining paths, balanced by shuffled cycles. `batch_size` is the global batch;
        per sample, each of `shards` contiguous parts of it (the processes' shares) gets its share of the
        balance."""
        if per_sample:
            return state.sample_uniform_cycle_per_sample(generator, batch_size, shards)
        return state.sample_uniform_cycle(generator)

    def after_alpha_step(self, state: ArchState, step: int) -> List[dict]:
        """The drops made after an α step."""
        return []

    def select(self, state: ArchState, selection: Selection) -> Tuple[List[int], dict]:
        """The final architecture, and what the report should add about how it was found."""
        return state.argmax_arch(), {}


class BetaNAS(Strategy):
    name = "betanas"
    trains_alpha = True
    drops_paths = True

    def after_alpha_step(self, state: ArchState, step: int) -> List[dict]:
        return state.drop_below(self.cfg.drop_threshold, step)


class Proxyless(Strategy):
    name = "proxyless"
    trains_alpha = True

    def sample_phase1(self, state, generator, batch_size, per_sample, shards=1):
        if per_sample:
            return state.sample_from_p_per_sample(generator, batch_size)
        return state.sample_from_p(generator)


class SPOS(Strategy):
    name = "spos"

    def select(self, state, selection):
        cfg = self.cfg
        arch, score, trace = evolution_search(
            state.allowed, selection.score, selection.cost, selection.budget, selection.generator,
            population=cfg.spos_population, generations=cfg.spos_generations, parents=cfg.spos_parents,
            mutation_prob=cfg.spos_mutation_prob,
            progress=lambda g, s: selection.log(f"evolution generation {g}: best held-out acc {s:.4f}"))
        return arch, {"heldout_acc": score, "evolution_trace": trace}


class Random(Strategy):
    name = "random"
    trains_weights = False

    def select(self, state, selection):
        return sample_within_budget(state.allowed, selection.generator, selection.cost, selection.budget), {}


STRATEGIES: Dict[str, type] = {cls.name: cls for cls in (BetaNAS, Proxyless, SPOS, Random)}


def make_strategy(cfg) -> Strategy:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; expected one of {tuple(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg)
