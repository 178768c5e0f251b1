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

# Which command writes which results file.
WRITERS = {
    "install.json": "python benchmarks/record.py install",
    "demo.json": "python benchmarks/record.py demo",
    "latency.json": "python benchmarks/record.py latency",
    "studies.json": "python benchmarks/record.py studies",
    "precision.json": "python benchmarks/precision.py",
    "null_tests.json": "python benchmarks/null_tests.py",
    "cpu.json": "pytest benchmarks/ --benchmark-only --results-json benchmarks/results/cpu.json",
}


def renderer(name: str):
    def add(fn):
        RENDERERS[name] = fn
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
@renderer("install")
def render_install() -> str:
    doc = load("install.json")
    if doc is None:
        return missing("install.json")
    p = doc["pip_install"]
    kernels = "CPU and CUDA kernels" if p["cuda_kernels_compiled"] else "CPU kernels only (no GPU visible)"
    return (f"`pip install .` from a fresh clone into a fresh virtual environment, pip's cache off: "
            f"**{minsec(p['seconds'])}**, building the {kernels} against torch {p['built_with_torch']}.\n\n"
            + source("install.json", doc))


def _drops_text(drops: List[dict], limit: int = 12) -> str:
    shown = [f"block {d['block']} `{d['op']}` at α step {d['step']}" for d in drops[:limit]]
    more = f", and {len(drops) - limit} more" if len(drops) > limit else ""
    return "; ".join(shown) + more if drops else "none"


@renderer("demo")
def render_demo() -> str:
    doc = load("demo.json")
    if doc is None:
        return missing("demo.json")
    s, ev, tr, ex = doc["search"], doc["evaluate"], doc["train"], doc["export"]
    lines = ["| command | wall time | result |", "|---|---|---|",
             f"| `{s['command']}` | {minsec(s['seconds'])} | {s['paths_dropped']} of {s['paths']} paths dropped; "
             f"searched net {s['mflops']:.3f} MFLOPs, {s['params']:,} params, {pct(s['val_acc'])} validation top-1 "
             f"with inherited weights |",
             f"| `{ev['command']}` | {minsec(ev['seconds'])} | top-1 {pct(ev['top1'])} "
             f"({'the same number as the search' if ev['agrees_with_search'] else 'DIFFERS from the search'}) |",
             f"| `{tr['command']}` | {minsec(tr['seconds'])} | {tr['epochs']} epochs: best validation top-1 "
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
    text += f"Drops in order: {_drops_text(s['drops'])}.\n\n" + source("demo.json", doc)
    return text


@renderer("latency")
def render_latency() -> str:
    doc = load("latency.json")
    if doc is None:
        return missing("latency.json")
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
    parts = []
    t, f = r.get("table", {}), r.get("mflops", {})
    if "mape" in t:
        parts.append(f"table MAPE {t['mape'] * 100 if t['mape'] < 1 else t['mape']:.2f} %")
    if "kendall_tau" in t:
        parts.append(f"τ-b {t['kendall_tau']:.3f}")
    if "kendall_tau" in f:
        parts.append(f"MFLOPs τ-b {f['kendall_tau']:.3f}")
    return ", ".join(parts) or json.dumps(r)[:200]


@renderer("studies_summary")
def render_studies_summary() -> str:
    doc = load("studies.json")
    if doc is None:
        return missing("studies.json")
    rows = ["| study | wall time | what came out |", "|---|---|---|"]
    for name, st in doc.items():
        if name == "stamp":
            continue
        claims = st["study"].get("claims", [])
        said = "; ".join(f"{c['claim']}: **{'holds' if c['holds'] else 'does not hold'}** ({c['evidence']})"
                         for c in claims)
        if name == "seeds":
            r = st["study"]
            a, b = r["summary"]["searched"], r["summary"]["random"]
            said = (f"searched {pct(a['top1_mean'], 2)} ± {100 * a['top1_std']:.2f} against random "
                    f"{pct(b['top1_mean'], 2)} ± {100 * b['top1_std']:.2f} (final top-1 on the test images); "
                    f"one-sided Mann–Whitney p = {r['tests']['mann_whitney']['p_value']:.3f}, permutation "
                    f"p = {r['tests']['permutation']['p_value']:.3f}")
        rows.append(f"| `{st['command']}` | {minsec(st['seconds'])} | {said} |")
    return "\n".join(rows) + "\n\n" + source("studies.json", doc)


def _study_table(name: str) -> str:
    doc = load("studies.json")
    if doc is None or name not in doc:
        return missing("studies.json")
    from betanas_fast.study import balance, seeds, sharing
    fmt = {"balance": balance.format_table, "seeds": seeds.format_table, "sharing": sharing.format_table}[name]
    st = doc[name]
    return (f"`{st['command']}` ({minsec(st['seconds'])}) printed:\n\n```\n{fmt(st['study'])}\n```\n\n"
            + source("studies.json", doc))


for _name in ("balance", "seeds", "sharing"):
    renderer(f"study_{_name}")(lambda _name=_name: _study_table(_name))


def _summary_rows() -> List[tuple]:
    """(what, figure, results file) for the README's table; a file not yet written gives its command."""
    rows = []

    def row(what: str, name: str, figure: Callable[[dict], str]):
        doc = load(name)
        rows.append((what, figure(doc) if doc else f"not recorded yet (`{WRITERS[name]}`)", name, doc))

    row("install", "install.json",
        lambda d: f"`pip install .` in a fresh venv: {minsec(d['pip_install']['seconds'])}")
    row("demo search, seed 0", "demo.json",
        lambda d: f"{minsec(d['search']['seconds'])}; {d['search']['paths_dropped']} of {d['search']['paths']} "
                  f"paths dropped; {d['search']['mflops']:.3f} MFLOPs; {pct(d['search']['val_acc'])} with "
                  f"inherited weights")
    row("demo net retrained", "demo.json",
        lambda d: f"{minsec(d['train']['seconds'])} for {d['train']['epochs']} epochs; best validation top-1 "
                  f"{pct(d['train']['best_val_top1'])}; export to timm and ONNX: logits within "
                  f"{max(_diffs(d['export'])):.0e}")
    for what, name, fig in EXTRA_SUMMARY:
        row(what, name, fig)
    row("latency table (demo space, batch 1)", "latency.json",
        lambda d: _validate_text(d["validate"]["report"]))
    row("seeds study (Fig. 6)", "studies.json", _seeds_summary)
    return rows


def _diffs(exports: dict) -> List[float]:
    out = []
    for e in exports.values():
        v = e["max_abs_logit_diff"]
        out += list(v.values()) if isinstance(v, dict) else [v]
    return out


def _seeds_summary(d: dict) -> str:
    r = d["seeds"]["study"]
    a, b = r["summary"]["searched"], r["summary"]["random"]
    return (f"searched {pct(a['top1_mean'], 2)} ± {100 * a['top1_std']:.2f} vs MACs-matched random "
            f"{pct(b['top1_mean'], 2)} ± {100 * b['top1_std']:.2f} ({r['seeds']} + {r['seeds']} nets, retrained); "
            f"one-sided Mann–Whitney p = {r['tests']['mann_whitney']['p_value']:.3f}")


# Rows from the results files of the other suites: (what, file, figure(doc)); filled in below their renderers.
EXTRA_SUMMARY: List[tuple] = []


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
