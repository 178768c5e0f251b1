"""Timing that holds still: warm-up, interleaved rounds, and a stopping rule on the median's confidence.

Every timed thing (a candidate on its input, a fixed part, a whole network) is an `Item`. The items are
timed in passes: each pass visits every unfinished item once, in a fresh random order, and times one
round of it (several calls). Interleaving spreads slow drifts (clock frequency, other load) over all items
alike instead of biasing whichever was timed during them. An item is finished when the 95 % confidence
interval of the estimated quantile (the median, or p10; distribution-free, from order statistics) lies
within ±`rel_ci` of it, or after `max_passes`. Statistics are p10, median, p90 and MAD, so a few outliers
(an interrupt, a page fault) do not move the estimate.

A sample is the mean per call of one round, timed with `time.perf_counter` on the CPU (threads fixed by
the caller) and with CUDA events on the GPU (see `_Clock`).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class Protocol:
    warmup_runs: int = 10         # calls before any timing, at least ...
    warmup_s: float = 0.02        # ... and at least this long
    round_s: float = 0.005        # one round's length (calls per round follow from the warm-up's speed)
    max_calls_per_round: int = 1000
    min_passes: int = 5
    max_passes: int = 200
    rel_ci: float = 0.01          # stop when the estimate's 95 % interval is within ±1 % ...
    quantile: float = 0.5         # ... the estimate being this quantile of the rounds (0.1 for a p10 table)
    seed: int = 0                 # order of the items in each pass

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Item:
    """A thing to time: `call()` runs it once (its inputs are prepared beforehand)."""
    key: str
    call: Callable[[], object]


def quantile_ci(samples: Sequence[float], q: float = 0.5, z: float = 1.96) -> tuple:
    """Distribution-free ~95 % confidence interval of the q-quantile (q = 0.5: the median): the order
    statistics at ranks n·q ± z·sqrt(n·q·(1 − q)) (the normal approximation of the binomial)."""
    s = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(s)
    half = z * math.sqrt(n * q * (1 - q))
    lo, hi = max(0, int(math.floor(n * q - half))), min(n - 1, int(math.ceil(n * q + half)))
    return float(s[lo]), float(s[hi])


def summarize(samples_ms: Sequence[float]) -> dict:
    """median, p90, MAD (median absolute deviation) and count of samples in ms."""
    s = np.asarray(samples_ms, dtype=np.float64)
    med = float(np.median(s))
    return {"median": med, "p10": float(np.percentile(s, 10)), "p90": float(np.percentile(s, 90)),
            "mad": float(np.median(np.abs(s - med))), "count": int(len(s))}


def converged(samples: Sequence[float], rel_ci: float, q: float = 0.5) -> bool:
    """Whether the q-quantile's 95 % interval lies within ±rel_ci of it."""
    lo, hi = quantile_ci(samples, q)
    est = float(np.quantile(samples, q))
    return est > 0 and (est - lo) <= rel_ci * est and (hi - est) <= rel_ci * est


class _Clock:
    """Times a round of `n` calls of `fn` and returns its mean per call, in ms: with `perf_counter` on the
    CPU, CUDA events on the GPU. Each sample is a round's mean, not one call, so that a candidate of 50 µs
    and a whole network of 1 ms are exposed alike to what the machine does meanwhile (interrupts, another
    tenant's use of a shared core or cache): per-call medians would leave those out of the short calls only,
    and the sum of the parts would then miss a share of every whole network's time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def round(self, fn: Callable, n: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def measure(items: Sequence[Item], device: torch.device, protocol: Optional[Protocol] = None,
            progress: Optional[Callable[[int], None]] = None, clock=None) -> Dict[str, dict]:
    """Each item's statistics (`summarize`, plus `passes` and whether it `converged`), timed in interleaved
    passes under `protocol`. `progress(k)` is called as k more items finish. `clock` replaces the device's
    clock (an object with `round(fn, n)` -> ms per call and `sync()`; tests script the timings with it)."""
    protocol = protocol or Protocol()
    clock = clock or _Clock(device)
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("measure: item keys must be unique")
    calls: Dict[str, int] = {}
    with torch.inference_mode():
        for it in items:  # warm-up, and how many calls make a round
            n, t0 = 0, time.perf_counter()
            while n < protocol.warmup_runs or time.perf_counter() - t0 < protocol.warmup_s:
                it.call()
                n += 1
                if n % 4 == 0:
                    clock.sync()
            clock.sync()
            per_call = (time.perf_counter() - t0) / n
            calls[it.key] = max(1, min(protocol.max_calls_per_round, round(protocol.round_s / max(per_call, 1e-9))))
        order = random.Random(protocol.seed)
        samples: Dict[str, List[float]] = {k: [] for k in keys}
        active = list(items)
        passes = {k: 0 for k in keys}
        done: Dict[str, bool] = {}
        for p in range(protocol.max_passes):
            order.shuffle(active)
            for it in active:
                samples[it.key].append(clock.round(it.call, calls[it.key]))
                passes[it.key] += 1
            if p + 1 < protocol.min_passes:
                continue
            still = []
            for it in active:
                if converged(samples[it.key], protocol.rel_ci, protocol.quantile):
                    done[it.key] = True
                else:
                    still.append(it)
            if progress and len(still) < len(active):
                progress(len(active) - len(still))
            active = still
            if not active:
                break
        if progress and active:
            progress(len(active))
    return {k: dict(summarize(samples[k]), passes=passes[k], calls_per_round=calls[k],
                    converged=done.get(k, False)) for k in keys}
