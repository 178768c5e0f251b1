"""The cost term of Eq. 6 as the search uses it: β · Σ_l Σ_m p_lm · cost_lm, with cost in MFLOPs (analytic)
or in ms (a measured latency table), the cost of a whole net, and the target the search aims at."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..space import SearchSpace
from .flops import fixed_cost, mflops_table
from .latency import LatencyTable, cost_span

COSTS = ("flops", "latency")


@dataclass
class SearchCost:
    """`table` (L x M, 0 where a candidate is not allowed) and `fixed` (what every net pays: stem, first
    block, head; for latency also the per-network overhead) in `unit`; `target` the whole net's cost to aim
    at, or None."""
    kind: str
    unit: str
    table: torch.Tensor
    fixed: float
    target: Optional[float]
    space: SearchSpace
    latency: Optional[LatencyTable] = None

    def expected(self, probs: torch.Tensor) -> float:
        """The whole net's expected cost under the sampling probabilities p (L x M)."""
        return self.fixed + float((probs * self.table).sum())

    def adapted_beta(self, beta: float, probs: torch.Tensor, rate: float) -> float:
        """β after one α step aiming at the target: multiplied by 1 + rate while the expected cost under p is
        above it, divided by 1 + rate otherwise; unchanged without a target or with rate 0."""
        if self.target is None or rate <= 0:
            return beta
        return beta * (1 + rate) if self.expected(probs) > self.target else beta / (1 + rate)

    def of_arch(self, arch: Sequence[int]) -> float:
        self.space.check_arch(arch)
        return self.fixed + float(sum(self.table[l, m] for l, m in enumerate(arch)))

    def floor(self) -> float:
        """The cheapest net the space can express."""
        allowed = torch.tensor(self.space.allowed_mask())
        return self.fixed + float(self.table.masked_fill(~allowed, float("inf")).min(1).values.sum())

    def span(self) -> float:
        return cost_span(self.table.tolist(), self.space.allowed_mask())


def flops_cost(space: SearchSpace, target: Optional[float] = None) -> SearchCost:
    return SearchCost("flops", "MFLOPs", torch.tensor(mflops_table(space)), fixed_cost(space)[0] / 1e6, target, space)


def latency_cost(space: SearchSpace, table: LatencyTable, target: Optional[float] = None) -> SearchCost:
    """LatencyTableError (naming the missing entries) when the table does not cover the space."""
    matrix, fixed = table.cost_matrix(space)
    return SearchCost("latency", "ms", torch.tensor(matrix, dtype=torch.float32), fixed, target, space, table)


def latency_beta(beta_per_mflop: float, space: SearchSpace, latency: SearchCost) -> float:
    """The β per ms that presses as hard as `beta_per_mflop` does on FLOPs in this space: scaled by the ratio of
    how far the choice can move the net's MFLOPs to how far it can move its latency."""
    return beta_per_mflop * flops_cost(space).span() / max(latency.span(), 1e-12)



