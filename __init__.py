"""neuraldb: edit the facts an LLM knows through a gated neural key-value database.

Names are imported on first use (PEP 562), so `neuraldb info` and the persistence layer do not
pay for importing transformers.

The checkout's root *is* this package (pyproject maps `neuraldb` to it), so its folders
(`kernels/`, `index/`, `data/`, ...) are subpackages, never top-level modules. Python puts the
working directory (`python3 -m ...`, `-c`, the REPL) or a script's folder (`python3 bench/x.py`)
first on `sys.path`; from the root that would let `import kernels` inside transformers find our
`kernels/` instead of the PyPI package. `_unshadow` below removes exactly those entries when
neuraldb is imported, and refuses with one line if a shadowing import already happened."""
from __future__ import annotations

import os
import sys
from importlib import import_module
from typing import Any

_EXPORTS = {"ConfigError": "engine.config", "EditConfig": "engine.config", "DatabaseError": "engine.persistence",
            "Fact": "engine.facts", "FactError": "engine.facts", "load_facts": "engine.facts",
            "NeuralDB": "engine.editor", "load_model": "engine.models"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

_ROOT = os.path.dirname(os.path.realpath(__file__))


def project_paths(entries: list[str], root: str = _ROOT) -> list[str]:
    """The `sys.path` entries that would import this package's folders as top-level modules: the
    package root itself ("" is the working directory) and its subpackages (a script's folder)."""
    out = []
    for entry in entries:
        real = os.path.realpath(entry or os.getcwd())
        if real == root or (os.path.dirname(real) == root and os.path.isfile(os.path.join(real, "__init__.py"))):
            out.append(entry)
    return out


def shadowed_modules(root: str = _ROOT) -> list[str]:
    """Top-level modules already imported from inside this package's folder (wrong by construction)."""
    bad = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if "." in name or name.startswith("__") or name == "neuraldb" or not path:
            continue
        real = os.path.realpath(path)
        if real == os.path.join(root, "__init__.py"):
            continue  # this package under its folder's name (pytest's doing): inert, see below
        # a file of ours in a folder of the package (tests/ is no package: its helpers may be top-level)
        if real.startswith(root + os.sep) and os.path.isfile(os.path.join(os.path.dirname(real), "__init__.py")):
            bad.append(name)
    return sorted(bad)


def _unshadow() -> None:
    for entry in project_paths(sys.path):
        while entry in sys.path:
            sys.path.remove(entry)
    bad = shadowed_modules()
    if bad:
        raise ImportError(f"neuraldb: {bad} were imported from the checkout {_ROOT} as top-level modules "
                          f"(shadowing installed packages); import neuraldb first, or run from another folder")


if __name__ == "neuraldb":  # pytest imports the root's __init__.py once more, as its folder's name
    _unshadow()


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neuraldb' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
