"""The editing engine: models, facts, keys, residuals, the gated layer, the editor, persistence.

Names are imported on first use (PEP 562): persistence and facts load without transformers."""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"ConfigError": ".config", "EditConfig": ".config", "DatabaseError": ".persistence",
            "Fact": ".facts", "FactError": ".facts", "load_facts": ".facts", "NeuralDB": ".editor",
            "load_model": ".models"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neuraldb.engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
