"""neuraldb: edit the facts an LLM knows through a gated neural key-value database."""
from .engine import ConfigError, DatabaseError, EditConfig, Fact, FactError, NeuralDB, load_facts, load_model

__all__ = ["ConfigError", "DatabaseError", "EditConfig", "Fact", "FactError", "NeuralDB", "load_facts", "load_model"]
__version__ = "0.1.0"
