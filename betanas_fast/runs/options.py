"""Configuration as dataclasses whose field metadata is the command line: every command (search, train,
evaluate, export, latency, study) declares its options with `option` and parses them with `parse_options`,
so help texts, choices and types live next to the defaults, and no parser knows a field by name."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields
from typing import Callable, List, Optional, Sequence


def option(default, help: str, *, choices=None, type=None, nargs=None, positional: bool = False):
    """A config field with its command-line description (`type` is the parser's element type where the
    default does not tell it, e.g. for None defaults; `choices` a tuple, or a function giving one when the
    choices can grow, as the strategy table can; `positional`: an argument without a --flag)."""
    meta = {"help": help, "choices": choices, "type": type, "nargs": nargs, "positional": positional}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _choices(f) -> Optional[tuple]:
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


def field_default(f):
    """A dataclass field's default value (its factory's product for a list or dict)."""
    return f.default if f.default is not MISSING else f.default_factory()


def add_config_arguments(p: argparse.ArgumentParser, config_cls) -> None:
    """One --flag per field of the dataclass `config_cls`, from the field's `option` metadata; every default
    is None on the parser, so that the caller can tell a flag given from one left out. A positional field is
    required unless its default is not None."""
    for f in fields(config_cls):
        meta = f.metadata
        default = field_default(f)
        said = any(w in meta["help"] for w in ("(default", "default:", "(required"))  # the help already says it
        help_text = meta["help"] if said or meta.get("positional") else f"{meta['help']} (default: {default})"
        kw = dict(default=None, help=help_text)
        if isinstance(default, bool) or meta["type"] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=meta["type"] or type(default), choices=_choices(f))
            if meta["nargs"]:
                kw["nargs"] = meta["nargs"]
        if meta.get("positional"):
            if default is not None:
                kw["nargs"] = "?"
            p.add_argument(f.name, **kw)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def validate_choices(cfg) -> None:
    for f in fields(cfg):
        choices = _choices(f)
        if choices is not None and getattr(cfg, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {choices}, got {getattr(cfg, f.name)!r}")


def given(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict:
    """The options a command line set (the parser's None means left out)."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in skip}


def parse_options(config_cls, argv: Optional[List[str]], prog: str, description: str,
                  extend: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """`config_cls` from the command line `argv`: its fields as flags (`extend` may add more to the parser,
    whose values then stay out of the config)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # each help says its default
    if extend:
        extend(p)
    add_config_arguments(p, config_cls)
    names = {f.name for f in fields(config_cls)}
    args = p.parse_args(argv)
    return config_cls(**{k: v for k, v in given(args).items() if k in names})


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as 512M, 4G, 1.5G or 1048576 (binary units; a trailing B or iB is allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS and t[-1:] else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional unit K, M, G or T (e.g. 512M)") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * _SIZE_UNITS[unit])
