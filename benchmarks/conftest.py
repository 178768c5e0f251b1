"""Collects every benchmark's median and prints, at the end of the run, one table per suite with the
ratio baseline / betanas_fast per case (> 1 means betanas_fast is faster). `--results-md PATH` also
writes the tables as Markdown, with a description of the machine."""
import collections
import datetime
import os
import platform
import sys

import pytest
import torch

# The benchmarks' shared helpers (roofline.py) import by name; --import-mode=importlib keeps this folder
# off sys.path.
sys.path.insert(0, os.path.dirname(__file__))

# suite -> case (tuple of (column, value)) -> implementation -> median seconds
RESULTS = collections.defaultdict(lambda: collections.defaultdict(dict))
EXTRA_LINES = []


def pytest_addoption(parser):
    parser.addoption("--results-md", default=None, help="write the ratio tables to this Markdown file")


@pytest.fixture
def record(benchmark):
    """record(suite, case_dict, impl, fn): benchmarks fn and files its median under suite/case/impl."""

    def run(suite, case, impl, fn):
        benchmark.group = f"{suite}: " + " ".join(f"{k}={v}" for k, v in case.items())
        benchmark.pedantic(fn, rounds=int(os.environ.get("BETANAS_BENCH_ROUNDS", "7")), warmup_rounds=1,
                           iterations=1)
        RESULTS[suite][tuple(case.items())][impl] = benchmark.stats.stats.median

    return run


@pytest.fixture
def record_measured():
    """record_measured(suite, case_dict, impl, seconds): files a median measured elsewhere (in worker
    processes that the test launched and timed as a whole) under suite/case/impl."""

    def file(suite, case, impl, seconds):
        RESULTS[suite][tuple(case.items())][impl] = seconds

    return file


@pytest.fixture
def report_line():
    """report_line(text): a line printed (and written) under the ratio tables."""
    return EXTRA_LINES.append


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    lines = [f"- date: {datetime.date.today().isoformat()}",
             f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}",
             f"- torch {torch.__version__}, Python {platform.python_version()}"]
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return lines


def ratio_tables():
    out = []
    for suite, cases in RESULTS.items():
        impls = sorted({impl for medians in cases.values() for impl in medians})
        baseline = [i for i in impls if i != "betanas_fast"]
        columns = [k for k, _ in next(iter(cases))]
        header = columns + [f"{i} ms" for i in impls] + [f"ratio {b}/betanas_fast" for b in baseline]
        out += [f"### {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case, medians in cases.items():
            row = [str(v) for _, v in case]
            row += [f"{medians[i] * 1e3:.3f}" if i in medians else "-" for i in impls]
            for b in baseline:
                ok = b in medians and "betanas_fast" in medians
                row.append(f"{medians[b] / medians['betanas_fast']:.2f}x" if ok else "-")
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return out


def pytest_terminal_summary(terminalreporter, config):
    if not RESULTS and not EXTRA_LINES:
        return
    lines = ratio_tables() + EXTRA_LINES
    terminalreporter.write_sep("=", "betanas_fast vs baseline (median ms; ratio > 1: betanas_fast faster)")
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--results-md")
    if path:
        with open(path, "w") as f:
            f.write("# Benchmark results\n\n" + "\n".join(machine_description()) + "\n\n" + "\n".join(lines) + "\n")
        terminalreporter.write_line(f"written to {path}")
