"""Analytic multiply-adds (MACs; "FLOPs" in the NAS papers' tables) and parameter counts.

Counted: every convolution and the classifier (one MAC per weight per output position), as
`torch.utils.flop_counter` counts them (it reports 2 FLOPs per MAC). Not counted: BatchNorm (folds
into the conv at inference), activations, residual adds, pooling. Params include BN affine weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from .._rules import conv_out_size
from ..space import ChoiceBlockSpec, SearchSpace, expanded_channels


def _conv_macs(cin: int, cout: int, k: int, out_res: int, groups: int = 1) -> int:
    return cout * out_res * out_res * (cin // groups) * k * k


def _conv_params(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k


def _mbconv_macs(cin, cout, k, s, e, res) -> int:
    mid, out_res = expanded_channels(cin, e), conv_out_size(res, s)
    macs = _conv_macs(cin, mid, 1, res) if e != 1 else 0
    return macs + _conv_macs(mid, mid, k, out_res, groups=mid) + _conv_macs(mid, cout, 1, out_res)


def _mbconv_params(cin, cout, k, e) -> int:
    mid = expanded_channels(cin, e)
    p = (_conv_params(cin, mid, 1) + 2 * mid) if e != 1 else 0
    return p + _conv_params(mid, mid, k, mid) + 2 * mid + _conv_params(mid, cout, 1) + 2 * cout


def candidate_macs(space: SearchSpace, block: ChoiceBlockSpec, choice: int) -> int:
    c = space.candidates[choice]
    if c.is_skip:
        return 0
    return _mbconv_macs(block.in_channels, block.out_channels, c.kernel_size, block.stride, c.expand_ratio,
                        block.in_resolution)


def candidate_params(space: SearchSpace, block: ChoiceBlockSpec, choice: int) -> int:
    c = space.candidates[choice]
    return 0 if c.is_skip else _mbconv_params(block.in_channels, block.out_channels, c.kernel_size, c.expand_ratio)


def candidate_cost_table(space: SearchSpace):
    """(macs, params) as L x M lists; 0 where a candidate is not allowed."""
    macs = [[candidate_macs(space, b, m) if b.allowed[m] else 0 for m in range(space.num_candidates)]
            for b in space.blocks]
    params = [[candidate_params(space, b, m) if b.allowed[m] else 0 for m in range(space.num_candidates)]
              for b in space.blocks]
    return macs, params


def mflops_table(space: SearchSpace) -> List[List[float]]:
    """Per block and candidate cost in millions of multiply-adds: the cost of Eq. 6."""
    return [[v / 1e6 for v in row] for row in candidate_cost_table(space)[0]]


def fixed_cost(space: SearchSpace):
    """(macs, params) of the parts every architecture shares: stem, first block, head, classifier."""
    cfg = space.config
    r0 = space.first_block_resolution
    macs = _conv_macs(cfg.in_channels, space.stem_channels, 3, r0)
    params = _conv_params(cfg.in_channels, space.stem_channels, 3) + 2 * space.stem_channels
    macs += _mbconv_macs(space.stem_channels, space.first_block_channels, 3, 1, 1, r0)
    params += _mbconv_params(space.stem_channels, space.first_block_channels, 3, 1)
    rf = space.final_resolution
    macs += _conv_macs(space.last_channels, space.head_channels, 1, rf)
    params += _conv_params(space.last_channels, space.head_channels, 1) + 2 * space.head_channels
    macs += space.head_channels * cfg.num_classes
    params += space.head_channels * cfg.num_classes + cfg.num_classes
    return macs, params


@dataclass
class NetCost:
    macs: int
    params: int

    @property
    def mflops(self) -> float:
        return self.macs / 1e6


def arch_cost(space: SearchSpace, arch: Sequence[int]) -> NetCost:
    """Cost of the whole searched net (one choice per block)."""
    space.check_arch(arch)
    macs, params = fixed_cost(space)
    for b, m in zip(space.blocks, arch):
        macs += candidate_macs(space, b, m)
        params += candidate_params(space, b, m)
    return NetCost(macs, params)
