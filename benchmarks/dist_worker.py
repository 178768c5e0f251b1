"""Run under torchrun by test_bench_distributed.py; rank 0 writes a JSON of what it measured.

    torchrun --nproc-per-node 2 dist_worker.py sync OUT.json
        Phase-1 steps of the benchmark supernet (space `bench`, global batch 64) with the weight gradients
        averaged three ways: not at all (`local`, the compute alone), the engine's GradientSync over the
        step's modules (`betanas_fast`), and torch DDP with find_unused_parameters=True (`ddp_find_unused`).

    torchrun --nproc-per-node 2 dist_worker.py rehearsal OUT.json DATA_DIR LOADER ITERATIONS PREFETCH
        A few iterations of the real engine on the mobile space at 224x224 from an ImageNet-layout folder,
        with the engine's step timer: data wait vs compute vs communication.
"""
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from betanas_fast.nn.supernet import Supernet
from betanas_fast.search import ArchState, Search, SearchConfig
from betanas_fast.runs import ranks as run_ranks
from betanas_fast.search import distributed
from betanas_fast.runs.timing import COMMUNICATION_PARTS, PARTS, StepTimer
from betanas_fast.space import build_space

WARMUP, STEPS, GLOBAL_BATCH = 3, 15, 64


def sync_benchmark(out):
    ranks = run_ranks.ranks_from_env()
    run_ranks.init(ranks, "cpu")
    torch.manual_seed(0)
    space = build_space("bench")
    model = Supernet(space).to(memory_format=torch.channels_last)
    sync = distributed.GradientSync(ranks)
    # DDP hooks every parameter it wraps: a copy of its own, so that the other modes run the bare model
    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model), find_unused_parameters=True)
    opts = {"model": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            "ddp": torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)}
    state = ArchState(space.allowed_mask())
    gen = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH // ranks.world
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2 + ranks.rank)).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,))

    def step(mode):
        paths = state.sample_uniform_cycle(gen)
        opt = opts["ddp" if mode == "ddp_find_unused" else "model"]
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = ddp(x, paths) if mode == "ddp_find_unused" else model(x, paths)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if mode == "betanas_fast":
            distributed.check_paths(ranks, paths, 0, torch.device("cpu"))
            sync(model, distributed.step_modules(model, distributed.used_paths(paths)), loss.detach().reshape(1))
        opt.step()
        dist.barrier()  # every mode ends its step together, as a synchronised step would
        return time.perf_counter() - t0

    result = {}
    for rep in range(2):  # interleaved twice, so that drift of the machine hits every mode alike
        for mode in ("local", "betanas_fast", "ddp_find_unused"):
            times = [step(mode) for _ in range(WARMUP + STEPS)][WARMUP:]
            result.setdefault(mode, []).extend(times)
    if ranks.is_main:
        with open(out, "w") as f:
            json.dump({m: statistics.median(t) for m, t in result.items()}, f)


def rehearsal(out, data, loader, iterations, prefetch):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.environ.get("BETANAS_REHEARSAL_RUN", os.path.join(tmp, "run"))
        cfg = SearchConfig(space="mobile", data=data, loader=loader, batch_size=8, heldout_batch_size=8, heldout=40,
                           val=0, epochs=100, warmup_epochs=0, phase_ratio=1, threads=1, progress=False,
                           plots=False, tensorboard=False, out=run_dir, seed=0, prefetch=prefetch)
        s = Search(cfg)
        s._build()
        timer = StepTimer()
        s._iteration()  # warm-up: first-touch allocations, DALI pipeline build
        s.timer = timer
        t0 = time.perf_counter()
        for _ in range(iterations):
            s._iteration()
        wall = (time.perf_counter() - t0) / iterations
        s.close()
        if s.ranks.is_main:
            parts = {p: timer.seconds.get(p, 0.0) / iterations for p in PARTS}
            with open(out, "w") as f:
                json.dump({"parts": parts, "wall": wall, "communication": list(COMMUNICATION_PARTS),
                           "world": s.ranks.world, "local_batch": s.local_batch}, f)


if __name__ == "__main__":
    job, out = sys.argv[1], sys.argv[2]
    if job == "sync":
        sync_benchmark(out)
    else:
        rehearsal(out, sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    run_ranks.shutdown()
