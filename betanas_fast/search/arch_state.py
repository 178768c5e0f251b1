"""Architecture state: α and its update (Eq. 4 + the cost term, Adam, re-centring, selective drop), the
remaining paths, counters, drop records, the path samplers, and how long each block's choice has held."""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch

from .. import ops


class ArchState:
    """α (L x M, init 0) and its Adam optimiser, `remaining` (L x M bool; candidates not allowed in a block
    start removed), per-path Phase-1 training counts and Phase-2 sample counts, and the record of every
    drop. With `mask_init`, also real-valued op-mask scores (L x M, that value; HM-NAS's), trained by the same
    Adam."""

    def __init__(self, allowed: List[List[bool]], lr: float = 1e-3, betas: Tuple[float, float] = (0.0, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, mask_init: Optional[float] = None):
        self.allowed = torch.tensor(allowed, dtype=torch.bool)
        self.alpha = torch.nn.Parameter(torch.zeros(self.allowed.shape))
        self.mask_scores = (torch.nn.Parameter(torch.full(self.allowed.shape, float(mask_init)))
                            if mask_init is not None else None)
        # β1 = 0 by default (ProxylessNAS's choice): a stale momentum never pushes a path.
        self._adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.optimizer = self._make_optimizer()
        self.remaining = self.allowed.clone()
        self.phase1_counts = torch.zeros(self.allowed.shape, dtype=torch.long)
        self.phase2_counts = torch.zeros(self.allowed.shape, dtype=torch.long)
        # each path's share of the Phase-1 steps' weight: 1 per step on the sampled path, the mixture's weight w_m
        # per step for the DARTS family (Fig. 5's measure for every policy)
        self.phase1_weight = torch.zeros(self.allowed.shape, dtype=torch.float64)
        self.drops: List[dict] = []
        # shuffled-cycle queues for balanced Phase-1 sampling, one per block
        self.cycles: List[List[int]] = [[] for _ in range(self.allowed.shape[0])]
        # the stability of each block's choice: epochs (with α steps) over which its argmax, and its whole ranking of
        # the remaining paths by α, stayed the same (DARTS+'s stopping measure, logged for every strategy)
        self.argmax_stable_epochs = torch.zeros(self.allowed.shape[0], dtype=torch.long)
        self.ranking_stable_epochs = torch.zeros(self.allowed.shape[0], dtype=torch.long)
        self.last_ranking: Optional[List[List[int]]] = None

    def _make_optimizer(self) -> torch.optim.Adam:
        """Adam on α; the mask scores without weight decay (it would pull every score to 0, under any threshold)."""
        groups = [{"params": [self.alpha]}]
        if self.mask_scores is not None:
            groups.append({"params": [self.mask_scores], "weight_decay": 0.0})
        return torch.optim.Adam(groups, **self._adam)

    def parameters(self) -> List[torch.nn.Parameter]:
        """What the α step trains: α, and the op-mask scores where there are any."""
        return [self.alpha] + ([self.mask_scores] if self.mask_scores is not None else [])

    def values(self) -> torch.Tensor:
        """Every architecture parameter in one tensor ([L, M], or [2L, M] with the mask scores): what ranks must
        agree on."""
        return torch.cat([p.detach() for p in self.parameters()])

    @property
    def num_blocks(self) -> int:
        return self.allowed.shape[0]

    def probs(self) -> torch.Tensor:
        """p = softmax(α over the remaining paths), 0 on the others."""
        a = self.alpha.detach().float().masked_fill(~self.remaining, float("-inf"))
        return torch.softmax(a, dim=1)

    def remaining_paths(self, block: int) -> List[int]:
        return self.remaining[block].nonzero().flatten().tolist()

    # --- sampling -------------------------------------------------------------------------------------
    def sample_uniform_cycle(self, generator: torch.Generator) -> List[int]:
        """One path per block, uniform over the remaining ones, by shuffled cycles: each remaining path
        once per cycle in random order, so counts stay exactly balanced."""
        arch = []
        for l in range(self.num_blocks):
            queue = [m for m in self.cycles[l] if self.remaining[l, m]]
            if not queue:
                rem = self.remaining_paths(l)
                queue = [rem[i] for i in torch.randperm(len(rem), generator=generator).tolist()]
            arch.append(queue.pop(0))
            self.cycles[l] = queue
        return arch

    def sample_uniform_cycle_per_sample(self, generator: torch.Generator, batch_size: int,
                                        shards: int = 1) -> torch.Tensor:
        """LongTensor [L, N]: a path per block for each of N samples, from the same shuffled-cycle stream
        as `sample_uniform_cycle`, N entries per block per step, dealt to the samples in random order.
        The cycles that open within a step put the paths this step took from the previous cycle last, so
        within a step every remaining path gets floor(N/M') or ceil(N/M') samples. With `shards` (the
        processes of a distributed run, each taking a contiguous 1/shards of the batch), each shard gets a
        contiguous stretch of the cycle stream, shuffled within the shard: its share of the balance."""
        paths = torch.empty(self.num_blocks, batch_size, dtype=torch.long)
        for l in range(self.num_blocks):
            queue = [m for m in self.cycles[l] if self.remaining[l, m]]
            drawn = queue[:batch_size]
            queue = queue[batch_size:]
            rem = self.remaining_paths(l)
            fresh, again = [m for m in rem if m not in drawn], [m for m in rem if m in drawn]
            while len(drawn) < batch_size:
                queue = ([fresh[i] for i in torch.randperm(len(fresh), generator=generator).tolist()]
                         + [again[i] for i in torch.randperm(len(again), generator=generator).tolist()])
                need = batch_size - len(drawn)
                drawn += queue[:need]
                queue = queue[need:]
            n = batch_size // shards
            order = torch.cat([s * n + torch.randperm(n, generator=generator) for s in range(shards)])
            paths[l] = torch.tensor(drawn)[order]
            self.cycles[l] = queue
        return paths

    def sample_from_p(self, generator: torch.Generator) -> List[int]:
        return torch.multinomial(self.probs(), 1, generator=generator).flatten().tolist()

    def sample_from_p_per_sample(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """LongTensor [L, N]: each sample's path in each block drawn from p independently."""
        return torch.multinomial(self.probs(), batch_size, replacement=True, generator=generator)

    def count_phase2(self, arch: List[int]) -> None:
        """One Phase-2 sample of `arch` (one path per block)."""
        for l, m in enumerate(arch):
            self.phase2_counts[l, m] += 1

    def argmax_arch(self) -> List[int]:
        a = self.alpha.detach().masked_fill(~self.remaining, float("-inf"))
        return a.argmax(1).tolist()

    # --- update and drop --------------------------------------------------------------------------------
    def alpha_grad(self, gate_grad: torch.Tensor, cost: torch.Tensor, beta: float) -> torch.Tensor:
        """dL/dα (L x M fp32, 0 on dropped paths) from the table of dL/dg over the remaining paths:
        Eq. 4, dL/dα_m = Σ_j dL/dg_j p_j (δ_mj − p_m), plus ∂/∂α_m of β Σ_j p_j cost_j (Eq. 6)."""
        as_f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
        _, grad = ops.alpha_grad(as_f32(self.alpha), self.remaining.contiguous(), as_f32(gate_grad), as_f32(cost),
                                 float(beta))
        return grad

    def step(self, gate_grad: torch.Tensor, cost: torch.Tensor, beta: float) -> None:
        """One α update: the gradient above, an Adam step in which dropped entries do not move, then the
        re-centring of every block's remaining α."""
        self.apply_grad(self.alpha_grad(gate_grad, cost, beta))

    def apply_grad(self, grad: torch.Tensor, recentre: bool = True) -> None:
        """An Adam step on `grad` (dL/dα, stacked over `parameters()` as `values()` is) in which the entries off the
        remaining paths do not move, then (with `recentre`) each block's remaining α to mean 0."""
        params = self.parameters()
        frozen = [p.detach().clone() for p in params]
        for p, g in zip(params, grad.detach().split(self.num_blocks)):
            p.grad = g.to(p.dtype).masked_fill(~self.remaining, 0.0)
        self.optimizer.step()
        with torch.no_grad():
            for p, f in zip(params, frozen):
                p.data[~self.remaining] = f[~self.remaining]
                p.grad = None
        if recentre:
            self.recentre()

    def restart_alpha(self) -> None:
        """α to 0 and a fresh Adam (its moments of the old α would push the new one): P-DARTS's next stage."""
        with torch.no_grad():
            self.alpha.zero_()
        self.optimizer = self._make_optimizer()

    @torch.no_grad()
    def keep_top(self, keep: int, step: int, reason: str) -> List[dict]:
        """Each block keeps its `keep` remaining paths of largest α (ties to the lower index), never fewer than
        one; the others are dropped for good, recorded with `reason`. Returns the drops made."""
        p = self.probs()
        made = []
        for l, ranked in enumerate(self.ranking()):
            for m in ranked[max(keep, 1):]:
                self.remaining[l, m] = False
                rec = {"block": l, "path": m, "step": step, "alpha": float(self.alpha[l, m]), "p": float(p[l, m]),
                       "reason": reason}
                made.append(rec)
                self.drops.append(rec)
        return made

    def ranking(self) -> List[List[int]]:
        """Each block's remaining paths ordered by α, largest first (ties to the lower index)."""
        a = self.alpha.detach()
        return [sorted(self.remaining_paths(l), key=lambda m: (-float(a[l, m]), m)) for l in range(self.num_blocks)]

    def end_epoch(self, alpha_moved: bool) -> None:
        """At an epoch's end: a block whose argmax (whole ranking) is the previous epoch's gains an epoch of
        stability, one whose changed starts again at 0; an epoch without α steps counts for nothing."""
        ranking = self.ranking()
        if alpha_moved and self.last_ranking is not None:
            for l, (now, before) in enumerate(zip(ranking, self.last_ranking)):
                self.argmax_stable_epochs[l] = self.argmax_stable_epochs[l] + 1 if now[0] == before[0] else 0
                self.ranking_stable_epochs[l] = self.ranking_stable_epochs[l] + 1 if now == before else 0
        else:
            self.argmax_stable_epochs.zero_()
            self.ranking_stable_epochs.zero_()
        self.last_ranking = ranking

    @torch.no_grad()
    def recentre(self) -> None:
        """Remaining α of each block to mean 0 (p unchanged), so a fixed negative threshold means
        "well below the average of the others"."""
        a = self.alpha.data
        mean = (a * self.remaining).sum(1, keepdim=True) / self.remaining.sum(1, keepdim=True)
        a.sub_(mean * self.remaining)

    @torch.no_grad()
    def drop_below(self, threshold: float, step: int) -> List[dict]:
        """Eq. 7: remove every remaining path with α < threshold, never a block's last path (if all
        would go, the argmax stays). Returns the drops made."""
        p = self.probs()
        made = []
        for l in range(self.num_blocks):
            rem = self.remaining[l]
            below = rem & (self.alpha.data[l] < threshold)
            if below.sum() == rem.sum():
                keep = int(self.alpha.data[l].masked_fill(~rem, float("-inf")).argmax())
                below[keep] = False
            for m in below.nonzero().flatten().tolist():
                self.remaining[l, m] = False
                rec = {"block": l, "path": m, "step": step, "alpha": float(self.alpha.data[l, m]),
                       "p": float(p[l, m])}
                made.append(rec)
                self.drops.append(rec)
        return made

    # --- checkpoint -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"alpha": self.alpha.detach().clone(), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "remaining": self.remaining.clone(),
                "phase1_counts": self.phase1_counts.clone(), "phase2_counts": self.phase2_counts.clone(),
                "phase1_weight": self.phase1_weight.clone(), "drops": [dict(d) for d in self.drops],
                "cycles": [list(c) for c in self.cycles],
                "mask_scores": None if self.mask_scores is None else self.mask_scores.detach().clone(),
                "argmax_stable_epochs": self.argmax_stable_epochs.clone(),
                "ranking_stable_epochs": self.ranking_stable_epochs.clone(),
                "last_ranking": None if self.last_ranking is None else [list(r) for r in self.last_ranking]}

    def load_state_dict(self, d: dict) -> None:
        with torch.no_grad():
            self.alpha.copy_(d["alpha"])
            if self.mask_scores is not None:
                self.mask_scores.copy_(d["mask_scores"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.remaining = d["remaining"].clone()
        self.phase1_counts = d["phase1_counts"].clone()
        self.phase2_counts = d["phase2_counts"].clone()
        if "phase1_weight" in d:  # (checkpoints written before it was kept: counts are the weights)
            self.phase1_weight = d["phase1_weight"].clone()
        else:
            self.phase1_weight = self.phase1_counts.to(torch.float64)
        self.drops = [dict(x) for x in d["drops"]]
        self.cycles = [list(c) for c in d["cycles"]]
        if "argmax_stable_epochs" in d:  # (checkpoints written before stability was kept start it again)
            self.argmax_stable_epochs = d["argmax_stable_epochs"].clone()
            self.ranking_stable_epochs = d["ranking_stable_epochs"].clone()
            self.last_ranking = None if d["last_ranking"] is None else [list(r) for r in d["last_ranking"]]


def masked_list(t: torch.Tensor, mask: torch.Tensor, ndigits: Optional[int] = None) -> list:
    """L x M tensor as nested lists with null where `mask` is False."""
    out = []
    for row, mrow in zip(t.tolist(), mask.tolist()):
        out.append([(round(v, ndigits) if ndigits is not None and isinstance(v, float) else v) if k else None
                    for v, k in zip(row, mrow)])
    return out
