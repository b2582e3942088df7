"""`Auto`: the exact spec that measured fastest for the table's size, switched as the table grows.

On the CPU, `Flat` (FAISS: one BLAS call for all tokens of a forward pass) while the table holds
fewer than `switch_at` keys, and `Proj{rank}` (bound-pruned exact search, `index/bound.py`) from
there on: on SmolLM2's real keys (d 1536) the two cross near 2,000 keys and `Proj512` is 1.7x
faster than `Flat` for a prefill at 5,000 keys, 2.3x at 20,000 and 2.7x at 100,000 (README,
"which index to choose"). On an accelerator, `torch` (an exact scan on the device, no host
round trip). Every choice is exact, so a switch changes the speed, never a
gate decision beyond fp32 rounding at gamma.

The switch happens in `add` (never inside a forward pass): the stored keys move to the new index
bit for bit, and the query sample given to `train` (a tensor, or a function that makes one when
first needed, so that small tables never pay for it) fits the projection's basis. Once switched
the index stays `Proj` if facts are removed; a reload picks by the size it finds."""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Union

import numpy as np
import torch

from .base import KeyIndex, make_index, register

log = logging.getLogger(__name__)

Queries = Union[torch.Tensor, Callable[[], torch.Tensor]]


def default_rank(dim: int) -> int:
    """A third of the key width, in multiples of 64 from 192 on (512 for d 1536, where measured)."""
    r = dim // 3
    return r - r % 64 if r >= 64 else r


class AutoIndex(KeyIndex):
    """Options: switch_at (keys from which `Proj` is used on the CPU), rank (its projection
    rank), floor (the gate's gamma; without one no bound can prune and `Flat` stays), device;
    other options go to the inner index."""

    def __init__(self, dim: int, switch_at: int = 5000, rank: int | None = None, floor: float = -1.0,
                 device: Any = "cpu", spec: str = "Auto", **options: Any) -> None:
        self.spec, self.dim, self.switch_at = spec, dim, switch_at
        self.rank = rank if rank is not None else default_rank(dim)
        self.floor, self.device, self.options = floor, torch.device(device), options
        self._queries: Queries | None = None
        self.inner = self._make(self.choice(0))

    def choice(self, n: int) -> str:
        """The inner spec for a table of n keys."""
        if self.device.type != "cpu":
            return "torch"
        if n >= self.switch_at and self.floor > -1.0 and 0 < self.rank < self.dim:
            return f"Proj{self.rank}"
        return "Flat"

    def _make(self, spec: str) -> KeyIndex:
        return make_index(spec, self.dim, floor=self.floor, device=self.device, **self.options)

    def _switch(self) -> None:
        want = self.choice(self.inner.ntotal)
        if want == self.inner.spec or not want.startswith("Proj"):
            return
        log.info("key index: %d keys, %s -> %s", self.inner.ntotal, self.inner.spec, want)
        ids, keys = self.inner.export()
        new = self._make(want)
        new.add(ids, keys.to(self.device), unit=True)  # the stored unit keys, bit for bit
        self.inner = new
        if self._queries is not None:
            self.train(self._queries)

    # -- the KeyIndex interface, by delegation ----------------------------------------------------
    def train(self, queries: Queries) -> None:
        """A sample of real queries for a projection's basis, now or when the switch comes."""
        self._queries = queries  # a function stays one: a Proj read from disk with its basis never calls it
        train = getattr(self.inner, "train", None)
        if train is not None:
            train(queries)

    def add(self, ids: Any, keys: torch.Tensor, *, unit: bool = False) -> None:
        self.inner.add(ids, keys, unit=unit)
        self._switch()

    def _state(self) -> dict[str, Any]:
        return self.inner._state()  # a Proj's basis and projections are saved with the keys

    def _set_state(self, state: dict[str, Any]) -> None:
        want = self.choice(len(state.get("ids", ())))
        if want.startswith("Proj") and "proj_basis" in state:
            self.inner = self._make(want)
            self.inner._set_state(state)
        else:
            super()._set_state(state)

    def remove(self, ids: Any) -> int:
        return self.inner.remove(ids)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.search(queries)

    def search_above(self, queries: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.search_above(queries, floor)

    def to(self, device: torch.device | str) -> "AutoIndex":
        device = torch.device(device)
        if (device.type == "cpu") != (self.device.type == "cpu"):  # host <-> accelerator: re-plan
            ids, keys = self.inner.export()
            self.device = device
            self.inner = self._make(self.choice(0))
            if len(ids):
                self.inner.add(ids, keys.to(device), unit=True)
            self._switch()  # as in add: a Proj gets its query sample
        else:
            self.device = device
            self.inner.to(device)
        return self

    @property
    def stats(self) -> dict[str, int]:
        stats = getattr(self.inner, "stats", None)
        if stats is None:
            raise AttributeError("stats")  # hasattr() says False: the inner index keeps none
        return stats

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def ids(self) -> np.ndarray:
        return self.inner.ids()

    def export(self) -> tuple[np.ndarray, torch.Tensor]:
        return self.inner.export()


@register(r"Auto(?P<switch>\d+)?")
def _auto(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    """"Auto" switches at 5,000 keys, "Auto{n}" at n."""
    if m.group("switch"):
        options = {**options, "switch_at": int(m.group("switch"))}
    return AutoIndex(dim, spec=m.group(0), **options)
