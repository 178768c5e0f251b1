"""The search: configuration, architecture state, strategies and the two-phase loop.
`python -m betanas_fast.search --help` lists every option."""
from .arch_state import ArchState
from .config import STRATEGIES, SearchConfig, parse_config, validate_config
from .engine import Search
from .gate_grad import gate_grad_to_alpha_grad

__all__ = ["ArchState", "STRATEGIES", "SearchConfig", "parse_config", "validate_config", "Search",
           "gate_grad_to_alpha_grad", "main"]


def main(argv=None):
    cfg = parse_config(argv)
    try:
        search = Search(cfg)
    except ValueError as e:  # bad configuration: one clear message, no traceback, nothing computed
        raise SystemExit(f"error: {e}")
    return search.run()
