"""Export a searched network: as a timm model (rebuilt by timm alone, with a state dict that loads strictly)
or as ONNX.

    python -m betanas_fast.export RUN [--weights FILE] --format timm|onnx [--out DIR]

RUN is a search run directory (arch.json and checkpoints/ckpt_*.pt: the weights are then the supernet's,
inherited by the sub-network, BatchNorm statistics included) or an arch.json file. `--weights FILE` is a
retrained net's checkpoint (a torch file with "model": the Net's state_dict, "arch": block strings,
"space": the space config, "net": {"se_ratio", "act"}); the architecture it names must be RUN's, if RUN
names one. An arch.json without any weights exports the architecture freshly initialised (said so).

timm: the network is timm's `EfficientNet` built from block strings by `decode_arch_def`, the way timm
builds MnasNet and EfficientNet: stem conv3x3 + BN + act (our stem stride; timm's is 2 and is set after
construction when ours is 1), the fixed first block as `ds_r1_k3_s1_c<C>` (an MBConv without expansion is
timm's DepthwiseSeparableConv), one `ir_r1_k<k>_s<s>_e<e>_c<C>[_se<r>]` per MBConv of a stage (the
identity blocks are left out), head conv1x1 + BN + act, average pool, linear. Channel counts are exact
(fix_stem, identity channel rounding), BatchNorm eps and activation are ours. Written to DIR:
  model_timm.pt    the state dict (timm's key names; `timm_key` maps ours to them)
  model_timm.json  everything the rebuild needs (arch_def, num_classes, stem/head channels, act, BN eps,
                   se ratio, ...) plus MACs/params and where the weights came from
  rebuild_timm.py  a standalone script that rebuilds the model with torch and timm only:
                   `python rebuild_timm.py DIR`, or `load_model(DIR)` from it
ONNX: `torch.onnx.export` of the eval-mode Net (the fused depthwise op traced through its pure-PyTorch
reference, ops.reference_ops) with a dynamic batch axis, input "input" [N, C, H, W], output "logits",
written to DIR/model.onnx and checked against the Net with onnxruntime.

Python API: `load_net(run_or_arch, weights=None)`, `export_timm(net, out_dir)`, `export_onnx(net, path)`,
`timm_config(net)`, `timm_state_dict(net)`, `timm_key(key, layout)`, `build_timm_model(config)`,
`export_cost(net)`. Needs the `export` extra: pip install "betanas_fast[export]".
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import cost as cost_model
from . import ops
from .nn.mbconv import MBConv
from .nn.supernet import Net, Supernet
from .runs import files
from .runs.options import option, parse_options
from .scoring import load_search
from .space import SearchSpace, make_divisible, timm_block_string

FORMAT_VERSION = 1
TIMM_FILES = ("model_timm.pt", "model_timm.json", "rebuild_timm.py")
ONNX_FILE = "model.onnx"
INSTALL_HINT = 'pip install "betanas_fast[export]"  (timm, onnx, onnxruntime, onnxscript)'


class ExportError(Exception):
    """A bad input or an architecture that cannot be exported; the CLI prints it without a traceback."""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ExportError(f"{module} is not installed ({e}); {INSTALL_HINT}") from None


# --- loading --------------------------------------------------------------------------------------------------

def _inherit(space: SearchSpace, arch: Sequence[int], state: dict, where: str) -> Net:
    supernet = Supernet(space)
    try:
        supernet.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"{where}: the supernet weights do not fit the space of arch.json "
                          f"({str(e).splitlines()[0]} ...)") from None
    return Net.from_supernet(supernet, arch)


def _recalibrated(run_dir: str, arch: Sequence[int]) -> Optional[Net]:
    """The sub-network of a search run with its BatchNorm statistics recomputed exactly on the run's own
    calibration subset (scoring.load_search, as evaluate scores it): the supernet's statistics mix every path's
    and are wrong for any one sub-network. None, with a warning, when the run's data cannot be loaded."""
    if not os.path.exists(os.path.join(run_dir, files.CONFIG)):
        return None
    try:
        search = load_search(run_dir, device="cpu")
    except (ValueError, OSError, KeyError) as e:
        print(f"warning: {run_dir}: the run's data could not be loaded to recompute the sub-network's BatchNorm "
              f"statistics ({e}); exporting the supernet's", file=sys.stderr)
        return None
    return search.subnet(list(arch)).to("cpu", memory_format=torch.contiguous_format)


def load_net(run_or_arch: str, weights: Optional[str] = None) -> Net:
    """`_load_net`, whose run-file errors are export errors."""
    try:
        return _load_net(run_or_arch, weights)
    except files.RunFileError as e:
        raise ExportError(str(e)) from None


def _load_net(run_or_arch: str, weights: Optional[str] = None) -> Net:
    """The searched Net, in eval mode, with its weights:
    - `weights` (a retrained net's checkpoint: "model", "arch", "space", "net") when given; its architecture
      must be the one of `run_or_arch`'s arch.json, if there is one;
    - else the supernet's latest checkpoint in the run directory (RUN/checkpoints), inherited
      (Net.from_supernet);
    - else (an arch.json with no checkpoint beside it) freshly initialised, with a warning.
    `net.export_source` says which."""
    if not os.path.exists(run_or_arch):
        raise ExportError(f"{run_or_arch}: no such run directory or arch.json file")
    run_dir = run_or_arch if os.path.isdir(run_or_arch) else os.path.dirname(os.path.abspath(run_or_arch))
    arch_path = files.arch_path(run_or_arch)
    ckpt = files.read_net(weights) if weights is not None else None
    named = ckpt is not None and "space" in ckpt and "arch" in ckpt
    if os.path.isfile(arch_path) or not named:
        space, arch, _ = files.read_arch(arch_path)
    else:
        space, arch, arch_path = None, None, None
    source = {"arch_json": os.path.abspath(arch_path) if arch_path else None}

    if ckpt is not None:
        if named:
            w_space = files.space_from_dict(ckpt["space"], f"--weights {weights}")
            ints = isinstance(ckpt["arch"], (list, tuple)) and all(isinstance(m, int) for m in ckpt["arch"])
            w_arch = files.arch_of(w_space, None if ints else ckpt["arch"], ckpt["arch"] if ints else None,
                              f"--weights {weights}")
            if space is not None and (w_space.config.to_dict() != space.config.to_dict() or w_arch != arch):
                raise ExportError(f"--weights {weights} is a net of another architecture than {arch_path} "
                                  f"({w_space.arch_strings(w_arch)} vs {space.arch_strings(arch)})")
            space, arch = w_space, w_arch
        net_cfg = ckpt.get("net") or {}
        if not isinstance(net_cfg, dict) or set(net_cfg) - {"se_ratio", "act"}:
            raise ExportError(f"--weights {weights}: 'net' must be a dict with 'se_ratio' and 'act', got {net_cfg!r}")
        state = ckpt["model"]
        if any(".candidates." in k for k in state):  # a supernet's checkpoint (e.g. a run's ckpt_*.pt)
            if net_cfg.get("se_ratio", 0.0) or net_cfg.get("act", "relu6") != "relu6":
                raise ExportError(f"--weights {weights}: supernet weights with 'net' {net_cfg}: the supernet has "
                                  f"ReLU6 and no squeeze-excitation")
            net = _inherit(space, arch, state, f"--weights {weights}")
            source["weights"] = f"supernet checkpoint {os.path.abspath(weights)} (inherited)"
        else:
            try:
                net = Net(space, arch, **net_cfg)
            except (TypeError, ValueError) as e:
                raise ExportError(f"--weights {weights}: 'net' {net_cfg} does not build ({e})") from None
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise ExportError(f"--weights {weights}: its 'model' is not the state dict of this net "
                                  f"({' '.join(str(e).split())[:400]})") from None
            source["weights"] = f"retrained checkpoint {os.path.abspath(weights)}"
    else:
        ckpt_dir = files.checkpoint_dir(run_dir)
        if files.list_checkpoints(ckpt_dir):
            try:
                path, state = files.load_latest(ckpt_dir)
            except files.CheckpointError as e:
                raise ExportError(str(e)) from None
            if not isinstance(state, dict) or "model" not in state:
                raise ExportError(f"{path} holds no 'model' state dict")
            net = _recalibrated(run_dir, arch)
            if net is not None:
                source["weights"] = (f"supernet checkpoint {os.path.abspath(path)} (inherited; BatchNorm statistics "
                                     f"recomputed on the run's calibration subset, as evaluate scores it)")
            else:
                net = _inherit(space, arch, state["model"], path)
                source["weights"] = (f"supernet checkpoint {os.path.abspath(path)} (inherited; BatchNorm statistics "
                                     f"are the supernet's: the run's data could not be read to recompute them)")
        elif os.path.isdir(run_or_arch):
            raise ExportError(f"{run_or_arch}: no checkpoint in {ckpt_dir} to take the weights from; pass "
                              f"--weights FILE, or the arch.json file to export the architecture untrained")
        else:
            print(f"warning: no weights (no --weights, no checkpoint in {ckpt_dir}): the architecture of "
                  f"{arch_path} is exported freshly initialised", file=sys.stderr)
            net = Net(space, arch)
            source["weights"] = "initialised (no weights given)"
    net.eval()
    net.export_source = source
    return net


# --- cost -----------------------------------------------------------------------------------------------------

def _mbconvs(net: Net) -> List[MBConv]:
    return [net.first] + [b for b in net.blocks if isinstance(b, MBConv)]


def export_cost(net: Net) -> Tuple[int, int]:
    """(MACs, params) of the net at the space's resolution: cost.arch_cost (arch.json's numbers) plus the
    squeeze-excitations, two 1x1 convolutions with bias on a 1x1 map each."""
    c = cost_model.arch_cost(net.space, net.arch)
    macs, params = c.macs, c.params
    for m in _mbconvs(net):
        if m.se is not None:
            mid, rd = m.se.conv_reduce.in_channels, m.se.conv_reduce.out_channels
            macs += 2 * mid * rd
            params += 2 * mid * rd + rd + mid
    return macs, params


# --- timm -----------------------------------------------------------------------------------------------------

def _block_string(m: MBConv, where: str) -> Tuple[str, str]:
    """(timm block string, kind "ir" or "ds") of one MBConv."""
    se = m.se_ratio if m.se is not None else None
    if not m.has_expand:
        return timm_block_string(m.kernel_size, m.stride, m.out_channels, se_ratio=se), "ds"
    mid = m.depthwise.conv.in_channels
    # timm's InvertedResidual rounds in_chs * exp_ratio with its make_divisible at its defaults (ours)
    if make_divisible(m.in_channels * float(m.expand_ratio)) != mid:
        raise ExportError(f"{where}: {m.in_channels} x {m.expand_ratio:g} = {mid} expanded channels, but timm's "
                          f"InvertedResidual rounds them to {make_divisible(m.in_channels * float(m.expand_ratio))} "
                          f"(multiples of 8); use a space whose widths are multiples of 8 (channel_divisor 8)")
    return timm_block_string(m.kernel_size, m.stride, m.out_channels, m.expand_ratio, se), "ir"


def timm_layout(net: Net) -> Tuple[List[List[str]], Dict[str, Tuple[str, str]]]:
    """(arch_def, layout): timm's block strings per stage, and for each of our block modules ("first",
    "blocks.<i>") the timm module it becomes ("blocks.<stage>.<index>") and its kind ("ds" or "ir").
    Stage 0 is the fixed first block; then one stage per stage of the space, without its identity blocks
    (a stage of identities only is left out)."""
    arch_def = [[_block_string(net.first, "the first block")[0]]]
    layout = {"first": ("blocks.0.0", "ds")}
    for stage in range(len(net.space.config.stages)):
        strings = []
        for i, spec in enumerate(net.space.blocks):
            block = net.blocks[i]
            if spec.stage != stage or not isinstance(block, MBConv):
                continue
            s, kind = _block_string(block, f"block {i}")
            layout[f"blocks.{i}"] = (f"blocks.{len(arch_def)}.{len(strings)}", kind)
            strings.append(s)
        if strings:
            arch_def.append(strings)
    return arch_def, layout


# Our module -> timm's, outside the blocks and inside a block of each kind.
_FIXED_KEYS = {"stem.0": "conv_stem", "stem.1": "bn1", "head.0": "conv_head", "head.1": "bn2",
               "classifier": "classifier"}
_BLOCK_KEYS = {
    "ir": {"expand.0": "conv_pw", "expand.1": "bn1", "depthwise.conv": "conv_dw", "depthwise.bn": "bn2",
           "se.conv_reduce": "se.conv_reduce", "se.conv_expand": "se.conv_expand", "project.0": "conv_pwl",
           "project.1": "bn3"},
    "ds": {"depthwise.conv": "conv_dw", "depthwise.bn": "bn1", "se.conv_reduce": "se.conv_reduce",
           "se.conv_expand": "se.conv_expand", "project.0": "conv_pw", "project.1": "bn2"},
}


def timm_key(key: str, layout: Dict[str, Tuple[str, str]]) -> str:
    """Our state_dict key -> timm's, e.g. "stem.1.running_var" -> "bn1.running_var",
    "blocks.3.depthwise.bn.weight" -> "blocks.2.0.bn2.weight" (with layout["blocks.3"] == ("blocks.2.0", "ir")),
    "first.project.0.weight" -> "blocks.0.0.conv_pw.weight". `layout` is timm_layout's. KeyError for a key
    that has no counterpart."""
    module, _, leaf = key.rpartition(".")
    if module in _FIXED_KEYS:
        return f"{_FIXED_KEYS[module]}.{leaf}"
    parts = module.split(".")
    n = 1 if parts[0] == "first" else 2
    block, inner = ".".join(parts[:n]), ".".join(parts[n:])
    if block in layout and inner in _BLOCK_KEYS[layout[block][1]]:
        prefix, kind = layout[block]
        return f"{prefix}.{_BLOCK_KEYS[kind][inner]}.{leaf}"
    raise KeyError(f"no timm counterpart for {key!r}")


def timm_state_dict(net: Net) -> Dict[str, torch.Tensor]:
    """The net's state dict under timm's names (timm_key), tensors copied to the CPU."""
    _, layout = timm_layout(net)
    return {timm_key(k, layout): v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def _bn_eps(net: Net) -> float:
    eps = {m.eps for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if len(eps) != 1:
        raise ExportError(f"the net's BatchNorm layers have different eps {sorted(eps)}; timm takes one")
    return eps.pop()


def timm_config(net: Net) -> dict:
    """model_timm.json: the timm constructor's arguments (what rebuild_timm.py's build_model reads) and
    what the export is (our block strings, space, net options, MACs/params at the space's resolution)."""
    arch_def, _ = timm_layout(net)
    space, cfg = net.space, net.space.config
    strides = sum("_s2_" in s for stage in arch_def for s in stage)
    macs, params = export_cost(net)
    return {
        "format": "betanas_fast timm export", "format_version": FORMAT_VERSION,
        "constructor": "timm.models.efficientnet.EfficientNet",
        "arch_def": arch_def,
        "num_classes": cfg.num_classes, "in_chans": cfg.in_channels,
        "stem_size": space.stem_channels, "stem_stride": cfg.stem_stride, "stem_kernel_size": 3,
        "num_features": space.head_channels,
        "act": net.act, "bn_eps": _bn_eps(net), "se_ratio": net.se_ratio,
        # timm's builder counts the stem as stride 2 and would dilate past output_stride: never let it
        "output_stride": max(32, 2 ** (1 + strides)),
        "input_size": [cfg.in_channels, cfg.resolution, cfg.resolution],
        "macs": macs, "params": params,
        "block_strings": space.arch_strings(net.arch), "choices": list(net.arch),
        "space": cfg.to_dict(), "net": net.net_config,
        "source": getattr(net, "export_source", None),
    }


REBUILD_SCRIPT = '''\
"""Rebuilds a network exported by `python -m betanas_fast.export ... --format timm`, with torch and timm only.

    python rebuild_timm.py [DIR]     # DIR: the folder of model_timm.json and model_timm.pt (default: this one's)

From Python:  model = load_model(DIR)  (eval mode, weights loaded with strict=True), or
build_model(json.load(open("model_timm.json"))) for a freshly initialised one.
"""
import functools
import json
import os
import sys

import torch
from torch import nn
from timm.layers import get_act_layer
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet


def build_model(cfg):
    """timm's EfficientNet with the block strings, widths, activation and BatchNorm eps of model_timm.json."""
    model = EfficientNet(
        block_args=decode_arch_def(cfg["arch_def"]),
        num_classes=cfg["num_classes"],
        num_features=cfg["num_features"],  # head conv1x1 width
        in_chans=cfg["in_chans"],
        stem_size=cfg["stem_size"],
        stem_kernel_size=cfg["stem_kernel_size"],
        fix_stem=True,  # the widths in the json are exact: no channel rounding anywhere
        round_chs_fn=lambda chs: chs,
        output_stride=cfg["output_stride"],
        act_layer=get_act_layer(cfg["act"]),
        norm_layer=functools.partial(nn.BatchNorm2d, eps=cfg["bn_eps"]),
    )
    if cfg["stem_stride"] != 2:  # timm's stem has stride 2; its padding (k // 2) stays right for stride 1
        model.conv_stem.stride = (cfg["stem_stride"], cfg["stem_stride"])
    return model


def load_model(directory):
    """The exported model with its weights, in eval mode."""
    with open(os.path.join(directory, "model_timm.json")) as f:
        cfg = json.load(f)
    model = build_model(cfg)
    state = torch.load(os.path.join(directory, "model_timm.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    model = load_model(directory)
    with open(os.path.join(directory, "model_timm.json")) as f:
        cfg = json.load(f)
    with torch.no_grad():
        logits = model(torch.zeros(1, *cfg["input_size"]))
    print(f"rebuilt {cfg['constructor']} from {directory}: {sum(p.numel() for p in model.parameters())} "
          f"parameters, logits {tuple(logits.shape)}")
'''


def build_timm_model(config: dict) -> nn.Module:
    """The timm model of a model_timm.json, freshly initialised, by the very code rebuild_timm.py holds."""
    _require("timm")
    namespace = {"__name__": "betanas_fast_rebuild_timm"}
    exec(compile(REBUILD_SCRIPT, "rebuild_timm.py", "exec"), namespace)  # noqa: S102 (our own constant)
    return namespace["build_model"](config)


def _randn_input(net: Net, batch: int, seed: int = 0) -> torch.Tensor:
    cfg = net.space.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _check_close(err: float, ours: torch.Tensor, rtol: float, what: str) -> None:
    """An exported model that disagrees with the net beyond float rounding is a bug, never a result."""
    limit = rtol * max(1.0, float(ours.abs().max()))
    if not err <= limit:
        raise ExportError(f"{what} differs from the net by {err:.3g} in the logits (more than {limit:.3g}); "
                          f"the export is wrong, please report it")


def export_timm(net: Net, out_dir: str, check: bool = True) -> dict:
    """Writes model_timm.pt, model_timm.json and rebuild_timm.py into out_dir; returns the config (with
    "files" and, if `check`, "check": the largest |logit difference| between the timm model and the net
    on a random batch of 2, in eval mode)."""
    cfg = timm_config(net)
    model = build_timm_model(cfg)
    state = timm_state_dict(net)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a bug, not a user error: say what differs
        raise ExportError(f"the mapped state dict does not load into timm's model: {e}") from None
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != cfg["params"]:
        raise ExportError(f"timm's model has {n_params} parameters, the net {cfg['params']}")
    if check:
        was_training = net.training
        net.eval()
        model.eval()
        x = _randn_input(net, 2)
        device = next(net.parameters()).device
        try:
            with torch.no_grad():
                ours = net(x.to(device)).cpu()
                err = _max_abs_diff(model(x), ours)
        finally:
            net.train(was_training)
        _check_close(err, ours, 1e-4, "timm's model")
        cfg["check"] = {"max_abs_logit_diff": err, "batch": 2}
    paths = [os.path.join(out_dir, f) for f in TIMM_FILES]
    files.save_torch(paths[0], model.state_dict())
    cfg["timm_version"] = _require("timm").__version__
    cfg["torch_version"] = torch.__version__
    files.write_json(paths[1], cfg, indent=2, newline=False)
    files.write_text(paths[2], REBUILD_SCRIPT)
    cfg["files"] = paths
    return cfg


# --- ONNX -----------------------------------------------------------------------------------------------------

def onnx_outputs(path: str, x: torch.Tensor) -> torch.Tensor:
    """The logits onnxruntime computes for input x with the model at `path` (CPU)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def export_onnx(net: Net, path: str, check: bool = True, check_batches: Sequence[int] = (1, 3),
                opset_version: Optional[int] = None) -> dict:
    """torch.onnx.export of the eval-mode net (a CPU copy; the net itself is not touched), dynamic batch
    axis, input "input" and output "logits". With `check`, onnxruntime runs it at each batch size of
    `check_batches` and the result holds the largest |logit difference| from the net per batch size."""
    for module in ("onnx", "onnxscript"):  # torch.onnx.export (dynamo) needs both
        _require(module)
    model = copy.deepcopy(net).cpu().eval()
    example = _randn_input(net, 2)  # batch 2: a batch of 1 would be specialised
    result = {"files": [path]}
    # written and checked aside, then put in place whole (files.write_atomic): a failed export or check leaves
    # no model.onnx, and a killed one no half of it
    with tempfile.TemporaryDirectory() as staging:
        staged = os.path.join(staging, os.path.basename(path))
        try:
            with ops.reference_ops(), torch.no_grad():
                torch.onnx.export(model, (example,), staged, input_names=["input"], output_names=["logits"],
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True,
                                  opset_version=opset_version, external_data=False, verbose=False)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed ({type(e).__name__}: {e})") from None
        if check:
            errors = {}
            for b in check_batches:
                x = _randn_input(net, b, seed=b)
                with torch.no_grad():
                    ours = model(x)
                errors[b] = _max_abs_diff(onnx_outputs(staged, x), ours)
                _check_close(errors[b], ours, 1e-3, f"onnxruntime's output at batch {b}")
            result["check"] = {"max_abs_logit_diff": errors}
        with open(staged, "rb") as f:
            files.write_atomic(path, lambda out: shutil.copyfileobj(f, out), binary=True)
    return result


# --- command line ---------------------------------------------------------------------------------------------

@dataclass
class ExportConfig:
    run: Optional[str] = option(None, "a search run directory (arch.json, checkpoints/) or an arch.json file", type=str,
                                positional=True)
    format: Optional[str] = option(None, "what to write (required)", choices=("timm", "onnx"), type=str)
    weights: Optional[str] = option(None, "a retrained net's checkpoint ('model', 'arch', 'space', 'net'); default: the "
                                          "run's supernet checkpoint, inherited", type=str)
    out: Optional[str] = option(None, "output directory (default: RUN/export, or export/ beside arch.json)", type=str)
    check: bool = option(True, "compare the exported model's logits with the net's")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_options(ExportConfig, list(argv) if argv is not None else None, "python -m betanas_fast.export",
                         __doc__.split("\n\n")[0])
    if args.format is None:
        raise SystemExit("error: --format timm|onnx is required")
    try:
        net = load_net(args.run, args.weights)
        base = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
        out = args.out or os.path.join(base, "export")
        if args.format == "timm":
            result = export_timm(net, out, check=args.check)
        else:
            result = export_onnx(net, os.path.join(out, ONNX_FILE), check=args.check)
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    src = net.export_source
    print(f"exported {' '.join(net.space.arch_strings(net.arch))}\n  weights: {src['weights']}")
    for f in result["files"]:
        print(f"  wrote {f}")
    if "check" in result:
        print(f"  max |logit difference| from the net: {result['check']['max_abs_logit_diff']}")
    if args.format == "timm":
        print(f"  {result['params']} parameters, {result['macs']} MACs at {result['input_size']}; rebuild with "
              f"torch and timm only: python {result['files'][2]} {out}")
    return result


if __name__ == "__main__":
    main()
