"""Score any architecture of the space with the weights it inherits from a trained supernet.

    python -m betanas_fast.evaluate runs/betanas-... [--arch ir_r1_k3_s2_e3_c16 ...|arch.json] [--split val]

The sub-network is a copy (`Net.from_supernet`): the supernet's weights and buffers are never touched,
however many architectures are scored. Its BatchNorm statistics are recomputed on a fixed, seeded
calibration subset of the weight-training split, exactly: each BatchNorm's running mean and variance
become the mean and (unbiased) variance of its input over every image of the subset, from sums of x and
x² in float64 over all calibration batches (reduced over ranks under torchrun), not an average of
per-batch variances. As in training, the calibration forward normalises with each batch's statistics;
so the statistics of a BatchNorm are those of the activations it sees in training, whatever the
calibration batch size for the first one, and close to it for the later ones.

The search's final evaluation and SPOS's evolution call `evaluate_arch` too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cost as cost_model
from .nn.layers import DWConvBNAct
from .nn.supernet import Net, Supernet, set_bn_batch_stats_frozen


@dataclass
class Evaluation:
    arch: List[str]
    top1: float
    top5: float
    images: int
    mflops: float
    params: int


class _MomentSums:
    """float64 Σx, Σx² and the count per channel of one BatchNorm's input."""

    def __init__(self, channels: int, device: torch.device):
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        dims = [0] + list(range(2, x.dim()))
        self.sum += x.sum(dims)
        self.sq += (x * x).sum(dims)
        self.count += x.numel() / x.shape[1]


def _bn_input_hooks(model: nn.Module, sums: dict) -> list:
    """Hooks that add each BatchNorm's input to its sums: a BatchNorm module sees its input directly; the
    fused depthwise stage (whose BatchNorm is applied inside one op) recomputes its convolution's output."""
    handles = []
    for m in model.modules():
        if isinstance(m, DWConvBNAct):
            def dw_hook(mod, args, _out):
                c = mod.conv
                y = F.conv2d(args[0], c.weight, None, c.stride, c.padding, c.dilation, c.groups)
                sums[mod.bn].add(y)
            handles.append(m.register_forward_hook(dw_hook))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(lambda mod, args: sums[mod].add(args[0])))
    return handles


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], forward: Optional[Callable] = None,
                   all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> int:
    """Sets every BatchNorm's running mean and variance of `model` to the exact moments of its input over
    all `batches` (each already on the model's device); `forward(model, x)` runs the model (default
    model(x)); `all_reduce(t)` sums a tensor over ranks in place. Returns the number of images."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    device = next(model.parameters()).device
    sums = {bn: _MomentSums(bn.num_features, device) for bn in bns}
    handles = _bn_input_hooks(model, sums)
    was_training = model.training
    model.train()
    set_bn_batch_stats_frozen(model, True)  # normalise with batch statistics, keep running ones untouched
    images = 0
    try:
        for x in batches:
            (forward or (lambda m, t: m(t)))(model, x)
            images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        set_bn_batch_stats_frozen(model, False)
        model.train(was_training)
    for bn in bns:
        s = sums[bn]
        if all_reduce is not None:
            packed = torch.cat([s.sum, s.sq, s.count.reshape(1)])
            all_reduce(packed)
            s.sum, s.sq, s.count = packed[:bn.num_features], packed[bn.num_features:-1], packed[-1]
        n = float(s.count)
        if n < 2:
            raise ValueError(f"BatchNorm recalibration needs at least 2 values per channel; got {n:.0f}")
        mean = s.sum / n
        var = (s.sq / n - mean * mean).clamp_min(0) * (n / (n - 1))  # unbiased, as BatchNorm keeps it
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
        bn.num_batches_tracked.fill_(1)
    return images


def calibration_indices(size: int, batch_size: int, batches: int, seed: int) -> List[torch.Tensor]:
    """The fixed, seeded calibration subset: `batches` batches of `batch_size` from a permutation of the
    split drawn from `seed` (fewer if the split is smaller)."""
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return [perm[b * batch_size:(b + 1) * batch_size] for b in range(batches) if b * batch_size < size]


@torch.no_grad()
def recalibrated_subnet(supernet: Supernet, arch: Sequence[int], calibration_split, *, batch_size: int,
                        calibration_batches: int, seed: int, to_device: Callable[[torch.Tensor], torch.Tensor],
                        autocast=None, ranks=None) -> Net:
    """`arch` as a Net with the supernet's weights (a copy) and its BatchNorm statistics recomputed exactly
    on the seeded calibration subset of `calibration_split`; in eval mode."""
    net = Net.from_supernet(supernet, arch)
    param = next(supernet.parameters())
    net = net.to(param.device, memory_format=torch.channels_last if param.device.type == "cpu" else
                 torch.contiguous_format)
    autocast = autocast or contextlib.nullcontext()
    active = ranks is not None and ranks.active
    shard = ranks.shard if active else (lambda t: t)

    def forward(model, x):
        with autocast:
            return model(x)

    batches = (to_device(calibration_split.batch(shard(idx), train=False)[0])
               for idx in calibration_indices(len(calibration_split), batch_size, calibration_batches, seed))
    recalibrate_bn(net, batches, forward, _sum_over_ranks if active else None)
    return net.eval()


@torch.no_grad()
def evaluate_arch(supernet: Supernet, arch: Sequence[int], calibration_split, eval_split, *, batch_size: int,
                  calibration_batches: int, seed: int, to_device: Callable[[torch.Tensor], torch.Tensor],
                  autocast=None, ranks=None) -> Evaluation:
    """Top-1 / top-5 accuracy of `arch` on `eval_split` with inherited weights and exactly recalibrated
    BatchNorm (calibration subset of `calibration_split` from `seed`), plus its MFLOPs and params. The
    supernet is not modified. `to_device` puts a batch on the model's device and memory format; `ranks`
    (search.distributed.Ranks) shares the calibration batches and the scored images over processes."""
    space = supernet.space
    net = recalibrated_subnet(supernet, arch, calibration_split, batch_size=batch_size,
                              calibration_batches=calibration_batches, seed=seed, to_device=to_device,
                              autocast=autocast, ranks=ranks)
    top1, top5, images = score(net, eval_split, batch_size, to_device, autocast, ranks)
    cost = cost_model.arch_cost(space, arch)
    return Evaluation(arch=space.arch_strings(arch), top1=top1, top5=top5, images=images, mflops=cost.mflops,
                      params=cost.params)


@torch.no_grad()
def score(net: nn.Module, split, batch_size: int, to_device: Callable[[torch.Tensor], torch.Tensor], autocast=None,
          ranks=None) -> tuple:
    """(top-1, top-5, images) of `net` in eval mode on every image of `split`, shared over `ranks`."""
    autocast = autocast or contextlib.nullcontext()
    active = ranks is not None and ranks.active
    was_training = net.training
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    n = len(split)
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        if active:
            idx = idx[ranks.rank::ranks.world]  # every image once over the ranks, whatever the last batch's size
        if len(idx) == 0:
            continue
        x, y = split.batch(idx, train=False)
        with autocast:
            logits = net(to_device(x)).float().cpu()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts += torch.tensor([float((top[:, 0] == y).sum()), float((top == y[:, None]).any(1).sum()), len(y)],
                               dtype=torch.float64)
    if active:
        _sum_over_ranks(counts)
    net.train(was_training)
    images = max(float(counts[2]), 1.0)
    return float(counts[0]) / images, float(counts[1]) / images, int(counts[2])


def _sum_over_ranks(t: torch.Tensor) -> None:
    import torch.distributed as dist
    on = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(on)
    t.copy_(on)


# --- the command ---------------------------------------------------------------------------------------------
def _read_arch(space, arg: Optional[List[str]], run: str) -> List[int]:
    if not arg:
        path = os.path.join(run, "arch.json")
        if not os.path.exists(path):
            raise ValueError(f"{run} has no arch.json (the search did not finish): give --arch block strings")
        return list(json.load(open(path))["choices"])
    if len(arg) == 1 and arg[0].endswith(".json"):
        with open(arg[0]) as f:
            d = json.load(f)
        arg = d["arch"] if isinstance(d, dict) else d
    return space.arch_from_strings(arg)


def load_run(run: str, device: Optional[str] = None):
    """A finished (or checkpointed) search run, set up for scoring: its configuration, data and space, the
    supernet with the weights of its last checkpoint. ValueError for what is not a run."""
    from .search import Search, SearchConfig
    from .search import checkpoint as ckpt
    cfg_path = os.path.join(run, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{run} is not a search run directory (no config.json)")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved.update(out=run, resume=None, progress=False, plots=False, tensorboard=False, prefetch=0)
    if device:
        saved["device"] = device
    search = Search.for_evaluation(SearchConfig(**saved))
    try:
        _, state = ckpt.load_latest(search.ckpt_dir)
    except ckpt.CheckpointError as e:
        raise ValueError(str(e)) from None
    search.model.load_state_dict(state["model"])
    return search


def test_images(search):
    """The fixed test split of the embedded data set a search ran on (ValueError for one that sets none apart)."""
    from .data import load_test_split
    return load_test_split(search.dataset_name, search.space.config.resolution)


def main(argv: Optional[List[str]] = None) -> Evaluation:
    p = argparse.ArgumentParser(prog="python -m betanas_fast.evaluate",
                                description="Accuracy, MFLOPs and params of an architecture of a run's space, with "
                                            "the weights inherited from the run's supernet (BatchNorm recalibrated "
                                            "exactly on a fixed, seeded subset; the supernet is not modified)")
    p.add_argument("run", help="a search run directory (config.json, checkpoints/)")
    p.add_argument("--arch", nargs="+", default=None,
                   help="block strings (one per choice block), or an arch.json; default: the run's searched one")
    p.add_argument("--split", choices=("val", "heldout", "test"), default="val",
                   help="the images to score: the run's validation or held-out split, or the fixed test split of an "
                        "embedded data set (digits, mnist-cluttered), which no search loads")
    p.add_argument("--seed", type=int, default=None, help="calibration subset seed (default: the run's seed + 5)")
    p.add_argument("--calibration-batches", type=int, default=None,
                   help="calibration batches (default: the run's --bn-recalib-batches)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the run's)")
    args = p.parse_args(argv)
    try:
        search = load_run(args.run, args.device)
        arch = _read_arch(search.space, args.arch, args.run)
        search.space.check_arch(arch)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}")
    try:
        split = test_images(search) if args.split == "test" else \
            search.data.val if args.split == "val" and len(search.data.val) else search.data.heldout
    except ValueError as e:
        raise SystemExit(f"error: --split test: {e}")
    result = search.evaluate(arch, split, seed=args.seed, calibration_batches=args.calibration_batches)
    print(json.dumps(asdict(result)))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
