"""Exact search with FAISS: IndexIDMap2 over IndexFlatIP on L2-normalised keys.

Removal marks tombstones (skipped through an IDSelector at search time) and compacts once
they pass a fraction of the table, so removing one fact is not an O(m) rebuild."""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

import faiss
import numpy as np
import torch

from ..kernels import l2_normalize
from .base import KeyIndex, as_ids, register

log = logging.getLogger(__name__)


@contextlib.contextmanager
def blas_always() -> Iterator[None]:
    """faiss-cpu scans once per query when nq*d < distance_compute_blas_threshold (default
    128000): tens of times slower for small query batches. Use BLAS for every batch."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


class FaissIndex(KeyIndex):
    """Shared machinery: ids, tombstones, compaction, (de)serialisation of a FAISS index."""

    compact_fraction = 0.25

    def __init__(self, spec: str, dim: int) -> None:
        self.spec, self.dim = spec, dim
        self._dead: set[int] = set()
        self.index = self._new()

    def _new(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def _np(keys: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(l2_normalize(keys.detach()).cpu().numpy(), dtype=np.float32)

    def add(self, ids: Any, keys: torch.Tensor) -> None:
        ids = self._check_add(ids, keys)
        present = ids[np.isin(ids, self.ids())]
        if present.size:
            self.remove(present)
        revived = [int(i) for i in ids if int(i) in self._dead]
        if revived:  # an id removed and added again: drop the old row for real first
            self.index.remove_ids(np.asarray(revived, np.int64))
            self._dead.difference_update(revived)
        self._add(ids, self._np(keys))

    def _add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        self.index.add_with_ids(keys, ids)

    def remove(self, ids: Any) -> int:
        ids = as_ids(ids)
        live = ids[np.isin(ids, self.ids())]
        self._dead.update(int(i) for i in live)
        if len(self._dead) > self.compact_fraction * max(self.index.ntotal, 1):
            self.compact()
        return int(live.size)

    def compact(self) -> None:
        if self._dead:
            self.index.remove_ids(np.fromiter(self._dead, np.int64, len(self._dead)))
            self._dead.clear()

    def _params(self) -> Any:
        return None

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._np(queries)
        params = self._params()
        if self._dead:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._dead, np.int64, len(self._dead))))
            params = params or faiss.SearchParameters()
            params.sel = sel
        with blas_always():
            d, i = self.index.search(q, 1, params=params) if params is not None else self.index.search(q, 1)
        sims = torch.from_numpy(d[:, 0]).to(queries.device)
        ids = torch.from_numpy(i[:, 0]).to(queries.device)
        sims = torch.where(ids >= 0, sims, torch.full_like(sims, float("-inf")))
        return sims, ids

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - len(self._dead)

    @property
    def nbytes(self) -> int:
        return int(faiss.serialize_index(self.index).size)

    def ids(self) -> np.ndarray:
        if not self.index.ntotal:
            return np.zeros(0, np.int64)
        stored = faiss.vector_to_array(self.index.id_map)
        if self._dead:
            stored = stored[~np.isin(stored, np.fromiter(self._dead, np.int64, len(self._dead)))]
        return np.sort(stored)

    def _state(self) -> dict[str, np.ndarray]:
        return {"faiss": faiss.serialize_index(self.index),
                "dead": np.fromiter(sorted(self._dead), np.int64, len(self._dead))}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.index = faiss.deserialize_index(state["faiss"])
        self._dead = set(int(i) for i in state["dead"])


class FlatIndex(FaissIndex):
    def _new(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))


class GpuFlatIndex(FaissIndex):
    """GpuIndexFlatIP (optionally fp16 storage). GPU flat indexes take no ids and cannot remove,
    so rows map to ids here, and remove() rebuilds the GPU table from the kept host copy
    (one O(m) copy per remove call, not per fact)."""

    def __init__(self, spec: str, dim: int, device: torch.device, fp16: bool = False) -> None:
        self.gpu_id, self.fp16 = device.index or 0, fp16
        self._res = faiss.StandardGpuResources()
        self._host = np.zeros((0, dim), np.float32)
        self._row_ids = np.zeros(0, np.int64)
        super().__init__(spec, dim)

    def _new(self) -> Any:
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device, cfg.useFloat16 = self.gpu_id, self.fp16
        return faiss.GpuIndexFlatIP(self._res, self.dim, cfg)

    def _add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        self.index.add(keys)
        self._host = np.concatenate([self._host, keys])
        self._row_ids = np.concatenate([self._row_ids, ids])

    def remove(self, ids: Any) -> int:
        keep = ~np.isin(self._row_ids, as_ids(ids))
        n = int((~keep).sum())
        if n:
            self._host, self._row_ids = self._host[keep], self._row_ids[keep]
            self.index = self._new()
            self.index.add(self._host)
        return n

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with blas_always():
            d, i = self.index.search(self._np(queries), 1)
        rows = torch.from_numpy(i[:, 0])
        ids = torch.where(rows >= 0, torch.from_numpy(self._row_ids)[rows.clamp_min(0)] if len(self._row_ids)
                          else rows, rows)
        sims = torch.from_numpy(d[:, 0]).masked_fill(rows < 0, float("-inf"))
        return sims.to(queries.device), ids.to(queries.device)

    @property
    def ntotal(self) -> int:
        return len(self._row_ids)

    @property
    def nbytes(self) -> int:
        return len(self._row_ids) * (self.dim * (2 if self.fp16 else 4) + 8)

    def ids(self) -> np.ndarray:
        return np.sort(self._row_ids)

    def _state(self) -> dict[str, np.ndarray]:
        return {"keys": self._host, "ids": self._row_ids}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self._host, self._row_ids = np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        self.index = self._new()
        if len(state["ids"]):
            self._add(state["ids"], state["keys"])


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@register(r"(IDMap2?,)?Flat(?P<fp16>,fp16)?")
def _flat(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    device = torch.device(options.get("device", "cpu"))
    if device.type == "cuda" and faiss_gpus() > 0:
        return GpuFlatIndex("Flat,fp16" if m.group("fp16") else "Flat", dim, device, fp16=bool(m.group("fp16")))
    if m.group("fp16"):
        log.warning("Flat,fp16 needs faiss-gpu and a CUDA device; using fp32 FAISS on the CPU")
    return FlatIndex("Flat", dim)
