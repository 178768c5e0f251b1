"""Search configuration: one dataclass, its command line, presets, and the fail-fast checks."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

STRATEGIES = ("betanas", "proxyless", "spos", "random")
PATH_SAMPLING = ("per-batch", "per-sample")
PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")


@dataclass
class SearchConfig:
    # what to search
    strategy: str = "betanas"
    space: str = "demo"
    width_mult: Optional[float] = None
    resolution: Optional[int] = None
    stage_depths: Optional[List[int]] = None
    candidates: Optional[List[str]] = None
    # data
    dataset: str = "digits"         # a registered data source; --data switches it to "imagenet"
    data: Optional[str] = None      # an ImageNet-layout folder (train/<class>/*, optional val/<class>/*)
    loader: str = "auto"            # for --data: dali, torchvision (PIL + DataLoader), auto (DALI if installed)
    heldout: int = 300              # held-out images for α in total (split evenly over the classes)
    heldout_per_class: Optional[int] = None
    val: int = 200
    augment: bool = True
    # schedule
    epochs: int = 100
    batch_size: int = 64
    heldout_batch_size: int = 64
    phase_ratio: int = 2            # Phase-1 weight steps per α step
    path_sampling: str = "per-batch"  # Phase 1: one path per block for the batch, or one per sample
    warmup_epochs: int = 25         # no α steps and no drops before this epoch
    # weights (SGD)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    label_smoothing: float = 0.0
    # architecture (Adam on α)
    arch_lr: float = 1e-2
    arch_beta1: float = 0.0
    arch_beta2: float = 0.999
    arch_eps: float = 1e-8
    drop_threshold: float = -0.25
    beta: float = 0.05              # cost weight, per MFLOP (million multiply-adds)
    flops_target: Optional[float] = None   # MFLOPs of the whole net
    beta_adapt: float = 0.0         # >0: multiply/divide β by (1 + beta_adapt) when above/below the target
    # spos / random
    spos_population: int = 16
    spos_generations: int = 5
    spos_mutation_prob: float = 0.1
    bn_recalib_batches: int = 4
    # run
    seed: int = 0
    amp: bool = False
    amp_dtype: str = "auto"         # auto: bf16 (CPU, or CUDA with bf16); fp16 uses loss scaling
    device: str = "auto"
    threads: Optional[int] = None
    out: Optional[str] = None
    resume: Optional[str] = None
    checkpoint_every: int = 25      # α iterations between checkpoints
    stop_after: Optional[int] = None  # stop (without final outputs) after this many iterations: a simulated kill
    progress: bool = True
    plots: bool = True
    tensorboard: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def load_preset(name_or_path: str) -> dict:
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(PRESET_DIR, f"{name_or_path}.json")
    if not os.path.exists(path):
        raise ValueError(f"unknown preset {name_or_path!r} (no file {path})")
    with open(path) as f:
        d = json.load(f)
    d.pop("_comment", None)
    unknown = set(d) - {f.name for f in fields(SearchConfig)}
    if unknown:
        raise ValueError(f"preset {path} has unknown keys {sorted(unknown)}")
    return d


HELP = {
    "path_sampling": "Phase 1: per-batch, one path per block for the whole batch (the paper's); per-sample, each "
                     "sample its own path (balanced within each step, or from p for proxyless; Phase-1 counts then "
                     "count samples, not steps; needs a batch of at least 2 x the number of candidates). "
                     "Default per-batch",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m betanas_fast.search",
                                description="BetaNAS search (balanced training + selective drop) and baselines. "
                                            "Every default is set for the embedded digits demo.")
    p.add_argument("--preset", default=None, help="JSON preset (name in betanas_fast/presets or a path), "
                                                  "applied before the other flags, e.g. imagenet")
    d = SearchConfig()
    for f in fields(SearchConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"default {default}")
        elif f.name in ("stage_depths",):
            p.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, help="blocks per stage")
        elif f.name in ("candidates",):
            p.add_argument(flag, dest=f.name, nargs="+", default=None,
                           help="candidate names, e.g. mb_k3_e3 mb_k5_e6 skip (default: the space's seven)")
        else:
            typ = {"strategy": str}.get(f.name)
            if typ is None:
                typ = type(default) if default is not None else (
                    float if f.name in ("width_mult", "flops_target") else int if f.name in (
                        "resolution", "threads", "stop_after") else str)
            kw = {"choices": STRATEGIES} if f.name == "strategy" else {}
            if f.name == "loader":
                kw = {"choices": ("auto", "dali", "torchvision")}
            if f.name == "heldout_per_class":
                typ = int
            if f.name == "path_sampling":
                kw = {"choices": PATH_SAMPLING}
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=HELP.get(f.name, f"default {default}"),
                           **kw)
    return p


def parse_config(argv: Optional[List[str]] = None) -> SearchConfig:
    args = build_parser().parse_args(argv)
    values = load_preset(args.preset) if args.preset else {}
    values.update({k: v for k, v in vars(args).items() if k != "preset" and v is not None})
    return SearchConfig(**values)


def validate_config(cfg: SearchConfig) -> None:
    """Checks that need no data or model; the space, data and FLOPs checks follow in `prepare`."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; expected one of {STRATEGIES}")
    if cfg.path_sampling not in PATH_SAMPLING:
        raise ValueError(f"unknown path sampling {cfg.path_sampling!r}; expected one of {PATH_SAMPLING}")
    if cfg.drop_threshold >= 0:
        raise ValueError(f"drop threshold {cfg.drop_threshold} would drop every path: α starts at 0 and each "
                         f"block's remaining α are re-centred to mean 0, so the threshold must be negative")
    for name in ("epochs", "batch_size", "heldout_batch_size", "phase_ratio", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs and cfg.strategy in ("betanas", "proxyless"):
        raise ValueError(f"warmup_epochs ({cfg.warmup_epochs}) must be in [0, epochs={cfg.epochs}), "
                         f"or α would never be updated")
    if cfg.lr <= 0 or cfg.arch_lr <= 0:
        raise ValueError("learning rates must be positive")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.data is not None and not os.path.isdir(cfg.data):
        raise ValueError(f"--data {cfg.data!r} is not a directory (expected train/<class>/* inside)")
    if cfg.amp_dtype not in ("auto", "bf16", "fp16"):
        raise ValueError(f"amp_dtype must be auto, bf16 or fp16, got {cfg.amp_dtype!r}")
    if cfg.flops_target is not None and cfg.flops_target <= 0:
        raise ValueError(f"FLOPs target must be positive (MFLOPs), got {cfg.flops_target}")
