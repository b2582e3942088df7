"""Approximate candidate search with exact re-scoring.

A FAISS approximate index (IVF, HNSW, PQ, scalar quantisers) proposes a shortlist of ids per
query; the shortlist is re-scored against the full-precision unit keys, and the best true
cosine is returned. So a returned similarity is always the cosine of a stored key (never above
the true maximum) and the gate can only open where exact search would open it too; what an
approximate index can lose is recall (a true best outside the shortlist)."""
from __future__ import annotations

import logging
import re
from typing import Any

import faiss
import numpy as np
import torch

from ..kernels import l2_normalize
from .base import KeyIndex, as_ids, register
from .flat import blas_always
from .torch_index import TorchIndex

log = logging.getLogger(__name__)


class RescoredIndex(KeyIndex):
    """FAISS candidates + exact re-scoring over a TorchIndex holding the unit keys.

    Options: shortlist (candidates per query, default 8), nprobe (IVF), efSearch (HNSW).
    IVF/PQ are trained on the first `train_size` keys (default max(39 * nlist, 1000)); until
    then every query is answered by exact search. Removal tombstones ids in the FAISS index
    and compacts it (rebuilt from the exact store) once a quarter of it is dead."""

    compact_fraction = 0.25

    def __init__(self, spec: str, dim: int, factory: str, needs_training: bool, nlist: int = 0,
                 shortlist: int = 8, nprobe: int = 8, efSearch: int = 64, train_size: int | None = None,
                 device: Any = "cpu") -> None:
        self.spec, self.dim, self.factory = spec, dim, factory
        self.needs_training, self.nlist = needs_training, nlist
        self.shortlist, self.nprobe, self.efSearch = shortlist, nprobe, efSearch
        self.train_size = train_size or max(39 * nlist, 1000)
        self.exact = TorchIndex(dim, device=device)  # full-precision unit keys for re-scoring
        self._dead: set[int] = set()
        self.index = self._new()

    def _new(self) -> Any:
        return faiss.IndexIDMap2(faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT))

    def _maybe_train(self) -> None:
        if self.index.is_trained or self.exact.ntotal < self.train_size:
            return
        ids = self.exact.ids()
        keys = self._keys_of(ids)
        with blas_always():
            self.index.train(keys)
        self.index.add_with_ids(keys, ids)
        log.info("%s trained on %d keys", self.spec, len(ids))

    def _keys_of(self, ids: np.ndarray) -> np.ndarray:
        rows = torch.tensor([self.exact._slot[int(i)] for i in ids], dtype=torch.long)
        return np.ascontiguousarray(self.exact._keys[rows.to(self.exact.device)].float().cpu().numpy())

    def add(self, ids: Any, keys: torch.Tensor) -> None:
        ids = as_ids(ids)
        present = ids[np.isin(ids, self.exact.ids())]
        if present.size:
            self.remove(present)
        revived = [int(i) for i in ids if int(i) in self._dead]
        if revived:
            self._compact_now()
        self.exact.add(ids, keys)
        if self.index.is_trained:
            self.index.add_with_ids(self._keys_of(ids), ids)
        else:
            self._maybe_train()

    def remove(self, ids: Any) -> int:
        ids = as_ids(ids)
        n = self.exact.remove(ids)
        if self.index.is_trained and self.index.ntotal:
            self._dead.update(int(i) for i in ids)
            if len(self._dead) > self.compact_fraction * max(self.index.ntotal, 1):
                self._compact_now()
        return n

    def _compact_now(self) -> None:
        """Rebuild the candidate index from the live keys (HNSW cannot delete in place)."""
        self._dead.clear()
        trained = self.index
        live = self.exact.ids()
        if self.needs_training and trained.is_trained:
            trained.reset()  # keeps the trained quantiser/codebooks
            self.index = trained
        else:
            self.index = self._new()
        if live.size and self.index.is_trained:
            self.index.add_with_ids(self._keys_of(live), live)

    def _params(self) -> Any:
        sub = faiss.downcast_index(self.index.index)
        if isinstance(sub, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(efSearch=max(self.efSearch, self.shortlist))
        if isinstance(sub, faiss.IndexIVF):
            return faiss.SearchParametersIVF(nprobe=self.nprobe)
        if isinstance(sub, (faiss.IndexScalarQuantizer, faiss.IndexFlat)):
            return faiss.SearchParameters()
        return None  # IndexPQ takes no parameters: dead ids are dropped when re-scoring

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.index.is_trained or self.index.ntotal == 0:
            return self.exact.search(queries)
        q = l2_normalize(queries.detach()).cpu()  # (n, d)
        params = self._params()
        if self._dead and params is not None:
            params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._dead, np.int64, len(self._dead))))
        with blas_always():
            _, cand = self.index.search(np.ascontiguousarray(q.numpy()), self.shortlist,
                                        **({"params": params} if params is not None else {}))  # (n, k)
        return self._rescore(q, torch.from_numpy(cand), queries.device)

    def _rescore(self, q: torch.Tensor, cand: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact cosine of each query with its candidates (n, k); best per query."""
        valid = cand >= 0
        slots = torch.tensor([self.exact._slot.get(int(i), -1) for i in cand.reshape(-1).tolist()],
                             dtype=torch.long).view(cand.shape)  # (n, k)
        valid &= slots >= 0
        keys = self.exact._keys[slots.clamp_min(0).to(self.exact.device)].float().cpu()  # (n, k, d)
        sims = torch.einsum("nd,nkd->nk", q.float(), keys).masked_fill(~valid, float("-inf"))  # (n, k)
        best, arg = sims.max(1)
        ids = torch.where(torch.isfinite(best), cand.gather(1, arg[:, None])[:, 0], torch.full_like(arg, -1))
        return best.to(device), ids.to(device)

    @property
    def ntotal(self) -> int:
        return self.exact.ntotal

    @property
    def nbytes(self) -> int:
        return self.exact.nbytes + (int(faiss.serialize_index(self.index).size) if self.index.ntotal else 0)

    def ids(self) -> np.ndarray:
        return self.exact.ids()

    def _state(self) -> dict[str, np.ndarray]:
        return {**{f"exact.{k}": v for k, v in self.exact._state().items()},
                "faiss": faiss.serialize_index(self.index),
                "dead": np.fromiter(sorted(self._dead), np.int64, len(self._dead))}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.exact._set_state({k[6:]: v for k, v in state.items() if k.startswith("exact.")})
        self.index = faiss.deserialize_index(state["faiss"])
        self._dead = set(int(i) for i in state["dead"])


def _opts(options: dict[str, Any]) -> dict[str, Any]:
    keep = ("shortlist", "nprobe", "efSearch", "train_size", "device")
    return {k: options[k] for k in keep if k in options}


@register(r"IVF(?P<nlist>\d+),(?P<code>Flat|PQ\d+(x\d+)?|SQ8|SQ4|SQfp16)")
def _ivf(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    nlist = int(m.group("nlist"))
    return RescoredIndex(m.group(0), dim, m.group(0), True, nlist, **_opts(options))


@register(r"HNSW(?P<M>\d+)(,(?P<code>Flat|SQ8|SQfp16))?")
def _hnsw(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    code = m.group("code")
    factory = f"HNSW{m.group('M')}" + (f",{code}" if code and code != "Flat" else "")
    return RescoredIndex(m.group(0), dim, factory, code in ("SQ8",), 0, **_opts(options))


@register(r"(?P<code>PQ\d+(x\d+)?|SQ8|SQ4|SQfp16)")
def _coded(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    code = m.group("code")
    return RescoredIndex(code, dim, code, code != "SQfp16", 0, **_opts(options))
