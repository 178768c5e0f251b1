"""What every study shares: the options common to all three, the study directory (its saved configuration,
study.json, timing.json), the sub-runs and how they run, and the versions a result was computed with.

A sub-run is one `python -m betanas_fast.search` or `python -m betanas_fast.train` run in a directory of
its own under the study's: with `--jobs 1` (the default, and the only choice under torchrun) the study calls
`Search(cfg).run()` / `Trainer(cfg).run()` in its own process, one after another, so that under torchrun
each sub-run is one distributed run over all the processes; with `--jobs N` it runs each as that command in
a process of its own, N at a time, with its output in `<sub-run>/study_log.txt`. A sub-run that finished
(arch.json or result.json written) is never redone; one that was killed continues from its last checkpoint,
as the commands do by themselves when their `--out` holds one.

Every net a study compares is scored on images no search loads: on an embedded data set (digits,
mnist-cluttered) its fixed test split (`python -m betanas_fast.train --score-split test`, and the supernets'
architectures likewise). A study's saved configuration records the data sets' split definitions, so that a
study continued under another one is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from .. import cost as cost_model
from ..runs.provenance import write_json  # noqa: F401  (the studies' atomic JSON writer, re-exported)
from ..runs import files, ranks as run_ranks
from ..runs.options import field_default, option

STUDY_CONFIG = "study_config.json"
RESULT = "study.json"
TIMING = "timing.json"
SUBRUN_LOG = "study_log.txt"
# How a study is executed, not what it computes: these may differ when a study is continued (and so may each
# study's `analysis_only` options).
RUN_ONLY = ("out", "jobs", "threads", "progress")


@dataclass
class StudyOptions:
    """The options of every study (each study's dataclass adds its own)."""
    out: Optional[str] = option(None, "study directory (default runs/study-<name>). The same command again continues "
                                      "a killed study there: finished sub-runs are not redone", type=str)
    seed: int = option(0, "the first seed: sub-run i uses seed + i where the study has several")
    jobs: int = option(1, "sub-runs at a time, each as its own process (1: one after another inside this process; "
                          "the only choice under torchrun, where each sub-run then runs over all the processes)")
    threads: Optional[int] = option(None, "CPU threads of each sub-run (default: torch's with --jobs 1, the cores "
                                          "divided by --jobs otherwise)", type=int)
    progress: bool = option(True, "the sub-runs' progress bars (off in --jobs processes, whose output goes to "
                                  "their log files)")
    search_flags: str = option("", "flags of `python -m betanas_fast.search` for every search of the study, as one "
                                   "string: --search-flags=\"--preset imagenet --data /data/imagenet\" (default: "
                                   "none, the search's own defaults)")

    # options that change only what is computed from the finished sub-runs: a continued study may change them
    analysis_only: ClassVar[Tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def to_argv(cfg) -> List[str]:
    """The command line that `add_config_arguments`'s parser reads back as `cfg` (fields at their default
    left out)."""
    argv = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        default = field_default(f)
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            raise ValueError(f"{f.name}: None cannot be given on a command line (its default is {default!r})")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def parse_flags(flags: str, parse: Callable[[List[str]], object], what: str, set_by_study: Sequence[str]):
    """A command's configuration from a flag string, with its own parser; flags the study sets itself are
    refused (the study's own option for them is named)."""
    tokens = shlex.split(flags)
    for name in set_by_study:
        flag = "--" + name.replace("_", "-")
        if any(t == flag or t.startswith(flag + "=") or t == "--no-" + flag[2:] for t in tokens):
            raise ValueError(f"{flag} in the {what} flags: the study sets it for every sub-run")
    return parse(tokens)


def search_config(flags: str, set_by_study: Sequence[str]):
    """The studies' base SearchConfig: `python -m betanas_fast.search`'s defaults, preset and flags."""
    from ..search.config import parse_config
    return parse_flags(flags, parse_config, "search", set_by_study)


def train_config(flags: str, set_by_study: Sequence[str]):
    """The studies' base TrainConfig: `python -m betanas_fast.train`'s defaults, recipe and flags, scored on
    `scored_split(...)` (the studies set --score-split)."""
    from ..train import parse_config, validate_scoring
    cfg = parse_flags(flags, parse_config, "train", tuple(set_by_study) + ("score_split",))
    cfg = dataclasses.replace(cfg, score_split=scored_split(cfg))
    try:
        validate_scoring(cfg)
    except ValueError as e:
        raise ValueError(f"in the train flags: the study scores every net on the {cfg.score_split} split: {e}") from e
    return cfg


def scored_split(train_cfg) -> str:
    """The split every net of a study is scored on: the embedded data set's test split, which no search loads;
    with --data (which sets no test split apart) val/ or its carve-out."""
    return "test" if train_cfg.data is None else "val"


def same_data(base_search, base_train):
    """The retrainings' configuration on the searches' data: the same embedded data set (the train flags' auto
    resolved to the searches'), or --data in both."""
    if (base_search.data is None) != (base_train.data is None):
        raise ValueError("the search flags and the train flags must use the same data (--data in both or in neither)")
    if base_train.data is None:
        if base_train.dataset == "auto":
            return dataclasses.replace(base_train, dataset=base_search.dataset)
        if base_train.dataset != base_search.dataset:
            raise ValueError(f"the searches run on {base_search.dataset} but the retrainings on {base_train.dataset}")
    return base_train


def data_splits(resolved: dict) -> Optional[dict]:
    """The split definitions of the embedded data sets the study's sub-runs use (searches or trainings without
    --data), else None."""
    from ..data import EMBEDDED, get_dataset
    configs = []
    for c in resolved.values():  # a run's configuration, or one per strategy ({name: configuration})
        if isinstance(c, dict):
            configs += [c] if "data" in c else [v for v in c.values() if isinstance(v, dict) and "data" in v]
    names = sorted({c.get("dataset", "digits") for c in configs
                    if c.get("data") is None and c.get("dataset", "digits") in EMBEDDED})
    splits = {n: get_dataset(n).splits for n in names}
    return splits or None


def run_space(run_dir: str):
    """The space of a finished search (its arch.json carries it)."""
    return files.read_arch(run_dir)[0]


def short(name: str) -> str:
    """mb_k5_e6 -> k5e6 (table columns)."""
    return name.replace("mb_", "").replace("_", "")


def arch_file(space, arch: List[int], strategy: str) -> dict:
    """What train.py and export read from an arch.json: the space, the block strings and the choices."""
    net = cost_model.arch_cost(space, arch)
    return {"strategy": strategy, "space": space.config.to_dict(), "candidates": space.candidate_names,
            "arch": space.arch_strings(arch), "choices": list(arch), "mflops": net.mflops, "macs": net.macs,
            "params": net.params}


@dataclass
class SubRun:
    """One search or training of the study, in the directory `config.out`."""
    name: str
    command: str  # "search" or "train"
    config: object  # SearchConfig or TrainConfig

    @property
    def out(self) -> str:
        return self.config.out

    def finished(self) -> bool:
        return files.finished(self.out, self.command)

    def run_here(self) -> None:
        if self.command == "search":
            from ..search import Search
            Search(self.config).run()
        else:
            from ..train import Trainer
            Trainer(self.config).run()

    def argv(self) -> List[str]:
        return [sys.executable, "-m", f"betanas_fast.{self.command}", *to_argv(self.config)]


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


read_history = files.read_history  # a search's or a training's history.jsonl


def versions() -> dict:
    import numpy
    import torch

    import betanas_fast
    return {"betanas_fast": betanas_fast.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "kernels_loaded": bool(betanas_fast.KERNELS_LOADED)}


class StudyRun:
    """A study's directory and its sub-runs: the configuration saved (or checked against the saved one), the
    sub-runs run or skipped, their wall times kept in timing.json (apart from study.json, whose numbers
    depend on the seeds only), the result written by rank 0."""

    def __init__(self, name: str, cfg: StudyOptions):
        if cfg.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {cfg.jobs}")
        self.ranks = run_ranks.ranks_from_env()
        if self.ranks.active and cfg.jobs != 1:
            raise ValueError("under torchrun the sub-runs run one after another over all the processes: leave --jobs "
                             "at 1")
        self.name, self.cfg = name, cfg
        self.out = cfg.out or os.path.join("runs", f"study-{name}")
        self.threads = cfg.threads or (None if cfg.jobs == 1 else max(1, (os.cpu_count() or 1) // cfg.jobs))
        self.timing_path = os.path.join(self.out, TIMING)
        self.timing: Dict[str, float] = {}
        self.started = time.perf_counter()

    def log(self, *args) -> None:
        if self.ranks.is_main:
            print(*args, flush=True)

    def start(self, resolved: dict) -> None:
        """Saves the study's configuration (with the sub-runs' resolved base configurations), or checks that
        a continued study has the same one."""
        if self.ranks.active:
            run_ranks.init(self.ranks, "auto")  # the barriers between sub-runs need the process group
        saved_path = os.path.join(self.out, STUDY_CONFIG)
        config = {"study": self.name, **self.cfg.to_dict(), "resolved": resolved,
                  "data_splits": data_splits(resolved)}
        if os.path.exists(saved_path):
            saved = read_json(saved_path)
            free = RUN_ONLY + self.cfg.analysis_only
            defaults = {f.name: field_default(f) for f in fields(self.cfg)}

            def same(k: str) -> bool:
                if k in saved:
                    return saved[k] == config.get(k)
                # an option added since the study was made is the same setting where it is given its default
                return k in defaults and config.get(k) == defaults[k]
            differ = [k for k in sorted(set(saved) | set(config)) if k not in free and not same(k)]
            if differ:
                detail = ", ".join(f"{k}: saved {saved.get(k)!r}, given {config.get(k)!r}" for k in differ[:4])
                raise ValueError(f"{self.out} holds a study with other settings ({detail}); use another --out")
            self.log(f"continuing the study in {self.out}")
        if os.path.exists(self.timing_path):
            self.timing = read_json(self.timing_path)
        self.ranks.barrier()
        if self.ranks.is_main:
            os.makedirs(self.out, exist_ok=True)
            write_json(saved_path, config)
        self.log(f"study {self.name}: configuration\n" + json.dumps(config, indent=2))

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def subrun(self, name: str, command: str, config) -> SubRun:
        """A sub-run in `<study>/<name>` with the study's thread count and progress setting."""
        progress = self.cfg.progress and self.cfg.jobs == 1
        return SubRun(name, command, dataclasses.replace(config, out=self.path(name), threads=self.threads,
                                                         progress=progress))

    def run(self, subruns: List[SubRun]) -> None:
        todo = [s for s in subruns if not s.finished()]
        if len(todo) < len(subruns):
            self.log(f"{len(subruns) - len(todo)} of {len(subruns)} sub-runs finished before: not redone")
        continued = set(self.timing.get("continued", []))
        for s in todo:  # continued from a checkpoint that no stop of this study's own left a time for
            if not files.list_checkpoints(files.checkpoint_dir(s.out)):
                continued.discard(s.name)  # (re)started from scratch: its time will be whole
            elif s.name not in self.timing.get("stopped", {}):
                continued.add(s.name)
        self.timing.pop("continued", None)
        if continued:
            self.timing["continued"] = sorted(continued)
        if self.cfg.jobs == 1:
            for s in todo:
                self.log(f"--- sub-run {s.name}: python -m betanas_fast.{s.command} {shlex.join(to_argv(s.config))}")
                start = time.perf_counter()
                s.run_here()
                self.ranks.barrier()  # rank 0 has written the sub-run's result file
                self._record(s, time.perf_counter() - start)
        else:
            self._run_processes(todo)
        missing = [s.name for s in subruns if not s.finished()]
        if missing:
            raise RuntimeError(f"sub-runs {missing} ended without their result file")

    def _record(self, s: SubRun, seconds: float, finished: bool = True) -> None:
        """A sub-run's wall time: a stopped one's part is kept under "stopped" and added when it finishes; one
        continued from a checkpoint whose earlier part is unknown (the study was killed) is listed under
        "continued", its time only the continuation's."""
        stopped = self.timing.setdefault("stopped", {})
        if finished:
            self.timing[s.name] = round(seconds + stopped.pop(s.name, 0.0), 1)
        else:
            stopped[s.name] = round(seconds + stopped.get(s.name, 0.0), 1)
        if not stopped:
            del self.timing["stopped"]
        if self.ranks.is_main:
            write_json(self.timing_path, self.timing)

    def _run_processes(self, todo: List[SubRun]) -> None:
        queue, running = list(todo), {}
        try:
            while queue or running:
                while queue and len(running) < self.cfg.jobs:
                    s = queue.pop(0)
                    os.makedirs(s.out, exist_ok=True)
                    log_file = open(os.path.join(s.out, SUBRUN_LOG), "a")
                    proc = subprocess.Popen(s.argv(), stdout=log_file, stderr=subprocess.STDOUT)
                    running[proc] = (s, time.perf_counter(), log_file)
                    self.log(f"--- sub-run {s.name} started (process {proc.pid}; output in "
                             f"{os.path.join(s.out, SUBRUN_LOG)})")
                time.sleep(0.2)
                for proc in [p for p in running if p.poll() is not None]:
                    s, start, log_file = running.pop(proc)
                    log_file.close()
                    if proc.returncode != 0:
                        with open(os.path.join(s.out, SUBRUN_LOG)) as f:
                            tail = "".join(f.readlines()[-15:])
                        raise RuntimeError(f"sub-run {s.name} failed (exit status {proc.returncode}); the end of "
                                           f"its log:\n{tail}")
                    self._record(s, time.perf_counter() - start)
                    self.log(f"--- sub-run {s.name} finished ({self.timing[s.name]:.0f} s)")
        finally:
            for proc, (s, start, log_file) in running.items():  # an error or an interrupt: stop the others
                proc.terminate()
                proc.wait()
                log_file.close()
                self._record(s, time.perf_counter() - start, finished=False)

    def finish(self, result: dict, table: str, figures: Callable[[str], List[str]]) -> dict:
        """Writes study.json and the figures (rank 0), prints the table, and leaves the process group."""
        result = {"study": self.name, "config": self.cfg.to_dict(), **result, "versions": versions()}
        self.timing.setdefault("invocations", []).append(round(time.perf_counter() - self.started, 1))
        if self.ranks.is_main:
            write_json(self.timing_path, self.timing)
            write_json(self.path(RESULT), result)
            written = figures(self.out)
            print(table)
            print(f"wrote {self.path(RESULT)}, {', '.join(written)}; sub-run wall times in {self.timing_path}",
                  flush=True)
        run_ranks.shutdown()
        return result
