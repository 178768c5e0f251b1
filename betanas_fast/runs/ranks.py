"""This process's place among the processes of a run (torchrun): ranks, the process group, each rank's
share of a global batch and its own seed, and the collectives every command needs (a mean, a sum).
Without torchrun every function is the one-process identity. What only a search needs (its gradient
averaging over the paths a step used, the digest check) is in search.distributed."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


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


def all_reduce_mean(ranks: Ranks, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` averaged over ranks, reduced on `device` (NCCL reduces device tensors only); `t` itself
    without torchrun."""
    if not ranks.active:
        return t
    on = t.to(device)
    dist.all_reduce(on)
    return (on / ranks.world).to(t.device)


def sum_over_ranks(t: torch.Tensor) -> None:
    """`t` summed over ranks, in place (reduced on the GPU under NCCL)."""
    on = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(on)
    t.copy_(on)
