"""Keys: the FFN's intermediate activation (input of its down/out projection) at the subject's
last token, averaged over the bare prompt and a few short generated prefixes (MEMIT compute_ks)."""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .arch import cache_kwargs, get_arch, model_device
from .config import EditConfig
from .facts import Fact
from .hooks import Trace
from .progress import Progress
from .heads import head_rows
from .space import Capture, KeySpace, key_space, stacked_space
from .tokens import encode_with_subject, pad_right, shared_len

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_prefixes(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: EditConfig) -> list[str]:
    """Short generated contexts ("The first thing ... ."), deterministic under `cfg.seed`.

    Returns templates like "Because of this. " to which a prompt is appended."""
    if cfg.n_prefixes == 0:
        return []
    seeds = [cfg.prefix_seeds[i % len(cfg.prefix_seeds)] for i in range(cfg.n_prefixes)]
    device = model_device(model)
    out: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for s in seeds:  # one at a time: no padding games, a handful of calls
            ids = tok(s, return_tensors="pt")["input_ids"].to(device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                 max_new_tokens=cfg.prefix_len, pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0], skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
    return out


@torch.no_grad()
def calibration_texts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: EditConfig,
                      texts: int = 8, tokens: int = 64) -> list[list[int]]:
    """Token ids of `texts` continuations the model samples from the prefix seeds,
    deterministic under `cfg.seed`: ordinary text with no data file. A database stores them,
    so a load recomputes its calibration queries with one forward each, never sampling again."""
    seeds = [cfg.prefix_seeds[i % len(cfg.prefix_seeds)] for i in range(texts)]
    device = model_device(model)
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 1)  # not the prefixes' draw
        for s in seeds:
            ids = tok(s, return_tensors="pt")["input_ids"].to(device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=40,
                                 max_new_tokens=tokens, pad_token_id=tok.pad_token_id)  # (1, T)
            out.append(gen[0].tolist())
    return out


@torch.no_grad()
def calibration_queries(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layer: int, cfg: EditConfig,
                        texts: Sequence[Sequence[int]] | None = None, batch: int = 16) -> torch.Tensor:
    """Gate queries of ordinary text, for an index that fits itself to them (`Proj`'s basis):
    the gate vector (`key_space(model, layer, cfg)`) at `layer` of every token but the first
    (never gated) of each text (token ids; default: `calibration_texts`), texts in order.
    Texts run `batch` at a time, bucketed by length and right-padded (a pad after a token never
    reaches it under causal attention): one forward per short prompt cost Gemma-3-270M 0.16 s
    each, mostly per-call overhead. Returns (n, d_key) float32."""
    device = model_device(model)
    space = key_space(model, layer, cfg)
    seqs = [list(t) for t in (calibration_texts(model, tok, cfg) if texts is None else texts)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for group in _bucketed(len(seqs), [len(s) for s in seqs], batch):
        ids, mask = pad_right([seqs[i] for i in group], pad, device)  # (B, T)
        with Capture(model, space) as cap:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        raw = cap.raw  # (B, T, d_raw)
        for b, i in enumerate(group):
            out[i] = space.combine(raw[b, 1 : len(seqs[i])])  # (T_i - 1, d_key)
    return torch.cat(out) if out else torch.zeros(0, space.dim)  # type: ignore[arg-type]


AT = ("last", "first", "both")  # which subject token a key is read at ("both": last, then first)


def key_inputs(tok: PreTrainedTokenizerBase, fact: Fact, prefixes: Sequence[str],
               at: str = "last") -> list[tuple[list[int], Any]]:
    """(ids, index of the subject's `at` token: "last" or "first"; "both": (last, first)) for the
    bare prompt and each prefixed prompt; the text after the subject cannot change the key
    under causal attention, so it is cut off."""
    out = []
    for p in ("", *prefixes):
        enc = encode_with_subject(tok, p, fact.prompt, fact.subject, truncate_after_subject=True)
        pos = {"last": enc.subject_last, "first": enc.subject_first, "both": (enc.subject_last, enc.subject_first)}
        out.append((enc.ids, pos[at]))
    return out


def subject_spans(tok: PreTrainedTokenizerBase, facts: Sequence[Fact], prefixes: Sequence[str]) -> torch.Tensor:
    """(F,) long: tokens from the subject's first to its last, minus one, as it reads inside
    text (after the first generated prefix; the bare prompt where there is none)."""
    out = []
    for f in facts:
        enc = encode_with_subject(tok, prefixes[0] if prefixes else "", f.prompt, f.subject, truncate_after_subject=True)
        out.append(enc.subject_last - enc.subject_first)
    return torch.tensor(out, dtype=torch.long)


def subject_head_ids(tok: PreTrainedTokenizerBase, facts: Sequence[Fact]) -> torch.Tensor:
    """(F, 2) long: the subject's first token id as it reads at a text's start, after a space
    and with none (the head check's test at the sink token; -1 where it tokenises to nothing)."""
    out = []
    for f in facts:
        row = []
        for text in (" " + f.subject, f.subject):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            row.append(ids[0] if ids else -1)
        out.append(row)
    return torch.tensor(out, dtype=torch.long).view(len(facts), 2)


def _bucketed(n: int, lengths: Sequence[int], batch: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (sorted), so padding stays small."""
    order = sorted(range(n), key=lambda i: lengths[i])
    return [order[s : s + batch] for s in range(0, n, batch)]


def _run_to_key(model: PreTrainedModel, space: KeySpace, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                cache: Any = None) -> torch.Tensor:
    """The raw activations of `space` at one position per row (pos: (B,)): (B, d_raw) float32,
    or at k per row (pos: (B, k)): (B, k, d_raw)."""
    with Capture(model, space) as cap:
        model(input_ids=ids, attention_mask=mask, use_cache=cache is not None, **cache_kwargs(model, cache))
    rows = torch.arange(ids.shape[0], device=ids.device)
    return cap.raw[rows if pos.dim() == 1 else rows[:, None], pos]


def plain_keys(model: PreTrainedModel, tok: PreTrainedTokenizerBase, rows: Sequence[tuple[list[int], int]],
                space: KeySpace, batch: int, bar: Any) -> torch.Tensor:
    """Each row run in full (rows bucketed by length): (R, d_raw)."""
    device = model_device(model)
    out: list[torch.Tensor | None] = [None] * len(rows)
    for group in _bucketed(len(rows), [len(r[0]) for r in rows], batch):
        ids, mask = pad_right([rows[i][0] for i in group], tok.pad_token_id, device)  # (B, T)
        pos = torch.tensor([rows[i][1] for i in group], device=device)
        for i, k in zip(group, _run_to_key(model, space, ids, mask, pos)):
            out[i] = k
        bar.update(len(group))
    return torch.stack(out) if rows else torch.zeros(0)  # type: ignore[arg-type]


def _cached_keys(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prefix: str,
                 rows: Sequence[tuple[list[int], int]], space: KeySpace, batch: int, bar: Any) -> torch.Tensor:
    """Rows that share a generated prefix: the prefix runs once, its KV cache serves every row,
    and only each row's own tokens run. Exact under causal attention (equal to `plain_keys`
    up to float rounding)."""
    device = model_device(model)
    shared = shared_len(tok(prefix)["input_ids"], rows)
    if shared == 0:
        return plain_keys(model, tok, rows, space, batch, bar)
    head = torch.tensor([rows[0][0][:shared]], device=device)  # (1, S)
    with Capture(model, space):
        cache = DynamicCache(config=model.config)
        model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True, **cache_kwargs(model, cache))
    out: list[torch.Tensor | None] = [None] * len(rows)
    for group in _bucketed(len(rows), [len(r[0]) for r in rows], batch):
        ids, mask = pad_right([rows[i][0][shared:] for i in group], tok.pad_token_id, device)  # (B, T - S)
        mask = torch.cat([torch.ones(len(group), shared, dtype=mask.dtype, device=device), mask], 1)  # (B, T)
        pos = torch.tensor([rows[i][1] for i in group], device=device) - shared  # (B,) or (B, 2)
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(group))
        for i, k in zip(group, _run_to_key(model, space, ids, mask, pos, c)):
            out[i] = k
        bar.update(len(group))
    return torch.stack(out)


@torch.no_grad()
def compute_keys(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact],
                 layer: int, prefixes: Sequence[str], cfg: EditConfig, reuse_prefix_cache: bool = True,
                 space: KeySpace | None = None, at: str = "last") -> torch.Tensor:
    """(F, d_key) float32 keys in `space` (default: the FFN input at `layer`, MEMIT's key). The
    raw key is mean(bare, mean of prefixed) activations; where the bare subject token is the
    sequence's first token (an attention sink) only prefixed ones count; `space.combine` then
    makes the gate vector.

    With `reuse_prefix_cache` each generated prefix is encoded once and its KV cache reused
    for every fact (the reference path, False, runs every row in full). `at="first"` takes the
    subject's first token instead (the "head" a gate can verify); `at="both"` reads both from the
    same passes: (F, 2, d_key), the key then the head key."""
    if at not in AT:
        raise ValueError(f"at={at!r}: expected one of {AT}")
    space = space or key_space(model, layer)
    device = model_device(model)
    per_fact = [key_inputs(tok, f, prefixes, at) for f in facts]  # F x (1 + P) rows
    bs = max(1, cfg.key_batch_size)
    bar = Progress(len(facts) * (1 + len(prefixes)), "keys", "row")
    cols = [[r[c] for r in per_fact] for c in range(1 + len(prefixes))]  # (1 + P) x F
    if reuse_prefix_cache and prefixes:
        parts = [plain_keys(model, tok, cols[0], space, bs, bar)]
        parts += [_cached_keys(model, tok, p, cols[1 + k], space, bs, bar) for k, p in enumerate(prefixes)]
    else:
        flat = plain_keys(model, tok, [r for col in cols for r in col], space, bs, bar)  # ((1+P) F, d_raw)
        parts = list(flat.view(1 + len(prefixes), len(facts), *flat.shape[1:]))  # (1+P) x (F, [2,] d_raw)
    bar.close()
    bare = parts[0]  # (F, d_raw)
    if not prefixes:
        return space.combine(bare)
    ctx_mean = torch.stack(parts[1:], 1).mean(1)  # (F, P, [2,] d_raw) -> (F, [2,] d_raw)
    bare_ok = torch.tensor([rows[0][1] > 0 if at != "both" else [p > 0 for p in rows[0][1]] for rows in per_fact],
                           device=device)  # (F,) or (F, 2)
    return space.combine(torch.where(bare_ok[..., None], (bare + ctx_mean) / 2, ctx_mean))


def with_head_rows(tok: PreTrainedTokenizerBase, facts: Sequence[Fact], prefixes: Sequence[str],
                   both: torch.Tensor) -> torch.Tensor:
    """Keys read at both subject tokens (F, 2, d_key: `compute_keys(at="both")`) -> key rows
    (F, d_key + head_dim(d_key)): the gate key, then the head row (the head key, the subject's
    spans inside text and bare, its head token ids)."""
    spans = torch.stack([subject_spans(tok, facts, prefixes), subject_spans(tok, facts, [])], 1)  # (F, 2)
    heads = head_rows(both[:, 1], spans.to(both.device), subject_head_ids(tok, facts))  # (F, head_dim)
    return torch.cat([both[:, 0], heads], 1)  # (F, d_row)


@torch.no_grad()
def key_rows_by_context(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact], layer: int,
                        prefixes: Sequence[str], cfg: EditConfig, contexts: Sequence[int],
                        heads: bool = True) -> dict[int, torch.Tensor]:
    """Key rows of `facts` in the plain gate space of each gate_context in `contexts` at `layer`
    (cfg's context weight), as a database of that space encodes them (`NeuralDB.encode_keys`, head
    rows with `heads`), from one pass over the model (`StackedSpace`) rather than one per space.
    Equal to the per-space rows up to float summation order."""
    stacked = stacked_space(model, layer, max(contexts))
    raw = compute_keys(model, tok, facts, layer, prefixes, cfg, space=stacked,
                       at="both" if heads else "last")  # (F, [2,] d_ffn + C d_ctx)
    out = {}
    for c in contexts:
        v = key_space(model, layer, cfg.replace(gate_context=c)).combine(stacked.split(raw, c))  # (F, [2,] d_key)
        out[c] = with_head_rows(tok, facts, prefixes, v) if heads else v
    return out


@torch.no_grad()
def subject_states(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact], layer: int,
                   prefixes: Sequence[str], batch: int = 64) -> torch.Tensor:
    """(F, d_model) float32: the output of decoder block `layer` (the residual stream after it) at
    the subject's last token of the bare prompt, or of the first prefixed prompt where the bare
    subject ends at position 0 (the attention sink, where the gate never opens). A residual added
    to that layer's FFN output moves exactly this vector (MEMIT's `z` is this state + delta)."""
    path = f"{get_arch(model).layers}.{layer}"
    rows = []
    for f in facts:
        ids, last = key_inputs(tok, f, prefixes[:1])[0]
        if last == 0 and prefixes:
            ids, last = key_inputs(tok, f, prefixes[:1])[1]
        rows.append((ids, last))
    device = model_device(model)
    out: list[torch.Tensor | None] = [None] * len(rows)
    for group in _bucketed(len(rows), [len(r[0]) for r in rows], batch):
        ids, mask = pad_right([rows[i][0] for i in group], tok.pad_token_id, device)  # (B, T)
        pos = torch.tensor([rows[i][1] for i in group], device=device)
        with Trace(model, path, retain_input=False, retain_output=True, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = tr.output[0] if isinstance(tr.output, tuple) else tr.output  # (B, T, d_model)
        for i, h in zip(group, hidden[torch.arange(len(group), device=device), pos].float()):
            out[i] = h
    return torch.stack(out) if rows else torch.zeros(0)  # type: ignore[arg-type]
