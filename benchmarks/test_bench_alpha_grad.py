"""betanas::alpha_grad (dL/dα) for a whole supernet's alpha (L=21 blocks x M=7 paths), launch-bound, so the
absolute time matters too, in alternating order in the same process (each sample: 100 calls in a row):

- betanas_fast: ops.alpha_grad;
- torch_autograd (the fair baseline): what a PyTorch user writes, autograd through the masked softmax of
  Σ_j (dL/dg_j + β cost_j) p_j (plain_supernet.alpha_grad), checked to give the kernel's gradient first;
- reference_oracle: the package's reference (masked softmax, Jacobian, einsum), the correctness oracle.
"""
import pytest
import torch

from betanas_fast import ops, reference

import plain_supernet

# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
CUDA = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_grad(record_alternating, device):
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(21, 7, generator=g).to(device)
    remaining = (torch.rand(21, 7, generator=g) < 0.8).to(device)
    remaining[:, 0] = True
    gate, cost = torch.randn(21, 7, generator=g).to(device), (torch.rand(21, 7, generator=g) * 30).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    impls = {"betanas_fast": lambda: ops.alpha_grad(alpha, remaining, gate, cost, 0.1)[1],
             "torch_autograd": lambda: plain_supernet.alpha_grad(alpha, remaining, gate, cost, 0.1),
             "reference_oracle": lambda: reference.alpha_grad(alpha, remaining, gate, cost, 0.1)[1]}
    torch.testing.assert_close(impls["torch_autograd"](), impls["betanas_fast"](), rtol=1e-5, atol=1e-6)

    def stepper(fn):
        def step():
            fn()
            sync()
        return step

    record_alternating("alpha_grad L=21 M=7", {"device": device}, {impl: stepper(fn) for impl, fn in impls.items()},
                       inner=100)
