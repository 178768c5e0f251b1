"""A run's life in its directory, the same for a search and a training: where it is, whether it starts or
continues (and that a continued run has its saved settings), its checkpoints, its history and its TensorBoard
events. Rank 0 writes; every rank reads."""
from __future__ import annotations

import datetime
import json
import os
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

from . import files
from .ranks import Ranks


def default_run_dir(kind: str) -> str:
    """runs/<kind>-<time>: where a run goes when no --out names a directory."""
    return os.path.join("runs", f"{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def continued_settings(given: dict, run_only: Sequence[str], out: Optional[str], resume: Optional[str]) -> Optional[dict]:
    """The saved configuration when a command continues a run, else None. `--resume DIR` continues DIR with
    its own settings (the `run_only` fields, how it runs, from `given`); an `--out DIR` that holds a
    checkpoint (a restarted worker group, or the same command typed again) continues it too, but then every
    other setting of `given` must be the saved one, or it is an error rather than a silently different run."""
    if resume:
        return files.continued_config(resume, given, run_only, check=False)
    if out and files.latest_iteration(files.checkpoint_dir(out)) is not None:
        return files.continued_config(out, given, run_only, check=True)
    return None


class RunSession:
    """One run directory through one run (`kind`: "search" or "train", its default name)."""

    def __init__(self, out: Optional[str], resume: Optional[str], kind: str, ranks: Ranks):
        self.dir = resume or out or default_run_dir(kind)
        self.continues = bool(resume)
        self.ranks = ranks
        self.checkpoints = files.checkpoint_dir(self.dir)
        self.writer = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def log(self, *args) -> None:
        """print, on rank 0 only."""
        if self.ranks.is_main:
            print(*args, flush=True)

    # --- start or continue ---
    def begin(self, config: dict, restore: Callable[[], None]) -> None:
        """A run's first act: continue it (`restore` reads the checkpoint, through `restore()` here) or start it
        afresh; then the resolved configuration is printed."""
        os.makedirs(self.dir, exist_ok=True)
        if self.continues:
            restore()
        else:
            self.start(config)
        self.log("resolved configuration:\n" + json.dumps(config, indent=2))

    def start(self, config: dict) -> None:
        """A fresh run: its configuration saved beside the results, an empty history (rank 0)."""
        if self.ranks.is_main:
            files.write_config(self.dir, config)
            files.start_history(self.dir)

    def restore(self, history_key: str, state_key: str) -> Tuple[str, dict]:
        """(path, state) of the latest checkpoint, with the history cut back to it: records whose
        `history_key` is at most the checkpoint's `state[state_key]` stay, what follows is recomputed."""
        path, state = files.load_latest(self.checkpoints)
        if self.ranks.is_main:
            files.cut_history(self.dir, history_key, int(state[state_key]))
        return path, state

    def save_checkpoint(self, step: int, state: dict) -> None:
        """`state` (gathered on every rank: it may be a collective's result) saved by rank 0."""
        if self.ranks.is_main:
            files.save_checkpoint(self.checkpoints, step, state)

    # --- what a run reports as it goes ---
    def open_tensorboard(self, enabled: bool, step: int) -> None:
        """TensorBoard events (rank 0); purge_step: events a killed run wrote after its checkpoint are dropped,
        not duplicated."""
        if self.ranks.is_main and enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(self.path(files.TENSORBOARD), purge_step=step + 1 if step else None)

    def record(self, rec: dict, step: int, scalars: Iterable[str] = (), extra: Optional[Dict[str, float]] = None) -> None:
        """`rec` appended to history.jsonl; its `scalars` (those not None) and `extra` to TensorBoard."""
        if not self.ranks.is_main:
            return
        files.append_history(self.dir, rec)
        if self.writer:
            for k in scalars:
                if rec.get(k) is not None:
                    self.writer.add_scalar(k, rec[k], step)
            for k, v in (extra or {}).items():
                self.writer.add_scalar(k, v, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
