"""One Phase-1 training step (forward + backward, no optimiser) of the demo supernet with per-sample paths
(batch 64, 32x32, 10 classes; the same balanced paths for every implementation):

- betanas_fast: the grouped dispatch (Supernet.forward_per_sample; one grouped depthwise call per block);
- masked-eager: every remaining candidate runs on the full batch through its own modules, times its
  per-sample one-hot mask, summed;
- gather-eager: per candidate, index_select its samples, run its modules, index_copy them back;
- per-batch: the paper's step, one path per block for the whole batch, for scale.
"""
import pytest
import torch
import torch.nn.functional as F

from betanas_fast.nn import Supernet
from betanas_fast.search import ArchState
from betanas_fast.space import build_space

BATCH = 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def masked_eager(model, x, paths):
    h = model.first(model.stem(x))
    for block, p in zip(model.blocks, paths):
        h = sum(block(h, m) * (p == m).to(h.dtype).view(-1, 1, 1, 1)
                for m in (block.names.index(name) for name in block.candidates))
    return model._head(h)


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


IMPLS = {
    "betanas_fast": lambda model, x, paths, arch: model.forward_per_sample(x, paths),
    "masked-eager": lambda model, x, paths, arch: masked_eager(model, x, paths),
    "gather-eager": lambda model, x, paths, arch: gather_eager(model, x, paths),
    "per-batch": lambda model, x, paths, arch: model(x, arch),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def test_phase1_step(record, impl, device):
    torch.manual_seed(0)
    space = build_space("demo", num_classes=10)
    model = Supernet(space).to(device).train()
    state, g = ArchState(space.allowed_mask()), torch.Generator().manual_seed(1)
    paths = state.sample_uniform_cycle_per_sample(g, BATCH)
    arch = state.sample_uniform_cycle(g)
    x, y = torch.randn(BATCH, 3, 32, 32, device=device), torch.randint(10, (BATCH,), device=device)
    paths_on = paths if impl == "betanas_fast" else paths.to(device)  # the dispatch reads group sizes on the host
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn = IMPLS[impl]

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(fn(model, x, paths_on, arch), y).backward()
        sync()

    record("Phase-1 step, demo supernet, per-sample paths", {"device": device, "N": BATCH}, impl, step)
