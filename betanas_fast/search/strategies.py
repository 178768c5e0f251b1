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
- `PDARTS`: DARTS in stages; after each, every block keeps its top-k paths by α and α starts again; dropout on
  the identity path; a cap on the identity blocks of the result.
- `DARTSPlus`: DARTS that stops early, when a stage of the space holds too many identity blocks or every block's
  argmax has held for a number of epochs.
- `GDAS`: one path per block per step, a hard Gumbel-max sample of α, α's gradient straight through the
  sample's weights (a single-path method, not the mixture).
- `ENAS`: an LSTM controller samples one path per block, trained by REINFORCE on the held-out accuracy; the
  result is the best of several of its samples.
- `HMNAS`: DARTS with learned op masks binarised by a threshold (straight-through gradient); the result is each
  block's best path among those its mask keeps.

Every strategy may also say when α trains (`trains_alpha_in`), what happens at an epoch's end (`end_epoch`: P-DARTS's
stages), when the run stops early (`stop_reason`: DARTS+) and how much dropout the identity path gets
(`skip_dropout`); the engine asks, and the run's checkpoint holds what it needs to resume exactly.
"""
from __future__ import annotations

from collections import Counter
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
    space: object = None


class Strategy:
    name = ""
    trains_weights = True   # Phase 1 runs
    trains_alpha = False    # Phase 2 runs after the warm-up
    drops_paths = False     # selective drop after each α step
    mixture = False         # both steps run the weighted mixture of every remaining candidate (DARTS family)
    recentres = True        # each block's remaining α re-centred to mean 0 after an α step (p unchanged)
    order = 1               # the mixture's α gradient: 1, or 2 through one unrolled weight step (DARTS's)
    mask_init: Optional[float] = None  # op-mask scores trained beside α, from this value (HM-NAS's)
    straight_through = False  # α's gradient through a sampled sub-net's straight-through weights (GDAS's)
    policy_gradient = False   # Phase 2 updates a controller by REINFORCE instead of α (ENAS's)

    def __init__(self, cfg):
        self.cfg = cfg

    def trains_alpha_in(self, epoch: int) -> bool:
        """Whether α steps are taken in `epoch` (0-based): after the warm-up."""
        return epoch >= self.cfg.warmup_epochs

    def skip_dropout(self, epoch: int) -> float:
        """The dropout rate on the identity path's output in the mixture during `epoch`."""
        return 0.0

    def end_epoch(self, state: ArchState, epoch: int, step: int) -> List[dict]:
        """What follows the end of `epoch` (the stability counters already updated): the drops made."""
        return []

    def stop_reason(self, state: ArchState, epoch: int, space) -> Optional[str]:
        """Why the search stops at the end of `epoch`, or None to go on."""
        return None

    def build(self, num_blocks: int, num_candidates: int) -> None:
        """What the strategy needs of the space before the run (ENAS builds its controller)."""

    def state_dict(self) -> dict:
        """What the strategy itself holds beyond the α state (ENAS's controller), for the checkpoint."""
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass

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
    """The DARTS family's common part: α trained through the mixture, no re-centring, no drop."""
    trains_alpha = True
    mixture = True
    recentres = False


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
        return masked_softmax(gumbel_logits(state, generator, self.temperature(epoch)), state.remaining)

    def cost_unit(self, cost) -> float:
        """The unit of cost in the loss: the paper's (ms, or MFLOPs) when the space's smallest net costs at least
        10 of them, as the paper's nets do (tens of ms); else the unit in which it costs 10 (log(cost)^b needs
        a cost well above 1: the demo's nets cost under 1 MFLOP)."""
        return min(1.0, cost.floor() / 10)

    def arch_loss(self, ce, weights, cost, beta):
        total = (cost.fixed + (weights * cost.table.to(weights)).sum()) / self.cost_unit(cost)
        return ce * self.cfg.fbnet_a * torch.log(total) ** self.cfg.fbnet_b


def skip_blocks(space, arch: List[int]) -> List[int]:
    """The blocks whose choice in `arch` is the identity path."""
    return [l for l, m in enumerate(arch) if space.candidates[m].is_skip]


def stage_bounds(epochs: int, stages: int) -> List[int]:
    """The first epoch of each of `stages` near-equal stages of `epochs`, and `epochs` last."""
    return [round(s * epochs / stages) for s in range(stages + 1)]


class PDARTS(DARTS):
    """Progressive DARTS (Chen et al., ICCV 2019) on this supernet: DARTS in stages. The run's epochs split into
    len(--pdarts-keep) + 1 near-equal stages; at the end of each stage but the last, every block keeps its top-k
    remaining paths by α (`--pdarts-keep`, default 4 then 2: P-DARTS's 8 → 5 → 3 candidates per edge, about 60 %
    kept each time, mapped to this space's 6-7) and α starts again from 0 with a fresh Adam, as each of P-DARTS's
    stages builds new architecture parameters. P-DARTS also deepens the network each stage (5 → 11 → 17 cells) and
    so rebuilds the weights with a warm-up of 10 weight-only epochs per stage; this supernet's depth is fixed, so
    the weights carry over and only the first stage has the warm-up (--warmup-epochs). Search-space
    regularisation: dropout on the identity path's output in both steps, at rate r_s · (1 − (e + 1)/E_s) in epoch
    e of stage s's E_s epochs (its code's decay), r = 0.1, 0.4, 0.7 (`--pdarts-skip-dropout`, its code's CIFAR-10
    command); and at the end at most `--pdarts-max-skips` identity blocks (2, the paper's M): while there are more,
    the identity block whose identity has the lowest p takes its best other path (its code's
    `delete_min_sk_prob`, one block at a time). α by Adam, lr 6e-4 (`--pdarts-arch-lr`, its code's), betas (0.5,
    0.999), weight decay 1e-3; first order, as its code is."""
    name = "pdarts"
    order = 1

    def alpha_optimizer(self) -> dict:
        return dict(super().alpha_optimizer(), lr=self.cfg.pdarts_arch_lr)

    def bounds(self) -> List[int]:
        return stage_bounds(self.cfg.epochs, len(self.cfg.pdarts_keep) + 1)

    def stage_of(self, epoch: int) -> int:
        bounds = self.bounds()
        return max(s for s in range(len(bounds) - 1) if bounds[s] <= epoch)

    def trains_alpha_in(self, epoch):
        return self.stage_of(epoch) > 0 or epoch >= self.cfg.warmup_epochs

    def skip_dropout(self, epoch):
        s = self.stage_of(epoch)
        start, end = self.bounds()[s:s + 2]
        return self.cfg.pdarts_skip_dropout[s] * (1 - (epoch - start + 1) / (end - start))

    def record(self, state, epoch, space):
        return {"stage": self.stage_of(epoch), "skip_dropout": self.skip_dropout(epoch)}

    def end_epoch(self, state, epoch, step):
        s = self.stage_of(epoch)
        if epoch + 1 != self.bounds()[s + 1] or s == len(self.cfg.pdarts_keep):
            return []
        made = state.keep_top(self.cfg.pdarts_keep[s], step, reason=f"end of stage {s}")
        state.restart_alpha()
        return made

    def select(self, state, selection):
        arch, space = state.argmax_arch(), selection.space
        p, replaced = state.probs(), []
        cap = self.cfg.pdarts_max_skips
        while cap >= 0 and len(skip_blocks(space, arch)) > cap:
            weakest = min(skip_blocks(space, arch), key=lambda l: (float(p[l, arch[l]]), l))
            others = [m for m in state.ranking()[weakest] if not space.candidates[m].is_skip]
            if not others:  # the block kept only its identity path: nothing can replace it
                break
            arch[weakest] = others[0]
            replaced.append(weakest)
        return arch, {"skip_cap": cap, "skip_cap_replaced": replaced}


class DARTSPlus(DARTS):
    """DARTS+ (Liang et al., 2019) on this supernet: DARTS (its defaults, first order) that stops early, checked at
    each epoch's end once α trains. Its two criteria, adapted to one choice per block: (1) a stage of the space (the
    blocks of one width and resolution, the analogue of a cell) whose argmax holds `--dartsplus-max-skips` (2, the
    paper's "two or more skip-connects in one normal cell") identity blocks; (2) every block's argmax unchanged for
    `--dartsplus-stable-epochs` (10, the paper's) epochs (the argmax, not the whole ranking: here the argmax is all
    the result takes). The architecture at the stop is the result; the learning rate keeps its planned schedule."""
    name = "dartsplus"
    order = 1

    def stop_reason(self, state, epoch, space):
        per_stage = Counter(space.blocks[l].stage for l in skip_blocks(space, state.argmax_arch()))
        full = {s: n for s, n in per_stage.items() if n >= self.cfg.dartsplus_max_skips}
        if full:
            stage, n = min(full.items())
            return f"stage {stage} of the space holds {n} identity blocks (--dartsplus-max-skips)"
        stable = int(state.argmax_stable_epochs.min())
        if stable >= self.cfg.dartsplus_stable_epochs:
            return f"every block's argmax unchanged for {stable} epochs (--dartsplus-stable-epochs)"
        return None


def binary_masks(state: ArchState, threshold: float) -> torch.Tensor:
    """HM-NAS's binarised op masks [L, M]: 1 where the mask score is at least `threshold` and the path remains,
    and in each block at least its highest-scored remaining path; the straight-through estimator passes the
    gradient to the scores unchanged (the value stays exactly 0 or 1)."""
    scores = state.mask_scores
    remaining = state.remaining
    on = (scores.detach() >= threshold) & remaining
    best = scores.detach().masked_fill(~remaining, float("-inf")).argmax(1)
    on[torch.arange(on.shape[0]), best] = True
    return on.to(scores.dtype) + (scores - scores.detach())


class HMNAS(DARTS):
    """HM-NAS (Yan et al., ICCV Workshops 2019) on this supernet: DARTS's mixture with every op weight multiplied
    by a learned binary op mask, w = softmax(α) ⊙ b, b = 1[s ≥ θ] of real-valued mask scores s trained with α by
    the straight-through estimator (∂L/∂s = ∂L/∂b). HM-NAS also masks edges, which a chain of blocks does not
    have, and lets a kept edge hold several ops; here a block holds one, so the result is each block's
    largest-α path among those its mask keeps. What the paper leaves open, and how it is fixed here: the masks'
    start and threshold (s = 1e-2, θ = 5e-3: Piggyback's, the binarised-mask method HM-NAS's masks follow;
    `--hmnas-mask-init`, `--hmnas-mask-threshold`); the masks' optimiser (α's Adam, without weight decay on the
    masks, which would pull every score under θ); a block whose masks would all be 0 (its highest-scored path
    stays on, so no block outputs nothing); the weights train on the masked mixture. α as DARTS's (lr 3e-4,
    betas (0.5, 0.999), weight decay 1e-3), first order."""
    name = "hmnas"
    order = 1

    @property
    def mask_init(self) -> float:
        return self.cfg.hmnas_mask_init

    def mixture_weights(self, state, generator, epoch):
        return masked_softmax(state.alpha, state.remaining) * binary_masks(state, self.cfg.hmnas_mask_threshold)

    def masked_on(self, state: ArchState) -> torch.Tensor:
        return binary_masks(state, self.cfg.hmnas_mask_threshold).detach().bool()

    def record(self, state, epoch, space):
        return {"masks_on": [[bool(v) if ok else None for v, ok in zip(row, rem)]
                             for row, rem in zip(self.masked_on(state).tolist(), state.remaining.tolist())]}

    def select(self, state, selection):
        on = self.masked_on(state)
        a = state.alpha.detach().masked_fill(~on, float("-inf"))
        return a.argmax(1).tolist(), {"masks_on": [[selection.space.candidate_names[m] for m in row.nonzero().flatten()
                                                    .tolist()] for row in on]}


def gumbel_logits(state: ArchState, generator: torch.Generator, temperature: float) -> torch.Tensor:
    """(α + g) / τ with g Gumbel noise from `generator` (differentiable in α)."""
    u = torch.rand(state.alpha.shape, generator=generator).clamp_(1e-10, 1 - 1e-10)
    return (state.alpha - torch.log(-torch.log(u))) / temperature


class GDAS(Strategy):
    """GDAS (Dong & Yang, CVPR 2019) on this supernet: each step samples one path per block by the Gumbel-max of
    α, h = one_hot(argmax(α + g)) with the straight-through gradient of softmax((α + g)/τ), in both steps (a
    fresh sample for each). The weights train on the sampled sub-net; α's gradient flows through h on a held-out
    batch, only the sampled candidate running: as in the authors' code (D-X-Y/AutoDL-Projects, `search_cells.py`,
    `forward_gdas`), each block outputs h_k · o_k(x) + Σ_{m≠k} h_m, so an unchosen weight's gradient is the sum of
    the block output's gradient. τ falls linearly from 10 to 0.1 over the epochs (`--gdas-tau-max`,
    `--gdas-tau-min`, its NAS-Bench-201 settings). α by Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3
    (`--gdas-arch-lr`, its settings); the cost term β·Σ h·cost of Eq. 6 is added to the held-out loss. Argmax at
    the end."""
    name = "gdas"
    trains_alpha = True
    recentres = False
    straight_through = True

    def alpha_optimizer(self) -> dict:
        return dict(lr=self.cfg.gdas_arch_lr, betas=(0.5, 0.999), eps=1e-8, weight_decay=1e-3)

    def temperature(self, epoch: int) -> float:
        cfg = self.cfg
        return cfg.gdas_tau_max - (cfg.gdas_tau_max - cfg.gdas_tau_min) * epoch / max(cfg.epochs - 1, 1)

    def record(self, state, epoch, space):
        return {"temperature": self.temperature(epoch)}

    def sample_phase1(self, state, generator, batch_size, per_sample, shards=1):
        arch, _ = self.hard_weights(state, generator, 1.0)
        return arch

    def hard_weights(self, state: ArchState, generator: torch.Generator, temperature: float):
        """(the sampled path of each block, [L, M] straight-through weights: one-hot in value, the gradient of
        softmax((α + g)/τ) over the remaining paths)."""
        soft = masked_softmax(gumbel_logits(state, generator, temperature), state.remaining)
        arch = soft.detach().argmax(1)
        hard = torch.zeros_like(soft).scatter_(1, arch[:, None], 1.0)
        return arch.tolist(), hard - soft.detach() + soft


class ENAS(Strategy):
    """ENAS (Pham et al., ICML 2018) on this supernet: an LSTM controller (search/controller.py: 64 units, logits
    1.5·tanh, the chosen path's embedding fed to the next block) samples one path per block. The weights train on
    its samples (Phase 1); each α step samples an architecture, scores it on the held-out batch with the shared
    weights (BatchNorm on batch statistics, its running ones untouched), and REINFORCE updates the controller with
    the reward acc − β·cost (the FLOPs or latency of Eq. 6; β = 0 gives the paper's reward), a moving-average
    baseline (decay 0.99) and an entropy bonus of weight 1e-4 added to the reward, by Adam at lr 1e-3: the
    reference code's defaults (melodyguan/enas, `--controller_lr 0.001`, `--controller_entropy_weight 0.0001`,
    `--controller_bl_dec 0.99`, `--controller_lstm_size 64`, `--controller_tanh_constant 1.5`;
    `--enas-controller-lr`, `--enas-entropy-weight`, `--enas-baseline-decay`). The reference aggregates 20 samples
    per controller step and runs its steps between epochs; here one sample per α step, interleaved with the weight
    steps as every strategy's are. The result: `--enas-derive-samples` architectures sampled from the trained
    controller, each scored on the held-out split (BatchNorm recalibrated), the best kept, as ENAS derives. α is
    not trained: it holds, for the logs, the controller's logits along its most likely architecture."""
    name = "enas"
    trains_alpha = True
    recentres = False
    policy_gradient = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.policy = None  # built with the space (`build`)
        self.last: Optional[dict] = None  # the last controller update, for the history

    def build(self, num_blocks: int, num_candidates: int) -> None:
        from .controller import Controller, Reinforce
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 8)
            controller = Controller(num_blocks, num_candidates)
        self.policy = Reinforce(controller, lr=cfg.enas_controller_lr, entropy_weight=cfg.enas_entropy_weight,
                                baseline_decay=cfg.enas_baseline_decay)

    def sample_phase1(self, state, generator, batch_size, per_sample, shards=1):
        with torch.no_grad():
            return self.policy.controller(state.remaining, generator)[0]

    def sample(self, state: ArchState, generator: torch.Generator):
        """(architecture, log-probability, entropy) of one controller sample, in the autograd graph."""
        arch, log_prob, entropy, _ = self.policy.controller(state.remaining, generator)
        return arch, log_prob, entropy

    def reinforce(self, state: ArchState, log_prob, entropy, reward: float) -> dict:
        """The controller's update from `reward`; α then shows its logits along its most likely architecture."""
        record = self.policy.step(log_prob, entropy, reward)
        with torch.no_grad():
            _, _, _, logits = self.policy.controller(state.remaining, greedy=True)
            state.alpha.copy_(logits.masked_fill(~state.remaining, 0.0))
        self.last = record
        return record

    def record(self, state, epoch, space):
        return {"controller": self.last}

    def select(self, state, selection):
        seen, scored = set(), []
        with torch.no_grad():
            for _ in range(self.cfg.enas_derive_samples):
                arch = self.policy.controller(state.remaining, selection.generator)[0]
                if tuple(arch) not in seen:
                    seen.add(tuple(arch))
                    scored.append((selection.score(arch), arch))
        best_score, best = max(scored, key=lambda t: t[0])
        selection.log(f"enas: {len(scored)} distinct architectures sampled from the controller, best held-out acc "
                      f"{best_score:.4f}")
        return best, {"heldout_acc": best_score, "derived_from": [{"arch": a, "heldout_acc": sc} for sc, a in scored]}

    def state_dict(self):
        return {"policy": self.policy.state_dict(), "last": self.last}

    def load_state_dict(self, d):
        self.policy.load_state_dict(d["policy"])
        self.last = d["last"]


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


STRATEGIES: Dict[str, type] = {cls.name: cls for cls in (BetaNAS, Proxyless, SPOS, Random, DARTS, FBNet, PDARTS,
                                                         DARTSPlus, HMNAS, GDAS, ENAS)}


def make_strategy(cfg) -> Strategy:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; expected one of {tuple(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg)
