"""Linear weight editors to compare NeuralDB against (MEMIT, AlphaEdit). They import the engine,
never the other way round. So far: the closed-form updates; the model-level editors follow."""
from .linear import alphaedit_update, memit_update, null_space_projector

__all__ = ["alphaedit_update", "memit_update", "null_space_projector"]
