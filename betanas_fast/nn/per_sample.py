"""Per-sample paths through one choice block: every sample takes its own candidate.

The samples are grouped by path and each candidate runs on its own group only, so its BatchNorm
normalises over that group and a candidate without samples takes no part in autograd. With batch
statistics (training), the expand and project stages run through the candidate's own modules and the
depthwise stages of all groups run in one call of the grouped op, after which each candidate's running
statistics are updated as DWConvBNAct does. Otherwise every candidate simply runs on its group.
"""
from typing import List, NamedTuple, Sequence

import torch
from torch import nn

from .. import ops
from .._rules import conv_out_size
from .layers import update_bn_running_stats
from .mbconv import MBConv


def _uses_batch_stats(cand: MBConv) -> bool:
    bn = cand.depthwise.bn
    return bn.training or not bn.track_running_stats


def _depthwise_grouped(names: Sequence[str], cands: Sequence[MBConv], hs: Sequence[torch.Tensor]
                       ) -> List[torch.Tensor]:
    """The depthwise stage of each candidate on its group (batch statistics per group), in one op call."""
    dws = [c.depthwise for c in cands]
    stride, act, eps = dws[0].stride, dws[0].act, dws[0].bn.eps
    if any((d.stride, d.act, d.bn.eps) != (stride, act, eps) for d in dws):
        raise ValueError("the candidates of one choice block must share stride, activation and BatchNorm eps")
    h, w = hs[0].shape[2:]
    ho, wo = conv_out_size(h, stride), conv_out_size(w, stride)
    samples, channels = [t.shape[0] for t in hs], [t.shape[1] for t in hs]
    for name, n in zip(names, samples):
        if n * ho * wo == 1:
            raise ValueError(f"candidate {name!r} got a single sample at {ho}x{wo}: batch statistics need more "
                             f"than one value per channel (per-sample path sampling needs a batch of at least "
                             f"2 x the number of candidates)")
    out, mean, var = ops.dw_bn_act_grouped_train(
        torch.cat([t.reshape(-1) for t in hs]), torch.cat([d.conv.weight.reshape(-1) for d in dws]),
        torch.cat([d.bn.weight for d in dws]), torch.cat([d.bn.bias for d in dws]),
        samples, channels, [d.conv.kernel_size[0] for d in dws], h, w, stride, act, eps)
    outs = out.split([n * c * ho * wo for n, c in zip(samples, channels)])
    for d, n, m, v in zip(dws, samples, mean.split(channels), var.split(channels)):
        if d.bn.training and d.bn.track_running_stats:
            update_bn_running_stats(d.bn, m, v, n * ho * wo)
    return [o.view(n, c, ho, wo) for o, n, c in zip(outs, samples, channels)]


class Routes(NamedTuple):
    """How the samples of a batch go through per-sample paths, for every block: `counts[l][m]` samples take
    candidate m in block l (read on the host: they size the groups), `order[l]` lists the samples grouped by
    candidate, `inverse[l]` puts the grouped outputs back in sample order (both LongTensor [L, N] on the model's
    device)."""
    counts: List[List[int]]
    order: torch.Tensor
    inverse: torch.Tensor


def per_sample_routes(paths: torch.Tensor, num_candidates: int, device: torch.device) -> Routes:
    """The Routes of `paths` (LongTensor [L, N], sample i takes paths[l, i] in block l), computed on the host, where
    the paths are drawn, and sent to `device` in one non-blocking copy from pinned memory (the group sizes never
    wait for the device)."""
    paths = paths.cpu()
    order = torch.argsort(paths, dim=1, stable=True)
    inverse = torch.empty_like(order).scatter_(1, order, torch.arange(paths.shape[1]).expand_as(order).contiguous())
    counts = [torch.bincount(row, minlength=num_candidates).tolist() for row in paths]
    both = torch.stack([order, inverse])
    if torch.device(device).type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    return Routes(counts, both[0], both[1])


def choice_block_per_sample(candidates: nn.ModuleDict, names: Sequence[str], x: torch.Tensor,
                            paths: torch.Tensor, routes: Routes = None, block: int = 0) -> torch.Tensor:
    """The block's output when sample i takes candidate `names[paths[i]]` (paths: LongTensor [N]), routed by
    `routes[block]` when given (Supernet.forward_per_sample computes every block's at once), else by this block's
    own."""
    if routes is None:
        routes, block = per_sample_routes(paths.view(1, -1), len(names), x.device), 0
    counts, order, inverse = routes.counts[block], routes.order[block], routes.inverse[block]
    groups = x.index_select(0, order).split(counts)
    used = [(names[m], candidates[names[m]], g) for m, g in enumerate(groups) if counts[m] > 0]
    grouped = [(name, c, g) for name, c, g in used if isinstance(c, MBConv) and _uses_batch_stats(c)]
    dw_outs = {}
    if grouped:
        group_names, cands, gs = zip(*grouped)
        hs = [c.expand(g) for c, g in zip(cands, gs)]
        dw_outs = dict(zip(group_names, _depthwise_grouped(group_names, cands, hs)))
    outs = []
    for name, c, g in used:
        if name in dw_outs:
            o = c.project(dw_outs[name])
            outs.append(o + g if c.has_skip else o)
        else:  # the identity path, or evaluation with running statistics
            outs.append(c(g))
    return torch.cat(outs).index_select(0, inverse)
