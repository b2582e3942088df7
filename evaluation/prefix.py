"""Inputs that share a prefix, scored by running the prefix once.

Multiple-choice tasks feed the model one context per choice (SciQ, ARC-Challenge), and MMLU's
documents of one subject open with the same sentence: of the 2.68 M tokens in the six tasks'
distinct inputs, 0.71 M (26.5%) repeat a prefix some other input holds. `families` groups the
inputs under the prefix they share; `SharedPrefix` runs a batch of families' prefixes once
(right-padded, keeping every block's keys and values), then each member's remaining tokens on
top of its family's keys and values: an explicit mask lets the member see its own prefix's
real positions and its own earlier tokens (and, in a sliding-window layer, only those within
the window), and its positions continue from its prefix's length. A causal model computes the
same function of the same tokens either way; only the float summation order of the GEMMs and
of attention differs from one full forward (tests/test_general.py: scores within 1e-5 on every
architecture). Every position a continuation is read from lies after its family's prefix
(`families` caps the prefix there), so the prefix pass needs no LM head."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..engine.arch import cache_kwargs, model_device
from ..engine.tokens import common_length, pad_right

# attention implementations whose masks this module builds: boolean (True attends) for SDPA,
# additive for the eager path
MASKS = {"sdpa": "bool", "eager": "additive"}


def families(inputs: Sequence[Sequence[int]], reads: Sequence[int], min_shared: int = 16) -> list[tuple[int, list[int]]]:
    """Group input indices as (prefix length, members): inputs in lexicographic order, a run of
    neighbours sharing a prefix of at least `min_shared` tokens, capped at each member's
    `reads[i]` (the first position whose logits input i's continuation is read from). An input
    joins the run before it only if the tokens the run saves do not fall (n members sharing L
    save (n - 1) L): a long shared context is not traded for a short common opening. Every input
    is in exactly one family; a family of one has prefix 0."""
    if not inputs:
        return []
    order = sorted(range(len(inputs)), key=lambda i: tuple(inputs[i]))
    out: list[tuple[int, list[int]]] = []
    members, shared = [order[0]], reads[order[0]]

    def close() -> None:
        out.append((shared if len(members) > 1 else 0, list(members)))

    for prev, i in zip(order, order[1:]):
        n = len(members)
        cand = min(shared, common_length(inputs[prev], inputs[i]), reads[i])
        if cand >= min_shared and n * cand >= (n - 1) * shared:
            members.append(i)
            shared = cand
        else:
            close()
            members, shared = [i], reads[i]
    close()
    return out


@dataclass
class Prefixes:
    """The keys and values of a batch of prefixes: per layer (F, H, P, d) each, right-padded."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor  # (F,) each prefix's real length


class SharedPrefix:
    """Runs prefixes once and suffixes on top of them for one model (see the module docstring).
    `unsupported(model)` says why a model cannot (its attention implementation's mask is not
    one this module builds, or its forward takes no cache or positions); the scorer then runs
    every input whole."""

    def __init__(self, model: nn.Module, pad: int = 0) -> None:
        why = self.unsupported(model)
        if why:
            raise ValueError(why)
        self.model, self.pad = model, pad
        cfg = model.config
        self.kind = MASKS[cfg._attn_implementation]
        self.window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        # models whose layers differ take one mask per layer type (Gemma-3: sliding and full)
        self.types = sorted(set(types)) if types and len(set(types)) > 1 else None

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in MASKS:
            return f"attention implementation {impl!r} (prefix sharing builds masks for {sorted(MASKS)})"
        params = inspect.signature(model.forward).parameters
        missing = [p for p in ("position_ids", "attention_mask") if p not in params]
        if "cache" not in params and "past_key_values" not in params:
            missing.append("cache")
        if missing:
            return f"{type(model).__name__}.forward takes no {', '.join(missing)}"
        return None

    def _cache(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        from transformers import DynamicCache

        # no config: every layer keeps every position (the masks below apply any sliding window)
        return DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()

    def prefixes(self, seqs: Sequence[Sequence[int]]) -> Prefixes:
        """Run `seqs` (right-padded, causal: a pad after a prefix changes none of its positions)
        and keep each layer's keys and values."""
        ids, _ = pad_right(list(seqs), self.pad, model_device(self.model))  # (F, P)
        cache = self._cache()
        self.model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, cache))
        kv = [(layer.keys, layer.values) for layer in cache.layers]  # per layer (F, H, P, d)
        return Prefixes(kv, torch.tensor([len(x) for x in seqs]))

    def _mask(self, plen: torch.Tensor, width: int, s: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, S, P + S): row b's query i (absolute position plen[b] + i) sees the prefix's
        positions j < plen[b] and its own suffix positions k <= i, within `window` if given."""
        i = torch.arange(s)[None, :, None]  # (1, S, 1)
        j = torch.arange(width)[None, None, :]  # (1, 1, P)
        k = torch.arange(s)[None, None, :]  # (1, 1, S)
        p = plen[:, None, None]  # (B, 1, 1)
        see_prefix = j < p  # (B, 1, P)
        see_own = k <= i  # (1, S, S)
        if window is not None:
            see_prefix = see_prefix & (j > p + i - window)  # (B, S, P)
            see_own = see_own & (k > i - window)
        allowed = torch.cat([see_prefix.expand(len(plen), s, width), see_own.expand(len(plen), s, s)], dim=2)
        allowed = allowed[:, None]  # (B, 1, S, P + S)
        if self.kind == "bool":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def suffixes(self, pre: Prefixes, family: Sequence[int], seqs: Sequence[Sequence[int]], lo: int) -> torch.Tensor:
        """Logits (B, S - lo, V) of each `seqs[b]` read after prefix `family[b]` of `pre`, at its
        suffix positions lo..S-1 (S: the longest suffix; shorter ones are right-padded)."""
        dev = model_device(self.model)
        fam = torch.tensor(family)  # (B,)
        plen = pre.lengths[fam]  # (B,)
        ids, _ = pad_right(list(seqs), self.pad, dev)  # (B, S)
        s = ids.shape[1]
        width = pre.kv[0][0].shape[2]
        idx = fam.to(pre.kv[0][0].device)
        cache = self._cache([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in pre.kv])
        pos = plen[:, None] + torch.arange(s)[None, :]  # (B, S)
        dtype = next(self.model.parameters()).dtype
        if self.types is None:
            mask: Any = self._mask(plen, width, s, self.window, dtype).to(dev)
        else:
            mask = {t: self._mask(plen, width, s, self.window if "sliding" in t else None, dtype).to(dev)
                    for t in self.types}
        keep = torch.arange(lo, s, device=dev)
        return self.model(ids, use_cache=True, attention_mask=mask, position_ids=pos.to(dev),
                          logits_to_keep=keep, **cache_kwargs(self.model, cache)).logits
