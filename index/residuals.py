"""Residuals in fixed-size shards addressed by fact id: row `id % shard_size` of shard
`id // shard_size`. Ids are allocated densely by the database, so no id->row map is needed;
a shard is allocated when its first row is written and freed when its last row is removed.
Shards live on a chosen device, in pinned CPU memory, or memory-mapped from a safetensors file.

`dense(device)` gives all rows as one tensor addressed by id, for a gate that must gather without
a host sync (a GPU forward). Shards already on that device become views of it (no second copy;
writes go through); otherwise it is a copy on that device, rebuilt after the next change."""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from .base import as_ids

_ST_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16)}


class ResidualTable:
    def __init__(self, dim: int, shard_size: int = 4096, device: str | torch.device | Sequence[Any] = "cpu",
                 dtype: torch.dtype = torch.float32, pin: bool = False) -> None:
        """`device`: one device, or several (shard s lives on device s % len); `pin`: page-locked
        CPU memory, for fast gathers into a GPU forward pass."""
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.dim, self.shard_size, self.dtype = dim, shard_size, dtype
        many = device if isinstance(device, (list, tuple)) else [device]
        self.devices, self.pin = [torch.device(d) for d in many], pin
        self.device = self.devices[0]
        self.shards: dict[int, torch.Tensor] = {}
        self._live: dict[int, np.ndarray] = {}  # shard -> bool row mask
        self._dense: torch.Tensor | None = None  # (capacity, dim): see dense()
        self._dense_shared = False  # the shards are views of _dense (else it is a copy)

    def _shard(self, s: int) -> torch.Tensor:
        if s not in self.shards:
            dev = self.devices[s % len(self.devices)]
            d = self._dense
            if d is not None and self._dense_shared and d.device == dev and (s + 1) * self.shard_size <= d.shape[0]:
                t = d[s * self.shard_size : (s + 1) * self.shard_size]  # (shard_size, dim) view
                t.zero_()
            else:
                self._dense = None
                t = torch.zeros(self.shard_size, self.dim, dtype=self.dtype, device=dev)
                t = t.pin_memory() if self.pin and torch.cuda.is_available() else t
            self.shards[s] = t
            self._live[s] = np.zeros(self.shard_size, bool)
        return self.shards[s]

    def _changed(self) -> None:
        if not self._dense_shared:
            self._dense = None

    def dense(self, device: torch.device | str) -> torch.Tensor:
        """(capacity, dim): row i is fact i's residual (zeros where none), on `device`, at least
        every stored id long. Rebuilt only when stale: a copy after any change, views never."""
        device = torch.device(device)
        need = (max(self.shards, default=-1) + 1) * self.shard_size
        d = self._dense
        if d is not None and d.device == device and d.shape[0] >= need:
            return d
        share = all(t.device == device and not getattr(t, "_neuraldb_mmap", False) for t in self.shards.values()) \
            and len(self.devices) == 1 and self.devices[0] == device and not self.pin
        cap = max(2 * need if share else need, self.shard_size)  # shared: room to grow in place
        d = torch.zeros(cap, self.dim, dtype=self.dtype, device=device)  # (capacity, dim)
        for s, t in self.shards.items():
            d[s * self.shard_size : (s + 1) * self.shard_size] = t.to(device)
            if share:
                self.shards[s] = d[s * self.shard_size : (s + 1) * self.shard_size]
        self._dense, self._dense_shared = d, share
        return d

    def _writable(self, s: int) -> torch.Tensor:
        """Shard `s`, copied into RAM first if it is memory-mapped (the file is never written)."""
        shard = self._shard(s)
        if getattr(shard, "_neuraldb_mmap", False):
            shard = shard.clone().to(self.devices[s % len(self.devices)])
            self.shards[s] = shard
            self._dense = None
        return shard

    def put(self, ids: Any, rows: torch.Tensor) -> None:
        ids = as_ids(ids)
        if rows.shape != (len(ids), self.dim):
            raise ValueError(f"residuals must be ({len(ids)}, {self.dim}), got {tuple(rows.shape)}")
        for s in np.unique(ids // self.shard_size):
            sel = np.nonzero(ids // self.shard_size == s)[0]
            local = ids[sel] % self.shard_size
            shard = self._writable(int(s))
            shard[torch.from_numpy(local).to(shard.device)] = rows[torch.from_numpy(sel)].to(shard.device, shard.dtype)
            self._live[int(s)][local] = True
        self._changed()

    def remove(self, ids: Any) -> None:
        """Drop rows: their bytes are zeroed (gone from memory and from every later save), and a
        shard whose last row goes is freed."""
        ids = as_ids(ids)
        for s in np.unique(ids // self.shard_size):
            s = int(s)
            if s not in self.shards:
                continue
            local = ids[ids // self.shard_size == s] % self.shard_size
            self._live[s][local] = False
            if not self._live[s].any():
                if self._dense_shared and self._dense is not None:
                    self.shards[s].zero_()  # a view: its rows stay in the dense block
                del self.shards[s], self._live[s]
            else:
                shard = self._writable(s)
                shard[torch.from_numpy(local).to(shard.device)] = 0
        self._changed()

    def to(self, device: torch.device | str) -> "ResidualTable":
        """Move every shard to one device (memory-mapped shards are read into it)."""
        self.devices = [torch.device(device)]
        self.device = self.devices[0]
        self.shards = {s: t.to(self.device) for s, t in self.shards.items()}
        self._dense, self._dense_shared = None, False
        return self

    def gather(self, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """(n, dim) residual rows for `ids` (n,), on `device` (default: the ids' device)."""
        device = device or ids.device
        out = torch.zeros(ids.shape[0], self.dim, dtype=self.dtype, device=device)
        if ids.numel() == 0:
            return out
        shard_of = ids // self.shard_size
        for s in torch.unique(shard_of).tolist():
            if s not in self.shards:
                continue
            sel = (shard_of == s).nonzero()[:, 0]
            shard = self.shards[s]
            local = (ids[sel] % self.shard_size).to(shard.device)
            out[sel] = shard[local].to(device, self.dtype, non_blocking=True)
        return out

    def ids(self) -> np.ndarray:
        parts = [s * self.shard_size + np.nonzero(m)[0] for s, m in sorted(self._live.items())]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    @property
    def nbytes_per_shard(self) -> dict[int, int]:
        return {s: t.nelement() * t.element_size() for s, t in sorted(self.shards.items())}

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_per_shard.values())

    def save(self, path: str | Path) -> None:
        # views of the dense block share its storage, which safetensors refuses: copy those
        tensors = {f"shard_{s}": t.cpu().clone() if self._dense_shared else t.contiguous().cpu()
                   for s, t in self.shards.items()}
        tensors.update({f"live_{s}": torch.from_numpy(m.copy()) for s, m in self._live.items()})
        save_file(tensors, str(path), metadata={"format": "neuraldb-residuals-1", "dim": str(self.dim),
                                                "shard_size": str(self.shard_size)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", mmap: bool = False,
             pin: bool = False) -> "ResidualTable":
        """Load a table; with `mmap=True` shards stay on disk and pages are read on demand."""
        path = Path(path)
        size_on_disk = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            (hlen,) = struct.unpack("<Q", head) if len(head) == 8 else (size_on_disk,)
            if hlen > size_on_disk - 8:
                raise ValueError(f"{path}: truncated or not a safetensors file")
            header = json.loads(fh.read(hlen))
        meta = header.pop("__metadata__", {})
        if meta.get("format") != "neuraldb-residuals-1":
            raise ValueError(f"{path}: not a neuraldb residual table")
        dim, size = int(meta["dim"]), int(meta["shard_size"])
        first = next((v for k, v in header.items() if k.startswith("shard_")), None)
        if first is not None and first.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"{path}: unsupported residual dtype {first.get('dtype')!r}")
        np_dt, t_dt = _ST_DTYPES[first["dtype"]] if first else (np.float32, torch.float32)
        table = cls(dim, size, device=device, dtype=t_dt, pin=pin)
        base = 8 + hlen
        for name, info in header.items():
            kind, _, num = name.partition("_")
            start, end = info["data_offsets"]
            want = (size, dim) if kind == "shard" else (size,)
            nbytes = size * (dim * np.dtype(np_dt).itemsize if kind == "shard" else 1)
            if kind not in ("shard", "live") or not num.isdigit() or tuple(info["shape"]) != want \
                    or end - start != nbytes or not 0 <= start <= end <= size_on_disk - base:
                raise ValueError(f"{path}: bad tensor {name!r} {info.get('shape')} in the header")
            s = int(num)
            if name.startswith("live_"):
                with open(path, "rb") as fh:
                    fh.seek(base + start)
                    table._live[s] = np.frombuffer(fh.read(end - start), dtype=bool).copy()
                continue
            arr = np.memmap(path, dtype=np_dt, mode="r", offset=base + start, shape=tuple(info["shape"]))
            if mmap:
                with warnings.catch_warnings():  # the view is read-only; put() copies on write
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(arr)
                t._neuraldb_mmap = True  # type: ignore[attr-defined]
            else:
                t = torch.from_numpy(np.array(arr)).to(device)
                if pin and torch.cuda.is_available():
                    t = t.pin_memory()
            table.shards[s] = t
        if sorted(table.shards) != sorted(table._live):
            raise ValueError(f"{path}: shards {sorted(table.shards)} and live masks {sorted(table._live)} differ")
        return table
