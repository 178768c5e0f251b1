"""The paper's three analyses as commands, each a set of ordinary searches and retrainings plus the
statistics that make its claim checkable:

    python -m betanas_fast.study balance     # Fig. 5: betanas vs proxyless, Phase-1 counts and α per block
    python -m betanas_fast.study seeds       # Fig. 6: N searched vs N MACs-matched random nets, retrained
    python -m betanas_fast.study sharing     # Fig. 7: NS / B2 / B4 accuracies and Kendall τ-b against NS

and the two that measure a task and a supernet against stand-alone training:

    python -m betanas_fast.study groundtruth # N architectures trained alone, >= 2 seeds each: the ground truth
    python -m betanas_fast.study ranking     # Kendall τ-b / Spearman ρ of supernets' inherited accuracies against it

and the experiment of the paper's Table 3:

    python -m betanas_fast.study compare     # every strategy x N seeds, one budget, retrained and tested

Each writes study.json (every number, the configuration, the seeds, the versions) and its figures into
`--out`, prints its table, and continues a killed study when the same command is typed again. Every flag
of a study has a default for the embedded digits demo; `--search-flags` / `--train-flags` pass the
commands' own flags (presets, data) to every sub-run. `python -m betanas_fast.study STUDY --help` lists them.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from . import balance, compare, groundtruth, ranking, seeds, sharing

STUDIES = {m.NAME: m for m in (balance, seeds, sharing, groundtruth, ranking, compare)}
CONFIGS = {balance.NAME: balance.BalanceConfig, seeds.NAME: seeds.SeedsConfig, sharing.NAME: sharing.SharingConfig,
           groundtruth.NAME: groundtruth.GroundtruthConfig, ranking.NAME: ranking.RankingConfig,
           compare.NAME: compare.CompareConfig}


def build_parser() -> argparse.ArgumentParser:
    from ..runs.options import add_config_arguments
    p = argparse.ArgumentParser(prog="python -m betanas_fast.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", required=True, metavar="{" + ",".join(STUDIES) + "}")
    for name, module in STUDIES.items():
        sp = sub.add_parser(name, help=module.__doc__.split("\n\n")[0].split("—", 1)[-1].strip(),
                            description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(sp, CONFIGS[name])
    return p


def parse_config(argv: Optional[List[str]] = None):
    args = vars(build_parser().parse_args(argv))
    name = args.pop("study")
    return name, CONFIGS[name](**{k: v for k, v in args.items() if v is not None})


def main(argv: Optional[List[str]] = None) -> dict:
    name, cfg = parse_config(argv)
    try:
        return STUDIES[name].run(cfg)
    except ValueError as e:  # a bad configuration: one clear message, no traceback
        raise SystemExit(f"error: {e}")


__all__ = ["STUDIES", "CONFIGS", "main", "parse_config"]
