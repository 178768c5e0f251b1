"""The search space as data: stages, candidates and where the identity path is legal; the named spaces
(`SPACES`); uniformly random architectures of a space, under a cost budget or not.

Everything else (supernet, FLOPs, export, plots) reads a `SearchSpace`; the list of candidates lives
here only.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from ._rules import conv_out_size

SKIP = "skip"
_MB_NAME = re.compile(r"^mb_k(\d+)_e(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Candidate:
    """One operator kind: an MBConv(kernel_size, expand_ratio) or the identity (`skip`)."""
    name: str
    kernel_size: int = 0
    expand_ratio: float = 0.0

    @property
    def is_skip(self) -> bool:
        return self.name == SKIP

    def block_string(self, stride: int, out_channels: int) -> str:
        """timm-style block string, e.g. `ir_r1_k5_s2_e6_c40`; `skip` for the identity."""
        if self.is_skip:
            return SKIP
        return timm_block_string(self.kernel_size, stride, out_channels, self.expand_ratio)


def timm_block_string(kernel_size: int, stride: int, out_channels: int, expand_ratio: Optional[float] = None,
                      se_ratio: Optional[float] = None) -> str:
    """timm's block string of an MBConv: `ir_r1_k5_s2_e6_c40`, `ds_r1_k3_s1_c8` without an expansion
    (`expand_ratio` None: timm's DepthwiseSeparableConv), `_se0.25` with squeeze-excitation."""
    se = f"_se{se_ratio!r}" if se_ratio is not None else ""
    if expand_ratio is None:
        return f"ds_r1_k{kernel_size}_s{stride}_c{out_channels}{se}"
    e = int(expand_ratio) if float(expand_ratio).is_integer() else expand_ratio
    return f"ir_r1_k{kernel_size}_s{stride}_e{e}_c{out_channels}{se}"


def parse_candidate(name: str) -> Candidate:
    if name == SKIP:
        return Candidate(SKIP)
    m = _MB_NAME.match(name)
    if not m or int(m.group(1)) not in (3, 5, 7) or float(m.group(2)) <= 0:
        raise ValueError(f"unknown candidate name {name!r}; expected 'skip' or 'mb_k{{3,5,7}}_e<ratio>' "
                         f"such as 'mb_k5_e6'")
    return Candidate(name, int(m.group(1)), float(m.group(2)))


DEFAULT_CANDIDATES: Tuple[str, ...] = ("mb_k3_e3", "mb_k3_e6", "mb_k5_e3", "mb_k5_e6", "mb_k7_e3", "mb_k7_e6",
                                       SKIP)


@dataclass(frozen=True)
class ChoiceBlockSpec:
    """One choice block: its shapes and which candidate kinds it may hold (`allowed[m]`)."""
    index: int
    stage: int
    in_channels: int
    out_channels: int
    stride: int
    in_resolution: int
    allowed: Tuple[bool, ...]

    @property
    def out_resolution(self) -> int:
        return conv_out_size(self.in_resolution, self.stride)


def expanded_channels(in_channels: int, expand_ratio: float) -> int:
    """The width of an MBConv's expanded (depthwise) stage."""
    return int(round(in_channels * expand_ratio))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Channel rounding as MobileNetV2/timm do it: nearest multiple of divisor, never below 90 %."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


@dataclass
class SpaceConfig:
    """Everything that defines a space; plain data so it round-trips through JSON."""
    resolution: int = 224
    num_classes: int = 1000
    in_channels: int = 3
    width_mult: float = 1.0
    stem_channels: int = 32
    stem_stride: int = 2
    first_block_channels: int = 16
    # (width, blocks, first stride) per stage
    stages: List[Tuple[int, int, int]] = field(default_factory=lambda: [
        (24, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1)])
    head_channels: int = 1280
    candidates: List[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    channel_divisor: int = 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [list(s) for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SpaceConfig":
        d = dict(d)
        if "stages" in d:
            d["stages"] = [tuple(int(v) for v in s) for s in d["stages"]]
        return cls(**d)


SPACES = {
    # The MNASNet / ProxylessNAS mobile space of the paper (21 choice blocks, 15 with skip).
    "mobile": SpaceConfig(),
    # Same shape, small enough for a CPU search on 32x32 digits in a couple of minutes.
    "demo": SpaceConfig(resolution=32, num_classes=10, stem_channels=16, stem_stride=2,
                        first_block_channels=8, stages=[(16, 2, 2), (24, 3, 2), (32, 2, 2), (40, 1, 1)],
                        head_channels=128, channel_divisor=4),
    # The demo's shape at the 48x48 canvas of the cluttered digits (--dataset mnist-cluttered).
    "cluttered": SpaceConfig(resolution=48, num_classes=10, stem_channels=16, stem_stride=2,
                             first_block_channels=8, stages=[(16, 2, 2), (24, 3, 2), (32, 2, 2), (40, 1, 1)],
                             head_channels=128, channel_divisor=4),
    # The speed benchmark's supernet: the shape of the usual CPU one-shot NAS example (stem stride 1, four
    # stages of two blocks, head 256), so that step times compare across tools.
    "bench": SpaceConfig(resolution=32, num_classes=10, stem_channels=16, stem_stride=1, first_block_channels=16,
                         stages=[(24, 2, 1), (32, 2, 2), (64, 2, 2), (96, 2, 1)], head_channels=256),
}


class SearchSpace:
    """The resolved space: candidate kinds (columns) and choice blocks (rows)."""

    def __init__(self, config: SpaceConfig):
        self.config = config
        self.candidates: Tuple[Candidate, ...] = tuple(parse_candidate(n) for n in config.candidates)
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate candidate names in {names}")
        if not self.candidates:
            raise ValueError("the candidate list is empty")
        if config.stem_stride not in (1, 2):
            raise ValueError(f"stem stride must be 1 or 2, got {config.stem_stride}")
        for s in config.stages:
            if len(s) != 3 or s[1] < 0 or s[2] not in (1, 2) or s[0] <= 0:
                raise ValueError(f"bad stage {s}: expected (width > 0, blocks >= 0, first stride 1 or 2)")
        ch = lambda c: make_divisible(c * config.width_mult, config.channel_divisor)  # noqa: E731
        self.stem_channels = ch(config.stem_channels)
        self.first_block_channels = ch(config.first_block_channels)
        self.head_channels = (make_divisible(config.head_channels * max(1.0, config.width_mult),
                                             config.channel_divisor))
        res = conv_out_size(config.resolution, config.stem_stride)
        self.first_block_resolution = res
        blocks: List[ChoiceBlockSpec] = []
        cin = self.first_block_channels
        for si, (width, n, stride) in enumerate(config.stages):
            cout = ch(width)
            for b in range(n):
                s = stride if b == 0 else 1
                same_shape = s == 1 and cin == cout
                allowed = tuple(same_shape if c.is_skip else True for c in self.candidates)
                if not any(allowed):
                    raise ValueError(f"choice block {len(blocks)} (stage {si}, {cin}->{cout}, stride {s}) has no "
                                     f"legal candidate: 'skip' needs stride 1 and equal channels")
                blocks.append(ChoiceBlockSpec(len(blocks), si, cin, cout, s, res, allowed))
                res = conv_out_size(res, s)
                cin = cout
        if not blocks:
            raise ValueError("the space has no choice blocks")
        self.blocks: Tuple[ChoiceBlockSpec, ...] = tuple(blocks)
        self.last_channels = cin
        self.final_resolution = res

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    @property
    def candidate_names(self) -> List[str]:
        return [c.name for c in self.candidates]

    def allowed_mask(self) -> List[List[bool]]:
        return [list(b.allowed) for b in self.blocks]

    def index_of(self, name: str) -> int:
        return self.candidate_names.index(name)

    def block_string(self, block: int, choice: int) -> str:
        b = self.blocks[block]
        return self.candidates[choice].block_string(b.stride, b.out_channels)

    def arch_strings(self, arch: Sequence[int]) -> List[str]:
        self.check_arch(arch)
        return [self.block_string(i, m) for i, m in enumerate(arch)]

    def check_arch(self, arch: Sequence[int]) -> None:
        if len(arch) != self.num_blocks:
            raise ValueError(f"arch has {len(arch)} choices, the space has {self.num_blocks} blocks")
        for i, m in enumerate(arch):
            if not (0 <= m < self.num_candidates) or not self.blocks[i].allowed[m]:
                raise ValueError(f"block {i}: candidate {m} is not allowed there")

    def arch_from_strings(self, strings: Sequence[str]) -> List[int]:
        arch = []
        for i, s in enumerate(strings):
            for m in range(self.num_candidates):
                if self.blocks[i].allowed[m] and self.block_string(i, m) == s:
                    arch.append(m)
                    break
            else:
                raise ValueError(f"block {i}: {s!r} is not a candidate here")
        return arch


def build_space(name: str = "demo", stage_depths: Optional[Sequence[int]] = None, **overrides) -> SearchSpace:
    """A named space (`SPACES`), with any SpaceConfig field overridden (None values ignored) and,
    optionally, the number of blocks per stage replaced."""
    if name not in SPACES:
        raise ValueError(f"unknown space {name!r}; expected one of {sorted(SPACES)}")
    d = SPACES[name].to_dict()
    d.update({k: v for k, v in overrides.items() if v is not None})
    if stage_depths is not None:
        if len(stage_depths) != len(d["stages"]):
            raise ValueError(f"stage_depths has {len(stage_depths)} entries, the space has {len(d['stages'])} stages")
        d["stages"] = [[w, int(n), s] for (w, _, s), n in zip(d["stages"], stage_depths)]
    return SearchSpace(SpaceConfig.from_dict(d))


def space_from_settings(settings: Mapping, num_classes: Optional[int] = None) -> SearchSpace:
    """The space a search's settings name (`space`, `stage_depths`, `width_mult`, `resolution`, `candidates`, as
    its config.json saves them), with `num_classes` classes when given (the data's)."""
    return build_space(settings["space"], stage_depths=settings["stage_depths"], width_mult=settings["width_mult"],
                       resolution=settings["resolution"], candidates=settings["candidates"], num_classes=num_classes)


# --- random architectures ---------------------------------------------------------------------------------------
def sample_arch(allowed, generator: torch.Generator) -> List[int]:
    """A uniformly random architecture: per block, one of its allowed paths (`allowed`: [L, M] booleans)."""
    arch = []
    for row in torch.as_tensor(allowed):
        ok = row.nonzero().flatten().tolist()
        arch.append(ok[int(torch.randint(len(ok), (1,), generator=generator))])
    return arch


def sample_within_budget(allowed, generator: torch.Generator, cost_fn: Callable[[List[int]], float],
                         budget: Optional[float], tries: int = 10000, floor: Optional[float] = None) -> List[int]:
    """A uniformly random architecture whose cost is at most `budget` (and at least `floor`), by rejection."""
    for _ in range(tries):
        arch = sample_arch(allowed, generator)
        cost = cost_fn(arch) if budget is not None or floor is not None else None
        if (budget is None or cost <= budget) and (floor is None or cost >= floor):
            return arch
    band = f"at most {budget}" if floor is None else f"in [{floor}, {budget}]"
    raise RuntimeError(f"no architecture of cost {band} (the budget's unit: MFLOPs, or ms with a latency cost) found "
                       f"in {tries} random samples")


def random_archs(space: SearchSpace, n: int, seed: int, exclude=()) -> List[List[int]]:
    """n distinct uniformly random architectures of `space` (fewer if it has fewer), none of `exclude`."""
    allowed = torch.tensor(space.allowed_mask())
    gen = torch.Generator().manual_seed(seed)
    seen, out = {tuple(a) for a in exclude}, []
    for _ in range(100 * n):
        a = sample_arch(allowed, gen)
        if tuple(a) not in seen:
            seen.add(tuple(a))
            out.append(a)
            if len(out) == n:
                break
    return out


def count_skip_blocks(space: SearchSpace) -> int:
    return sum(any(space.candidates[m].is_skip and a for m, a in enumerate(b.allowed)) for b in space.blocks)


__all__ = ["SKIP", "Candidate", "ChoiceBlockSpec", "SpaceConfig", "SearchSpace", "SPACES", "DEFAULT_CANDIDATES",
           "build_space", "parse_candidate", "timm_block_string", "make_divisible", "expanded_channels", "count_skip_blocks",
           "space_from_settings", "sample_arch", "sample_within_budget", "random_archs"]
