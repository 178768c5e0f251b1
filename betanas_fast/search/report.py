"""The searched architecture as data (arch.json) and as a printed table."""
from __future__ import annotations

from typing import List, Optional

from .. import cost as cost_model
from ..space import SearchSpace


def arch_summary(space: SearchSpace, state, arch: List[int], strategy: str, val_acc: Optional[float],
                 flops_target: Optional[float] = None, extra: Optional[dict] = None) -> dict:
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
            "dropped": [{"op": names[d["path"]], "step": d["step"], "alpha": d["alpha"], "p": d["p"]}
                        for d in state.drops if d["block"] == l]})
    return {"strategy": strategy, "space": space.config.to_dict(), "candidates": names,
            "arch": [space.block_string(l, m) for l, m in enumerate(arch)], "choices": list(arch),
            "mflops": net.mflops, "macs": net.macs, "params": net.params, "val_acc": val_acc,
            "flops_target": flops_target,
            "meets_flops_target": None if flops_target is None else bool(net.mflops <= flops_target),
            "blocks": blocks, **(extra or {})}


def format_table(summary: dict) -> str:
    rows = [f"{'blk':>3} {'in->out':>9} {'s':>1}  {'chosen op':<22} {'p':>6} {'MFLOPs':>8}  dropped (op@step)"]
    for b in summary["blocks"]:
        dropped = ", ".join(f"{d['op']}@{d['step']}" for d in b["dropped"]) or "-"
        rows.append(f"{b['block']:>3} {str(b['in_channels']) + '->' + str(b['out_channels']):>9} {b['stride']:>1}  "
                    f"{b['op']:<22} {b['chosen_p']:>6.3f} {b['mflops']:>8.4f}  {dropped}")
    acc, target = summary["val_acc"], summary.get("flops_target")
    rows.append(f"strategy {summary['strategy']}: {summary['mflops']:.4f} MFLOPs (multiply-adds), "
                f"{summary['params'] / 1e6:.4f} M params"
                + ("" if acc is None else f", validation accuracy {acc:.4f} (inherited weights, BN recalibrated)"))
    if target is not None:
        verdict = "meets it" if summary["meets_flops_target"] else "ABOVE it"
        rows.append(f"FLOPs target {target:.4f} MFLOPs: the searched net ({summary['mflops']:.4f} MFLOPs) {verdict}")
    return "\n".join(rows)
