"""Key indexes (one interface, chosen by spec string) and sharded residual tables."""
from . import approx, auto, bound, flat, quantized, sharded, torch_index  # noqa: F401  (registers the index kinds)
from .base import IndexError_, KeyIndex, make_index
from .residuals import ResidualTable

__all__ = ["IndexError_", "KeyIndex", "ResidualTable", "make_index"]
