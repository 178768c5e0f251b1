"""What the reference modules share: the activations behind the op schemas' `act` codes, and the error measure
the kernels are judged by against these references."""
import torch
import torch.nn.functional as F

# The `act` codes of the op schemas: 0 none, 1 relu6, 2 silu.
_ACT_FUNCTIONS = {0: lambda t: t, 1: F.relu6, 2: F.silu}


def activation(t, act: int):
    """t through the activation with schema code `act`."""
    return _ACT_FUNCTIONS[act](t)


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|), in float64 on actual's device (0 for empty tensors): the
    error by which the tests and benchmarks/gpu_smoke.py judge a kernel's output against its oracle."""
    expected = expected.to(actual.device, torch.float64)
    if expected.numel() == 0:
        return 0.0
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
