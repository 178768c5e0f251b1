"""Rules that the kernels, the references, the ops, the modules and the search space must agree on, each
defined once (the C++ kernels' definitions are in csrc/common/checks.h). Imports nothing from the package,
so that every layer can import it."""
import torch


def conv_out_size(size: int, stride: int) -> int:
    """Output size of a convolution with an odd kernel and padding k // 2: ceil(size / stride), whatever k."""
    return (size - 1) // stride + 1


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of batch statistics and of the BatchNorm arithmetic: float64 for float64 tensors, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
