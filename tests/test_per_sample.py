"""Per-sample path sampling in Phase 1: the balanced and the p-following samplers, the grouped dispatch
through the supernet against eager torch modules run group by group, and the search with it."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from betanas_fast.nn import MBConv, Supernet, set_bn_batch_stats_frozen
from betanas_fast.ops import ieee_fp32
from betanas_fast.search import ArchState, Search, SearchConfig
from betanas_fast.space import build_space

from common import CUDA_MARKS, DEVICES, read_history, tiny


# --- samplers --------------------------------------------------------------------------------------------------
def _state():
    """Block 0: 7 paths, one dropped; block 1: 6 allowed; block 2: a single remaining path."""
    st = ArchState([[True] * 7, [True] * 6 + [False], [True] * 7])
    st.remaining[0, 2] = False
    st.remaining[2] = False
    st.remaining[2, 4] = True
    return st


def _step_counts(paths, num_paths):
    return torch.stack([torch.bincount(p, minlength=num_paths) for p in paths])


@pytest.mark.parametrize("batch", [1, 4, 6, 13, 29, 64])
def test_balanced_per_sample_sampler(batch):
    st, g = _state(), torch.Generator().manual_seed(batch)
    total = torch.zeros(3, 7, dtype=torch.long)
    first_sample = torch.zeros(7)
    neighbours_equal = expected_equal = 0.0
    for _ in range(300):
        paths = st.sample_uniform_cycle_per_sample(g, batch)
        assert paths.shape == (3, batch) and paths.dtype == torch.long
        counts = _step_counts(paths, 7)
        total += counts
        first_sample[paths[0, 0]] += 1
        if batch > 1:  # a random deal: neighbours share a path as often as two random draws without replacement
            neighbours_equal += float((paths[0, 1:] == paths[0, :-1]).float().mean())
            expected_equal += float((counts[0] * (counts[0] - 1)).sum()) / (batch * (batch - 1))
        for l in range(3):
            rem = st.remaining[l]
            assert counts[l][~rem].sum() == 0
            m = int(rem.sum())
            # within one step: floor or ceil of N / M' for every remaining path
            assert set(counts[l][rem].tolist()) <= {batch // m, -(-batch // m)}, (l, counts[l])
            # over the steps so far: exactly balanced up to the open cycle
            assert total[l][rem].max() - total[l][rem].min() <= 1, (l, total[l])
    assert (paths[2] == 4).all()
    # the samples get the step's paths in random order: sample 0's marginal is uniform over block 0's six
    freq = first_sample[st.remaining[0]] / first_sample.sum()
    assert (freq - 1 / 6).abs().max() < 0.1, freq
    assert abs(neighbours_equal - expected_equal) / 300 < 0.03, (neighbours_equal / 300, expected_equal / 300)


def test_balanced_per_sample_sampler_after_a_drop_and_on_resume():
    st, g = _state(), torch.Generator().manual_seed(0)
    for _ in range(3):
        st.sample_uniform_cycle_per_sample(g, 10)
    st.remaining[0, 5] = False  # a drop mid-cycle
    saved, gen_state = st.state_dict(), g.get_state()
    cont = [st.sample_uniform_cycle_per_sample(g, 10) for _ in range(20)]
    counts = sum(_step_counts(p, 7) for p in cont)
    assert counts[0, 5] == 0 and counts[0, 2] == 0
    assert set(_step_counts(cont[0], 7)[0][st.remaining[0]].tolist()) <= {2}  # 10 over 5 remaining
    resumed, g2 = ArchState(st.allowed.tolist()), torch.Generator()
    resumed.load_state_dict(saved)
    g2.set_state(gen_state)
    for p in cont:
        assert torch.equal(resumed.sample_uniform_cycle_per_sample(g2, 10), p)


def test_proxyless_per_sample_follows_p():
    st = ArchState([[True] * 7, [True] * 6 + [False]])
    st.remaining[0, 3] = False
    with torch.no_grad():
        st.alpha.copy_(torch.tensor([[1.5, 0.0, -1.0, 9.0, 0.5, 0.0, -0.5], [0.0, 2.0, 0.0, 0.0, -1.0, 0.3, 9.0]]))
    n = 6000
    paths = st.sample_from_p_per_sample(torch.Generator().manual_seed(0), n)
    assert paths.shape == (2, n)
    freq = _step_counts(paths, 7).float() / n
    assert freq[0, 3] == 0 and freq[1, 6] == 0
    assert (freq - st.probs()).abs().max() < 0.025, (freq, st.probs())  # ~4 standard deviations


# --- the dispatch against eager modules, group by group ---------------------------------------------------------
def _with_eager_depthwise(net: nn.Module) -> nn.Module:
    """A copy whose every MBConv runs the torch composite (Conv2d groups=C, BatchNorm2d, ReLU6) as depthwise."""
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, MBConv):
            d, c, k = m.depthwise, m.depthwise.conv.in_channels, m.kernel_size
            comp = nn.Sequential(nn.Conv2d(c, c, k, d.stride, k // 2, groups=c, bias=False),
                                 nn.BatchNorm2d(c, eps=d.bn.eps, momentum=d.bn.momentum), nn.ReLU6()
                                 ).to(d.conv.weight.device, d.conv.weight.dtype)
            comp[0].load_state_dict(d.conv.state_dict())
            comp[1].load_state_dict(d.bn.state_dict())
            m.depthwise = comp
    return ref


def _eager_key(name: str) -> str:
    return name.replace("depthwise.conv.", "depthwise.0.").replace("depthwise.bn.", "depthwise.1.")


def _forward_by_groups(ref: Supernet, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """Each block: every path's samples gathered, run through the candidate, written back in place."""
    h = ref.first(ref.stem(x))
    for block, p in zip(ref.blocks, paths):
        out = None
        for m in p.unique().tolist():
            idx = (p == m).nonzero().flatten()
            o = block(h[idx], m)
            out = (o.new_zeros((len(p),) + o.shape[1:]) if out is None else out).index_copy(0, idx, o)
        h = out
    return ref._head(h)


def _randomise(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _paths(space, batch, kind, seed):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(space.allowed_mask())
    rows = []
    for l, a in enumerate(allowed):
        legal = a.nonzero().flatten()
        if kind == "random":
            rows.append(legal[torch.randint(len(legal), (batch,), generator=g)])
        elif kind == "one_path":  # block 2 (the one with skip) all on skip, the others all on one MBConv
            rows.append(torch.full((batch,), int(legal[-1] if l == 2 else legal[l % len(legal)])))
        else:  # "sizes_0_and_1": one path gets a single sample, some get none
            row = torch.full((batch,), int(legal[0]))
            row[: batch // 2] = int(legal[1])
            row[batch // 2] = int(legal[-1])
            rows.append(row[torch.randperm(batch, generator=g)])
    return torch.stack(rows)


# The grouped dispatch on each device: the CPU in NCHW; CUDA in NCHW and channels_last (the engine's layout,
# runs.runtime.model_memory_format), whose grouped op flattens each group in NCHW order.
DEVICE_LAYOUTS = [pytest.param("cpu", torch.contiguous_format, id="cpu-nchw"),
                  pytest.param("cuda", torch.contiguous_format, id="cuda-nchw", marks=CUDA_MARKS),
                  pytest.param("cuda", torch.channels_last, id="cuda-channels_last", marks=CUDA_MARKS)]
# float64 throughout: on the CPU the two sides agree to rounding; on CUDA cuDNN's float64 weight gradients add in
# another (and not a fixed) order
FLOAT64_TOLERANCE = {"cpu": dict(atol=1e-10, rtol=1e-8), "cuda": dict(atol=1e-9, rtol=1e-7)}

CASES = [
    ("random", dict(), 29, None),
    ("random", dict(), 16, 0.1),
    ("sizes_0_and_1", dict(), 9, 0.1),
    ("sizes_0_and_1", dict(candidates=["mb_k3_e1", "mb_k7_e3", "mb_k5_e6", "skip"]), 11, None),
    ("one_path", dict(), 7, 0.1),
    ("random", dict(candidates=["mb_k3_e1", "mb_k5_e1", "mb_k7_e3", "skip"]), 15, 0.1),
]


@pytest.mark.parametrize("kind,space_kw,batch,momentum", CASES)
@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
def test_per_sample_forward_matches_eager_groups(kind, space_kw, batch, momentum, device, layout):
    torch.manual_seed(batch)
    space = build_space("demo", num_classes=10, stage_depths=[1, 2, 1, 1], **space_kw)
    net = Supernet(space).double().train()  # float64: a mismatch cannot hide in rounding
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    _randomise(net, seed=batch)
    ref = _with_eager_depthwise(net)
    net.to(device, memory_format=layout)
    ref.to(device, memory_format=layout)
    tol = FLOAT64_TOLERANCE[device]
    for step in range(2):  # running statistics accumulate (cumulatively when momentum is None)
        paths = _paths(space, batch, kind, seed=step)
        x, y = torch.randn(batch, 3, 32, 32, dtype=torch.float64), torch.randint(10, (batch,))
        x, y = x.to(device).contiguous(memory_format=layout), y.to(device)
        for model in (net, ref):
            model.zero_grad(set_to_none=True)
        logits = net.forward_per_sample(x, paths)
        ref_logits = _forward_by_groups(ref, x, paths.to(device))
        torch.testing.assert_close(logits, ref_logits, **tol)
        F.cross_entropy(logits, y).backward()
        F.cross_entropy(ref_logits, y).backward()
        eager = dict(ref.named_parameters())
        for name, p in net.named_parameters():
            q = eager[_eager_key(name)]
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
        used = [(l, space.candidate_names[m]) for l, row in enumerate(paths) for m in row.unique().tolist()]
        for l, name in [(l, n) for l, b in enumerate(net.blocks) for n in b.candidates]:
            params = list(net.blocks[l].candidates[name].parameters())
            assert all((p.grad is not None) == ((l, name) in used) for p in params), (l, name)
    eager_state = ref.state_dict()
    for name, v in net.state_dict().items():
        torch.testing.assert_close(v, eager_state[_eager_key(name)], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["eval", "frozen"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_without_running_stat_updates(mode, device):
    """Evaluation (running statistics) and Phase 2's frozen batch statistics: the state stays untouched,
    and in evaluation every sample's output is that of its own sub-net."""
    torch.manual_seed(5)
    space = build_space("demo", num_classes=10, stage_depths=[1, 2, 1, 1])
    net = Supernet(space)
    _randomise(net, seed=1)
    net.to(device)
    if mode == "eval":
        net.eval()
    else:
        set_bn_batch_stats_frozen(net, True)
    before = copy.deepcopy(net.state_dict())
    paths, x = _paths(space, 12, "random", seed=3), torch.randn(12, 3, 32, 32).to(device)
    tol = {"cpu": dict(atol=1e-5, rtol=1e-4), "cuda": dict(atol=1e-4, rtol=1e-3)}[device]
    with ieee_fp32():  # float32 on CUDA: cuDNN's convolutions without TF32 on both sides
        out = net.forward_per_sample(x, paths)
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k
        if mode == "eval":
            for i in (0, 5, 11):
                torch.testing.assert_close(out[i:i + 1], net(x[i:i + 1], paths[:, i].tolist()), **tol)
        else:
            ref = _with_eager_depthwise(net)
            set_bn_batch_stats_frozen(ref, True)
            torch.testing.assert_close(out, _forward_by_groups(ref, x, paths.to(device)), **tol)


def test_single_sample_without_spatial_extent_rejected():
    space = build_space("demo", num_classes=10, stage_depths=[1, 2, 1, 1], resolution=16)  # block 3 outputs 1x1
    net = Supernet(space).train()
    paths = torch.zeros(5, 6, dtype=torch.long)
    paths[3, 0] = 1  # path 1 of block 3: one sample at 1x1, a single value per channel
    with pytest.raises(ValueError, match="'mb_k3_e6' got a single sample at 1x1"):
        net.forward_per_sample(torch.randn(6, 3, 16, 16), paths)
    with pytest.raises(ValueError, match=r"paths must be \[blocks, batch\]"):
        net.forward_per_sample(torch.randn(6, 3, 16, 16), paths[:, :5])


# --- the search ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(path_sampling="per-sample", batch_size=13), r"a batch of at least 2 x the number of candidates \(14\) per process"),
    (dict(path_sampling="per-step"), r"path_sampling must be one of \('per-batch', 'per-sample'\), got 'per-step'"),
])
def test_bad_per_sample_configuration_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        Search(tiny(**kw))


def test_per_sample_search_runs_balanced_and_resumes_identically(tmp_path):
    kw = dict(epochs=1, warmup_epochs=0, batch_size=64, checkpoint_every=4, drop_threshold=-0.02, arch_lr=0.03,
              path_sampling="per-sample")
    full = tiny(tmp_path, **kw)
    full.out = str(tmp_path / "full")
    Search(full).run()
    part = tiny(tmp_path, stop_after=10, **kw)
    part.out = str(tmp_path / "part")
    assert Search(part).run() is None
    Search(SearchConfig(resume=part.out, progress=False)).run()
    a, b = (json.load(open(os.path.join(d, "arch.json"))) for d in (full.out, part.out))
    assert a == b
    ha, hb = read_history(full.out), read_history(part.out)
    assert [(r["alpha"], r["phase1_counts"], r["phase1_loss"]) for r in ha] == \
        [(r["alpha"], r["phase1_counts"], r["phase1_loss"]) for r in hb]
    last, names = ha[-1], build_space("demo").candidate_names
    counts = torch.tensor(last["phase1_counts"])
    assert (counts.sum(1) == last["phase1_steps"] * 64).all()  # counted in samples
    for l, rem in enumerate(last["remaining"]):
        c = counts[l, [names.index(n) for n in rem]]
        assert c.max() - c.min() <= 1, (l, counts[l])  # balanced over the remaining paths, drops or not
    assert any(r["drops"] for r in ha)
