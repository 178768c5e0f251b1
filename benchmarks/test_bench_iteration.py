"""One search iteration of the benchmark supernet (space preset `bench`: stem 3x3 stride 1 to 16, the fixed
MBConv1 to 16, stages (24,2,1) (32,2,2) (64,2,2) (96,2,1) of choice blocks with the seven candidates,
head 256; 32x32 inputs, 10 classes, batch 64, 2 threads, fp32, in the engine's layout as the search runs:
channels_last): one Phase-1 step plus one Phase-2 step, every candidate remaining, as the engine runs them.

- betanas_fast: the engine (Search._iteration: fused depthwise op, all-candidate op, α kernel);
- plain_torch_supernet (the fair baseline): the same supernet built from nn.Conv2d / nn.BatchNorm2d /
  nn.ReLU6 with the same weights, the same data, paths and α state, doing the same work in plain torch
  (plain_supernet.PlainSearch); checked first to compute the engine's numbers (plain_supernet.
  check_matches_engine, errors reported under the tables);
- reference_oracle: the engine with every op on its pure-PyTorch reference (the correctness oracle),
  timed for information only.
The three run in alternating order in the same process, each on its own Search built from the same
configuration and seed, so that every round they see the same batches and paths.

Under the ratio table, per implementation, the mean time of each part of the step (runs.timing; the
plain step marks the same parts) next to the model of its limit (roofline.py): FLOPs and bytes of the part
and the time they would take at this machine's measured peak GEMM rate and copy bandwidth.
"""
import collections
import os
import statistics
import tempfile

import pytest
import torch

from betanas_fast import ops
from betanas_fast.search import Search, SearchConfig
from betanas_fast.runs.timing import PARTS, StepTimer

import roofline
from plain_supernet import PlainSearch, check_matches_engine

# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
CUDA = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
SUITE = "search iteration, benchmark supernet (1 Phase-1 + 1 Phase-2 step, every path remaining)"
LABELS = {"betanas_fast": "betanas_fast", "plain_torch_supernet": "plain_torch_supernet (fair baseline)",
          "reference_oracle": "reference_oracle (correctness oracle, not a baseline)"}


def make_search(tmp, device, name):
    cfg = SearchConfig(space="bench", epochs=50, warmup_epochs=0, phase_ratio=1, batch_size=64, heldout_batch_size=64,
                       threads=2 if device == "cpu" else None, progress=False, plots=False, tensorboard=False,
                       device=device, out=os.path.join(tmp, name), seed=0)
    s = Search(cfg)
    s._build()
    return s


def step_model(s, rounds):
    """FLOPs and bytes per part, the mean over `rounds` iterations (each samples its own paths) counted on
    the reference ops."""
    counter = roofline.WorkCounter()
    s.timer = StepTimer(on_part=counter.set_part)
    with counter, ops.reference_ops():
        for _ in range(rounds):
            s.state.remaining.copy_(s.state.allowed)
            s._iteration()
    return {name: (counter.flops.get(name, 0.0) / rounds, counter.bytes.get(name, 0.0) / rounds) for name in PARTS}


def report_parts(report_line, impl, device, parts, model, peaks):
    report_line(f"\nParts of the iteration, {LABELS[impl]}, {device} (mean ms over the rounds, each with its own "
                f"sampled paths; FLOPs and bytes: the mean over as many iterations, on the reference ops; limit: the "
                f"roofline at {peaks['flops'] / 1e9:.0f} GFLOP/s GEMM and {peaks['bytes'] / 1e9:.1f} GB/s copy, "
                f"measured here)\n")
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


@pytest.mark.parametrize("device", DEVICES)
def test_search_iteration(record_alternating, report_line, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        engine, base, oracle = (make_search(tmp, device, name) for name in ("engine", "plain", "oracle"))
        plain = PlainSearch(base)
        with ops.ieee_fp32():  # the same arithmetic on both sides for the check (no TF32 on CUDA)
            errors = check_matches_engine(engine, plain)  # one Phase-1 step and one α step of each: still in step
        with ops.reference_ops():
            oracle.phase1_step()  # the same batches from here on
        report_line(f"- plain_torch_supernet computes the engine's numbers, bench, {device} (max error / largest "
                    f"value): " + "; ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        timers = {impl: StepTimer(sync=sync) for impl in LABELS}
        engine.timer, plain.timer, oracle.timer = (timers[i] for i in LABELS)
        parts = {impl: collections.defaultdict(list) for impl in LABELS}

        def stepper(impl, search, run):
            def step():
                timers[impl].reset()
                search.state.remaining.copy_(search.state.allowed)  # the same work in every round: every path
                run()
                sync()
                for name in PARTS:
                    parts[impl][name].append(timers[impl].seconds.get(name, 0.0))
            return step

        def oracle_iteration():
            with ops.reference_ops():
                oracle._iteration()

        samples = record_alternating(SUITE, {"device": device}, {
            "betanas_fast": stepper("betanas_fast", engine, engine._iteration),
            "plain_torch_supernet": stepper("plain_torch_supernet", base, plain.iteration),
            "reference_oracle": stepper("reference_oracle", oracle, oracle_iteration)})
        rounds = len(samples["betanas_fast"])
        for impl in LABELS:  # the first call of each was the warm-up
            parts[impl] = {name: values[1:] for name, values in parts[impl].items()}
            assert all(len(v) == rounds for v in parts[impl].values())  # every round timed every part
        model = step_model(oracle, rounds)
        for s in (engine, base, oracle):
            s.close()
    peaks = roofline.machine_peaks(device)
    for impl in LABELS:
        report_parts(report_line, impl, device, parts[impl], model, peaks)
