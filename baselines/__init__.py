"""Linear weight editors to compare NeuralDB against (MEMIT, AlphaEdit). They import the engine,
never the other way round."""
from .config import LinearEditConfig
from .editor import RULES, LinearEditor
from .linear import alphaedit_update, memit_update, null_space_projector
from .stats import second_moments

__all__ = ["RULES", "LinearEditConfig", "LinearEditor", "alphaedit_update", "memit_update",
           "null_space_projector", "second_moments"]
