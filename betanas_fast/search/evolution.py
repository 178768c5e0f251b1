"""Post-hoc architecture selection for `spos` (evolutionary search) and `random` (random sampling),
both under the FLOPs budget."""
from __future__ import annotations

from typing import Callable, List, Optional, Set, Tuple

import torch

from ..space import sample_arch, sample_within_budget

Arch = Tuple[int, ...]


def _mutate(parent: Arch, allowed, generator, prob: float) -> Arch:
    fresh = sample_arch(allowed, generator)
    mut = (torch.rand(len(parent), generator=generator) < prob).tolist()
    return tuple(f if m else c for c, f, m in zip(parent, fresh, mut))


def _crossover(a: Arch, b: Arch, generator) -> Arch:
    pick = (torch.rand(len(a), generator=generator) < 0.5).tolist()
    return tuple(x if k else y for x, y, k in zip(a, b, pick))


def evolution_search(allowed: torch.Tensor, score_fn: Callable[[List[int]], float],
                     cost_fn: Callable[[List[int]], float], budget: Optional[float], generator: torch.Generator,
                     population: int = 50, generations: int = 20, parents: int = 10, mutation_prob: float = 0.1,
                     progress: Optional[Callable[[int, float], None]] = None) -> Tuple[List[int], float, list]:
    """SPOS's evolution: each generation the top `parents` of every architecture scored so far breed
    `population` children, half by mutation and half by crossover. A child is kept only if it fits the
    budget and was never seen before (no duplicates, no re-scoring); when breeding stalls, unseen random
    architectures under the budget fill the generation. Returns (best arch, its score,
    [(generation, best score, architectures scored)])."""
    scores = {}
    seen: Set[Arch] = set()

    def fits(a: Arch) -> bool:
        return budget is None or cost_fn(list(a)) <= budget

    def fill(children: List[Arch], want: int, make: Callable[[], Arch]) -> None:
        for _ in range(50 * max(want, 1)):
            if len(children) >= want:
                return
            child = make()
            if child not in seen and fits(child):
                seen.add(child)
                children.append(child)

    pop: List[Arch] = []
    fill(pop, population, lambda: tuple(sample_within_budget(allowed, generator, cost_fn, budget)))
    trace = []
    for gen in range(generations):
        for a in pop:
            scores[a] = score_fn(list(a))
        ranked = sorted(scores, key=lambda a: -scores[a])
        top = ranked[:parents]
        trace.append((gen, scores[top[0]], len(scores)))
        if progress:
            progress(gen, scores[top[0]])
        if gen == generations - 1:
            break

        def pick() -> Arch:
            return top[int(torch.randint(len(top), (1,), generator=generator))]

        children: List[Arch] = []
        fill(children, population // 2, lambda: _mutate(pick(), allowed, generator, mutation_prob))
        fill(children, population, lambda: _crossover(pick(), pick(), generator))
        fill(children, population, lambda: tuple(sample_arch(allowed, generator)))
        if not children:  # the whole space under the budget has been scored
            break
        pop = children
    best = max(scores, key=lambda k: scores[k])
    return list(best), scores[best], trace
