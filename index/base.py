"""One interface for every key index, chosen by a spec string (FAISS index_factory style).

All indexes hold L2-normalised keys under stable int64 ids, answer top-1 inner-product
(= cosine) queries, and support remove/replace without rebuilding per fact: each id owns a
slot (a row), replacing a key rewrites its row, removing one zeroes it (its bytes are gone from
memory and from every later save), and tombstoned rows are compacted once they pass a quarter.

On disk every spec writes the same canonical table, the live ids and their fp32 unit keys in
slot order (approximate specs add their trained FAISS structure), so a file written on a GPU
loads on a CPU and the other way round."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ..kernels import l2_normalize


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
    def add(self, ids: Any, keys: torch.Tensor, *, unit: bool = False) -> None:
        """Store `keys` (n, dim) under `ids` (n,); an id already present is replaced.
        `unit=True`: the keys are already L2-normalised (stored as given, bit for bit)."""

    @abstractmethod
    def remove(self, ids: Any) -> int:
        """Drop ids; returns how many were present."""

    @abstractmethod
    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 for each query (n, dim): (similarity float32 (n,), id int64 (n,)), on the
        queries' device; (-inf, -1) where the index is empty."""

    def search_above(self, queries: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` for a caller that acts only on similarities above `floor`: an index that prunes
        by a floor (index/bound.py) may answer (floor, -1) for a query whose best key is not above
        it; this default searches as usual (a correct answer too)."""
        return self.search(queries)

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
    def export(self) -> tuple[np.ndarray, torch.Tensor]:
        """The live ids (n,) and their unit keys (n, dim) float32 on the CPU, in slot order."""

    def to(self, device: torch.device | str) -> "KeyIndex":
        """Move the index's tensors to `device` (a no-op for host-only FAISS indexes)."""
        return self

    def _state(self) -> dict[str, np.ndarray]:
        ids, keys = self.export()
        return {"ids": ids, "keys": np.ascontiguousarray(keys.numpy(), dtype=np.float32)}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        check_state(state, self.dim)
        if len(state["ids"]):
            self.add(state["ids"], torch.from_numpy(state["keys"]), unit=True)

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
        save_file(self._state(), str(path), metadata={"spec": self.spec, "dim": str(self.dim), "format": FORMAT})

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> "KeyIndex":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as fh:
                meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise IndexError_(f"{path}: not a {FORMAT} index file")
            idx = make_index(meta["spec"], int(meta["dim"]), **options)
            idx._set_state(load_file(str(path)))
        except (SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            if isinstance(exc, IndexError_):
                raise
            raise IndexError_(f"{path}: corrupted index file ({exc})") from exc
        return idx


FORMAT = "neuraldb-index-2"


def unit_rows(keys: torch.Tensor, unit: bool) -> torch.Tensor:
    """float32 unit rows: normalised unless the caller says they already are."""
    return keys.detach().float() if unit else l2_normalize(keys.detach())


def check_state(state: dict[str, np.ndarray], dim: int) -> None:
    """The canonical table: unique non-negative int64 ids (n,) and float32 keys (n, dim)."""
    ids, keys = state.get("ids"), state.get("keys")
    if ids is None or keys is None:
        raise IndexError_("index state lacks 'ids' or 'keys'")
    if ids.dtype != np.int64 or ids.ndim != 1 or keys.shape != (len(ids), dim):
        raise IndexError_(f"index state: ids {ids.dtype}{ids.shape} and keys {keys.shape} do not fit dim {dim}")
    if len(ids) and (ids.min() < 0 or len(np.unique(ids)) != len(ids)):
        raise IndexError_("index state: ids must be unique and non-negative")


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
