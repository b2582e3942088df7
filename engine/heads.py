"""The head check: a second cosine test at the winning fact's subject's *first* token.

A key at the subject's last token cannot tell "... CBS Evening News" from "Buffalo Evening News"
(docs/gate.md, "Head verification"). With `EditConfig.head_gamma` set, every fact row also holds
a **head key** (the gate vector at the subject's first token, averaged over the same contexts as
the key) and two **spans** (last minus first subject token, as the subject tokenizes inside text
and as the bare prompt tokenizes it). The gate opens at token t for winner j only if, besides
`cos(q_t, k_j) > gamma`, one of the spans s puts j's head on a token whose query passes
`cos(q_{t-s}, h_j) > head_gamma`. Where a span puts the head on the sequence's first real token
(the attention sink, whose activations look alike whatever the token), the token itself is
compared instead: it must be the subject's first token as it reads at a text's start, with or
without a leading space (both ids are in the row). A head before the first real token (the
subject cannot be whole) fails; a span wider than `head_window` is not checked and passes.
The rule reads only positions and the sink's token id, so a full forward, a KV-cache decode,
a batch and left padding decide alike.

A KV-cache decode step sees one token, so the gate keeps the unit queries of the last
`head_window` positions of every sequence (`Window`), keyed by the cache object the decoder
received (or, for a prefill that let the model make its own cache, as the pending window the
next step adopts). A cache whose rows are dropped or reordered must have its windows follow
(`select_rows`), or the next step refuses to guess."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..kernels import l2_normalize

N_SPANS = 2  # in text, bare prompt
N_FORMS = 2  # the subject's first token at a text's start: with a leading space, without
ID_BASE = 2048  # a token id is stored as two digits in this base, each exact in float16
UNKNOWN = -1  # a sink id (or a fact's head id) that is not known: the sink test passes


def head_dim(d: int) -> int:
    """Width of a head row: the unit head key (d), the spans, the head token ids as digits."""
    return d + N_SPANS + 2 * N_FORMS


def head_rows(heads: torch.Tensor, spans: torch.Tensor, first_ids: torch.Tensor) -> torch.Tensor:
    """(F, d) head keys, (F, N_SPANS) spans and (F, N_FORMS) head token ids -> (F, head_dim(d))
    rows of the head table: the unit head key, the spans, then each id as (id // ID_BASE,
    id % ID_BASE), small integers exact in float16 (UNKNOWN: (-1, 0))."""
    f = heads.shape[0]
    for name, t, n in (("spans", spans, N_SPANS), ("first_ids", first_ids, N_FORMS)):
        if t.shape != (f, n):
            raise ValueError(f"{name} must be ({f}, {n}), got {tuple(t.shape)}")
    first_ids = first_ids.long()
    digits = torch.stack([first_ids.div(ID_BASE, rounding_mode="floor"), first_ids.remainder(ID_BASE)], -1)  # (F, N_FORMS, 2)
    digits = torch.where(first_ids[..., None] < 0, torch.tensor([UNKNOWN, 0], device=first_ids.device), digits)
    return torch.cat([l2_normalize(heads.float()), spans.to(heads.device, torch.float32),
                      digits.reshape(f, -1).to(heads.device, torch.float32)], 1)  # (F, head_dim(d))


def map_rows(rows: torch.Tensor, d: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Key rows (F, d), or (F, d + head_dim(d)) with a head table, with the gate key and the head
    key both passed through `fn` (a gate map: applied last to either, and blind to scale, so the
    rows of a mapped space follow from the plain space's); spans and ids unchanged."""
    if rows.shape[1] not in (d, d + head_dim(d)):
        raise ValueError(f"key rows of width {rows.shape[1]}: neither d = {d} nor d + head_dim(d) = {d + head_dim(d)}")
    parts = [fn(rows[:, :d])]  # (F, d)
    if rows.shape[1] > d:
        parts += [l2_normalize(fn(rows[:, d : 2 * d]).float()), rows[:, 2 * d :]]  # (F, d), (F, N_SPANS + 2 N_FORMS)
    return torch.cat(parts, 1)


def widen(rows: torch.Tensor, d: int) -> torch.Tensor:
    """Head rows of the first layout (F, d + N_SPANS: no token ids, session 17) -> (F, head_dim(d))
    with the ids UNKNOWN, so such a database decides at the sink as it did (the head passes)."""
    if rows.shape[1] != d + N_SPANS:
        raise ValueError(f"head rows of width {rows.shape[1]}: neither d + {N_SPANS} nor head_dim(d) = {head_dim(d)}")
    unknown = torch.tensor([UNKNOWN, 0] * N_FORMS, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, unknown.expand(rows.shape[0], -1)], 1)  # (F, head_dim(d))


def token_ids(digits: torch.Tensor) -> torch.Tensor:
    """(..., 2 * N_FORMS) digits of head rows -> (..., N_FORMS) long ids (negative: UNKNOWN)."""
    d = digits.round().long().unflatten(-1, (N_FORMS, 2))  # (..., N_FORMS, 2)
    return d[..., 0] * ID_BASE + d[..., 1]


@dataclass
class Window:
    """The unit queries (B, W, d) of the last W positions before `end` (absolute, padded layout)
    and each row's sink token id (B,) (UNKNOWN where the first real token has not been seen)."""

    queries: torch.Tensor
    end: int
    sink: torch.Tensor

    def select(self, rows: torch.Tensor) -> None:
        self.queries = self.queries.index_select(0, rows.to(self.queries.device))
        self.sink = self.sink.index_select(0, rows.to(self.sink.device))


class HeadState:
    """A gate's windows: one per live KV cache (weakly keyed: a dropped cache drops its window),
    and the window of the last prefill, which the first step with an unseen cache adopts."""

    def __init__(self) -> None:
        self.by_cache: weakref.WeakKeyDictionary[Any, Window] = weakref.WeakKeyDictionary()
        self.pending: Window | None = None

    def before(self, cache: Any, past: int, batch: int, width: int, dim: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, d) the queries of the W positions before `past` (zeros at a sequence start)
        and (B,) the sink ids seen so far."""
        if past == 0:
            return torch.zeros(batch, width, dim, device=device), torch.full((batch,), UNKNOWN, device=device)
        win = self.by_cache.get(cache) if cache is not None else None
        if win is None and self.pending is not None and self.pending.end == past \
                and self.pending.queries.shape[0] == batch:
            win = self.pending
        if win is None or win.end != past or win.queries.shape[0] != batch:
            raise RuntimeError(
                f"the gate's head check has no record of the {past} tokens before this step (batch {batch}): "
                f"start each sequence with a prefill while the database is attached, and when cache rows "
                f"are dropped or reordered call neuraldb.engine.heads.select_rows(model, cache, rows) too")
        return win.queries, win.sink

    def after(self, cache: Any, ext: torch.Tensor, end: int, width: int, sink: torch.Tensor) -> None:
        win = Window(ext[:, -width:].detach(), end, sink)  # (B, W, d), (B,)
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
              sink: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The head check for every token of one forward, with no host sync: (B, T) bool, and
    (B, T) bool where it passes by the sink's token id (`head_scores` says what is compared)."""
    score, anchored = head_scores(heads, ids, ext, past, first, sink)
    return score > gamma, anchored


def head_scores(heads: torch.Tensor, ids: torch.Tensor, ext: torch.Tensor, past: int, first: torch.Tensor,
                sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) the head check's score for every token (the best span's cosine; +inf where it
    passes unchecked or by the sink's id, -inf where it cannot pass): the check passes where
    it exceeds head_gamma; and (B, T) bool where it passes by the sink's token id (a known id
    equal to the head's: the subject stands at the text's start, where `EditConfig.sink_gamma`
    applies).

    heads: (capacity, head_dim(d)) the head table by id; ids: (B, T) the winners (-1: none);
    ext: (B, W + T, d) `extend`'s window, position past - W first; first: (B,) each row's first
    real token (absolute); sink: (B,) its token id (UNKNOWN: not known, the sink test passes)."""
    b, t = ids.shape
    d, w = ext.shape[-1], ext.shape[1] - t
    rows = heads[ids.clamp(min=0).reshape(-1)].float()  # (B*T, head_dim(d))
    hk = rows[:, :d].view(b, t, d)
    spans = rows[:, d : d + N_SPANS].round().long().view(b, t, N_SPANS)
    head_ids = token_ids(rows[:, d + N_SPANS :]).view(b, t, N_FORMS)
    here = torch.arange(t, device=ext.device)[None, :, None] + past  # (1, T, 1) absolute positions
    at = here - spans  # (B, T, S) the head's absolute position per span
    slot = (at - (past - w)).clamp(0, w + t - 1)  # (B, T, S) its index in ext
    seen = ext.gather(1, slot.reshape(b, -1, 1).expand(-1, -1, d)).view(b, t, N_SPANS, d)  # (B, T, S, d)
    cos = (seen * hk[:, :, None, :]).sum(-1)  # (B, T, S)
    first, sink = first.to(ext.device)[:, None, None], sink.to(ext.device)[:, None]  # (B, 1, 1), (B, 1)
    exact = ((head_ids == sink[..., None]) & (sink[..., None] >= 0)).any(-1)  # (B, T): the sink is the head token
    same = exact | (head_ids < 0).any(-1) | (sink < 0)  # or one of the two ids is unknown: passes
    cos = torch.where(at == first, torch.where(same[..., None], float("inf"), float("-inf")), cos)
    cos = torch.where(at < first, float("-inf"), cos)  # the subject would start before the text
    cos = torch.where(spans > w, float("inf"), cos)  # wider than the window: not checked
    anchored = ((at == first) & (spans <= w)).any(-1) & exact  # (B, T)
    return cos.amax(-1), anchored


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
