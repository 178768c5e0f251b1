"""Scoring a sub-network of a trained supernet, and a finished search's supernet loaded to be scored.

The sub-network is a copy (`Net.from_supernet`): the supernet's weights and buffers are never touched,
however many architectures are scored. Its BatchNorm statistics are recomputed on a fixed, seeded
calibration subset of the weight-training split, exactly: each BatchNorm's running mean and variance
become the mean and (unbiased) variance of its input over every image of the subset, from sums of x and
x² in float64 over all calibration batches (reduced over ranks under torchrun), not an average of
per-batch variances. As in training, the calibration forward normalises with each batch's statistics;
so the statistics of a BatchNorm are those of the activations it sees in training, whatever the
calibration batch size for the first one, and close to it for the later ones.

The search (its final score, SPOS's evolution), the evaluate and export commands and the studies score
through `SupernetScorer`; the training command scores its net with `score`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cost as cost_model
from .data.base import SearchData
from .data.load import data_source, load_test_split, search_data
from .nn.layers import DWConvBNAct
from .nn.supernet import Net, Supernet, set_bn_batch_stats_frozen
from .runs import files
from .runs.ranks import Ranks, init as init_ranks, ranks_from_env, sum_over_ranks
from .runs.runtime import (autocast as autocast_context, configure_process, model_memory_format, resolve_amp_dtype,
                           resolve_device)
from .space import SearchSpace, space_from_settings


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
    net = net.to(param.device, memory_format=model_memory_format(param.device))
    autocast = autocast or contextlib.nullcontext()
    active = ranks is not None and ranks.active
    shard = ranks.shard if active else (lambda t: t)

    def forward(model, x):
        with autocast:
            return model(x)

    batches = (to_device(calibration_split.batch(shard(idx), train=False)[0])
               for idx in calibration_indices(len(calibration_split), batch_size, calibration_batches, seed))
    recalibrate_bn(net, batches, forward, sum_over_ranks if active else None)
    return net.eval()


@torch.no_grad()
def evaluate_arch(supernet: Supernet, arch: Sequence[int], calibration_split, eval_split, *, batch_size: int,
                  calibration_batches: int, seed: int, to_device: Callable[[torch.Tensor], torch.Tensor],
                  autocast=None, ranks=None) -> Evaluation:
    """Top-1 / top-5 accuracy of `arch` on `eval_split` with inherited weights and exactly recalibrated
    BatchNorm (calibration subset of `calibration_split` from `seed`), plus its MFLOPs and params. The
    supernet is not modified. `to_device` puts a batch on the model's device and memory format; `ranks`
    (runs.ranks.Ranks) shares the calibration batches and the scored images over processes."""
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
        sum_over_ranks(counts)
    net.train(was_training)
    images = max(float(counts[2]), 1.0)
    return float(counts[0]) / images, float(counts[1]) / images, int(counts[2])


class SupernetScorer:
    """Scores architectures with the weights they inherit from `model` (a supernet): BatchNorm recalibrated
    exactly on the seeded calibration subset (`calibration_batches` batches of `batch_size` from
    `calibration_split`, drawn from `seed` unless a call names another), run under `autocast` on the device
    `to_device` puts a batch on; `ranks` share the work under torchrun."""

    def __init__(self, model: Supernet, calibration_split, *, batch_size: int, calibration_batches: int, seed: int,
                 to_device: Callable[[torch.Tensor], torch.Tensor], autocast=None, ranks: Optional[Ranks] = None):
        self.model, self.calibration_split = model, calibration_split
        self.batch_size, self.calibration_batches, self.seed = batch_size, calibration_batches, seed
        self.to_device, self.autocast, self.ranks = to_device, autocast, ranks

    def _settings(self, seed: Optional[int], calibration_batches: Optional[int]) -> dict:
        return dict(batch_size=self.batch_size, calibration_batches=calibration_batches or self.calibration_batches,
                    seed=self.seed if seed is None else seed, to_device=self.to_device, autocast=self.autocast,
                    ranks=self.ranks)

    def subnet(self, arch: Sequence[int], seed: Optional[int] = None, calibration_batches: Optional[int] = None) -> Net:
        """`arch` as a Net with the supernet's weights (a copy) and BatchNorm recalibrated exactly, in eval mode:
        what an export of the architecture from this supernet holds."""
        return recalibrated_subnet(self.model, arch, self.calibration_split, **self._settings(seed, calibration_batches))

    def evaluate(self, arch: Sequence[int], split, seed: Optional[int] = None,
                 calibration_batches: Optional[int] = None) -> Evaluation:
        """`arch` scored on `split` (top-1, top-5, MFLOPs, params); the supernet untouched."""
        return evaluate_arch(self.model, arch, self.calibration_split, split, **self._settings(seed, calibration_batches))


def search_scorer(model: Supernet, data: SearchData, config: Mapping, device: torch.device, autocast,
                  ranks: Optional[Ranks]) -> SupernetScorer:
    """The scorer of a search: calibration on its weight-training split, with its batch, its
    --bn-recalib-batches and its seed + 5 (`config`: the search's settings as config.json saves them)."""
    memory_format = model_memory_format(device)
    return SupernetScorer(model, data.train, batch_size=config["batch_size"],
                          calibration_batches=config["bn_recalib_batches"], seed=config["seed"] + 5,
                          to_device=lambda x: x.to(device).contiguous(memory_format=memory_format),
                          autocast=autocast, ranks=ranks)


@dataclass
class FinishedSearch:
    """A search run loaded to be scored: its saved configuration, space, data and the supernet with the weights
    of its last checkpoint."""
    run_dir: str
    config: dict
    dataset: str
    space: SearchSpace
    data: SearchData
    model: Supernet
    device: torch.device
    ranks: Ranks
    scorer: SupernetScorer

    def evaluate(self, arch: Sequence[int], split, **kw) -> Evaluation:
        return self.scorer.evaluate(arch, split, **kw)

    def subnet(self, arch: Sequence[int], **kw) -> Net:
        return self.scorer.subnet(arch, **kw)

    def split(self, name: str):
        """"val" (the validation split, or the held-out one of a search that set none apart), "heldout", or
        "test" (the fixed test split of an embedded data set; ValueError for one that sets none apart)."""
        if name == "test":
            return load_test_split(self.dataset, self.space.config.resolution)
        if name == "val" and len(self.data.val):
            return self.data.val
        return self.data.heldout


def load_search(run_dir: str, device: Optional[str] = None) -> FinishedSearch:
    """A finished (or checkpointed) search run, set up for scoring, with the process settings it ran with (or
    `device`) and the autocast dtype its checkpoint says it chose. ValueError for what is not a search run."""
    config = files.read_config(run_dir)
    if "strategy" not in config:
        raise ValueError(f"{run_dir} is not a search run directory (its {files.CONFIG} names no strategy)")
    ranks = ranks_from_env()
    dev = resolve_device(init_ranks(ranks, device or config["device"]))
    configure_process(dev, config["threads"],
                      config["deterministic"] if config["deterministic"] is not None else dev.type == "cpu")
    with ranks.main_first():
        data = search_data(config, run_dir, dev.type, ranks.is_main)
    space = space_from_settings(config, num_classes=data.num_classes)
    torch.manual_seed(config["seed"])
    model = Supernet(space).to(dev, memory_format=model_memory_format(dev))
    try:
        _, state = files.load_latest(files.checkpoint_dir(run_dir))
    except files.CheckpointError as e:
        raise ValueError(str(e)) from None
    model.load_state_dict(state["model"])
    chosen = state.get("autocast") or {}
    if chosen.get("device_type") == dev.type:  # what the search ran with (it may have timed --amp's choice)
        amp_dtype = getattr(torch, chosen["dtype"]) if chosen["dtype"] else None
    else:  # on another device, or a checkpoint that does not say: --amp resolved here, untimed
        amp_dtype = resolve_amp_dtype(config["amp"], config["amp_dtype"], dev, log=lambda *a: None)
    scorer = search_scorer(model, data, config, dev, autocast_context(dev, amp_dtype), ranks)
    return FinishedSearch(run_dir, config, data_source(config["dataset"], config["data"]), space, data, model, dev,
                          ranks, scorer)
