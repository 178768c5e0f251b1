import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from betanas_fast import ops
from betanas_fast.nn import ChoiceBlock, Net, Supernet, gate_grad_bytes, set_bn_batch_stats_frozen
from betanas_fast.ops import memory
from betanas_fast.space import build_space

from common import phase2_net


def _space():
    return build_space("demo", num_classes=10, stage_depths=[1, 2, 1, 1])


def test_only_chosen_paths_get_gradients_and_updates():
    torch.manual_seed(0)
    sp = _space()
    net = Supernet(sp)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    arch = [0, 1, 6, 0, 2]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(torch.randn(8, 3, 32, 32), arch), torch.arange(8) % 10).backward()
    opt.step()
    for l, block in enumerate(net.blocks):
        for name, path in block.candidates.items():
            chosen = name == sp.candidate_names[arch[l]]
            for p in path.parameters():
                assert (p.grad is not None) == chosen
                if not chosen:
                    assert p not in opt.state or "momentum_buffer" not in opt.state[p]
    after = net.state_dict()
    for k, v in before.items():
        if k.startswith("blocks.") and ".candidates." in k:
            l, name = int(k.split(".")[1]), k.split(".")[3]
            if name != sp.candidate_names[arch[l]]:
                assert torch.equal(v, after[k]), k  # weights and BN statistics untouched


def test_net_from_supernet_matches_path():
    torch.manual_seed(0)
    sp = _space()
    sup = Supernet(sp).eval()
    arch = [3, 0, 6, 5, 1]
    net = Net.from_supernet(sup, arch).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(net(x), sup(x, arch))


def test_bn_batch_stats_frozen_keeps_running_stats():
    torch.manual_seed(0)
    sup = Supernet(_space()).train()
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    set_bn_batch_stats_frozen(sup, True)
    with torch.no_grad():
        out_frozen = sup(torch.randn(8, 3, 32, 32), [0, 0, 0, 0, 0])
    set_bn_batch_stats_frozen(sup, False)
    assert out_frozen.isfinite().all()
    for k, v in sup.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- Phase 2's all-candidate op within a memory budget ------------------------------------------------------------
MEMORY_FORMATS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="nhwc")]


_phase2_net = phase2_net


def _counting_calls(monkeypatch):
    calls = []
    real = ops.block_gate_grads

    def counted(x, grad_out, expand_weight, *args, **kw):
        calls.append(len(expand_weight))
        return real(x, grad_out, expand_weight, *args, **kw)

    monkeypatch.setattr(ops, "block_gate_grads", counted)
    return calls


def test_gate_grad_table_freezes_the_weights_only_while_it_runs(monkeypatch):
    """The sampled path runs with the weights frozen, so that the depthwise kernel is told to skip its weight
    gradient; afterwards every parameter requires grad again, none has a gradient, and the table is the one
    the unfrozen weights give (the reference ops: autograd's own formulas, weight gradients or not)."""
    net, x, y, arch, remaining, _ = _phase2_net(torch.channels_last)
    asked = []
    real = torch.ops.betanas.dw_bn_act_train_backward

    def spy(*args):
        asked.append(args[-1] if len(args) == 11 else True)
        return real(*args)

    monkeypatch.setattr(torch.ops.betanas, "dw_bn_act_train_backward", spy)
    table, loss, _ = net.gate_grad_table(x, y, arch, remaining)
    assert asked and not any(asked)  # every call without the weight gradient
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    with ops.reference_ops():
        want, want_loss, _ = net.gate_grad_table(x, y, arch, remaining)
    torch.testing.assert_close(table, want, rtol=1e-4, atol=1e-4)
    assert loss == pytest.approx(want_loss, rel=1e-5)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_chunked_gate_grad_table_equals_unchunked(memory_format, monkeypatch):
    net, x, y, arch, remaining, inputs = _phase2_net(memory_format)
    assert inputs[2].is_contiguous(memory_format=memory_format)
    calls = _counting_calls(monkeypatch)
    want, want_loss, want_acc = net.gate_grad_table(x, y, arch, remaining)
    assert len(calls) == net.space.num_blocks  # one call per block
    others = [[m for m in remaining[l].nonzero().flatten().tolist() if m != arch[l]] for l in range(len(inputs))]
    need = [[gate_grad_bytes(inputs[l], net.blocks[l].path(m)) for m in others[l]] for l in range(len(inputs))]
    largest = max(max(n) for n in need)
    # one run per block; runs of two or three of the largest; every candidate alone (each over the budget)
    for budget in (1 << 40, 3 * largest, 2 * largest, 1):
        calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, loss, acc = net.gate_grad_table(x, y, arch, remaining, memory_budget=budget)
        assert torch.equal(got, want), (budget, (got - want).abs().max())
        assert (loss, acc) == (want_loss, want_acc)
        fused = [len([m for m in o if not isinstance(net.blocks[l].path(m), nn.Identity)])
                 for l, o in enumerate(others)]
        if budget == 1:
            assert sorted(calls) == sorted([1] * sum(fused))
            assert len(caught) == sum(fused)  # each block and candidate warned once
        elif budget < 1 << 40:
            assert len(calls) > net.space.num_blocks and max(calls) > 1 and sum(calls) == sum(fused)
            assert not caught
        else:
            assert calls == fused
    assert (want[2, net.space.index_of("skip")] != 0) and remaining[2, net.space.index_of("skip")]


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_gate_grads_identity_and_over_budget_warning(memory_format):
    net, x, _, _, _, inputs = _phase2_net(memory_format)
    block, skip = net.blocks[2], net.space.index_of("skip")
    x2 = inputs[2]
    g = torch.randn(x2.shape).to(memory_format=memory_format)
    net.train()
    set_bn_batch_stats_frozen(net, True)
    identity = float((x2.double() * g.double()).sum())
    only = block.gate_grads(x2, g, [skip], memory_budget=0)
    assert only[skip] == pytest.approx(identity, rel=1e-6)
    choices = [0, skip, 1]
    want = block.gate_grads(x2, g, choices)
    need = gate_grad_bytes(x2, block.path(1))
    budget = gate_grad_bytes(x2, block.path(0))  # room for mb_k3_e3 but not for mb_k3_e6
    assert need > budget
    with pytest.warns(UserWarning) as record:
        got = block.gate_grads(x2, g, choices, memory_budget=budget)
    assert len(record) == 1
    message = str(record[0].message)
    assert "block 2" in message and "'mb_k3_e6'" in message and f"{need} bytes" in message
    assert got == want and got[skip] == pytest.approx(identity, rel=1e-6)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        block.gate_grads(x2, g, choices, memory_budget=budget)
    assert not again  # said once per block and candidate
    set_bn_batch_stats_frozen(net, False)


def test_gate_grad_chunks_are_consecutive_runs_within_the_budget():
    block = ChoiceBlock(build_space("mobile"), 0)
    x = torch.empty(32, 16, 112, 112, device="meta")
    choices = list(range(6))
    need = {m: gate_grad_bytes(x, block.path(m)) for m in choices}
    assert block.gate_grad_chunks(x, choices) == [choices] and block.gate_grad_chunks(x, []) == []
    for budget in (max(need.values()), 256 << 20, 2 * max(need.values()), sum(need.values())):
        chunks = block.gate_grad_chunks(x, choices, budget)
        assert [m for c in chunks for m in c] == choices
        assert all(sum(need[m] for m in c) <= budget for c in chunks)
        # greedy: the next chunk's first candidate did not fit in the chunk before
        assert all(sum(need[m] for m in a) + need[b[0]] > budget for a, b in zip(chunks, chunks[1:]))
    assert len(block.gate_grad_chunks(x, choices, sum(need.values()))) == 1
    with pytest.raises(ValueError, match="memory_budget must be >= 0"):
        block.gate_grad_chunks(x, choices, -1)


def test_gate_grad_bytes_is_positive_and_monotone():
    sp = build_space("mobile")
    block = ChoiceBlock(sp, 0)  # 16 -> 24, stride 2, at 112 x 112
    x = torch.empty(32, 16, 112, 112, device="meta")
    e3, e6 = block.path(sp.index_of("mb_k3_e3")), block.path(sp.index_of("mb_k3_e6"))
    # the activations of the kernels, h + y + z, dominate: 4 bytes x 32 x (96 x 112^2 + 96 x 56^2 + 24 x 56^2)
    acts = 4 * 32 * (96 * 112 * 112 + 96 * 56 * 56 + 24 * 56 * 56)
    assert acts <= gate_grad_bytes(x, e6) <= acts * 1.001
    for m in range(6):
        cand = block.path(m)
        b = gate_grad_bytes(x, cand)
        assert b > 0
        assert gate_grad_bytes(x[:16], cand) < b < gate_grad_bytes(torch.empty(64, 16, 112, 112, device="meta"), cand)
        assert gate_grad_bytes(x[..., :56, :56], cand) < b
        assert gate_grad_bytes(x.to(torch.bfloat16), cand) < b
    assert gate_grad_bytes(x, e3) < gate_grad_bytes(x, e6) < gate_grad_bytes(x, block.path(sp.index_of("mb_k7_e6")))
    assert gate_grad_bytes(x, nn.Identity()) == 0
    with pytest.raises(TypeError):
        gate_grad_bytes(x, nn.ReLU())


def test_default_phase2_budget(monkeypatch):
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = ops.default_phase2_budget(torch.device("cpu"))
    assert 0 < budget <= total // 2 + 1
    assert ops.default_phase2_budget(torch.device("cpu"), fraction=0.1) < budget
    with pytest.raises(ValueError, match="fraction"):
        ops.default_phase2_budget(torch.device("cpu"), fraction=0)

    def no_proc(*args, **kw):
        raise OSError("no /proc here")

    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    fallback = ops.default_phase2_budget(torch.device("cpu"))
    assert 0 < fallback <= total // 2 + 1
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        assert free // 2 <= ops.default_phase2_budget(torch.device("cuda")) * 1.01 + (64 << 20)
