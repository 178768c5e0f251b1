"""betanas_fast: the BetaNAS neural architecture search, with fused C++/CUDA kernels."""
from ._version import __version__
from ._ext import KERNELS_LOADED, build_info
from . import nn, ops

__all__ = ["KERNELS_LOADED", "build_info", "nn", "ops", "__version__"]
