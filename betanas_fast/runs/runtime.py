"""Process-wide settings of a run, in one place: device, threads, determinism, and the mixed-precision
dtype that makes this machine faster (or none)."""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.deterministic

from .. import ops
from . import provenance


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def model_memory_format(device: torch.device) -> torch.memory_format:
    """The one layout of models and batches on every device: channels_last (NHWC). On the CPU oneDNN's 1x1
    convolutions and ATen's batch norm run 1.5-3x faster in NHWC than in NCHW, and the fused depthwise op has NHWC
    kernels; on CUDA cuDNN's tensor-core convolutions are NHWC-native (NCHW inputs are transposed around them) and
    the depthwise kernels read whole L2 sectors of neighbouring channels in NHWC. The GPU benchmarks time both
    layouts of a Phase-1 step (benchmarks/test_bench_search_step.py) to check the choice on the device."""
    del device  # the same on every device; an argument so that a device may differ one day without new call sites
    return torch.channels_last


# The CPU feature flags (Linux /proc/cpuinfo) of bf16 arithmetic in hardware: x86's AVX512-BF16 dot products and
# AMX's bf16 tiles, Arm's FEAT_BF16 (BFDOT/BFMMLA).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def native_bf16_features() -> List[str]:
    """The native-bf16 flags among the CPU's (empty where /proc/cpuinfo is not there to read)."""
    flags = set(provenance.cpu_flags())
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def onednn_bf16_supported() -> bool:
    """oneDNN's (torch's mkldnn backend's) own answer: whether it runs bf16 kernels on this CPU, natively or by
    emulation."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ops.mkldnn._is_mkldnn_bf16_supported
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch.ops.mkldnn._is_mkldnn_bf16_supported, which "
                           f"--amp asks whether this CPU runs bf16: give --amp-dtype bf16 (or leave --amp off) "
                           f"instead") from e
    return bool(probe())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 on x86, FEAT_BF16 on Arm). Without it,
    CPU bf16 autocast runs 3-4x slower than fp32.

    The CPU's own feature flags (Linux /proc/cpuinfo, via provenance.cpu_flags) are authoritative where they can
    be read: oneDNN's answer (torch.ops.mkldnn._is_mkldnn_bf16_supported) is True on every AVX512BW/VL/DQ CPU,
    where oneDNN emulates bf16 with fp32 arithmetic and conversions: exactly the slow case (on an AVX2-only CPU
    it answers False, the flags' answer too). oneDNN's answer is
    still required (without it torch's convolutions have no bf16 kernels to be fast with), and it is the only
    answer where the flags cannot be read (another OS): an over-estimate there, which is why `--amp` measures
    before it picks bf16 on a CPU this function accepts."""
    if not onednn_bf16_supported():
        return False
    return bool(native_bf16_features()) if provenance.cpu_flags() else True


def _cpu_description() -> str:
    features = native_bf16_features()
    names = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "BF16"}
    if features:
        return ", ".join(names[f] for f in features)
    return torch.backends.cpu.get_cpu_capability() + (", oneDNN bf16" if onednn_bf16_supported() else "")


@dataclass
class TimedStep:
    """A unit of work to time under --amp's measurement: `run(context)` does it with its forward pass inside
    `context` (an autocast context or a no-op one); `what` names it in the report line."""
    run: Callable[[ContextManager], None]
    what: str


@dataclass
class AmpChoice:
    """The autocast dtype of a run (None: fp32), and for a measured choice the two median times per step."""
    dtype: Optional[torch.dtype]
    fp32_ms: Optional[float] = None
    bf16_ms: Optional[float] = None
    reason: str = ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_autocast(step: TimedStep, device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 7,
                  warmup: int = 1, budget_s: float = 3.0, min_pairs: int = 3) -> Tuple[float, float]:
    """(fp32 ms, `dtype` autocast ms): median wall time of `step` in each precision. `warmup` calls of each go
    first (oneDNN creates its bf16 primitives on the first call); then the two alternate, in turn first, so
    that a change in the machine's speed reaches both alike: `repeats` pairs, fewer once `budget_s` seconds of
    pairs are spent (never fewer than `min_pairs`)."""
    if repeats < 1 or min_pairs < 1 or warmup < 0:
        raise ValueError(f"time_autocast needs repeats >= 1, min_pairs >= 1 and warmup >= 0, got {repeats}, "
                         f"{min_pairs} and {warmup}")
    contexts = (lambda: autocast(device, None), lambda: autocast(device, dtype))

    def once(which: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        step.run(contexts[which]())
        _synchronize(device)
        return (time.perf_counter() - start) * 1e3

    for _ in range(warmup):
        once(0)
        once(1)
    times: Tuple[List[float], List[float]] = ([], [])
    start = time.perf_counter()
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[which].append(once(which))
        if i + 1 >= min_pairs and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times[0]), statistics.median(times[1])


def choose_cpu_amp(fp32_ms: float, bf16_ms: float, what: str = "step", cpu: Optional[str] = None) -> AmpChoice:
    """The faster of the two measured precisions (fp32 on a tie: it is the more accurate), with the one line
    that says which and why."""
    use_bf16 = bf16_ms < fp32_ms
    reason = (f"--amp: bf16 autocast {bf16_ms:.3g} ms vs fp32 {fp32_ms:.3g} ms per {what} on this CPU "
              f"({cpu or _cpu_description()}): running {'bf16' if use_bf16 else 'fp32'}")
    return AmpChoice(torch.bfloat16 if use_bf16 else None, fp32_ms, bf16_ms, reason)


def measure_cpu_amp(make_step: Callable[[], TimedStep], device: torch.device, log=print,
                    timer: Callable[[TimedStep, torch.device], Tuple[float, float]] = time_autocast) -> AmpChoice:
    """--amp on a CPU with native bf16: time the step `make_step` builds in fp32 and under bf16 autocast with
    `timer`, run the faster, and say so in one line."""
    step = make_step()
    fp32_ms, bf16_ms = timer(step, device)
    choice = choose_cpu_amp(fp32_ms, bf16_ms, step.what)
    log(choice.reason)
    return choice


def resolve_amp(amp: bool, amp_dtype: str, device: torch.device, log=print,
                make_step: Optional[Callable[[], TimedStep]] = None) -> AmpChoice:
    """The autocast dtype of a run (None: fp32). `--amp` means mixed precision where it makes the run faster; an
    explicit `amp_dtype` is obeyed. On a CPU with native bf16, `make_step` (called only then) gives the work to
    time in both precisions, and the faster one runs; without it, bf16 runs unmeasured."""
    if not amp:
        return AmpChoice(None)
    if amp_dtype == "fp16":
        return AmpChoice(torch.float16)
    if amp_dtype == "bf16":
        return AmpChoice(torch.bfloat16)
    if device.type == "cuda":
        return AmpChoice(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if cpu_has_native_bf16():
        if make_step is not None:
            return measure_cpu_amp(make_step, device, log)
        reason = f"--amp: this CPU has native bf16 ({_cpu_description()}): running bf16 autocast (not measured)"
        log(reason)
        return AmpChoice(torch.bfloat16, reason=reason)
    reason = (f"--amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, where bf16 autocast "
              f"is slower than fp32: running in fp32 (--amp-dtype bf16 forces bf16)")
    log(reason)
    return AmpChoice(None, reason=reason)


def resolve_amp_dtype(amp: bool, amp_dtype: str, device: torch.device, log=print,
                      make_step: Optional[Callable[[], TimedStep]] = None) -> Optional[torch.dtype]:
    """resolve_amp's dtype alone."""
    return resolve_amp(amp, amp_dtype, device, log, make_step).dtype


def forward_backward_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                          forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], what: str) -> TimedStep:
    """A TimedStep of one training-mode forward (`forward(model, x)` -> logits) and the cross-entropy backward on
    a private copy of `model`: `model` itself (weights, buffers, gradients) is left as it is, and so are torch's
    random generators."""
    probe = copy.deepcopy(model).train()

    def run(context: ContextManager) -> None:
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            probe.zero_grad(set_to_none=True)
            with context:
                logits = forward(probe, x)
            F.cross_entropy(logits.float(), y).backward()

    return TimedStep(run, what)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast for `dtype`, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def configure_process(device: torch.device, threads: Optional[int], deterministic: bool = True) -> None:
    """Threads, determinism (which exact resume needs; on CUDA it costs speed) and, on the CPU, the caching
    host allocator."""
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    # ...without its NaN-filling of every new tensor (a guard against reading uninitialised memory, which
    # no op here does): on the CPU that fill cost as much as the small convolutions themselves.
    torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        # Every step allocates the same activations: reuse the blocks instead of page-faulting them in again.
        ops.cache_cpu_allocations()
