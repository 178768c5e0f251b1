"""The two-phase search loop shared by every strategy.

Phase 1 trains the weights of the paths the strategy samples; Phase 2 (for strategies that train α)
asks the supernet for the binary-gate gradient table on a held-out batch and lets the α state take its
step (Eq. 4 + the cost term of Eq. 6, Adam, re-centring); the strategy then says what follows (BetaNAS:
the selective drop of Eq. 7) and, at the end, which architecture is the result.
"""
from __future__ import annotations

import math
import os
import random
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import cost as cost_model
from .. import ops
from ..data import BatchOrder
from ..data.load import data_source, search_data
from ..data.stream import BatchStream, to_device
from ..nn.supernet import Supernet, held_out_mode, saved_activation_bytes
from ..runs import files, ranks as run_ranks
from ..runs.options import parse_size
from ..runs.runtime import (TimedStep, autocast, configure_process, forward_backward_step, model_memory_format,
                            resolve_amp, resolve_device)
from ..runs.session import RunSession, continued_settings
from ..runs.timing import MIXTURE, NoTimer
from ..scoring import Evaluation, search_scorer
from ..space import space_from_settings
from . import distributed
from .arch_state import ArchState, masked_list
from .config import RUN_ONLY_FIELDS, SearchConfig, check_noise_floor, validate_config
from .report import arch_summary, cost_caption, format_table
from .strategies import Selection, make_strategy, skip_blocks


def supernet_step(space, split, batch_size: int, device: torch.device, memory_format=torch.preserve_format,
                  pixels: int = 8 * 224 * 224, seed: int = 0) -> TimedStep:
    """What --amp times for a search: one Phase-1 forward + backward of a fresh supernet of `space` on one path
    (drawn from `seed`) and the first images of `split`: as many as hold `pixels` pixels (8 at 224x224), at least
    2 (BatchNorm's batch statistics), at most `batch_size`. That keeps a call well under a second on a CPU, and
    the whole measurement to a few seconds. Nothing of the run is touched: the supernet is built under a forked
    random generator."""
    resolution = space.config.resolution
    n = min(max(2, pixels // (resolution * resolution)), batch_size, len(split))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = Supernet(space).to(device, memory_format=memory_format)
    g = torch.Generator().manual_seed(seed)
    path = [int(torch.multinomial(torch.tensor(row, dtype=torch.float), 1, generator=g))
            for row in space.allowed_mask()]
    x, y = split.batch(torch.arange(n), train=False)
    x, y = x.to(device).contiguous(memory_format=memory_format), y.to(device)
    return forward_backward_step(model, x, y, lambda m, inputs: m(inputs, path),
                                 f"Phase-1 forward+backward ({n} images)")




class Search:
    """Prepare (all checks, no compute) in __init__; `run()` does the search and writes the outputs.
    The flow is one way: configuration -> process settings -> data -> space -> costs -> schedule."""

    def __init__(self, cfg: SearchConfig):
        if run_ranks.launched_by_torchrun() and not (cfg.out or cfg.resume):
            raise ValueError("under torchrun, --out is required: every rank, and a group that torchrun restarts, "
                             "must find the same run directory")
        saved = continued_settings(cfg.to_dict(), RUN_ONLY_FIELDS, cfg.out, cfg.resume)
        if saved is not None:
            cfg = SearchConfig(**saved)
        validate_config(cfg)
        self.cfg = cfg
        self.strategy = make_strategy(cfg)
        self.ranks = run_ranks.ranks_from_env()
        # --batch-size is the global batch: each rank takes an equal share
        self.local_batch = self.ranks.share(cfg.batch_size, "--batch-size")
        self.local_heldout_batch = self.ranks.share(cfg.heldout_batch_size, "--heldout-batch-size")
        self.device = resolve_device(run_ranks.init(self.ranks, cfg.device))
        self.deterministic = cfg.deterministic if cfg.deterministic is not None else self.device.type == "cpu"
        configure_process(self.device, cfg.threads, self.deterministic)
        self.session = RunSession(cfg.out, cfg.resume, cfg.strategy, self.ranks)
        self.out = self.session.dir
        self.dataset_name = data_source(cfg.dataset, cfg.data)
        settings = cfg.to_dict()
        with self.ranks.main_first():  # rank 0 writes the file index cache and the held-out split first
            self.data = search_data(settings, self.out, self.device.type, self.ranks.is_main)
        self.space = space_from_settings(settings, num_classes=self.data.num_classes)
        if cfg.path_sampling == "per-sample" and self.local_batch < 2 * self.space.num_candidates:
            raise ValueError(f"per-sample path sampling needs a batch of at least 2 x the number of candidates "
                             f"({2 * self.space.num_candidates}) per process, so that every path gets at least 2 "
                             f"samples for its batch statistics; got {self.local_batch}"
                             + (f" ({cfg.batch_size} over {self.ranks.world} processes)" if self.ranks.active else ""))
        if len(self.data.heldout) < cfg.heldout_batch_size and self.strategy.trains_alpha:
            raise ValueError(f"held-out split ({len(self.data.heldout)}) is smaller than one global held-out batch "
                             f"({cfg.heldout_batch_size})")
        if len(self.data.train) < cfg.batch_size:
            raise ValueError(f"weight-train split ({len(self.data.train)}) is smaller than one global batch "
                             f"({cfg.batch_size})")
        # --amp on a CPU with native bf16 times a Phase-1 step in both precisions (in one process: under torchrun the
        # ranks must agree, so they take bf16 unmeasured)
        self.amp = resolve_amp(cfg.amp, cfg.amp_dtype, self.device, log=self.log, make_step=None if self.ranks.active
                               else lambda: supernet_step(self.space, self.data.train, self.local_batch, self.device,
                                                          model_memory_format(self.device)))
        self.amp_dtype = self.amp.dtype
        # measured once, before the model exists: the budget for the candidates' activations in Phase 2
        self.phase2_memory = parse_size(cfg.phase2_memory) if cfg.phase2_memory else ops.default_phase2_budget(self.device)
        self.mixture_memory = self._check_mixture_memory() if self.strategy.mixture else None
        self.flops = cost_model.flops_cost(self.space, cfg.flops_target)
        self.cost = self._search_cost(cfg)
        # β of Eq. 6 in the cost's unit; the default per ms presses as hard as --beta per MFLOP
        if self.cost.kind == "flops":
            self.initial_beta = cfg.beta
        elif cfg.beta_latency is not None:
            self.initial_beta = cfg.beta_latency
        else:
            self.initial_beta = cost_model.latency_beta(cfg.beta, self.space, self.cost)
        self.bpe = len(self.data.train) // cfg.batch_size  # global batches: the same schedule at any world size
        self.total_phase1 = cfg.epochs * self.bpe if self.strategy.trains_weights else 0
        self.iterations = math.ceil(self.total_phase1 / cfg.phase_ratio)
        self.alpha_steps = sum(self._alpha_step_at(i) for i in range(1, self.iterations + 1))
        check_noise_floor(cfg, self.alpha_steps)

    def _check_mixture_memory(self) -> dict:
        """The mixture keeps every remaining candidate's activations for the backward pass (the DARTS family's
        memory): measured before the run on a fresh supernet of the space, as autograd's saved tensors at 2 and 4
        images extrapolated to this process's batch, with one path's for comparison. A ValueError naming the
        numbers when they (and the weights with their gradients and momentum) exceed 90 % of the memory free
        on the device."""
        device, batch = self.device, max(self.local_batch, self.local_heldout_batch)
        memory_format = model_memory_format(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = Supernet(self.space).to(device, memory_format=memory_format).train()
        allowed = torch.tensor(self.space.allowed_mask())
        weights = allowed.float() / allowed.sum(1, keepdim=True)
        one_path = [row.index(True) for row in self.space.allowed_mask()]
        params = list(model.parameters())

        def saved(n: int, mixture: bool) -> int:
            x, _ = self.data.train.batch(torch.arange(n), train=False)
            x = x.to(device).contiguous(memory_format=memory_format)
            run = (lambda: model.forward_mixture(x, weights, allowed, self.cfg.mixture_recompute)) if mixture \
                else (lambda: model(x, one_path))
            with self._autocast():
                return saved_activation_bytes(run, params)

        two = saved(2, True)
        per_image = (saved(4, True) - two) / 2
        path_per_image = max((saved(4, False) - saved(2, False)) / 2, 1.0)
        activations = two + per_image * (batch - 2)
        weights_bytes = 4 * sum(p.numel() * p.element_size() for p in params)  # weights, grads, momentum, a copy
        free = ops.default_phase2_budget(device, fraction=0.9)
        report = {"activation_bytes": int(activations), "per_image_bytes": int(per_image),
                  "one_path_per_image_bytes": int(path_per_image), "ratio_to_one_path": per_image / path_per_image,
                  "weights_bytes": weights_bytes, "free_bytes": free, "batch": batch}
        what = (f"--strategy {self.cfg.strategy}: the mixture of every remaining candidate keeps about "
                f"{activations / 2**20:.1f} MiB of activations for a batch of {batch} per process "
                f"({per_image / 2**20:.2f} MiB per image, {report['ratio_to_one_path']:.1f}x one path's "
                f"{path_per_image / 2**20:.2f} MiB{', candidates recomputed in backward' if self.cfg.mixture_recompute else ''}"
                f") plus {weights_bytes / 2**20:.1f} MiB of weights, gradients and momentum")
        if activations + weights_bytes > free:
            raise ValueError(f"{what}: more than the {free / 2**20:.1f} MiB free on {device} (90 %). Lower "
                             f"--batch-size / --heldout-batch-size"
                             + ("" if self.cfg.mixture_recompute else ", or add --mixture-recompute (each "
                                                                      "candidate's activations recomputed in the "
                                                                      "backward pass)"))
        self.log(what)
        return report

    def _search_cost(self, cfg: SearchConfig) -> cost_model.SearchCost:
        """Eq. 6's cost, checked before any compute: the FLOPs table, or the latency table (the run directory's
        copy when the run is continued) covering every entry of the space and measured on this machine."""
        if cfg.cost == "latency":
            copy = os.path.join(self.out, files.LATENCY_TABLE)
            table = cost_model.LatencyTable.load(copy if os.path.isfile(copy) else cfg.latency_table)
            if not cfg.latency_table_any_machine:
                table.check_machine()
            cost = cost_model.latency_cost(self.space, table, cfg.latency_target)
        else:
            cost = self.flops
        if cost.target is not None and cost.target < cost.floor():
            raise ValueError(f"{'FLOPs' if cost.kind == 'flops' else 'latency'} target {cost.target} {cost.unit} is "
                             f"below the smallest net of this space ({cost.floor():.4f} {cost.unit})")
        return cost

    def _alpha_step_at(self, iteration: int) -> bool:
        """Whether iteration `iteration` (1-based) ends with an α step: in the epochs the strategy trains α in (after
        the warm-up)."""
        phase1_steps = min(iteration * self.cfg.phase_ratio, self.total_phase1)
        return self.strategy.trains_alpha and self.strategy.trains_alpha_in(self._epoch_of(phase1_steps))

    def log(self, *args) -> None:
        """print, on rank 0 only."""
        self.session.log(*args)

    # --- setup --------------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.memory_format = model_memory_format(self.device)
        self.model = Supernet(self.space).to(self.device, memory_format=self.memory_format)
        self.grad_sync = distributed.GradientSync(self.ranks)
        self.state = ArchState(self.space.allowed_mask(), **self.strategy.alpha_optimizer(),
                               mask_init=self.strategy.mask_init)
        self.strategy.build(self.space.num_blocks, self.space.num_candidates)
        self.sgd = torch.optim.SGD(self._weight_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov and cfg.momentum > 0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        # identical on every rank: the paths agree by construction
        self.path_gen = torch.Generator().manual_seed(cfg.seed + 1)
        # each rank augments its own samples
        self.aug_gen = torch.Generator().manual_seed(self.ranks.seed(cfg.seed + 2))
        # the global batch order, identical on every rank; each rank decodes its share
        self.train_stream = BatchStream(self.data.train, BatchOrder(len(self.data.train), cfg.batch_size, cfg.seed + 3),
                                        train=True, generator=self.aug_gen, shard=self.ranks.shard,
                                        prefetch=cfg.prefetch, **self._pinning())
        self.heldout_stream = BatchStream(self.data.heldout,
                                          BatchOrder(len(self.data.heldout), cfg.heldout_batch_size, cfg.seed + 4),
                                          train=False, shard=self.ranks.shard, prefetch=cfg.prefetch,
                                          **self._pinning())
        self.beta = self.initial_beta
        self.iteration = 0
        self.phase1_steps = 0
        self.epochs_done = 0          # epochs whose end the strategy and the stability counters have seen
        self.alpha_moved = False      # whether α stepped in the current epoch
        self.stopped: Optional[dict] = None  # the strategy's early stop (DARTS+): where and why
        self.timer = NoTimer()  # a StepTimer here measures each part of the step (benchmarks)
        # scores architectures with the supernet's weights: the final choice and score, SPOS's evolution
        self.scorer = search_scorer(self.model, self.data, cfg.to_dict(), self.device, self._autocast(), self.ranks)

    def _weight_groups(self) -> List[dict]:
        """Weight decay on the convolution and linear weights; BatchNorm weights and biases (every 1-D
        parameter) only with `weight_decay_bn`, as ProxylessNAS excludes them."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim > 1 or self.cfg.weight_decay_bn else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _checkpoint_state(self) -> dict:
        """Collective under torchrun (every rank's augmentation state is gathered); rank 0 saves it."""
        train = self.train_stream.state_dict()
        return {"iteration": self.iteration, "phase1_steps": self.phase1_steps, "beta": self.beta,
                "model": self.model.state_dict(), "sgd": self.sgd.state_dict(),
                "scaler": self.scaler.state_dict(), "arch": self.state.state_dict(),
                "world_size": self.ranks.world,
                # the autocast dtype the run chose (--amp may have timed it): scoring the run later uses the same
                "autocast": {"device_type": self.device.type,
                             "dtype": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else None},
                "train_stream": {"order": train["order"], "generators": self.ranks.all_gather_object(train["generator"])},
                "heldout_stream": self.heldout_stream.state_dict(),
                "epochs_done": self.epochs_done, "alpha_moved": self.alpha_moved, "stopped": self.stopped,
                "strategy": self.strategy.state_dict(),
                "rng": files.rng_state({"path": self.path_gen})}

    def _save_checkpoint(self) -> None:
        self.session.save_checkpoint(self.iteration, self._checkpoint_state())

    def _restore(self) -> None:
        path, s = self.session.restore("step", "iteration")
        self.model.load_state_dict(s["model"])
        self.sgd.load_state_dict(s["sgd"])
        if s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        self.state.load_state_dict(s["arch"])
        self.strategy.load_state_dict(s.get("strategy", {}))
        files.set_rng_state(s["rng"], {"path": self.path_gen})
        saved_world = int(s["world_size"])
        same_world = saved_world == self.ranks.world
        self.train_stream.load_state_dict(s["train_stream"] | {"generator": s["train_stream"]["generators"][0]},
                                          generator=False)
        if same_world:
            self.aug_gen.set_state(s["train_stream"]["generators"][self.ranks.rank])
        self.heldout_stream.load_state_dict(s["heldout_stream"])
        self.iteration, self.phase1_steps, self.beta = int(s["iteration"]), int(s["phase1_steps"]), float(s["beta"])
        # (checkpoints written before epochs' ends were kept: every finished epoch's end seen)
        self.epochs_done = int(s.get("epochs_done", self.phase1_steps // self.bpe))
        self.alpha_moved, self.stopped = bool(s.get("alpha_moved", False)), s.get("stopped")
        self.log(f"resumed from {path} at iteration {self.iteration}")
        if not same_world:
            self.log(f"note: the checkpoint was written by {saved_world} process(es) and this run has "
                     f"{self.ranks.world}: the run continues with the same global batches, paths and α, but each "
                     f"process's share, augmentation and BatchNorm statistics differ, so it is not bit-identical to "
                     f"an uninterrupted run")

    def _next_batch(self, stream: BatchStream):
        """The next batch of `stream` for this process, on the run's device (its time counted as data)."""
        with self.timer.part("data"):
            x, y = stream.next()
            return self._on_device(x), to_device(y, self.device, torch.contiguous_format)

    def _pinning(self) -> dict:
        """BatchStream's page-locking of batches for the run's device."""
        return {"pin_memory": self.device.type == "cuda", "memory_format": self.memory_format}

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on the run's device, in the model's memory format."""
        return to_device(x, self.device, self.memory_format)

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
        if self.strategy.mixture:
            return self.mixture_phase1_step()
        cfg, st = self.cfg, self.state
        per_sample = cfg.path_sampling == "per-sample"
        # the global step's paths, the same on every rank ([L, global batch] per sample: each rank takes its columns)
        shards = {"shards": self.ranks.world} if self.ranks.active else {}  # (a strategy of one process may omit it)
        global_paths = self.strategy.sample_phase1(st, self.path_gen, cfg.batch_size, per_sample, **shards)
        paths = self.ranks.shard(global_paths.T).T if per_sample else global_paths
        x, y = self._next_batch(self.train_stream)

        def step_modules():
            distributed.check_paths(self.ranks, global_paths, self.iteration + 1, self.device)
            used = distributed.used_paths(paths, global_paths if per_sample else None)
            return distributed.step_modules(self.model, used)

        scalars, lr = self._weight_step(
            x, y, lambda x: self.model.forward_per_sample(x, paths) if per_sample else self.model(x, paths),
            step_modules, per_sample)
        if per_sample:  # counted in samples, over the global batch
            st.phase1_counts.scatter_add_(1, global_paths, torch.ones_like(global_paths))
            st.phase1_weight.scatter_add_(1, global_paths, torch.full(global_paths.shape, 1 / global_paths.shape[1],
                                                                       dtype=torch.float64))
        else:
            for l, m in enumerate(paths):
                st.phase1_counts[l, m] += 1
                st.phase1_weight[l, m] += 1
        self.phase1_steps += 1
        loss_value, acc_value = scalars.tolist()
        return loss_value, acc_value, lr

    def _weight_step(self, x, y, forward, step_modules, per_sample: bool = False):
        """One SGD step of the weights on (x, y) through `forward(x)`, the gradients of `step_modules()` (the
        modules the step ran) averaged over ranks; returns ([loss, accuracy], learning rate)."""
        cfg, timer = self.cfg, self.timer
        lr = self._phase1_lr()
        self.model.train()
        self.sgd.zero_grad(set_to_none=True)  # paths the step does not run keep grad None: SGD skips them entirely
        with timer.part("phase1/forward"):
            with self._autocast():
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        with timer.part("phase1/backward"):
            self.scaler.scale(loss).backward()
        scalars = torch.stack([loss.detach().float(), (logits.argmax(1) == y).float().mean()])
        if self.ranks.active:
            with timer.part("phase1/gradient sync"):
                scalars = self.grad_sync(self.model, step_modules(), scalars, per_sample)
        with timer.part("phase1/optimizer"):
            self.scaler.step(self.sgd)
            self.scaler.update()
        return scalars, lr

    def _phase1_lr(self) -> float:
        """The cosine schedule's learning rate of the next weight step, set on the optimiser."""
        lr = 0.5 * self.cfg.lr * (1 + math.cos(math.pi * self.phase1_steps / max(self.total_phase1, 1)))
        for g in self.sgd.param_groups:
            g["lr"] = lr
        return lr

    def _remaining_modules(self):
        """The modules every step of a mixture runs: the fixed parts and each block's remaining candidates."""
        return distributed.step_modules(self.model, [self.state.remaining_paths(l) for l in range(self.state.num_blocks)])

    def mixture_phase1_step(self):
        """A weight step of the DARTS family: every remaining candidate runs, weighted by the strategy's mixture
        weights (α not trained here)."""
        cfg, st = self.cfg, self.state
        epoch = self._epoch_of(self.phase1_steps + 1)
        weights = self.strategy.mixture_weights(st, self.path_gen, epoch).detach()
        x, y = self._next_batch(self.train_stream)
        self._last_train_batch = (x, y)
        scalars, lr = self._weight_step(
            x, y, lambda x: self.model.forward_mixture(x, weights, st.remaining, cfg.mixture_recompute,
                                                       self.strategy.skip_dropout(epoch)),
            self._remaining_modules)
        st.phase1_counts += st.remaining.long()
        st.phase1_weight += weights.to(torch.float64) * st.remaining
        self.phase1_steps += 1
        loss_value, acc_value = scalars.tolist()
        return loss_value, acc_value, lr

    def phase2_step(self):
        if self.strategy.mixture or self.strategy.straight_through:
            return self.autograd_alpha_step()
        if self.strategy.policy_gradient:
            return self.policy_step()
        cfg, st = self.cfg, self.state
        arch = st.sample_from_p(self.path_gen)
        st.count_phase2(arch)
        x, y = self._next_batch(self.heldout_stream)
        gate, loss, acc = self.model.gate_grad_table(x, y, arch, st.remaining, autocast=self._phase2_autocast(),
                                                     timer=self.timer, memory_budget=self.phase2_memory)
        if self.ranks.active:  # each rank's table is of its shard: averaged before Eq. 4, α agrees by construction
            with self.timer.part("phase2/table sync"):
                packed = torch.cat([gate.flatten(), torch.tensor([loss, acc])])
                packed = run_ranks.all_reduce_mean(self.ranks, packed, self.device)
                gate, (loss, acc) = packed[:-2].view_as(gate), packed[-2:].tolist()
        with self.timer.part("phase2/alpha update"):
            st.step(gate, self.cost.table, self.beta)
        self.beta = self.cost.adapted_beta(self.beta, st.probs(), cfg.beta_adapt)
        return loss, acc

    def policy_step(self):
        """ENAS: a controller sample scored on a held-out batch with the shared weights (no gradient to them,
        BatchNorm's running statistics untouched), the reward acc − β·(the choice blocks' cost, Eq. 6's part) with
        acc averaged over ranks, a REINFORCE step."""
        st, strategy = self.state, self.strategy
        arch, log_prob, entropy = strategy.sample(st, self.path_gen)
        st.count_phase2(arch)
        x, y = self._next_batch(self.heldout_stream)
        with held_out_mode(self.model), torch.no_grad(), self._phase2_autocast():
            logits = self.model(x, arch)
        scalars = torch.stack([F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).float().mean()])
        if self.ranks.active:
            scalars = run_ranks.all_reduce_mean(self.ranks, scalars, self.device)
        loss, acc = scalars.tolist()
        with self.timer.part("phase2/alpha update"):
            strategy.reinforce(st, log_prob, entropy, acc - self.beta * (self.cost.of_arch(arch) - self.cost.fixed))
        self.beta = self.cost.adapted_beta(self.beta, st.probs(), self.cfg.beta_adapt)
        return loss, acc

    # --- the DARTS family's α step ---------------------------------------------------------------------------
    def _mixture_loss(self, x, y, weights):
        """(cross-entropy, accuracy) of the mixture on (x, y), BatchNorm on batch statistics with its running
        ones untouched (the α step must not move the weights' state)."""
        with self._phase2_autocast():
            logits = self.model.forward_mixture(x, weights, self.state.remaining, self.cfg.mixture_recompute,
                                                self.strategy.skip_dropout(self.epoch()))
        return F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).float().mean()

    def autograd_alpha_step(self):
        """dL/dα by backpropagation on a held-out batch, through the mixture (first order, or through one unrolled
        weight step: DARTS's second order) or through a sampled sub-net's straight-through weights (GDAS);
        averaged over ranks; an Adam step."""
        st, strategy = self.state, self.strategy
        x, y = self._next_batch(self.heldout_stream)
        with self.timer.part(MIXTURE):
            grad, loss, acc = self.arch_grad(x, y)
        packed = torch.cat([grad.detach().float().flatten(), torch.stack([loss.detach().float(), acc.float()]).cpu()])
        if self.ranks.active:
            with self.timer.part("phase2/table sync"):
                packed = run_ranks.all_reduce_mean(self.ranks, packed, self.device)
        grad, (loss, acc) = packed[:-2].view(-1, st.alpha.shape[1]), packed[-2:].tolist()
        with self.timer.part("phase2/alpha update"):
            st.apply_grad(grad, recentre=strategy.recentres)
        self.beta = self.cost.adapted_beta(self.beta, st.probs(), self.cfg.beta_adapt)
        return loss, acc

    def arch_grad(self, x: torch.Tensor, y: torch.Tensor):
        """(dL/dα, loss, accuracy) on this process's held-out batch, by the strategy's estimator (the Phase-2 counts
        updated: every remaining path for the mixture, the sampled one for GDAS)."""
        if self.strategy.straight_through:
            return self.straight_through_alpha_grad(x, y)
        self.state.phase2_counts += self.state.remaining.long()
        return self.mixture_alpha_grad(x, y)

    def straight_through_alpha_grad(self, x: torch.Tensor, y: torch.Tensor):
        """GDAS: a Gumbel-max sample of the sub-net, its straight-through weights h, the held-out loss of
        Supernet.forward_hard plus β·Σ h·cost, differentiated in α. BatchNorm on batch statistics, its running ones
        untouched; no weight gets a gradient."""
        st, strategy = self.state, self.strategy
        arch, weights = strategy.hard_weights(st, self.path_gen, strategy.temperature(self.epoch()))
        st.count_phase2(arch)
        with held_out_mode(self.model):
            with self._phase2_autocast():
                logits = self.model.forward_hard(x, arch, weights)
            ce = F.cross_entropy(logits.float(), y)
            loss = strategy.arch_loss(ce, weights, self.cost, self.beta)
            (grad,) = torch.autograd.grad(loss, st.alpha)
        return grad, loss, (logits.argmax(1) == y).float().mean()

    def mixture_alpha_grad(self, x: torch.Tensor, y: torch.Tensor):
        """(dL/dα, loss, accuracy) on the held-out batch (x, y) of this process: first order, or DARTS's second
        order; with HM-NAS's op masks, dL/d(mask scores) stacked under dL/dα (ArchState.values). BatchNorm
        normalises with batch statistics and its running ones stay as they are."""
        strategy = self.strategy
        with held_out_mode(self.model):
            if strategy.order == 2:
                return self._unrolled_alpha_grad(x, y)
            weights = strategy.mixture_weights(self.state, self.path_gen, self.epoch())
            ce, acc = self._mixture_loss(x, y, weights)
            loss = strategy.arch_loss(ce, weights, self.cost, self.beta)
            grads = torch.autograd.grad(loss, self.state.parameters())
            return torch.cat(grads), loss, acc

    def _unrolled_alpha_grad(self, x_val, y_val):
        """DARTS's second-order α gradient: ∇_α L_val(w', α) − ξ · (∇_α L_train(w⁺) − ∇_α L_train(w⁻)) / 2ε, with
        w' one step of the weights' own optimiser (SGD at its current learning rate ξ, momentum, Nesterov and
        weight decay as it would apply them) from the gradient of the training loss on the iteration's last
        weight batch, w± = w ± ε·∇_{w'} L_val, ε = 0.01 / ‖∇_{w'} L_val‖. The weights are restored exactly."""
        st, strategy = self.state, self.strategy
        x_tr, y_tr = self._last_train_batch
        groups = [(g, p) for g in self.sgd.param_groups for p in g["params"]]
        used = {id(p) for m in self._remaining_modules() for p in m.parameters()}
        groups = [(g, p) for g, p in groups if id(p) in used and p.requires_grad]
        params = [p for _, p in groups]
        saved = [p.detach().clone() for p in params]
        xi = self.sgd.param_groups[0]["lr"]
        weights = strategy.mixture_weights(st, self.path_gen, self.epoch())
        train_ce, _ = self._mixture_loss(x_tr, y_tr, weights.detach())
        grads = torch.autograd.grad(train_ce, params)
        with torch.no_grad():  # w' = w - ξ · the optimiser's update
            for (g, p), d in zip(groups, grads):
                d = d + g["weight_decay"] * p
                if g["momentum"]:
                    buf = self.sgd.state.get(p, {}).get("momentum_buffer")
                    buf = d if buf is None else g["momentum"] * buf + d
                    d = d + g["momentum"] * buf if g["nesterov"] else buf
                p.sub_(xi * d)
        ce, acc = self._mixture_loss(x_val, y_val, weights)
        loss = strategy.arch_loss(ce, weights, self.cost, self.beta)
        dalpha, *dw = torch.autograd.grad(loss, [st.alpha] + params)
        eps = 0.01 / torch.cat([d.flatten().double() for d in dw]).norm().clamp_min(1e-12).item()
        hessian = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, w, d in zip(params, saved, dw):
                    p.copy_(w + sign * eps * d)
            # (DARTS's weights are softmax(α): computing them again draws nothing from the generator)
            train_ce, _ = self._mixture_loss(x_tr, y_tr, strategy.mixture_weights(st, self.path_gen, self.epoch()))
            hessian.append(torch.autograd.grad(train_ce, st.alpha)[0])
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        return dalpha - xi * (hessian[0] - hessian[1]) / (2 * eps), loss, acc

    def expected_costs(self) -> dict:
        """The whole net's expected MFLOPs (always) and predicted latency (with --cost latency) under p."""
        p = self.state.probs()
        out = {"expected_mflops": self.flops.expected(p)}
        if self.cost.kind == "latency":
            out["expected_latency_ms"] = self.cost.expected(p)
        return out

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self) -> Optional[dict]:
        try:
            return self._run()
        finally:
            self.close()

    def close(self) -> None:
        """Stops the prefetching threads (the splits are then free for the final scoring)."""
        for stream in (getattr(self, "train_stream", None), getattr(self, "heldout_stream", None)):
            if stream is not None:
                stream.close()

    def _run(self) -> Optional[dict]:
        cfg, main = self.cfg, self.ranks.is_main
        self._build()
        self.session.begin(cfg.to_dict(), self._restore)
        if main and self.cost.latency is not None and not os.path.isfile(os.path.join(self.out, files.LATENCY_TABLE)):
            self.cost.latency.save(os.path.join(self.out, files.LATENCY_TABLE))
        self.log(f"space: {self.space.num_blocks} choice blocks x {self.space.num_candidates} candidates "
                 f"{self.space.candidate_names}; device {self.device}; autocast {self.amp_dtype or 'off (fp32)'}; "
                 f"{self.iterations} iterations of {cfg.phase_ratio} weight steps, {self.alpha_steps} of them with an "
                 f"α step; out {self.out}"
                 + (f"; {self.ranks.world} processes, {self.local_batch} + {self.local_heldout_batch} samples each"
                    if self.ranks.active else ""))
        bar = None
        self.session.open_tensorboard(cfg.tensorboard, self.iteration)
        if main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.iterations, initial=self.iteration, desc=cfg.strategy, dynamic_ncols=True)
        try:
            while self.iteration < self.iterations and self.stopped is None:
                if cfg.stop_after is not None and self.iteration >= cfg.stop_after:
                    self.log(f"stopped after iteration {self.iteration} (--stop-after): no final outputs")
                    return None
                rec = self._iteration()
                if self.iteration % cfg.digest_every == 0:
                    self.check_agreement()
                self.session.record(rec, self.iteration, scalars=("phase1_loss", "phase1_acc", "phase2_loss",
                                                                  "phase2_acc", "expected_mflops",
                                                                  "expected_latency_ms", "beta"),
                                    extra={"remaining_paths": int(self.state.remaining.sum())})
                if bar:
                    bar.update(1)
                    bar.set_postfix(ep=rec["epoch"], phase="2" if rec["phase2_loss"] is not None else "1",
                                    l1=f"{rec['phase1_loss']:.3f}",
                                    l2="-" if rec["phase2_loss"] is None else f"{rec['phase2_loss']:.3f}",
                                    rem=int(self.state.remaining.sum()))
                if self.iteration % cfg.checkpoint_every == 0 and self.iteration < self.iterations:
                    self._save_checkpoint()
            if self.stopped is not None:
                self.log(f"stopped early at the end of epoch {self.stopped['epoch']} (iteration "
                         f"{self.stopped['step']} of {self.iterations}): {self.stopped['reason']}")
        finally:
            if bar:
                bar.close()
        self.check_agreement()
        self._save_checkpoint()
        self.close()
        result = self._finish()
        if result["val_acc"] is not None:
            self.session.scalar("final/val_acc", result["val_acc"], self.iteration)
        self.session.close()
        return result

    def check_agreement(self) -> None:
        """Under torchrun: every rank's digest of (α, remaining paths, path generator, step, weights) must be
        rank 0's, or the run stops naming the step and the ranks."""
        if self.ranks.active:
            local = distributed.digest(self.state.values(), self.state.remaining, self.path_gen, self.iteration,
                                       self.model)
            distributed.check_agreement(self.ranks, local, self.iteration, self.device)

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
            self.alpha_moved = True
            drops = self.strategy.after_alpha_step(st, self.iteration)
        drops += self._end_epochs()
        names = self.space.candidate_names
        return {"step": self.iteration, "epoch": epoch, "phase1_steps": self.phase1_steps, "lr": lr,
                "phase1_loss": float(np.mean(losses)), "phase1_acc": float(np.mean(accs)),
                "phase2_loss": loss2, "phase2_acc": acc2,
                "alpha": masked_list(st.alpha.detach(), st.remaining, 6),
                "p": masked_list(st.probs(), st.remaining, 6),
                "remaining": [[names[m] for m in st.remaining_paths(l)] for l in range(st.num_blocks)],
                "phase1_counts": st.phase1_counts.tolist(), "phase2_counts": st.phase2_counts.tolist(),
                **self.expected_costs(), "beta": self.beta,
                "drops": [dict(d, op=names[d["path"]]) for d in drops],
                **self.choice_record(), **self.strategy.record(st, epoch, self.space),
                **({"stopped": self.stopped["reason"]} if self.stopped and self.stopped["step"] == self.iteration
                   else {})}

    def _end_epochs(self) -> List[dict]:
        """Each epoch finished since the last call: the stability counters, then the strategy's end of epoch (its
        drops are returned) and its early stop."""
        made = []
        while self.epochs_done < self.phase1_steps // self.bpe:
            epoch = self.epochs_done
            self.state.end_epoch(self.alpha_moved)
            self.alpha_moved = False
            made += self.strategy.end_epoch(self.state, epoch, self.iteration)
            self.epochs_done += 1
            reason = self.strategy.stop_reason(self.state, epoch, self.space) if self.stopped is None else None
            if reason:
                self.stopped = {"epoch": epoch, "step": self.iteration, "phase1_steps": self.phase1_steps,
                                "reason": reason}
        return made

    def choice_record(self) -> dict:
        """What every strategy's history holds of its choice per block: each path's share of the weight steps'
        weight (Fig. 5's measure: 1 per step on the sampled path, the mixture's weight in the DARTS family), how
        many blocks' argmax is the identity path (the DARTS family's collapse), and for how many epochs each
        block's argmax and whole ranking by α have held."""
        st = self.state
        share = st.phase1_weight / st.phase1_weight.sum(1, keepdim=True).clamp_min(1e-12)
        return {"phase1_weight_share": masked_list(share, st.remaining, 6),
                "argmax_skips": len(skip_blocks(self.space, st.argmax_arch())),
                "argmax_stable_epochs": st.argmax_stable_epochs.tolist(),
                "ranking_stable_epochs": st.ranking_stable_epochs.tolist()}

    # --- results ----------------------------------------------------------------------------------------------
    def evaluate(self, arch: List[int], split, seed: Optional[int] = None,
                 calibration_batches: Optional[int] = None) -> Evaluation:
        """`arch` with the supernet's weights (copied, the supernet untouched), BatchNorm recalibrated exactly
        on a fixed subset of the weight-training split (seed + 5 unless `seed`), scored on `split`."""
        return self.scorer.evaluate(arch, split, seed=seed, calibration_batches=calibration_batches)

    def _finish(self) -> dict:
        cfg = self.cfg
        selection = Selection(score=lambda a: self.evaluate(a, self.data.heldout).top1, cost=self.cost.of_arch,
                              budget=self.cost.target, unit=self.cost.unit,
                              generator=torch.Generator().manual_seed(cfg.seed + 6), log=self.log, space=self.space)
        arch, extra = self.strategy.select(self.state, selection)
        extra = dict(extra, skips=len(skip_blocks(self.space, arch)),
                     **({"stopped": self.stopped} if self.stopped is not None else {}))
        val_split = self.data.val if len(self.data.val) else self.data.heldout
        val_acc = self.evaluate(arch, val_split).top1 if self.total_phase1 else None
        summary = arch_summary(self.space, self.state, arch, cfg.strategy, val_acc, self.cost, extra)
        summary["dataset"] = self.dataset_name
        if not self.ranks.is_main:  # every rank chose the same (the digest agreed); rank 0 writes
            return summary
        files.write_arch(self.out, summary)
        print(format_table(summary))
        if cfg.plots:
            from .. import plots
            history = files.read_history(self.out)
            plots.write_all(self.space, history, arch, self.out, caption=cost_caption(summary),
                            strategy=cfg.strategy)
        return summary
