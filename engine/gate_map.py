"""A learned map of the gate's space: `T(v) = unit(v + (v V) U^T)`, a low-rank correction of
the identity fitted (engine/map_fit.py) so that a fact's prompts land on its key and ordinary
text lands on none.

The gate stays one exact cosine test: keys and queries both pass through T (a unit vector out),
so every exact index answers argmax-then-threshold in the mapped space unchanged, and a closed
gate still leaves the layer bit-identical. With U = 0, T is the plain space.

A map belongs to one model, layer and space: its file (safetensors: U, V and string metadata)
records them, and `GateMap.check` refuses it for any other. `EditConfig.gate_map` names a map
shipped under engine/maps/ (`maps()` lists them) or a file path; a saved database keeps its own
copy, so it opens where the original file is gone."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..kernels import l2_normalize
from .config import ConfigError

MAP_SUFFIX = ".safetensors"
# what a map's metadata must agree with (written by `space_meta`)
CHECKED = ("layer", "gate_context", "gate_context_weight", "dim", "layer_sha256")


class GateMap:
    """T(v) = unit(v + (v V) U^T); U and V are (dim, rank); `meta` says what it was fitted for."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, meta: Mapping[str, str] | None = None) -> None:
        if U.shape != V.shape or U.dim() != 2:
            raise ValueError(f"gate map: U {tuple(U.shape)} and V {tuple(V.shape)} must both be (dim, rank)")
        self.dtype = U.dtype  # what `save` writes back by default: a shipped fp16 map stays fp16
        self.U, self.V = U.float(), V.float()
        self.meta = dict(meta or {})
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copies per device, made once

    @property
    def dim(self) -> int:
        return self.U.shape[0]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.device not in self._on:
            self._on[v.device] = (self.U.to(v.device), self.V.to(v.device))
        U, V = self._on[v.device]
        x = v.float()
        return l2_normalize(x + (x @ V) @ U.T)  # (..., dim) -> (..., rank) -> (..., dim)

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """U, V (in `dtype`, default the one it was made from: float16 halves a shipped map)
        and the metadata, as safetensors."""
        dtype = dtype or self.dtype
        save_file({"U": self.U.to(dtype).contiguous(), "V": self.V.to(dtype).contiguous()}, str(path),
                  metadata=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "GateMap":
        try:
            t = load_file(str(path))
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"{path}: not a gate map ({e})") from e
        if set(t) != {"U", "V"}:
            raise ValueError(f"{path}: a gate map holds tensors U and V, found {sorted(t)}")
        return cls(t["U"], t["V"], meta)

    def check(self, want: Mapping[str, str], where: str) -> None:
        """Refuse this map for a space it was not fitted for (`want`: `space_meta` of it)."""
        if self.dim != int(want["dim"]):
            raise ConfigError(f"{where}: the map is {self.dim}-dimensional, the gate's space {want['dim']}")
        bad = [k for k in CHECKED if k in self.meta and self.meta[k] != want.get(k)]
        if bad:
            raise ConfigError(f"{where}: the map was fitted for {', '.join(f'{k}={self.meta[k]}' for k in bad)}; "
                              f"this database has {', '.join(f'{k}={want.get(k)}' for k in bad)}")


def space_meta(layer: int, gate_context: int, gate_context_weight: float, dim: int, layer_sha256: str) -> dict[str, str]:
    """The metadata a map fitted for this space carries (and is checked against)."""
    return {"layer": str(layer), "gate_context": str(gate_context), "gate_context_weight": f"{gate_context_weight:g}",
            "dim": str(dim), "layer_sha256": layer_sha256}


def _shipped() -> Any:
    """engine/maps/ as installed (a resources Traversable)."""
    return resources.files("neuraldb.engine").joinpath("maps")


def maps() -> list[str]:
    """Names of the maps shipped with neuraldb (engine/maps/NAME.safetensors)."""
    root = _shipped()
    return sorted(p.name[: -len(MAP_SUFFIX)] for p in root.iterdir() if p.name.endswith(MAP_SUFFIX)) \
        if root.is_dir() else []


def resolve_map(name: str) -> Path:
    """`EditConfig.gate_map` -> a file: a shipped map's name, or a path."""
    shipped = _shipped().joinpath(name + MAP_SUFFIX)
    if "/" not in name and not name.endswith(MAP_SUFFIX) and shipped.is_file():
        return Path(str(shipped))
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"EditConfig.gate_map {name!r}: neither a shipped map ({', '.join(maps()) or 'none'}) "
                          "nor a file")
    return path


def load_map(name: str) -> GateMap:
    path = resolve_map(name)
    try:
        return GateMap.load(path)
    except ValueError as e:
        raise ConfigError(f"EditConfig.gate_map: {e}") from e
