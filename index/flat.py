"""Exact search with FAISS: IndexFlatIP on L2-normalised keys, rows addressed as slots.

Adding, replacing or removing one fact touches only its own row; compaction of dead rows is
amortised (once they pass a quarter of the table)."""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

import faiss
import numpy as np
import torch

from .base import KeyIndex, as_ids, register, unit_rows

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


class FlatIndex(KeyIndex):
    """IndexFlatIP whose rows are slots: `_row_ids[r]` is the id in row r (-1 when dead).

    Replacing a key overwrites its row in place and removing one zeroes it (O(d), the other
    rows untouched); dead rows are compacted away once they pass `compact_fraction`. A zeroed
    row scores exactly 0, so it can only win for a query whose true best cosine is <= 0; those
    rare queries are searched again with an IDSelector that skips dead rows (the selector
    path is ~10x slower in faiss-cpu, so it is not used for every query)."""

    compact_fraction = 0.25

    def __init__(self, dim: int, spec: str = "Flat") -> None:
        self.spec, self.dim = spec, dim
        self.index = faiss.IndexFlatIP(dim)
        self._slot: dict[int, int] = {}  # live id -> row
        self._row_ids = np.zeros(0, np.int64)  # row -> id, -1 for a dead row

    @staticmethod
    def _np(keys: torch.Tensor, unit: bool = False) -> np.ndarray:
        return np.ascontiguousarray(unit_rows(keys, unit).cpu().numpy(), dtype=np.float32)

    def _rows(self) -> np.ndarray:
        """A writable (ntotal, dim) view of the FAISS table."""
        n = int(self.index.ntotal)
        return faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim) if n else \
            np.zeros((0, self.dim), np.float32)

    def add(self, ids: Any, keys: torch.Tensor, *, unit: bool = False) -> None:
        ids = self._check_add(ids, keys)
        x = self._np(keys, unit)  # (n, dim)
        present = np.fromiter((int(i) in self._slot for i in ids), bool, len(ids))
        if present.any():
            self._rows()[[self._slot[int(i)] for i in ids[present]]] = x[present]
        new = ~present
        if new.any():
            start = int(self.index.ntotal)
            self.index.add(x if new.all() else x[new])  # no boolean-index copy of an all-new batch
            self._row_ids = np.concatenate([self._row_ids, ids[new]])
            self._slot.update((int(i), start + k) for k, i in enumerate(ids[new]))
        self._changed()

    def remove(self, ids: Any) -> int:
        rows = [self._slot.pop(int(i)) for i in as_ids(ids) if int(i) in self._slot]
        if rows:
            self._rows()[rows] = 0.0
            self._row_ids[rows] = -1
        if len(self._row_ids) - len(self._slot) > self.compact_fraction * max(len(self._row_ids), 1):
            self.compact()
        self._changed()
        return len(rows)

    def compact(self) -> None:
        live = self._row_ids >= 0
        kept = self._rows()[live].copy()
        self.index.reset()
        if len(kept):
            self.index.add(kept)
        self._row_ids = self._row_ids[live]
        self._slot = {int(i): r for r, i in enumerate(self._row_ids)}

    def _changed(self) -> None:
        """Called after every mutation (the GPU mirror drops its copy)."""

    def _search_rows(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with blas_always():
            d, i = self.index.search(q, 1)
        return d[:, 0], i[:, 0]

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._np(queries)  # (n, dim)
        if not self._slot:
            n = q.shape[0]
            return (torch.full((n,), float("-inf"), device=queries.device),
                    torch.full((n,), -1, dtype=torch.long, device=queries.device))
        sims, rows = self._search_rows(q)  # (n,), (n,)
        ids = np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)
        again = np.nonzero(ids < 0)[0]  # a dead (zeroed) row won: the true best is <= 0
        if again.size:
            params = faiss.SearchParameters()
            params.sel = faiss.IDSelectorBatch(np.nonzero(self._row_ids >= 0)[0].astype(np.int64))
            d, i = self.index.search(q[again], 1, params=params)
            sims[again], ids[again] = d[:, 0], self._row_ids[i[:, 0]]
        t_ids = torch.from_numpy(ids.astype(np.int64))
        t_sims = torch.from_numpy(sims.astype(np.float32)).masked_fill(t_ids < 0, float("-inf"))
        return t_sims.to(queries.device), t_ids.to(queries.device)

    @property
    def ntotal(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        return int(self.index.ntotal) * (4 * self.dim + 8)

    def ids(self) -> np.ndarray:
        return np.sort(np.fromiter(self._slot.keys(), np.int64, len(self._slot)))

    def export(self) -> tuple[np.ndarray, torch.Tensor]:
        live = self._row_ids >= 0
        return self._row_ids[live].copy(), torch.from_numpy(self._rows()[live].copy())


class GpuFlatIndex(FlatIndex):
    """GpuIndexFlatIP (optionally fp16 storage) mirroring the host FlatIndex table: the host
    table is the source of truth (slots, in-place replace, zeroed removals, the same file format
    as on a CPU), and the GPU copy is rebuilt lazily on the first search after a change (one
    O(m) upload per batch of edits, since GPU flat indexes can neither delete nor overwrite)."""

    def __init__(self, spec: str, dim: int, device: torch.device, fp16: bool = False) -> None:
        super().__init__(dim, spec)
        self.gpu_id, self.fp16 = device.index or 0, fp16
        self._res = faiss.StandardGpuResources()
        self._gpu: Any = None

    def _changed(self) -> None:
        self._gpu = None

    def _search_rows(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu is None:
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device, cfg.useFloat16 = self.gpu_id, self.fp16
            self._gpu = faiss.GpuIndexFlatIP(self._res, self.dim, cfg)
            self._gpu.add(np.ascontiguousarray(self._rows()))
        d, i = self._gpu.search(q, 1)
        return d[:, 0], i[:, 0]

    @property
    def nbytes(self) -> int:
        return int(self.index.ntotal) * (self.dim * (6 if self.fp16 else 8) + 8)  # host + device copies


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@register(r"(IDMap2?,)?Flat(?P<fp16>,fp16)?")
def _flat(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    device = torch.device(options.get("device", "cpu"))
    if device.type == "cuda" and faiss_gpus() > 0:
        return GpuFlatIndex("Flat,fp16" if m.group("fp16") else "Flat", dim, device, fp16=bool(m.group("fp16")))
    if m.group("fp16"):
        log.warning("Flat,fp16 needs faiss-gpu and a CUDA device; using fp32 FAISS on the CPU")
    return FlatIndex(dim)
