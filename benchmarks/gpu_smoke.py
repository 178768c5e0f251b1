"""Every op of the kernel library run on a device and compared with another implementation on the same inputs, at
production shapes (or tiny ones, for compute-sanitizer):

    python benchmarks/gpu_smoke.py [--device cuda|cpu] [--tiny] [--repeats N] [--only TEXT]

--device cuda (the default): the CUDA kernels against the CPU kernels, which run on CPU copies of the same inputs in
  float64 (float32 and float64 cases) or float32 (bfloat16 and float16 cases).
--device cpu: the CPU kernels against the pure-PyTorch references (betanas_fast.reference) in float64, so that this
  script can be exercised on a machine without a GPU.
--tiny: the same checks at tiny shapes (compute-sanitizer is ~100x slower), chosen to still cross the kernels'
  thresholds: more than kTargetBlocks = 2048 items (csrc/cuda/dw_tile_plan.cuh) so that blocks walk several items,
  more than kRedMinChunk = 8192 values per channel (csrc/cuda/grouped.cu) so that reductions split over blocks, more
  than 32 samples of a group (BETANAS_RAGGED_MAX_LANES, csrc/cuda/dw_ragged.cuh) and planes of several tiles.

What the shapes hit: ImageNet MBConv stages (N up to 128 or 256, C 72..1152, 112x112..7x7, k 3/5/7, stride 1/2),
NCHW and channels_last (whose 16-byte vector path needs C % (16 / element size) == 0 and an aligned pointer), an
input that is a view one element into its storage (unaligned: the vector path must switch off), fp32/bf16/fp16,
groups with 0, 1 and more than 32 samples, blocks with one and six candidates, and (full size, CUDA only) one eval
forward over more than 2**31 elements. Cases marked `repeats` are run --repeats times (default 20) more and must
agree bit for bit with the first run: their reductions split over blocks in a fixed order, never with atomics.

Tolerance, as the tests judge the kernels (tests/common.py): err = max|got - exact| / max(1, max|exact|) for every
output; tol = factor * max(err of PyTorch's own composite in the case's dtype on the same device (the reference ops,
cuDNN/cuBLAS without TF32), floor of the dtype); factor 2 for forward ops, 3 for gradients; in float32 at least the
bound tests/ give the grouped ops; in bf16/fp16 at most 4 epsilons of the dtype for the ops that round their
float32 results once (tolerance()).

One line per check, flushed at once: `PASS|FAIL|SKIP name  max_err/tol  seconds` (the worst output, and the
composite's error next to it); a last line with the counts. Exit code 1 if any check failed.

BETANAS_SMOKE_PERTURB=<op name> perturbs that op's first output on the device under test (a positive control: the
comparison must then fail).
"""
import argparse
import dataclasses
import os
import sys
import time
import zlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

import betanas_fast
from betanas_fast import reference
from betanas_fast._ext import OP_NAMES, has_kernel
from betanas_fast._rules import conv_out_size
from betanas_fast.reference import grouped as reference_grouped, scaled_error

OPS = torch.ops.betanas
EPS = 1e-5
ACT = {"none": 0, "relu6": 1, "silu": 2}
LAYOUT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# The tolerance (see tolerance()): the smallest base per dtype (tests/common.py: 2e-5 for a float32 forward, a 1e-3
# floor for low precision), the factor over PyTorch's own error, the bound tests/ allow these ops in float32
# (tests/test_grouped_ops.py: the grouped ops and block_gate_grads form sums from moments), and for bf16/fp16 the
# ops whose outputs are computed in float32 and rounded once: at most ROUNDINGS epsilons of the dtype off, even where
# PyTorch's composite (which rounds every intermediate) is much worse.
FLOOR = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
FACTOR = {"forward": 2.0, "backward": 3.0}
TESTS_BOUND = {("dw_bn_act_grouped_train", torch.float32): 2e-4,
               ("dw_bn_act_grouped_train_backward", torch.float32): 2e-4,
               ("block_gate_grads", torch.float32): 2e-4}
ROUNDED_ONCE = {"dw_bn_act_train", "dw_bn_act_train_backward", "dw_bn_act_eval", "dw_bn_act_eval_backward",
                "dw_bn_act_grouped_train", "dw_bn_act_grouped_train_backward"}
ROUNDINGS = 4
REFERENCES = {
    "dw_bn_act_train": reference.dw_bn_act_train,
    "dw_bn_act_train_backward": reference.dw_bn_act_train_backward,
    "dw_bn_act_eval": reference.dw_bn_act_eval,
    "dw_bn_act_eval_backward": reference.dw_bn_act_eval_backward,
    "dw_bn_act_grouped_train": reference_grouped.dw_bn_act_grouped_train,
    "dw_bn_act_grouped_train_backward": reference_grouped.dw_bn_act_grouped_train_backward,
    "block_gate_grads": reference_grouped.block_gate_grads,
    "alpha_grad": reference.alpha_grad,
}
assert set(REFERENCES) == set(OP_NAMES), "every op of the library needs its reference here"
FLOAT32_ONLY = {"alpha_grad"}  # ops whose kernels take float32 only: their CPU-kernel oracle runs in float32
# The six MBConv candidates of a choice block: (kernel size, expansion).
SIX = ((3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6))


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # dense | grouped | gate | alpha | huge_eval
    why: str  # what the case is there for
    dtype: torch.dtype
    full: dict  # shape parameters at production size
    tiny: Optional[dict]  # the same case at tiny size; None: full size only
    opts: dict = dataclasses.field(default_factory=dict)  # parameters shared by both sizes
    repeats: bool = False  # also compared bit for bit over --repeats runs
    cuda_only: bool = False


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

CASES = [
    # --- the fused depthwise stage: dw_bn_act_train(+_backward), dw_bn_act_eval(+_backward) ---
    Case("dense", "ImageNet 56x56 stage, vector path", BF16, dict(N=128, C=144, H=56, W=56),
         dict(N=4, C=16, H=9, W=9), dict(mode="train", k=3, s=1, layout="nhwc", act="relu6"), repeats=True),
    Case("dense", "112->56 stride 2", BF16, dict(N=32, C=96, H=112, W=112), dict(N=2, C=8, H=13, W=11),
         dict(mode="train", k=3, s=2, layout="nhwc", act="relu6")),
    Case("dense", "fp16 silu k5", F16, dict(N=64, C=240, H=28, W=28), dict(N=3, C=24, H=7, W=9),
         dict(mode="train", k=5, s=1, layout="nhwc", act="silu")),
    Case("dense", "fp32 NCHW k7", F32, dict(N=64, C=480, H=14, W=14), dict(N=2, C=5, H=11, W=13),
         dict(mode="train", k=7, s=1, layout="nchw", act="relu6"), repeats=True),
    # full: C = 1152 leaves at most 2048 * 32 / 1152 = 56 blocks per channel group for 128 items; tiny: N > 2048
    Case("dense", "multi-item blocks", F32, dict(N=128, C=1152, H=7, W=7), dict(N=2052, C=2, H=5, W=5),
         dict(mode="train", k=5, s=1, layout="nhwc", act="none")),
    # N > kTargetBlocks: whatever the plan, blocks walk several images
    Case("dense", "multi-item blocks, N>2048", BF16, dict(N=2080, C=8, H=8, W=8), dict(N=2052, C=1, H=4, W=4),
         dict(mode="train", k=7, s=2, layout="nchw", act="relu6"), repeats=True),
    Case("dense", "frozen weights (Phase 2)", F32, dict(N=64, C=144, H=28, W=28), dict(N=3, C=8, H=9, W=9),
         dict(mode="train", k=5, s=2, layout="nhwc", act="relu6", weight_grad=False)),
    Case("dense", "unaligned view, channels_last", BF16, dict(N=64, C=144, H=28, W=28), dict(N=2, C=16, H=7, W=7),
         dict(mode="train", k=3, s=1, layout="nhwc", act="relu6", unaligned=True)),
    Case("dense", "unaligned view, NCHW", F32, dict(N=32, C=96, H=56, W=56), dict(N=2, C=3, H=9, W=10),
         dict(mode="eval", k=5, s=1, layout="nchw", act="relu6", unaligned=True)),
    Case("dense", "eval 14->7 k7", BF16, dict(N=128, C=576, H=14, W=14), dict(N=2, C=16, H=9, W=9),
         dict(mode="eval", k=7, s=2, layout="nhwc", act="relu6")),
    Case("dense", "eval fp16 NCHW", F16, dict(N=64, C=72, H=56, W=56), dict(N=2, C=3, H=8, W=8),
         dict(mode="eval", k=3, s=1, layout="nchw", act="silu")),
    Case("dense", "eval fp32 vector path", F32, dict(N=32, C=240, H=28, W=28), dict(N=2, C=8, H=6, W=7),
         dict(mode="eval", k=3, s=1, layout="nhwc", act="relu6")),
    Case("dense", "odd shape", F32, dict(N=5, C=13, H=17, W=19), dict(N=5, C=13, H=17, W=19),
         dict(mode="train", k=7, s=2, layout="nhwc", act="relu6")),
    # --- Phase 1's grouped depthwise stage: dw_bn_act_grouped_train(+_backward) ---
    # tiny: a group of more than 32 samples (several sample chunks per block) on planes of several tiles
    Case("grouped", "Phase 1, a batch over six paths", BF16,
         dict(samples=[43, 42, 43, 42, 43, 43], channels=[72, 144, 72, 144, 72, 144], kernels=[3, 3, 5, 5, 7, 7],
              H=56, W=56),
         dict(samples=[40, 0, 1, 3], channels=[2, 3, 2, 1], kernels=[3, 7, 5, 7], H=40, W=40),
         dict(s=1, act="relu6"), repeats=True),
    Case("grouped", "empty and single-sample groups, stride 2", F32,
         dict(samples=[11, 0, 40, 1, 33, 30], channels=[240, 480, 240, 480, 240, 480], kernels=[3, 3, 5, 5, 7, 7],
              H=14, W=14),
         dict(samples=[5, 0, 1, 34], channels=[3, 2, 4, 2], kernels=[7, 3, 5, 3], H=9, W=7),
         dict(s=2, act="silu")),
    Case("grouped", "112->56 fp16", F16,
         dict(samples=[10, 9, 10, 9, 10, 9], channels=[48, 96, 48, 96, 48, 96], kernels=[3, 3, 5, 5, 7, 7],
              H=112, W=112),
         dict(samples=[3, 2], channels=[4, 2], kernels=[3, 7], H=12, W=10),
         dict(s=2, act="relu6")),
    # --- Phase 2's all-candidate op: block_gate_grads ---
    Case("gate", "56x56 block, split reductions", F32, dict(N=32, cin=24, cout=24, H=56, kinds=SIX),
         dict(N=4, cin=4, cout=4, H=48, kinds=((3, 3), (7, 6))), dict(s=1, layout="nhwc"), repeats=True),
    Case("gate", "112->56 widen", BF16, dict(N=32, cin=16, cout=24, H=112, kinds=SIX),
         dict(N=2, cin=4, cout=6, H=68, kinds=((5, 3),)), dict(s=2, layout="nchw")),
    Case("gate", "14x14 wide, fp16", F16, dict(N=128, cin=80, cout=80, H=14, kinds=SIX),
         dict(N=3, cin=8, cout=8, H=6, kinds=((3, 6), (5, 3), (7, 3))), dict(s=1, layout="nhwc")),
    Case("gate", "7x7 stage, batch 256", F32, dict(N=256, cin=160, cout=160, H=7, kinds=((3, 6), (7, 6))),
         dict(N=4, cin=16, cout=16, H=4, kinds=((3, 6), (7, 6))), dict(s=1, layout="nchw")),
    Case("gate", "identity only", F32, dict(N=8, cin=16, cout=16, H=8, kinds=()),
         dict(N=2, cin=3, cout=3, H=4, kinds=()), dict(s=1, layout="nchw")),
    # --- dL/dalpha: alpha_grad ---
    Case("alpha", "mobile supernet", F32, dict(L=21, M=7), dict(L=21, M=7), dict(beta=0.3)),
    Case("alpha", "many blocks", F32, dict(L=5000, M=7), dict(L=300, M=7), dict(beta=0.3)),
    # --- one eval forward over more than 2**31 elements (4.3 GB in bf16) ---
    Case("huge_eval", "more than 2**31 elements", BF16, dict(N=1784, C=96, H=112, W=112), None,
         dict(k=3, s=1, layout="nchw", act="relu6"), cuda_only=True),
    Case("huge_eval", "more than 2**31 elements", BF16, dict(N=1784, C=96, H=112, W=112), None,
         dict(k=3, s=1, layout="nhwc", act="relu6"), cuda_only=True),
]


# ---------------------------------------------------------------------------------------------------------------
# Comparison.

def tolerance(op: str, dtype: torch.dtype, kind: str, base_err: float) -> float:
    """How far an output of `op` in `dtype` may be from the oracle, given PyTorch's own error base_err."""
    tol = FACTOR[kind] * max(base_err, FLOOR[dtype])
    if dtype in (torch.bfloat16, torch.float16) and op in ROUNDED_ONCE:
        tol = min(tol, ROUNDINGS * torch.finfo(dtype).eps)
    return max(tol, TESTS_BOUND.get((op, dtype), 0.0))


def compare(op: str, got: Sequence[torch.Tensor], exact: Sequence[torch.Tensor], base: Sequence[torch.Tensor],
            names: Sequence[str], dtype: torch.dtype, kind: str) -> dict:
    """The worst output of a check (the largest err / tol): {"ok", "name", "err", "tol", "base_err"}."""
    rows = []
    for name, g, e, b in zip(names, got, exact, base):
        if tuple(g.shape) != tuple(e.shape):
            rows.append({"ok": False, "name": f"{name} shape {tuple(g.shape)} != {tuple(e.shape)}",
                         "err": float("inf"), "tol": 1.0, "base_err": float("nan")})
            continue
        err, base_err = scaled_error(g, e), scaled_error(b, e)
        tol = tolerance(op, dtype, kind, base_err)
        rows.append({"ok": err <= tol, "name": name, "err": err, "tol": tol, "base_err": base_err})  # NaN fails
    return max(rows, key=lambda row: (not row["ok"], row["err"] / row["tol"] if row["err"] == row["err"] else 1e300))


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def convert(obj, device, float_dtype: Optional[torch.dtype]):
    """obj (tensors, in lists and tuples) on `device`, floating tensors in float_dtype (None: as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, float_dtype) if float_dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(convert(o, device, float_dtype) for o in obj)
    return obj


def perturb(outputs: tuple) -> None:
    """The positive control: a large change of one element of the first output."""
    t = outputs[0]
    t[(0,) * t.dim()] += 0.05 * max(1.0, t.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# The runner: every check prints one line.

class Runner:
    def __init__(self, device: str, repeats: int, only: Optional[str]):
        self.device, self.repeats, self.only = torch.device(device), repeats, only
        self.perturbed = os.environ.get("BETANAS_SMOKE_PERTURB", "")
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        self.label = ""
        self.context_lost = False

    def line(self, status: str, name: str, detail: str, seconds: float) -> None:
        self.counts[status] += 1
        print(f"{status} {name}  {detail}  {seconds:.2f}s", flush=True)

    def selected(self, name: str) -> bool:
        return self.only is None or self.only in name

    def oracle_dtype(self, op: str, dtype: torch.dtype) -> torch.dtype:
        if self.device.type == "cpu":
            return torch.float64  # the references take any dtype
        if op in FLOAT32_ONLY:
            return torch.float32
        return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32

    def dut(self, op: str, args) -> tuple:
        """The kernel on the device under test (no fallback: torch.ops calls the registered kernel)."""
        out = as_tuple(getattr(OPS, op)(*args))
        if self.perturbed == op:
            perturb(out)
        return out

    def oracle(self, op: str, args, dtype: torch.dtype) -> tuple:
        """The CPU kernel (checking CUDA) or the reference (checking the CPU kernel), on CPU copies in a wider
        dtype."""
        cpu_args = convert(args, "cpu", self.oracle_dtype(op, dtype))
        if self.device.type == "cpu":
            return as_tuple(REFERENCES[op](*cpu_args))
        return as_tuple(getattr(OPS, op)(*cpu_args))

    def check(self, op: str, args, names: Sequence[str], kind: str, dtype: torch.dtype,
              split: Callable[[tuple], tuple] = lambda outputs: outputs) -> Optional[tuple]:
        """Runs op on the device, the oracle on CPU and PyTorch's composite (the reference ops) in the same dtype
        on the device, and prints the worst output's error against its tolerance (outputs named `names` after
        `split`). Returns the device outputs."""
        name = f"{op}[{self.label}]"
        if not self.selected(name):
            return None
        start = time.perf_counter()
        got = self.dut(op, args)
        exact = self.oracle(op, args, dtype)
        base = as_tuple(REFERENCES[op](*args))
        worst = compare(op, split(got), split(exact), split(base), names, dtype, kind)
        self.line("PASS" if worst["ok"] else "FAIL", name,
                  f"{worst['err']:.2e}/{worst['tol']:.2e} ({worst['name']}; torch {DTYPE_NAME[dtype]} "
                  f"{worst['base_err']:.1e})", time.perf_counter() - start)
        return got

    def deterministic(self, what: str, run: Callable[[], List[torch.Tensor]]) -> None:
        """run() --repeats times: every output of every run bit for bit equal to the first run's."""
        name = f"determinism[{self.label}: {what}, {self.repeats} runs]"
        if not self.selected(name) or self.repeats < 2:
            return
        start = time.perf_counter()
        first = [t.clone() for t in run()]
        diff = 0.0
        for _ in range(self.repeats - 1):
            for a, b in zip(first, run()):
                if not torch.equal(a, b):
                    diff = max(diff, (a.double() - b.double()).abs().max().item())
        ok = diff == 0.0
        self.line("PASS" if ok else "FAIL", name, f"{diff:.2e}/0 (max difference between runs)",
                  time.perf_counter() - start)

    def run_case(self, case: Case, params: dict) -> None:
        self.label = f"{case.why}: {describe(case, params)}"
        FAMILIES[case.family](self, case, params)


def describe(case: Case, p: dict) -> str:
    d = DTYPE_NAME[case.dtype]
    if case.family in ("dense", "huge_eval"):
        extra = (" unaligned" if p.get("unaligned") else "") + ("" if p.get("weight_grad", True) else " weight_grad=False")
        return f"{d} {p['layout']} {p['N']}x{p['C']}x{p['H']}x{p['W']} k{p['k']} s{p['s']} {p['act']}{extra}"
    if case.family == "grouped":
        return (f"{d} samples {p['samples']} channels {p['channels']} k {p['kernels']} {p['H']}x{p['W']} s{p['s']} "
                f"{p['act']}")
    if case.family == "gate":
        kinds = ",".join(f"k{k}e{e}" for k, e in p["kinds"]) or "none"
        return f"{d} {p['layout']} N={p['N']} {p['cin']}->{p['cout']} {p['H']}x{p['H']} s{p['s']} candidates {kinds}"
    return f"{d} L={p['L']} M={p['M']}"


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def randn(shape, gen: torch.Generator, device, scale=1.0, shift=0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device) * scale + shift


def activation_tensor(shape, dtype, layout: str, unaligned: bool, gen, device, scale=2.0, shift=0.3):
    """A 4-D tensor [N, C, H, W] in `layout`; unaligned: a view one element into its storage."""
    n, c, h, w = shape
    values = randn(shape, gen, device, scale, shift).to(dtype)
    if not unaligned:
        return values.contiguous(memory_format=LAYOUT[layout])
    storage = torch.empty(values.numel() + 1, dtype=dtype, device=device)
    view = storage[1:]
    view = view.view(n, h, w, c).permute(0, 3, 1, 2) if layout == "nhwc" else view.view(n, c, h, w)
    view.copy_(values)
    assert view.storage_offset() == 1 and view.is_contiguous(memory_format=LAYOUT[layout])
    return view


def bn_params(c: int, gen, device, dtype=torch.float32):
    return (torch.rand(c, generator=gen, device=device) + 0.5).to(dtype), randn(c, gen, device, 0.5).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The op families.

def run_dense(r: Runner, case: Case, p: dict) -> None:
    gen = torch.Generator(device=r.device).manual_seed(zlib.crc32(r.label.encode()))
    dev, dt, k, s, act = r.device, case.dtype, p["k"], p["s"], ACT[p["act"]]
    unaligned, weight_grad = p.get("unaligned", False), p.get("weight_grad", True)
    x = activation_tensor((p["N"], p["C"], p["H"], p["W"]), dt, p["layout"], unaligned, gen, dev)
    weight = randn((p["C"], 1, k, k), gen, dev, 1.0 / k)
    gamma, beta = bn_params(p["C"], gen, dev)
    out_shape = (p["N"], p["C"], conv_out_size(p["H"], s), conv_out_size(p["W"], s))
    grad_out = activation_tensor(out_shape, dt, p["layout"], unaligned, gen, dev, 1.0, 0.0)
    if p["mode"] == "train":
        fwd_args = (x, weight, gamma, beta, s, act, EPS)
        out = r.check("dw_bn_act_train", fwd_args, ("out", "mean", "var"), "forward", dt)
        mean, var = out[1:] if out is not None else OPS.dw_bn_act_train(*fwd_args)[1:]
        bwd_args = (grad_out, x, weight, gamma, beta, mean, var, s, act, EPS, weight_grad)
        r.check("dw_bn_act_train_backward", bwd_args, ("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"),
                "backward", dt)
        if case.repeats:
            def chain():
                y, m, v = OPS.dw_bn_act_train(*fwd_args)
                return [y, m, v, *OPS.dw_bn_act_train_backward(grad_out, x, weight, gamma, beta, m, v, s, act, EPS,
                                                               weight_grad)]
            r.deterministic("dw_bn_act_train + backward", chain)
    else:
        scale, shift = bn_params(p["C"], gen, dev)
        args = (x, weight, scale, shift, s, act)
        r.check("dw_bn_act_eval", args, ("out",), "forward", dt)
        r.check("dw_bn_act_eval_backward", (grad_out, *args),
                ("grad_x", "grad_weight", "grad_scale", "grad_shift"), "backward", dt)


def run_grouped(r: Runner, case: Case, p: dict) -> None:
    gen = torch.Generator(device=r.device).manual_seed(zlib.crc32(r.label.encode()))
    dev, dt, s, act = r.device, case.dtype, p["s"], ACT[p["act"]]
    samples, channels, kernels = p["samples"], p["channels"], p["kernels"]
    H, W = p["H"], p["W"]
    numel = sum(n * c for n, c in zip(samples, channels)) * H * W
    x = randn(numel, gen, dev, 2.0, 0.3).to(dt)
    weight = randn(sum(c * k * k for c, k in zip(channels, kernels)), gen, dev, 0.25)
    gamma, beta = bn_params(sum(channels), gen, dev)
    groups = (samples, channels, kernels, H, W, s, act, EPS)
    fwd_args = (x, weight, gamma, beta, *groups)
    out = r.check("dw_bn_act_grouped_train", fwd_args, ("out", "mean", "var"), "forward", dt)
    mean, var = out[1:] if out is not None else OPS.dw_bn_act_grouped_train(*fwd_args)[1:]
    out_numel = sum(n * c for n, c in zip(samples, channels)) * conv_out_size(H, s) * conv_out_size(W, s)
    grad_out = randn(out_numel, gen, dev).to(dt)
    r.check("dw_bn_act_grouped_train_backward", (grad_out, x, weight, gamma, beta, mean, var, *groups),
            ("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"), "backward", dt)
    if case.repeats:
        def chain():
            y, m, v = OPS.dw_bn_act_grouped_train(*fwd_args)
            return [y, m, v, *OPS.dw_bn_act_grouped_train_backward(grad_out, x, weight, gamma, beta, m, v, *groups)]
        r.deterministic("dw_bn_act_grouped_train + backward", chain)


def gate_params(cin: int, cout: int, kinds, gen, device) -> List[List[torch.Tensor]]:
    """The nine parameter lists of block_gate_grads (float32, as under autocast), one entry per candidate."""
    lists: List[List[torch.Tensor]] = [[] for _ in range(9)]
    for k, e in kinds:
        mid = cin * e
        tensors = (randn((mid, cin, 1, 1), gen, device, cin ** -0.5), *bn_params(mid, gen, device),
                   randn((mid, 1, k, k), gen, device, 1.0 / k), *bn_params(mid, gen, device),
                   randn((cout, mid, 1, 1), gen, device, mid ** -0.5), *bn_params(cout, gen, device))
        for lst, t in zip(lists, tensors):
            lst.append(t)
    return lists


def run_gate(r: Runner, case: Case, p: dict) -> None:
    gen = torch.Generator(device=r.device).manual_seed(zlib.crc32(r.label.encode()))
    dev, dt, s = r.device, case.dtype, p["s"]
    ho = conv_out_size(p["H"], s)
    x = activation_tensor((p["N"], p["cin"], p["H"], p["H"]), dt, p["layout"], False, gen, dev, 1.5, 0.2)
    grad_out = activation_tensor((p["N"], p["cout"], ho, ho), dt, p["layout"], False, gen, dev, 1.0, 0.0)
    residual = s == 1 and p["cin"] == p["cout"]
    args = (x, grad_out, *gate_params(p["cin"], p["cout"], p["kinds"], gen, dev), s, residual, ACT["relu6"], EPS)
    names = [f"candidate k{k}e{e}" for k, e in p["kinds"]] + ["identity"]
    r.check("block_gate_grads", args, names, "backward", dt,
            split=lambda outputs: tuple(outputs[0][i:i + 1] for i in range(len(names))))
    if case.repeats:
        r.deterministic("block_gate_grads", lambda: [OPS.block_gate_grads(*args)])


def run_alpha(r: Runner, case: Case, p: dict) -> None:
    gen = torch.Generator(device="cpu").manual_seed(p["L"])
    L, M = p["L"], p["M"]
    alpha = torch.randn(L, M, generator=gen)
    remaining = torch.rand(L, M, generator=gen) < 0.7
    remaining[:, 0] = True
    remaining[1] = False  # a block with nothing remaining: p = 0 and grad 0
    remaining[2] = torch.arange(M) == 3  # one path left
    gate, cost = torch.randn(L, M, generator=gen), torch.rand(L, M, generator=gen) * 30
    args = convert((alpha, remaining, gate, cost, p["beta"]), r.device, None)
    r.check("alpha_grad", args, ("p", "grad_alpha"), "backward", case.dtype)


def run_huge_eval(r: Runner, case: Case, p: dict) -> None:
    """One eval forward over more than 2**31 elements: the output against the same kernel on chunks of the batch
    (bit for bit: the tile plan depends on C, H, W, k, stride, dtype and layout, never on N), and its first and last
    two images against the oracle (the CPU kernel)."""
    name = f"dw_bn_act_eval[{r.label}]"
    if not r.selected(name):
        return
    start = time.perf_counter()
    dev, dt, k, s, act = r.device, case.dtype, p["k"], p["s"], ACT[p["act"]]
    shape = (p["N"], p["C"], p["H"], p["W"])
    gen = torch.Generator(device=dev).manual_seed(2 ** 31)
    x = torch.randn(shape, generator=gen, device=dev, dtype=dt).contiguous(memory_format=LAYOUT[p["layout"]])
    weight = randn((p["C"], 1, k, k), gen, dev, 1.0 / k)
    scale, shift = bn_params(p["C"], gen, dev)
    out = r.dut("dw_bn_act_eval", (x, weight, scale, shift, s, act))[0]
    chunk = max(1, p.get("chunk_numel", 2 ** 30) // x[0].numel())  # images per chunk
    chunk_diff = 0.0
    for i in range(0, p["N"], chunk):
        part = OPS.dw_bn_act_eval(x[i:i + chunk], weight, scale, shift, s, act)
        if not torch.equal(part, out[i:i + chunk]):
            chunk_diff = max(chunk_diff, (part.float() - out[i:i + chunk].float()).abs().max().item())
        del part
    ends = (slice(0, 2), slice(p["N"] - 2, p["N"]))
    got = tuple(out[e] for e in ends)
    exact = tuple(r.oracle("dw_bn_act_eval", (x[e], weight, scale, shift, s, act), dt)[0] for e in ends)
    base = tuple(reference.dw_bn_act_eval(x[e], weight, scale, shift, s, act) for e in ends)
    worst = compare("dw_bn_act_eval", got, exact, base, ("out[:2]", "out[-2:]"), dt, "forward")
    ok = worst["ok"] and chunk_diff == 0.0
    r.line("PASS" if ok else "FAIL", name,
           f"{worst['err']:.2e}/{worst['tol']:.2e} ({worst['name']}; torch {DTYPE_NAME[dt]} {worst['base_err']:.1e}; "
           f"{x.numel() / 2 ** 31:.3f} x 2**31 elements; chunks of {chunk} images "
           f"{'bit for bit equal' if chunk_diff == 0 else f'differ by {chunk_diff:.2e}'})", time.perf_counter() - start)


FAMILIES: Dict[str, Callable[[Runner, Case, dict], None]] = {
    "dense": run_dense, "grouped": run_grouped, "gate": run_gate, "alpha": run_alpha, "huge_eval": run_huge_eval}


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: CUDA kernels vs the CPU kernels; cpu: CPU kernels vs the references (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (for compute-sanitizer)")
    p.add_argument("--repeats", type=int, default=20, help="runs of the determinism checks (default: 20)")
    p.add_argument("--only", default=None, help="run only the checks whose name contains this text")
    return p.parse_args(argv)


def preflight(device: torch.device) -> List[str]:
    """What keeps the checks from meaning anything, if anything."""
    if not betanas_fast.KERNELS_LOADED:
        return [f"kernel library not loaded: {betanas_fast.build_info()['load_error']}"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["CUDA is not available"]
    return [f"no {device.type} kernel for betanas::{op}" for op in OP_NAMES if not has_kernel(op, device.type)]


def main(argv=None) -> int:
    args = parse_args(argv)
    # fp32 means fp32 for the composites that set the tolerance (and for the GEMMs of block_gate_grads)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return run(args)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    start = time.perf_counter()
    where = torch.cuda.get_device_name() if device.type == "cuda" and torch.cuda.is_available() else "cpu"
    print(f"gpu_smoke: {args.device} ({where}), {'tiny' if args.tiny else 'full'} shapes, torch {torch.__version__}, "
          f"betanas_fast {betanas_fast.__version__}, oracle: "
          f"{'CPU kernels' if device.type == 'cuda' else 'float64 references'}", flush=True)
    problems = preflight(device)
    runner = Runner(args.device, args.repeats, args.only)
    for problem in problems:
        runner.line("FAIL", "preflight", problem, 0.0)
    for case in [] if problems else CASES:
        params = case.tiny if args.tiny else case.full
        runner.label = case.why
        if runner.context_lost:
            break
        if params is None or (case.cuda_only and device.type != "cuda") or (
                case.dtype == torch.float16 and device.type == "cpu"):
            why = ("full size only" if params is None else "CUDA only" if case.cuda_only
                   else "float16 has no CPU kernel")
            name = f"{case.family}[{case.why}]"
            if runner.selected(name):
                runner.line("SKIP", name, why, 0.0)
            continue
        params = {**case.opts, **params}
        try:
            runner.run_case(case, params)
        except Exception as e:  # noqa: BLE001 - a failing op is a result, the next case still runs
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            runner.line("FAIL", f"{case.family}[{runner.label}]", f"{type(e).__name__}: {message}", 0.0)
            # after an illegal access the CUDA context is gone: every later check would fail the same way
            runner.context_lost = device.type == "cuda" and "CUDA error" in str(e)
    c = runner.counts
    print(f"RESULT {c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP ({args.device}, "
          f"{'tiny' if args.tiny else 'full'}{', CUDA context lost' if runner.context_lost else ''}) "
          f"in {time.perf_counter() - start:.1f}s", flush=True)
    return 1 if c["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
