"""The two-phase search loop shared by every strategy.

Phase 1 trains the weights of the paths the strategy samples; Phase 2 (for strategies that train α)
asks the supernet for the binary-gate gradient table on a held-out batch and lets the α state take its
step (Eq. 4 + the cost term of Eq. 6, Adam, re-centring); the strategy then says what follows (BetaNAS:
the selective drop of Eq. 7) and, at the end, which architecture is the result.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import cost as cost_model
from ..data import BatchOrder, build_data
from ..nn.supernet import Supernet
from ..space import PRESETS as SPACES, build_space
from . import checkpoint as ckpt
from .arch_state import ArchState, masked_list
from .config import SearchConfig, check_noise_floor, validate_config
from .report import arch_summary, format_table
from .runtime import autocast, configure_process, resolve_amp_dtype, resolve_device
from .strategies import Selection, make_strategy
from .timing import NoTimer


class Search:
    """Prepare (all checks, no compute) in __init__; `run()` does the search and writes the outputs.
    The flow is one way: configuration -> process settings -> data -> space -> costs -> schedule."""

    def __init__(self, cfg: SearchConfig):
        if cfg.resume:
            cfg = self._resumed_config(cfg)
        validate_config(cfg)
        self.cfg = cfg
        self.strategy = make_strategy(cfg)
        self.device = resolve_device(cfg.device)
        configure_process(self.device, cfg.threads)
        self.amp_dtype = resolve_amp_dtype(cfg.amp, cfg.amp_dtype, self.device)
        self.out = cfg.resume or cfg.out or os.path.join(
            "runs", f"{cfg.strategy}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        self.data = self._load_data(cfg, cfg.resolution or SPACES[cfg.space].resolution)
        self.space = build_space(cfg.space, stage_depths=cfg.stage_depths, width_mult=cfg.width_mult,
                                 resolution=cfg.resolution, candidates=cfg.candidates,
                                 num_classes=self.data.num_classes)
        if cfg.path_sampling == "per-sample" and cfg.batch_size < 2 * self.space.num_candidates:
            raise ValueError(f"per-sample path sampling needs batch_size >= 2 x the number of candidates "
                             f"({2 * self.space.num_candidates}), so that every path gets at least 2 samples for "
                             f"its batch statistics; got {cfg.batch_size}")
        if len(self.data.heldout) < cfg.heldout_batch_size and self.strategy.trains_alpha:
            raise ValueError(f"held-out split ({len(self.data.heldout)}) is smaller than one held-out batch "
                             f"({cfg.heldout_batch_size})")
        if len(self.data.train) < cfg.batch_size:
            raise ValueError(f"weight-train split ({len(self.data.train)}) is smaller than one batch ({cfg.batch_size})")
        self.cost_mflops = torch.tensor(cost_model.mflops_table(self.space))
        self.fixed_mflops = cost_model.fixed_cost(self.space)[0] / 1e6
        floor = cost_model.min_arch_mflops(self.space)
        if cfg.flops_target is not None and cfg.flops_target < floor:
            raise ValueError(f"FLOPs target {cfg.flops_target} MFLOPs is below the smallest net of this space "
                             f"({floor:.4f} MFLOPs)")
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.bpe = len(self.data.train) // cfg.batch_size
        self.total_phase1 = cfg.epochs * self.bpe if self.strategy.trains_weights else 0
        self.iterations = math.ceil(self.total_phase1 / cfg.phase_ratio)
        self.alpha_steps = sum(self._alpha_step_at(i) for i in range(1, self.iterations + 1))
        check_noise_floor(cfg, self.alpha_steps)

    def _alpha_step_at(self, iteration: int) -> bool:
        """Whether iteration `iteration` (1-based) ends with an α step: after the warm-up epochs only."""
        phase1_steps = min(iteration * self.cfg.phase_ratio, self.total_phase1)
        return self.strategy.trains_alpha and self._epoch_of(phase1_steps) >= self.cfg.warmup_epochs

    def _load_data(self, cfg: SearchConfig, resolution: int):
        dataset = "imagenet" if cfg.data is not None and cfg.dataset == "digits" else cfg.dataset
        kwargs = dict(seed=cfg.seed, heldout=cfg.heldout, val=cfg.val, resolution=resolution, augment=cfg.augment,
                      root=cfg.data)
        if dataset == "imagenet":
            from ..data import imagenet  # registers the source; DALI is imported only if used
            index = imagenet.build_index(cfg.data)
            os.makedirs(self.out, exist_ok=True)
            imagenet.write_report(index, os.path.join(self.out, "excluded_files.tsv"))
            # The held-out split is saved in the run directory and reused on resume.
            kwargs.update(index=index, run_dir=self.out, loader=cfg.loader, heldout_per_class=cfg.heldout_per_class,
                          channels_last=self.device.type == "cuda",
                          device="cuda" if self.device.type == "cuda" else "cpu")
        return build_data(dataset, **kwargs)

    @staticmethod
    def _resumed_config(cli: SearchConfig) -> SearchConfig:
        path = os.path.join(cli.resume, "config.json")
        if not os.path.exists(path):
            raise ValueError(f"cannot resume: {path} does not exist")
        with open(path) as f:
            saved = json.load(f)
        saved.update(resume=cli.resume, out=cli.resume, stop_after=cli.stop_after, progress=cli.progress)
        return SearchConfig(**saved)

    # --- setup --------------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # channels_last on the CPU: oneDNN's 1x1 convolutions and ATen's batch norm run 1.5-3x faster in NHWC than
        # in NCHW there, and the fused depthwise op has NHWC kernels (no layout copies).
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model = Supernet(self.space).to(self.device, memory_format=self.memory_format)
        self.state = ArchState(self.space.allowed_mask(), lr=cfg.arch_lr, betas=(cfg.arch_beta1, cfg.arch_beta2),
                               eps=cfg.arch_eps)
        self.sgd = torch.optim.SGD(self._weight_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov and cfg.momentum > 0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        self.path_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.train_order = BatchOrder(len(self.data.train), cfg.batch_size, cfg.seed + 3)
        self.heldout_order = BatchOrder(len(self.data.heldout), cfg.heldout_batch_size, cfg.seed + 4)
        self.beta = cfg.beta
        self.iteration = 0
        self.phase1_steps = 0
        self.timer = NoTimer()  # a StepTimer here measures each part of the step (benchmarks)

    def _weight_groups(self) -> List[dict]:
        """Weight decay on the convolution and linear weights; BatchNorm weights and biases (every 1-D
        parameter) only with `weight_decay_bn`, as ProxylessNAS excludes them."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim > 1 or self.cfg.weight_decay_bn else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _generators(self) -> dict:
        return {"path": self.path_gen, "aug": self.aug_gen}

    def _checkpoint_state(self) -> dict:
        return {"iteration": self.iteration, "phase1_steps": self.phase1_steps, "beta": self.beta,
                "model": self.model.state_dict(), "sgd": self.sgd.state_dict(),
                "scaler": self.scaler.state_dict(), "arch": self.state.state_dict(),
                "train_order": self.train_order.state_dict(), "heldout_order": self.heldout_order.state_dict(),
                "rng": ckpt.rng_state(self._generators())}

    def _restore(self) -> None:
        path, s = ckpt.load_latest(self.ckpt_dir)
        self.model.load_state_dict(s["model"])
        self.sgd.load_state_dict(s["sgd"])
        if s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        self.state.load_state_dict(s["arch"])
        self.train_order.load_state_dict(s["train_order"])
        self.heldout_order.load_state_dict(s["heldout_order"])
        ckpt.set_rng_state(s["rng"], self._generators())
        self.iteration, self.phase1_steps, self.beta = int(s["iteration"]), int(s["phase1_steps"]), float(s["beta"])
        # history after the checkpoint will be recomputed, identically
        hist = os.path.join(self.out, "history.jsonl")
        if os.path.exists(hist):
            with open(hist) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= self.iteration]
            with open(hist, "w") as f:
                f.writelines(keep)
        print(f"resumed from {path} at iteration {self.iteration}")

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on the run's device, in the model's memory format."""
        return x.to(self.device).contiguous(memory_format=self.memory_format)

    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _phase2_autocast(self):
        """Phase 2 in fp32 unless asked otherwise: only the differences between the candidates' dL/dg
        reach α, and bf16 rounding swamps them."""
        return autocast(self.device, self.amp_dtype if self.cfg.phase2_amp else None)

    # --- the two phases -----------------------------------------------------------------------------------
    def _epoch_of(self, phase1_steps: int) -> int:
        return max(phase1_steps - 1, 0) // self.bpe

    def epoch(self) -> int:
        return self._epoch_of(self.phase1_steps)

    def phase1_step(self):
        cfg, st = self.cfg, self.state
        per_sample = cfg.path_sampling == "per-sample"
        paths = self.strategy.sample_phase1(st, self.path_gen, cfg.batch_size, per_sample)
        timer = self.timer
        with timer.part("data"):
            idx = self.train_order.next_indices()
            x, y = self.data.train.batch(idx, train=True, generator=self.aug_gen)
            x, y = self._on_device(x), y.to(self.device)
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * self.phase1_steps / max(self.total_phase1, 1)))
        for g in self.sgd.param_groups:
            g["lr"] = lr
        self.model.train()
        self.sgd.zero_grad(set_to_none=True)  # unchosen paths keep grad None: SGD skips them entirely
        with timer.part("phase1/forward"):
            with self._autocast():
                logits = self.model.forward_per_sample(x, paths) if per_sample else self.model(x, paths)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        with timer.part("phase1/backward"):
            self.scaler.scale(loss).backward()
        with timer.part("phase1/optimizer"):
            self.scaler.step(self.sgd)
            self.scaler.update()
        if per_sample:  # counted in samples
            st.phase1_counts.scatter_add_(1, paths, torch.ones_like(paths))
        else:
            for l, m in enumerate(paths):
                st.phase1_counts[l, m] += 1
        self.phase1_steps += 1
        return float(loss.detach()), float((logits.argmax(1) == y).float().mean()), lr

    def phase2_step(self):
        cfg, st = self.cfg, self.state
        arch = st.sample_from_p(self.path_gen)
        for l, m in enumerate(arch):
            st.phase2_counts[l, m] += 1
        with self.timer.part("data"):
            idx = self.heldout_order.next_indices()
            x, y = self.data.heldout.batch(idx, train=False)
            x, y = self._on_device(x), y.to(self.device)
        gate, loss, acc = self.model.gate_grad_table(x, y, arch, st.remaining, autocast=self._phase2_autocast(),
                                                     timer=self.timer)
        with self.timer.part("phase2/alpha update"):
            st.step(gate, self.cost_mflops, self.beta)
        if cfg.flops_target is not None and cfg.beta_adapt > 0:
            above = self.expected_mflops() > cfg.flops_target
            self.beta = self.beta * (1 + cfg.beta_adapt) if above else self.beta / (1 + cfg.beta_adapt)
        return loss, acc

    def expected_mflops(self) -> float:
        return self.fixed_mflops + float((self.state.probs() * self.cost_mflops).sum())

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self) -> Optional[dict]:
        cfg = self.cfg
        os.makedirs(self.out, exist_ok=True)
        self._build()
        if cfg.resume:
            self._restore()
        else:
            with open(os.path.join(self.out, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
            open(os.path.join(self.out, "history.jsonl"), "w").close()
        print("resolved configuration:\n" + json.dumps(cfg.to_dict(), indent=2))
        print(f"space: {self.space.num_blocks} choice blocks x {self.space.num_candidates} candidates "
              f"{self.space.candidate_names}; device {self.device}; autocast {self.amp_dtype or 'off (fp32)'}; "
              f"{self.iterations} iterations of {cfg.phase_ratio} weight steps, {self.alpha_steps} of them with an "
              f"α step; out {self.out}")
        writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(self.out, "tensorboard"))
        bar = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.iterations, initial=self.iteration, desc=cfg.strategy, dynamic_ncols=True)
        hist_f = open(os.path.join(self.out, "history.jsonl"), "a")
        try:
            while self.iteration < self.iterations:
                if cfg.stop_after is not None and self.iteration >= cfg.stop_after:
                    print(f"stopped after iteration {self.iteration} (--stop-after): no final outputs")
                    return None
                rec = self._iteration()
                hist_f.write(json.dumps(rec) + "\n")
                hist_f.flush()
                if writer:
                    for k in ("phase1_loss", "phase1_acc", "phase2_loss", "phase2_acc", "expected_mflops", "beta"):
                        if rec[k] is not None:
                            writer.add_scalar(k, rec[k], self.iteration)
                    writer.add_scalar("remaining_paths", int(self.state.remaining.sum()), self.iteration)
                if bar:
                    bar.update(1)
                    bar.set_postfix(ep=rec["epoch"], phase="2" if rec["phase2_loss"] is not None else "1",
                                    l1=f"{rec['phase1_loss']:.3f}",
                                    l2="-" if rec["phase2_loss"] is None else f"{rec['phase2_loss']:.3f}",
                                    rem=int(self.state.remaining.sum()))
                if self.iteration % cfg.checkpoint_every == 0 and self.iteration < self.iterations:
                    ckpt.save_checkpoint(self.ckpt_dir, self.iteration, self._checkpoint_state())
        finally:
            hist_f.close()
            if bar:
                bar.close()
        ckpt.save_checkpoint(self.ckpt_dir, self.iteration, self._checkpoint_state())
        result = self._finish()
        if writer:
            writer.add_scalar("final/val_acc", result["val_acc"], self.iteration)
            writer.close()
        return result

    def _iteration(self) -> dict:
        cfg, st = self.cfg, self.state
        n = min(cfg.phase_ratio, self.total_phase1 - self.phase1_steps)
        losses, accs, lr = [], [], None
        for _ in range(n):
            loss, acc, lr = self.phase1_step()
            losses.append(loss)
            accs.append(acc)
        self.iteration += 1
        epoch = self.epoch()
        loss2 = acc2 = None
        drops = []
        if self._alpha_step_at(self.iteration):
            loss2, acc2 = self.phase2_step()
            drops = self.strategy.after_alpha_step(st, self.iteration)
        names = self.space.candidate_names
        return {"step": self.iteration, "epoch": epoch, "phase1_steps": self.phase1_steps, "lr": lr,
                "phase1_loss": float(np.mean(losses)), "phase1_acc": float(np.mean(accs)),
                "phase2_loss": loss2, "phase2_acc": acc2,
                "alpha": masked_list(st.alpha.detach(), st.remaining, 6),
                "p": masked_list(st.probs(), st.remaining, 6),
                "remaining": [[names[m] for m in st.remaining_paths(l)] for l in range(st.num_blocks)],
                "phase1_counts": st.phase1_counts.tolist(), "phase2_counts": st.phase2_counts.tolist(),
                "expected_mflops": self.expected_mflops(), "beta": self.beta,
                "drops": [dict(d, op=names[d["path"]]) for d in drops]}

    # --- results ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def recalibrate_and_score(self, arch: List[int], split) -> float:
        """BN statistics re-estimated for this sub-net on fixed training batches, then accuracy on `split`."""
        model = self.model
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the recalibration batches
        model.train()
        g = torch.Generator().manual_seed(self.cfg.seed + 5)
        perm = torch.randperm(len(self.data.train), generator=g)
        for b in range(self.cfg.bn_recalib_batches):
            idx = perm[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]
            if len(idx) == 0:
                break
            x, _ = self.data.train.batch(idx, train=False)
            with self._autocast():
                model(self._on_device(x), arch)
        for bn in bns:
            bn.momentum = 0.1
        model.eval()
        correct = 0
        n = len(split)
        bs = self.cfg.heldout_batch_size
        for s in range(0, n, bs):
            x, y = split.batch(torch.arange(s, min(s + bs, n)), train=False)
            with self._autocast():
                correct += int((model(self._on_device(x), arch).argmax(1).cpu() == y).sum())
        model.train()
        return correct / max(n, 1)

    def arch_mflops(self, arch: List[int]) -> float:
        return cost_model.arch_cost(self.space, arch).mflops

    def _finish(self) -> dict:
        cfg = self.cfg
        selection = Selection(score=lambda a: self.recalibrate_and_score(a, self.data.heldout), mflops=self.arch_mflops,
                              budget=cfg.flops_target, generator=torch.Generator().manual_seed(cfg.seed + 6))
        arch, extra = self.strategy.select(self.state, selection)
        val_split = self.data.val if len(self.data.val) else self.data.heldout
        val_acc = self.recalibrate_and_score(arch, val_split) if self.total_phase1 else None
        summary = arch_summary(self.space, self.state, arch, cfg.strategy, val_acc, cfg.flops_target, extra)
        with open(os.path.join(self.out, "arch.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(format_table(summary))
        if cfg.plots:
            from .. import plots
            history = [json.loads(ln) for ln in open(os.path.join(self.out, "history.jsonl")) if ln.strip()]
            plots.write_all(self.space, history, arch, self.out)
        return summary
