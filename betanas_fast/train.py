"""Retrain a searched architecture from scratch.

    python -m betanas_fast.train --arch runs/<run>/arch.json            # the digits demo, ~1 minute
    python -m betanas_fast.train --arch runs/<run> --recipe proxyless --data /data/imagenet --amp

The network is `Net` (the searched blocks between the space's fixed stem, first block and head) with the
paper's variants as options: `--width-mult 1.4`, `--se-ratio 0.0625` (squeeze-excitation; the ratio is of
each block's input channels, as a timm block string's `se`), `--act silu` (swish), `--autoaugment`
(torchvision's ImageNet policy). Recipes (`--recipe`) are named training settings whose every field a flag overrides:

- `demo`: the proxyless recipe sized for the embedded digits (60 epochs, batch 64, lr 0.05 per 64);
- `cluttered`: the same for `--dataset mnist-cluttered`, 25 epochs (chosen from pilot trainings: see
  docs/cluttered.md);
- `proxyless`: SGD Nesterov 0.9, lr 0.05 per 256 images (scaled linearly with the batch), cosine with 5
  warm-up epochs, 300 epochs, label smoothing 0.1, weight decay 4e-5 not on BatchNorm or biases, dropout
  0.2 before the classifier (ProxylessNAS's);
- `mobilenetv2`: the paper's reference setting of MobileNetV2: RMSprop (decay 0.9, momentum 0.9, TF's
  eps 1e-3 inside the square root = torch's 0.0316 outside it), lr 0.045 per 96 images, x0.98 per epoch,
  weight decay 4e-5 on every weight.

The net is scored after every epoch on one split (`--score-split`): `val`, the data's val/ folder or a
validation carve-out from the training images (on the digits drawn by `--seed` from the images the searches
split too), or, on the digits only, `test`: their fixed test split, which no search loads (the net then
trains on every other image). Searched and other nets compared on the digits should be scored on `test`:
a searched net was chosen on images of the search pool. The history's and the result's keys name the split
(`val_top1` / `test_top1`, `best_val_top1` / `best_test_top1`), and `best.pt` is the epoch best on it.

Same operation as the search: `--amp`, torchrun (DDP over processes, the global batch split over them),
atomic checkpoints every epoch and exact resume (`--resume`, or the same command again), progress bar,
TensorBoard, `history.jsonl` with top-1/top-5 per epoch, `best.pt` / `last.pt` (the state dict, the
architecture, the space and the net options: `python -m betanas_fast.export RUN --weights best.pt`)."""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from .data import EMBEDDED, BatchOrder
from .data.load import training_data
from .data.stream import BatchStream, to_device
from .nn.supernet import Net
from .runs import files, ranks as run_ranks
from .runs.options import option, parse_options, validate_choices
from .runs.runtime import autocast, configure_process, model_memory_format, resolve_amp_dtype, resolve_device
from .runs.session import RunSession, continued_settings
from .scoring import score
from .space import SPACES, SearchSpace, build_space

_DEMO = dict(optimizer="sgd", lr=0.05, lr_batch=64, nesterov=True, schedule="cosine", warmup_epochs=2, epochs=60,
             batch_size=64, label_smoothing=0.1, weight_decay=4e-5, weight_decay_bn=False, dropout=0.2)
RECIPES = {
    "demo": _DEMO,
    "cluttered": dict(_DEMO, epochs=25),
    "proxyless": dict(optimizer="sgd", lr=0.05, lr_batch=256, nesterov=True, schedule="cosine", warmup_epochs=5,
                      epochs=300, batch_size=1024, label_smoothing=0.1, weight_decay=4e-5, weight_decay_bn=False,
                      dropout=0.2),
    "mobilenetv2": dict(optimizer="rmsprop", lr=0.045, lr_batch=96, nesterov=False, schedule="exponential", decay=0.98,
                        warmup_epochs=0, epochs=300, batch_size=1536, label_smoothing=0.0, weight_decay=4e-5,
                        weight_decay_bn=True, dropout=0.0),
}

DEFAULT_VAL = 200  # validation images carved from data without a val/ split, when scored on val


@dataclass
class TrainConfig:
    arch: List[str] = option([], "a search run directory, its arch.json, or one block string per choice block "
                                 "(then --space names the space)", type=str, nargs="+")
    space: str = option("demo", "the space of bare block strings (a run or arch.json carries its own)",
                        choices=tuple(SPACES))
    recipe: str = option("demo", "demo, cluttered, proxyless or mobilenetv2 (the module's help says what each "
                                 "sets); flags override its fields", choices=tuple(RECIPES))
    # the network's variants
    width_mult: Optional[float] = option(None, "channel width multiplier (e.g. 1.4; default: the space's)", type=float)
    se_ratio: float = option(0.0, "squeeze-excitation in every MBConv, reduced to this ratio of the block's input "
                                  "channels (the paper: 0.0625); 0: none")
    act: str = option("relu6", "activation: relu6 or silu (swish)", choices=("relu6", "silu", "swish"))
    autoaugment: bool = option(False, "torchvision's AutoAugment ImageNet policy on the training images")
    dropout: Optional[float] = option(None, "dropout before the classifier (default: the recipe's)", type=float)
    # data
    dataset: str = option("auto", "an embedded data set: digits or mnist-cluttered (the [bench] extra); auto: the one "
                                  "the search of --arch ran on (its arch.json says), else digits",
                          choices=("auto",) + EMBEDDED)
    data: Optional[str] = option(None, "an ImageNet-layout folder (train/<class>/*; val/<class>/* is the validation "
                                       "split when present); default: the embedded --dataset", type=str)
    loader: str = option("auto", "for --data: dali, torchvision or auto", choices=("auto", "dali", "torchvision"))
    val: Optional[int] = option(None, "validation images carved from the data when it has no val/ split, with "
                                      "--score-split val (default 200)", type=int)
    score_split: str = option("val", "the split every epoch is scored on: val (val/ or the --val carve-out) or test "
                                     "(the embedded data set's fixed test split, which no search loads; the net trains "
                                     "on every other image)", choices=("val", "test"))
    # schedule and optimiser (None: the recipe's)
    epochs: Optional[int] = option(None, "epochs (default: the recipe's)", type=int)
    batch_size: Optional[int] = option(None, "global batch (default: the recipe's)", type=int)
    lr: Optional[float] = option(None, "learning rate per --lr-batch images, scaled linearly with the batch",
                                 type=float)
    lr_batch: Optional[int] = option(None, "the batch that --lr is given for", type=int)
    optimizer: Optional[str] = option(None, "sgd or rmsprop", type=str)
    nesterov: Optional[bool] = option(None, "Nesterov momentum (sgd)", type=bool)
    momentum: float = option(0.9, "momentum (sgd and rmsprop)")
    schedule: Optional[str] = option(None, "cosine (per step, after a linear warm-up) or exponential (x decay per "
                                           "epoch)", type=str)
    decay: float = option(0.98, "the exponential schedule's factor per epoch")
    warmup_epochs: Optional[int] = option(None, "linear warm-up epochs of the cosine schedule", type=int)
    weight_decay: Optional[float] = option(None, "weight decay", type=float)
    weight_decay_bn: Optional[bool] = option(None, "also decay BatchNorm weights and biases", type=bool)
    label_smoothing: Optional[float] = option(None, "label smoothing", type=float)
    ema_decay: float = option(0.0, "exponential moving average of the weights (e.g. 0.9998), evaluated and saved "
                                   "instead of the raw weights; 0: off")
    # run
    seed: int = option(0, "seed of every generator")
    amp: bool = option(False, "mixed precision where it is faster (as the search's --amp)")
    amp_dtype: str = option("auto", "autocast dtype with --amp", choices=("auto", "bf16", "fp16"))
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    threads: Optional[int] = option(None, "CPU threads", type=int)
    deterministic: Optional[bool] = option(None, "deterministic algorithms (default: on for the CPU, off for CUDA)",
                                           type=bool)
    out: Optional[str] = option(None, "run directory (default runs/train-<time>); holding a checkpoint, it is "
                                      "continued", type=str)
    resume: Optional[str] = option(None, "continue the run in this directory", type=str)
    stop_after: Optional[int] = option(None, "stop after this many epochs (a simulated kill)", type=int)
    progress: bool = option(True, "progress bar")
    tensorboard: bool = option(True, "TensorBoard events")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self) -> "TrainConfig":
        """The recipe's values where no flag set them."""
        recipe = RECIPES[self.recipe]
        values = self.to_dict()
        for k, v in recipe.items():
            if values.get(k) is None:
                values[k] = v
        if values["val"] is None and values["score_split"] == "val":
            values["val"] = DEFAULT_VAL
        if values["dataset"] == "auto":
            values["dataset"] = searched_dataset(self.arch) or "digits"
        return TrainConfig(**values)


def searched_dataset(arch: List[str]) -> Optional[str]:
    """The embedded data set the search behind --arch (a run directory or its arch.json) ran on, if it says."""
    if len(arch) != 1 or not (os.path.isdir(arch[0]) or arch[0].endswith(".json")):
        return None
    try:
        name = files.read_json(files.arch_path(arch[0])).get("dataset")
    except (files.RunFileError, AttributeError):
        return None  # resolve_arch says what is wrong with it
    return name if name in EMBEDDED else None


def validate_scoring(cfg: TrainConfig) -> None:
    """The scored split is one the data have: the test split is the embedded data sets'; it needs no --val."""
    if cfg.score_split != "test":
        return
    if cfg.data is not None:
        raise ValueError("--score-split test: only the embedded data sets set a test split apart; with --data the net "
                         "is scored on val/ (or a --val carve-out): use --score-split val")
    if cfg.val is not None:
        raise ValueError(f"--val {cfg.val} with --score-split test: no validation split is carved (the net trains on "
                         f"every image outside the test split); leave --val out")


RUN_ONLY = ("out", "resume", "stop_after", "progress", "tensorboard", "threads", "device", "deterministic")


# --- what to train ---------------------------------------------------------------------------------------------
def resolve_arch(cfg: TrainConfig) -> tuple:
    """(space, choices) from --arch: a run directory, an arch.json, or block strings of --space; the space
    rebuilt at --width-mult."""
    if not cfg.arch:
        raise ValueError("--arch is required: a search run directory, its arch.json, or block strings")
    source = cfg.arch[0]
    if len(cfg.arch) == 1 and (os.path.isdir(source) or source.endswith(".json")):
        space, arch, _ = files.read_arch(source)
    else:
        space = build_space(cfg.space)
        strings = list(cfg.arch)
        if len(strings) != space.num_blocks:
            raise ValueError(f"--arch has {len(strings)} block strings; the {cfg.space} space has {space.num_blocks} "
                             f"choice blocks")
        arch = space.arch_from_strings(strings)
    if cfg.width_mult is not None:
        space = SearchSpace(dataclasses.replace(space.config, width_mult=cfg.width_mult))
    space.check_arch(arch)
    return space, arch


def build_net(space: SearchSpace, arch: List[int], cfg: TrainConfig) -> Net:
    net = Net(space, arch, se_ratio=cfg.se_ratio, act=cfg.act)
    if cfg.dropout:  # before the classifier, without a module of its own (state dict keys stay Net's)
        p = cfg.dropout
        net.classifier.register_forward_pre_hook(lambda m, args: (F.dropout(args[0], p, m.training),))
    return net


def load_data(cfg: TrainConfig, space: SearchSpace, run_dir: Optional[str] = None, is_main: bool = True):
    """The images the net retrains on and is scored on (`cfg` resolved; data.load.TrainingData): a folder's
    carve-out is saved in `run_dir`."""
    validate_scoring(cfg)
    return training_data(cfg.dataset, cfg.data, seed=cfg.seed, val=cfg.val, score_split=cfg.score_split,
                         resolution=space.config.resolution, loader=cfg.loader,
                         run_dir=run_dir if cfg.data else None, autoaugment=cfg.autoaugment, is_main=is_main)


# --- the run -------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig):
        # a continued run has its saved settings: --resume takes them, the same command again must have them
        given = cfg.to_dict() if cfg.resume else cfg.resolved().to_dict()
        saved = continued_settings(given, RUN_ONLY, cfg.out, cfg.resume)
        if saved is not None:
            cfg = TrainConfig(**saved)
        validate_choices(cfg)
        cfg = cfg.resolved()
        if cfg.optimizer not in ("sgd", "rmsprop"):
            raise ValueError(f"--optimizer must be sgd or rmsprop, got {cfg.optimizer!r}")
        if cfg.schedule not in ("cosine", "exponential"):
            raise ValueError(f"--schedule must be cosine or exponential, got {cfg.schedule!r}")
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
            raise ValueError("epochs and batch size must be >= 1 and the learning rate positive")
        validate_scoring(cfg)
        if run_ranks.launched_by_torchrun() and not (cfg.out or cfg.resume):
            raise ValueError("under torchrun, --out is required")
        self.cfg = cfg
        self.space, self.arch = resolve_arch(cfg)
        self.ranks = run_ranks.ranks_from_env()
        self.local_batch = self.ranks.share(cfg.batch_size, "--batch-size")
        self.device = resolve_device(run_ranks.init(self.ranks, cfg.device))
        configure_process(self.device, cfg.threads,
                          cfg.deterministic if cfg.deterministic is not None else self.device.type == "cpu")
        self.amp_dtype = resolve_amp_dtype(cfg.amp, cfg.amp_dtype, self.device, log=self.log)
        self.session = RunSession(cfg.out, cfg.resume, "train", self.ranks)
        self.out = self.session.dir
        with self.ranks.main_first():  # rank 0 writes a folder's file index and split first
            data = load_data(cfg, self.space, self.out, self.ranks.is_main)
        self.train_split, self.val_split = data.train, data.scored
        if data.num_classes != self.space.config.num_classes:  # the classifier is not part of the searched arch
            self.space = SearchSpace(dataclasses.replace(self.space.config, num_classes=data.num_classes))
        if len(self.train_split) < cfg.batch_size:
            raise ValueError(f"the training split ({len(self.train_split)}) is smaller than one global batch "
                             f"({cfg.batch_size})")
        self.steps_per_epoch = len(self.train_split) // cfg.batch_size

    def log(self, *args) -> None:
        self.session.log(*args)

    # --- setup ---
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.memory_format = model_memory_format(self.device)
        self.net = build_net(self.space, self.arch, cfg).to(self.device, memory_format=self.memory_format)
        self.model = self.net
        if self.ranks.active:  # a fixed network: torch's DDP, every parameter used every step
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        decay, no_decay = [], []
        for p in self.net.parameters():
            (decay if p.ndim > 1 or cfg.weight_decay_bn else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.base_lr = cfg.lr * cfg.batch_size / cfg.lr_batch
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=self.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        else:  # TF's RMSprop: eps 1e-3 inside the square root ~ torch's sqrt(1e-3) outside it
            self.optimizer = torch.optim.RMSprop(groups, lr=self.base_lr, alpha=0.9, momentum=cfg.momentum,
                                                 eps=math.sqrt(1e-3))
        total = cfg.epochs * self.steps_per_epoch
        if cfg.schedule == "cosine":
            warm = min(cfg.warmup_epochs * self.steps_per_epoch, total - 1)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(total - warm, 1))
            self.scheduler = torch.optim.lr_scheduler.SequentialLR(
                self.optimizer, [torch.optim.lr_scheduler.LinearLR(self.optimizer, 0.01, 1.0, total_iters=warm),
                                 cosine], milestones=[warm]) if warm > 0 else cosine
            self.step_per = "step"
        else:
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.decay)
            self.step_per = "epoch"
        self.ema = None
        if cfg.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        self.aug_gen = torch.Generator().manual_seed(self.ranks.seed(cfg.seed + 2))
        self.stream = BatchStream(self.train_split, BatchOrder(len(self.train_split), cfg.batch_size, cfg.seed + 3),
                                  train=True, generator=self.aug_gen, shard=self.ranks.shard,
                                  pin_memory=self.device.type == "cuda", memory_format=self.memory_format)
        self.epoch, self.best = 0, -1.0

    def _state(self) -> dict:
        stream = self.stream.state_dict()
        return {"epoch": self.epoch, "best": self.best, "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "stream": {"order": stream["order"], "generators": self.ranks.all_gather_object(stream["generator"])},
                "world_size": self.ranks.world, "rng": files.rng_state({})}

    def _restore(self) -> None:
        path, s = self.session.restore("epoch", "epoch")
        self.net.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s["ema"] is not None:
            self.ema.load_state_dict(s["ema"])
        files.set_rng_state(s["rng"], {})
        self.stream.load_state_dict({"order": s["stream"]["order"], "generator": None}, generator=False)
        if int(s["world_size"]) == self.ranks.world:
            self.aug_gen.set_state(s["stream"]["generators"][self.ranks.rank])
        else:
            self.log(f"note: checkpoint of {s['world_size']} process(es) resumed on {self.ranks.world}: not bit-identical")
        self.epoch, self.best = int(s["epoch"]), float(s["best"])
        self.log(f"resumed from {path} after epoch {self.epoch}")

    def _save_net(self, name: str, net: torch.nn.Module) -> None:
        """A retrained net's file: what export and evaluate need to rebuild it."""
        files.save_net(os.path.join(self.out, name), net.state_dict(), self.space.arch_strings(self.arch),
                       self.space.config.to_dict(), {"se_ratio": self.cfg.se_ratio, "act": self.net.act})

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.device, self.memory_format)

    # --- loop ---
    def run(self) -> dict:
        cfg, main = self.cfg, self.ranks.is_main
        self._build()
        self.session.begin(cfg.to_dict(), self._restore)
        self.log(f"net: {self.space.arch_strings(self.arch)}; {sum(p.numel() for p in self.net.parameters())} params; "
                 f"{len(self.train_split)} training images, {len(self.val_split)} scored ({cfg.score_split} split); "
                 f"device {self.device}; "
                 f"autocast {self.amp_dtype or 'off (fp32)'}; out {self.out}")
        self.session.open_tensorboard(cfg.tensorboard, self.epoch)
        split = cfg.score_split
        rec = None
        try:
            while self.epoch < cfg.epochs:
                if cfg.stop_after is not None and self.epoch >= cfg.stop_after:
                    self.log(f"stopped after epoch {self.epoch} (--stop-after)")
                    return rec
                rec = self._epoch()
                self.session.record(rec, self.epoch, scalars=("train_loss", "train_acc", f"{split}_top1",
                                                              f"{split}_top5", "lr"))
                if main:
                    print(f"epoch {self.epoch}/{cfg.epochs}: loss {rec['train_loss']:.4f}, {split} top-1 "
                          f"{rec[f'{split}_top1']:.4f}, top-5 {rec[f'{split}_top5']:.4f} ({rec['seconds']:.1f} s)",
                          flush=True)
                self.session.save_checkpoint(self.epoch, self._state())
        finally:
            self.stream.close()
            self.session.close()
        result = {"arch": self.space.arch_strings(self.arch), "epochs": cfg.epochs, "score_split": cfg.score_split,
                  "scored_images": len(self.val_split), f"best_{cfg.score_split}_top1": self.best, "last": rec}
        if main:
            files.write_result(self.out, result)
            self.log(f"best {cfg.score_split} top-1 {self.best:.4f}; {os.path.join(self.out, files.BEST_NET)}")
        return result

    def _epoch(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        self.model.train()
        bar = None
        if cfg.progress and self.ranks.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}", dynamic_ncols=True, leave=False)
        losses = torch.zeros(3, dtype=torch.float64)
        for _ in range(self.steps_per_epoch):
            x, y = self.stream.next()
            x, y = self._to_device(x), to_device(y, self.device, torch.contiguous_format)
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.amp_dtype):
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.net)
            if self.step_per == "step":
                self.scheduler.step()
            losses += torch.tensor([float(loss.detach()) * len(y), float((logits.argmax(1) == y).sum()), len(y)],
                                   dtype=torch.float64)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if bar:
            bar.close()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.step_per == "epoch":
            self.scheduler.step()
        if self.ranks.active:
            losses = run_ranks.all_reduce_mean(self.ranks, losses, self.device) * self.ranks.world
        self.epoch += 1
        evaluated = self.ema.module if self.ema is not None else self.net
        top1, top5, _ = score(evaluated, self.val_split, self.local_batch, self._to_device,
                              autocast(self.device, self.amp_dtype), self.ranks)
        if self.ranks.is_main:
            self._save_net(files.LAST_NET, evaluated)
            if top1 > self.best:
                self._save_net(files.BEST_NET, evaluated)
        self.best = max(self.best, top1)
        n = float(losses[2])
        split = cfg.score_split
        return {"epoch": self.epoch, "lr": lr, "train_loss": float(losses[0]) / n, "train_acc": float(losses[1]) / n,
                f"{split}_top1": top1, f"{split}_top5": top5, f"best_{split}_top1": self.best,
                "seconds": time.perf_counter() - start}


def parse_config(argv=None) -> TrainConfig:
    return parse_options(TrainConfig, argv, "python -m betanas_fast.train", __doc__.split("\n\n")[0])


def main(argv=None):
    cfg = parse_config(argv)
    try:
        trainer = Trainer(cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    result = trainer.run()
    run_ranks.shutdown()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
