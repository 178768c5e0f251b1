"""Measured latency as a cost: the look-up table (what was measured, on which machine) and its use.

A table holds, for one device, batch, dtype, thread count and memory format, the latency of every
(choice-block shape x candidate) of a space and of the fixed parts (stem, first block, head with the
classifier), plus the per-network overhead that a sum of separately timed parts misses (launches, caches,
Python between modules), measured on whole networks. A network's predicted latency is

    fixed parts + sum over blocks of the chosen candidate's entry + network overhead.

Entries are keyed by shape, not by block index, so any space whose blocks have measured shapes can use a
table, and a space with an unmeasured shape is an error that names the missing entries. The measuring is
in `cost.measure` and `python -m betanas_fast.latency`.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..runs.provenance import cpu_model
from ..runs.files import write_json
from ..space import ChoiceBlockSpec, SearchSpace

FORMAT = "betanas_fast.latency_table/1"
# Which statistic of an entry's timing rounds predicts: p10 (default) or the median. Interference from
# outside the process (another tenant of the machine, interrupts) only ever adds time, and on a shared
# machine it moves the median of whole networks by 10-25 % from one minute to the next; the 10th percentile
# of the rounds is what the network itself costs, and it moves far less (measured: benchmarks/results).
STATISTICS = {"p10": 0.1, "median": 0.5}  # name -> the quantile of the rounds it is


class LatencyTableError(ValueError):
    """A table that cannot be used as asked: unreadable, missing entries of the space, or from another
    machine."""


# --- keys: the shape of what was timed -------------------------------------------------------------------------
def entry_key(space: SearchSpace, block: ChoiceBlockSpec, choice: int) -> str:
    """e.g. `mb_k5_e6 24>40 s2 r56`: candidate, channels, stride, input resolution."""
    name = space.candidates[choice].name
    return f"{name} {block.in_channels}>{block.out_channels} s{block.stride} r{block.in_resolution}"


def fixed_keys(space: SearchSpace) -> Dict[str, str]:
    """The fixed parts' keys: stem conv, first MBConv (k3 e1) and head (1x1 conv, pool, classifier)."""
    cfg = space.config
    r0, rf = space.first_block_resolution, space.final_resolution
    return {
        "stem": f"stem {cfg.in_channels}>{space.stem_channels} s{cfg.stem_stride} r{cfg.resolution}",
        "first": f"first {space.stem_channels}>{space.first_block_channels} s1 r{r0}",
        "head": f"head {space.last_channels}>{space.head_channels} r{rf} classes{cfg.num_classes}",
    }


def space_keys(space: SearchSpace) -> Dict[str, Tuple[int, int]]:
    """Every entry the space needs, with one (block, choice) that has that shape."""
    keys: Dict[str, Tuple[int, int]] = {}
    for l, b in enumerate(space.blocks):
        for m, ok in enumerate(b.allowed):
            if ok:
                keys.setdefault(entry_key(space, b, m), (l, m))
    return keys


# --- the machine -------------------------------------------------------------------------------------------------
def _gpu_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> dict:
    """What a table's numbers depend on besides the settings: the device's name (CPU model or GPU name and
    driver), torch and the build of the kernels."""
    import torch
    from .._ext import build_info
    info = build_info()
    meta = {"device": device, "cpu_model": cpu_model(), "torch": torch.__version__,
            "kernels": {"loaded": info["kernels_loaded"], "package_version": info["package_version"],
                        "cuda": info["cuda_kernels_compiled"], "cpu_march": info["cpu_march"]},
            "host": platform.node()}
    if device == "cuda":
        meta["device_name"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
        meta["driver"] = _gpu_driver()
    else:
        meta["device_name"] = meta["cpu_model"]
    return meta


def machine_mismatches(meta: dict) -> List[str]:
    """How this machine differs from the one that measured `meta`, in what the latencies depend on."""
    import torch
    device = meta.get("device", "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            return [f"the table was measured on a GPU ({meta.get('device_name')}); this machine has none"]
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        diffs = [] if meta.get("device_name") in names else [
            f"GPU: table {meta.get('device_name')!r}, this machine {sorted(names)}"]
    else:
        here = cpu_model()
        diffs = [] if meta.get("device_name") == here else [f"CPU: table {meta.get('device_name')!r}, here {here!r}"]
    if meta.get("torch") != torch.__version__:
        diffs.append(f"torch: table {meta.get('torch')}, here {torch.__version__}")
    from .._ext import build_info
    loaded = build_info()["kernels_loaded"]
    if meta.get("kernels", {}).get("loaded") != loaded:
        diffs.append(f"compiled kernels: table {'with' if meta.get('kernels', {}).get('loaded') else 'without'}, "
                     f"here {'with' if loaded else 'without'}")
    return diffs


# --- the table ---------------------------------------------------------------------------------------------------
@dataclass
class LatencyTable:
    """Latencies in milliseconds. `entries` (candidates) and `fixed` (stem, first block, head) map a key to
    its statistics (p10, median, p90, mad, count); the prediction uses the table's `statistic` of each.
    `network` holds the whole-network calibration."""
    meta: dict
    entries: Dict[str, dict]
    fixed: Dict[str, dict]
    network: dict = field(default_factory=lambda: {"overhead_ms": 0.0})
    path: Optional[str] = None

    # -- reading and writing
    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        if not os.path.isfile(path):
            raise LatencyTableError(f"latency table {path!r}: no such file (build one with "
                                    f"`python -m betanas_fast.latency build --out {path}`)")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LatencyTableError(f"latency table {path!r} is not readable JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyTableError(f"latency table {path!r}: not a table of this format (expected format "
                                    f"{FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r})")
        for part in ("meta", "entries", "fixed"):
            if not isinstance(data.get(part), dict):
                raise LatencyTableError(f"latency table {path!r}: its {part!r} section is missing")
        statistic = data["meta"].get("statistic", "median")
        if statistic not in STATISTICS:
            raise LatencyTableError(f"latency table {path!r}: unknown statistic {statistic!r} (expected one of "
                                    f"{tuple(STATISTICS)})")
        for key, stats in list(data["entries"].items()) + list(data["fixed"].items()):
            if not isinstance(stats, dict) or not isinstance(stats.get(statistic), (int, float)) \
                    or stats[statistic] < 0:
                raise LatencyTableError(f"latency table {path!r}: entry {key!r} has no valid {statistic}: {stats!r}")
        return cls(data["meta"], data["entries"], data["fixed"], data.get("network", {"overhead_ms": 0.0}), path)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "meta": self.meta, "entries": self.entries, "fixed": self.fixed,
                "network": self.network}

    def save(self, path: str) -> None:
        write_json(path, self.to_dict(), indent=1, newline=False)
        self.path = path

    # -- checks
    def _name(self) -> str:
        return repr(self.path) if self.path else "the latency table"

    def check_space(self, space: SearchSpace) -> None:
        """LatencyTableError naming the missing entries when the space has a part the table lacks."""
        need = list(space_keys(space)) + list(fixed_keys(space).values())
        have = set(self.entries) | set(self.fixed)
        missing = [k for k in need if k not in have]
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise LatencyTableError(
                f"{self._name()} lacks {len(missing)} of the {len(need)} entries this space needs: {shown}. It was "
                f"measured for space {self.meta.get('space_name')!r} at resolution {self.meta.get('resolution')}; "
                f"build a table of this space (python -m betanas_fast.latency build --space ...)")

    def check_machine(self) -> None:
        diffs = machine_mismatches(self.meta)
        if diffs:
            raise LatencyTableError(
                f"{self._name()} was measured on another machine or software ({'; '.join(diffs)}): its latencies "
                f"need not hold here. Build a table on this machine, or pass --latency-table-any-machine to use it "
                f"on purpose (e.g. to search for the device that measured it)")

    # -- prediction
    def cost_matrix(self, space: SearchSpace) -> Tuple[List[List[float]], float]:
        """(per block and candidate ms, as L x M lists with 0 where a candidate is not allowed; the fixed
        parts' ms plus the network overhead)."""
        self.check_space(space)
        matrix = [[self.entries[entry_key(space, b, m)][self.statistic] if ok else 0.0 for m, ok in enumerate(b.allowed)]
                  for b in space.blocks]
        return matrix, self.fixed_ms(space) + self.overhead_ms

    def fixed_ms(self, space: SearchSpace) -> float:
        return float(sum(self.fixed[k][self.statistic] for k in fixed_keys(space).values()))

    @property
    def statistic(self) -> str:
        return self.meta.get("statistic", "median")

    @property
    def overhead_ms(self) -> float:
        return float(self.network.get("overhead_ms", 0.0))

    def sum_ms(self, space: SearchSpace, arch: Sequence[int]) -> float:
        """Fixed parts plus the chosen entries: the plain sum, without the network overhead."""
        space.check_arch(arch)
        self.check_space(space)
        return self.fixed_ms(space) + float(sum(self.entries[entry_key(space, space.blocks[l], m)][self.statistic]
                                                for l, m in enumerate(arch)))

    def predict_ms(self, space: SearchSpace, arch: Sequence[int]) -> float:
        """The predicted latency of the net `arch`: the sum plus the measured per-network overhead."""
        return self.sum_ms(space, arch) + self.overhead_ms

    def describe(self) -> str:
        m = self.meta
        return (f"{m.get('device')} {m.get('device_name')!r}, batch {m.get('batch')}, {m.get('dtype')}, "
                f"{m.get('threads')} thread(s), {m.get('memory_format')}, {self.statistic} of the timing rounds, "
                f"measured {m.get('date')}")


def cost_span(matrix: Sequence[Sequence[float]], allowed: Sequence[Sequence[bool]]) -> float:
    """Σ over blocks of (largest − smallest) allowed cost: how much the choice can move the net's cost."""
    return float(sum(max(v for v, a in zip(row, ok) if a) - min(v for v, a in zip(row, ok) if a)
                     for row, ok in zip(matrix, allowed)))
