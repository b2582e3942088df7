"""Residuals: one vector per fact, added to the FFN output at the subject's last token so the
model emits the new object; MEMIT `compute_z` (Adam; target NLL + KL on "{subject} is a";
weight decay; norm clamp; early stop), batched across facts with each fact its own vector.

Hidden states entering layer l* are computed once per batch; every optimisation step reruns
only the blocks from l* up, only for each row's tokens from the subject's last token on (the
keys and values of earlier tokens are constants, cached once), and the LM head only at the
positions that are scored. With `residual_dtype` bfloat16 (or "auto" on a CPU with AMX /
AVX512-BF16) those passes run their GEMMs in bf16 under autocast from weights cast once per
call; norms, softmaxes, the loss and the residual stream stay float32, and `residual_nll`
measures what the result reaches in float32."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function
from torch.func import functional_call
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .arch import cache_kwargs, get_arch, get_module, model_device
from .config import EditConfig
from .facts import Fact
from .hooks import Trace, first_hidden, start_at_layer
from .progress import Progress
from .step_blocks import StepStack
from . import step_blocks
from .tokens import encode_with_subject, pad_right, shared_len, target_ids

log = logging.getLogger(__name__)


@dataclass
class ResidualStats:
    nll: torch.Tensor  # (F,) final target NLL per fact
    steps: torch.Tensor  # (F,) optimisation steps taken per fact
    history: torch.Tensor | None = None  # (K, F) NLL after k steps, NaN once a fact stopped (asked for only)
    # (F,) 1.0 where every target token is the argmax on the fact's rewrite-prompt row (what greedy
    # decoding emits there with the residual at the subject) at its last evaluated delta
    greedy: torch.Tensor | None = None
    greedy_history: torch.Tensor | None = None  # (K, F) the same after k steps, NaN once stopped (with `history`)
    # token positions (padding included) the steps ran through the blocks from l* up, forward and
    # backward: the optimiser's work, whatever the machine (the prefill not counted)
    block_tokens: int = 0


@dataclass
class _Batch:
    ids: torch.Tensor  # (R, T)
    mask: torch.Tensor  # (R, T)
    lookup: torch.Tensor  # (R,) subject-last position of each row
    row_fact: torch.Tensor  # (R,) fact index of each row
    tgt_row: torch.Tensor  # (N,) row of each scored target token
    tgt_pos: torch.Tensor  # (N,) position whose logits predict it
    tgt_tok: torch.Tensor  # (N,) the token
    tgt_weight: torch.Tensor  # (N,) 1 / (n_target * n_rows): sums to 1 per fact
    tgt_greedy: torch.Tensor  # (N,) bool: on its fact's greedy-checked row (the bare prompt, else its first row)
    kl_row: torch.Tensor  # (E,) row of each KL entry (a KL prompt's distribution at one position)
    kl_pos: torch.Tensor  # (E,) its position
    kl_fact: torch.Tensor  # (E,) its fact
    kl_weight: torch.Tensor  # (E,) 1 / entries of its fact: a fact's KL term is the mean over its entries
    norm_row: torch.Tensor  # (F,) row whose z = block output at the subject sets the clamp scale
    row_ctx: torch.Tensor  # (R,) index in `contexts` of the text each row starts with (0: the bare prompt)


FAST_BF16: dict[str, Callable[[], bool]] = {  # device type -> whether it multiplies bf16 fast
    "cpu": lambda: any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported",
                                                                        "_is_avx512_bf16_supported")),
    "cuda": lambda: torch.cuda.is_bf16_supported(),
}


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 fast (FAST_BF16; an unknown device type: no)."""
    return FAST_BF16.get(device.type, lambda: False)()


def step_dtype(cfg: EditConfig, device: torch.device) -> torch.dtype:
    """The precision of the optimiser's steps: `cfg.residual_dtype`, where "auto" is bfloat16 on a
    device with fast bf16 GEMMs (AMX or AVX512-BF16 on a CPU) and float32 elsewhere."""
    if cfg.residual_dtype == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return getattr(torch, cfg.residual_dtype)


@contextmanager
def attention(model: PreTrainedModel, impl: str | None) -> Iterator[None]:
    """The model's attention implementation set to `impl` inside the block (None: unchanged)."""
    prev = model.config._attn_implementation
    if impl is None or impl == prev:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(prev)


@contextmanager
def frozen_params(model: torch.nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _build(tok: PreTrainedTokenizerBase, facts: Sequence[Fact], contexts: Sequence[str],
           cfg: EditConfig, device: torch.device) -> _Batch:
    """Rows of every fact: one per context (teacher-forced target) and one per KL prompt
    (`kl_prompt`, then `kl_contexts`), compared at the subject's last token or, with
    `kl_span: all`, at every token from it to the prompt's end.

    The gate never opens at position 0 (the attention sink), so a row whose subject ends at
    position 0 would train the residual where inference never adds it: such rows are left out
    (the bare prompt of a one-token subject), and a KL prompt starting with such a subject gets
    the first generated prefix. The norm that scales the clamp and weight decay is read at a
    prefixed row, never at position 0 (as keys.py does)."""
    seqs, lookup, row_fact, row_ctx = [], [], [], []
    tr, tp, tt, tw, tg, norm_row = [], [], [], [], [], []
    kl_row, kl_pos, kl_fact, kl_w = [], [], [], []
    kl_prompts, whole = (cfg.kl_prompt, *cfg.kl_contexts), cfg.kl_span == "all"
    prefixed = [c for c in contexts if c]
    for fi, fact in enumerate(facts):
        tgt = target_ids(tok, fact.target_new)
        encs = [encode_with_subject(tok, ctx, fact.prompt, fact.subject) for ctx in contexts]
        usable = [c for c, e in enumerate(encs) if e.subject_last > 0] or list(range(len(encs)))  # or keep all
        if len(usable) < len(encs):
            log.debug("fact %r: %d row(s) with the subject at position 0 left out", fact.subject, len(encs) - len(usable))
        first = len(seqs)
        for k, c in enumerate(usable):
            row, enc = len(seqs), encs[c]
            seqs.append(enc.ids + tgt[:-1])  # teacher forcing: prompt + target minus its last token
            lookup.append(enc.subject_last)
            row_fact.append(fi)
            row_ctx.append(c)
            for j, t in enumerate(tgt):
                tr.append(row)
                tp.append(len(enc.ids) - 1 + j)
                tt.append(t)
                tw.append(1.0 / (len(tgt) * len(usable)))
                tg.append(k == 0)  # the bare prompt where usable (contexts start with ""), else the first row
        prefixed_rows = [first + k for k, c in enumerate(usable) if c != 0]
        norm_row.append(prefixed_rows[0] if prefixed_rows else first)
        kls = []  # (context index, encoding) of each KL prompt
        for prompt in kl_prompts:  # read at the subject's last token, only what follows it is cut
            enc = encode_with_subject(tok, "", prompt, fact.subject, truncate_after_subject=not whole)
            if enc.subject_last == 0 and prefixed:
                enc = encode_with_subject(tok, prefixed[0], prompt, fact.subject, truncate_after_subject=not whole)
                kls.append((contexts.index(prefixed[0]), enc))
            else:
                kls.append((0, enc))
        n_entries = sum(len(e.ids) - e.subject_last if whole else 1 for _, e in kls)
        for c, enc in kls:
            row = len(seqs)
            seqs.append(enc.ids)
            lookup.append(enc.subject_last)
            row_fact.append(fi)
            row_ctx.append(c)
            for pos in range(enc.subject_last, len(enc.ids) if whole else enc.subject_last + 1):
                kl_row.append(row)
                kl_pos.append(pos)
                kl_fact.append(fi)
                kl_w.append(1.0 / n_entries)
    ids, mask = pad_right(seqs, tok.pad_token_id, device)
    t = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
    return _Batch(ids, mask, t(lookup), t(row_fact), t(tr), t(tp), t(tt), t(tw, torch.float32), t(tg, torch.bool),
                  t(kl_row), t(kl_pos), t(kl_fact), t(kl_w, torch.float32), t(norm_row), t(row_ctx))


def kl_now_init(init_logp: torch.Tensor, now_logp: torch.Tensor) -> torch.Tensor:
    """KL(now || init) per row, as MEMIT's `kl_div(init, now, log_target=True)`: (F, V) -> (F,)."""
    return (now_logp.exp() * (now_logp - init_logp)).sum(-1)


def head(model: PreTrainedModel, h: torch.Tensor, weights: "LowWeights | None" = None) -> torch.Tensor:
    """LM-head logits of final hidden states (N, d): (N, V) float32."""
    out = model.get_output_embeddings()
    logits = (out(h) if weights is None else functional_call(out, weights.head, (h,))).float()  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def logits_at(model: PreTrainedModel, hidden: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """LM-head logits at selected (row, pos) only: (N, V) float32."""
    return head(model, hidden[rows, pos])


@dataclass
class LowWeights:
    """bf16 copies of the matrices of every block (`blocks`: block index -> names under the base
    model) and of the LM head (`head`), cast once per call and read through `functional_call`
    under bf16 autocast: the prefill's and steps' GEMMs run in bf16 without casting every weight
    at every call, while norms, softmaxes and the residual stream stay float32 as autocast keeps them."""

    blocks: dict[int, dict[str, torch.Tensor]]
    head: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: PreTrainedModel, dtype: torch.dtype = torch.bfloat16) -> "LowWeights":
        names = {id(p): n for n, p in model.base_model.named_parameters()}
        blocks = get_module(model, get_arch(model).layers)
        per = {i: {names[id(p)]: p.detach().to(dtype) for p in blk.parameters() if p.dim() == 2}
               for i, blk in enumerate(blocks)}
        return cls(per, {"weight": model.get_output_embeddings().weight.detach().to(dtype)})

    def above(self, layer: int) -> dict[str, torch.Tensor]:
        """The entries of blocks `layer` up (those below are skipped by `start_at_layer`)."""
        return {n: w for i, ws in self.blocks.items() if i >= layer for n, w in ws.items()}


def _base_forward(model: PreTrainedModel, kwargs: dict[str, Any], weights: LowWeights | None, layer: int = 0) -> Any:
    """The base model's forward on `kwargs`, reading `weights`' bf16 copies of blocks `layer` up
    where given (the blocks below are skipped or cut short by a hook), its own weights otherwise."""
    if weights is None:
        return model.base_model(**kwargs)
    return functional_call(model.base_model, weights.above(layer), (), kwargs)


@dataclass
class _Steps:
    """What every optimisation step runs from block l* up for some rows of the batch: the rows
    (Rg,), their token ids (Rg, S), the attention mask, the hidden states entering block l*
    (Rg, S, d), where the delta is added (Rg,); the targets it scores (indices into the batch's
    targets, (Ng,)) with their row in the group and position, the KL entries it scores (indices
    into the batch's, (Eg,)) likewise; on the suffix path, position ids and the constant keys/values of the tokens
    before each row's subject (one (K, V) per layer)."""

    rows: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor
    delta_pos: torch.Tensor
    tgt: torch.Tensor
    tgt_row: torch.Tensor
    tgt_pos: torch.Tensor
    kl: torch.Tensor
    kl_row: torch.Tensor
    kl_pos: torch.Tensor
    position_ids: torch.Tensor | None = None
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def keep(self, rows: torch.Tensor) -> "_Steps | None":
        """Only the group's rows where `rows` (Rg,) bool is set, with the targets and KL rows they
        score (None when no row is left): a fact that stopped no longer costs its tokens."""
        if bool(rows.all()):
            return self
        if not bool(rows.any()):
            return None
        local = torch.cumsum(rows, 0) - 1  # new index of each kept row
        t, k = rows[self.tgt_row], rows[self.kl_row]  # (Ng,), (Fg,) scored by a kept row
        past = None if self.past is None else [(kk[rows], vv[rows]) for kk, vv in self.past]
        pos = None if self.position_ids is None else self.position_ids[rows]
        return _Steps(self.rows[rows], self.ids[rows], self.mask[rows], self.hidden[rows], self.delta_pos[rows],
                      self.tgt[t], local[self.tgt_row[t]], self.tgt_pos[t], self.kl[k], local[self.kl_row[k]],
                      self.kl_pos[k], pos, past)

    def cast(self, dtype: torch.dtype) -> "_Steps":
        """The cached keys/values in `dtype` (what the steps' attention reads under autocast)."""
        past = None if self.past is None else [(k.to(dtype), v.to(dtype)) for k, v in self.past]
        return replace(self, past=past)

    def run(self, model: PreTrainedModel, layer: int, tuple_len: int, delta: torch.Tensor,
            weights: "LowWeights | None" = None, stack: StepStack | None = None) -> torch.Tensor:
        """Blocks l* up with `delta` (Rg, d) added to the FFN output of l* at `delta_pos`: through
        `stack`'s functions where given (suffix groups only), else the model's modules."""
        if stack is not None and self.past is not None and self.position_ids is not None:
            return stack.run(self.hidden, delta, self.delta_pos, self.position_ids, self.mask, self.past[layer:])
        arch = get_arch(model)
        rows = torch.arange(len(self.rows), device=self.ids.device)

        def add(out: torch.Tensor) -> torch.Tensor:
            return out.index_put((rows, self.delta_pos), delta.to(out.dtype), accumulate=True)

        cache = DynamicCache(ddp_cache_data=self.past, config=model.config) if self.past is not None else None
        kwargs = dict(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position_ids,
                      use_cache=cache is not None, **cache_kwargs(model.base_model, cache))
        with start_at_layer(model, arch.layers, layer, self.hidden, tuple_len), \
                Trace(model, arch.add_path(layer), retain_input=False, edit_output=add):
            return _base_forward(model, kwargs, weights, layer)[0]  # (Rg, S, d)


@dataclass
class Prefix:
    """A generated prefix run once through every block (keys.py does the same for keys): its
    token ids as tokenised alone, the keys and values of each layer ((1, kv_heads, n, head_dim)
    each), and the hidden states entering block l* (1, n, d). Rows that start with its first n
    tokens read them from here instead of running them again; exact under causal attention (up
    to float rounding: one row's GEMMs instead of a batch's)."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: torch.Tensor

    def cache(self, model: PreTrainedModel, n: int, rows: int) -> DynamicCache:
        """A KV cache holding the first `n` tokens for each of `rows` rows."""
        kv = [(k[:, :, :n].expand(rows, -1, -1, -1), v[:, :, :n].expand(rows, -1, -1, -1)) for k, v in self.kv]
        return DynamicCache(ddp_cache_data=kv, config=model.config)


@torch.no_grad()
def run_prefixes(model: PreTrainedModel, tok: PreTrainedTokenizerBase, contexts: Sequence[str], layer: int,
                 weights: LowWeights | None = None) -> dict[int, Prefix]:
    """Every non-empty context (index in `contexts`) run once, as the rows' prefill runs it
    (bf16 GEMMs with `weights`)."""
    arch, device = get_arch(model), model_device(model)
    out = {}
    for c, text in enumerate(contexts):
        ids = tok(text)["input_ids"] if text else []
        if not ids:
            continue
        x = torch.tensor([ids], device=device)  # (1, n)
        cache = DynamicCache(config=model.config)
        kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True,
                      **cache_kwargs(model.base_model, cache))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=weights is not None), \
                Trace(model, f"{arch.layers}.{layer}") as tr:
            _base_forward(model, kwargs, weights)
        out[c] = Prefix(list(ids), [(lay.keys, lay.values) for lay in cache.layers], tr.input.detach())
    return out


Part = tuple[torch.Tensor, int, Prefix | None]  # rows (Rc,), tokens they share with the prefix, the prefix run


def _parts(b: _Batch, prefixes: dict[int, Prefix]) -> list[Part]:
    """The batch's rows by the context they start with: (rows, n, prefix), where the rows' first
    n tokens are the prefix's (n = 0, prefix None: nothing shared)."""
    out = []
    for c in sorted(set(b.row_ctx.tolist())):
        rows = (b.row_ctx == c).nonzero()[:, 0]  # (Rc,)
        pre, n = prefixes.get(c), 0
        if pre is not None:
            n = shared_len(pre.ids, [(b.ids[r, : int(b.mask[r].sum())].tolist(), int(b.lookup[r])) for r in rows])
        out.append((rows, n, pre if n else None))
    return out


def _below(model: PreTrainedModel, layer: int, b: _Batch, parts: list[Part],
           weights: LowWeights | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows below block l*, each part of rows after its shared prefix only: the hidden states
    entering block l* (R, T, d; zeros past a row's end), block l*'s output at each row's subject
    (R, d), and the length of the block's output tuple (0: a tensor)."""
    arch = get_arch(model)
    R, T = b.ids.shape
    hidden_in: torch.Tensor | None = None
    z: torch.Tensor | None = None
    tuple_len = 0
    for rows, n, pre in parts:
        width = int(b.mask[rows].sum(1).max())  # this part's longest row
        cache = pre.cache(model, n, len(rows)) if pre is not None else None
        kwargs = dict(input_ids=b.ids[rows, n:width], attention_mask=b.mask[rows, :width], use_cache=cache is not None,
                      **cache_kwargs(model.base_model, cache))
        with Trace(model, f"{arch.layers}.{layer}", retain_output=True, stop=True) as tr:
            _base_forward(model, kwargs, weights)
        h, out = tr.input.detach(), first_hidden(tr.output).detach()  # (Rc, width - n, d) each
        if hidden_in is None:
            hidden_in, z = h.new_zeros(R, T, h.shape[-1]), out.new_zeros(R, out.shape[-1])
        tuple_len = len(tr.output) if isinstance(tr.output, tuple) else 0
        hidden_in[rows, n:width] = h
        if pre is not None:
            hidden_in[rows, :n] = pre.hidden[:, :n].to(h.dtype)
        z[rows] = out[torch.arange(len(rows), device=out.device), b.lookup[rows] - n]
    assert hidden_in is not None and z is not None
    return hidden_in, z, tuple_len


def _full_steps(b: _Batch, hidden_in: torch.Tensor) -> list[_Steps]:
    """Every row in full, every step (the reference path)."""
    every = lambda n: torch.arange(n, device=b.ids.device)  # noqa: E731
    return [_Steps(every(len(b.ids)), b.ids, b.mask, hidden_in, b.lookup, every(len(b.tgt_row)), b.tgt_row, b.tgt_pos,
                   every(len(b.kl_row)), b.kl_row, b.kl_pos)]


GROUP_STEPS = 2  # a residual shared by several facts may take this many times the configured steps
GROUP_COST = 48  # what one more group of rows costs per step, in padded tokens (call overhead, small GEMMs)
# through step_blocks' compiled functions a group's own cost is smaller than what padding saves at
# small row counts (small GEMMs run far below peak): 128 facts in batches of 64 ran at 2.74 facts/s
# with this cost against 2.57 with GROUP_COST (docs/editing-speed.md, session 23)
FUSED_GROUP_COST = 2000
# with the flat stream (`residual_stream: flat`) a group adds only its attention calls: the
# projections and MLP run once over every group's tokens whatever their number
FLAT_GROUP_COST = 64


def length_groups(lengths: Sequence[int], cost: int = GROUP_COST) -> list[list[int]]:
    """Rows split into groups (each run padded to its longest row) that minimise padded tokens
    + `cost` per group: an exact partition of the sorted lengths into runs, by dynamic programming."""
    vals = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == v) for v in vals]
    best, cut = [0.0] + [float("inf")] * len(vals), [0] * (len(vals) + 1)
    for j in range(1, len(vals) + 1):  # best[j]: the first j lengths grouped
        for i in range(j):
            c = best[i] + cost + sum(count[i:j]) * vals[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], len(vals)
    while j:
        bounds.append((vals[cut[j]], vals[j - 1]))
        j = cut[j]
    return [[r for r, x in enumerate(lengths) if lo <= x <= hi] for lo, hi in reversed(bounds)]


@torch.no_grad()
def _before_subject(model: PreTrainedModel, layers: str, layer: int, b: _Batch, hidden_in: torch.Tensor,
                    tuple_len: int, g: torch.Tensor, P: int, parts: list[Part],
                    weights: LowWeights | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values at blocks >= l* of the first P tokens of rows `g` (Rg,), one
    (Rg, kv_heads, P, head_dim) pair per layer from l* up; a part's shared prefix is read from
    its run, only the tokens after it run."""
    live: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    where = torch.full((len(b.ids),), -1, dtype=torch.long, device=g.device)
    where[g] = torch.arange(len(g), device=g.device)
    for rows, n, pre in parts:
        sub = rows[where[rows] >= 0]  # this part's rows in the group
        if not len(sub):
            continue
        cache = DynamicCache(config=model.config) if pre is None else pre.cache(model, n, len(sub))
        if P > n:
            with start_at_layer(model, layers, layer, hidden_in[sub, n:P], tuple_len):  # causal: the first P alone
                kwargs = dict(input_ids=b.ids[sub, n:P], attention_mask=b.mask[sub, :P], use_cache=True,
                              **cache_kwargs(model.base_model, cache))
                _base_forward(model, kwargs, weights, layer)
        kv = [(lay.keys, lay.values) for lay in cache.layers[layer:]]  # (Rs, kv_heads, P, head_dim) each
        if live is None:
            live = [(k.new_empty(len(g), *k.shape[1:]), v.new_empty(len(g), *v.shape[1:])) for k, v in kv]
        for (lk, lv), (k, v) in zip(live, kv):
            lk[where[sub]], lv[where[sub]] = k, v
    assert live is not None
    return live


def _suffix_steps(model: PreTrainedModel, layers: str, layer: int, b: _Batch, hidden_in: torch.Tensor,
                  tuple_len: int, pack: bool, parts: list[Part], weights: LowWeights | None = None,
                  cost: int = GROUP_COST) -> list[_Steps]:
    """Only each row's tokens from its subject's last token on: the tokens before it never see
    the delta (causal attention), so their keys and values at blocks >= l* are computed once
    here, for each group's rows only up to its longest such prefix (a shared generated prefix
    read from `parts`' runs), and served from a cache at every step; positions keep their true
    values. With `pack`, rows of like suffix length run together (a KL row is one token long, a
    target row several), so little of a step is padding."""
    device = b.ids.device
    R, T = b.ids.shape
    start, lengths = b.lookup, b.mask.sum(1)  # (R,), (R,)
    suffix = lengths - start  # (R,)
    groups = length_groups(suffix.tolist(), cost) if pack else [list(range(R))]
    out = []
    for g in groups:
        g = torch.tensor(g, device=device)
        P, S = max(1, int(start[g].max())), int(suffix[g].max())
        live = _before_subject(model, layers, layer, b, hidden_in, tuple_len, g, P, parts, weights)
        past = [live[0]] * layer + live  # blocks below l* are skipped; their slots only carry the length P
        pos = start[g, None] + torch.arange(S, device=device)  # (Rg, S) true positions
        valid = pos < lengths[g, None]
        pos = pos.clamp(max=T - 1)
        mask = torch.cat([torch.arange(P, device=device)[None] < start[g, None], valid], 1).long()  # (Rg, P + S)
        local = torch.full((R,), -1, dtype=torch.long, device=device)
        local[g] = torch.arange(len(g), device=device)
        tgt, kl = (local[b.tgt_row] >= 0).nonzero()[:, 0], (local[b.kl_row] >= 0).nonzero()[:, 0]
        out.append(_Steps(g, b.ids[g].gather(1, pos), mask, hidden_in[g[:, None], pos], torch.zeros_like(g),
                          tgt, local[b.tgt_row[tgt]], b.tgt_pos[tgt] - start[b.tgt_row[tgt]],
                          kl, local[b.kl_row[kl]], b.kl_pos[kl] - start[b.kl_row[kl]], pos, past))
    return out


def _optimise(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact], layer: int,
              contexts: Sequence[str], cfg: EditConfig,
              slots: Sequence[int] | None = None, history: bool = False,
              start: torch.Tensor | None = None, weights: LowWeights | None = None,
              stack: StepStack | None = None,
              prefixes: dict[int, Prefix] | None = None) -> tuple[torch.Tensor, ResidualStats]:
    """One delta per slot (`slots[i]`: fact i's slot, 0..S-1; default one slot per fact). Facts
    that share a slot are optimised jointly: the slot's loss is the mean of its facts' NLL + KL
    terms, plus its weight decay, and it stops when that falls below `loss_stop`. Returns the
    (F, d_model) delta of every fact (a slot's delta repeated for each of its facts). With `start`
    (S, d_model) no step is taken: the stats are each fact's NLL there. With `weights` (the bf16
    matrices the caller cast) the passes run their GEMMs in bf16; without, all in float32. With
    `stack` the steps run the blocks through its functions (engine/step_blocks.py). With `prefixes`
    (`run_prefixes` of `contexts`) rows read their shared generated prefix from its run."""
    arch = get_arch(model)
    device = model_device(model)
    b = _build(tok, facts, contexts, cfg, device)
    n_facts = len(facts)
    slot = torch.tensor(range(n_facts) if slots is None else slots, dtype=torch.long, device=device)  # (F,)
    n_slots = int(slot.max()) + 1 if n_facts else 0
    per_slot = torch.zeros(n_slots, device=device).index_add(0, slot, torch.ones(n_facts, device=device))  # (S,)
    first = torch.full((n_slots,), n_facts, dtype=torch.long, device=device).scatter_reduce(
        0, slot, torch.arange(n_facts, device=device), "amin")  # (S,) each slot's first fact
    low = weights is not None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)  # GEMMs in bf16, the rest float32
    # the suffix path serves earlier tokens from a cache: exact while every row fits a sliding
    # window (a sliding layer's cache keeps only the window; Gemma 2/3's is 512 tokens or more)
    window = getattr(model.config, "sliding_window", None) or b.ids.shape[1]
    suffix = cfg.residual_suffix and arch.suffix_cache and int(b.lookup.max()) > 0 and b.ids.shape[1] <= window
    # rows by the generated prefix they start with (read from its run on the suffix path)
    parts = _parts(b, prefixes) if suffix and prefixes else [(torch.arange(len(b.ids), device=device), 0, None)]
    # One pass below l*: cache what enters block l*, and the block's output at the subject (z).
    with torch.no_grad(), autocast, record_function("residuals.prefill"):
        hidden_in, z, tuple_len = _below(model, layer, b, parts, weights)  # (R, T, d_model), (R, d_model)
    z_norm = z[b.norm_row].float().norm(dim=-1)[first]  # (S,)

    with autocast, record_function("residuals.prefill"):
        flat = stack is not None and stack.parts is not None and cfg.residual_stream == "flat" and suffix
        cost = GROUP_COST if stack is None else FLAT_GROUP_COST if flat else FUSED_GROUP_COST
        groups = _suffix_steps(model, arch.layers, layer, b, hidden_in, tuple_len, cfg.residual_pack, parts,
                               weights, cost) if suffix else _full_steps(b, hidden_in)
    d_model = hidden_in.shape[-1]
    delta = torch.zeros(n_slots, d_model, device=device) if start is None else start.detach().clone().float()
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    # one vector carries n > 1 objects: a norm budget sqrt(n) times larger, twice the steps
    max_norm = cfg.clamp_norm * z_norm * per_slot.sqrt()  # (S,)
    limit = torch.where(per_slot > 1, GROUP_STEPS * cfg.steps, cfg.steps).long()  # (S,)

    kl_init: torch.Tensor | None = None  # (E, V) each KL entry's distribution before any step
    active = torch.ones(n_slots, dtype=torch.bool, device=device)
    steps = torch.zeros(n_slots, dtype=torch.long, device=device)
    nll_f = torch.zeros(n_facts, device=device)  # each fact's NLL at its last evaluated delta
    greedy_f = torch.zeros(n_facts, device=device)  # 1.0 where its greedy answer was right there
    hist: list[torch.Tensor] = []  # (F,) per evaluated step, with `history`
    hist_g: list[torch.Tensor] = []
    if low:
        groups = [g.cast(torch.bfloat16) for g in groups]
    warm = cfg.residual_warmup if start is None else 0
    work = 0  # token positions run through the blocks (ResidualStats.block_tokens)
    tgt_scale = torch.ones_like(b.tgt_weight)  # (N_all,) what multiplies each target's weight now
    if warm:  # the first steps: each fact's first target row and its KL rows, every other row later
        full = groups
        first_row = torch.zeros(len(b.ids), dtype=torch.bool, device=device)  # (R,)
        first_row[b.tgt_row[b.tgt_greedy]] = True
        first_row[b.kl_row] = True
        groups = [k for g in groups if (k := g.keep(first_row[g.rows])) is not None]
        w = torch.zeros(n_facts, device=device).index_add(0, b.row_fact[b.tgt_row], b.tgt_weight * b.tgt_greedy)
        tgt_scale = b.tgt_greedy / w[b.row_fact[b.tgt_row]]  # (N_all,) the first row's targets sum to 1 per fact
    # bf16 steps run eager attention: the CPU's bf16 SDPA backward is ~20x slower than its bmm's
    with frozen_params(model), torch.enable_grad(), autocast, attention(model, "eager" if low else None):
        for it in range(int(limit.max()) if n_slots else 0):
            if warm and it == warm:  # every row from now on (no fact stopped during the warm-up)
                groups, tgt_scale = full, torch.ones_like(b.tgt_weight)
            if it == cfg.steps and bool((active & (limit <= it)).any()):  # single facts end here
                active &= limit > it
                if not bool(active.any()):
                    break
                groups = [k for g in groups if (k := g.keep(active[slot[b.row_fact[g.rows]]])) is not None]
            # targets and KL rows of the facts still optimising, in the order the groups score them
            tgt = torch.cat([g.tgt for g in groups])  # (N,)
            tgt_fact, tgt_tok, tgt_w = b.row_fact[b.tgt_row[tgt]], b.tgt_tok[tgt, None], b.tgt_weight[tgt] * tgt_scale[tgt]
            kl_e = torch.cat([g.kl for g in groups])  # (Ea,) KL entries of the facts still optimising
            h_tgt, h_kl = [], []
            work += sum(g.ids.numel() for g in groups)
            with record_function("residuals.blocks"):
                if flat:  # every group in one call: the stream laid end to end above l*
                    outs = stack.run_flat([(g.hidden, delta[slot[b.row_fact[g.rows]]], g.delta_pos, g.position_ids,
                                            g.mask, g.past[layer:]) for g in groups])
                else:
                    outs = [g.run(model, layer, tuple_len, delta[slot[b.row_fact[g.rows]]], weights, stack)
                            for g in groups]
                for g, hidden in zip(groups, outs):  # (Rg, S, d) each
                    h_tgt.append(hidden[g.tgt_row, g.tgt_pos])  # (Ng, d)
                    h_kl.append(hidden[g.kl_row, g.kl_pos])  # (Eg, d)
            with record_function("residuals.head"):  # the LM head and the loss
                logits = head(model, torch.cat(h_tgt + h_kl), weights)  # (N + Ea, V): one LM-head call per step
                logp = F.log_softmax(logits[: len(tgt)], -1)  # (N, V)
                tok_nll = -logp.gather(1, tgt_tok)[:, 0] * tgt_w  # (N,)
                nll_now = torch.zeros(n_facts, device=device).index_add(0, tgt_fact, tok_nll)  # (F,) 0 where stopped
                miss = (logp.argmax(-1) != tgt_tok[:, 0]) & b.tgt_greedy[tgt]  # (N,) a checked token not the argmax
                misses = torch.zeros(n_facts, device=device).index_add(0, tgt_fact, miss.float())  # (F,)
                right_now = (misses == 0).float()  # (F,) 1.0: greedy emits the whole object
                kl_logp = F.log_softmax(logits[len(tgt) :], -1)  # (Ea, V), entries in kl_e order
                if kl_init is None:
                    kl_init = kl_logp.new_empty(len(b.kl_row), kl_logp.shape[1])
                    kl_init[kl_e] = kl_logp.detach()
                kl_entry = kl_now_init(kl_init[kl_e], kl_logp)  # (Ea,)
                kl_f = torch.zeros(n_facts, device=device).index_add(0, b.kl_fact[kl_e], b.kl_weight[kl_e] * kl_entry)
                wd = cfg.weight_decay * delta.norm(dim=-1) / z_norm**2  # (S,)
                terms = torch.zeros(n_slots, device=device).index_add(0, slot, nll_now + cfg.kl_factor * kl_f)
                loss = terms / per_slot + wd  # (S,)
            nll_f = torch.where(active[slot], nll_now.detach(), nll_f)
            greedy_f = torch.where(active[slot], right_now, greedy_f)
            if history:
                hist.append(torch.where(active[slot], nll_now.detach(), float("nan")))
                hist_g.append(torch.where(active[slot], right_now, float("nan")))
            if start is not None:  # measuring given residuals, not optimising them
                break
            was = active.clone()
            if it >= warm:  # (in the warm-up a fact's other rows are not read yet: no stop)
                active &= loss.detach() >= cfg.loss_stop
                if cfg.nll_stop is not None:  # the target alone is learned: stop (a group on its facts' mean)
                    slot_nll = torch.zeros(n_slots, device=device).index_add(0, slot, nll_now.detach()) / per_slot
                    active &= slot_nll >= cfg.nll_stop
            if not bool(active.any()):
                break
            steps += active.long()
            opt.zero_grad(set_to_none=True)
            with record_function("residuals.backward"):
                (loss * active).sum().backward()
            before = delta.detach().clone()
            if it == 0 and cfg.residual_init == "gradient":  # one jump along -grad to the clamp's scale
                with torch.no_grad():
                    g = delta.grad  # (S, d)
                    jump = -g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12) * (cfg.init_scale * max_norm)[:, None]
                    delta.copy_(torch.where(active[:, None], jump, before))
            else:
                opt.step()
            for grp in opt.param_groups:
                grp["lr"] *= cfg.lr_decay
            with torch.no_grad():
                delta[~active] = before[~active]  # stopped facts stay where they stopped
                scale = (max_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
            if not torch.equal(was, active):  # facts that stopped leave the rows every step runs
                groups = [k for g in groups if (k := g.keep(active[slot[b.row_fact[g.rows]]])) is not None]
    stack_or_none = lambda xs: torch.stack(xs) if history and xs else None  # noqa: E731
    return delta.detach().float()[slot], ResidualStats(nll_f.detach(), steps[slot], stack_or_none(hist), greedy_f,
                                                       stack_or_none(hist_g), work)


def residual_contexts(prefixes: Sequence[str], cfg: EditConfig) -> list[str]:
    """The contexts a fact's target rows are read in: the bare prompt, then `residual_prefixes`
    generated prefixes."""
    return ["", *prefixes[: cfg.residual_prefixes]]


def suffix_length(tok: PreTrainedTokenizerBase, fact: Fact) -> int:
    """Tokens a fact's target rows run from its subject's last token on (prompt tail + target)."""
    enc = encode_with_subject(tok, "", fact.prompt, fact.subject)
    return len(enc.ids) - enc.subject_last + len(target_ids(tok, fact.target_new)) - 1


def _batches(units: list[list[int]], size: int) -> list[list[list[int]]]:
    """Consecutive units (lists of facts optimised together) packed into batches of at most
    `size` facts; a unit is never split (a larger one is a batch of its own)."""
    out: list[list[list[int]]] = []
    n = size
    for u in units:
        if n + len(u) > size:
            out.append([])
            n = 0
        out[-1].append(u)
        n += len(u)
    return out


def compute_residuals(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact], layer: int,
                      prefixes: Sequence[str], cfg: EditConfig,
                      groups: Sequence[Any] | None = None, history: bool = False,
                      reuse_prefix_cache: bool = True) -> tuple[torch.Tensor, ResidualStats]:
    """(F, d_model) float32 residuals and per-fact optimisation stats. Facts with equal `groups`
    labels (NeuralDB passes the subject) get one residual, optimised jointly over all of their
    prompts and targets; by default every fact is its own group. With `history` the stats keep
    every fact's NLL after every step (what the calibrator reads step budgets from). With
    `reuse_prefix_cache` each generated prefix runs once per call and its rows read it (as
    `compute_keys` does); without, every row runs in full (the reference)."""
    contexts = residual_contexts(prefixes, cfg)
    members: dict[Any, list[int]] = {}
    for i in range(len(facts)):
        members.setdefault(i if groups is None else groups[i], []).append(i)
    units = list(members.values())
    if cfg.residual_pack and cfg.residual_suffix:  # batches of like suffix length pad little
        units.sort(key=lambda u: min(suffix_length(tok, facts[i]) for i in u))
    order = [i for u in units for i in u]
    outs, nll, steps, hists, greedy, hists_g, work = [], [], [], [], [], [], 0
    bar = Progress(len(facts), "residuals", "fact")
    device = model_device(model)
    low = len(facts) > 0 and step_dtype(cfg, device) == torch.bfloat16
    weights = LowWeights.of(model) if low else None  # cast once for every batch (the prefill reads all blocks)
    blocks = step_blocks.choose(cfg.residual_blocks, model, len(facts), device) if facts else "hf"
    stack = None if blocks == "hf" else step_blocks.build(model, layer, torch.bfloat16 if low else torch.float32,
                                                          compiled=blocks == "compiled")
    # only the suffix path reads the prefixes' runs (rows in full, or no suffix cache: nothing to run)
    shared = reuse_prefix_cache and facts and cfg.residual_suffix and get_arch(model).suffix_cache
    runs = run_prefixes(model, tok, contexts, layer, weights) if shared else None
    for batch in _batches(units, cfg.residual_batch_size):
        chunk = [facts[i] for u in batch for i in u]
        slots = [k for k, u in enumerate(batch) for _ in u]
        r, st = _optimise(model, tok, chunk, layer, contexts, cfg, slots if len(slots) > len(batch) else None,
                          history=history, weights=weights, stack=stack, prefixes=runs)
        outs.append(r)
        hists.append(st.history)
        hists_g.append(st.greedy_history)
        nll.append(st.nll)
        greedy.append(st.greedy)
        steps.append(st.steps)
        work += st.block_tokens
        bar.update(len(chunk), nll=f"{float(st.nll.mean()):.3f}")
    bar.close()
    back = torch.empty(len(facts), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(facts))  # sorted position of each fact
    cat = lambda xs: torch.cat(xs)[back.to(xs[0].device)]  # noqa: E731  facts in the caller's order

    def joined(hs: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Per-batch (K_b, F_b) histories NaN-padded to the longest and joined: (K, F) in the caller's order."""
        if not history or any(h is None for h in hs):
            return None
        k = max(h.shape[0] for h in hs)
        pad = [torch.cat([h, h.new_full((k - h.shape[0], h.shape[1]), float("nan"))]) for h in hs]  # (K, Fb)
        return torch.cat(pad, 1)[:, back.to(pad[0].device)]  # (K, F)
    return cat(outs), ResidualStats(cat(nll), cat(steps), joined(hists), cat(greedy), joined(hists_g), work)


def residual_nll(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact], layer: int,
                 prefixes: Sequence[str], cfg: EditConfig, residuals: torch.Tensor) -> torch.Tensor:
    """(F,) each fact's target NLL with its residual (F, d_model) added, in float32 and on the same
    rows the optimiser scores: what residuals optimised in bf16 reach in the model that serves them."""
    contexts = residual_contexts(prefixes, cfg)
    out = []
    with Progress(len(facts), "residual NLL", "fact") as bar:
        for i in range(0, len(facts), cfg.residual_batch_size):
            j = min(i + cfg.residual_batch_size, len(facts))
            _, st = _optimise(model, tok, facts[i:j], layer, contexts, cfg, start=residuals[i:j])
            out.append(st.nll)
            bar.update(j - i)
    return torch.cat(out) if out else torch.zeros(0)
