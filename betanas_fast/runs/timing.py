"""Where a search step's time goes: the engine marks its parts (data, Phase-1 forward / backward /
gradient sync / optimizer, Phase-2 sampled path / other candidates / table sync / α update) with `timer.part(name)`. The default
timer does nothing; `StepTimer` sums the wall-clock time of each part, with the device synchronised at
both ends so that asynchronous GPU work is charged to the part that queued it."""
from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable, Dict, Iterator, Optional

# The two parts of the gate-gradient table (timed inside Supernet.gate_grad_table).
SAMPLED_PATH, OTHER_CANDIDATES = "phase2/sampled path", "phase2/other candidates"
# The DARTS family's α gradient (backpropagation through the mixture; the unrolled step of the second order).
MIXTURE = "phase2/mixture"
# The parts, in the order of a step.
PARTS = ("data", "phase1/forward", "phase1/backward", "phase1/gradient sync", "phase1/optimizer",
         SAMPLED_PATH, OTHER_CANDIDATES, MIXTURE, "phase2/table sync", "phase2/alpha update")
# The parts that are communication between ranks (under torchrun only).
COMMUNICATION_PARTS = ("phase1/gradient sync", "phase2/table sync")


class NoTimer:
    """The engine's default: every part is a no-op context."""

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        yield


class StepTimer(NoTimer):
    """Seconds per part, summed until `reset()`. `sync` waits for the device (torch.cuda.synchronize on a
    GPU); `on_part(name)` is told which part runs (None after it), for counters that attribute work."""

    def __init__(self, sync: Optional[Callable[[], None]] = None,
                 on_part: Optional[Callable[[Optional[str]], None]] = None):
        self.sync = sync or (lambda: None)
        self.on_part = on_part or (lambda name: None)
        self.seconds: Dict[str, float] = collections.defaultdict(float)

    def reset(self) -> None:
        self.seconds.clear()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if name not in PARTS:
            raise ValueError(f"unknown step part {name!r}; expected one of {PARTS}")
        self.sync()
        self.on_part(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start
            self.on_part(None)
