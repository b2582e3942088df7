"""The editing engine: models, facts, keys, residuals, the gated layer, the editor, persistence."""
from .config import ConfigError, EditConfig
from .editor import NeuralDB
from .facts import Fact, FactError, load_facts
from .models import load_model
from .persistence import DatabaseError

__all__ = ["ConfigError", "DatabaseError", "EditConfig", "Fact", "FactError", "NeuralDB", "load_facts", "load_model"]
