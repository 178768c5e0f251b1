"""Collects every benchmark's median and prints, at the end of the run, one table per suite.

Every implementation timed has a role:
- "package": `betanas_fast`, the denominator of every ratio;
- "baseline": what a PyTorch user would write for the same work (same inputs, layout, threads), e.g.
  `aten`, `torch_modules`, `plain_torch_supernet`, `torch_autograd`, `torch_dataloader`: the tables give
  the speed-up baseline / betanas_fast (> 1: betanas_fast is faster);
- "variant": another way of running the package itself (names starting `betanas_fast_`, or a lower
  bound such as running without gradient averaging): its time ratio to betanas_fast, not a speed-up;
- "oracle": `reference_oracle`, the package's pure-PyTorch reference ops (the correctness oracle): its
  time is listed, never as a speed-up.

`--results-md PATH` writes the tables as Markdown; `--results-json PATH` writes the same data (every
suite's cases, medians in seconds per implementation, roles, ratios, the per-round samples of suites
timed in alternating order, the lines printed under the tables) through
`betanas_fast.runs.provenance.write_results`, which stamps the date, commit, machine and the command line.
Both files are rewritten whole, atomically (a temporary file renamed over them), after every benchmark test that
filed something new, and again at the end of the session: a run cut off by a time limit keeps every row it
finished.

`pytest benchmarks/ -m cuda` selects the GPU benchmarks (each carries the `cuda` marker; they skip without a GPU).
"""
import collections
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time

import pytest
import torch

# The benchmarks' shared helpers (roofline.py, plain_supernet.py) import by name; --import-mode=importlib keeps
# this folder off sys.path.
sys.path.insert(0, os.path.dirname(__file__))

PACKAGE = "betanas_fast"
ORACLE = "reference_oracle"
ROLES = ("package", "baseline", "variant", "oracle")
ROLE_TEXT = {
    "package": "betanas_fast: the package's kernels and engine; the denominator of every ratio",
    "baseline": "what a PyTorch user would write for the same work (same inputs, layout and threads); "
                "speed-up = baseline / betanas_fast, > 1: betanas_fast is faster",
    "variant": "another way of running the package (or a lower bound); time ratio variant / betanas_fast, "
               "not a speed-up",
    "oracle": "reference_oracle: the package's pure-PyTorch reference ops, the correctness oracle; timed for "
              "information only, never a speed-up",
}
# Environment variables that change what the benchmarks run; written into the command line of the results.
BENCH_ENV = ("BETANAS_BENCH_ROUNDS", "BETANAS_BENCH_FULL")

# suite -> case (tuple of (column, value)) -> implementation -> median seconds
RESULTS = collections.defaultdict(lambda: collections.defaultdict(dict))
# suite -> case -> implementation -> every round's seconds (suites timed in alternating order)
SAMPLES = collections.defaultdict(lambda: collections.defaultdict(dict))
# suite -> implementation -> role
IMPL_ROLES = collections.defaultdict(dict)
EXTRA_LINES = []
# How many times something was filed (results or report lines), and the count at the last write of the files.
_FILED = {"count": 0, "written": 0}


def rounds() -> int:
    return int(os.environ.get("BETANAS_BENCH_ROUNDS", "7"))


def default_role(impl: str) -> str:
    if impl == PACKAGE:
        return "package"
    if impl == ORACLE:
        return "oracle"
    if impl.startswith(PACKAGE):
        return "variant"
    return "baseline"


def _file(suite, case, impl, seconds, role):
    role = role or default_role(impl)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if impl == ORACLE and role != "oracle" or role == "oracle" and impl != ORACLE:
        raise ValueError(f"only {ORACLE!r} has the role 'oracle' (got {impl!r} as {role!r})")
    IMPL_ROLES[suite][impl] = role
    RESULTS[suite][tuple(case.items())][impl] = seconds
    _FILED["count"] += 1


def pytest_addoption(parser):
    parser.addoption("--results-md", default=None, help="write the ratio tables to this Markdown file")
    parser.addoption("--results-json", default=None,
                     help="write every suite's cases, medians, roles, ratios and report lines to this JSON file "
                          "(stamped with date, commit, machine and command)")


@pytest.fixture
def record(benchmark):
    """record(suite, case_dict, impl, fn, role=None): benchmarks fn and files its median under suite/case/impl.
    role: see the module docstring (default: from the name)."""

    def run(suite, case, impl, fn, role=None):
        benchmark.group = f"{suite}: " + " ".join(f"{k}={v}" for k, v in case.items())
        benchmark.pedantic(fn, rounds=rounds(), warmup_rounds=1, iterations=1)
        _file(suite, case, impl, benchmark.stats.stats.median, role)

    return run


@pytest.fixture
def record_measured():
    """record_measured(suite, case_dict, impl, seconds, role=None): files a median measured elsewhere (in worker
    processes that the test launched and timed as a whole) under suite/case/impl."""

    def file(suite, case, impl, seconds, role=None):
        _file(suite, case, impl, seconds, role)

    return file


@pytest.fixture
def record_alternating(benchmark):
    """record_alternating(suite, case_dict, fns, roles=None, n_rounds=None, inner=1) -> {impl: [seconds per
    round]}.

    Times every implementation of `fns` ({impl: fn}) in the same process, in alternating order: one warm-up
    call each, then `n_rounds` rounds (BETANAS_BENCH_ROUNDS, default 7) of one call of each, the order
    reversed every other round (A B C, C B A, ...) so that drift of the machine falls on all alike; a
    garbage collection before every call, outside the timing. `inner` > 1: each sample is `inner` calls in a
    row, divided by `inner` (for calls of microseconds). Files each implementation's median and its samples
    (seconds per call). The whole alternation is one pytest-benchmark round (so --benchmark-only runs it)."""

    def run(suite, case, fns, roles=None, n_rounds=None, inner=1):
        roles = roles or {}
        n = n_rounds or rounds()
        impls = list(fns)
        samples = {impl: [] for impl in impls}

        def alternate():
            for impl in impls:
                gc.collect()
                fns[impl]()
            for r in range(n):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    fn = fns[impl]
                    gc.collect()
                    start = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    samples[impl].append((time.perf_counter() - start) / inner)

        benchmark.group = f"{suite}: " + " ".join(f"{k}={v}" for k, v in case.items()) + " (alternating)"
        benchmark.pedantic(alternate, rounds=1, iterations=1)
        for impl in impls:
            _file(suite, case, impl, statistics.median(samples[impl]), roles.get(impl))
            SAMPLES[suite][tuple(case.items())][impl] = list(samples[impl])
        return samples

    return run


@pytest.fixture
def report_line():
    """report_line(text): a line printed (and written) under the ratio tables."""

    def add(text):
        EXTRA_LINES.append(text)
        _FILED["count"] += 1

    return add


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


def command_line() -> str:
    """The pytest command line as typed (from sys.argv), with the benchmark environment variables set."""
    prog = "python -m pytest" if sys.argv[0].endswith("__main__.py") else os.path.basename(sys.argv[0])
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in BENCH_ENV if k in os.environ]
    return " ".join(env + [prog] + [shlex.quote(a) for a in sys.argv[1:]])


def _ordered(impls, roles):
    """package, baselines, variants, oracle; in the order of filing within a role."""
    return [i for role in ROLES for i in impls if roles[i] == role]


def _paired_median(num, den):
    """The median over rounds of num[r] / den[r] (rounds timed back to back, alternating)."""
    return statistics.median(a / b for a, b in zip(num, den))


def results_data() -> dict:
    """Every suite: its case columns, implementations with their roles, and per case the medians (seconds),
    the speed-ups of the baselines, the time ratios of the variants (ratio of medians, and for alternating
    suites also the median of the per-round ratios), and the per-round samples where kept."""
    suites = {}
    for suite, cases in RESULTS.items():
        roles = IMPL_ROLES[suite]
        impls = _ordered({i for medians in cases.values() for i in medians}, roles)
        rows = []
        for case, medians in cases.items():
            samples = SAMPLES.get(suite, {}).get(case, {})
            row = {"case": dict(case), "median_s": {i: medians[i] for i in impls if i in medians},
                   "speedup": {}, "time_ratio": {}}
            if samples:
                row["samples_s"] = {i: samples[i] for i in impls if i in samples}
                row["paired_speedup"], row["paired_time_ratio"] = {}, {}
            for i in impls:
                if roles[i] not in ("baseline", "variant") or i not in medians or PACKAGE not in medians:
                    continue
                key = "speedup" if roles[i] == "baseline" else "time_ratio"
                row[key][i] = medians[i] / medians[PACKAGE]
                if i in samples and PACKAGE in samples:
                    row["paired_" + key][i] = _paired_median(samples[i], samples[PACKAGE])
            rows.append(row)
        suites[suite] = {"columns": [k for k, _ in next(iter(cases))], "implementations": {i: roles[i] for i in impls},
                         "alternating": suite in SAMPLES, "cases": rows}
    return {"roles": ROLE_TEXT, "rounds": rounds(), "suites": suites, "report_lines": list(EXTRA_LINES)}


def ratio_tables(data: dict) -> list:
    out = []
    for suite, d in data["suites"].items():
        roles = d["implementations"]
        impls = list(roles)
        baselines = [i for i in impls if roles[i] == "baseline"]
        variants = [i for i in impls if roles[i] == "variant"]
        timing = "alternating order, same process" if d["alternating"] else "one implementation after the other"
        header = (d["columns"] + [f"{i} ms" + (" (correctness oracle)" if roles[i] == "oracle" else "") for i in impls]
                  + [f"speed-up {b}/betanas_fast" for b in baselines] + [f"time {v}/betanas_fast" for v in variants])
        out += [f"### {suite}", "", f"({timing}; median of {data['rounds']} rounds)", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in d["cases"]:
            cells = [str(v) for v in row["case"].values()]
            cells += [f"{row['median_s'][i] * 1e3:.3f}" if i in row["median_s"] else "-" for i in impls]
            for key, names in (("speedup", baselines), ("time_ratio", variants)):
                for i in names:
                    if i not in row[key]:
                        cells.append("-")
                        continue
                    paired = row.get("paired_" + key, {}).get(i)
                    cells.append(f"{row[key][i]:.2f}x" + (f" (paired {paired:.2f}x)" if paired is not None else ""))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if out:
        out += ["Roles: " + "; ".join(f"{role}: {text}" for role, text in ROLE_TEXT.items() if role != "package") + ".",
                "Paired: the median over rounds of the two implementations' times in the same round.", ""]
    return out


def write_results_files(config) -> list:
    """Writes --results-md and --results-json (those asked for) whole, each atomically, from everything filed so
    far; returns the paths written."""
    from betanas_fast.runs.files import write_text
    from betanas_fast.runs.provenance import write_results

    data = results_data()
    written = []
    path = config.getoption("--results-md")
    if path:
        lines = ratio_tables(data) + EXTRA_LINES
        write_text(path, "# Benchmark results\n\n" + "\n".join(machine_description())
                   + f"\n- command: `{command_line()}`" + "\n\n" + "\n".join(lines) + "\n")
        written.append(path)
    path = config.getoption("--results-json")
    if path:
        write_results(path, command_line(), data, repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        written.append(path)
    _FILED["written"] = _FILED["count"]
    return written


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After each test (setup, call and teardown done): the results files again, if it filed anything, so that a
    run killed by a time limit keeps the rows of every test that finished."""
    yield
    if _FILED["count"] != _FILED["written"]:
        write_results_files(item.config)


def pytest_terminal_summary(terminalreporter, config):
    if not RESULTS and not EXTRA_LINES:
        return
    lines = ratio_tables(results_data()) + EXTRA_LINES
    terminalreporter.write_sep("=", "betanas_fast vs fair baselines (median ms; speed-up > 1: betanas_fast faster)")
    for line in lines:
        terminalreporter.write_line(line)
    for path in write_results_files(config):
        terminalreporter.write_line(f"written to {path}")
