"""Where a number comes from: the machine, the code's commit and the date, stamped on every results file.

Every figure the project states lives in a JSON file under `benchmarks/results/` that a named command
writes with `write_results`; the file carries a `stamp` (date, commit, machine, the command that wrote it),
so a figure can always be traced to the run that produced it and be regenerated.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from typing import Dict, List, Optional

from . import files

# The CPU features that decide which kernels and precisions are fast; recorded with every result.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_bf16", "asimd", "sve", "bf16")


def _cpuinfo_field(name: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The feature flags the kernel reports for the first CPU (Linux `/proc/cpuinfo`; empty elsewhere)."""
    flags = _cpuinfo_field("flags") or _cpuinfo_field("Features") or ""
    return flags.split()


def machine() -> Dict[str, object]:
    """The CPU (model, the features that matter, cores), torch, Python, the kernel build and the GPU if any."""
    import torch
    from .._ext import build_info
    flags = set(cpu_flags())
    info = build_info()
    m = {"cpu": cpu_model(), "cpu_features": [f for f in CPU_FEATURES if f in flags],
         "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
         "python": platform.python_version(), "kernels_loaded": bool(info["kernels_loaded"]),
         "cpu_march": info.get("cpu_march"), "gpu": None}
    if torch.cuda.is_available():
        m["gpu"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return m


def commit(repo: Optional[str] = None) -> str:
    """The checkout's commit, with "+dirty" when tracked files differ from it; "unknown" outside git."""
    repo = repo or os.getcwd()
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(command: str, repo: Optional[str] = None) -> Dict[str, object]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(repo), "command": command, "machine": machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _plain(value):
    """JSON-safe: tensors and numpy scalars to Python numbers, non-finite floats to None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, data) -> None:
    """A results or study file: JSON-safe (`_plain`), atomically (files.write_atomic)."""
    files.write_json(path, _plain(data), indent=1, allow_nan=False)


def write_results(path: str, command: str, data: dict, repo: Optional[str] = None) -> dict:
    """Writes `{"stamp": ..., **data}` to `path` (a results file) and returns it."""
    if "stamp" in data:
        raise ValueError("results data must not carry its own 'stamp'")
    doc = {"stamp": stamp(command, repo or os.path.dirname(os.path.abspath(path))), **data}
    write_json(path, doc)
    return doc


def read_results(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if "stamp" not in doc:
        raise ValueError(f"{path} is not a results file (no 'stamp')")
    return doc
