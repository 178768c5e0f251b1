"""Search configuration: one dataclass whose field metadata is the command line (runs.options), the
search presets (presets/*.json, --preset), and the fail-fast checks."""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import List, Optional

from ..cost.objective import COSTS
from ..data.base import dataset_names
from ..runs.options import add_config_arguments, option, parse_size, validate_choices
from ..space import SPACES
from .strategies import STRATEGIES, stage_bounds

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")
PATH_SAMPLING = ("per-batch", "per-sample")
AMP_DTYPES = ("auto", "bf16", "fp16")


@dataclass
class SearchConfig:
    # what to search
    strategy: str = option("betanas", "betanas (balanced training + selective drop), proxyless (paths trained "
                                    "in proportion to p), spos (uniform training, then evolution under the "
                                    "FLOPs budget), random (random architectures under the budget), darts (the mixture of "
                                    "every remaining candidate, α by backpropagation through softmax(α); first or "
                                    "second order), fbnet (a Gumbel-softmax mixture, loss CE·a·log(cost)^b), pdarts (DARTS in "
                                    "stages, top-k paths kept after each), dartsplus (DARTS with early stopping), "
                                    "hmnas (DARTS with binarised op masks), gdas (one Gumbel-max sampled path per "
                                    "step, α straight through its weights), enas (an LSTM controller trained by "
                                    "REINFORCE)",
                         choices=lambda: tuple(STRATEGIES))
    space: str = option("demo", "a named space: demo (8 blocks, 32x32), cluttered (the demo's at 48x48), bench (the "
                              "speed benchmark's 8 blocks, 32x32, stem stride 1) or mobile (the paper's 21 blocks)",
                      choices=tuple(SPACES))
    width_mult: Optional[float] = option(None, "channel width multiplier (default: the space's)", type=float)
    resolution: Optional[int] = option(None, "input resolution (default: the space's)", type=int)
    stage_depths: Optional[List[int]] = option(None, "choice blocks per stage", type=int, nargs="+")
    candidates: Optional[List[str]] = option(None, "candidate names, e.g. mb_k3_e3 mb_k5_e6 skip "
                                                 "(default: the space's seven)", type=str, nargs="+")
    # data
    dataset: str = option("digits", "a registered data source: digits (embedded), mnist-cluttered (MNIST digits among "
                                    "clutter, from the [bench] extra; use --preset mnist_cluttered) or imagenet; --data "
                                    "switches digits to imagenet", choices=dataset_names)
    data: Optional[str] = option(None, "an ImageNet-layout folder (train/<class>/*, optional val/<class>/*)", type=str)
    loader: str = option("auto", "for --data: dali, torchvision (PIL + DataLoader) or auto (DALI if installed)",
                       choices=("auto", "dali", "torchvision"))
    heldout: int = option(300, "held-out images for α in total (split evenly over the classes)")
    heldout_per_class: Optional[int] = option(None, "held-out images per class (instead of --heldout)", type=int)
    val: int = option(200, "validation images for the final score")
    augment: bool = option(True, "training augmentation")
    # schedule
    epochs: int = option(100, "epochs of Phase-1 weight training")
    batch_size: int = option(64, "Phase-1 batch")
    heldout_batch_size: int = option(64, "Phase-2 (held-out) batch")
    phase_ratio: int = option(2, "Phase-1 weight steps per α step")
    path_sampling: str = option("per-batch", "Phase 1: per-batch, one path per block for the whole batch (the "
                                           "paper's); per-sample, each sample its own path (balanced within each "
                                           "step, or from p for proxyless; Phase-1 counts then count samples; needs "
                                           "a batch of at least 2 x the number of candidates)",
                              choices=PATH_SAMPLING)
    warmup_epochs: int = option(25, "no α steps and no drops before this epoch")
    # weights (SGD)
    lr: float = option(0.1, "SGD learning rate (cosine schedule)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-5, "weight decay of the convolution and linear weights")
    weight_decay_bn: bool = option(False, "also decay BatchNorm weights and all biases (excluded by default, as in "
                                        "ProxylessNAS)")
    label_smoothing: float = option(0.0, "Phase-1 label smoothing")
    # architecture (Adam on α)
    arch_lr: float = option(5e-3, "Adam learning rate of α. With β1 = 0 each step moves α by about ±lr whatever the "
                                "gradient, so noise random-walks α by lr·sqrt(α steps): keep that below half "
                                "the threshold's magnitude (the run warns otherwise)")
    arch_beta1: float = option(0.0, "Adam β1 of α (0: no stale momentum pushes a path)")
    arch_beta2: float = option(0.999, "Adam β2 of α")
    arch_eps: float = option(1e-8, "Adam eps of α")
    drop_threshold: float = option(-0.4, "a path whose (re-centred) α falls below this is dropped for good")
    beta: float = option(0.05, "cost weight β of Eq. 6, per MFLOP (million multiply-adds)")
    flops_target: Optional[float] = option(None, "MFLOPs of the whole net to aim at: β then adapts toward it, and "
                                               "the report says whether the searched net meets it; spos and random "
                                               "take it as a hard budget", type=float)
    beta_adapt: float = option(0.02, "with --flops-target: β is multiplied / divided by (1 + this) after each α "
                                   "step while the expected MFLOPs are above / below the target")
    cost: str = option("flops", "the cost of Eq. 6: flops (analytic multiply-adds) or latency (a table measured on "
                              "the target device, --latency-table)", choices=COSTS)
    latency_table: Optional[str] = option(None, "with --cost latency: a table built by `python -m "
                                              "betanas_fast.latency build` (copied into the run directory)", type=str)
    latency_target: Optional[float] = option(None, "with --cost latency: the whole net's predicted ms to aim at: β "
                                                 "adapts toward it as for --flops-target, and spos and random take it "
                                                 "as a hard budget", type=float)
    beta_latency: Optional[float] = option(None, "with --cost latency: β per ms (default: --beta scaled by the space's "
                                               "span of MFLOPs over its span of ms, the same pressure as the FLOPs "
                                               "cost)", type=float)
    latency_table_any_machine: bool = option(False, "use a latency table measured on another machine or software, on "
                                                  "purpose (e.g. to search for the device that measured it)")
    phase2_memory: Optional[str] = option(None, "extra memory the all-candidate gate gradient of Phase 2 may use, e.g. "
                                              "512M or 4G: a block's candidates are processed in chunks under it "
                                              "(same numbers). Default: half the free device memory", type=str)
    phase2_amp: bool = option(False, "run Phase 2 under --amp's autocast too (faster on GPUs; the α gradient's "
                                   "signs then disagree with a float64 computation far more often)")
    # spos / random
    spos_population: int = option(50, "spos: evolution population")
    spos_generations: int = option(20, "spos: generations")
    spos_parents: int = option(10, "spos: the top architectures kept as parents each generation")
    spos_mutation_prob: float = option(0.1, "spos: per-block mutation probability")
    # the DARTS family: every remaining candidate of a block runs, weighted, in both steps
    mixture_recompute: bool = option(False, "the DARTS family: recompute each candidate's activations in the backward "
                                            "pass instead of keeping them (about one candidate's activations per "
                                            "block instead of all of them, for about one more forward)")
    darts_order: int = option(1, "darts: 1 (first order) or 2 (α's gradient through one unrolled weight step, the "
                                 "second-order term by finite differences)", choices=(1, 2))
    darts_arch_lr: float = option(3e-4, "darts: Adam learning rate of α (the paper's; betas 0.5, 0.999)")
    darts_arch_weight_decay: float = option(1e-3, "darts: Adam weight decay of α (the paper's)")
    fbnet_arch_lr: float = option(0.01, "fbnet: Adam learning rate of α (the paper's; weight decay 5e-4)")
    fbnet_temperature: float = option(5.0, "fbnet: the Gumbel-softmax temperature at epoch 0 (the paper's)")
    fbnet_temperature_decay: float = option(0.045, "fbnet: the temperature is multiplied by exp(-this) every epoch "
                                                   "(the paper's)")
    fbnet_a: float = option(0.2, "fbnet: a of the loss CE · a · log(cost)^b (the paper's)")
    fbnet_b: float = option(0.6, "fbnet: b of the loss CE · a · log(cost)^b (the paper's)")
    pdarts_keep: List[int] = option([4, 2], "pdarts: the paths each block keeps at the end of each stage but the "
                                            "last (one stage more than entries; P-DARTS's 8 -> 5 -> 3 mapped to 7)",
                                    type=int, nargs="+")
    pdarts_skip_dropout: List[float] = option([0.1, 0.4, 0.7], "pdarts: dropout on the identity path's output at "
                                                               "each stage's start, decaying to 0 over the stage "
                                                               "(P-DARTS's)", type=float, nargs="+")
    pdarts_max_skips: int = option(2, "pdarts: the most identity blocks the result may hold (P-DARTS's M; -1: no cap)")
    pdarts_arch_lr: float = option(6e-4, "pdarts: Adam learning rate of α (P-DARTS's code)")
    dartsplus_max_skips: int = option(2, "dartsplus: stop when a stage of the space holds this many identity blocks "
                                         "(DARTS+'s two per cell)")
    dartsplus_stable_epochs: int = option(10, "dartsplus: stop when every block's argmax has held this many epochs "
                                              "(DARTS+'s)")
    hmnas_mask_init: float = option(1e-2, "hmnas: the op-mask scores' start (Piggyback's)")
    hmnas_mask_threshold: float = option(5e-3, "hmnas: a mask is on where its score is at least this (Piggyback's)")
    gdas_arch_lr: float = option(3e-4, "gdas: Adam learning rate of α (its settings; betas 0.5, 0.999, weight decay "
                                       "1e-3)")
    gdas_tau_max: float = option(10.0, "gdas: the Gumbel-softmax temperature at the first epoch (GDAS's)")
    gdas_tau_min: float = option(0.1, "gdas: the temperature at the last epoch, reached linearly (GDAS's)")
    enas_controller_lr: float = option(1e-3, "enas: Adam learning rate of the controller (the reference's)")
    enas_entropy_weight: float = option(1e-4, "enas: weight of the controller's entropy in the reward (the reference's)")
    enas_baseline_decay: float = option(0.99, "enas: decay of the reward's moving-average baseline (the reference's)")
    enas_derive_samples: int = option(10, "enas: architectures sampled from the trained controller; the best on the "
                                          "held-out split is the result")
    bn_recalib_batches: int = option(4, "training batches that recompute BatchNorm statistics before a sub-net "
                                      "is scored")
    # run
    seed: int = option(0, "seed of every generator of the run")
    amp: bool = option(False, "mixed precision where it makes the run faster: bf16 autocast on CUDA (fp16 with a "
                            "GradScaler where bf16 is missing) and on CPUs with native bf16 (AVX512-BF16/AMX); "
                            "fp32 on other CPUs, where bf16 is slower (--amp-dtype bf16 forces it)")
    amp_dtype: str = option("auto", "autocast dtype with --amp (auto: as --amp describes)", choices=AMP_DTYPES)
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when available)")
    threads: Optional[int] = option(None, "CPU threads (default: torch's)", type=int)
    out: Optional[str] = option(None, "run directory (default runs/<strategy>-<time>)", type=str)
    resume: Optional[str] = option(None, "continue the killed run in this directory exactly (a run directory given as "
                                       "--out that holds a checkpoint is continued too, if its settings are these)",
                                 type=str)
    checkpoint_every: int = option(25, "α iterations between checkpoints")
    stop_after: Optional[int] = option(None, "stop (without final outputs) after this many iterations: a simulated "
                                           "kill", type=int)
    deterministic: Optional[bool] = option(None, "deterministic algorithms, which exact resume needs (default: on for "
                                               "the CPU, off for CUDA, where they cost speed)", type=bool)
    prefetch: int = option(2, "batches decoded ahead of the model, in a background thread (0: decode on demand)")
    digest_every: int = option(10, "under torchrun: iterations between the check that every rank holds the same α, "
                                 "remaining paths, path generator, step and weights")
    progress: bool = option(True, "progress bar")
    plots: bool = option(True, "write the figures")
    tensorboard: bool = option(True, "write TensorBoard events")

    def to_dict(self) -> dict:
        return asdict(self)


# How a run is executed, not what it computes: these may differ when a run is continued.
RUN_ONLY_FIELDS = ("resume", "out", "stop_after", "progress", "threads", "prefetch", "device", "digest_every",
                   "deterministic", "phase2_memory", "plots", "tensorboard", "latency_table_any_machine")

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m betanas_fast.search",
                                description="BetaNAS search (balanced training + selective drop) and baselines. "
                                            "Every default is set for the embedded digits demo.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # each help says its default
    p.add_argument("--preset", default=None, help="JSON preset (name in betanas_fast/presets or a path), "
                                                  "applied before the other flags: imagenet, spos_demo, mnist_cluttered")
    add_config_arguments(p, SearchConfig)
    return p


def parse_config(argv: Optional[List[str]] = None) -> SearchConfig:
    args = build_parser().parse_args(argv)
    values = load_preset(args.preset) if args.preset else {}
    values.update({k: v for k, v in vars(args).items() if k != "preset" and v is not None})
    return SearchConfig(**values)


def alpha_walk(cfg: SearchConfig, alpha_steps: int) -> float:
    """How far pure noise moves α: Adam with β1 = 0 steps about ±lr whatever the gradient's size, so
    after n α steps a zero-mean gradient has moved α by about lr·sqrt(n)."""
    return cfg.arch_lr * math.sqrt(max(alpha_steps, 0))


def validate_config(cfg: SearchConfig) -> None:
    """Checks that need no data or model (the space, data and FLOPs checks follow in the engine, and so
    does `check_noise_floor`, once the data tell the number of α steps)."""
    validate_choices(cfg)
    if cfg.drop_threshold >= 0:
        raise ValueError(f"drop threshold {cfg.drop_threshold} would drop every path: α starts at 0 and each "
                         f"block's remaining α are re-centred to mean 0, so the threshold must be negative")
    for name in ("epochs", "batch_size", "heldout_batch_size", "phase_ratio", "checkpoint_every", "digest_every",
                 "spos_population", "spos_generations", "spos_parents"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    kind = STRATEGIES[cfg.strategy]
    if cfg.path_sampling == "per-sample" and (kind.mixture or kind.straight_through or kind.policy_gradient):
        what = ("runs every remaining candidate on every sample (the mixture)" if kind.mixture
                else "samples one sub-net per step")
        raise ValueError(f"--strategy {cfg.strategy} {what}: --path-sampling per-sample does not apply")
    if not 0 < cfg.gdas_tau_min <= cfg.gdas_tau_max:
        raise ValueError(f"gdas temperatures must satisfy 0 < gdas_tau_min ({cfg.gdas_tau_min}) <= gdas_tau_max "
                         f"({cfg.gdas_tau_max})")
    if cfg.darts_order == 2 and cfg.strategy != "darts":
        raise ValueError(f"--darts-order 2 is darts's; --strategy {cfg.strategy} is first order")
    if cfg.strategy == "pdarts":
        check_pdarts(cfg)
    if cfg.dartsplus_max_skips < 1 or cfg.dartsplus_stable_epochs < 1:
        raise ValueError("dartsplus_max_skips and dartsplus_stable_epochs must be >= 1")
    if not 0 < cfg.hmnas_mask_threshold:
        raise ValueError(f"hmnas_mask_threshold must be positive, got {cfg.hmnas_mask_threshold}")
    if not 0 <= cfg.enas_baseline_decay < 1 or cfg.enas_entropy_weight < 0 or cfg.enas_derive_samples < 1:
        raise ValueError("enas: baseline decay must be in [0, 1), entropy weight >= 0, derive samples >= 1")
    for name in ("darts_arch_lr", "fbnet_arch_lr", "fbnet_temperature", "pdarts_arch_lr", "gdas_arch_lr",
                 "enas_controller_lr"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.darts_arch_weight_decay < 0 or cfg.fbnet_temperature_decay < 0:
        raise ValueError("darts_arch_weight_decay and fbnet_temperature_decay must be >= 0")
    if cfg.spos_parents > cfg.spos_population:
        raise ValueError(f"spos_parents ({cfg.spos_parents}) must not exceed spos_population ({cfg.spos_population})")
    if STRATEGIES[cfg.strategy].trains_alpha and not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise ValueError(f"warmup_epochs ({cfg.warmup_epochs}) must be in [0, epochs={cfg.epochs}), "
                         f"or α would never be updated")
    if cfg.lr <= 0 or cfg.arch_lr <= 0:
        raise ValueError("learning rates must be positive")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.data is not None and not os.path.isdir(cfg.data):
        raise ValueError(f"--data {cfg.data!r} is not a directory (expected train/<class>/* inside)")
    if cfg.flops_target is not None and cfg.flops_target <= 0:
        raise ValueError(f"FLOPs target must be positive (MFLOPs), got {cfg.flops_target}")
    if cfg.cost == "latency":
        if not cfg.latency_table:
            raise ValueError("--cost latency needs --latency-table (build one with `python -m betanas_fast.latency "
                             "build`)")
        if cfg.flops_target is not None:
            raise ValueError("--flops-target is the FLOPs cost's target; with --cost latency give --latency-target")
    else:
        for name in ("latency_table", "latency_target", "beta_latency"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} needs --cost latency")
    if cfg.latency_target is not None and cfg.latency_target <= 0:
        raise ValueError(f"latency target must be positive (ms), got {cfg.latency_target}")
    if cfg.beta_latency is not None and cfg.beta_latency < 0:
        raise ValueError(f"beta_latency must be >= 0, got {cfg.beta_latency}")
    if cfg.prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {cfg.prefetch}")
    if cfg.phase2_memory is not None:
        parse_size(cfg.phase2_memory)
    if cfg.beta_adapt < 0:
        raise ValueError(f"beta_adapt must be >= 0, got {cfg.beta_adapt}")


def check_pdarts(cfg: SearchConfig) -> None:
    """P-DARTS's schedule: shrinking keeps, a dropout rate per stage, stages no shorter than an epoch, and α trained
    in the first stage before it ends."""
    keep, rates = cfg.pdarts_keep, cfg.pdarts_skip_dropout
    if not keep or any(k < 1 for k in keep) or any(b >= a for a, b in zip(keep, keep[1:])):
        raise ValueError(f"pdarts_keep must be positive and decreasing, got {keep}")
    if len(rates) != len(keep) + 1:
        raise ValueError(f"pdarts_skip_dropout needs one rate per stage ({len(keep) + 1} stages for "
                         f"pdarts_keep={keep}), got {rates}")
    if any(not 0 <= r < 1 for r in rates):
        raise ValueError(f"pdarts_skip_dropout rates must be in [0, 1), got {rates}")
    if cfg.epochs < len(keep) + 1:
        raise ValueError(f"pdarts needs at least one epoch per stage: {len(keep) + 1} stages, epochs={cfg.epochs}")
    first_end = stage_bounds(cfg.epochs, len(keep) + 1)[1]
    if cfg.warmup_epochs >= first_end:
        raise ValueError(f"pdarts: warmup_epochs ({cfg.warmup_epochs}) must end before the first stage does (epoch "
                         f"{first_end} of {cfg.epochs}), or its top-k would rank untrained α")


def check_noise_floor(cfg: SearchConfig, alpha_steps: int) -> None:
    """Warns when noise alone could move α to the drop threshold within the run's α steps."""
    if not STRATEGIES[cfg.strategy].drops_paths:
        return
    walk = alpha_walk(cfg, alpha_steps)
    if walk > abs(cfg.drop_threshold) / 2:
        warnings.warn(
            f"arch_lr {cfg.arch_lr} over {alpha_steps} α steps lets noise move α by about lr·sqrt(steps) = "
            f"{walk:.3f}, more than half the drop threshold's magnitude ({abs(cfg.drop_threshold) / 2:.3f}): "
            f"paths may be dropped by chance. Lower --arch-lr or --drop-threshold.", UserWarning, stacklevel=3)
