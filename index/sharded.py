"""Keys sharded across devices (one TorchIndex per GPU): each shard is searched where it lives,
and the per-shard (max, argmax) pairs are merged on the first device, with no host round trip.
FAISS's IndexShards merges on the host instead (see the README for when to use which).

Spec: "torch,shards" or "torch,fp16,shards"; option `devices` (default: every visible CUDA
device, else the CPU). Fact i lives on shard i % n, so ids route without a lookup."""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch

from .base import KeyIndex, as_ids, register
from .torch_index import TorchIndex


def visible_devices() -> list[torch.device]:
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


class ShardedIndex(KeyIndex):
    def __init__(self, dim: int, dtype: str = "fp32", devices: Sequence[Any] | None = None) -> None:
        devs = [torch.device(d) for d in devices] if devices else visible_devices()
        self.dim, self.dtype = dim, dtype
        self.spec = "torch,shards" if dtype == "fp32" else f"torch,{dtype},shards"
        self.shards = [TorchIndex(dim, dtype=dtype, device=d) for d in devs]

    def _route(self, ids: np.ndarray) -> list[np.ndarray]:
        return [np.nonzero(ids % len(self.shards) == s)[0] for s in range(len(self.shards))]

    def add(self, ids: Any, keys: torch.Tensor, *, unit: bool = False) -> None:
        ids = self._check_add(ids, keys)
        for shard, sel in zip(self.shards, self._route(ids)):
            if sel.size:
                shard.add(ids[sel], keys[torch.from_numpy(sel).to(keys.device)], unit=unit)

    def remove(self, ids: Any) -> int:
        ids = as_ids(ids)
        return sum(shard.remove(ids[sel]) for shard, sel in zip(self.shards, self._route(ids)) if sel.size)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._merge(queries, [shard.search(queries.to(shard.device, non_blocking=True))
                                     for shard in self.shards])

    def search_above(self, queries: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._merge(queries, [shard.search_above(queries.to(shard.device, non_blocking=True), floor)
                                     for shard in self.shards])

    @staticmethod
    def _merge(queries: torch.Tensor,
               parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        home = queries.device
        sims = torch.stack([s.to(home, non_blocking=True) for s, _ in parts])  # (S, n)
        ids = torch.stack([i.to(home, non_blocking=True) for _, i in parts])  # (S, n)
        best, which = sims.max(0)  # (n,)
        return best, ids.gather(0, which[None])[0]

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def ids(self) -> np.ndarray:
        return np.sort(np.concatenate([s.ids() for s in self.shards]))

    def export(self) -> tuple[np.ndarray, torch.Tensor]:
        """All shards' live rows, by id (a file re-deals them over whatever devices load it)."""
        parts = [s.export() for s in self.shards]
        ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(ids, kind="stable")
        return ids[order], torch.cat([p[1] for p in parts])[torch.from_numpy(order)]


@register(r"torch(,(?P<dtype>fp32|fp16|bf16))?,shards")
def _sharded(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    return ShardedIndex(dim, dtype=m.group("dtype") or "fp32", devices=options.get("devices"))
