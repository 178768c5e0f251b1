"""A float64 oracle of Phase 2, and the measurement that compares the engine's α gradient against it.

`GatedSupernet` is the supernet written again from plain torch functional ops (F.conv2d, F.batch_norm on
batch statistics, F.relu6, F.linear), in float64 unless told otherwise, with the engine's weights copied in by
state_dict key; it uses no op of betanas_fast. Every choice block outputs Σ_m g_m · o_m(x) over its remaining
candidates, with explicit gates g (one tensor [L, M]); at the one-hot gates of a sampled architecture that is
the sampled sub-net, and autograd on g gives dL/dg_m = Σ o_m(x) ⊙ dL/dO for every remaining candidate at
once, the binary-gate gradient of Phase 2. `eq4_float64` then writes Eq. 4 out in float64.

`measure_phase2_precision` is the measurement shared by tests/test_precision.py and
benchmarks/precision.py: briefly trained demo weights (bf16 autocast, as `--amp` trains them), random α,
then over held-out batches the sign agreement of the engine's Phase-2 α gradient (fp32, as the run computes
it) and of a bf16 Phase 2 with the oracle's, on the entries whose magnitude is above 1 % of the largest.
"""
from __future__ import annotations

import copy
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which every BatchNorm of the supernet keeps

# The nine tensors of an MBConv candidate under its state_dict prefix (expand stage optional).
_EXPAND = ("expand.0.weight", "expand.1.weight", "expand.1.bias")
_DEPTHWISE = ("depthwise.conv.weight", "depthwise.bn.weight", "depthwise.bn.bias")
_PROJECT = ("project.0.weight", "project.1.weight", "project.1.bias")
# Buffers the oracle must not read: Phase 2 normalises with batch statistics.
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _bn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """BatchNorm on the batch's own statistics (biased variance), no running statistics."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=BN_EPS)


class GatedSupernet:
    """The supernet from torch ops only, computing in `dtype` (float64: the oracle).

    `state_dict`: the engine supernet's (keys `stem.*`, `first.*`, `blocks.<l>.candidates.<name>.*`, `head.*`,
    `classifier.*`). `stem_stride` and `block_strides` (one per choice block) are the strides the parameters
    do not show; `block_candidates[l]` lists (column m, name) of block l's candidates. A candidate without
    parameters in `state_dict` is the identity. Every parameter must be used: a key left over is an error, so
    the mapping cannot silently drop a part of the network. The weights are copied in NCHW (contiguous) layout:
    torch's float64 convolutions have no fast channels-last path."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], stem_stride: int, block_strides: Sequence[int],
                 block_candidates: Sequence[Sequence[tuple]], num_columns: int, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        sd = {k: v.detach().to(dtype).clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()
              if k.rsplit(".", 1)[-1] not in _BN_BUFFERS}
        used = set()

        def take(prefix: str, names: Sequence[str]) -> Optional[List[torch.Tensor]]:
            keys = [f"{prefix}.{n}" for n in names]
            if not any(k in sd for k in keys):
                return None
            used.update(keys)
            return [sd[k] for k in keys]

        self.num_columns = num_columns
        self.stem = take("stem", ("0.weight", "1.weight", "1.bias"))
        self.stem_stride = int(stem_stride)
        self.first = self._mbconv(take, "first", stride=1)
        self.blocks = []
        for l, (stride, cands) in enumerate(zip(block_strides, block_candidates)):
            self.blocks.append({m: self._mbconv(take, f"blocks.{l}.candidates.{name}", stride) for m, name in cands})
        self.head = take("head", ("0.weight", "1.weight", "1.bias"))
        self.classifier = take("classifier", ("weight", "bias"))
        left = sorted(set(sd) - used)
        if left:
            raise ValueError(f"parameters the oracle does not know how to use: {left}")

    @staticmethod
    def _mbconv(take, prefix: str, stride: int) -> Optional[dict]:
        """The parameters of an MBConv, or None (the identity) where `prefix` has none."""
        depthwise = take(prefix, _DEPTHWISE)
        if depthwise is None:
            return None
        project = take(prefix, _PROJECT)
        expand = take(prefix, _EXPAND)
        cin = expand[0].shape[1] if expand is not None else depthwise[0].shape[0]
        cout = project[0].shape[0]
        return {"expand": expand, "depthwise": depthwise, "project": project, "stride": int(stride),
                "residual": stride == 1 and cin == cout}

    @classmethod
    def from_engine(cls, model, dtype: torch.dtype = torch.float64) -> "GatedSupernet":
        """The gated supernet of an engine Supernet: its weights, and from its space only the strides and the
        candidate columns of each block."""
        space = model.space
        names = space.candidate_names
        cands = [[(m, names[m]) for m, ok in enumerate(b.allowed) if ok] for b in space.blocks]
        return cls(model.state_dict(), space.config.stem_stride, [b.stride for b in space.blocks], cands,
                   space.num_candidates, dtype)

    @staticmethod
    def _run_mbconv(p: Optional[dict], x: torch.Tensor) -> torch.Tensor:
        if p is None:
            return x
        h = x
        if p["expand"] is not None:
            w, g, b = p["expand"]
            h = F.relu6(_bn(F.conv2d(h, w), g, b))
        w, g, b = p["depthwise"]
        k = w.shape[-1]
        h = F.relu6(_bn(F.conv2d(h, w, stride=p["stride"], padding=k // 2, groups=w.shape[0]), g, b))
        w, g, b = p["project"]
        out = _bn(F.conv2d(h, w), g, b)
        return out + x if p["residual"] else out

    def logits(self, x: torch.Tensor, gates: torch.Tensor, remaining: torch.Tensor,
               shifts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Block l outputs Σ_{m remaining} gates[l, m] · o_lm(x_l) (plus the scalar shifts[l] where given: its
        gradient is the sum of the block output's); everything in self.dtype."""
        x = x.to(self.dtype).contiguous()
        w, g, b = self.stem
        x = F.relu6(_bn(F.conv2d(x, w, stride=self.stem_stride, padding=w.shape[-1] // 2), g, b))
        x = self._run_mbconv(self.first, x)
        for l, cands in enumerate(self.blocks):
            columns = remaining[l].nonzero().flatten().tolist()
            unknown = [m for m in columns if m not in cands]
            if unknown:
                raise ValueError(f"block {l}: remaining columns {unknown} are not candidates of the block")
            x = torch.stack([gates[l, m] * self._run_mbconv(cands[m], x) for m in columns]).sum(0)
            if shifts is not None:
                x = x + shifts[l]
        w, g, b = self.head
        x = F.relu6(_bn(F.conv2d(x, w), g, b))
        return F.linear(x.mean((2, 3)), *self.classifier)

    def tensors(self) -> List[torch.Tensor]:
        """Every parameter tensor of the oracle, in a fixed order."""
        out: List[torch.Tensor] = []
        self._map(lambda t: out.append(t) or t)
        return out

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "GatedSupernet":
        """A copy whose parameters are `tensors` (in the order of `tensors()`): e.g. an unrolled step of them."""
        it = iter(tensors)
        clone = copy.copy(self)
        clone._map(lambda t: next(it), assign=True)
        return clone

    def _map(self, fn, assign: bool = False) -> None:
        def mbconv(p):
            if p is None:
                return None
            q = dict(p)
            for k in ("expand", "depthwise", "project"):
                q[k] = None if p[k] is None else [fn(t) for t in p[k]]
            return q
        parts = {"stem": [fn(t) for t in self.stem], "first": mbconv(self.first),
                 "blocks": [{m: mbconv(p) for m, p in block.items()} for block in self.blocks],
                 "head": [fn(t) for t in self.head], "classifier": [fn(t) for t in self.classifier]}
        if assign:
            for k, v in parts.items():
                setattr(self, k, v)

    def loss(self, x: torch.Tensor, y: torch.Tensor, gates: torch.Tensor, remaining: torch.Tensor,
             shifts: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.cross_entropy(self.logits(x, gates, remaining, shifts), y)

    def one_hot_gates(self, arch: Sequence[int]) -> torch.Tensor:
        gates = torch.zeros(len(self.blocks), self.num_columns, dtype=self.dtype)
        gates[torch.arange(len(arch)), torch.tensor(list(arch))] = 1.0
        return gates

    def gate_grad_table(self, x: torch.Tensor, y: torch.Tensor, arch: Sequence[int], remaining: torch.Tensor):
        """([L, M] table of dL/dg at the one-hot gates of `arch`, 0 off the remaining paths; the loss)."""
        remaining = remaining.bool()
        gates = self.one_hot_gates(arch).requires_grad_()
        loss = self.loss(x, y, gates, remaining)
        (table,) = torch.autograd.grad(loss, gates)
        return table.masked_fill(~remaining, 0.0), float(loss.detach())


def eq4_float64(table: torch.Tensor, alpha: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """dL/dα_lm = Σ_{j remaining} dL/dg_lj · p_lj (δ_mj − p_lm), p the softmax of α over the remaining paths;
    float64, 0 on the other entries."""
    remaining = remaining.bool()
    a = alpha.to(torch.float64).masked_fill(~remaining, float("-inf"))
    e = torch.exp(a - a.max(1, keepdim=True).values)
    p = e / e.sum(1, keepdim=True)
    g = table.to(torch.float64).masked_fill(~remaining, 0.0)
    delta = torch.eye(a.shape[1], dtype=torch.float64)
    grad = torch.einsum("lj,lj,lmj->lm", g, p, delta[None] - p[:, :, None])
    return grad.masked_fill(~remaining, 0.0)


MATTERS = 0.01  # an entry matters when its magnitude is above this fraction of the batch's largest (oracle's)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the entries, relative to the largest |want|."""
    return float((got.double() - want).abs().max() / want.abs().max())


def measure_phase2_precision(seed: int = 0, batches: int = 4, phase1_steps: int = 20, threads: int = 2,
                             alpha_scale: float = 0.5, context: bool = True, device: str = "cpu") -> dict:
    """The demo search with bf16 autocast trains `phase1_steps` Phase-1 steps; α is then set to
    alpha_scale · N(0, 1); on `batches` consecutive held-out batches (one architecture sampled from p each),
    the α gradient of Eq. 4 (cost term off) from the engine's Phase 2 in fp32 (`_phase2_autocast`, what the
    run does) and under the bf16 autocast of Phase 1 is compared with the float64 oracle's. With `context`,
    two more tables are compared: the same gated supernet computing in float32 (the error plain PyTorch fp32
    makes on this problem) and the engine's Supernet cast to float64. `device`: where the search runs (its model,
    Phase-1 steps and gate-gradient tables); the oracles always compute on the CPU, from a CPU copy. Returns the counts, agreement fractions
    and errors (see the "definitions" entry)."""
    from betanas_fast.search import Search, SearchConfig

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        s = Search(SearchConfig(amp=True, amp_dtype="bf16", out=out, progress=False, plots=False, tensorboard=False,
                                threads=threads, epochs=4, warmup_epochs=0, seed=seed, device=device))
        s._build()
        try:
            if s.amp_dtype != torch.bfloat16:
                raise RuntimeError(f"the search trains under {s.amp_dtype}, not bf16")
            for _ in range(phase1_steps):  # weights trained in bf16, as --amp trains them
                s.phase1_step()
        finally:
            s.close()
    st = s.state
    with torch.no_grad():
        st.alpha.copy_(torch.randn(st.alpha.shape, generator=torch.Generator().manual_seed(seed + 1)) * alpha_scale)
    alpha = st.alpha.detach().clone()
    cpu_model = copy.deepcopy(s.model).cpu()
    oracle = GatedSupernet.from_engine(cpu_model)
    if context:
        plain32 = GatedSupernet.from_engine(cpu_model, torch.float32)
        engine64 = copy.deepcopy(cpu_model).double()
    gen = torch.Generator().manual_seed(seed + 2)
    n = s.cfg.heldout_batch_size
    if len(s.data.heldout) < n * batches:
        raise ValueError(f"{batches} held-out batches of {n} need {n * batches} images, "
                         f"the split has {len(s.data.heldout)}")
    zero_cost = torch.zeros_like(alpha)
    per_batch = []
    for b in range(batches):
        x, y = s.data.heldout.batch(torch.arange(n * b, n * (b + 1)), train=False)
        arch = st.sample_from_p(gen)
        table, loss, _ = s.model.gate_grad_table(s._on_device(x), y.to(s.device), arch, st.remaining,
                                                 autocast=s._phase2_autocast(), memory_budget=s.phase2_memory)
        got = st.alpha_grad(table, zero_cost, 0.0)
        bf16_table, _, _ = s.model.gate_grad_table(s._on_device(x), y.to(s.device), arch, st.remaining,
                                                   autocast=s._autocast(), memory_budget=s.phase2_memory)
        bf16 = st.alpha_grad(bf16_table, zero_cost, 0.0)
        table64, loss64 = oracle.gate_grad_table(x, y, arch, st.remaining)
        want = eq4_float64(table64, alpha, st.remaining)
        matters = want.abs() > MATTERS * want.abs().max()
        row = {
            "arch": arch, "matters": int(matters.sum()),
            "engine_agree": int((got.double().sign() == want.sign())[matters].sum()),
            "bf16_agree": int((bf16.double().sign() == want.sign())[matters].sum()),
            "engine_table_rel_error": _relative_error(table, table64),
            "bf16_table_rel_error": _relative_error(bf16_table, table64),
            "engine_alpha_grad_rel_error": _relative_error(got, want),
            "bf16_alpha_grad_rel_error": _relative_error(bf16, want),
            "engine_loss_rel_error": abs(loss - loss64) / abs(loss64)}
        if context:
            plain32_table, _ = plain32.gate_grad_table(x, y, arch, st.remaining)
            engine64_table, _, _ = engine64.gate_grad_table(x.double(), y, arch, st.remaining)
            row["plain_fp32_table_rel_error"] = _relative_error(plain32_table, table64)
            row["engine_float64_table_rel_error"] = _relative_error(engine64_table, table64)
        per_batch.append(row)
    total = sum(r["matters"] for r in per_batch)
    worst = lambda key: max(r[key] for r in per_batch) if key in per_batch[0] else None  # noqa: E731
    return {
        "entries_that_matter": total,
        "entries_per_batch": int(st.remaining.sum()),
        "engine_agreement": sum(r["engine_agree"] for r in per_batch) / total,
        "bf16_agreement": sum(r["bf16_agree"] for r in per_batch) / total,
        "engine_table_max_rel_error": worst("engine_table_rel_error"),
        "bf16_table_max_rel_error": worst("bf16_table_rel_error"),
        "plain_fp32_table_max_rel_error": worst("plain_fp32_table_rel_error"),
        "engine_float64_table_max_rel_error": worst("engine_float64_table_rel_error"),
        "engine_alpha_grad_max_rel_error": worst("engine_alpha_grad_rel_error"),
        "bf16_alpha_grad_max_rel_error": worst("bf16_alpha_grad_rel_error"),
        "engine_loss_max_rel_error": worst("engine_loss_rel_error"),
        "settings": {"seed": seed, "batches": batches, "heldout_batch_size": n, "phase1_steps": phase1_steps,
                     "phase1_amp_dtype": "bf16", "threads": threads, "alpha_scale": alpha_scale,
                     "space": s.cfg.space, "matters_fraction": MATTERS, "context_tables": context},
        "definitions": {
            "entries_that_matter": "α-gradient entries, over all batches, whose float64 magnitude is above "
                                   "matters_fraction of the batch's largest",
            "engine_agreement": "fraction of those where the sign of the engine's Phase-2 α gradient (fp32, "
                                "Search._phase2_autocast) equals the float64 oracle's",
            "bf16_agreement": "the same for a Phase 2 under the bf16 autocast of Phase 1 (Search._autocast)",
            "engine_table_max_rel_error": "max over batches of max |table - oracle table| / max |oracle table|, "
                                          "the dL/dg table of the engine's fp32 Phase 2 over the remaining paths",
            "bf16_table_max_rel_error": "the same for the bf16 Phase 2",
            "plain_fp32_table_max_rel_error": "the same for the oracle's own code computing in float32: the error "
                                              "fp32 itself makes on this problem",
            "engine_float64_table_max_rel_error": "the same for the engine's Supernet cast to float64 (not what a "
                                                  "run does; its table and all-candidate op return float32)",
            "engine_alpha_grad_max_rel_error": "max over batches of max |α grad - oracle's| / max |oracle's|, "
                                               "engine fp32",
            "bf16_alpha_grad_max_rel_error": "the same for the bf16 Phase 2",
            "engine_loss_max_rel_error": "max over batches of |engine loss - oracle loss| / |oracle loss|, fp32",
        },
        "per_batch": per_batch,
    }
