"""A model of the limit of a search step: the FLOPs and bytes of each part, and the time they would take
at this machine's measured peak arithmetic rate and memory bandwidth (a roofline: the larger of the two).

- FLOPs: torch.utils.flop_counter's formulas, applied to every convolution and matrix product of one
  step run on the reference ops (so that the fused kernels' work is counted as the plain ATen ops it
  replaces). BatchNorm and activations are not counted: a fused kernel does them in the same pass.
- Bytes: in the parts that compute (Phase-1 forward and backward, Phase-2 sampled path and other
  candidates), the inputs and outputs of those same convolutions and products: the traffic a
  kernel that fuses BatchNorm and activation into them cannot avoid. In the other parts (data, optimizer,
  α update), which are elementwise, twice what each op writes.
- Peaks: measured here, not taken from a datasheet: an fp32 GEMM (2048^3, best of 5) for the arithmetic
  rate, a 256 MiB copy (read + write, best of 5) for the bandwidth.
"""
from __future__ import annotations

import collections
import functools
import time
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

COMPUTE_PARTS = ("phase1/forward", "phase1/backward", "phase2/sampled path", "phase2/other candidates")


def _best_of(fn, rounds=5):
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def machine_peaks(device: str = "cpu") -> Dict[str, float]:
    """{"flops": FLOP/s of an fp32 GEMM, "bytes": bytes/s of a large copy (read + write)} on `device`."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t_mm = _best_of(lambda: (a @ b, sync()))
    src = torch.empty(64 * 2**20, device=device).normal_()  # 256 MiB of float32
    dst = torch.empty_like(src)
    t_copy = _best_of(lambda: (dst.copy_(src), sync()))
    return {"flops": 2 * n**3 / t_mm, "bytes": 2 * src.numel() * src.element_size() / t_copy}


class WorkCounter(TorchDispatchMode):
    """FLOPs and bytes per part of a step; `set_part(name)` says which part runs (None: not counted)."""

    def __init__(self):
        super().__init__()
        self.part: Optional[str] = None
        self.flops: Dict[str, float] = collections.defaultdict(float)
        self.bytes: Dict[str, float] = collections.defaultdict(float)

    def set_part(self, name: Optional[str]) -> None:
        self.part = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.part is None:
            return out
        packet = func._overloadpacket
        counted = packet in flop_registry
        if packet is torch.ops.aten.convolution_backward:
            self.flops[self.part] += _conv_backward_flops(*args)
        elif counted:
            self.flops[self.part] += flop_registry[packet](*args, **kwargs, out_val=out)
        if counted:
            self.bytes[self.part] += _nbytes((args, kwargs, out))
        elif self.part not in COMPUTE_PARTS:
            self.bytes[self.part] += 2 * _nbytes(out)  # elementwise: what it writes, read once as much
        return out


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def _conv_backward_flops(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask) -> int:
    """2 FLOPs per multiply-add of the forward, once per gradient asked for. (flop_counter's formula charges
    the weight gradient of a grouped convolution `groups` times over: a depthwise conv's by C.)"""
    forward_macs = grad_out.numel() * weight[0].numel() if not transposed else x.numel() * weight[0].numel()
    return 2 * forward_macs * (int(output_mask[0]) + int(output_mask[1]))


def limit_seconds(flops: float, nbytes: float, peaks: Dict[str, float]) -> float:
    """The roofline time: the part cannot run faster than its arithmetic or its memory traffic allows."""
    return max(flops / peaks["flops"], nbytes / peaks["bytes"])
