"""One search over several processes (torchrun), on top of runs.ranks (ranks, process group, shares): the
weight-gradient averaging over exactly the parameters a step used, the averaged α table, and the digest
check that proves the ranks still agree.

Every rank takes the same decisions without exchanging them: the path generator is seeded identically
and consumed identically, so the Phase-1 and Phase-2 paths agree by construction; the Phase-2 table of
dL/dg is averaged before Eq. 4, so α, p and the drops agree too. The digest check (every K steps and at
the end) turns a broken promise into an error that names the step and the ranks, never into ranks that
silently search different architectures.

Weight gradients: the parameters a step touched are known on every rank from the step's global paths
(the fixed stem, first block and head, plus each block's paths of this step), so the ranks all-reduce
one flat buffer with the same layout without asking each other which gradients exist: no hang when a
path is unused, no parameter skipped. Parameters a rank's own shard did not reach (per-sample paths)
contribute zeros. The BatchNorm running statistics of those modules ride in the same buffer and are
averaged, so buffers agree too (plain DDP broadcasts rank 0's instead).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..runs.ranks import Ranks

# What the digest compares, in order; a mismatch names the parts that differ.
DIGEST_PARTS = ("alpha", "remaining paths", "path generator", "step", "weights")


class RankDivergence(RuntimeError):
    """Ranks that should agree by construction do not."""


# --- what a step touched --------------------------------------------------------------------------------------
def step_modules(model: nn.Module, used_paths: Sequence[Iterable[int]]) -> List[nn.Module]:
    """The modules a step ran: everything outside the choice blocks, plus, per block, the paths in
    `used_paths[l]`. Deterministic order (the model's own), identical on every rank."""
    used = [set(int(m) for m in paths) for paths in used_paths]
    mods = [child for name, child in model.named_children() if name != "blocks"]
    for l, block in enumerate(model.blocks):
        mods += [block.path(m) for m in sorted(used[l])]
    return mods


def used_paths(paths, global_paths: Optional[torch.Tensor] = None) -> List[List[int]]:
    """Per block, the paths any rank used: the per-batch path, or every path of the global per-sample
    assignment [L, N_global]."""
    if global_paths is not None:
        return [torch.unique(row).tolist() for row in global_paths]
    return [[int(m)] for m in paths]


class GradientSync:
    """Averages, over ranks, the gradients of the parameters (and the BatchNorm running statistics) of
    the modules a step ran, plus a few scalars, in one flat all-reduce per bucket."""

    def __init__(self, ranks: Ranks, bucket_bytes: int = 64 << 20):
        self.ranks = ranks
        self.bucket_bytes = bucket_bytes

    def __call__(self, model: nn.Module, modules: Sequence[nn.Module], scalars: torch.Tensor,
                 per_sample: bool = False) -> torch.Tensor:
        """All-reduce in place; returns the averaged `scalars`. A parameter with a gradient outside
        `modules` is an error (it would silently stay unsynchronised). `per_sample`: paths differ between
        the ranks' samples, so the BatchNorm batch counters are reconciled too."""
        params = [p for mod in modules for p in mod.parameters() if p.requires_grad]
        ids = {id(p) for p in params}
        stray = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in ids]
        if stray:
            raise RuntimeError(f"parameters with a gradient outside the step's paths would not be averaged "
                               f"over ranks: {stray[:5]}")
        for p in params:
            if p.grad is None:  # this rank's shard did not reach it; other ranks' did
                p.grad = torch.zeros_like(p)
        tensors = [p.grad for p in params]
        counters = []
        for mod in modules:
            for m in mod.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    tensors += [m.running_mean, m.running_var]
                    counters.append(m.num_batches_tracked)
        tensors.append(scalars)
        self._all_reduce_mean(tensors)
        if per_sample and counters:
            # a path may have had no samples on some rank: its BatchNorm counted one batch fewer there
            flat = torch.stack(counters)
            dist.all_reduce(flat, op=dist.ReduceOp.MAX)
            for c, v in zip(counters, flat):
                c.copy_(v)
        return scalars

    def _all_reduce_mean(self, tensors: List[torch.Tensor]) -> None:
        bucket, size = [], 0
        for t in tensors:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                self._flush(bucket)
                bucket, size = [], 0
        if bucket:
            self._flush(bucket)

    def _flush(self, tensors: List[torch.Tensor]) -> None:
        by_dtype = {}
        for t in tensors:
            by_dtype.setdefault((t.dtype, t.device), []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            flat /= self.ranks.world
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def check_paths(ranks: Ranks, paths, step: int, device: torch.device) -> None:
    """Before the weight gradients are averaged: every rank must have drawn the same paths for this step
    (the gradient buffers' layout depends on them, so diverged paths would otherwise deadlock or mix
    unrelated gradients). One tiny all-gather per step."""
    t = paths if isinstance(paths, torch.Tensor) else torch.tensor(paths, dtype=torch.long)
    local = torch.tensor([step, _hash(t.to(torch.int64))], dtype=torch.int64)
    _compare(ranks, local, step, ("step", "phase-1 paths"), device)


# --- the digest --------------------------------------------------------------------------------------------------
def _hash(*tensors: torch.Tensor) -> int:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "little")  # fits an int64


def digest(alpha: torch.Tensor, remaining: torch.Tensor, path_generator: torch.Generator, step: int,
           model: nn.Module) -> torch.Tensor:
    """One int64 per DIGEST_PARTS entry."""
    weights = [p.detach().reshape(-1) for p in model.parameters()] + [b.reshape(-1) for b in model.buffers()]
    values = [_hash(alpha.float()), _hash(remaining.to(torch.uint8)), _hash(path_generator.get_state()), step,
              _hash(*weights)]
    return torch.tensor(values, dtype=torch.int64)


def check_agreement(ranks: Ranks, local: torch.Tensor, step: int, device: torch.device) -> None:
    """Gathers every rank's digest; raises RankDivergence naming the step, the ranks and the parts that
    differ from rank 0's. Every rank raises (they all see the gathered digests)."""
    _compare(ranks, local, step, DIGEST_PARTS, device)


def _compare(ranks: Ranks, local: torch.Tensor, step: int, names: Sequence[str], device: torch.device) -> None:
    if not ranks.active:
        return
    local = local.to(device)  # NCCL gathers device tensors only
    gathered = [torch.empty_like(local) for _ in range(ranks.world)]
    dist.all_gather(gathered, local)
    gathered = [g.cpu() for g in gathered]
    bad = {r: [names[i] for i in (g != gathered[0]).nonzero().flatten().tolist()]
           for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])}
    if bad:
        detail = "; ".join(f"rank {r}: {', '.join(parts)}" for r, parts in bad.items())
        raise RankDivergence(f"ranks disagree at step {step}: {detail} differ from rank 0. The ranks must take "
                             f"identical decisions; stopping rather than searching different architectures")
