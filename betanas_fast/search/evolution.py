"""Post-hoc architecture selection for `spos` (evolutionary search) and `random` (random sampling),
both under the FLOPs budget."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch


def sample_arch(allowed: torch.Tensor, generator: torch.Generator) -> List[int]:
    arch = []
    for row in allowed:
        ok = row.nonzero().flatten().tolist()
        arch.append(ok[int(torch.randint(len(ok), (1,), generator=generator))])
    return arch


def sample_within_budget(allowed, generator, cost_fn: Callable[[List[int]], float], budget: Optional[float],
                         tries: int = 10000) -> List[int]:
    for _ in range(tries):
        arch = sample_arch(allowed, generator)
        if budget is None or cost_fn(arch) <= budget:
            return arch
    raise RuntimeError(f"no architecture under {budget} MFLOPs found in {tries} random samples")


def evolution_search(allowed: torch.Tensor, score_fn: Callable[[List[int]], float],
                     cost_fn: Callable[[List[int]], float], budget: Optional[float], generator: torch.Generator,
                     population: int = 50, generations: int = 20, mutation_prob: float = 0.1,
                     progress: Optional[Callable[[int, float], None]] = None) -> Tuple[List[int], float, list]:
    """SPOS-style: keep the top quarter, refill with half mutants, half crossovers; every child must
    fit the budget. Returns (best arch, its score, [(generation, best score)])."""
    scores = {}

    def score(a):
        key = tuple(a)
        if key not in scores:
            scores[key] = score_fn(list(a))
        return scores[key]

    pop = [sample_within_budget(allowed, generator, cost_fn, budget) for _ in range(population)]
    trace = []
    n_parents = max(2, population // 4)
    for gen in range(generations):
        ranked = sorted(pop, key=lambda a: -score(a))
        parents = ranked[:n_parents]
        trace.append((gen, score(parents[0])))
        if progress:
            progress(gen, score(parents[0]))
        if gen == generations - 1:
            break
        children, attempts = [], 0
        while len(children) < population - n_parents and attempts < 100 * population:
            attempts += 1
            if len(children) < (population - n_parents) // 2:
                p = parents[int(torch.randint(n_parents, (1,), generator=generator))]
                fresh = sample_arch(allowed, generator)
                mut = torch.rand(len(p), generator=generator) < mutation_prob
                child = [f if m else c for c, f, m in zip(p, fresh, mut.tolist())]
            else:
                i, j = torch.randint(n_parents, (2,), generator=generator).tolist()
                pick = torch.rand(len(parents[i]), generator=generator) < 0.5
                child = [a if k else b for a, b, k in zip(parents[i], parents[j], pick.tolist())]
            if budget is None or cost_fn(child) <= budget:
                children.append(child)
        pop = parents + children
    best = max(scores, key=lambda k: scores[k])
    return list(best), scores[best], trace
