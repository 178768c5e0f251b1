"""A run directory's state: atomic checkpoints (temp file + os.replace; the last two kept; loaded with
weights_only=True), the saved configuration, and history.jsonl, cut back to the checkpoint on resume."""
from __future__ import annotations

import glob
import json
import os
import random
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

PREFIX = "ckpt_"


class CheckpointError(RuntimeError):
    pass


def _path(directory: str, iteration: int) -> str:
    return os.path.join(directory, f"{PREFIX}{iteration:08d}.pt")


def list_checkpoints(directory: str):
    return sorted(glob.glob(os.path.join(directory, f"{PREFIX}*.pt")))


def save_checkpoint(directory: str, iteration: int, state: dict, keep: int = 2) -> str:
    os.makedirs(directory, exist_ok=True)
    path = _path(directory, iteration)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-keep]:
        os.remove(old)
    return path


def load_latest(directory: str) -> Tuple[str, dict]:
    ckpts = list_checkpoints(directory)
    if not ckpts:
        raise CheckpointError(f"no checkpoint ({PREFIX}*.pt) in {directory}")
    path = ckpts[-1]
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...
        prev = f"; the previous checkpoint {ckpts[-2]} is intact — delete {path} to resume from it" \
            if len(ckpts) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}){prev}") from None


def rng_state(generators: dict) -> dict:
    """Every RNG state as tensors and plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "generators": {k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    for k, g in generators.items():
        g.set_state(state["generators"][k])


def latest_iteration(directory: str) -> Optional[int]:
    ckpts = list_checkpoints(directory)
    return int(os.path.basename(ckpts[-1])[len(PREFIX):-3]) if ckpts else None


# --- the run directory's other state: configuration and history -------------------------------------------------
HISTORY = "history.jsonl"
CONFIG = "config.json"


def start_run(run_dir: str, config: dict) -> None:
    """A fresh run: its configuration saved beside the results, an empty history."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    open(os.path.join(run_dir, HISTORY), "w").close()


def continued_config(run_dir: str, given: dict, run_only: Sequence[str], check: bool) -> dict:
    """The saved configuration of the run in `run_dir`, with the fields of `run_only` (how it runs, not what
    it computes) taken from `given`. `check`: the command named the directory as its output, not as a run
    to resume, so its other settings must be the saved ones (else a ValueError names the differences)."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(path):
        raise ValueError(f"cannot continue {run_dir}: {path} does not exist")
    with open(path) as f:
        saved = json.load(f)
    if check:
        differ = [k for k in saved if k not in run_only and given.get(k) != saved[k]]
        if differ:
            detail = ", ".join(f"{k}: saved {saved[k]!r}, given {given.get(k)!r}" for k in differ[:6])
            raise ValueError(f"{run_dir} holds a checkpointed run with other settings ({detail}); use another "
                             f"--out, or --resume {run_dir} to continue that run with its own settings")
    saved.update({k: given[k] for k in run_only if k in given})
    saved.update(resume=run_dir, out=run_dir)
    return saved


def cut_history(run_dir: str, key: str, last: int) -> None:
    """history.jsonl back to the checkpoint (records with `key` <= `last`): what follows is recomputed,
    identically. A line cut short by a kill is dropped with them; the file is replaced atomically."""
    hist = os.path.join(run_dir, HISTORY)
    if not os.path.exists(hist):
        return
    keep = []
    with open(hist) as f:
        for ln in f:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if rec[key] <= last:
                keep.append(json.dumps(rec) + "\n")
    with open(hist + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(hist + ".tmp", hist)


def append_history(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, HISTORY), "a") as f:
        f.write(json.dumps(record) + "\n")
