"""The precision of Phase 2's α gradient against a float64 oracle; writes benchmarks/results/precision.json.

    python benchmarks/precision.py [--seed 0] [--batches 4] [--phase1-steps 20] [--threads 2]

The measurement is `measure_phase2_precision` of tests/float64_supernet.py, the one tests/test_precision.py
asserts on (same defaults): the demo search trains its weights briefly under bf16 autocast, α is set at
random, and on held-out batches the signs of the engine's Phase-2 α gradient (fp32, as the run computes it)
and of a bf16 Phase 2 are compared with those of a float64 supernet written from plain torch ops with the same
weights, over the entries above 1 % of the largest. The file records the number of those entries, both
agreement fractions, the tables' errors relative to the oracle's largest entry, and the settings.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from betanas_fast.runs.provenance import write_results  # noqa: E402
from float64_supernet import measure_phase2_precision  # noqa: E402

RESULTS = os.path.join(HERE, "results", "precision.json")


def main(argv=None) -> dict:
    defaults = {k: v.default for k, v in inspect.signature(measure_phase2_precision).parameters.items()}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=defaults["seed"])
    p.add_argument("--batches", type=int, default=defaults["batches"], help="held-out batches compared")
    p.add_argument("--phase1-steps", type=int, default=defaults["phase1_steps"],
                   help="Phase-1 steps (bf16 autocast) that train the weights first")
    p.add_argument("--threads", type=int, default=defaults["threads"])
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    start = time.perf_counter()
    data = measure_phase2_precision(seed=args.seed, batches=args.batches, phase1_steps=args.phase1_steps,
                                    threads=args.threads)
    data["seconds"] = round(time.perf_counter() - start, 1)
    command = " ".join(["python benchmarks/precision.py", *(sys.argv[1:] if argv is None else argv)])
    doc = write_results(args.out, command, data)
    print(f"{data['entries_that_matter']} entries that matter: engine (fp32 Phase 2) agrees in sign with float64 on "
          f"{data['engine_agreement']:.4f}, bf16 Phase 2 on {data['bf16_agreement']:.4f}; dL/dg table error "
          f"relative to its largest: engine {data['engine_table_max_rel_error']:.2e}, bf16 "
          f"{data['bf16_table_max_rel_error']:.2e} -> {os.path.relpath(args.out)}")
    return doc


if __name__ == "__main__":
    main()
