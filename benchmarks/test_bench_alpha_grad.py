"""betanas::alpha_grad (dL/dα) against the eager composite (masked softmax, Jacobian, einsum) for a whole
supernet's alpha (L=21 blocks x M=7 paths): launch-bound, so the absolute time matters too."""
import pytest
import torch

from betanas_fast import ops, reference

IMPLS = {"betanas_fast": ops.alpha_grad, "eager": reference.alpha_grad}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def test_alpha_grad(record, impl, device):
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(21, 7, generator=g).to(device)
    remaining = (torch.rand(21, 7, generator=g) < 0.8).to(device)
    remaining[:, 0] = True
    gate, cost = torch.randn(21, 7, generator=g).to(device), (torch.rand(21, 7, generator=g) * 30).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn = IMPLS[impl]

    def step():
        fn(alpha, remaining, gate, cost, 0.1)
        sync()

    record("alpha_grad L=21 M=7", {"device": device}, impl, step)
