"""The supernet (every candidate of every choice block) and the searched fixed `Net`, both built from
a `SearchSpace`."""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import ops
from .._rules import conv_out_size, stats_dtype
from ..runs.timing import OTHER_CANDIDATES, SAMPLED_PATH
from ..space import SearchSpace
from .per_sample import Routes, choice_block_per_sample, per_sample_routes
from .mbconv import MBConv, canonical_act, make_act


def _conv_bn_act(cin: int, cout: int, k: int, stride: int, act: str = "relu6") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), make_act(act))


def build_candidate(space: SearchSpace, block: int, choice: int, se_ratio: float = 0.0,
                    act: str = "relu6") -> nn.Module:
    """Candidate `choice` of choice block `block`: nn.Identity for `skip`, else an MBConv with activation
    `act` and, with se_ratio > 0, a squeeze-excitation (MBConv, se_channels). The defaults build the
    supernet's candidates."""
    spec, cand = space.blocks[block], space.candidates[choice]
    if not spec.allowed[choice]:
        raise ValueError(f"block {block}: candidate {cand.name!r} is not allowed "
                         f"({spec.in_channels}->{spec.out_channels}, stride {spec.stride})")
    if cand.is_skip:
        return nn.Identity()
    return MBConv(spec.in_channels, spec.out_channels, cand.kernel_size, spec.stride, cand.expand_ratio, act=act,
                  se_ratio=se_ratio)


def gate_grad_bytes(x: torch.Tensor, candidate: nn.Module) -> int:
    """The memory (bytes) that betanas::block_gate_grads allocates for `candidate` on block input x, from
    what both kernels allocate per MBConv candidate, in x's dtype:
      expanded activations h  N x Ce x H x W    (written by the expand GEMM; BN and act applied as it is read)
      depthwise output y      N x Ce x Ho x Wo
      projection z            N x Cout x Ho x Wo (reduced against dL/dO without writing BN(z))
    plus its parameters and folded BN coefficients in the statistics dtype and the reductions' float64
    partial sums, a few numbers per channel. The CUDA kernel holds every candidate of a call at once (h
    and y, then y and z), so the sum over a call's candidates bounds its peak. (The CPU kernel holds less,
    whatever the split: one candidate's y at a time, h and z only in chunks of 2 MiB.) The per-call copies
    (x and dL/dO in the kernel's layout, ops.block_gate_grads_layout) do not depend on how the candidates are split
    and are not counted. 0 for the identity (sum(x * dL/dO) allocates no activation); an MBConv without expand stage
    (run eagerly) counts y and z only."""
    if isinstance(candidate, nn.Identity):
        return 0
    if not isinstance(candidate, MBConv):
        raise TypeError(f"no gate-gradient memory estimate for {type(candidate).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    mid, cout, k = candidate.depthwise.conv.in_channels, candidate.out_channels, candidate.kernel_size
    plane_in, plane_out = h * w, conv_out_size(h, candidate.stride) * conv_out_size(w, candidate.stride)
    activations = n * ((mid * plane_in if candidate.has_expand else 0) + mid * plane_out + cout * plane_out)
    stats_size = torch.empty((), dtype=stats_dtype(x)).element_size()
    params = mid * (k * k + 6) + 2 * cout  # taps, 4 BN vectors and the folded a, b of the Ce channels; Cout BN
    partials = 2 * mid + 5 * cout  # float64 sums: 2 per expanded channel, 4 + 1 per output channel
    return int(activations * x.element_size() + params * stats_size + partials * 8)


@contextlib.contextmanager
def _bn_stats_kept(module: nn.Module):
    """`module`'s BatchNorm running statistics as they were before the block (the block runs exactly as the
    forward did, saving the same tensors, and what it adds to the statistics is taken back)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, n) in zip(bns, kept):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def saved_activation_bytes(run, params: Sequence[torch.Tensor]) -> int:
    """The bytes autograd keeps for the backward pass of `run()` (a forward that builds a graph): the distinct
    storages of the tensors it saves, parameters not counted."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


class ChoiceBlock(nn.Module):
    """Holds every allowed candidate of one block; `forward(x, choice)` runs only the chosen one, so
    only its parameters take part in autograd."""

    def __init__(self, space: SearchSpace, block: int):
        super().__init__()
        self.block = block
        self.names = space.candidate_names
        self.candidates = nn.ModuleDict({self.names[m]: build_candidate(space, block, m)
                                         for m, ok in enumerate(space.blocks[block].allowed) if ok})
        self._warned_over_budget: set = set()  # candidates already reported as over the memory budget

    def path(self, choice: int) -> nn.Module:
        return self.candidates[self.names[choice]]

    def forward(self, x: torch.Tensor, choice: int) -> torch.Tensor:
        return self.path(choice)(x)

    def forward_mixture(self, x: torch.Tensor, weights: torch.Tensor, paths: Sequence[int],
                        recompute: bool = False, skip_dropout: float = 0.0) -> torch.Tensor:
        """The DARTS family's block: Σ_m weights[m] · o_m(x) over `paths` (its remaining candidates), every
        candidate in the autograd graph. With `recompute`, a candidate's activations are not kept for the
        backward pass but recomputed there (torch.utils.checkpoint): the block then holds one candidate's at a
        time instead of all of them. `skip_dropout`: dropout at that rate on the identity path's output in
        training mode (P-DARTS's regularisation of skip connections)."""
        out = None
        for m in paths:
            op = self.path(m)
            if recompute and not isinstance(op, nn.Identity):
                # the recomputation must not update BatchNorm's running statistics a second time
                y = torch.utils.checkpoint.checkpoint(
                    op, x, use_reentrant=False,
                    context_fn=lambda op=op: (contextlib.nullcontext(), _bn_stats_kept(op)))
            else:
                y = op(x)
            if skip_dropout > 0 and isinstance(op, nn.Identity):
                y = F.dropout(y, skip_dropout, self.training)
            term = weights[m] * y
            out = term if out is None else out + term
        return out

    def forward_hard(self, x: torch.Tensor, choice: int, weights: torch.Tensor) -> torch.Tensor:
        """GDAS's block: weights[choice] · o_choice(x) plus every other weight as a scalar. Only the chosen candidate
        runs; with straight-through one-hot weights the value is o_choice(x), and each other weight's gradient is
        the sum of the output's (GDAS's code adds the unchosen weights so)."""
        return weights[choice] * self.path(choice)(x) + (weights.sum() - weights[choice])

    def forward_per_sample(self, x: torch.Tensor, paths: torch.Tensor, routes: Optional[Routes] = None) -> torch.Tensor:
        """Sample i through candidate `paths[i]` (LongTensor [N]); each candidate sees only its samples. `routes`:
        the whole net's (per_sample_routes), of which this block's row is used."""
        return choice_block_per_sample(self.candidates, self.names, x, paths, routes, self.block)

    def gate_grad_chunks(self, x: torch.Tensor, choices: Sequence[int],
                         memory_budget: Optional[int] = None) -> List[List[int]]:
        """`choices` in consecutive runs whose summed gate_grad_bytes on input x stays within
        `memory_budget` bytes (None: one run of all); a candidate over the budget on its own runs alone,
        and is reported once per block and candidate with a warning."""
        choices = list(choices)
        if memory_budget is None:
            return [choices] if choices else []
        if memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes or None, got {memory_budget}")
        chunks: List[List[int]] = []
        used = 0
        for m in choices:
            need = gate_grad_bytes(x, self.path(m))
            if need > memory_budget and m not in self._warned_over_budget:
                self._warned_over_budget.add(m)
                warnings.warn(f"block {self.block}: the gate gradient of candidate {self.names[m]!r} needs about "
                              f"{need} bytes ({need / 2**20:.1f} MiB), more than the memory budget of "
                              f"{memory_budget} bytes; it runs alone", stacklevel=2)
            if not chunks or used + need > memory_budget:
                chunks.append([m])
                used = need
            else:
                chunks[-1].append(m)
                used += need
        return chunks

    @torch.no_grad()
    def gate_grads(self, x: torch.Tensor, grad_out: torch.Tensor, choices: Sequence[int],
                   memory_budget: Optional[int] = None) -> Dict[int, float]:
        """gate_grad_values as Python floats (one device-to-host copy)."""
        values = self.gate_grad_values(x, grad_out, choices, memory_budget)
        if not values:
            return {}
        return dict(zip(values, _stack_scalars(list(values.values())).tolist()))

    def gate_grad_values(self, x: torch.Tensor, grad_out: torch.Tensor, choices: Sequence[int],
                         memory_budget: Optional[int] = None) -> Dict[int, torch.Tensor]:
        """dL/dg_m = sum(o_m(x) * grad_out) for every m in `choices`: BatchNorm on batch statistics (the
        modules must be in training mode with running statistics frozen), no autograd graph. The MBConv
        candidates go through betanas::block_gate_grads, one call per run of gate_grad_chunks (one call
        for all of them without `memory_budget`, in bytes); the identity is sum(x * grad_out), which
        every call returns; anything else (an MBConv without expand stage) runs eagerly. The values are 0-d tensors on
        x's device, so that no call waits for the device (Supernet.gate_grad_table reads them all at once). A
        candidate's value
        depends only on its own parameters, x and dL/dO, so on the CPU the split changes no bit (on CUDA the
        reductions are partitioned by the call's channel count: rounding may differ). The budget bounds
        what the CUDA kernel holds at once; the CPU kernel holds one candidate at a time whatever the split."""
        is_identity = {m: isinstance(self.path(m), nn.Identity) for m in choices}
        fused = [m for m in choices if isinstance(self.path(m), MBConv) and self.path(m).has_expand]
        eager = [m for m in choices if m not in fused and not is_identity[m]]
        result: Dict[int, torch.Tensor] = {}
        if fused or any(is_identity.values()):
            chunks = self.gate_grad_chunks(x, fused, memory_budget) or [[]]
            # copied into the layout the kernel reads once rather than in every call
            layout = ops.block_gate_grads_layout(x.device)
            xc, gc = ((x.contiguous(memory_format=layout), grad_out.contiguous(memory_format=layout))
                      if len(chunks) > 1 else (x, grad_out))
            for chunk in chunks:
                vals = self._block_gate_grads(xc, gc, chunk)
                result.update(zip(chunk, vals))
            result.update({m: vals[-1] for m in choices if is_identity[m]})
        for m in eager:
            result[m] = (self.path(m)(x).float() * grad_out.float()).sum()
        return result

    def _block_gate_grads(self, x: torch.Tensor, grad_out: torch.Tensor, fused: Sequence[int]) -> torch.Tensor:
        """One betanas::block_gate_grads call: the values of the `fused` candidates, then the identity's."""
        mods = [self.path(m) for m in fused]
        params = [list(p) for p in zip(*(mod.gate_grad_params() for mod in mods))] or [[]] * 9
        first = mods[0] if mods else None  # the candidates of a block share stride, residual, act, eps
        return ops.block_gate_grads(
            x, grad_out, *params, stride=first.stride if first else 1, residual=bool(first and first.has_skip),
            act=first.depthwise.act if first else "relu6", eps=first.depthwise.bn.eps if first else 1e-5)


def _stack_scalars(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d tensors of one device as one vector in their widest dtype (no copy to the host)."""
    dtype = values[0].dtype
    for v in values[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    return torch.stack([v.to(dtype) for v in values])


# Phase 2 under an fp16 autocast scales the loss dynamically (as torch.amp.GradScaler does the weights' loss): it
# starts at FP16_SCALE_INIT, halves and recomputes the table when a value is not finite, and doubles after
# FP16_SCALE_GROWTH_STEPS finite tables.
FP16_SCALE_INIT, FP16_SCALE_MIN, FP16_SCALE_GROWTH_STEPS = 2.0 ** 16, 1.0, 200


class _Body(nn.Module):
    """Stem, fixed first block and head shared by the supernet and the searched net. The defaults (ReLU6,
    no squeeze-excitation) are the supernet's."""

    def _build_fixed(self, space: SearchSpace, act: str = "relu6", se_ratio: float = 0.0) -> None:
        cfg = space.config
        self.stem = _conv_bn_act(cfg.in_channels, space.stem_channels, 3, cfg.stem_stride, act)
        self.first = MBConv(space.stem_channels, space.first_block_channels, 3, 1, 1, act=act, se_ratio=se_ratio)
        self.head = _conv_bn_act(space.last_channels, space.head_channels, 1, 1, act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(space.head_channels, cfg.num_classes)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


class Supernet(_Body):
    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self._build_fixed(space)
        self.blocks = nn.ModuleList(ChoiceBlock(space, i) for i in range(space.num_blocks))
        # Phase 2's loss scale under fp16 autocast and the finite tables since it last changed (gate_grad_table)
        self._phase2_fp16_scale, self._phase2_fp16_finite = FP16_SCALE_INIT, 0

    def forward(self, x: torch.Tensor, arch: Sequence[int]) -> torch.Tensor:
        x = self.first(self.stem(x))
        for block, choice in zip(self.blocks, arch):
            x = block(x, choice)
        return self._head(x)

    def forward_per_sample(self, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        """Each sample its own path: `paths` is a LongTensor [L, N], sample i takes paths[l, i] in block l."""
        if tuple(paths.shape) != (len(self.blocks), x.shape[0]):
            raise ValueError(f"paths must be [blocks, batch] = [{len(self.blocks)}, {x.shape[0]}], "
                             f"got {list(paths.shape)}")
        routes = per_sample_routes(paths, self.space.num_candidates, x.device)  # one host-to-device copy per step
        x = self.first(self.stem(x))
        for block, block_paths in zip(self.blocks, paths):
            x = block.forward_per_sample(x, block_paths, routes)
        return self._head(x)

    def forward_mixture(self, x: torch.Tensor, weights: torch.Tensor, remaining: torch.Tensor,
                        recompute: bool = False, skip_dropout: float = 0.0) -> torch.Tensor:
        """Every choice block as the weighted mixture of its remaining candidates (`weights`, `remaining`:
        [L, M]; ChoiceBlock.forward_mixture)."""
        x = self.first(self.stem(x))
        for l, block in enumerate(self.blocks):
            x = block.forward_mixture(x, weights[l], remaining[l].nonzero().flatten().tolist(), recompute,
                                      skip_dropout)
        return self._head(x)

    def forward_hard(self, x: torch.Tensor, arch: Sequence[int], weights: torch.Tensor) -> torch.Tensor:
        """The sub-net `arch` with each block scaled by its straight-through weights ([L, M];
        ChoiceBlock.forward_hard): GDAS's forward."""
        x = self.first(self.stem(x))
        for l, (block, choice) in enumerate(zip(self.blocks, arch)):
            x = block.forward_hard(x, choice, weights[l])
        return self._head(x)

    def forward_with_blocks(self, x: torch.Tensor, arch: Sequence[int]
                            ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """Logits plus each choice block's input (detached) and output (in the graph), for the
        binary-gate gradient. With grad enabled, the first choice block's input requires grad, so that every
        output is in the graph even with the weights frozen."""
        x = self.first(self.stem(x))
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()
        inputs, outputs = [], []
        for block, choice in zip(self.blocks, arch):
            inputs.append(x.detach())
            x = block(x, choice)
            outputs.append(x)
        return self._head(x), inputs, outputs

    def gate_grad_table(self, x: torch.Tensor, y: torch.Tensor, arch: Sequence[int], remaining: torch.Tensor,
                        autocast: Optional[torch.autocast] = None, timer=None,
                        memory_budget: Optional[int] = None) -> Tuple[torch.Tensor, float, float]:
        """The binary-gate gradient of Phase 2 for every remaining path: an L x M float32 table (on the CPU) with
        dL/dg_lm = Σ o_lm(x_l) ⊙ dL/dO_l (0 elsewhere), plus the loss and accuracy of `arch` on (x, y).

        The sampled path `arch` runs with autograd; every other remaining candidate of block l is
        evaluated on the same block input x_l by the all-candidate op, without graphs and without keeping
        its output; `memory_budget` (bytes, None: unlimited) splits a block's candidates over several calls
        of it so that each call's extra memory stays within the budget (ChoiceBlock.gate_grads,
        ops.default_phase2_budget). The weights get no gradient, and BatchNorm normalises with batch
        statistics without touching the running ones (held-out data must not leak into the weights'
        state); they are frozen (requires_grad off) for the sampled path, so that no kernel computes a weight
        gradient. Every float32 convolution and matmul of the table runs in IEEE float32 (no TF32 on CUDA: the
        sampled path's cuDNN convolutions and the other candidates' cuBLAS GEMMs round alike). The values stay on the
        device until the end: one copy to the host per call. Under an fp16 `autocast` the loss is scaled
        dynamically (FP16_SCALE_INIT): a table with a value that is not finite is recomputed at half the scale,
        and a ValueError says so when even FP16_SCALE_MIN overflows. `timer` (runs.timing) times the two parts:
        the sampled path, and the other candidates."""
        fp16 = getattr(autocast, "fast_dtype", None) == torch.float16
        others = [[m for m in remaining[l].nonzero().flatten().tolist() if m != arch[l]] for l in range(len(arch))]
        while True:
            scale = self._phase2_fp16_scale if fp16 else 1.0
            packed = self._gate_grad_values(x, y, arch, others, autocast, timer, memory_budget, scale)
            if not fp16:
                break
            if bool(torch.isfinite(packed).all()):
                self._phase2_fp16_finite += 1
                if self._phase2_fp16_finite >= FP16_SCALE_GROWTH_STEPS:
                    self._phase2_fp16_scale, self._phase2_fp16_finite = scale * 2, 0
                break
            if scale <= FP16_SCALE_MIN:
                raise ValueError(f"Phase 2 under fp16 autocast: the gate gradients are not finite even at loss scale "
                                 f"{scale:g}; run Phase 2 in float32 (without --phase2-amp) or with bf16")
            self._phase2_fp16_scale, self._phase2_fp16_finite = scale / 2, 0
        # the entries in _gate_grad_values' order
        rows, cols = zip(*enumerate(arch), *[(l, m) for l, ms in enumerate(others) for m in ms])
        table = torch.zeros(remaining.shape, dtype=torch.float64)
        table[list(rows), list(cols)] = packed[:-2] / scale
        loss, acc = packed[-2:].tolist()
        return table.float(), loss, acc

    def _gate_grad_values(self, x, y, arch, others, autocast, timer, memory_budget, scale) -> torch.Tensor:
        """gate_grad_table's values at loss scale `scale`: the sampled path of every block, then block by block its
        `others` (the other remaining candidates), then the loss and the accuracy; one float64 vector, on the CPU."""
        autocast = autocast or contextlib.nullcontext()
        part = timer.part if timer is not None else (lambda name: contextlib.nullcontext())
        was_training = self.training
        self.train()
        set_bn_batch_stats_frozen(self, True)
        trainable = [p for p in self.parameters() if p.requires_grad]
        try:
            for p in trainable:
                p.requires_grad_(False)
            with ops.ieee_fp32():
                with part(SAMPLED_PATH):
                    with autocast:
                        logits, inputs, outputs = self.forward_with_blocks(x, arch)
                    loss = F.cross_entropy(logits.float(), y)
                    out_grads = torch.autograd.grad(loss * scale, outputs)
                    with torch.no_grad():
                        values = [(outputs[l].float() * out_grads[l].float()).sum() for l in range(len(self.blocks))]
                with part(OTHER_CANDIDATES), torch.no_grad(), autocast:
                    for block, inp, out_grad, ms in zip(self.blocks, inputs, out_grads, others):
                        block_values = block.gate_grad_values(inp, out_grad, ms, memory_budget)
                        values += [block_values[m] for m in ms]
                with torch.no_grad():
                    values += [loss.detach(), (logits.argmax(1) == y).float().mean()]
                    return _stack_scalars(values).double().cpu()
        finally:
            for p in trainable:
                p.requires_grad_(True)
            set_bn_batch_stats_frozen(self, False)
            self.train(was_training)

    def path_parameters(self, block: int, choice: int) -> List[nn.Parameter]:
        return list(self.blocks[block].path(choice).parameters())


class Net(_Body):
    """The searched network: one fixed candidate per block.

    `act` ("relu6", the search space's, or "silu", alias "swish") is the activation of the whole network:
    stem, first block, every MBConv's expand and depthwise stages (and its squeeze-excitation), head.
    `se_ratio` > 0 adds a squeeze-excitation to every MBConv of the net, the fixed first block included,
    after its depthwise stage as in timm's InvertedResidual. The ratio is relative to the block's INPUT
    channels, as the `se` of a timm block string is for timm's EfficientNet builder: a block with input
    width C_in and expansion e keeps round(round(C_in * e) * se_ratio / e) ~ round(C_in * se_ratio) reduced
    channels (betanas_fast.nn.mbconv.se_channels); so `se_ratio=0.0625` is timm's `_se0.0625`. The width
    multiplier is the space's (`SpaceConfig.width_mult`). The defaults are the supernet's own sub-network
    (Net.from_supernet)."""

    def __init__(self, space: SearchSpace, arch: Sequence[int], se_ratio: float = 0.0, act: str = "relu6"):
        super().__init__()
        space.check_arch(arch)
        act = canonical_act(act)
        if se_ratio < 0:
            raise ValueError(f"se_ratio must be >= 0, got {se_ratio}")
        self.space, self.arch = space, list(arch)
        self.se_ratio, self.act = float(se_ratio), act
        self._build_fixed(space, act=act, se_ratio=se_ratio)
        self.blocks = nn.Sequential(*(build_candidate(space, i, m, se_ratio=se_ratio, act=act)
                                      for i, m in enumerate(arch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.blocks(self.first(self.stem(x))))

    @property
    def net_config(self) -> dict:
        """The constructor options beyond space and arch, as a retrained checkpoint's "net" entry stores them."""
        return {"se_ratio": self.se_ratio, "act": self.act}

    @classmethod
    def from_supernet(cls, supernet: Supernet, arch: Sequence[int]) -> "Net":
        """The sub-net with its weights inherited from the supernet."""
        net = cls(supernet.space, arch)
        sd = {}
        for k, v in supernet.state_dict().items():
            if k.startswith("blocks."):
                _, i, _, name, rest = k.split(".", 4)
                if supernet.space.candidate_names[arch[int(i)]] != name:
                    continue
                k = f"blocks.{i}.{rest}"
            sd[k] = v
        net.load_state_dict(sd)
        return net


@contextlib.contextmanager
def held_out_mode(model: nn.Module):
    """Training mode with BatchNorm on batch statistics and its running ones untouched, for a step on held-out
    data (an α step must not leak held-out data into the weights' state)."""
    model.train()
    set_bn_batch_stats_frozen(model, True)
    try:
        yield
    finally:
        set_bn_batch_stats_frozen(model, False)


def set_bn_batch_stats_frozen(model: nn.Module, frozen: bool) -> None:
    """frozen=True: BatchNorm normalises with batch statistics but leaves the running ones untouched
    (Phase 2 must not leak held-out data into the weights' state)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = not frozen
