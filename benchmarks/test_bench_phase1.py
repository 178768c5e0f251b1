"""One Phase-1 training step (forward + backward, no optimiser) of the demo supernet with per-sample paths
(batch 64, 32x32, 10 classes, fp32, in the engine's layout on each device as the search runs,
runs.runtime.model_memory_format: channels_last; the same balanced paths, inputs and weights for every
implementation), in alternating order in the same process, on the CPU and on CUDA:

- betanas_fast: the grouped dispatch (Supernet.forward_per_sample; one grouped depthwise call per block);
- torch_modules_gather (the fair baseline): the same supernet from plain nn modules (plain_supernet), per
  block and candidate: index_select its samples, run its modules, index_copy them back. Each candidate's
  BatchNorm normalises over its own samples, as in betanas_fast: checked to give the same loss first;
- betanas_fast_per_batch (a variant, for scale): the paper's step, one path per block for the whole batch.
"""
import pytest
import torch
import torch.nn.functional as F

from betanas_fast import ops
from betanas_fast.nn import Supernet
from betanas_fast.runs.runtime import model_memory_format
from betanas_fast.search import ArchState
from betanas_fast.space import build_space

from plain_supernet import PlainSupernet

BATCH = 64
# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
CUDA = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def gather_eager(model, x, paths):
    h = model.first(model.stem(x))
    for block, p in zip(model.blocks, paths):
        out = None
        for m in p.unique().tolist():
            idx = (p == m).nonzero().flatten()
            o = block(h.index_select(0, idx), m)
            out = (o.new_empty((len(p),) + o.shape[1:]) if out is None else out).index_copy(0, idx, o)
        h = out
    return model._head(h)


@pytest.mark.parametrize("device", DEVICES)
def test_phase1_step(record_alternating, report_line, device):
    torch.manual_seed(0)
    space = build_space("demo", num_classes=10)
    fmt = model_memory_format(torch.device(device))
    model = Supernet(space).to(device, memory_format=fmt).train()
    plain = PlainSupernet.like(model, fmt).train()
    state, g = ArchState(space.allowed_mask()), torch.Generator().manual_seed(1)
    paths = state.sample_uniform_cycle_per_sample(g, BATCH)
    arch = state.sample_uniform_cycle(g)
    x = torch.randn(BATCH, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(10, (BATCH,), device=device)
    paths_on = paths.to(device)  # betanas_fast reads the group sizes on the host: it gets `paths`
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    impls = {"betanas_fast": (model, lambda: model.forward_per_sample(x, paths)),
             "torch_modules_gather": (plain, lambda: gather_eager(plain, x, paths_on)),
             "betanas_fast_per_batch": (model, lambda: model(x, arch))}
    # the same function: the same loss from the same weights (BatchNorm state is not compared: both update it), in
    # IEEE float32 on both sides (no TF32 on CUDA, where the kernels' float32 sums also run in another order)
    with ops.ieee_fp32():
        loss = F.cross_entropy(impls["betanas_fast"][1](), y)
        loss_plain = F.cross_entropy(impls["torch_modules_gather"][1](), y)
    tolerance = 1e-5 if device == "cpu" else 1e-4
    assert abs(float(loss) - float(loss_plain)) <= tolerance * abs(float(loss)), (float(loss), float(loss_plain))
    report_line(f"- Phase-1 per-sample step, demo, {device}: loss betanas_fast {float(loss):.6f}, "
                f"torch_modules_gather {float(loss_plain):.6f}")

    def stepper(net, forward):
        def step():
            net.zero_grad(set_to_none=True)
            F.cross_entropy(forward(), y).backward()
            sync()
        return step

    record_alternating("Phase-1 step, demo supernet, per-sample paths", {"device": device, "N": BATCH},
                       {impl: stepper(net, forward) for impl, (net, forward) in impls.items()})
