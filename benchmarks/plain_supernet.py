"""The search's supernet and its step written the way a PyTorch user would write them: the fair baseline of
the search benchmarks (`plain_torch_supernet`, and `torch_modules` for Phase 2 alone).

- `PlainSupernet`: the same network as `betanas_fast.nn.Supernet` (stem, fixed first MBConv, choice blocks
  of MBConv candidates and the identity, head, pool, classifier) built from nn.Conv2d / nn.BatchNorm2d /
  nn.ReLU6 / nn.Linear only (the depthwise stage is nn.Conv2d(groups=C) + nn.BatchNorm2d + nn.ReLU6, as
  ATen runs it), with module names such that the engine's state_dict loads into it strictly: the same
  weights, checked by construction (`PlainSupernet.like`).
- `PlainSearch`: one search iteration on that network, with the engine's data streams, α state, path
  generator and cost table (the same inputs and the same bookkeeping as the engine), and plain torch for
  the work: Phase 1 = forward, backward and SGD of the sampled path (one path per block for the batch);
  Phase 2 = the sampled path with autograd (weights frozen, BatchNorm on batch statistics without touching
  the running ones) for dL/dO of every block, then every other remaining candidate's output through its
  own modules, the gate-gradient table Σ o_j ⊙ dL/dO, and the α update (Eq. 4's gradient by autograd
  through the masked softmax, the engine's Adam, dropped entries held, re-centring).
- `check_matches_engine`: asserts that the plain search computes the engine's numbers, so that the baseline
  does the same work: from the same state one Phase-1 step of each (the same loss, the same SGD); the same
  function in float64 (Phase-1 loss and every weight gradient, Phase-2 loss and gate-gradient table, within
  1e-5 of the largest value); the gate-gradient tables in fp32 as both run them (fp32 rounding alone moves
  this supernet's table by up to a few % of its largest entry, in either implementation); the same α after
  the update.

What the plain iteration leaves out: the engine's history record (a few list conversions per iteration)
and its memory budget for Phase 2 (the plain loop holds one candidate's activations at a time anyway).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from betanas_fast.ops import ieee_fp32
from betanas_fast.runs.timing import NoTimer
from betanas_fast.space import SearchSpace, expanded_channels


class PlainMBConv(nn.Module):
    """1x1 expand (BN, ReLU6) -> k x k depthwise (BN, ReLU6) -> 1x1 project (BN) [+ x]."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand_ratio: float):
        super().__init__()
        mid = expanded_channels(cin, expand_ratio)
        self.has_skip = stride == 1 and cin == cout
        if expand_ratio != 1:
            self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True))
        else:
            self.expand = nn.Identity()
        self.depthwise = nn.Sequential(collections.OrderedDict(
            conv=nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), bn=nn.BatchNorm2d(mid),
            act=nn.ReLU6(inplace=True)))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.has_skip else out


class PlainChoiceBlock(nn.Module):
    def __init__(self, space: SearchSpace, block: int):
        super().__init__()
        spec = space.blocks[block]
        self.names = space.candidate_names
        self.candidates = nn.ModuleDict({
            c.name: nn.Identity() if c.is_skip else PlainMBConv(spec.in_channels, spec.out_channels, c.kernel_size,
                                                                spec.stride, c.expand_ratio)
            for c, ok in zip(space.candidates, spec.allowed) if ok})

    def forward(self, x: torch.Tensor, choice: int) -> torch.Tensor:
        return self.candidates[self.names[choice]](x)


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


class PlainSupernet(nn.Module):
    def __init__(self, space: SearchSpace):
        super().__init__()
        cfg = space.config
        self.stem = _conv_bn_relu6(cfg.in_channels, space.stem_channels, 3, cfg.stem_stride)
        self.first = PlainMBConv(space.stem_channels, space.first_block_channels, 3, 1, 1)
        self.head = _conv_bn_relu6(space.last_channels, space.head_channels, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(space.head_channels, cfg.num_classes)
        self.blocks = nn.ModuleList(PlainChoiceBlock(space, i) for i in range(space.num_blocks))

    @classmethod
    def like(cls, supernet: nn.Module, memory_format: Optional[torch.memory_format] = None) -> "PlainSupernet":
        """The plain network of `supernet`'s space with its weights and buffers (loaded strictly: every key of
        the engine's state_dict has its place here and none is missing), in its dtype, on its device, in `memory_format`
        (default: the stem weight's)."""
        param = next(supernet.parameters())
        fmt = memory_format or (torch.channels_last if param.dim() == 4 and not param.is_contiguous()
                                and param.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        plain = cls(supernet.space).to(param.dtype)
        plain.load_state_dict(supernet.state_dict(), strict=True)
        return plain.to(param.device, memory_format=fmt).train(supernet.training)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))

    def forward(self, x: torch.Tensor, arch: Sequence[int]) -> torch.Tensor:
        x = self.first(self.stem(x))
        for block, choice in zip(self.blocks, arch):
            x = block(x, choice)
        return self._head(x)

    def forward_with_blocks(self, x: torch.Tensor, arch: Sequence[int]):
        """Logits, each choice block's input (detached) and output (in the graph; the first block's input
        requires grad, so that every output is in the graph with the weights frozen)."""
        x = self.first(self.stem(x)).detach().requires_grad_()
        inputs, outputs = [], []
        for block, choice in zip(self.blocks, arch):
            inputs.append(x.detach())
            x = block(x, choice)
            outputs.append(x)
        return self._head(x), inputs, outputs


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Weights frozen (no weight gradient) and BatchNorm on batch statistics with its running ones untouched."""
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for bn in bns:
        bn.track_running_stats = False
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for bn in bns:
            bn.track_running_stats = True
        model.train(was_training)


def gate_grad_table(model: PlainSupernet, x: torch.Tensor, y: torch.Tensor, arch: Sequence[int],
                    remaining: torch.Tensor, autocast=None, timer=None) -> Tuple[torch.Tensor, float, float]:
    """L x M fp32 table, dL/dg_lm = Σ o_lm(x_l) ⊙ dL/dO_l over the remaining paths (0 elsewhere), plus the
    loss and accuracy of `arch`: the sampled path with autograd, then every other remaining candidate
    through its own modules without a graph. In IEEE float32 on CUDA (TF32 off), as the engine computes it: the
    same arithmetic on both sides of a timing."""
    with ieee_fp32():  # only sets torch.backends' two TF32 switches
        return _gate_grad_table(model, x, y, arch, remaining, autocast, timer)


def _gate_grad_table(model, x, y, arch, remaining, autocast, timer):
    if getattr(autocast, "fast_dtype", None) == torch.float16:
        raise ValueError("the plain Phase 2 has no loss scaling: use fp32 or bf16")
    autocast = autocast or contextlib.nullcontext()
    part = (timer or NoTimer()).part
    table = torch.zeros(remaining.shape, dtype=torch.float32)
    with frozen(model):
        with part("phase2/sampled path"):
            with autocast:
                logits, inputs, outputs = model.forward_with_blocks(x, arch)
            loss = F.cross_entropy(logits.float(), y)
            grads = torch.autograd.grad(loss, outputs)
            with torch.no_grad():
                for l, (o, g) in enumerate(zip(outputs, grads)):
                    table[l, arch[l]] = (o.float() * g.float()).sum()
        with part("phase2/other candidates"), torch.no_grad(), autocast:
            for l, block in enumerate(model.blocks):
                g = grads[l].float()
                for m in remaining[l].nonzero().flatten().tolist():
                    if m != arch[l]:
                        table[l, m] = (block(inputs[l], m).float() * g).sum()
    return table, float(loss.detach()), float((logits.argmax(1) == y).float().mean())


def alpha_grad(alpha: torch.Tensor, remaining: torch.Tensor, gate: torch.Tensor, cost: torch.Tensor,
               beta: float) -> torch.Tensor:
    """dL/dα by autograd: Eq. 4 is the gradient of Σ_j (dL/dg_j + β cost_j) p_j, p = softmax(α) over the
    remaining paths (0 on the dropped ones, which get no gradient)."""
    alpha = alpha.detach().requires_grad_()
    p = torch.softmax(alpha.masked_fill(~remaining, float("-inf")), dim=1)
    h = torch.where(remaining, gate + beta * cost, torch.zeros_like(gate))
    (grad,) = torch.autograd.grad((p * h).sum(), alpha)
    return grad


class PlainSearch:
    """The search iteration of `s` (a built Search, whose model this never runs) on a PlainSupernet with
    `s.model`'s weights. `timer` marks the same parts as the engine's (runs.timing)."""

    def __init__(self, s):
        if s.cfg.path_sampling != "per-batch":
            raise ValueError("the plain search step samples one path per block for the batch (per-batch)")
        if s.ranks.active:
            raise ValueError("the plain search step runs in one process")
        if s.scaler.is_enabled():
            raise ValueError("the plain search step has no loss scaling: fp32 or bf16 only")
        self.s = s
        self.device = s.device
        self.memory_format = s.memory_format
        self.model = PlainSupernet.like(s.model, s.memory_format)
        cfg = s.cfg
        decay = [p for p in self.model.parameters() if p.ndim > 1 or cfg.weight_decay_bn]
        no_decay = [p for p in self.model.parameters() if not (p.ndim > 1 or cfg.weight_decay_bn)]
        self.sgd = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}],
                                   lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        self.timer = NoTimer()

    def _batch(self, stream) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = stream.next()
        return x.to(self.device).contiguous(memory_format=self.memory_format), y.to(self.device)

    # --- Phase 1 --------------------------------------------------------------------------------------------
    def phase1_step(self) -> Tuple[float, float, float]:
        s, cfg, st, part = self.s, self.s.cfg, self.s.state, self.timer.part
        arch = s.strategy.sample_phase1(st, s.path_gen, cfg.batch_size, False)
        with part("data"):
            x, y = self._batch(s.train_stream)
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * s.phase1_steps / max(s.total_phase1, 1)))
        for g in self.sgd.param_groups:
            g["lr"] = lr
        self.model.train()
        self.sgd.zero_grad(set_to_none=True)
        with part("phase1/forward"):
            with s._autocast():  # the run's torch.autocast (none in fp32)
                logits = self.model(x, arch)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        with part("phase1/backward"):
            loss.backward()
        scalars = torch.stack([loss.detach().float(), (logits.argmax(1) == y).float().mean()])
        with part("phase1/optimizer"):
            self.sgd.step()
        for l, m in enumerate(arch):
            st.phase1_counts[l, m] += 1
        s.phase1_steps += 1
        loss_value, acc_value = scalars.tolist()
        return loss_value, acc_value, lr

    # --- Phase 2 --------------------------------------------------------------------------------------------
    def gate_grad_table(self, x: torch.Tensor, y: torch.Tensor, arch: Sequence[int], remaining: torch.Tensor,
                        autocast=None) -> Tuple[torch.Tensor, float, float]:
        return gate_grad_table(self.model, x, y, arch, remaining, autocast, self.timer)

    def alpha_grad(self, gate: torch.Tensor, cost: torch.Tensor, beta: float) -> torch.Tensor:
        st = self.s.state
        return alpha_grad(st.alpha.detach(), st.remaining, gate, cost, beta)

    def alpha_step(self, gate: torch.Tensor, cost: torch.Tensor, beta: float) -> None:
        """The engine's α update: the gradient, an Adam step (the α state's optimiser) that leaves dropped entries
        where they are, then every block's remaining α re-centred to mean 0."""
        st = self.s.state
        dropped = ~st.remaining
        frozen = st.alpha.detach()[dropped].clone()
        st.alpha.grad = self.alpha_grad(gate, cost, beta)
        st.optimizer.step()
        st.alpha.grad = None
        with torch.no_grad():
            a = st.alpha
            a[dropped] = frozen
            rem = st.remaining.to(a.dtype)
            a.sub_((a * rem).sum(1, keepdim=True) / rem.sum(1, keepdim=True) * rem)

    def phase2_step(self) -> Tuple[float, float]:
        s, cfg, st = self.s, self.s.cfg, self.s.state
        arch = st.sample_from_p(s.path_gen)
        for l, m in enumerate(arch):
            st.phase2_counts[l, m] += 1
        with self.timer.part("data"):
            x, y = self._batch(s.heldout_stream)
        gate, loss, acc = self.gate_grad_table(x, y, arch, st.remaining, autocast=s._phase2_autocast())
        with self.timer.part("phase2/alpha update"):
            self.alpha_step(gate, s.cost.table, s.beta)
        s.beta = s.cost.adapted_beta(s.beta, st.probs(), cfg.beta_adapt)
        return loss, acc

    def iteration(self) -> dict:
        """Search._iteration's work: `phase_ratio` Phase-1 steps, then (after the warm-up) a Phase-2 step and the
        strategy's drops."""
        s = self.s
        n = min(s.cfg.phase_ratio, s.total_phase1 - s.phase1_steps)
        losses = [self.phase1_step()[0] for _ in range(n)]
        s.iteration += 1
        loss2 = drops = None
        if s._alpha_step_at(s.iteration):
            loss2, _ = self.phase2_step()
            drops = s.strategy.after_alpha_step(s.state, s.iteration)
        return {"phase1_loss": sum(losses) / max(len(losses), 1), "phase2_loss": loss2, "drops": drops}


def _max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300))


def _phase1_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, arch: Sequence[int], label_smoothing: float):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x, arch).float(), y, label_smoothing=label_smoothing)
    loss.backward()
    return float(loss.detach()), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def _some_path(remaining: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [int(r.nonzero().flatten()[torch.randint(int(r.sum()), (1,), generator=g)]) for r in remaining]


def check_matches_engine(engine, plain: PlainSearch, exact_batch: int = 4, exact_tol: float = 1e-5,
                         fp32_table_tol: float = 0.1) -> Dict[str, float]:
    """Asserts that the plain search does the engine's work, and returns the errors seen (each relative to
    the largest value of the quantity).

    `engine` and `plain.s` must be two Searches built from the same configuration and seed that have not
    stepped: the same weights, batches, paths and α.
    1. One Phase-1 step of each, as they run (fp32): the same batch and path, so the same loss to fp32
       rounding; both SGDs have the same hyperparameters and the same parameters in each group.
    2. The same function, in float64, on float64 copies of the engine's weights (after step 1), on the
       first `exact_batch` samples (NCHW: ATen's float64 convolutions are slow, channels_last slower): the
       Phase-1 loss and every weight gradient for a path, the Phase-2 loss and gate-gradient table for a
       path (engine: Supernet.gate_grad_table; plain: gate_grad_table), within `exact_tol`. fp64 because
       fp32 rounding alone moves this supernet's gate-gradient table by up to a few % of its largest entry
       in either implementation (returned as "fp32 rounding of betanas_fast").
    3. fp32, as both run, on the same weights and a whole held-out batch: the Phase-2 loss to fp32 rounding,
       the two tables within `fp32_table_tol` of the largest entry.
    4. The α update (the engine's ArchState.step; the plain alpha_step, with autograd) from the same state
       and the same table: the same α to fp32 rounding."""
    se, sp = engine, plain.s
    errors: Dict[str, float] = {}
    # 1. the steps as they run
    loss_e, acc_e, _ = se.phase1_step()
    loss_p, acc_p, _ = plain.phase1_step()
    assert math.isclose(loss_e, loss_p, rel_tol=1e-5), ("Phase-1 loss", loss_e, loss_p)
    assert abs(acc_e - acc_p) <= 1.5 / se.local_batch, ("Phase-1 accuracy", acc_e, acc_p)  # one argmax may tie
    errors["phase1 step loss, fp32"] = abs(loss_e - loss_p) / abs(loss_e)
    names_e = {id(p): k for k, p in se.model.named_parameters()}
    names_p = {id(p): k for k, p in plain.model.named_parameters()}
    for ge, gp in zip(se.sgd.param_groups, plain.sgd.param_groups, strict=True):
        assert {k: v for k, v in ge.items() if k != "params"} == {k: v for k, v in gp.items() if k != "params"}
        assert sorted(names_e[id(p)] for p in ge["params"]) == sorted(names_p[id(p)] for p in gp["params"])
    # 2. the same function, in float64
    remaining = se.state.remaining
    model64 = copy.deepcopy(se.model).double().to(memory_format=torch.contiguous_format)
    plain64 = PlainSupernet.like(model64, torch.contiguous_format)
    first = torch.arange(exact_batch)
    x, y = se.data.train.batch(first, train=False)
    x, y = x.to(se.device, torch.float64), y.to(se.device)
    arch = _some_path(remaining, 0)
    loss64_e, grads_e = _phase1_grads(model64, x, y, arch, se.cfg.label_smoothing)
    loss64_p, grads_p = _phase1_grads(plain64, x, y, arch, se.cfg.label_smoothing)
    assert math.isclose(loss64_e, loss64_p, rel_tol=1e-12), ("Phase-1 loss, fp64", loss64_e, loss64_p)
    assert grads_e.keys() == grads_p.keys(), "the same parameters get a gradient"
    # relative to the parameter's largest gradient, or to 1e-6 of the largest of all (the gradient of a bias
    # under a BatchNorm is 0 but for rounding)
    floor = 1e-6 * max(float(g.abs().max()) for g in grads_e.values())
    worst = max(float((grads_p[k] - g).abs().max()) / max(float(g.abs().max()), floor) for k, g in grads_e.items())
    assert worst < exact_tol, ("Phase-1 weight gradients, fp64", worst)
    errors["phase1 weight gradients, fp64 (worst parameter)"] = worst
    arch = _some_path(remaining, 1)
    x, y = se.data.heldout.batch(first, train=False)
    x, y = x.to(se.device), y.to(se.device)
    table64, l64, _ = model64.gate_grad_table(x.double(), y, arch, remaining)
    table64_p, l64_p, _ = gate_grad_table(plain64, x.double(), y, arch, remaining)
    assert math.isclose(l64, l64_p, rel_tol=1e-12), ("Phase-2 loss, fp64", l64, l64_p)
    # (no comparison of which entries are 0: a sampled path's entry is 0 up to rounding wherever the next block
    # normalises its output, which makes the loss invariant to its scale)
    assert not table64[~remaining].any() and not table64_p[~remaining].any(), "entries of removed paths"
    err = _max_rel_error(table64_p, table64)
    assert err < exact_tol, ("gate-gradient table, fp64", err)
    errors["phase2 gate table, fp64"] = err
    table32, _, _ = se.model.gate_grad_table(se._on_device(x), y, arch, remaining)
    errors["phase2 gate table, fp32 rounding of betanas_fast (vs fp64)"] = _max_rel_error(table32, table64)
    # 3. fp32, as run, on the same weights
    arch = se.state.sample_from_p(torch.Generator().manual_seed(2))
    x, y = se.data.heldout.batch(torch.arange(se.local_heldout_batch), train=False)
    x, y = se._on_device(x), y.to(se.device)
    table_e, l_e, _ = se.model.gate_grad_table(x, y, arch, remaining, autocast=se._phase2_autocast(),
                                               memory_budget=se.phase2_memory)
    table_p, l_p, _ = gate_grad_table(PlainSupernet.like(se.model, se.memory_format), x, y, arch, remaining,
                                      autocast=sp._phase2_autocast())
    assert math.isclose(l_e, l_p, rel_tol=1e-5), ("Phase-2 loss, fp32", l_e, l_p)
    errors["phase2 loss, fp32"] = abs(l_e - l_p) / abs(l_e)
    assert not table_e[~remaining].any() and not table_p[~remaining].any(), "entries of removed paths"
    errors["phase2 gate table, fp32"] = _max_rel_error(table_p, table_e)
    assert errors["phase2 gate table, fp32"] < fp32_table_tol, errors
    # 4. the α update
    torch.testing.assert_close(sp.state.alpha.detach(), se.state.alpha.detach(), rtol=0, atol=0)
    se.state.step(table_e, se.cost.table, se.beta)
    plain.alpha_step(table_e, sp.cost.table, sp.beta)
    torch.testing.assert_close(sp.state.alpha.detach(), se.state.alpha.detach(), rtol=1e-5, atol=1e-6)
    errors["alpha after the update"] = _max_rel_error(sp.state.alpha.detach(), se.state.alpha.detach())
    return errors
