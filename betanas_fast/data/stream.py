"""The engine's input: an endless stream of this rank's batches, decoded ahead of the model.

`BatchStream` walks a split in a `BatchOrder`'s order (the same global batches on every rank, each rank
taking its contiguous share) and decodes the next batches in a background thread while the model
computes: decoders (PIL in the folder loader, DALI's pipeline) release the GIL, so decoding overlaps
the step. Production is sequential in one thread, so the batches and their augmentation are exactly
those of decoding on demand: the same seed gives the same run with or without prefetching.

Its state for a checkpoint is that of the next batch to be *consumed* (order and augmentation generator
as they were after producing the last batch the engine took), not of the batches already decoded ahead,
so a resume mid-epoch continues exactly.
"""
from __future__ import annotations

import queue
import threading
from typing import Optional, Tuple

import torch

from .base import BatchOrder, ImageSplit


class BatchStream:
    """Batches (x, y) of `split`: `order` gives the global batch, `shard(indices)` this rank's part of
    it (identity for one process), `generator` the training augmentation (None: no augmentation).
    `prefetch` batches are decoded ahead in a thread (0: decode on demand, in the caller's thread), for
    splits that decode (`split.decodes`). An in-memory split is read on demand: its batches cost less than
    the thread does (on a 2-core CPU a demo search ran 1.5x slower with one, its torch ops competing with
    the model's for the cores). With `pin_memory` (a CUDA model) each batch is put into `memory_format` and
    page-locked where it is produced (in the thread when prefetching), so that `to_device` copies it without
    blocking the host."""

    def __init__(self, split: ImageSplit, order: BatchOrder, train: bool, generator: Optional[torch.Generator] = None,
                 shard=None, prefetch: int = 2, pin_memory: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.split, self.order, self.train, self.generator = split, order, train, generator
        self.pin_memory, self.memory_format = pin_memory, memory_format
        self.shard = shard or (lambda idx: idx)
        self.prefetch = prefetch if getattr(split, "decodes", False) else 0
        self._consumed = self._snapshot()
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def _snapshot(self) -> dict:
        return {"order": self.order.state_dict(),
                "generator": self.generator.get_state() if self.generator is not None else None}

    def _produce(self) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        idx = self.shard(self.order.next_indices())
        x, y = self.split.batch(idx, train=self.train, generator=self.generator)
        if self.pin_memory:
            x, y = x.contiguous(memory_format=self.memory_format).pin_memory(), y.pin_memory()
        return x, y, self._snapshot()

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._produce()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                self._queue.put(e)
                return
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch <= 0:
            x, y, self._consumed = self._produce()
            return x, y
        if self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, name="batch-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        x, y, self._consumed = item
        return x, y

    def close(self) -> None:
        """Stops the decoding thread and drops the batches decoded ahead (they are produced again)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None
        # back to the state after the last consumed batch
        self.order.load_state_dict(self._consumed["order"])
        if self.generator is not None:
            self.generator.set_state(self._consumed["generator"])

    def state_dict(self) -> dict:
        return {"order": dict(self._consumed["order"]), "generator": self._consumed["generator"]}

    def load_state_dict(self, d: dict, generator: bool = True) -> None:
        """Restores the order (and, if `generator`, the augmentation generator) as of the next batch."""
        self.close()
        self.order.load_state_dict(d["order"])
        if generator and self.generator is not None and d.get("generator") is not None:
            self.generator.set_state(d["generator"])
        self._consumed = self._snapshot()


def to_device(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """A batch tensor on `device` in `memory_format`; the copy does not block the host when x is page-locked
    (BatchStream's pin_memory), and the stream orders it before the kernels that read it."""
    return x.to(device, non_blocking=x.device.type == "cpu" and x.is_pinned()).contiguous(memory_format=memory_format)
