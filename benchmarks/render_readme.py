"""Renders the figures of README.md and docs/*.md from the results files under benchmarks/results/.

    python benchmarks/render_readme.py           # rewrite the rendered blocks in place
    python benchmarks/render_readme.py --check   # exit 1 (and show the difference) where a page disagrees

A rendered block sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; NAME is one of the
renderers below, each of which reads its results file(s) and states where the numbers come from (file,
command, date, commit, machine). Text outside the blocks carries no measured figure. A results file that does
not exist yet renders as a line naming the command that writes it, never as an old number.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)

RENDERERS: Dict[str, Callable[[], str]] = {}
# Rows of the README's summary table from the results files of the suites: (what, file, figure(doc)), added
# beside their renderers.
EXTRA_SUMMARY: List[tuple] = []

# Which command writes which results file.
WRITERS = {
    "install.json": "python benchmarks/record.py install",
    "demo.json": "python benchmarks/record.py demo",
    "latency.json": "python benchmarks/record.py latency",
    "study_balance.json": "python benchmarks/record.py studies --studies balance",
    "study_sharing.json": "python benchmarks/record.py studies --studies sharing",
    "study_seeds.json": "python benchmarks/record.py studies --studies seeds",
    "groundtruth_mnist_cluttered.json": "python benchmarks/record.py studies --studies groundtruth",
    "ranking_mnist_cluttered.json": "python benchmarks/record.py studies --studies ranking",
    "study_seeds_mnist_cluttered.json": "python benchmarks/record.py studies --studies seeds-cluttered",
    "supernet_learning_mnist_cluttered.json": "python benchmarks/supernet_learning.py",
    "precision.json": "python benchmarks/precision.py",
    "mixture_demo.json": "python benchmarks/mixture_demo.py",
    "null_tests.json": "python benchmarks/null_tests.py",
    "strategy_null.json": "python benchmarks/strategy_null.py",
    "compare_digits.json": "python benchmarks/record.py studies --studies compare",
    "compare_mnist_cluttered.json": "python benchmarks/record.py studies --studies compare-cluttered",
    "compare_mnist_cluttered_wall.json": "python benchmarks/record.py studies --studies compare-cluttered-wall",
    "cpu.json": "pytest benchmarks/test_bench_iteration.py benchmarks/test_bench_search_step.py "
                "benchmarks/test_bench_phase1.py benchmarks/test_bench_alpha_grad.py benchmarks/test_bench_dw_bn_act.py "
                "--benchmark-only --results-json benchmarks/results/cpu.json --results-md benchmarks/results/cpu.md",
}


def renderer(name: str, results_file: Optional[str] = None):
    """Registers a renderer of blocks NAME. With `results_file` it is called with that file's contents, and a
    file not written yet renders as the line naming its command."""
    def add(fn):
        if results_file is None:
            RENDERERS[name] = fn
        else:
            def from_file():
                doc = load(results_file)
                return missing(results_file) if doc is None else fn(doc)
            RENDERERS[name] = from_file
        return fn
    return add


def load(name: str) -> Optional[dict]:
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def missing(name: str) -> str:
    return f"_No results yet: `{WRITERS[name]}` writes `benchmarks/results/{name}`._\n"


def machine_text(m: dict) -> str:
    features = "/".join(f.upper() for f in m.get("cpu_features", []) if f.startswith(("avx", "amx"))) or "no AVX"
    text = f"{m['cpu']} ({m['cores']} cores, {features}), torch {m['torch']}"
    if m.get("gpu"):
        text += f", {m['gpu']}"
    if not m.get("kernels_loaded", True):
        text += ", WITHOUT the compiled kernels"
    return text


def source(name: str, doc: dict) -> str:
    s = doc["stamp"]
    load_avg = s.get("load_average")
    load_text = f", load average {load_avg[0]:.1f} when written" if load_avg else ""
    return (f"<sub>From `benchmarks/results/{name}`, written by `{s['command']}` on {s['date']} at commit "
            f"`{s['commit']}`; {machine_text(s['machine'])}{load_text}.</sub>\n")


def minsec(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def pct(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


# --- renderers -------------------------------------------------------------------------------------------------
@renderer("install", "install.json")
def render_install(doc: dict) -> str:
    p = doc["pip_install"]
    kernels = "CPU and CUDA kernels" if p["cuda_kernels_compiled"] else "CPU kernels only (no GPU visible)"
    busy = (f" Other jobs shared the machine while it ran (load average {p['load_before']:.1f} at its start), so "
            f"this is slower than on an idle machine." if p["load_before"] > 1.5 else "")
    return (f"`pip install .` from a fresh clone into a fresh virtual environment, pip's cache off: "
            f"**{minsec(p['seconds'])}**, building the {kernels} against torch {p['built_with_torch']}.{busy}\n\n"
            + source("install.json", doc))


def _busy(step: dict, doc: Optional[dict] = None) -> str:
    """A note where other jobs shared the machine while a command was timed: its load average at the start (or,
    where the file did not record that, when the file was written)."""
    load_avg = step.get("load_before", doc["stamp"]["load_average"][0] if doc else 0.0)
    return f" (load average {load_avg:.1f}: other jobs shared the cores)" if load_avg > 1.5 else ""


def _drops_text(drops: List[dict], limit: int = 12) -> str:
    shown = [f"block {d['block']} `{d['op']}` at step {d['step']}" for d in drops[:limit]]
    more = f", and {len(drops) - limit} more" if len(drops) > limit else ""
    return "; ".join(shown) + more if drops else "none"


@renderer("demo", "demo.json")
def render_demo(doc: dict) -> str:
    s, ev, tr, ex = doc["search"], doc["evaluate"], doc["train"], doc["export"]
    lines = ["| command | wall time | result |", "|---|---|---|",
             f"| `{s['command']}` | {minsec(s['seconds'])}{_busy(s)} | {s['paths_dropped']} of {s['paths']} paths dropped; "
             f"searched net {s['mflops']:.3f} MFLOPs, {s['params']:,} params, {pct(s['val_acc'])} validation top-1 "
             f"with inherited weights |",
             f"| `{ev['command']}` | {minsec(ev['seconds'])}{_busy(ev, doc)} | top-1 {pct(ev['top1'])} "
             f"({'the same number as the search' if ev['agrees_with_search'] else 'DIFFERS from the search'}) |",
             f"| `{tr['command']}` | {minsec(tr['seconds'])}{_busy(tr, doc)} | {tr['epochs']} epochs: best validation top-1 "
             f"{pct(tr['best_val_top1'])}, last {pct(tr['last_val_top1'])} |"]
    for fmt, e in ex.items():
        diff = e["max_abs_logit_diff"]
        diff_text = ", ".join(f"{v:.1e} at batch {k}" for k, v in diff.items()) if isinstance(diff, dict) \
            else f"{diff:.1e}"
        lines.append(f"| `{e['command']}` | {minsec(e['seconds'])} | max \\|logit difference\\| {diff_text} |")
    amp = s.get("amp")
    text = "\n".join(lines) + "\n\n"
    if amp:
        text += f"The search printed: `{amp}`\n\n"
    text += f"Drops in order (step: the search's iteration): {_drops_text(s['drops'])}.\n\n" + source("demo.json", doc)
    return text


@renderer("latency", "latency.json")
def render_latency(doc: dict) -> str:
    b, s, v = doc["build"], doc["search"], doc["validate"]
    r = v["report"]
    lines = ["| command | wall time | result |", "|---|---|---|",
             f"| `{b['command']}` | {minsec(b['seconds'])} | {b['entries']} entries |",
             f"| `{s['command']}` | {minsec(s['seconds'])} | searched net {s['mflops']:.3f} MFLOPs, "
             f"{s['predicted_ms']:.3f} ms predicted |",
             f"| `{v['command']}` | {minsec(v['seconds'])} | {_validate_text(r)} |"]
    return "\n".join(lines) + "\n\n" + source("latency.json", doc)


def _validate_text(r: dict) -> str:
    """The validate report's headline: the table's error and rank agreement against MFLOPs'."""
    text = (f"{r['archs']} random nets of {r['measured_range_ms'][0]:.3f}–{r['measured_range_ms'][1]:.3f} ms: "
            f"table MAPE {r['table_mape']:.2f} % (sum of parts alone {r['sum_only_mape']:.2f} %), Kendall τ-b "
            f"{r['table_tau']:.3f}; MFLOPs τ-b {r['mflops_tau']:.3f} (least-squares fit MAPE "
            f"{r['mflops_fit_mape']:.2f} %)")
    for s in r.get("searched", []):
        text += (f"; the searched net: predicted {s['predicted_ms']:.3f} ms, measured {s['measured_ms']:.3f} ms "
                 f"({s['error_pct']:+.1f} %, {100 * s['random_nets_predicted_better']:.0f} % of the random nets "
                 f"predicted better)")
    return text


def _conftest():
    """The benchmarks' conftest, whose ratio_tables turns a --results-json file into its Markdown tables."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(HERE, "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@renderer("performance", "cpu.json")
def render_performance(doc: dict) -> str:
    lines = _conftest().ratio_tables(doc) + doc["report_lines"]
    text = "\n".join(ln.replace("### ", "#### ") for ln in lines)
    return text + "\n\n" + source("cpu.json", doc)


def _headline(doc: dict, prefix: str, baseline: str) -> Optional[dict]:
    """The first CPU case of the first suite whose name starts with `prefix`: its medians and speed-up."""
    for suite, d in doc["suites"].items():
        if suite.startswith(prefix):
            for row in d["cases"]:
                if row["case"].get("device", "cpu") == "cpu" and baseline in row["speedup"]:
                    return {"ms": 1e3 * row["median_s"]["betanas_fast"], "base_ms": 1e3 * row["median_s"][baseline],
                            "speedup": row["speedup"][baseline],
                            "paired": row.get("paired_speedup", {}).get(baseline)}
    return None


def _speed_text(doc: dict, prefix: str, baseline: str, label: str) -> str:
    h = _headline(doc, prefix, baseline)
    if h is None:
        return f"not in this run ({prefix}…)"
    paired = f", paired {h['paired']:.2f}×" if h["paired"] is not None else ""
    return f"{h['ms']:.0f} ms vs {h['base_ms']:.0f} ms for {label}: **{h['speedup']:.2f}×**{paired}"


for _what, _prefix, _base, _label in (
        ("search iteration (bench supernet, CPU)", "search iteration", "plain_torch_supernet",
         "the same supernet in plain torch modules"),
        ("Phase-2 step (demo supernet, CPU)", "Phase-2 step, demo", "torch_modules", "the candidates' modules looped"),
        ("whole search step (demo supernet, CPU)", "whole search step", "plain_torch_supernet",
         "the same supernet in plain torch modules")):
    EXTRA_SUMMARY.append((_what, "cpu.json",
                          lambda d, p=_prefix, b=_base, lab=_label: _speed_text(d, p, b, lab)))


def _per_seed(d: dict) -> str:
    return ", ".join(str(v) for v in (d.values() if isinstance(d, dict) else d))


@renderer("null_tests", "null_tests.json")
def render_null_tests(doc: dict) -> str:
    w, a, s = doc["noise_walk"], doc["alpha_pipeline"], doc["whole_search"]
    caught = sum(a["planted_all_caught"])
    return (f"- **The noise walk.** The demo makes {w['alpha_steps']} α steps at lr {w['arch_lr']:g}: "
            f"lr·√steps = {w['walk_lr_sqrt_steps']:.3f}, {w['walk_over_abs_threshold']:.2f} of the threshold's "
            f"magnitude {abs(w['drop_threshold']):g} (the run warns above {w['check_warns_above']:g}).\n"
            f"- **The α pipeline** (Eq. 4 → Adam → re-centring → drop, the demo's defaults, {a['paths']} paths, "
            f"{len(a['seeds'])} seeds): zero-mean gate gradients dropped {_per_seed(a['null_drops_per_seed'])} "
            f"paths; with a mean shift of {a['planted_shift_in_noise_std']:g} noise std planted on "
            f"{len(a['planted_paths'])} paths (the positive control), all planted paths were dropped in {caught} "
            f"of {len(a['seeds'])} seeds, with {sum(a['planted_extra_drops'])} other drops in all.\n"
            f"- **Whole searches** ({s['what']}): permuted labels dropped {_per_seed(s['null_drops_per_seed'])} paths "
            f"(seeds {', '.join(s['null_drops_per_seed'])}); true labels dropped "
            f"{_per_seed(s['true_drops_per_seed'])}. The tests require at most {s['test_bounds']['null_max_drops']} "
            f"drops on permuted labels and at least {s['test_bounds']['true_min_drops']} on the true ones.\n\n"
            + source("null_tests.json", doc))


EXTRA_SUMMARY.append(("null tests: demo search with β = 0", "null_tests.json",
                      lambda d: f"permuted labels drop {_per_seed(d['whole_search']['null_drops_per_seed'])} paths "
                                f"(seeds {', '.join(d['whole_search']['null_drops_per_seed'])}), true labels "
                                f"{_per_seed(d['whole_search']['true_drops_per_seed'])}"))


@renderer("precision", "precision.json")
def render_precision(doc: dict) -> str:
    s = doc["settings"]
    return (f"Over {doc['entries_that_matter']} α-gradient entries larger than {s['matters_fraction']:.0%} of their "
            f"batch's largest ({s['batches']} held-out batches of {s['heldout_batch_size']}, the {s['space']} "
            f"supernet after {s['phase1_steps']} Phase-1 steps in {s['phase1_amp_dtype']}), the sign of the "
            f"engine's fp32 Phase 2 agrees with the float64 oracle on **{pct(doc['engine_agreement'])}**, a bf16 "
            f"Phase 2 on **{pct(doc['bf16_agreement'])}**. Largest error of the dL/dg table against the oracle's "
            f"(relative to its largest entry): engine {pct(doc['engine_table_max_rel_error'], 2)}, the oracle's own "
            f"code in float32 {pct(doc['plain_fp32_table_max_rel_error'], 2)}, bf16 "
            f"{pct(doc['bf16_table_max_rel_error'], 1)}.\n\n" + source("precision.json", doc))


EXTRA_SUMMARY.append(("Phase 2's α-gradient signs vs a float64 oracle", "precision.json",
                      lambda d: f"engine (fp32) {pct(d['engine_agreement'])}, bf16 Phase 2 "
                                f"{pct(d['bf16_agreement'])} of {d['entries_that_matter']} entries"))


@renderer("mixture_demo", "mixture_demo.json")
def render_mixture_demo(doc: dict) -> str:
    s = doc["settings"]
    rows = ["| strategy | peak memory (RSS) | per iteration | searched net | identity blocks | paths left per block "
            "| early stop | val acc (inherited) |", "|---|---|---|---|---|---|---|---|"]
    base = doc["runs"]["betanas"]["peak_rss_mib"]
    for name, r in doc["runs"].items():
        left = r.get("remaining_paths")
        stop = r.get("stopped")
        rows.append(f"| {name} | {r['peak_rss_mib']:.0f} MiB ({r['peak_rss_mib'] / base:.2f}× betanas) | "
                    f"{r['iteration_ms_mean']:.0f} ms | {r['mflops']:.3f} MFLOPs | {r['argmax_skips']} | "
                    f"{'-' if left is None else ' '.join(map(str, left))} | "
                    f"{'-' if not stop else 'epoch ' + str(stop['epoch']) + ': ' + stop['reason']} | "
                    f"{pct(r['val_acc'])} |")
    mix = doc["runs"]["darts"]["mixture_memory"]
    checks = "; ".join(f"{n} {c['float64_error']:.1e}" for n, c in doc["gradient_checks"].items())
    f32 = doc["gradient_checks"]["darts first order"].get("float32_error")
    return ("\n".join(rows) + "\n\n"
            f"The demo ({s['epochs']} epochs, {s['warmup_epochs']} of them warm-up, seed {s['seed']}, {s['threads']} "
            f"threads; an iteration is its weight steps plus, after the warm-up, its α step). The mixture's "
            f"activations, measured before the run: {mix['per_image_bytes'] / 2**20:.2f} MiB per image, "
            f"**{mix['ratio_to_one_path']:.1f}×** one path's. α-gradient checks against the float64 oracle "
            f"(largest difference relative to the oracle's largest entry, the network in float64): {checks}"
            + (f"; darts first order with the network in float32, as a run computes it: {f32:.1e}" if f32 else "")
            + f". Load average before/after: {doc['load_average']['before'][0]}/{doc['load_average']['after'][0]}."
            "\n\n" + source("mixture_demo.json", doc))


@renderer("strategy_null", "strategy_null.json")
def render_strategy_null(doc: dict) -> str:
    st = doc["settings"]
    rows = ["| strategy | seeds agreeing per block, permuted labels, β = 0 (null) | with the cost term (control) | "
            "true labels, β = 0 | identity share, null (chance) | drops beyond the schedule |",
            "|---|---|---|---|---|---|"]
    for name, c in doc["strategies"].items():
        null, cost, true = c["null"], c["cost"], c["true"]
        identity = null.get("identity_share_of_skip_legal")
        identity = "-" if identity is None else f"{identity:.2f} ({null['identity_chance']:.2f})"
        beyond = null.get("drops_beyond_schedule")
        rows.append(f"| {name} | {null['pair_agreement']:.2f} (chance {null['chance']:.2f}) | "
                    f"{cost['pair_agreement']:.2f} | {true['pair_agreement']:.2f} | "
                    f"{identity} | "
                    f"{'-' if beyond is None else ', '.join(map(str, beyond))} |")
    return ("\n".join(rows) + "\n\n"
            f"{st['seeds']} seeds per strategy and condition, the demo shortened to {st['epochs']} epochs "
            f"({st['warmup_epochs']} warm-up). \"Seeds agreeing\": the fraction of seed pairs whose final argmax is the "
            "same, averaged over the blocks; chance is the mean of 1/M over the blocks. The control keeps the permuted "
            f"labels and turns the cost term on (β = {st['control_beta']} per MFLOP, 10× the demo's; fbnet its own "
            "b): one pressure shared by every seed, which the measure must register. "
            "\"Drops beyond the schedule\": pdarts's drops minus those its top-k schedule forces, per seed."
            "\n\n" + source("strategy_null.json", doc))


def _compare_block(doc: dict, name: str) -> str:
    """The compare study's table per strategy; with a ground-truth table, each net's percentile among the
    trained-alone architectures of about its MFLOPs, averaged per strategy."""
    study = doc["study"]
    gt = all("groundtruth_percentile" in r for r in study["nets"])
    rows = ["| strategy | top-1 (test, retrained) | MFLOPs | search wall time | path-epochs | "
            + ("ground-truth percentile at its MFLOPs | " if gt else "") + "p(betanas > it), Holm |",
            "|---|---|---|---|---|" + ("---|" if gt else "") + "---|"]
    for s, g in study["summary"].items():
        t = study["tests"]["against"].get(s)
        rs = [r for r in study["nets"] if r["strategy"] == s]
        rows.append(f"| {s} | {pct(g['top1_mean'])} ± {100 * g['top1_std']:.1f} | {g['mflops_mean']:.3f} | "
                    f"{g['search_seconds_mean']:.0f} s"
                    + ("" if g["searches_timed"] == len(rs) else f" ({g['searches_timed']} of {len(rs)} timed)")
                    + f" | {g['path_epochs_mean']:.1f} | "
                    + (f"{_percentiles(rs)} | " if gt else "")
                    + f"{'-' if t is None else format(t['holm_p'], '.3f')} |")
    tests = study["tests"]
    pooled = tests["pooled"]
    return ("\n".join(rows) + "\n\n"
            f"{study['seeds']} seeds per strategy (`{doc['command']}`); {study['scoring']['images']} test images no "
            f"search loaded; the tests are one-sided Mann–Whitney U (exact), Holm-adjusted over the "
            f"{len(tests['against'])} comparisons: with {study['seeds']} seeds none can go below "
            f"{tests['smallest_p']:.3f}, nor below {tests['smallest_holm_p']:.3f} after the adjustment. Against the "
            f"{pooled['nets']} nets of the other strategies pooled: p = {pooled['mann_whitney']['p_value']:.3f} "
            f"(Mann–Whitney), {pooled['permutation']['p_value']:.3f} (permutation on the mean). Wall times from "
            f"`--jobs` processes on this machine."
            + (" The percentile: where a net's top-1 falls among the ground-truth table's architectures within "
               f"±{100 * study['nets'][0]['groundtruth_percentile']['band']:.0f} % of its MFLOPs (50: as good as the "
               "typical one), averaged over the nets that have such neighbours." if gt else "")
            + "\n\n" + source(name, doc))


def _percentiles(nets: List[dict]) -> str:
    """The mean ground-truth percentile of the nets that have ground-truth neighbours, and how many do."""
    values = [r["groundtruth_percentile"]["percentile"] for r in nets
              if r["groundtruth_percentile"]["percentile"] is not None]
    if not values:
        return "no neighbours"
    return f"{sum(values) / len(values):.0f}" + ("" if len(values) == len(nets) else f" ({len(values)} of {len(nets)})")


@renderer("compare", "compare_digits.json")
def render_compare(doc: dict) -> str:
    return _compare_block(doc, "compare_digits.json")


@renderer("compare_cluttered", "compare_mnist_cluttered.json")
def render_compare_cluttered(doc: dict) -> str:
    return _compare_block(doc, "compare_mnist_cluttered.json")


@renderer("compare_cluttered_wall", "compare_mnist_cluttered_wall.json")
def render_compare_cluttered_wall(doc: dict) -> str:
    return _compare_block(doc, "compare_mnist_cluttered_wall.json")


def _compare_text(doc: dict) -> str:
    """The compare study in one line: betanas, the best other strategy, how many tests reject at 5 %."""
    study = doc["study"]
    summary, against = study["summary"], study["tests"]["against"]
    ref = summary["betanas"]
    best = max((s for s in summary if s != "betanas"), key=lambda s: summary[s]["top1_mean"])
    below = sum(t["holm_p"] < 0.05 for t in against.values())
    pooled = study["tests"]["pooled"]
    return (f"{len(summary)} strategies × {study['seeds']} seeds, retrained: betanas {pct(ref['top1_mean'])} ± "
            f"{100 * ref['top1_std']:.1f} at {ref['mflops_mean']:.2f} MFLOPs; best other {best} "
            f"{pct(summary[best]['top1_mean'])} ± {100 * summary[best]['top1_std']:.1f} at "
            f"{summary[best]['mflops_mean']:.2f} MFLOPs; betanas better than {below} of {len(against)} at Holm-adjusted "
            f"p < 0.05 (smallest attainable {study['tests']['smallest_holm_p']:.2f}); than all others pooled: "
            f"one-sided Mann–Whitney p = {pooled['mann_whitney']['p_value']:.3f}")


@renderer("studies_summary")
def render_studies_summary() -> str:
    rows = ["| study | what came out |", "|---|---|"]
    sources = []
    for name in ("balance", "sharing", "seeds"):
        file = f"study_{name}.json"
        doc = load(file)
        if doc is None:
            rows.append(f"| `python -m betanas_fast.study {name}` | not recorded yet (`{WRITERS[file]}`) |")
            continue
        r = doc["study"]
        said = "; ".join(f"{c['claim']}: **{'holds' if c['holds'] else 'does not hold'}** ({c['evidence']})"
                         for c in r.get("claims", []))
        if name == "seeds":
            said = _seeds_text(r)
        rows.append(f"| `{doc['command']}` | {said} |")
        sources.append(source(file, doc))
    return "\n".join(rows) + "\n\n" + "".join(sources)


def _seeds_text(r: dict) -> str:
    a, b = r["summary"]["searched"], r["summary"]["random"]
    return (f"searched {pct(a['top1_mean'], 2)} ± {100 * a['top1_std']:.2f} against MACs-matched random "
            f"{pct(b['top1_mean'], 2)} ± {100 * b['top1_std']:.2f} ({r['seeds']} + {r['seeds']} nets retrained, "
            f"final top-1 on the {r['scoring']['images']} {r['scoring']['split']} images); one-sided Mann–Whitney "
            f"p = {r['tests']['mann_whitney']['p_value']:.3f}, permutation p = {r['tests']['permutation']['p_value']:.3f}")


def _printed(doc: dict, fmt: Callable[[dict], str]) -> str:
    return f"`{doc['command']}` printed:\n\n```\n{fmt(doc['study'])}\n```\n\n"


def _study_table(name: str) -> str:
    file = f"study_{name}.json"
    doc = load(file)
    if doc is None:
        return missing(file)
    from betanas_fast.study import balance, seeds, sharing
    fmt = {"balance": balance.format_table, "seeds": seeds.format_table, "sharing": sharing.format_table}[name]
    # no wall time: studies are continued after a kill, and this session's ran beside other jobs
    return _printed(doc, fmt) + source(file, doc)


for _name in ("balance", "seeds", "sharing"):
    renderer(f"study_{_name}")(lambda _name=_name: _study_table(_name))


# --- the task where the architecture matters (mnist-cluttered) --------------------------------------------------
def _calibration_text(d: dict) -> str:
    c = d["study"]["calibration"]
    text = (f"{c['architectures']} architectures × {d['study']['train_seeds']} train seeds: top {c['decile_size']} "
            f"mean {pct(c['top_decile_mean'])} − bottom {c['decile_size']} mean {pct(c['bottom_decile_mean'])} = "
            f"**{100 * c['decile_spread']:.1f} points**; best mean {pct(c['best_mean'])}")
    if "noise_std" in c:
        r = c["seed_rank_agreement"]
        text += (f"; one architecture's std over train seeds **{100 * c['noise_std']:.2f} points** (spread / noise "
                 f"{c['spread_over_noise']:.1f}); two train seeds rank the architectures alike with τ-b "
                 f"{r['kendall_tau_b']:+.2f}")
    return text


def _ranking_text(d: dict) -> str:
    def one(name, r):
        return (f"{name} τ-b {r['kendall_tau_b']:+.2f} [{r['kendall_tau_b_interval']['low']:+.2f}, "
                f"{r['kendall_tau_b_interval']['high']:+.2f}], ρ {r['spearman_rho']:+.2f}")
    study = d["study"]
    text = "; ".join(one(name, r) for name, r in study["supernets"].items())
    if "baselines" in study:
        text += f"; against ranking by MFLOPs alone: {one('MFLOPs', study['baselines']['mflops'])}"
    return text


@renderer("groundtruth", "groundtruth_mnist_cluttered.json")
def render_groundtruth(doc: dict) -> str:
    from betanas_fast.study import groundtruth
    return (f"{_calibration_text(doc)}.\n\n" + _printed(doc, groundtruth.format_table)
            + source("groundtruth_mnist_cluttered.json", doc))


@renderer("ranking", "ranking_mnist_cluttered.json")
def render_ranking(doc: dict) -> str:
    from betanas_fast.study import ranking
    return _printed(doc, ranking.format_table) + source("ranking_mnist_cluttered.json", doc)


@renderer("study_seeds_cluttered", "study_seeds_mnist_cluttered.json")
def render_seeds_cluttered(doc: dict) -> str:
    from betanas_fast.study import seeds
    return _printed(doc, seeds.format_table) + source("study_seeds_mnist_cluttered.json", doc)


@renderer("supernet_learning", "supernet_learning_mnist_cluttered.json")
def render_supernet_learning(doc: dict) -> str:
    rows = ["| candidates per block | Phase-1 training accuracy, epochs 1 to " + str(doc["epochs"]) + " |", "|---|---|"]
    for name, accs in doc["phase1_accuracy_per_epoch"].items():
        rows.append(f"| {name} | {', '.join(pct(a) for a in accs)} |")
    return "\n".join(rows) + "\n\n" + source("supernet_learning_mnist_cluttered.json", doc)


def _summary_rows() -> List[tuple]:
    """(what, figure, results file) for the README's table; a file not yet written gives its command."""
    rows = []

    def row(what: str, name: str, figure: Callable[[dict], str]):
        doc = load(name)
        rows.append((what, figure(doc) if doc else "not recorded yet", name, doc))

    row("install", "install.json",
        lambda d: f"`pip install .` in a fresh venv: {minsec(d['pip_install']['seconds'])}"
                  + (f" (load average {d['pip_install']['load_before']:.1f}: other jobs ran)"
                     if d["pip_install"]["load_before"] > 1.5 else ""))
    row("demo search, seed 0", "demo.json",
        lambda d: f"{minsec(d['search']['seconds'])}{_busy(d['search'])}; {d['search']['paths_dropped']} of "
                  f"{d['search']['paths']} "
                  f"paths dropped; {d['search']['mflops']:.3f} MFLOPs; {pct(d['search']['val_acc'])} with "
                  f"inherited weights")
    row("demo net retrained", "demo.json",
        lambda d: f"{minsec(d['train']['seconds'])}{_busy(d['train'], d)} for {d['train']['epochs']} epochs; "
                  f"best validation top-1 "
                  f"{pct(d['train']['best_val_top1'])}; export to timm and ONNX: logits within "
                  f"{max(_diffs(d['export'])):.0e}")
    for what, name, fig in EXTRA_SUMMARY:
        row(what, name, fig)
    row("latency table (demo space, batch 1)", "latency.json",
        lambda d: _validate_text(d["validate"]["report"]))
    row("balance study (Fig. 5)", "study_balance.json",
        lambda d: "; ".join(f"{c['claim']}: **{'holds' if c['holds'] else 'does not hold'}** ({c['evidence']})"
                            for c in d["study"]["claims"]))
    row("seeds study (Fig. 6)", "study_seeds.json", lambda d: _seeds_text(d["study"]))
    row("mnist-cluttered: ground truth", "groundtruth_mnist_cluttered.json", _calibration_text)
    row("mnist-cluttered: supernet ranking", "ranking_mnist_cluttered.json", _ranking_text)
    row("mnist-cluttered: seeds study (Fig. 6)", "study_seeds_mnist_cluttered.json", lambda d: _seeds_text(d["study"]))
    row("mnist-cluttered: strategies compared (Table 3)", "compare_mnist_cluttered.json", _compare_text)
    row("mnist-cluttered: betanas and DARTS at equal search time", "compare_mnist_cluttered_wall.json", _compare_text)
    return rows


def _diffs(exports: dict) -> List[float]:
    out = []
    for e in exports.values():
        v = e["max_abs_logit_diff"]
        out += list(v.values()) if isinstance(v, dict) else [v]
    return out


@renderer("summary")
def render_summary() -> str:
    lines = ["| what | measured | results file (date, machine) |", "|---|---|---|"]
    for what, figure, name, doc in _summary_rows():
        where = f"`{name}`"
        if doc:
            m = doc["stamp"]["machine"]
            where += f" ({doc['stamp']['date'][:10]}, {m['cpu']} × {m['cores']}" + \
                     (f", {m['gpu']}" if m.get("gpu") else "") + ")"
        lines.append(f"| {what} | {figure} | {where} |")
    return "\n".join(lines) + "\n"


# --- the pages -------------------------------------------------------------------------------------------------
def pages() -> List[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def render(text: str, path: str) -> str:
    def one(m):
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"{os.path.relpath(path, ROOT)}: unknown results block '{name}' "
                             f"(known: {', '.join(sorted(RENDERERS))})")
        return m.group(1) + RENDERERS[name]() + m.group(4)
    return BLOCK.sub(one, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/render_readme.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 where a page differs")
    args = p.parse_args(argv)
    bad = 0
    for path in pages():
        with open(path) as f:
            old = f.read()
        new = render(old, path)
        if new == old:
            continue
        rel = os.path.relpath(path, ROOT)
        if args.check:
            bad += 1
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel,
                                                       f"{rel} rendered from benchmarks/results"))
        else:
            with open(path, "w") as f:
                f.write(new)
            print(f"rendered {rel}")
    if bad:
        print(f"\n{bad} page(s) disagree with benchmarks/results/: run `python benchmarks/render_readme.py`")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
