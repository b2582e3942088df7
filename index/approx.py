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
from .base import KeyIndex, as_ids, check_state, register
from .flat import blas_always
from .torch_index import TorchIndex

log = logging.getLogger(__name__)


def codes_view(index: Any) -> np.ndarray | None:
    """A writable (ntotal, code_size) uint8 view of a flat-codes index's storage (IndexFlat,
    IndexPQ, IndexScalarQuantizer, or the storage of an HNSW index); None for IVF."""
    sub = faiss.downcast_index(index)
    if isinstance(sub, faiss.IndexHNSW):
        sub = faiss.downcast_index(sub.storage)
    if not isinstance(sub, faiss.IndexFlatCodes) or not sub.ntotal:
        return None
    return faiss.rev_swig_ptr(sub.codes.data(), sub.codes.size()).reshape(int(sub.ntotal), int(sub.code_size))


class RescoredIndex(KeyIndex):
    """FAISS candidates + exact re-scoring over a TorchIndex holding the unit keys.

    FAISS labels are assigned in order and `_label_id[label]` names the fact (-1 once
    retired), so replacing a key appends one new label and retires the old one: IVF deletes it
    through a hash-table direct map, flat-code and HNSW storage overwrite its codes with zeros
    and skip it at search time. Nothing is rebuilt per fact; once a quarter of the labels are
    retired the candidate index is rebuilt from the exact store.

    Options: shortlist (candidates per query, default 8), nprobe (IVF), efSearch (HNSW).
    IVF/PQ are trained on the first `train_size` keys (default max(39 * nlist, 1000)); until
    then every query is answered by exact search."""

    compact_fraction = 0.25

    def __init__(self, spec: str, dim: int, factory: str, needs_training: bool, nlist: int = 0,
                 shortlist: int = 8, nprobe: int = 8, efSearch: int = 64, train_size: int | None = None,
                 device: Any = "cpu") -> None:
        self.spec, self.dim, self.factory = spec, dim, factory
        self.needs_training, self.nlist = needs_training, nlist
        self.shortlist, self.nprobe, self.efSearch = shortlist, nprobe, efSearch
        self.train_size = train_size or max(39 * nlist, 1000)
        self.exact = TorchIndex(dim, device=device)  # full-precision unit keys for re-scoring
        self.index = self._new()
        self._label_id = np.zeros(0, np.int64)  # FAISS label -> fact id, -1 when retired
        self._label_of: dict[int, int] = {}  # fact id -> its current label
        self._retired: set[int] = set()  # labels still inside FAISS whose codes are zeroed

    def _new(self) -> Any:
        return faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)

    def _ivf(self) -> Any:
        sub = faiss.downcast_index(self.index)
        return sub if isinstance(sub, faiss.IndexIVF) else None

    def _keys_of(self, ids: np.ndarray) -> np.ndarray:
        rows = torch.from_numpy(self.exact.slots_of(ids)).to(self.exact.device)
        return np.ascontiguousarray(self.exact._keys[rows].float().cpu().numpy())

    def _faiss_add(self, ids: np.ndarray) -> None:
        labels = np.arange(len(self._label_id), len(self._label_id) + len(ids), dtype=np.int64)
        x = self._keys_of(ids)
        with blas_always():
            if self._ivf() is not None:
                self.index.add_with_ids(x, labels)
            else:  # sequential labels: the row number is the label
                self.index.add(x)
        self._label_id = np.concatenate([self._label_id, ids])
        self._label_of.update((int(i), int(lb)) for i, lb in zip(ids, labels))

    def _faiss_retire(self, ids: np.ndarray) -> None:
        labels = np.asarray([self._label_of.pop(int(i)) for i in ids if int(i) in self._label_of], np.int64)
        if not labels.size:
            return
        self._label_id[labels] = -1
        if self._ivf() is not None:
            self.index.remove_ids(faiss.IDSelectorArray(labels))  # O(1) each through the direct map
        else:
            codes = codes_view(self.index)
            if codes is not None:
                codes[labels] = 0  # the removed key's codes leave memory (and every later save)
            self._retired.update(int(lb) for lb in labels)
        if len(self._retired) > self.compact_fraction * max(len(self._label_id), 1):
            self._rebuild()

    def _rebuild(self) -> None:
        """A fresh candidate index over the live keys (keeps a trained quantiser/codebooks)."""
        if self.needs_training and self.index.is_trained:
            self.index.reset()
        else:
            self.index = self._new()
        self._prepare()
        self._label_id, self._label_of, self._retired = np.zeros(0, np.int64), {}, set()
        live = self.exact.ids()
        if live.size and self.index.is_trained:
            self._faiss_add(live)

    def _prepare(self) -> None:
        ivf = self._ivf()
        if ivf is not None and ivf.direct_map.type != faiss.DirectMap.Hashtable:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def _maybe_train(self) -> None:
        if self.index.is_trained or self.exact.ntotal < self.train_size:
            return
        ids = self.exact.ids()
        with blas_always():
            self.index.train(self._keys_of(ids))
        self._rebuild()
        log.info("%s trained on %d keys", self.spec, len(ids))

    def add(self, ids: Any, keys: torch.Tensor, *, unit: bool = False) -> None:
        ids = self._check_add(ids, keys)
        self._faiss_retire(ids)  # replaced ids get new labels
        self.exact.add(ids, keys, unit=unit)
        if self.index.is_trained:
            self._faiss_add(ids)
        else:
            self._maybe_train()  # trains once enough keys are in, then indexes all of them

    def remove(self, ids: Any) -> int:
        ids = as_ids(ids)
        self._faiss_retire(ids)
        return self.exact.remove(ids)

    def _params(self) -> Any:
        sub = faiss.downcast_index(self.index)
        if isinstance(sub, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=max(self.efSearch, self.shortlist))
        elif isinstance(sub, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        elif isinstance(sub, faiss.IndexScalarQuantizer):
            params = faiss.SearchParameters()
        else:
            return None  # IndexPQ takes no parameters: retired labels are dropped when re-scoring
        if self._retired:
            params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._retired, np.int64)))
        return params

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.index.is_trained or self.index.ntotal == 0:
            return self.exact.search(queries)
        q = l2_normalize(queries.detach()).cpu()  # (n, d)
        params = self._params()
        with blas_always():
            _, cand = self.index.search(np.ascontiguousarray(q.numpy()), self.shortlist,
                                        **({"params": params} if params is not None else {}))  # (n, k)
        return self._rescore(q, cand, queries.device)

    def _rescore(self, q: torch.Tensor, cand: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact cosine of each query with its candidates (n, k) labels; best per query."""
        ids = np.where(cand >= 0, self._label_id[np.maximum(cand, 0)], -1)  # (n, k)
        slot = self.exact._slot
        slots = torch.tensor([slot.get(int(i), -1) for i in ids.reshape(-1)], dtype=torch.long).view(ids.shape)
        valid = slots >= 0  # (n, k)
        keys = self.exact._keys[slots.clamp_min(0).to(self.exact.device)].float().cpu()  # (n, k, d)
        sims = torch.einsum("nd,nkd->nk", q.float(), keys).masked_fill(~valid, float("-inf"))  # (n, k)
        best, arg = sims.max(1)
        out = torch.from_numpy(ids).gather(1, arg[:, None])[:, 0]
        out = torch.where(torch.isfinite(best), out, torch.full_like(out, -1))
        return best.to(device), out.to(device)

    @property
    def ntotal(self) -> int:
        return self.exact.ntotal

    @property
    def nbytes(self) -> int:
        return self.exact.nbytes + (int(faiss.serialize_index(self.index).size) if self.index.ntotal else 0)

    def ids(self) -> np.ndarray:
        return self.exact.ids()

    def export(self) -> tuple[np.ndarray, torch.Tensor]:
        return self.exact.export()

    def to(self, device: torch.device | str) -> "RescoredIndex":
        self.exact.to(device)
        return self

    def _state(self) -> dict[str, np.ndarray]:
        state = super()._state()
        pos = {int(i): k for k, i in enumerate(state["ids"])}
        state["faiss"] = faiss.serialize_index(self.index)
        state["label_pos"] = np.asarray([pos.get(int(i), -1) for i in self._label_id], np.int64)
        return state

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        if "faiss" not in state:  # a bare canonical table (e.g. written by an exact spec): index it anew
            super()._set_state(state)
            return
        check_state(state, self.dim)
        ids, pos = state["ids"], state["label_pos"]
        if len(ids):
            self.exact.add(ids, torch.from_numpy(state["keys"]), unit=True)
        self.index = faiss.deserialize_index(state["faiss"])
        if pos.size and (pos.max() >= len(ids) or pos.min() < -1):
            raise ValueError("label_pos out of range")
        self._label_id = np.where(pos >= 0, ids[np.maximum(pos, 0)] if len(ids) else -1, -1).astype(np.int64)
        self._label_of = {int(i): lb for lb, i in enumerate(self._label_id) if i >= 0}
        self._retired = set() if self._ivf() is not None else set(np.nonzero(self._label_id < 0)[0].tolist())


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
