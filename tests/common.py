"""Shared test helpers: devices, dtypes, the per-dtype tolerance table, and tiny searches."""
import json
import os

import pytest
import torch

from betanas_fast.reference import scaled_error  # noqa: F401 - the tests judge kernels by it
from betanas_fast.search import Search, SearchConfig

HAS_CUDA = torch.cuda.is_available()

# Every case that runs on a GPU carries the `cuda` marker, so that `pytest -m cuda` selects exactly those (and
# `-m "not cuda"` the rest), and skips where there is none.
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))

DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def requires_cuda(test):
    """A test that runs on CUDA only: the `cuda` marker, skipped without a GPU."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


# The dtypes the kernels support on each device.
KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}

# float32 and float64: max |actual - expected| / max(1, max |expected|) against a float64 oracle.
# float16 and bfloat16 are judged relative to PyTorch's own composite in the same dtype
# (LOW_PRECISION_FACTOR), because their absolute error depends on the data.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
LOW_PRECISION_FACTOR = {"forward": 2.0, "backward": 3.0}


def device_dtype_params():
    """(device, dtype) pairs that the kernels support, CUDA ones skipped without a GPU."""
    params = []
    for device in ("cpu", "cuda"):
        marks = () if device == "cpu" else CUDA_MARKS
        for dtype in KERNEL_DTYPES[device]:
            params.append(pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype)[6:]}"))
    return params


def tiny(tmp_path=None, **kw):
    """A search configuration small enough for a test: the demo space with 5 choice blocks, tiny splits."""
    d = dict(stage_depths=[1, 2, 1, 1], heldout=64, val=64, batch_size=32, heldout_batch_size=32, epochs=2,
             warmup_epochs=1, phase_ratio=2, progress=False, plots=False, tensorboard=False, threads=2,
             bn_recalib_batches=1, out=str(tmp_path / "run") if tmp_path is not None else None)
    d.update(kw)
    return SearchConfig(**d)


def built(tmp_path, **kw):
    s = Search(tiny(tmp_path, **kw))
    s._build()
    return s


def read_history(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "history.jsonl"))]


def resumed_equals_uninterrupted(tmp_path, stop_after: int, **kw):
    """A tiny search run whole, and again stopped after iteration `stop_after` and resumed from its checkpoint:
    their history.jsonl and arch.json must be byte-identical. Returns the whole run's Search."""
    from betanas_fast.search import Search, SearchConfig
    full = Search(tiny(tmp_path / "full", **kw))
    full.run()
    part = Search(tiny(tmp_path / "part", stop_after=stop_after, **kw))
    assert part.run() is None
    Search(SearchConfig(resume=part.out, progress=False)).run()
    for name in ("history.jsonl", "arch.json"):
        with open(os.path.join(full.out, name)) as a, open(os.path.join(part.out, name)) as b:
            assert a.read() == b.read(), name
    return full


def phase2_net(memory_format=torch.channels_last, device="cpu"):
    """The demo supernet (stage depths 1 2 1 1) with random BN affine parameters (not the identity init) on `device` in
    `memory_format`, a random batch of 8 with labels, the arch and mask of a Phase 2 step in which every allowed path
    remains (mb_k3_e3 everywhere: the identity of block 2 comes out of the all-candidate op), and the block inputs."""
    from torch import nn

    from betanas_fast.nn import Supernet
    from betanas_fast.space import build_space

    torch.manual_seed(0)
    space = build_space("demo", num_classes=10, stage_depths=[1, 2, 1, 1])
    net = Supernet(space)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    net = net.to(device, memory_format=memory_format)
    x = torch.randn(8, 3, 32, 32).to(device, memory_format=memory_format)
    y = torch.randint(0, 10, (8,)).to(device)
    arch = [0] * space.num_blocks
    remaining = torch.tensor(space.allowed_mask())
    with torch.no_grad():
        _, inputs, _ = net.forward_with_blocks(x, arch)
    return net, x, y, arch, remaining, inputs
