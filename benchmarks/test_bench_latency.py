"""How good a latency table is on this machine, measured with the commands' own functions:

- build time of the table, and its repeatability: the same table built twice, share of entries whose
  medians agree within 5 %;
- `validate`: 30 random architectures timed end to end against the table's prediction and against
  MFLOPs (mean absolute percentage error, Kendall's τ-b);
- CPU: a `--cost latency` search of the demo (its default schedule) whose searched net is then timed:
  its error against the validate MAPE.
GPU: the mobile space at batch 1 and 256 (the paper's BetaNet-B setting is a GPU latency table).
Run on a quiet machine: other load moves whole-network timings more than the parts' (see cost.measure)."""
import time

import numpy as np
import pytest
import torch

from betanas_fast import latency as lat
from betanas_fast.cost import LatencyTable
from betanas_fast.search import Search, SearchConfig
from betanas_fast.space import build_space

# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
CUDA = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
CASES = [pytest.param(device, space, batch, id=f"{device}-{space}-b{batch}", marks=CUDA if device == "cuda" else ())
         for device, space, batch in [("cpu", "demo", 1), ("cuda", "mobile", 1), ("cuda", "mobile", 256)]]


def _agreement(a: LatencyTable, b: LatencyTable, tol: float = 0.05) -> tuple:
    keys = list(a.entries) + list(a.fixed)
    ratios = np.array([(b.entries.get(k) or b.fixed[k])["median"] / (a.entries.get(k) or a.fixed[k])["median"]
                       for k in keys])
    return float(np.mean(np.abs(ratios - 1) <= tol)), float(np.median(ratios)), len(keys)


@pytest.mark.parametrize("device,space_name,batch", CASES)
def test_latency_table(benchmark, record_measured, report_line, tmp_path, device, space_name, batch):
    space = build_space(space_name)
    target = lat._Target(device, "float32", batch, None, 1)
    tables, seconds = [], []

    def build():
        t0 = time.perf_counter()
        tables.append(lat.build_table(space, space_name, target, progress=False))
        seconds.append(time.perf_counter() - t0)

    benchmark.pedantic(build, rounds=2, iterations=1)
    path = str(tmp_path / "table.json")
    tables[0].save(path)
    share, level, n = _agreement(tables[0], tables[1])
    result = lat.validate(LatencyTable.load(path), 30, seed=0, progress=False)
    case = {"device": device, "space": space_name, "batch": batch}
    record_measured("latency table build", case, "betanas_fast", float(np.median(seconds)))
    tag = f"{space_name} space, {device} ({tables[0].meta['device_name']}), batch {batch}, fp32"
    report_line(f"- latency table, {tag}: built in {seconds[0]:.1f} s and {seconds[1]:.1f} s; "
                f"{share:.1%} of {n} entries agree within 5 % between the two builds (median ratio {level:.3f}); "
                f"network overhead {tables[0].overhead_ms:+.4f} ms")
    report_line(f"- latency validate, {tag}: 30 random nets measured {result['measured_range_ms'][0]:.3f}-"
                f"{result['measured_range_ms'][1]:.3f} ms; table MAPE {result['table_mape']:.2f} % "
                f"(sum of parts only {result['sum_only_mape']:.2f} %), τ {result['table_tau']:.3f}; MFLOPs τ "
                f"{result['mflops_tau']:.3f} (least-squares fit MAPE {result['mflops_fit_mape']:.2f} %)")
    if device == "cpu":
        out = str(tmp_path / "search")
        Search(SearchConfig(cost="latency", latency_table=path, progress=False, tensorboard=False, plots=False,
                            out=out)).run()
        searched = lat.validate(LatencyTable.load(path), 30, seed=0, progress=False,
                                extra=[("searched", lat._read_arch(out, space))])
        r = searched["rows"][-1]
        report_line(f"- latency search (demo defaults, --cost latency): searched net predicted "
                    f"{r['predicted_ms']:.4f} ms, measured {r['measured_ms']:.4f} ms ({r['error_pct']:+.2f} %; "
                    f"this validate's MAPE {searched['table_mape']:.2f} %: "
                    f"{'within' if r['within_table_mape'] else 'OUTSIDE'}; "
                    f"{r['random_nets_predicted_better']:.0%} of the 30 random nets were predicted better)")
