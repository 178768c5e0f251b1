"""What the ops modules share: the activation codes of the op schemas, and the layout and dtypes of the
kernels' outputs (which the fake kernels must reproduce)."""
import torch

from .._rules import stats_dtype

# The `act` codes of the op schemas.
ACTIVATIONS = {"none": 0, "relu6": 1, "silu": 2, "swish": 2}


def act_code(act) -> int:
    """The schema code of an activation given by name or code."""
    if isinstance(act, int) and act in ACTIVATIONS.values():
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels give their outputs (csrc/common/checks.h: layout_of)."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def empty_like_layout(x: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised tensor of `shape` in x's dtype, device and kernel output layout."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def empty_stats(x: torch.Tensor, channels: int) -> torch.Tensor:
    """An uninitialised per-channel statistics tensor for input x."""
    return x.new_empty((channels,), dtype=stats_dtype(x))
