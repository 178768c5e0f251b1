import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from betanas_fast import ops
from betanas_fast.cost import arch_cost, candidate_cost_table, flops_cost
from betanas_fast.nn import Net
from betanas_fast.nn.supernet import build_candidate
from betanas_fast.space import build_space


@pytest.fixture
def reference_ops():
    # flop_counter sees aten convolutions; the fused kernel is opaque to it, so count on the reference path
    with ops.reference_ops():
        yield


def _flops(module, x):
    module.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("preset", ["demo", "mobile"])
def test_candidate_macs_match_flop_counter(preset, reference_ops):
    sp = build_space(preset, width_mult=0.35 if preset == "mobile" else None,
                     resolution=64 if preset == "mobile" else None)
    macs, params = candidate_cost_table(sp)
    for l in ([0, 1, 4, 12, 16] if preset == "mobile" else range(sp.num_blocks)):
        b = sp.blocks[l]
        x = torch.randn(1, b.in_channels, b.in_resolution, b.in_resolution)
        for m, ok in enumerate(b.allowed):
            if not ok:
                continue
            mod = build_candidate(sp, l, m)
            assert _flops(mod, x) == 2 * macs[l][m], (l, sp.candidate_names[m])  # 2 FLOPs per MAC
            assert sum(p.numel() for p in mod.parameters()) == params[l][m]


def test_whole_net_matches_flop_counter(reference_ops):
    sp = build_space("demo", num_classes=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        arch = [int(torch.nonzero(torch.tensor(b.allowed)).flatten()[torch.randint(sum(b.allowed), (1,), generator=g)])
                for b in sp.blocks]
        net = Net(sp, arch)
        cost = arch_cost(sp, arch)
        x = torch.randn(2, 3, 32, 32)
        assert _flops(net, x) == 2 * 2 * cost.macs  # batch 2
        assert sum(p.numel() for p in net.parameters()) == cost.params


def test_min_flops_is_the_cheapest_arch():
    sp = build_space("demo")
    cheapest = [min((m for m, ok in enumerate(b.allowed) if ok), key=lambda m: candidate_cost_table(sp)[0][l][m])
                for l, b in enumerate(sp.blocks)]
    assert arch_cost(sp, cheapest).mflops == pytest.approx(flops_cost(sp).floor())
