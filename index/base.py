"""One interface for every key index, chosen by a spec string (FAISS index_factory style).

All indexes hold L2-normalised keys under stable int64 ids, answer top-1 inner-product
(= cosine) queries, and support remove/replace without rebuilding per fact."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.numpy import load_file, save_file


class IndexError_(ValueError):
    """Bad spec, bad ids, or a file that does not hold the index it claims to."""


def as_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
    if arr.size and arr.min() < 0:
        raise IndexError_(f"ids must be non-negative int64, got min {arr.min()}")
    return arr


class KeyIndex(ABC):
    spec: str
    dim: int

    @abstractmethod
    def add(self, ids: Any, keys: torch.Tensor) -> None:
        """Store `keys` (n, dim) under `ids` (n,); an id already present is replaced."""

    @abstractmethod
    def remove(self, ids: Any) -> int:
        """Drop ids; returns how many were present."""

    @abstractmethod
    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 for each query (n, dim): (similarity float32 (n,), id int64 (n,)), on the
        queries' device; (-inf, -1) where the index is empty."""

    @property
    @abstractmethod
    def ntotal(self) -> int: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def ids(self) -> np.ndarray:
        """The live ids, ascending."""

    @abstractmethod
    def _state(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _set_state(self, state: dict[str, np.ndarray]) -> None: ...

    def _check_add(self, ids: Any, keys: torch.Tensor) -> np.ndarray:
        """Validate an add() call; returns the ids as int64."""
        ids = as_ids(ids)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add() call")
        if tuple(keys.shape) != (len(ids), self.dim):
            raise ValueError(f"keys must be ({len(ids)}, {self.dim}), got {tuple(keys.shape)}")
        return ids

    def __contains__(self, id_: int) -> bool:
        return bool(np.isin(id_, self.ids()))

    def save(self, path: str | Path) -> None:
        save_file(self._state(), str(path), metadata={"spec": self.spec, "dim": str(self.dim),
                                                      "format": "neuraldb-index-1"})

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> "KeyIndex":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != "neuraldb-index-1":
            raise IndexError_(f"{path}: not a neuraldb index file")
        idx = make_index(meta["spec"], int(meta["dim"]), **options)
        idx._set_state(load_file(str(path)))
        return idx


# spec grammar: a regex per index kind; the builder gets the match and options
_REGISTRY: list[tuple[re.Pattern[str], Callable[..., KeyIndex]]] = []


def register(pattern: str) -> Callable[[Callable[..., KeyIndex]], Callable[..., KeyIndex]]:
    def deco(builder: Callable[..., KeyIndex]) -> Callable[..., KeyIndex]:
        _REGISTRY.append((re.compile(pattern + r"\Z"), builder))
        return builder
    return deco


def make_index(spec: str, dim: int, **options: Any) -> KeyIndex:
    """Build an empty index from a spec string such as "Flat", "torch", "IVF1024,Flat", "HNSW32"."""
    if dim <= 0:
        raise IndexError_(f"dim must be positive, got {dim}")
    for pat, builder in _REGISTRY:
        m = pat.match(spec)
        if m:
            return builder(m, dim, **options)
    raise IndexError_(f"unknown index spec {spec!r}; known forms: {[p.pattern for p, _ in _REGISTRY]}")
