"""The gated layer: wraps the FFN output projection (keeping it as `base_layer`, as PEFT does).
For every token of every sequence the key index is queried once as one batch; the residual of
the best-matching fact is added where cos > gamma. Closed tokens keep the base output's bits.

Two ways to add, same bits: on the CPU the open rows are listed (`nonzero`) and only they are
gathered; on an accelerator, where listing them would stall the stream on a host sync, the
residuals are read by id from the table's dense block and added in place by a fused kernel
(`kernels.gather_add_`), with no host sync unless hits or timings are asked for.

With a head table (`EditConfig.head_gamma`) a winner must also pass the head check at its
subject's first token (engine/heads.py); the decoder's pre-hook tells the layer where each
sequence starts and how many tokens its cache holds, so a decode step decides as a full
forward does."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..kernels import gate_add, gather_add_
from .arch import passed_cache
from .heads import UNKNOWN, HeadState, extend, head_scores

if TYPE_CHECKING:
    from ..index import KeyIndex, ResidualTable
    from .space import KeySpace


@dataclass(frozen=True)
class Hit:
    batch: int
    position: int
    fact_id: int
    similarity: float


@dataclass(frozen=True)
class Step:
    """What the decoder's pre-hook knows of one forward: the tokens its cache already holds,
    each row's first real token (absolute; left padding before it), the cache object, and the
    first real token's id where this pass holds it (else UNKNOWN: an earlier pass saw it)."""

    past: int
    first: torch.Tensor  # (B,) long
    cache: Any = None
    sink: torch.Tensor | None = None  # (B,) long


class GatedFFNOut(nn.Module):
    def __init__(self, base_layer: nn.Module, index: "KeyIndex", table: "ResidualTable", gamma: float,
                 space: "KeySpace", heads: "ResidualTable | None" = None, head_gamma: float = 0.0,
                 head_window: int = 16, sink_gamma: float | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index, self.table, self.gamma, self.space = index, table, gamma, space
        self.heads, self.head_gamma, self.head_window = heads, head_gamma, head_window  # (capacity, head_dim) by id
        self.sink_gamma = sink_gamma  # the key threshold where the subject stands at the text's start (None: gamma)
        self.head_state = HeadState()
        self.step: Step | None = None  # left by the decoder's pre-hook, read once
        self.context: torch.Tensor | None = None  # (B, T, d_ctx): left by the space's hooks, read once
        self.enabled = True
        self.token_mask: torch.Tensor | None = None  # (B, T): tokens the next forward may gate
        self.last_mask: torch.Tensor | None = None  # (B, T): the mask the last forward used
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # sims, ids, open (B, T)
        self.last_head: tuple[torch.Tensor, torch.Tensor] | None = None  # head score, anchored (B, T)
        self.timings: list[float] | None = None  # set to [] to record lookup seconds per call
        self.history: list[list[Hit]] | None = None  # set to [] to keep every call's hits
        self.sync_free: bool | None = None  # the dense gather-add path; None: off the CPU only
        # where the residual joins after a norm that follows this layer (Arch.ffn_add): forward
        # leaves (open, ids) here and the `AddAfter` wrapping that norm adds them
        self.deferred = False
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # decisions made elsewhere (open (B, T) bool, ids (B, T) long), read once by the next forward
        # instead of searching: a scoring pass in lower precision replays a float32 probe's decisions
        self.forced: tuple[torch.Tensor, torch.Tensor] | None = None
        # the caller reads the opens only (a probe): a token past the head window after the text's
        # first token cannot stand where the subject starts it (sink_gamma), so on the CPU it is
        # searched above gamma instead of the index's floor: the same opens, more keys pruned, and
        # below gamma its similarity reads (gamma, -1) instead of the best key under it
        self.open_only = False

    def _apply(self, fn: Any, recurse: bool = True) -> "GatedFFNOut":
        """`model.to(device)` moves the key index and residual table along with the weights."""
        super()._apply(fn, recurse)
        w = next(self.base_layer.parameters(), None)
        if w is not None and w.device != self.table.device:
            self.index.to(w.device)
            self.table.to(w.device)
            if self.heads is not None:
                self.heads.to(w.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        mask, self.token_mask = self.token_mask, None  # consumed: a mask never outlives its forward
        context, self.context = self.context, None  # likewise the attention context
        step, self.step = self.step, None
        forced, self.forced = self.forced, None
        self.last_mask, self.pending, self.last_head = mask, None, None
        if not self.enabled or (self.index.ntotal == 0 and self.heads is None):
            self.last = None
            return out
        if forced is not None:  # replayed decisions: no search
            open_, ids = (t.reshape(-1).to(out.device) for t in forced)  # (B*T,) each
            if open_.numel() != out.shape[:-1].numel():
                raise RuntimeError(f"forced gate decisions for {open_.numel()} tokens, "
                                   f"the layer saw {tuple(out.shape[:-1])}")
            self.last = None
            if self.deferred:
                self.pending = (open_, ids)
                return out
            return self.add(out, open_, ids)
        lead = x.shape[:-1]
        if mask is not None and mask.shape != lead:
            raise RuntimeError(f"gate mask {tuple(mask.shape)} does not fit the layer input {tuple(lead)}; "
                               f"the decoder's pre-hook and this layer saw different batches")
        t0 = time.perf_counter() if self.timings is not None else 0.0
        q = self.space.query(x, context)  # (B*T, d_key)
        if self.index.ntotal == 0:  # nothing to gate, but a later step's head check reads these queries
            self._head_check(q, None, lead, step)
            self.last = None
            return out
        late = self._late(lead, step) if self.open_only and q.device.type == "cpu" else None  # (B*T,)
        if q.device.type == "cpu" and (late is not None or (mask is not None and not bool(mask.all()))):
            # pads and sinks are never searched; late tokens above gamma
            sims, ids = self._search_masked(q, None if mask is None else mask.reshape(-1), late)
        else:
            sims, ids = self.index.search(q)  # (B*T,), (B*T,)
        if self.heads is not None:
            score, anchored = (t.reshape(-1).to(sims.device) for t in self._head_check(q, ids, lead, step))
            passed = score > self.head_gamma
            self.last_head = (score.view(lead), anchored.view(lead))
            gamma: Any = self.gamma
            if self.sink_gamma is not None:  # per token, in the similarities' dtype (no float32 rounding)
                gamma = torch.where(anchored, torch.tensor(self.sink_gamma, dtype=sims.dtype, device=sims.device),
                                    torch.tensor(self.gamma, dtype=sims.dtype, device=sims.device))  # (B*T,)
            open_ = (ids >= 0) & (sims > gamma) & passed
        else:
            open_ = (ids >= 0) & (sims > self.gamma)
        if mask is not None:
            open_ &= mask.reshape(-1).to(open_.device)
        if self.timings is not None:
            if q.device.type == "cuda":
                torch.cuda.synchronize(q.device)
            self.timings.append(time.perf_counter() - t0)
        self.last = (sims.view(lead), ids.view(lead), open_.view(lead))
        if self.history is not None:
            self.history.append(self.hits())
        if self.deferred:  # added after the norm that follows this layer (`AddAfter`)
            self.pending = (open_, ids)
            return out
        return self.add(out, open_, ids)

    def add(self, out: torch.Tensor, open_: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`out` (B, T, d_model) with each open token's winning residual added; closed tokens keep
        their bits."""
        d_out = out.shape[-1]
        inference = not out.requires_grad and out.is_contiguous()
        sync_free = out.device.type != "cpu" if self.sync_free is None else self.sync_free
        if sync_free and inference:  # sync-free: no nonzero, nothing sized by the hits
            flat = out.view(-1, d_out)  # (B*T, d_model), out's own storage
            rows_by_id = self.table.dense(out.device)  # (capacity, d_model)
            return gather_add_(flat, open_.to(out.device), ids.to(out.device), rows_by_id).view(out.shape)
        rows = open_.nonzero()[:, 0]
        if rows.numel() == 0:
            return out
        res = self.table.gather(ids[rows], device=out.device).to(out.dtype)  # (n_open, d_model)
        if inference:  # add in place on open rows only
            flat = out.view(-1, d_out)  # (B*T, d_model), out's own storage
            flat.index_put_((rows,), res, accumulate=True)  # out[r] = out[r] + res: the same rounding
            return out
        full = torch.zeros(open_.numel(), d_out, dtype=out.dtype, device=out.device)  # (B*T, d_model)
        full[rows] = res
        return gate_add(out.reshape(-1, d_out), open_, full).view(out.shape)  # (B, T, d_model)

    def _head_check(self, q: torch.Tensor, ids: torch.Tensor | None, lead: torch.Size,
                    step: Step | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, T) each token's head-check score for its winner (ids; None: no search ran), which
        passes above head_gamma, and whether it passes at the sink by its token id
        (engine/heads.py); records this pass's queries for the next decode step either way."""
        if len(lead) != 2:
            raise RuntimeError(f"the head check needs (batch, tokens) inputs, got {tuple(lead)}")
        b, t = lead
        step = step or Step(0, torch.zeros(b, dtype=torch.long, device=q.device))
        w = self.head_window
        before, seen = self.head_state.before(step.cache, step.past, b, w, q.shape[-1], q.device)  # (B, W, d), (B,)
        ext = extend(before, q.view(b, t, -1))  # (B, W + T, d)
        here = None if step.sink is None else step.sink.to(seen.device)  # (B,) where this pass holds the first token
        sink = seen if here is None else torch.where(here >= 0, here, seen)
        self.head_state.after(step.cache, ext, step.past + t, w, sink)
        if ids is None:
            return None
        return head_scores(self.heads.dense(q.device), ids.view(b, t).to(q.device), ext, step.past,
                           step.first.to(q.device), sink)

    def _search_masked(self, q: torch.Tensor, mask: torch.Tensor | None,
                       late: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Search only the tokens the mask lets through (on the CPU, where listing them costs no
        device sync), the `late` ones above gamma (`open_only`); the others read (-inf, -1), as
        a search that found nothing."""
        n = q.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=q.device) if mask is None else mask.to(q.device)
        sims = torch.full((n,), float("-inf"), dtype=torch.float64, device=q.device)
        ids = torch.full((n,), -1, dtype=torch.long, device=q.device)
        parts = [(keep, None)] if late is None else [(keep & ~late, None), (keep & late, self.gamma)]
        for sel, above in parts:
            rows = sel.nonzero()[:, 0]
            if rows.numel():
                s, i = self.index.search(q[rows]) if above is None else self.index.search_above(q[rows], above)
                sims = sims.to(s.dtype)
                sims[rows], ids[rows] = s, i.to(ids.dtype)
        return sims, ids

    def _late(self, lead: torch.Size, step: Step | None) -> torch.Tensor | None:
        """(B*T,) the tokens more than head_window after their row's first real token: where the
        head check anchors a subject at the text's start (engine/heads.py) its head is the first
        token and its span at most head_window, so only gamma can open these. None where the
        sink threshold is not the lower one (nothing to gain) or there is no head check."""
        if self.heads is None or self.sink_gamma is None or self.sink_gamma >= self.gamma or len(lead) != 2:
            return None
        b, t = lead
        past, first = (0, torch.zeros(b, dtype=torch.long)) if step is None else (step.past, step.first)
        here = past + torch.arange(t)  # (T,) absolute positions
        return (here[None, :] - first.cpu()[:, None] > self.head_window).reshape(-1)  # (B*T,)

    def hits(self) -> list[Hit]:
        """Tokens where the gate opened in the last forward pass."""
        if self.last is None:
            return []
        sims, ids, open_ = (t.reshape(-1, t.shape[-1]) for t in self.last)  # (B, T)
        return [Hit(b, t, int(ids[b, t]), float(sims[b, t])) for b, t in open_.nonzero().tolist()]


class AddAfter(nn.Module):
    """Wraps the norm after the gated layer (Gemma 2/3's post_feedforward_layernorm, keeping it
    as `base_layer`) and adds the residuals the gate decided on to the norm's output. Closed
    tokens keep the norm's bits."""

    def __init__(self, base_layer: nn.Module, gate: GatedFFNOut) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._gate = (gate,)  # a reference, not a submodule: the gate is registered where it sits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        gate = self._gate[0]
        pending, gate.pending = gate.pending, None  # consumed, as the gate's mask is
        if pending is None:
            return out
        if pending[0].numel() != out.shape[:-1].numel():
            raise RuntimeError(f"the gate decided for {pending[0].numel()} tokens but the norm after it "
                               f"saw {tuple(out.shape[:-1])}")
        return gate.add(out, *pending)


def gate_mask_hook(gate: GatedFFNOut, gate_first_token: bool) -> Any:
    """A forward pre-hook for the decoder (`model.base_model`): marks which input tokens may be gated. Pads never
    are, and neither is the first real token of a sequence (it acts as an attention sink whose
    activations resemble many keys) unless `gate_first_token`; and leaves the `Step` (cached
    tokens, where each row starts) that the head check reads."""

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids is not None  # token ids (not embeddings): the sink's id is known
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            gate.token_mask = None
            return
        b, t = ids.shape[:2]
        am = kwargs.get("attention_mask")
        given = am is not None and am.dim() == 2
        if not given:
            am = torch.ones(b, t, dtype=torch.long, device=ids.device)
        cache = passed_cache(kwargs)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else am.shape[1] - t
        mask = am[:, -t:].bool().clone()  # (B, T)
        first = am.long().argmax(dim=1)  # (B,) first real token, in the mask's columns
        # absolute positions: the mask's columns end where this pass ends (none given: no padding)
        first = first + (past + t - am.shape[1]) if given else torch.zeros_like(first)
        if not gate_first_token:  # wherever the first real token falls: a prefill, or a decode step after pads
            mask &= torch.arange(t, device=mask.device)[None, :] != (first - past)[:, None]
        gate.token_mask = mask
        rel = first - past  # (B,) the first real token's column in this pass
        inside = (rel >= 0) & (rel < t)
        sink = torch.where(inside, ids.gather(1, rel.clamp(0, t - 1)[:, None])[:, 0], UNKNOWN) if tokens \
            else torch.full_like(first, UNKNOWN)
        gate.step = Step(past, first, cache, sink)

    return hook
