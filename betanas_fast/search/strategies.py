"""The search strategies: one class each, saying how Phase 1 samples paths, whether α is trained, what
follows an α step, and how the final architecture is chosen. The two-phase loop (engine.py) asks these
questions and knows no strategy by name.

- `BetaNAS`: balanced training (uniform over the remaining paths, by shuffled cycles), α by the
  binary-gate gradient, selective drop after each α step, argmax at the end.
- `Proxyless`: BetaNAS without the two ideas: Phase 1 draws paths from p, nothing is dropped.
- `SPOS`: uniform training of every path for the whole run, no α; evolution under the cost budget.
- `Random`: no training; a random architecture under the budget.

The DARTS family (`mixture = True`): every choice block outputs Σ_m w_m · o_m(x) over its remaining
candidates in both steps, the weights trained through that mixture and α by backpropagating through the
weights w the strategy gives (`mixture_weights`), with the loss it gives (`arch_loss`):

- `DARTS`: w = softmax(α); α by Adam, first order or (`--darts-order 2`) through one unrolled weight step
  with the finite-difference Hessian-vector product; argmax at the end.
- `FBNet`: w a Gumbel-softmax sample at temperature 5·exp(−0.045·epoch), in both steps; the loss
  CE · a · log(cost)^b of the sampled net's cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import math

import torch

from .arch_state import ArchState
from .evolution import evolution_search, sample_within_budget

Paths = Union[List[int], torch.Tensor]  # one path per block, or [blocks, batch] for per-sample sampling


@dataclass
class Selection:
    """What the final choice may use: score a sub-net on held-out data (BN recalibrated), its cost (MFLOPs
    or predicted ms), the budget in that unit (or None), a seeded generator, a log line sink."""
    score: Callable[[List[int]], float]
    cost: Callable[[List[int]], float]
    budget: Optional[float]
    generator: torch.Generator
    log: Callable[[str], None] = print
    unit: str = "MFLOPs"


class Strategy:
    name = ""
    trains_weights = True   # Phase 1 runs
    trains_alpha = False    # Phase 2 runs after the warm-up
    drops_paths = False     # selective drop after each α step
    mixture = False         # both steps run the weighted mixture of every remaining candidate (DARTS family)
    recentres = True        # each block's remaining α re-centred to mean 0 after an α step (p unchanged)
    order = 1               # the mixture's α gradient: 1, or 2 through one unrolled weight step (DARTS's)

    def __init__(self, cfg):
        self.cfg = cfg

    def alpha_optimizer(self) -> dict:
        """Adam's settings for α: the search's --arch-* flags (the DARTS family has its own)."""
        cfg = self.cfg
        return dict(lr=cfg.arch_lr, betas=(cfg.arch_beta1, cfg.arch_beta2), eps=cfg.arch_eps, weight_decay=0.0)

    def mixture_weights(self, state: ArchState, generator: torch.Generator, epoch: int) -> torch.Tensor:
        """[L, M] weights of the mixture (differentiable in state.alpha; 0 off the remaining paths)."""
        raise NotImplementedError(f"{self.name} does not run the mixture")

    def record(self, state: ArchState, epoch: int, space) -> dict:
        """What the history adds for this strategy at each iteration."""
        return {}

    def arch_loss(self, ce: torch.Tensor, weights: torch.Tensor, cost, beta: float) -> torch.Tensor:
        """The α step's loss: the held-out cross-entropy plus β · the expected cost Σ_l Σ_m w_lm cost_lm (Eq. 6's
        term, in MFLOPs or ms)."""
        return ce + beta * (weights * cost.table.to(weights)).sum()

    def sample_phase1(self, state: ArchState, generator: torch.Generator, batch_size: int, per_sample: bool,
                      shards: int = 1) -> Paths:
        """Uniform over the remaining paths, balanced by shuffled cycles. `batch_size` is the global batch;
        per sample, each of `shards` contiguous parts of it (the processes' shares) gets its share of the
        balance."""
        if per_sample:
            return state.sample_uniform_cycle_per_sample(generator, batch_size, shards)
        return state.sample_uniform_cycle(generator)

    def after_alpha_step(self, state: ArchState, step: int) -> List[dict]:
        """The drops made after an α step."""
        return []

    def select(self, state: ArchState, selection: Selection) -> Tuple[List[int], dict]:
        """The final architecture, and what the report should add about how it was found."""
        return state.argmax_arch(), {}


class BetaNAS(Strategy):
    name = "betanas"
    trains_alpha = True
    drops_paths = True

    def after_alpha_step(self, state: ArchState, step: int) -> List[dict]:
        return state.drop_below(self.cfg.drop_threshold, step)


class Proxyless(Strategy):
    name = "proxyless"
    trains_alpha = True

    def sample_phase1(self, state, generator, batch_size, per_sample, shards=1):
        if per_sample:
            return state.sample_from_p_per_sample(generator, batch_size)
        return state.sample_from_p(generator)


def masked_softmax(alpha: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """softmax over each block's remaining entries, 0 on the others (differentiable in alpha)."""
    return torch.softmax(alpha.masked_fill(~remaining, float("-inf")), dim=1)


class MixtureStrategy(Strategy):
    """The DARTS family's common part: α trained through the mixture, no re-centring, no drop; the history adds
    each path's share of the weight steps' mixture weight (Fig. 5's measure) and how many blocks' argmax is the
    identity (the family's collapse into skip connections)."""
    trains_alpha = True
    mixture = True
    recentres = False

    def record(self, state, epoch, space):
        share = state.phase1_weight / state.phase1_weight.sum(1, keepdim=True).clamp_min(1e-12)
        skips = sum(space.candidates[m].is_skip for m in state.argmax_arch())
        return {"phase1_weight_share": [[round(float(v), 6) if ok else None for v, ok in zip(row, rem)]
                                        for row, rem in zip(share.tolist(), state.remaining.tolist())],
                "argmax_skips": int(skips)}


class DARTS(MixtureStrategy):
    """DARTS (Liu et al., ICLR 2019) on this supernet: the mixture with w = softmax(α) in both steps.

    Defaults, from the paper (Sec. A.1.1) and its code (quark0/darts, `train_search.py`, `architect.py`): α by
    Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3 (`--darts-arch-lr`, `--darts-arch-weight-decay`); α
    initialised to 0 here (the code draws 1e-3·N(0, 1): at this scale the softmax is uniform either way). First
    order by default (the paper's DARTS (first order)); `--darts-order 2` takes the α gradient through one unrolled
    step of the weights' optimiser, w' = w − ξ·(its SGD update at the current learning rate ξ, momentum and weight
    decay included), and the second-order term by the paper's finite-difference approximation:
    ∇²_{α,w} L_train · ∇_{w'} L_val ≈ (∇_α L_train(w⁺) − ∇_α L_train(w⁻)) / 2ε, w± = w ± ε·∇_{w'} L_val,
    ε = 0.01 / ‖∇_{w'} L_val‖; the training batch is the iteration's last weight batch. The cost term β·Σ p·cost
    of Eq. 6 is added to the held-out loss (the search's FLOPs or latency cost). No α is re-centred and nothing is
    dropped; the argmax of α is the result."""
    name = "darts"

    def alpha_optimizer(self) -> dict:
        cfg = self.cfg
        return dict(lr=cfg.darts_arch_lr, betas=(0.5, 0.999), eps=1e-8, weight_decay=cfg.darts_arch_weight_decay)

    def mixture_weights(self, state, generator, epoch):
        return masked_softmax(state.alpha, state.remaining)

    @property
    def order(self) -> int:
        return self.cfg.darts_order


class FBNet(MixtureStrategy):
    """FBNet (Wu et al., CVPR 2019) on this supernet: every step samples the mixture's weights by the
    Gumbel-softmax of α, w = softmax((α + g) / τ), g Gumbel noise drawn
    from the search's path generator (identical on every rank), τ = 5·exp(−0.045·epoch) (Sec. 4.1's schedule,
    `--fbnet-temperature`, `--fbnet-temperature-decay`); the weights train on the sampled mixture too, as the
    paper's do. The α step's loss is the paper's CE · a · log(cost)^b, cost the sampled net's expected
    cost Σ w·cost + the fixed part, in MFLOPs or ms (`cost_unit`: a smaller unit where the space's nets cost
    under 10), a = 0.2, b = 0.6 (`--fbnet-a`, `--fbnet-b`); β and the
    target are not used (b is the pressure). α by Adam, lr 0.01, weight decay 5e-4 (Sec. 4.1). Argmax at the
    end (the paper samples six nets from the final distribution and trains them; `--strategy fbnet` returns
    the most likely one)."""
    name = "fbnet"

    def alpha_optimizer(self) -> dict:
        return dict(lr=self.cfg.fbnet_arch_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4)

    def temperature(self, epoch: int) -> float:
        return self.cfg.fbnet_temperature * math.exp(-self.cfg.fbnet_temperature_decay * epoch)

    def record(self, state, epoch, space):
        return dict(super().record(state, epoch, space), temperature=self.temperature(epoch))

    def mixture_weights(self, state, generator, epoch):
        u = torch.rand(state.alpha.shape, generator=generator).clamp_(1e-10, 1 - 1e-10)
        gumbel = -torch.log(-torch.log(u))
        logits = (state.alpha + gumbel) / self.temperature(epoch)
        return masked_softmax(logits, state.remaining)

    def cost_unit(self, cost) -> float:
        """The unit of cost in the loss: the paper's (ms, or MFLOPs) when the space's smallest net costs at least
        10 of them, as the paper's nets do (tens of ms); else the unit in which it costs 10 (log(cost)^b needs
        a cost well above 1: the demo's nets cost under 1 MFLOP)."""
        return min(1.0, cost.floor() / 10)

    def arch_loss(self, ce, weights, cost, beta):
        total = (cost.fixed + (weights * cost.table.to(weights)).sum()) / self.cost_unit(cost)
        return ce * self.cfg.fbnet_a * torch.log(total) ** self.cfg.fbnet_b


class SPOS(Strategy):
    name = "spos"

    def select(self, state, selection):
        cfg = self.cfg
        arch, score, trace = evolution_search(
            state.allowed, selection.score, selection.cost, selection.budget, selection.generator,
            population=cfg.spos_population, generations=cfg.spos_generations, parents=cfg.spos_parents,
            mutation_prob=cfg.spos_mutation_prob,
            progress=lambda g, s: selection.log(f"evolution generation {g}: best held-out acc {s:.4f}"))
        return arch, {"heldout_acc": score, "evolution_trace": trace}


class Random(Strategy):
    name = "random"
    trains_weights = False

    def select(self, state, selection):
        return sample_within_budget(state.allowed, selection.generator, selection.cost, selection.budget), {}


STRATEGIES: Dict[str, type] = {cls.name: cls for cls in (BetaNAS, Proxyless, SPOS, Random, DARTS, FBNet)}


def make_strategy(cfg) -> Strategy:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; expected one of {tuple(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg)
