"""Exact lazy residuals, an evaluation strategy for large databases.

A fact's residual is computed on the unedited model and never depends on other facts, and it
changes an output only where its key wins the argmax and passes gamma. Gate decisions at layer
l* depend on nothing the residuals change within a forward pass, so one pass with keys alone
shows which facts open; generated text can open further facts once residuals act. Hence:
run the evaluation, load the residuals of every fact that opened and is not loaded yet, and
run it again until a pass opens no new fact. The result equals that of the database with every
residual computed (the product's `add()` still computes them all)."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def until_no_new_facts(db: Any, run: Callable[[], T], load: Callable[[set[int]], int], max_passes: int = 20) -> T:
    """`run()` under `db.record()`; `load(opened_ids)` puts the missing residuals into the
    database and returns how many it added; repeats until it adds none."""
    for _ in range(max_passes):
        with db.record() as passes:
            out = run()
        opened = {h.fact_id for hits in passes for h in hits}
        if load(opened) == 0:
            return out
    raise RuntimeError(f"lazy residuals: still opening new facts after {max_passes} passes")
