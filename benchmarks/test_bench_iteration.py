"""One search iteration of the benchmark supernet (space preset `bench`: stem 3x3 stride 1 to 16, the fixed
MBConv1 to 16, stages (24,2,1) (32,2,2) (64,2,2) (96,2,1) of choice blocks with the seven candidates,
head 256; 32x32 inputs, 10 classes, batch 64, 2 threads, fp32): one Phase-1 step plus one Phase-2 step,
every candidate remaining, as the engine runs them. betanas_fast (the kernels) against `reference` (every
op's pure-PyTorch reference) in the same run.

Under the ratio table, per implementation, the median time of each part of the step (the engine's own
timer, search.timing) next to the model of its limit (roofline.py): FLOPs and bytes of the part and the
time they would take at this machine's measured peak GEMM rate and copy bandwidth.
"""
import collections
import contextlib
import os
import statistics
import tempfile

import pytest
import torch

from betanas_fast import ops
from betanas_fast.search import Search, SearchConfig
from betanas_fast.search.timing import PARTS, StepTimer

import roofline

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SUITE = "search iteration, benchmark supernet (1 Phase-1 + 1 Phase-2 step, every path remaining)"


def make_search(tmp, device):
    cfg = SearchConfig(space="bench", epochs=50, warmup_epochs=0, phase_ratio=1, batch_size=64, heldout_batch_size=64,
                       threads=2 if device == "cpu" else None, progress=False, plots=False, tensorboard=False,
                       device=device, out=os.path.join(tmp, "run"), seed=0)
    s = Search(cfg)
    s._build()
    return s


def iteration(s, impl):
    s.state.remaining.copy_(s.state.allowed)  # the same work in every round: every path remaining
    with ops.reference_ops() if impl == "reference" else contextlib.nullcontext():
        s._iteration()


def step_model(s, rounds):
    """FLOPs and bytes per part, the mean over `rounds` iterations (each samples its own paths) counted on
    the reference ops."""
    counter = roofline.WorkCounter()
    s.timer = StepTimer(on_part=counter.set_part)
    with counter:
        for _ in range(rounds):
            iteration(s, "reference")
    return {name: (counter.flops.get(name, 0.0) / rounds, counter.bytes.get(name, 0.0) / rounds) for name in PARTS}


@pytest.mark.parametrize("impl", ["betanas_fast", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_search_iteration(record, report_line, impl, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, device)
        timer = StepTimer(sync=sync)
        parts = collections.defaultdict(list)

        def step():
            timer.reset()
            iteration(s, impl)
            sync()
            for name in PARTS:
                parts[name].append(timer.seconds.get(name, 0.0))

        s.timer = timer
        record(SUITE, {"device": device}, impl, step)
        model = step_model(s, len(parts["data"]))
    peaks = roofline.machine_peaks(device)
    report_line(f"\nParts of the iteration, {impl}, {device} (mean ms over the rounds, each with its own sampled "
                f"paths; FLOPs and bytes: the mean over as many iterations; limit: the roofline at "
                f"{peaks['flops'] / 1e9:.0f} GFLOP/s GEMM and {peaks['bytes'] / 1e9:.1f} GB/s copy, measured here)\n")
    report_line("| part | ms | GFLOP | MB | limit ms | ms / limit |")
    report_line("|---|---|---|---|---|---|")
    total = total_limit = 0.0
    for name in PARTS:
        ms = statistics.mean(parts[name]) * 1e3
        flops, nbytes = model[name]
        limit = roofline.limit_seconds(flops, nbytes, peaks) * 1e3
        total, total_limit = total + ms, total_limit + limit
        ratio = f"{ms / limit:.1f}x" if limit >= 0.01 else "-"
        report_line(f"| {name} | {ms:.1f} | {flops / 1e9:.2f} | {nbytes / 1e6:.1f} | {limit:.2f} | {ratio} |")
    report_line(f"| sum of parts | {total:.1f} | {sum(f for f, _ in model.values()) / 1e9:.2f} | "
                f"{sum(b for _, b in model.values()) / 1e6:.1f} | {total_limit:.2f} | {total / total_limit:.1f}x |")
    assert all(len(v) == len(parts["data"]) > 0 for v in parts.values())  # every round timed every part
