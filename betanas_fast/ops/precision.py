"""The arithmetic of float32 work on CUDA: TF32 off where the small differences between candidates matter."""
import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Within this block float32 convolutions (cuDNN) and matmuls (cuBLAS) run in IEEE float32, not TF32, whatever
    the process's settings (restored after). torch lets cuDNN use TF32 by default and cuBLAS not, so without this a
    computation that mixes the two rounds its terms two ways (10-bit and 23-bit mantissas). The kernels of this
    package never use TF32. No effect on the CPU."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
