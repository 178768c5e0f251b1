"""Run under torchrun by test_distributed.py: several tiny searches in one process group, each rank writing
what it decided and what it holds at the end, for the test to compare across ranks.

    torchrun --nproc-per-node 2 dist_worker.py OUT_DIR CASE [CASE ...]

CASE is a strategy name, "per-sample" (betanas with per-sample paths) or "diverge" (betanas with rank 1's
path generator perturbed after iteration 5: the run must stop with RankDivergence).
"""
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from common import tiny  # noqa: E402

from betanas_fast.search import Search  # noqa: E402
from betanas_fast.runs import ranks as run_ranks  # noqa: E402
from betanas_fast.search.distributed import RankDivergence  # noqa: E402


def checksum(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(opt):
    state = opt.state_dict()["state"]
    return [v for k in sorted(state) for _, v in sorted(state[k].items()) if isinstance(v, torch.Tensor)]


def run_case(out: str, case: str) -> dict:
    kw = dict(epochs=3, warmup_epochs=1, batch_size=32, heldout_batch_size=32, checkpoint_every=50, digest_every=4,
              drop_threshold=-0.02, arch_lr=0.03, threads=1, out=os.path.join(out, case))
    if case == "per-sample":
        kw.update(path_sampling="per-sample", batch_size=32)
    elif case == "gdas":  # one Gumbel-max path per step, α straight through it
        kw.update(strategy=case, gdas_arch_lr=0.01)
    elif case == "enas":  # the controller's samples, REINFORCE on the reward averaged over ranks, the derivation
        kw.update(strategy=case, enas_controller_lr=0.01, enas_derive_samples=3)
    elif case in ("spos", "proxyless"):
        kw.update(strategy=case, spos_population=4, spos_parents=2, spos_generations=2)
    elif case in ("darts", "fbnet", "hmnas"):  # the mixture: every remaining candidate in both steps (darts: second order)
        kw.update(strategy=case, epochs=1, warmup_epochs=0, darts_order=2 if case == "darts" else 1)
    elif case == "pdarts":  # three stages of one epoch: the top-k drops and α's restarts
        kw.update(strategy=case, epochs=3, warmup_epochs=0, pdarts_arch_lr=0.01)
    elif case == "dartsplus":  # stops early, on every rank at the same step
        kw.update(strategy=case, epochs=6, warmup_epochs=0, darts_arch_lr=0.05, dartsplus_stable_epochs=1)
    s = Search(tiny(None, **kw))
    rank = s.ranks.rank
    record = {"phase1_paths": [], "phase2_paths": []}
    sample_phase1, sample_from_p = s.strategy.sample_phase1, None

    def phase1(state, gen, batch, per_sample, **kw):
        paths = sample_phase1(state, gen, batch, per_sample, **kw)
        record["phase1_paths"].append(paths.tolist() if isinstance(paths, torch.Tensor) else list(paths))
        return paths
    s.strategy.sample_phase1 = phase1
    original_iteration = s._iteration

    def iteration():
        if case == "diverge" and rank == 1 and s.iteration == 5:
            s.path_gen.manual_seed(12345)
        if sample_from_p is None and hasattr(s, "state"):
            wrap_phase2()
        return original_iteration()

    def wrap_phase2():
        nonlocal sample_from_p
        sample_from_p = s.state.sample_from_p

        def sampled(gen):
            arch = sample_from_p(gen)
            record["phase2_paths"].append(list(arch))
            return arch
        s.state.sample_from_p = sampled
    s._iteration = iteration
    try:
        result = s.run()
        record["error"] = None
    except RankDivergence as e:
        record["error"] = str(e)
        result = None
    record.update(
        iterations=s.iteration, stopped=s.stopped, drops=[dict(d) for d in s.state.drops], arch=result and result["arch"],
        weights=checksum(s.model.parameters()), buffers=checksum(s.model.buffers()),
        alpha=checksum([s.state.values()]), sgd=checksum(optimizer_tensors(s.sgd)),
        adam=checksum(optimizer_tensors(s.state.optimizer)),
        controller=checksum(s.strategy.policy.controller.parameters()) if case == "enas" else None, remaining=s.state.remaining.tolist())
    return record


def main():
    out, cases = sys.argv[1], sys.argv[2:]
    rank = int(os.environ["RANK"])
    results = {case: run_case(out, case) for case in cases}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    run_ranks.shutdown()


if __name__ == "__main__":
    main()
