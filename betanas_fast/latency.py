"""Latency look-up tables measured on your own device: `python -m betanas_fast.latency build|validate`.

build     times every (choice-block shape x candidate) of a space and its fixed parts, each as the searched
          net runs it (eval mode, BatchNorm folded into the convolutions, the fused depthwise op, the memory
          format and dtype of the deployed net), then whole random networks to measure the per-network
          overhead that a sum of parts misses; writes the table (cost.latency) with its metadata.
validate  times random architectures of the table's space end to end and reports how well the table's
          prediction, and MFLOPs, match them: mean absolute percentage error and Kendall's τ-b, plus a
          scatter plot. `--arch RUN` adds searched architectures, each with its own error.

A search uses a table with `--cost latency --latency-table table.json` (Eq. 6 in ms).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from . import cost as cost_model
from . import ops
from .stats import kendall_tau_b
from .cost.latency import STATISTICS, LatencyTable, LatencyTableError, fixed_keys, machine_info, space_keys
from .cost.measure import Item, Protocol, measure
from .nn.layers import fold_batchnorm
from .nn.supernet import Net, build_candidate
from .runs import files
from .runs.options import add_config_arguments, given, option
from .runs.runtime import model_memory_format, resolve_device
from .space import SPACES, SearchSpace, SpaceConfig, build_space, random_archs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CALIBRATION_SEED = 1_000_003  # the whole networks that measure the overhead; validate's are drawn apart from them


class _Target:
    """Where and how things are timed: device, dtype, batch, memory format, threads."""

    def __init__(self, device: str, dtype: str, batch: int, channels_last: Optional[bool], threads: int):
        if batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        if device != "auto" and device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.batch, self.threads = batch, threads
        # the layout the search and training use on each device unless told otherwise
        self.channels_last = (model_memory_format(self.device) == torch.channels_last if channels_last is None
                              else channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

    @contextlib.contextmanager
    def timing(self):
        """The process set up for timing (fixed threads, denormals flushed, cuDNN's autotuner), and put back
        afterwards: a library call must not change how the rest of the process computes."""
        threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # the fastest algorithms, as a deployed net would pick
        else:
            ops.cache_cpu_allocations()  # reused activation blocks, as in the search and training processes
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)
            torch.backends.cudnn.benchmark = benchmark

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        return fold_batchnorm(module).to(self.device, self.dtype, memory_format=self.memory_format)

    def input(self, channels: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(self.batch, channels, resolution, resolution, generator=generator)
        return x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)

    def meta(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "batch": self.batch, "threads": self.threads,
                "memory_format": "channels_last" if self.channels_last else "contiguous",
                "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}

    @classmethod
    def of_table(cls, table: LatencyTable) -> "_Target":
        m = table.meta
        return cls(m["device"], m["dtype"], m["batch"], m["memory_format"] == "channels_last", m["threads"])


def _net_item(target: _Target, space: SearchSpace, arch: Sequence[int], key: str, gen: torch.Generator) -> Item:
    net = target.module(Net(space, arch))
    x = target.input(space.config.in_channels, space.config.resolution, gen)
    return Item(key, lambda: net(x))


def _part_items(target: _Target, space: SearchSpace, gen: torch.Generator) -> List[Item]:
    """The candidates' and the fixed parts' items, one per distinct shape."""
    items = []
    for key, (l, m) in space_keys(space).items():
        b = space.blocks[l]
        mod = target.module(build_candidate(space, l, m))
        x = target.input(b.in_channels, b.in_resolution, gen)
        items.append(Item(key, lambda mod=mod, x=x: mod(x)))
    net = target.module(Net(space, [min(i for i, ok in enumerate(b.allowed) if ok) for b in space.blocks]))
    keys, cfg = fixed_keys(space), space.config
    x0 = target.input(cfg.in_channels, cfg.resolution, gen)
    x1 = target.input(space.stem_channels, space.first_block_resolution, gen)
    xf = target.input(space.last_channels, space.final_resolution, gen)
    items += [Item(keys["stem"], lambda: net.stem(x0)), Item(keys["first"], lambda: net.first(x1)),
              Item(keys["head"], lambda: net._head(xf))]
    return items


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None, (lambda k: None)
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr)
    return bar, bar.update


def build_table(space: SearchSpace, space_name: str, target: _Target, protocol: Optional[Protocol] = None,
                calibration_archs: int = 16, progress: bool = True, statistic: str = "p10") -> LatencyTable:
    """Measure the table of `space` on `target` (see the module's help); `statistic` of the timing rounds
    predicts (cost.latency.STATISTICS)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {tuple(STATISTICS)}, got {statistic!r}")
    protocol = dataclasses.replace(protocol or Protocol(), quantile=STATISTICS[statistic])
    with target.timing():
        return _build_table(space, space_name, target, protocol, calibration_archs, progress, statistic)


def _build_table(space, space_name, target, protocol, calibration_archs, progress, statistic) -> LatencyTable:
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(protocol.seed)
    parts = _part_items(target, space, gen)
    # Whole random networks, timed in the same interleaved passes as the parts (so that both see the same
    # machine): measured minus the sum of their parts is the per-network overhead.
    archs = random_archs(space, calibration_archs, CALIBRATION_SEED)
    nets = [_net_item(target, space, a, f"calibration net {i}", gen) for i, a in enumerate(archs)]
    bar, update = _progress(len(parts) + len(nets), "latency table", progress)
    stats = measure(parts + nets, target.device, protocol, update)
    if bar:
        bar.close()
    fixed_set = set(fixed_keys(space).values())
    table = LatencyTable(meta={"statistic": statistic},
                         entries={it.key: stats[it.key] for it in parts if it.key not in fixed_set},
                         fixed={it.key: stats[it.key] for it in parts if it.key in fixed_set})
    sums = [table.sum_ms(space, a) for a in archs]
    meas = [stats[it.key][statistic] for it in nets]
    table.network = {"overhead_ms": float(np.median(np.subtract(meas, sums))) if archs else 0.0,
                     "calibration_archs": [space.arch_strings(a) for a in archs],
                     "measured_ms": meas, "sum_ms": sums}
    table.meta = dict(machine_info(target.device.type), **target.meta(), statistic=statistic, space_name=space_name,
                      space=space.config.to_dict(), resolution=space.config.resolution,
                      date=datetime.datetime.now().isoformat(timespec="seconds"), protocol=protocol.to_dict(),
                      build_seconds=round(time.perf_counter() - t0, 1),
                      unconverged=sorted(k for k, v in stats.items() if not v["converged"]))
    return table


# --- validate ------------------------------------------------------------------------------------------------------
def mape(pred: Sequence[float], measured: Sequence[float]) -> float:
    p, m = np.asarray(pred, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    return float(np.mean(np.abs(p - m) / m) * 100)


def _read_arch(source: str, space: SearchSpace) -> List[int]:
    arch_space, arch, _ = files.read_arch(source)
    if arch_space.config.to_dict() != space.config.to_dict():
        raise ValueError(f"{source}: its space is not the table's space ({space.config.to_dict()})")
    return arch


def validate(table: LatencyTable, n_archs: int = 30, seed: int = 0, extra: Sequence[tuple] = (),
             progress: bool = True, protocol: Optional[Protocol] = None) -> dict:
    """Measure `n_archs` random architectures (and the (name, arch) pairs of `extra`) end to end on the
    table's device and settings; compare with the table's prediction and with MFLOPs (fitted by least
    squares to the same measurements: the best any FLOPs-proportional model can do on them)."""
    target = _Target.of_table(table)
    with target.timing():
        return _validate(table, target, n_archs, seed, list(extra), progress, protocol)


def _validate(table, target, n_archs, seed, extra, progress, protocol) -> dict:
    space = SearchSpace(SpaceConfig.from_dict(table.meta["space"]))
    calibration = [space.arch_from_strings(s) for s in table.network.get("calibration_archs", [])]
    archs = random_archs(space, n_archs, seed, exclude=calibration)
    named = [(f"random{i}", a) for i, a in enumerate(archs)] + extra
    gen = torch.Generator().manual_seed(seed)
    items = [_net_item(target, space, a, name, gen) for name, a in named]
    bar, update = _progress(len(items), "whole networks", progress)
    protocol = dataclasses.replace(protocol or Protocol(seed=seed), quantile=STATISTICS[table.statistic])
    stats = measure(items, target.device, protocol, update)
    if bar:
        bar.close()
    rows = [{"name": name, "arch": space.arch_strings(a), "measured_ms": stats[name][table.statistic],
             "measured_median_ms": stats[name]["median"], "measured_mad_ms": stats[name]["mad"],
             "sum_ms": table.sum_ms(space, a),
             "predicted_ms": table.predict_ms(space, a), "mflops": cost_model.arch_cost(space, a).mflops}
            for name, a in named]
    rand = rows[:len(archs)]
    meas = [r["measured_ms"] for r in rand]
    mflops = [r["mflops"] for r in rand]
    slope, intercept = np.polyfit(mflops, meas, 1) if len(rand) >= 2 else (0.0, float(np.mean(meas)))
    result = {
        "table": table.path, "table_meta": table.meta, "archs": len(rand), "seed": seed,
        "overhead_ms": table.overhead_ms,
        "table_mape": mape([r["predicted_ms"] for r in rand], meas),
        "sum_only_mape": mape([r["sum_ms"] for r in rand], meas),
        "table_tau": kendall_tau_b([r["predicted_ms"] for r in rand], meas),
        "mflops_tau": kendall_tau_b(mflops, meas),
        "mflops_fit": {"ms_per_mflop": float(slope), "intercept_ms": float(intercept)},
        "mflops_fit_mape": mape(np.polyval([slope, intercept], mflops), meas),
        "measured_range_ms": [min(meas), max(meas)] if meas else None,
        "rows": rows,
    }
    random_errors = np.abs([100 * (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rand])
    for r in rows[len(archs):]:
        r["error_pct"] = 100 * (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
        r["within_table_mape"] = abs(r["error_pct"]) <= result["table_mape"]
        # how its error compares with the random nets': the share of them predicted better
        r["random_nets_predicted_better"] = float(np.mean(random_errors < abs(r["error_pct"])))
    return result


def plot_validation(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    rand = rows[:result["archs"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    meas = [r["measured_ms"] for r in rand]
    ax = axes[0]
    ax.scatter([r["predicted_ms"] for r in rand], meas, s=18, label="random architectures")
    for r in rows[result["archs"]:]:
        ax.scatter([r["predicted_ms"]], [r["measured_ms"]], marker="*", s=120, label=r["name"])
    lo, hi = min(meas + [r["predicted_ms"] for r in rows]), max(meas + [r["predicted_ms"] for r in rows])
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("table prediction (ms)")
    ax.set_ylabel("measured (ms)")
    ax.set_title(f"table: MAPE {result['table_mape']:.1f} %, τ {result['table_tau']:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.scatter([r["mflops"] for r in rand], meas, s=18, color="#c44e52")
    xs = np.linspace(min(r["mflops"] for r in rand), max(r["mflops"] for r in rand), 2)
    fit = result["mflops_fit"]
    ax.plot(xs, fit["ms_per_mflop"] * xs + fit["intercept_ms"], "k--", lw=0.8)
    ax.set_xlabel("MFLOPs (multiply-adds)")
    ax.set_ylabel("measured (ms)")
    ax.set_title(f"MFLOPs (least-squares fit): MAPE {result['mflops_fit_mape']:.1f} %, τ {result['mflops_tau']:.3f}",
                 fontsize=9)
    m = result["table_meta"]
    fig.suptitle(f"{m.get('device_name')} · batch {m.get('batch')} · {m.get('dtype')} · {m.get('threads')} "
                 f"thread(s) · {m.get('statistic', 'median')} of the timing rounds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_validation(result: dict) -> str:
    lines = [f"{result['archs']} random architectures, measured {result['measured_range_ms'][0]:.3f}-"
             f"{result['measured_range_ms'][1]:.3f} ms ({result['table_meta'].get('statistic', 'median')} of the "
             f"timing rounds, as the table)",
             f"{'predictor':<34} {'MAPE %':>7} {'Kendall tau-b':>14}",
             f"{'table (sum + network overhead)':<34} {result['table_mape']:>7.2f} {result['table_tau']:>14.3f}",
             f"{'table (sum of parts only)':<34} {result['sum_only_mape']:>7.2f} {result['table_tau']:>14.3f}",
             f"{'MFLOPs (least-squares fit)':<34} {result['mflops_fit_mape']:>7.2f} {result['mflops_tau']:>14.3f}"]
    for r in result["rows"][result["archs"]:]:
        lines.append(f"{r['name']}: predicted {r['predicted_ms']:.4f} ms, measured {r['measured_ms']:.4f} ms "
                     f"({r['error_pct']:+.2f} %: {'within' if r['within_table_mape'] else 'OUTSIDE'} the table's MAPE; "
                     f"{r['random_nets_predicted_better']:.0%} of the random nets were predicted better)")
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------------------------
@dataclass
class BuildConfig:
    space: str = option("demo", "the named space", choices=tuple(SPACES))
    width_mult: Optional[float] = option(None, "the space's width multiplier (as the search's; default: the space's)",
                                         type=float)
    resolution: Optional[int] = option(None, "input resolution (default: the space's)", type=int)
    num_classes: Optional[int] = option(None, "classifier outputs (default: the space's)", type=int)
    device: str = option("cpu", "cpu, cuda, cuda:N or auto")
    batch: int = option(1, "batch of the timed inference")
    dtype: str = option("float32", "the timed dtype", choices=tuple(DTYPES))
    threads: int = option(1, "CPU threads, fixed while timing")
    channels_last: Optional[bool] = option(None, "NHWC tensors (default: the layout the search and training run in, "
                                                 "runs.runtime.model_memory_format)", type=bool)
    statistic: str = option("p10", "what predicts: the 10th percentile of each entry's timing rounds (what the network "
                                   "itself costs; interference from outside only adds time) or their median",
                            choices=tuple(STATISTICS))
    calibration_archs: int = option(16, "random whole networks timed to measure the per-network overhead")
    rel_ci: float = option(Protocol.rel_ci, "stop timing an entry when its median's 95 %% interval is within this "
                                            "relative margin")
    max_passes: int = option(Protocol.max_passes, "rounds per entry at most")
    seed: int = option(0, "inputs and the order of the timing rounds")
    out: Optional[str] = option(None, "the table's file (default latency-<space>-<device>-b<batch>.json)", type=str)
    progress: bool = option(True, "progress bar")


@dataclass
class ValidateConfig:
    table: Optional[str] = option(None, "a table built by `build` (required)", type=str)
    archs: int = option(30, "random architectures to time")
    seed: int = option(0, "which random architectures")
    arch: List[str] = option([], "search run directories or arch.json files to time too", type=str, nargs="+")
    out: Optional[str] = option(None, "directory of validate.json and validate.png (default: beside the table, "
                                      "<table>-validate/)", type=str)
    latency_table_any_machine: bool = option(False, "time here even though the table was measured on another machine")
    progress: bool = option(True, "progress bar")


COMMANDS = {"build": (BuildConfig, "measure a space's latency table on this device"),
            "validate": (ValidateConfig, "compare the table's predictions with whole networks timed end to end")}


def parse_command(argv: Optional[List[str]] = None):
    """(command, its config) from the command line."""
    p = argparse.ArgumentParser(prog="python -m betanas_fast.latency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (config_cls, help_text) in COMMANDS.items():
        add_config_arguments(sub.add_parser(name, help=help_text,
                                            formatter_class=argparse.RawDescriptionHelpFormatter), config_cls)
    args = p.parse_args(argv)
    config_cls = COMMANDS[args.command][0]
    return args.command, config_cls(**given(args, skip=("command",)))


def main(argv: Optional[List[str]] = None):
    command, args = parse_command(argv)
    try:
        if command == "build":
            overrides = {k: getattr(args, k) for k in ("width_mult", "resolution", "num_classes")
                         if getattr(args, k) is not None}
            space = build_space(args.space, **overrides)
            target = _Target(args.device, args.dtype, args.batch, args.channels_last, args.threads)
            out = args.out or f"latency-{args.space}-{target.device.type}-b{args.batch}.json"
            if os.path.dirname(out):
                os.makedirs(os.path.dirname(out), exist_ok=True)
            print(f"latency table of the {args.space} space ({len(space_keys(space))} candidate shapes + 3 fixed "
                  f"parts) on {target.device}, batch {args.batch}, {args.dtype}, {args.threads} thread(s)", flush=True)
            table = build_table(space, args.space, target, Protocol(rel_ci=args.rel_ci, max_passes=args.max_passes,
                                                                    seed=args.seed),
                                calibration_archs=args.calibration_archs, progress=args.progress,
                                statistic=args.statistic)
            table.save(out)
            n_unconv = len(table.meta["unconverged"])
            print(f"wrote {out}: {len(table.entries)} entries, network overhead {table.overhead_ms:+.4f} ms, "
                  f"built in {table.meta['build_seconds']} s"
                  + (f"; {n_unconv} item(s) did not reach ±{args.rel_ci:.0%} within {args.max_passes} passes"
                     if n_unconv else ""))
            return table
        if args.table is None:
            raise ValueError("validate needs --table (a table built by `build`)")
        table = LatencyTable.load(args.table)
        if not args.latency_table_any_machine:
            table.check_machine()
        space = SearchSpace(SpaceConfig.from_dict(table.meta["space"]))
        extra = [(os.path.basename(os.path.normpath(a)), _read_arch(a, space)) for a in args.arch]
        result = validate(table, args.archs, args.seed, extra, progress=args.progress)
        out = args.out or os.path.splitext(args.table)[0] + "-validate"
        files.write_json(os.path.join(out, "validate.json"), result, indent=1, newline=False)
        plot_validation(result, os.path.join(out, "validate.png"))
        print(format_validation(result))
        print(f"wrote {out}/validate.json and validate.png")
        return result
    except (ValueError, LatencyTableError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
