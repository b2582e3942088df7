"""neuraldb: edit the facts an LLM knows through a gated neural key-value database.

Names are imported on first use (PEP 562), so `neuraldb info` and the persistence layer do not
pay for importing transformers."""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"ConfigError": "engine.config", "EditConfig": "engine.config", "DatabaseError": "engine.persistence",
            "Fact": "engine.facts", "FactError": "engine.facts", "load_facts": "engine.facts",
            "NeuralDB": "engine.editor", "load_model": "engine.models"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neuraldb' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
