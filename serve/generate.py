"""Batched sampling with a KV cache: left-padded prefill, then one decode step for every live
row; rows that finish leave the batch (their cache rows are dropped). Every row has its own
temperature, top-p, stop strings and seeded generator, so a row's tokens depend only on its
own request (up to floating-point differences of the batch shape)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..engine.arch import cache_kwargs, model_device, returned_cache
from ..engine.heads import select_rows


@dataclass
class Sampling:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class RowOut:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    sent: int = 0  # characters of `text` already streamed


def stop_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One token from a row's logits (V,)."""
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = F.softmax(logits.float() / s.temperature, dim=-1)  # (V,)
    if s.top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < s.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def streamable(row: RowOut, stop: Sequence[str]) -> str:
    """The part of `row.text` that can be sent now: not a possible start of a stop string, not
    a half-decoded character; everything once the row is finished."""
    end = len(row.text)
    if row.finish_reason is None:
        if stop:
            end -= max(len(x) for x in stop) - 1
        while end > 0 and row.text[end - 1] == "\ufffd":
            end -= 1
    return row.text[row.sent:max(end, row.sent)]


@torch.no_grad()
def generate_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, reqs: Sequence[Sampling],
                   on_step: Callable[[list[int], list[RowOut]], None] | None = None,
                   cancelled: Callable[[int], bool] | None = None,
                   on_forward: Callable[[], None] | None = None) -> list[RowOut]:
    """Generate every request in one batch; `on_step(rows_changed, outs)` after each step,
    `on_forward()` after each forward (the gate's last decision is readable then)."""
    device = model_device(model)
    eos = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    outs = [RowOut() for _ in reqs]
    gens = []
    for s in reqs:
        g = torch.Generator()
        g.manual_seed(s.seed if s.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        gens.append(g)
    t = max(len(s.prompt_ids) for s in reqs)
    ids = torch.full((len(reqs), t), pad, dtype=torch.long)
    am = torch.zeros(len(reqs), t, dtype=torch.long)
    for b, s in enumerate(reqs):  # left padding: every row's last token is at position t-1
        ids[b, t - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
        am[b, t - len(s.prompt_ids):] = 1
    ids, am = ids.to(device), am.to(device)
    pos = (am.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    # the cache is made here and passed in, so the gate's head check keys its window to it
    out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True,
                **cache_kwargs(model, DynamicCache(config=model.config)))
    if on_forward:
        on_forward()
    cache, live = returned_cache(out), list(range(len(reqs)))  # live: request index of each batch row
    logits = out.logits[:, -1]  # (B, V)
    pos = pos[:, -1:]  # (B, 1)
    while live:
        step_tokens, changed = [], []
        for r, b in enumerate(live):
            s, o = reqs[b], outs[b]
            tok_id = _sample(logits[r], s, gens[b])
            step_tokens.append(tok_id)
            if tok_id in eos:
                o.finish_reason = "stop"
            else:
                o.token_ids.append(tok_id)
                o.text = tok.decode(o.token_ids, skip_special_tokens=True)
                hit = [o.text.find(x) for x in s.stop if x and x in o.text]
                if hit:
                    o.text, o.finish_reason = o.text[: min(hit)], "stop"
                elif len(o.token_ids) >= s.max_tokens:
                    o.finish_reason = "length"
            if o.finish_reason is None and cancelled is not None and cancelled(b):
                o.finish_reason = "cancelled"
            changed.append(b)
        if on_step:
            on_step(changed, outs)
        keep = [r for r, b in enumerate(live) if outs[b].finish_reason is None]
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            select_rows(model, cache, sel)  # the head check's windows follow the cache rows
            am, pos = am[sel], pos[sel]
            step_tokens = [step_tokens[r] for r in keep]
            live = [live[r] for r in keep]
        nxt = torch.tensor(step_tokens, device=device)[:, None]  # (B, 1)
        am = torch.cat([am, torch.ones_like(nxt)], dim=1)  # (B, T+1)
        pos = pos + 1
        out = model(input_ids=nxt, attention_mask=am, position_ids=pos, use_cache=True,
                    **cache_kwargs(model, cache))
        if on_forward:
            on_forward()
        cache, logits = returned_cache(out), out.logits[:, -1]
    return outs
