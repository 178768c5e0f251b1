"""Score any architecture of a search run's space with the weights it inherits from the run's supernet.

    python -m betanas_fast.evaluate runs/betanas-... [--arch ir_r1_k3_s2_e3_c16 ...|arch.json] [--split val]

One JSON line: top-1 / top-5, MFLOPs and params. The sub-network is a copy with its BatchNorm statistics
recomputed exactly on the run's fixed calibration subset; the supernet is not modified (`scoring`).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

from .runs import files
from .runs.options import option, parse_options
from .scoring import Evaluation, load_search


@dataclass
class EvaluateConfig:
    run: Optional[str] = option(None, "a search run directory (config.json, checkpoints/)", type=str, positional=True)
    arch: List[str] = option([], "block strings (one per choice block), or an arch.json; default: the run's searched "
                                 "one", type=str, nargs="+")
    split: str = option("val", "the images to score: the run's validation or held-out split, or the fixed test split of "
                               "an embedded data set (digits, mnist-cluttered), which no search loads",
                        choices=("val", "heldout", "test"))
    seed: Optional[int] = option(None, "calibration subset seed (default: the run's seed + 5)", type=int)
    calibration_batches: Optional[int] = option(None, "calibration batches (default: the run's --bn-recalib-batches)",
                                                type=int)
    device: Optional[str] = option(None, "cpu, cuda, ... (default: the run's)", type=str)


def read_arch(space, arch: List[str], run: str) -> List[int]:
    """The architecture to score: block strings, an arch.json's, or the run's own."""
    if not arch:
        if not files.finished(run, "search"):
            raise ValueError(f"{run} has no arch.json (the search did not finish): give --arch block strings")
        return files.read_arch(run)[1]
    if len(arch) == 1 and arch[0].endswith(".json"):
        d = files.read_json(arch[0], "architecture file")
        arch = d["arch"] if isinstance(d, dict) else d
    return space.arch_from_strings(arch)


def main(argv: Optional[List[str]] = None) -> Evaluation:
    cfg = parse_options(EvaluateConfig, argv, "python -m betanas_fast.evaluate",
                        "Accuracy, MFLOPs and params of an architecture of a run's space, with the weights inherited "
                        "from the run's supernet (BatchNorm recalibrated exactly on a fixed, seeded subset; the "
                        "supernet is not modified)")
    try:
        run = load_search(cfg.run, cfg.device)
        arch = read_arch(run.space, cfg.arch, cfg.run)
        run.space.check_arch(arch)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}")
    try:
        split = run.split(cfg.split)
    except ValueError as e:
        raise SystemExit(f"error: --split test: {e}")
    result = run.evaluate(arch, split, seed=cfg.seed, calibration_batches=cfg.calibration_batches)
    print(json.dumps(asdict(result)))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
