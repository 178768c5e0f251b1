"""The search: configuration, strategies, architecture state and the two-phase loop.
`python -m betanas_fast.search --help` lists every option."""
from .arch_state import ArchState
from .config import SearchConfig, parse_config, validate_config
from .engine import Search
from .strategies import STRATEGIES, Strategy, make_strategy

__all__ = ["ArchState", "STRATEGIES", "Strategy", "make_strategy", "SearchConfig", "parse_config", "validate_config",
           "Search", "main"]


def main(argv=None):
    from ..runs.ranks import shutdown
    cfg = parse_config(argv)
    try:
        search = Search(cfg)
    except ValueError as e:  # bad configuration: one clear message, no traceback, nothing computed
        raise SystemExit(f"error: {e}")
    result = search.run()
    shutdown()
    return result
