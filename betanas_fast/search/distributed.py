"""One search over several processes (torchrun): the process group, this rank's share of a batch, the
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

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

# What the digest compares, in order; a mismatch names the parts that differ.
DIGEST_PARTS = ("alpha", "remaining paths", "path generator", "step", "weights")


class RankDivergence(RuntimeError):
    """Ranks that should agree by construction do not."""


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher speaking its protocol) set this process's RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Ranks:
    """This process's place in the run: rank, world size and local rank (1 process: 0, 1, 0). `launched`:
    started by torchrun, which joins a process group even for one process (a 1-GPU torchrun run exercises
    the same NCCL code as eight)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.launched

    def seed(self, base: int) -> int:
        """A seed of this rank's own (its augmentation): `base` on rank 0, so one process is unchanged."""
        return base + 7919 * self.rank

    def share(self, global_batch: int, what: str = "batch size") -> int:
        """This rank's part of a global batch; an indivisible one is a configuration error."""
        if global_batch % self.world:
            raise ValueError(f"{what} {global_batch} is the global batch and must divide evenly over the "
                             f"{self.world} processes (each rank takes an equal share)")
        return global_batch // self.world

    def shard(self, items: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch's first dimension."""
        n = items.shape[0] // self.world
        return items[self.rank * n:(self.rank + 1) * n]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may write caches and split files), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def ranks_from_env() -> Ranks:
    """This process's ranks as torchrun set them (no process group yet), or one process."""
    if not launched_by_torchrun():
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                 launched=True)


def init(ranks: Ranks, device_name: str) -> str:
    """Joins the process group (gloo on the CPU, NCCL on CUDA with one GPU per process from LOCAL_RANK) and
    returns this process's device name; without torchrun, nothing to do."""
    if not ranks.active:
        return device_name
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device_name!r} asked for, but torch sees no CUDA device")
        if ranks.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {ranks.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                             f"launch at most that many processes per node")
        torch.cuda.set_device(ranks.local_rank)
        device_name = f"cuda:{ranks.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("BETANAS_DIST_TIMEOUT", "1800")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, store=_attempt_store(ranks, timeout),
                                rank=ranks.rank, world_size=ranks.world,
                                device_id=torch.device(device_name) if cuda else None)
    return device_name


def _attempt_store(ranks: Ranks, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of this worker group, with keys of its own restart attempt only.

    torchrun's agent keeps one TCP store for every restart of the group (shared rendezvous store), and
    the default env:// rendezvous does not separate the attempts' keys: after a restart, a rank can read
    the address a killed worker published, and gloo then waits forever to connect to it (seen with
    --max-restarts and a SIGKILLed worker). A prefix per TORCHELASTIC_RESTART_COUNT keeps the attempts
    apart."""
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ranks.world,
                          is_master=not agent_hosts_store and ranks.rank == 0, timeout=timeout)
    return dist.PrefixStore(f"betanas/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    """After a run that ended normally on every rank: the ranks leave together (a barrier), then the process
    group is destroyed, so that no rank tears its connections down while another still uses them. Not
    after an error: the other ranks may be inside a collective, and torchrun stops them."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def all_reduce_mean(ranks: Ranks, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` averaged over ranks, reduced on `device` (NCCL reduces device tensors only); `t` itself
    without torchrun."""
    if not ranks.active:
        return t
    on = t.to(device)
    dist.all_reduce(on)
    return (on / ranks.world).to(t.device)


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
