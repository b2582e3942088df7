"""The head check: a second cosine test at the winning fact's subject's *first* token.

A key at the subject's last token cannot tell "... CBS Evening News" from "Buffalo Evening News"
(docs/gate.md, "Head verification"). With `EditConfig.head_gamma` set, every fact row also holds
a **head key** (the gate vector at the subject's first token, averaged over the same contexts as
the key) and two **spans** (last minus first subject token, as the subject tokenizes inside text
and as the bare prompt tokenizes it). The gate opens at token t for winner j only if, besides
`cos(q_t, k_j) > gamma`, one of the spans s puts j's head on a token whose query passes
`cos(q_{t-s}, h_j) > head_gamma`. A head at or before the sequence's first real token (the
attention sink, or no token at all), or a span wider than `head_window`, has nothing to compare
and passes; the rule reads only positions, so a full forward, a KV-cache decode, a batch and
left padding decide alike.

A KV-cache decode step sees one token, so the gate keeps the unit queries of the last
`head_window` positions of every sequence (`Window`), keyed by the cache object the decoder
received (or, for a prefill that let the model make its own cache, as the pending window the
next step adopts). A cache whose rows are dropped or reordered must have its windows follow
(`select_rows`), or the next step refuses to guess."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels import l2_normalize

N_SPANS = 2  # in text, bare prompt


def head_rows(heads: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """(F, d) head keys and (F, N_SPANS) spans -> (F, d + N_SPANS) rows of the head table:
    the unit head key, then the spans (small integers, exact in float16)."""
    if spans.shape != (heads.shape[0], N_SPANS):
        raise ValueError(f"spans must be ({heads.shape[0]}, {N_SPANS}), got {tuple(spans.shape)}")
    return torch.cat([l2_normalize(heads.float()), spans.to(heads.device, torch.float32)], 1)  # (F, d + 2)


@dataclass
class Window:
    """The unit queries (B, W, d) of the last W positions before `end` (absolute, padded layout)."""

    queries: torch.Tensor
    end: int

    def select(self, rows: torch.Tensor) -> None:
        self.queries = self.queries.index_select(0, rows.to(self.queries.device))


class HeadState:
    """A gate's windows: one per live KV cache (weakly keyed: a dropped cache drops its window),
    and the window of the last prefill, which the first step with an unseen cache adopts."""

    def __init__(self) -> None:
        self.by_cache: weakref.WeakKeyDictionary[Any, Window] = weakref.WeakKeyDictionary()
        self.pending: Window | None = None

    def before(self, cache: Any, past: int, batch: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
        """(B, W, d) the queries of the W positions before `past` (zeros at a sequence start)."""
        if past == 0:
            return torch.zeros(batch, width, dim, device=device)
        win = self.by_cache.get(cache) if cache is not None else None
        if win is None and self.pending is not None and self.pending.end == past \
                and self.pending.queries.shape[0] == batch:
            win = self.pending
        if win is None or win.end != past or win.queries.shape[0] != batch:
            raise RuntimeError(
                f"the gate's head check has no record of the {past} tokens before this step (batch {batch}): "
                f"start each sequence with a prefill while the database is attached, and when cache rows "
                f"are dropped or reordered call neuraldb.engine.heads.select_rows(model, cache, rows) too")
        return win.queries

    def after(self, cache: Any, ext: torch.Tensor, end: int, width: int) -> None:
        win = Window(ext[:, -width:].detach(), end)  # (B, W, d)
        self.pending = win
        if cache is not None:
            try:
                self.by_cache[cache] = win
            except TypeError:  # a cache that cannot be weakly referenced: only `pending` serves it
                pass


def extend(before: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The window of unit queries before this pass (B, W, d), extended by its queries q (B, T, d):
    (B, W + T, d), what the head check reads and the next step keeps the tail of."""
    return torch.cat([before.to(torch.float32), l2_normalize(q)], 1)  # (B, W + T, d)


def head_pass(heads: torch.Tensor, ids: torch.Tensor, ext: torch.Tensor, past: int, first: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """The head check for every token of one forward, with no host sync: (B, T) bool.

    heads: (capacity, d + 2) the head table by id; ids: (B, T) the winners (-1: none);
    ext: (B, W + T, d) `extend`'s window, position past - W first; first: (B,) each row's first
    real token (absolute)."""
    b, t = ids.shape
    d, w = ext.shape[-1], ext.shape[1] - t
    rows = heads[ids.clamp(min=0).reshape(-1)].float()  # (B*T, d + 2)
    hk, spans = rows[:, :d].view(b, t, d), rows[:, d:].round().long().view(b, t, N_SPANS)
    here = torch.arange(t, device=ext.device)[None, :, None] + past  # (1, T, 1) absolute positions
    at = here - spans  # (B, T, S) the head's absolute position per span
    slot = (at - (past - w)).clamp(0, w + t - 1)  # (B, T, S) its index in ext
    seen = ext.gather(1, slot.reshape(b, -1, 1).expand(-1, -1, d)).view(b, t, N_SPANS, d)  # (B, T, S, d)
    cos = (seen * hk[:, :, None, :]).sum(-1)  # (B, T, S)
    blind = (spans > w) | (at <= first.to(ext.device)[:, None, None])  # nothing to compare: passes
    cos = torch.where(blind, torch.full_like(cos, float("inf")), cos)
    return cos.amax(-1) > gamma


def select_rows(model: nn.Module, cache: Any, rows: torch.Tensor) -> None:
    """Keep only `rows` (in that order) of `cache`'s head windows in every gate of `model`:
    call it with the cache's own `batch_select_indices(rows)` / `reorder_cache(rows)`."""
    for mod in model.modules():
        state = getattr(mod, "head_state", None)
        if isinstance(state, HeadState):
            win = state.by_cache.get(cache)
            if win is not None:
                win.select(rows)
            if state.pending is not None and state.pending is not win:
                state.pending = None
