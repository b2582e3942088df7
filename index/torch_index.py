"""Exact search in torch: keys in one preallocated device tensor (capacity doubling, tombstone
mask, zeroed dead rows), matmul + max/argmax on the current stream with no host sync in `search`."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..kernels import l2_normalize, lookup
from .base import KeyIndex, as_ids, register, unit_rows

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchIndex(KeyIndex):
    compact_fraction = 0.25

    def __init__(self, dim: int, dtype: str = "fp32", device: str | torch.device = "cpu",
                 capacity: int = 1024) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"torch index: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.spec = "torch" if dtype == "fp32" else f"torch,{dtype}"
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self._keys = torch.zeros(capacity, dim, dtype=_DTYPES[dtype], device=self.device)
        self._ids = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        self._valid = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self._n = 0  # rows used (live + tombstoned)
        self._slot: dict[int, int] = {}  # live id -> row
        self.compactions = 0  # bumped whenever rows move (compaction, load)

    def _grow(self, need: int) -> None:
        cap = self._keys.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name, fill in (("_keys", 0), ("_ids", -1), ("_valid", False)):
            old = getattr(self, name)
            t = torch.full((new, *old.shape[1:]), fill, dtype=old.dtype, device=self.device)
            t[:cap] = old
            setattr(self, name, t)

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (all must be live)."""
        return np.fromiter((self._slot[int(i)] for i in ids), np.int64, len(ids))

    def add(self, ids: Any, keys: torch.Tensor, *, unit: bool = False) -> None:
        """New ids are appended; an id already present has its row rewritten in place (O(d))."""
        ids = self._check_add(ids, keys)
        x = unit_rows(keys.to(self.device), unit).to(self._keys.dtype)  # (n, dim)
        present = np.fromiter((int(i) in self._slot for i in ids), bool, len(ids))
        if present.any():
            rows = torch.from_numpy(self.slots_of(ids[present])).to(self.device)
            self._keys[rows] = x[torch.from_numpy(present).to(self.device)]
        new = ~present
        n = int(new.sum())
        if n:
            self._grow(self._n + n)
            rows = slice(self._n, self._n + n)
            self._keys[rows] = x if new.all() else x[torch.from_numpy(new).to(self.device)]
            self._ids[rows] = torch.from_numpy(ids[new]).to(self.device)
            self._valid[rows] = True
            for k, i in enumerate(ids[new]):
                self._slot[int(i)] = self._n + k
            self._n += n

    def remove(self, ids: Any) -> int:
        """Tombstone and zero the rows of `ids`; compact past a quarter of dead rows."""
        rows = [self._slot.pop(int(i)) for i in as_ids(ids) if int(i) in self._slot]
        if rows:
            r = torch.tensor(rows, device=self.device)
            self._valid[r] = False
            self._keys[r] = 0
            self._ids[r] = -1
        if self._n - len(self._slot) > self.compact_fraction * max(self._n, 1):
            self.compact()
        return len(rows)

    def compact(self) -> None:
        live = self._valid[: self._n]
        keep = int(live.sum())
        self._keys[:keep] = self._keys[: self._n][live].clone()
        self._ids[:keep] = self._ids[: self._n][live].clone()
        self._valid[:keep] = True
        self._valid[keep:] = False
        self._keys[keep : self._n] = 0
        self._ids[keep:] = -1
        self._n = keep
        self._slot = {int(i): r for r, i in enumerate(self._ids[:keep].tolist())}
        self.compactions += 1

    def to(self, device: torch.device | str) -> "TorchIndex":
        self.device = torch.device(device)
        self._keys, self._ids, self._valid = (t.to(self.device) for t in (self._keys, self._ids, self._valid))
        return self

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = l2_normalize(queries.to(self.device))
        best, arg = lookup(q, self._keys[: self._n], self._valid[: self._n])
        ids = torch.where(arg >= 0, self._ids[: max(self._n, 1)][arg.clamp_min(0)], arg)
        return best.float().to(queries.device), ids.to(queries.device)

    @property
    def ntotal(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        return int(self._keys.nelement() * self._keys.element_size() + self._ids.nelement() * 8
                   + self._valid.nelement())

    def ids(self) -> np.ndarray:
        return np.sort(np.fromiter(self._slot.keys(), np.int64, len(self._slot)))

    def export(self) -> tuple[np.ndarray, torch.Tensor]:
        live = self._valid[: self._n]
        return (self._ids[: self._n][live].cpu().numpy().astype(np.int64),
                self._keys[: self._n][live].float().cpu())


@register(r"torch(,(?P<dtype>fp32|fp16|bf16))?")
def _torch(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    return TorchIndex(dim, dtype=m.group("dtype") or "fp32", device=options.get("device", "cpu"))


class ExactBacked(KeyIndex):
    """An index that keeps its full-precision keys in a `TorchIndex` (`self.exact`) and adds
    its own per-row structure (codes, projections) on the same rows."""

    exact: TorchIndex

    @property
    def ntotal(self) -> int:
        return self.exact.ntotal

    def ids(self) -> np.ndarray:
        return self.exact.ids()

    def export(self) -> tuple[np.ndarray, torch.Tensor]:
        return self.exact.export()
