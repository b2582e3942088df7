"""`Change`: one database edit with everything the model computed for it.

`NeuralDB.plan_add / plan_update / plan_remove` run the model (keys, residuals) and return a
Change; `NeuralDB.apply` writes it with no model use (index and table inserts only). `add`,
`update` and `remove` are plan-then-apply, so a Change logged before it is applied (a server's
write-ahead log) replays to exactly the database the live edit made."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .facts import Fact

OPS = ("add", "update", "remove")


@dataclass(frozen=True)
class Change:
    op: str  # one of OPS
    rows: tuple[int, ...]  # ids whose fact and key are written (new or replaced)
    facts: tuple[Fact, ...]  # their facts, one per row
    keys: torch.Tensor  # (len(rows), d_key) unit keys
    removed: tuple[int, ...]  # ids dropped
    res_ids: tuple[int, ...]  # ids whose residual is written: the rows and their subjects' other facts
    residuals: torch.Tensor  # (len(res_ids), d_res)
    prefixes: tuple[str, ...] | None = None  # the key recipe's prefixes, when this change generated them

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Change.op must be one of {OPS}, got {self.op!r}")
        if len(self.rows) != len(self.facts) or self.keys.shape[0] != len(self.rows):
            raise ValueError("Change: rows, facts and keys must have the same length")
        if self.residuals.shape[0] != len(self.res_ids):
            raise ValueError("Change: res_ids and residuals must have the same length")
        if not set(self.rows) <= set(self.res_ids):
            raise ValueError("Change: every written row needs a residual")
