"""The run directory, file by file: each file's name, its one writer and its one reader.

    <run>/config.json          the resolved configuration          write_config / read_config, continued_config
    <run>/history.jsonl        one record per step or epoch        start_history, append_history / read_history,
                                                                   cut_history (back to a checkpoint on resume)
    <run>/checkpoints/ckpt_*.pt   everything a resume needs        save_checkpoint / load_latest
    <run>/arch.json            a search's result                   write_arch / read_arch
    <run>/result.json          a training's result                 write_result / read_result
    <run>/best.pt, last.pt     a retrained net (what export needs) save_net / read_net
    <run>/excluded_files.tsv   the image files an index left out   (data.imagenet.write_report)
    <run>/heldout_split.json   a folder's saved split              (data.imagenet.split)
    <run>/latency_table.json   the search's copy of its table      (cost.LatencyTable.save / load)

Every file is written whole or not at all: `write_atomic` (a temporary file beside it, flushed to disk,
then renamed over it) is the one way anything of the package writes a file, so a killed process never
leaves half a file, whether a run directory's, a cache's or a study's. history.jsonl alone is appended
line by line; a line cut short by a kill is dropped when the run continues.
"""
from __future__ import annotations

import glob
import json
import os
import random
import tempfile
from typing import IO, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

CONFIG = "config.json"
HISTORY = "history.jsonl"
CHECKPOINTS = "checkpoints"
ARCH = "arch.json"
RESULT = "result.json"
BEST_NET, LAST_NET = "best.pt", "last.pt"
EXCLUDED_FILES = "excluded_files.tsv"
SPLIT = "heldout_split.json"
LATENCY_TABLE = "latency_table.json"
TENSORBOARD = "tensorboard"
CHECKPOINT_PREFIX = "ckpt_"


class RunFileError(ValueError):
    """A run directory's file that is missing, unreadable or not what its name promises."""


class CheckpointError(RuntimeError):
    pass


# --- the one atomic writer ----------------------------------------------------------------------------------------
def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """`write(f)` into a temporary file beside `path`, flushed to disk, then renamed over `path`: readers see the
    old file or the whole new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def write_json(path: str, data, indent: Optional[int] = 1, newline: bool = True, **dump) -> None:
    """`data` as JSON (`indent`, then a newline unless `newline=False`), atomically."""
    write_text(path, json.dumps(data, indent=indent, **dump) + ("\n" if newline else ""))


def save_torch(path: str, obj) -> None:
    write_atomic(path, lambda f: torch.save(obj, f), binary=True)


def read_json(path: str, what: str = "file"):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFileError(f"{path} is not a readable {what} ({type(e).__name__}: {e})") from None


# --- config.json --------------------------------------------------------------------------------------------------
def write_config(run_dir: str, config: dict) -> None:
    write_json(os.path.join(run_dir, CONFIG), config, indent=2, newline=False)


def read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(path):
        raise RunFileError(f"{run_dir} is not a run directory (no {CONFIG})")
    return read_json(path, "run configuration")


def continued_config(run_dir: str, given: dict, run_only: Sequence[str], check: bool) -> dict:
    """The saved configuration of the run in `run_dir`, with the fields of `run_only` (how it runs, not what
    it computes) taken from `given`. `check`: the command named the directory as its output, not as a run
    to resume, so its other settings must be the saved ones (else a ValueError names the differences)."""
    if not os.path.exists(os.path.join(run_dir, CONFIG)):
        raise ValueError(f"cannot continue {run_dir}: {os.path.join(run_dir, CONFIG)} does not exist")
    saved = read_config(run_dir)
    if check:
        differ = [k for k in saved if k not in run_only and given.get(k) != saved[k]]
        if differ:
            detail = ", ".join(f"{k}: saved {saved[k]!r}, given {given.get(k)!r}" for k in differ[:6])
            raise ValueError(f"{run_dir} holds a checkpointed run with other settings ({detail}); use another "
                             f"--out, or --resume {run_dir} to continue that run with its own settings")
    saved.update({k: given[k] for k in run_only if k in given})
    saved.update(resume=run_dir, out=run_dir)
    return saved


# --- history.jsonl ------------------------------------------------------------------------------------------------
def start_history(run_dir: str) -> None:
    write_text(os.path.join(run_dir, HISTORY), "")


def append_history(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, HISTORY), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_history(run_dir: str) -> List[dict]:
    """Every complete record of a run's history.jsonl."""
    with open(os.path.join(run_dir, HISTORY)) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


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
    write_atomic(hist, lambda f: f.writelines(keep))


# --- checkpoints/ -------------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def list_checkpoints(directory: str) -> List[str]:
    return sorted(glob.glob(os.path.join(directory, f"{CHECKPOINT_PREFIX}*.pt")))


def latest_iteration(directory: str) -> Optional[int]:
    ckpts = list_checkpoints(directory)
    return int(os.path.basename(ckpts[-1])[len(CHECKPOINT_PREFIX):-3]) if ckpts else None


def save_checkpoint(directory: str, iteration: int, state: dict, keep: int = 2) -> str:
    """`state` as ckpt_<iteration>.pt, atomically; the last `keep` checkpoints are kept."""
    path = os.path.join(directory, f"{CHECKPOINT_PREFIX}{iteration:08d}.pt")
    save_torch(path, state)
    for old in list_checkpoints(directory)[:-keep]:
        os.remove(old)
    return path


def load_latest(directory: str) -> Tuple[str, dict]:
    """(path, state) of the newest checkpoint, loaded with weights_only=True."""
    ckpts = list_checkpoints(directory)
    if not ckpts:
        raise CheckpointError(f"no checkpoint ({CHECKPOINT_PREFIX}*.pt) in {directory}")
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


# --- arch.json ----------------------------------------------------------------------------------------------------
def write_arch(run_dir: str, summary: dict) -> None:
    write_json(os.path.join(run_dir, ARCH), summary, indent=2, newline=False)


def space_from_dict(d, where: str):
    """The SearchSpace a file describes (RunFileError naming `where` for an invalid one)."""
    from ..space import SearchSpace, SpaceConfig
    try:
        return SearchSpace(SpaceConfig.from_dict(d))
    except (TypeError, ValueError, AttributeError) as e:
        raise RunFileError(f"{where}: its space configuration is not valid ({e})") from None


def arch_of(space, strings, choices, where: str) -> List[int]:
    """The choices a file names, by index (`choices`) or block strings (`strings`), checked against each other
    and the space."""
    try:
        if choices is not None:
            arch = [int(m) for m in choices]
            space.check_arch(arch)
            if strings is not None and list(strings) != space.arch_strings(arch):
                raise ValueError(f"its choices {arch} are not its block strings {list(strings)}")
            return arch
        if strings is None:
            raise ValueError("it names no architecture (no 'arch' block strings, no 'choices')")
        return space.arch_from_strings(list(strings))
    except (TypeError, ValueError) as e:
        raise RunFileError(f"{where}: {e}") from None


def arch_path(path: str) -> str:
    """The arch.json of a run directory, or `path` itself."""
    return os.path.join(path, ARCH) if os.path.isdir(path) else path


def read_arch(path: str) -> tuple:
    """(space, choices, the whole summary) of a search's arch.json, or of the one in the run directory `path`."""
    path = arch_path(path)
    if not os.path.isfile(path):
        raise RunFileError(f"{path}: no such file (a search writes arch.json into its run directory when it "
                           f"finishes)")
    d = read_json(path, "arch.json")
    if not isinstance(d, dict) or "space" not in d:
        raise RunFileError(f"{path} is not a search's arch.json (no 'space' entry)")
    space = space_from_dict(d["space"], path)
    return space, arch_of(space, d.get("arch"), d.get("choices"), path), d


# --- result.json --------------------------------------------------------------------------------------------------
def write_result(run_dir: str, result: dict) -> None:
    write_json(os.path.join(run_dir, RESULT), result, indent=2, newline=False)


def read_result(run_dir: str) -> dict:
    return read_json(os.path.join(run_dir, RESULT), "training result")


def finished(run_dir: str, kind: str) -> bool:
    """Whether the search (`kind="search"`, arch.json) or training (result.json) in `run_dir` finished: both
    files are written last, and whole."""
    return os.path.exists(os.path.join(run_dir, ARCH if kind == "search" else RESULT))


# --- best.pt / last.pt: a retrained net -----------------------------------------------------------------------------
def save_net(path: str, state_dict: dict, arch: List[str], space: dict, net: dict) -> None:
    """A retrained net's file: its state dict, its block strings, its space and its options (se_ratio, act)."""
    save_torch(path, {"model": state_dict, "arch": arch, "space": space, "net": net})


def read_net(path: str) -> dict:
    """A net file ("model", and, when the training command wrote it, "arch", "space", "net"), or a supernet
    checkpoint ("model" of a supernet). RunFileError for a file that is neither."""
    if not os.path.isfile(path):
        raise RunFileError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects weights_only refuses, ...
        raise RunFileError(f"--weights {path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunFileError(f"--weights {path} holds no 'model' state dict (expected a retrained net's checkpoint "
                           f"with 'model', 'arch', 'space' and 'net')")
    return state
