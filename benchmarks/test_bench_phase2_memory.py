"""Phase 2's all-candidate op within a memory budget: ChoiceBlock.gate_grads for the six MBConv candidates of
the first choice block of the ImageNet (`mobile`) space (16 -> 24 channels, stride 2, at 112x112), batch 32,
float32 (on the CPU in NCHW, on CUDA in the engine's layout, runs.runtime.model_memory_format: channels_last):
unchunked, and with budgets of 512, 256, 128 and 64 MiB. Per budget: the number of
block_gate_grads calls, the largest call's estimate (gate_grad_bytes summed over its candidates), the
measured peak extra memory of the call, and its median time.

How the peak is measured: each (device, budget) runs in a fresh Python process (this file as a script).
On the CPU it is the process's peak resident set size during the call minus the resident set just before
it: what the machine really hands the call, the allocator's slack included, whichever path allocates. The
peak is the kernel's high-water mark VmHWM (/proc/self/status), reset to the current RSS just before the
call by writing 5 to /proc/self/clear_refs; where that is refused, the fresh process's mark is used and
the call must have raised it. Not getrusage's ru_maxrss: a child started by subprocess (vfork + exec)
inherits the parent's mark into it at exec, which hides the call's peak under pytest's, and it never
resets. The process first warms up on a batch of 2 (thread pools, library state). No caching
allocator is installed (ops.cache_cpu_allocations would keep freed blocks resident, and the peak would
then include earlier calls). On CUDA it is torch.cuda.max_memory_allocated minus the memory allocated
before the call (exact for tensors).

What to expect: the CPU kernel evaluates one candidate at a time, and of it holds only the depthwise output y
whole (h and z live in chunks of 2 MiB), next to its channels_last copies of x and dL/dO (they come NCHW
here): cpu_kernel_bytes, 74 MiB here, whatever the budget, give or take the allocator's slack, and chunking
costs no memory; the budget bounds the CUDA kernel, which holds every candidate of a call at once (880 MiB
estimated unchunked), so there the peak falls with the budget. (In channels_last the CPU case measured 55 MiB
unchunked but 119 MiB chunked: a chunked call's x.contiguous() in ChoiceBlock.gate_grad_values makes NCHW copies,
which the CPU kernel copies back to channels_last.)
"""
import json
import os
import subprocess
import sys
import warnings
from typing import Dict, Optional, Tuple

import pytest
import torch

import betanas_fast
from betanas_fast.nn import ChoiceBlock, gate_grad_bytes, set_bn_batch_stats_frozen
from betanas_fast.runs.runtime import model_memory_format
from betanas_fast.space import build_space

BATCH = 32
MIB = 1 << 20
BUDGETS_MIB = [None, 512, 256, 128, 64]
# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
CUDA = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# device -> budget (MiB or None) -> measured values
MEASURED: Dict[str, Dict[Optional[int], dict]] = {}


def make_case(device: str, batch: int, seed: int = 0) -> Tuple[ChoiceBlock, torch.Tensor, torch.Tensor, list]:
    """The first choice block of the mobile space, in Phase 2's state (training mode, running statistics
    frozen), a random block input and dL/dO, and its candidates."""
    torch.manual_seed(seed)
    space = build_space("mobile")
    spec = space.blocks[0]
    # CUDA: the engine's layout (channels_last); the CPU: NCHW, whose copies the CPU expectation counts (see the
    # module docstring)
    layout = model_memory_format(torch.device(device)) if device == "cuda" else torch.contiguous_format
    block = ChoiceBlock(space, 0).to(device, memory_format=layout).train()
    set_bn_batch_stats_frozen(block, True)
    x = torch.randn(batch, spec.in_channels, spec.in_resolution, spec.in_resolution, device=device)
    g = torch.randn(batch, spec.out_channels, spec.out_resolution, spec.out_resolution, device=device)
    x, g = x.contiguous(memory_format=layout), g.contiguous(memory_format=layout)
    choices = [m for m, ok in enumerate(spec.allowed) if ok]
    return block, x, g, choices


def cpu_kernel_bytes(block: ChoiceBlock, x: torch.Tensor, g: torch.Tensor, choices: list) -> int:
    """The CPU kernel's working set at its peak: x and dL/dO in channels_last (copies unless they come so), the
    largest candidate's depthwise output [N * Ho * Wo, Ce] in float32, and one 2 MiB chunk each of its expanded
    activations and of its projection."""
    mbconvs = [block.path(m) for m in choices if not isinstance(block.path(m), torch.nn.Identity)]
    y = max(m.depthwise.conv.in_channels for m in mbconvs) * g.shape[0] * g.shape[2] * g.shape[3] * 4
    copies = sum(t.numel() * t.element_size() for t in (x, g) if not t.is_contiguous(memory_format=torch.channels_last))
    return y + copies + 2 * 2 * MIB


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(device: str, budget: Optional[int], threads: int) -> dict:
    """In this (fresh) process: the extra memory at the peak of one gate_grads call, in bytes."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # the over-budget candidates' warnings
    block, x, g, choices = make_case(device, BATCH)
    wb, wx, wg, _ = make_case(device, 2, seed=1)
    wb.gate_grads(wx, wg, choices, budget)
    del wb, wx, wg
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        block.gate_grads(x, g, choices, budget)
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() - before, "observed": True}
    reset = _reset_high_water_mark()
    before, high_before = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    block.gate_grads(x, g, choices, budget)
    high = _status_bytes("VmHWM")
    return {"peak": high - before, "observed": reset or high > high_before}


def peak_in_fresh_process(device: str, budget_mib: Optional[int]) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(betanas_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    args = [sys.executable, os.path.abspath(__file__), device, str(budget_mib or 0), str(torch.get_num_threads())]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_table(device: str, report_line) -> None:
    report_line("")
    report_line(f"### Phase 2 gate_grads memory, mobile block 0 (16->24, s2, 112x112), N={BATCH}, float32, {device}")
    report_line("")
    report_line("| budget | calls | largest call's estimate MiB | measured peak MiB | median ms |")
    report_line("|---|---|---|---|---|")
    for budget_mib in BUDGETS_MIB:
        r = MEASURED[device][budget_mib]
        label = "unchunked" if budget_mib is None else f"{budget_mib} MiB"
        report_line(f"| {label} | {r['calls']} | {r['estimate'] / MIB:.1f} | {r['peak'] / MIB:.1f} | "
                    f"{r['seconds'] * 1e3:.1f} |")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("budget_mib", BUDGETS_MIB, ids=lambda b: "unchunked" if b is None else f"{b}MiB")
@pytest.mark.parametrize("device", DEVICES)
def test_phase2_gate_grads_memory(record, benchmark, report_line, device, budget_mib):
    budget = None if budget_mib is None else budget_mib * MIB
    block, x, g, choices = make_case(device, BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chunks = block.gate_grad_chunks(x, choices, budget)
    estimate = max(sum(gate_grad_bytes(x, block.path(m)) for m in c) for c in chunks)
    measured = peak_in_fresh_process(device, budget_mib)
    assert measured["observed"], "the call did not raise the process's high-water mark: its peak is hidden"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        block.gate_grads(x, g, choices, budget)
        sync()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record(f"Phase 2 gate_grads, mobile block 0, N={BATCH}", {"device": device, "budget": budget_mib or "-"},
               "betanas_fast", call)
    MEASURED.setdefault(device, {})[budget_mib] = dict(measured, calls=len(chunks), estimate=estimate,
                                                       seconds=benchmark.stats.stats.median)
    results = MEASURED[device]
    if budget_mib is not None:
        assert len(chunks) > 1
        if None in results:
            full = results[None]
            assert estimate < full["estimate"]  # the largest call holds fewer candidates
            if device == "cpu":  # one candidate at a time whatever the split: chunking costs no memory beyond
                # the allocator's slack (glibc keeps up to twice its mmap threshold, at most 2 x 32 MiB, of freed
                # heap resident, so equal calls measure within ~50 MiB of each other)
                assert measured["peak"] <= full["peak"] + 64 * MIB
    if len(results) == len(BUDGETS_MIB):
        report_table(device, report_line)
        estimates = [results[b]["estimate"] for b in BUDGETS_MIB]
        assert estimates == sorted(estimates, reverse=True)
        if device == "cuda":  # the kernel holds a whole call's candidates: the peak falls with the budget
            assert results[BUDGETS_MIB[-1]]["peak"] < results[None]["peak"]
        else:  # the CPU kernel's peak is its working set for the largest candidate
            expected = cpu_kernel_bytes(block, x, g, choices)
            assert 0.8 * expected < results[None]["peak"] < 1.5 * expected, (results[None]["peak"], expected)


if __name__ == "__main__":
    device_arg, budget_arg, threads_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(measure_peak(device_arg, budget_arg * MIB if budget_arg else None, threads_arg)))
