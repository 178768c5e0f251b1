"""The supernet (every candidate of every choice block) and the searched fixed `Net`, both built from
a `SearchSpace`."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..space import SearchSpace
from .per_sample import choice_block_per_sample
from .mbconv import MBConv


def _conv_bn_act(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


def build_candidate(space: SearchSpace, block: int, choice: int) -> nn.Module:
    spec, cand = space.blocks[block], space.candidates[choice]
    if not spec.allowed[choice]:
        raise ValueError(f"block {block}: candidate {cand.name!r} is not allowed "
                         f"({spec.in_channels}->{spec.out_channels}, stride {spec.stride})")
    if cand.is_skip:
        return nn.Identity()
    return MBConv(spec.in_channels, spec.out_channels, cand.kernel_size, spec.stride, cand.expand_ratio)


class ChoiceBlock(nn.Module):
    """Holds every allowed candidate of one block; `forward(x, choice)` runs only the chosen one, so
    only its parameters take part in autograd."""

    def __init__(self, space: SearchSpace, block: int):
        super().__init__()
        self.block = block
        self.names = space.candidate_names
        self.candidates = nn.ModuleDict({self.names[m]: build_candidate(space, block, m)
                                         for m, ok in enumerate(space.blocks[block].allowed) if ok})

    def path(self, choice: int) -> nn.Module:
        return self.candidates[self.names[choice]]

    def forward(self, x: torch.Tensor, choice: int) -> torch.Tensor:
        return self.path(choice)(x)

    def forward_per_sample(self, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        """Sample i through candidate `paths[i]` (LongTensor [N]); each candidate sees only its samples."""
        return choice_block_per_sample(self.candidates, self.names, x, paths)

    @torch.no_grad()
    def gate_grads(self, x: torch.Tensor, grad_out: torch.Tensor, choices: Sequence[int]) -> Dict[int, float]:
        """dL/dg_m = sum(o_m(x) * grad_out) for every m in `choices`: BatchNorm on batch statistics (the
        modules must be in training mode with running statistics frozen), no autograd graph. The MBConv
        candidates go through one betanas::block_gate_grads call, the identity is sum(x * grad_out),
        anything else (an MBConv without expand stage) runs eagerly."""
        is_identity = {m: isinstance(self.path(m), nn.Identity) for m in choices}
        fused = [m for m in choices if isinstance(self.path(m), MBConv) and self.path(m).has_expand]
        eager = [m for m in choices if m not in fused and not is_identity[m]]
        result: Dict[int, float] = {}
        if fused or any(is_identity.values()):
            mods = [self.path(m) for m in fused]
            params = [list(p) for p in zip(*(mod.gate_grad_params() for mod in mods))] or [[]] * 9
            first = mods[0] if mods else None  # the candidates of a block share stride, residual, act, eps
            vals = ops.block_gate_grads(
                x, grad_out, *params, stride=first.stride if first else 1, residual=bool(first and first.has_skip),
                act=first.depthwise.act if first else "relu6", eps=first.depthwise.bn.eps if first else 1e-5).tolist()
            result.update(zip(fused, vals))
            result.update({m: vals[-1] for m in choices if is_identity[m]})
        for m in eager:
            result[m] = float((self.path(m)(x).float() * grad_out.float()).sum())
        return result


class _Body(nn.Module):
    """Stem, fixed first block and head shared by the supernet and the searched net."""

    def _build_fixed(self, space: SearchSpace) -> None:
        cfg = space.config
        self.stem = _conv_bn_act(cfg.in_channels, space.stem_channels, 3, cfg.stem_stride)
        self.first = MBConv(space.stem_channels, space.first_block_channels, 3, 1, 1)
        self.head = _conv_bn_act(space.last_channels, space.head_channels, 1, 1)
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
        x = self.first(self.stem(x))
        for block, block_paths in zip(self.blocks, paths):
            x = block.forward_per_sample(x, block_paths)
        return self._head(x)

    def forward_with_blocks(self, x: torch.Tensor, arch: Sequence[int]
                            ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """Logits plus each choice block's input (detached) and output (in the graph), for the
        binary-gate gradient."""
        x = self.first(self.stem(x))
        inputs, outputs = [], []
        for block, choice in zip(self.blocks, arch):
            inputs.append(x.detach())
            x = block(x, choice)
            outputs.append(x)
        return self._head(x), inputs, outputs

    def gate_grad_table(self, x: torch.Tensor, y: torch.Tensor, arch: Sequence[int], remaining: torch.Tensor,
                        autocast: Optional[torch.autocast] = None, timer=None) -> Tuple[torch.Tensor, float, float]:
        """The binary-gate gradient of Phase 2 for every remaining path: an L x M float32 table with
        dL/dg_lm = Σ o_lm(x_l) ⊙ dL/dO_l (0 elsewhere), plus the loss and accuracy of `arch` on (x, y).

        The sampled path `arch` runs with autograd; every other remaining candidate of block l is
        evaluated on the same block input x_l by one all-candidate op, without graphs and without keeping
        its output. The weights get no gradient, and BatchNorm normalises with batch statistics without
        touching the running ones (held-out data must not leak into the weights' state). Under an fp16
        `autocast` the loss is scaled so that small gradients survive. `timer` (search.timing) times the two
        parts: the sampled path, and the other candidates."""
        autocast = autocast or contextlib.nullcontext()
        part = timer.part if timer is not None else (lambda name: contextlib.nullcontext())
        scale = 1024.0 if getattr(autocast, "fast_dtype", None) == torch.float16 else 1.0
        was_training = self.training
        self.train()
        set_bn_batch_stats_frozen(self, True)
        try:
            table = torch.zeros(remaining.shape, dtype=torch.float32)
            with part("phase2/sampled path"):
                with autocast:
                    logits, inputs, outputs = self.forward_with_blocks(x, arch)
                loss = F.cross_entropy(logits.float(), y)
                out_grads = torch.autograd.grad(loss * scale, outputs)
                with torch.no_grad():
                    for l in range(len(self.blocks)):
                        table[l, arch[l]] = float((outputs[l].float() * out_grads[l].float()).sum()) / scale
            with part("phase2/other candidates"), torch.no_grad(), autocast:
                for l, block in enumerate(self.blocks):
                    others = [m for m in remaining[l].nonzero().flatten().tolist() if m != arch[l]]
                    for m, value in block.gate_grads(inputs[l], out_grads[l], others).items():
                        table[l, m] = value / scale
        finally:
            set_bn_batch_stats_frozen(self, False)
            self.train(was_training)
        return table, float(loss.detach()), float((logits.argmax(1) == y).float().mean())

    def path_parameters(self, block: int, choice: int) -> List[nn.Parameter]:
        return list(self.blocks[block].path(choice).parameters())


class Net(_Body):
    """The searched network: one fixed candidate per block."""

    def __init__(self, space: SearchSpace, arch: Sequence[int]):
        super().__init__()
        space.check_arch(arch)
        self.space, self.arch = space, list(arch)
        self._build_fixed(space)
        self.blocks = nn.Sequential(*(build_candidate(space, i, m) for i, m in enumerate(arch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.blocks(self.first(self.stem(x))))

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


def set_bn_batch_stats_frozen(model: nn.Module, frozen: bool) -> None:
    """frozen=True: BatchNorm normalises with batch statistics but leaves the running ones untouched
    (Phase 2 must not leak held-out data into the weights' state)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = not frozen
