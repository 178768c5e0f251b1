"""The searched architecture as data (arch.json) and as a printed table."""
from __future__ import annotations

from typing import List, Optional

from .. import cost as cost_model
from ..space import SearchSpace


def arch_summary(space: SearchSpace, state, arch: List[int], strategy: str, val_acc: Optional[float],
                 cost: Optional[cost_model.SearchCost] = None, extra: Optional[dict] = None) -> dict:
    """`cost` is the search's cost of Eq. 6 (default: FLOPs without a target); with a latency cost the summary
    also gives the searched net's predicted latency, per block and whole, and the table it came from."""
    cost = cost or cost_model.flops_cost(space)
    flops_target = cost.target if cost.kind == "flops" else None
    latency = cost if cost.kind == "latency" else None
    names = space.candidate_names
    alpha, p = state.alpha.detach(), state.probs()
    net = cost_model.arch_cost(space, arch)
    macs, _ = cost_model.candidate_cost_table(space)
    blocks = []
    for l, (b, m) in enumerate(zip(space.blocks, arch)):
        blocks.append({
            "block": l, "stage": b.stage, "in_channels": b.in_channels, "out_channels": b.out_channels,
            "stride": b.stride, "op": space.block_string(l, m), "candidate": names[m],
            "alpha": {names[k]: float(alpha[l, k]) for k in range(len(names)) if state.remaining[l, k]},
            "p": {names[k]: float(p[l, k]) for k in range(len(names)) if state.remaining[l, k]},
            "chosen_p": float(p[l, m]), "mflops": macs[l][m] / 1e6,
            **({"latency_ms": float(latency.table[l, m])} if latency else {}),
            "dropped": [{"op": names[d["path"]], "step": d["step"], "alpha": d["alpha"], "p": d["p"]}
                        for d in state.drops if d["block"] == l]})
    return {"strategy": strategy, "space": space.config.to_dict(), "candidates": names,
            "arch": [space.block_string(l, m) for l, m in enumerate(arch)], "choices": list(arch),
            "mflops": net.mflops, "macs": net.macs, "params": net.params, "val_acc": val_acc,
            "flops_target": flops_target,
            "meets_flops_target": None if flops_target is None else bool(net.mflops <= flops_target),
            "cost": cost.kind, **(_latency_summary(latency, arch) if latency else {}),
            "blocks": blocks, **(extra or {})}


def _latency_summary(latency: cost_model.SearchCost, arch: List[int]) -> dict:
    table = latency.latency
    predicted = latency.of_arch(arch)
    return {"latency_ms": predicted, "latency_target": latency.target,
            "meets_latency_target": None if latency.target is None else bool(predicted <= latency.target),
            "latency_table": {"file": table.path, "measured_on": table.describe(),
                              "network_overhead_ms": table.overhead_ms}}


def cost_caption(summary: dict) -> str:
    """The searched net's cost in one line: MFLOPs, params, and the predicted latency where a table was used."""
    text = f"{summary['mflops']:.2f} MFLOPs, {summary['params'] / 1e6:.3f} M params"
    if summary.get("latency_ms") is not None:
        text += f", {summary['latency_ms']:.3f} ms predicted ({summary['latency_table']['measured_on']})"
    return text


def format_table(summary: dict) -> str:
    latency = summary.get("latency_ms") is not None
    rows = [f"{'blk':>3} {'in->out':>9} {'s':>1}  {'chosen op':<22} {'p':>6} {'MFLOPs':>8}"
            + (f" {'ms':>8}" if latency else "") + "  dropped (op@step)"]
    for b in summary["blocks"]:
        dropped = ", ".join(f"{d['op']}@{d['step']}" for d in b["dropped"]) or "-"
        rows.append(f"{b['block']:>3} {str(b['in_channels']) + '->' + str(b['out_channels']):>9} {b['stride']:>1}  "
                    f"{b['op']:<22} {b['chosen_p']:>6.3f} {b['mflops']:>8.4f}"
                    + (f" {b['latency_ms']:>8.4f}" if latency else "") + f"  {dropped}")
    acc, target = summary["val_acc"], summary.get("flops_target")
    rows.append(f"strategy {summary['strategy']}: {summary['mflops']:.4f} MFLOPs (multiply-adds), "
                f"{summary['params'] / 1e6:.4f} M params"
                + ("" if acc is None else f", validation accuracy {acc:.4f} (inherited weights, BN recalibrated)"))
    if latency:
        rows.append(f"predicted latency {summary['latency_ms']:.4f} ms (the blocks above, stem, first block, head and "
                    f"the network overhead of {summary['latency_table']['network_overhead_ms']:.4f} ms), on "
                    f"{summary['latency_table']['measured_on']}")
    if target is not None:
        verdict = "meets it" if summary["meets_flops_target"] else "ABOVE it"
        rows.append(f"FLOPs target {target:.4f} MFLOPs: the searched net ({summary['mflops']:.4f} MFLOPs) {verdict}")
    if latency and summary.get("latency_target") is not None:
        verdict = "meets it" if summary["meets_latency_target"] else "ABOVE it"
        rows.append(f"latency target {summary['latency_target']:.4f} ms: the searched net "
                    f"({summary['latency_ms']:.4f} ms predicted) {verdict}")
    return "\n".join(rows)
