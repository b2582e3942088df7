"""The gate's instrument: how often each gate design opens on what it should and on what it
should not, at m = 1k .. 100k facts, from cached activations.

    python bench/gate.py                                   # 1k CounterFact facts, a few minutes
    python bench/gate.py --data counterfact,synthetic --m 1000,10000,100000 --out results/gate-100k

One pass over every fact records, at the subject's last token and averaged over the key
contexts exactly as `compute_keys` averages, the FFN input at l* and each attention block's
output up to l* (OUT/cache, chunked, resumable). Every design's keys and queries are derived
from those activations by the engine's own `KeySpace.combine` (a test checks them against
`compute_keys`). Queries, at the gated layer of the unedited model:

- **positives**: the subject's last token of the rewrite prompt and of each paraphrase of a
  fixed sample of the first m0 facts; a positive counts when the fact's own key wins the
  argmax and passes the threshold ("own-open");
- **negatives**: every token but the first of WikiText-2 passages not used for fitting,
  split into **spurious** (the passage does not contain the winning fact's subject before the
  token) and **mention**, and every token of the sample's neighbourhood prompts.

Per design: ROC curves (own-open against spurious-open, log x, one panel per m) in
OUT/gate_roc.png, and operating points (at fixed spurious-open rates and at fixed gammas) in
OUT/gate.json and OUT/gate.md. Designs are named like `ffn`, `ffn+ctx5`, `ffn+ctx5@0.6`
(context weight), `ffn+cat5` (each block's output unit, side by side: the blocks' mean cosine),
`ffn,white` (whitened on the fitting passages), `ffn+ctx5,learn` (a low-rank map fitted on
other facts' prompts and other passages: engine/map_fit.py, the --learn-* options),
`ffn+ctx5,map=smollm2-135m-l6-ctx5` (a saved map: a shipped one's name or a file),
`ffn+ctx5,bank` (per-fact thresholds: max(gamma, the key's best cosine over the fitting
passages + margin)), `ffn+ctx5,verify=cat5@0.5` (the
winner must also pass 0.5 in a second space: one more dot product per token)."""
from __future__ import annotations

import argparse
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from neuraldb import NeuralDB, load_model
from neuraldb.bench.common import machine, markdown_table, progress, run_main, save_figure, write_outputs
from neuraldb.bench.scale import get_facts
from neuraldb.data import resolve
from neuraldb.engine.arch import model_device
from neuraldb.engine.editor import layer_fingerprint
from neuraldb.engine.facts import Fact
from neuraldb.engine.gate_map import load_map, space_meta
from neuraldb.engine.keys import compute_keys, plain_keys, subject_spans
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.engine.space import Capture, KeySpace, key_space
from neuraldb.engine.tokens import encode_with_subject
from neuraldb.evaluation.texts import wikitext_passages
from neuraldb.kernels import l2_normalize

log = logging.getLogger("bench.gate")


class WideSpace(KeySpace):
    """Records the FFN input at l* and every attention output of blocks 0..l* side by side
    (no sum, no normalisation), so that any design's keys derive from one pass."""

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def join(self, context: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.cat([context, a], -1)  # (B, T, d_model * blocks so far): side by side, not summed

    @property
    def dim(self) -> int:
        return self.d_ffn + self.d_ctx * len(self.attn_paths)


def wide_space(model: torch.nn.Module, layer: int) -> WideSpace:
    base = key_space(model, layer, None)
    attn = key_space(model, layer, _cfg(layer + 1)).attn_paths  # blocks 0..l*
    return WideSpace(base.ffn_path, attn, base.d_ffn, base.d_ctx, 0.5)


def _cfg(context: int, weight: float = 0.5) -> Any:
    from neuraldb import EditConfig

    return EditConfig(gate_context=context, gate_context_weight=weight)


# ----- designs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Design:
    name: str
    context: int  # attention blocks ending at l* in the context part (0: FFN only)
    weight: float  # context weight in the cosine
    white: bool  # whitened on the fitting passages (FFN part)
    bank: bool  # per-fact thresholds from the fitting passages
    mode: str = "ctx"  # "ctx": the blocks' outputs summed; "cat": each unit, side by side (mean cosine)
    verify: tuple[str, int, tuple[float, ...]] | None = None  # (space, blocks, gamma_v values): the winner must pass there
    head: bool = False  # the verification compares at the winner's subject's first token (see HeadCheck)
    learn: bool = False  # a GateMap fitted on held-apart facts and text maps keys and queries
    gate_map: str | None = None  # a saved map (EditConfig.gate_map's names or a path) maps them instead

    @classmethod
    def parse(cls, spec: str) -> "Design":
        m = re.fullmatch(r"ffn(?:\+(ctx|cat)(\d+)(?:@([0-9.]+))?)?((?:,white|,bank|,learn)*)(?:,map=([^,]+))?"
                         r"(?:,verify=(head-)?(key|ffn|ctx|cat|lo)(\d*)@([0-9.]+|\*))?", spec)
        if not m:
            raise SystemExit(f"--design {spec!r}: expected "
                             "ffn[+ctxC|+catC[@W]][,white][,bank][,learn][,map=NAME][,verify=[head-]SPACE[C]@G]")
        verify = None
        if m.group(7):
            gv = VERIFY_SWEEP if m.group(9) == "*" else (float(m.group(9)),)
            verify = (m.group(7), int(m.group(8) or 0), gv)
            if m.group(7) == "key" and not m.group(6):
                raise SystemExit(f"--design {spec!r}: verify=key compares in the gate's own space: only as head-key")
        return cls(spec, int(m.group(2) or 0), float(m.group(3) or 0.5), white=",white" in m.group(4),
                   bank=",bank" in m.group(4), mode=m.group(1) or "ctx", verify=verify, head=bool(m.group(6)),
                   learn=",learn" in m.group(4), gate_map=m.group(5))


def _blocks(wide: WideSpace, raw: torch.Tensor) -> torch.Tensor:
    """The attention outputs of blocks 0..l* side by side in wide activations: (N, L, d_model)."""
    return raw[:, wide.d_ffn :].view(raw.shape[0], len(wide.attn_paths), wide.d_ctx)


def derive(wide: WideSpace, d: Design, raw: torch.Tensor, white: torch.Tensor | None) -> torch.Tensor:
    """Gate vectors (N, dim) of design `d` from wide activations (N, d_wide): the engine's
    KeySpace.combine over [FFN input, sum of the last `context` attention outputs]; or, for
    `cat`, the unit FFN part beside each block's unit output (weights sqrt(1-w), sqrt(w/C)):
    the cosine is (1-w) cos_ffn + w * the blocks' mean cosine."""
    f = raw[:, : wide.d_ffn]  # (N, d_ffn)
    if white is not None:
        f = (f - white[0]) @ white[1]  # (N, d_ffn)
    if d.context == 0:
        return l2_normalize(f)
    L = len(wide.attn_paths)
    attn = _blocks(wide, raw)  # (N, L, d_model)
    if d.mode == "cat":
        blocks = l2_normalize(attn[:, L - d.context :]) * math.sqrt(d.weight / d.context)  # (N, C, d_model)
        return torch.cat([l2_normalize(f) * math.sqrt(1 - d.weight), blocks.flatten(1)], -1)  # (N, d_ffn + C d_model)
    ctx = attn[:, L - d.context :].sum(1)  # (N, d_model)
    space = KeySpace(wide.ffn_path, wide.attn_paths[L - d.context :], wide.d_ffn, wide.d_ctx, d.weight)
    return space.combine(torch.cat([f, ctx], -1))


def verifier(wide: WideSpace, d: Design, raw: torch.Tensor) -> torch.Tensor:
    """Unit vectors (N, dv) of the design's second check: `ffn` (the FFN input alone), `ctxC`
    (the last C blocks summed), `catC` (each of the last C blocks unit, mean cosine), `loC` (the
    first C blocks summed: what the earliest layers read)."""
    assert d.verify is not None
    kind, c, _ = d.verify
    if kind == "ffn":
        return l2_normalize(raw[:, : wide.d_ffn])
    L = len(wide.attn_paths)
    attn = _blocks(wide, raw)  # (N, L, d_model)
    if kind == "cat":
        return (l2_normalize(attn[:, L - c :]) / math.sqrt(c)).flatten(1)  # (N, C d_model)
    return l2_normalize(attn[:, L - c :].sum(1) if kind == "ctx" else attn[:, :c].sum(1))  # (N, d_model)


def whitening(x: torch.Tensor, shrink: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, W) with W = (C + shrink * mean eigenvalue * I)^(-1/2) of the rows of x."""
    mu = x.mean(0)
    ev, v = torch.linalg.eigh(torch.cov((x - mu).T.double()))
    ev = ev.clamp_min(0) + shrink * ev.mean()
    return mu, (v @ torch.diag(ev.rsqrt()) @ v.T).float()


def top1(keys: torch.Tensor, q: torch.Tensor, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (max cosine, argmax) of unit queries against unit keys, in blocks: (N,), (N,)."""
    sims, ids = [], []
    for s in range(0, q.shape[0], block):
        v, i = (q[s : s + block] @ keys.T).max(1)  # (b, m) -> (b,)
        sims.append(v)
        ids.append(i)
    return torch.cat(sims), torch.cat(ids)


# ----- activations -----------------------------------------------------------------------------
def fact_keys(db: NeuralDB, wide: WideSpace, facts: Sequence[Fact], cache: Path, chunk: int) -> torch.Tensor:
    """Wide raw keys (F, d_wide) of every fact, by chunks cached under `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    prefixes = db.ensure_prefixes()
    n_chunks = math.ceil(len(facts) / chunk)
    def have(k: int) -> bool:  # a chunk cut short by an earlier, smaller run is redone
        path = cache / f"keys_{k:06d}.safetensors"
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_slice("keys").get_shape()[0] >= len(facts[k * chunk : (k + 1) * chunk])

    todo = [k for k in range(n_chunks) if not have(k)]
    for k in progress(todo, len(todo), "key chunks"):
        part = facts[k * chunk : (k + 1) * chunk]
        with db.disabled(), torch.no_grad():
            raw = compute_keys(db.model, db.tok, part, db.layer, prefixes, db.config, space=wide)
        tmp = cache / f"keys_{k:06d}.tmp"
        save_file({"keys": raw.half().contiguous()}, str(tmp))  # fp16: 100k x 5.6k floats = 1.1 GB
        tmp.rename(cache / f"keys_{k:06d}.safetensors")
    return torch.cat([load_file(str(cache / f"keys_{k:06d}.safetensors"))["keys"] for k in range(n_chunks)])[: len(facts)]


@torch.no_grad()
def states(db: NeuralDB, wide: WideSpace, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Wide activations (N, d_wide) of every token but the first of each token-id sequence, one
    forward each, and each row's position in its sequence (N,): a sequence's rows are contiguous,
    so the row `o` above one at position p >= o + 1 is o tokens earlier in the same sequence."""
    out, pos = [], []
    for seq in seqs:
        ids = torch.tensor([list(seq)], device=model_device(db.model))  # (1, T)
        with db.disabled(), Capture(db.model, wide) as cap:
            db.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        out.append(cap.raw[0, 1:].cpu())  # (T - 1, d_wide)
        pos.append(torch.arange(1, ids.shape[1]))
    return (torch.cat(out), torch.cat(pos)) if seqs else (torch.zeros(0, wide.dim), torch.zeros(0, dtype=torch.long))


def text_states(db: NeuralDB, wide: WideSpace, texts: Sequence[str], max_tokens: int
                ) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor]:
    """`states` of each text's first `max_tokens` tokens, with each row's (text index, character
    offset of the token's end)."""
    encs = [db.tok(text, return_offsets_mapping=True) for text in texts]
    seqs = [e["input_ids"][:max_tokens] for e in encs]
    where = [(ti, e["offset_mapping"][j][1]) for ti, (e, q) in enumerate(zip(encs, seqs)) for j in range(1, len(q))]
    acts, pos = states(db, wide, seqs)
    return acts, where, pos


def text_queries(db: NeuralDB, wide: WideSpace, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Wide activations (N, d_wide) of every token but the first of `texts`, and for each its
    (text index, character offset of the token's end)."""
    acts, where, _ = text_states(db, wide, texts, max_tokens)
    return acts, where


def _subject_encodings(db: NeuralDB, rows: Sequence[tuple[Fact, str]]) -> list[tuple[list[int], int]]:
    """(ids cut after the subject, subject-last index) of each (fact, prompt text)."""
    encs = []
    for fact, text in rows:
        tmpl = text if "{}" in text else text.replace(fact.subject, "{}", 1)
        enc = encode_with_subject(db.tok, "", tmpl, fact.subject, truncate_after_subject=True)
        encs.append((enc.ids, enc.subject_last))
    return encs


@torch.no_grad()
def subject_queries(db: NeuralDB, wide: WideSpace, rows: Sequence[tuple[Fact, str]], batch: int = 64) -> torch.Tensor:
    """Wide activations (N, d_wide) at the subject's last token of each (fact, prompt text),
    run as the engine runs a key's bare prompt (right-padded batches of similar length)."""
    encs = _subject_encodings(db, rows)
    if not encs:
        return torch.zeros(0, wide.dim)
    with db.disabled(), tqdm(total=len(encs), desc="subject prompts", unit="row", disable=None, leave=False) as bar:
        return plain_keys(db.model, db.tok, encs, wide, batch, bar).cpu()


def fit_queries(db: NeuralDB, wide: WideSpace, facts: Sequence[Fact], la: int, lb: int, args: argparse.Namespace,
                cache: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ',learn' fit's material, cached under `cache`: wide activations of facts la:lb's
    prompts at the subject (P, d_wide) with their key rows counted from la (P,), and of the
    negative tokens (N, d_wide): WikiText-2 passages after every measured one and those facts'
    neighbourhood prompts."""
    rows = [(i, p) for i in range(la, lb) for p in [facts[i].prompt, *facts[i].paraphrases]
            if facts[i].subject in p or "{}" in p]
    own = torch.tensor([i - la for i, _ in rows])
    path = cache / (f"fit_{la}-{lb}_t{args.learn_texts_from}+{args.learn_texts}"
                    f"_n{args.learn_neighbourhood}_{args.max_tokens}.safetensors")
    if path.is_file():
        saved = load_file(str(path))
        return saved["pos"].float(), own, saved["neg"].float()
    pos = subject_queries(db, wide, [(facts[i], p) for i, p in rows])
    texts = wikitext_passages(resolve("wikitext", args.data_dir).path, args.learn_texts_from + args.learn_texts,
                              max_words=110)[args.learn_texts_from :]
    neigh = [p for i in range(la, lb) for p in facts[i].neighborhood][: args.learn_neighbourhood]
    neg = torch.cat([text_queries(db, wide, texts, args.max_tokens)[0], text_queries(db, wide, neigh, args.max_tokens)[0]])
    save_file({"pos": pos.half().contiguous(), "neg": neg.half().contiguous()}, str(path))
    return pos, own, neg


def subject_groups(facts: Sequence[Fact]) -> torch.Tensor:
    """(F,) one id per subject as written, outer spaces stripped: the facts EditConfig.subject_groups
    (the default) gives one shared residual."""
    names: dict[str, int] = {}
    return torch.tensor([names.setdefault(f.subject.strip(), len(names)) for f in facts])


@dataclass
class Context:
    """Where a query set's tokens sit: wide activations of every token but the first of its
    sequences (`states`), the row of each query among them and each query's position."""
    acts: torch.Tensor  # (N, d_wide)
    row: torch.Tensor  # (Q,) long
    pos: torch.Tensor  # (Q,) long


def prompt_context(db: NeuralDB, wide: WideSpace, rows: Sequence[tuple[Fact, str]]) -> Context:
    """The Context of subject prompts: each prompt cut after its subject, run alone; the query is
    the subject's last token."""
    encs = _subject_encodings(db, rows)
    acts, pos = states(db, wide, [ids for ids, _ in encs])
    starts = torch.tensor([0] + [len(ids) - 1 for ids, _ in encs]).cumsum(0)[:-1]  # first row of each prompt
    last = torch.tensor([lst for _, lst in encs], dtype=torch.long)
    return Context(acts, starts + last - 1, last)


class HeadCheck:
    """The second check at the winner's subject's *first* token: the query `span_j` tokens before
    the gated one (span_j = fact j's subject's last minus first token index, as the subject reads
    in text) against j's head key (the subject's first token, averaged over the key contexts as
    the key is). A look-alike last token ("... CBS Evening News" for "Buffalo Evening News") fails
    there. Where the subject would start at or before the sequence's first token the check passes
    (nothing to compare). Head keys are computed for winners only and cached under `cache`."""

    def __init__(self, db: NeuralDB, wide: WideSpace, facts: Sequence[Fact], cache: Path, chunk: int) -> None:
        self.db, self.wide, self.facts, self.chunk = db, wide, facts, chunk
        self.path = cache / "heads.safetensors"
        self.rows: dict[int, int] = {}
        self.bare: dict[int, int] = {}  # fact -> its span in the bare prompt (tokenizer only)
        self.raw, self.span = torch.zeros(0, wide.dim), torch.zeros(0, dtype=torch.long)
        if self.path.is_file():
            saved = load_file(str(self.path))
            self.raw, self.span = saved["keys"].float(), saved["span"]
            self.rows = {int(j): r for r, j in enumerate(saved["ids"].tolist())}

    def _fill(self, ids: torch.Tensor) -> None:
        todo = sorted(set(ids.tolist()) - set(self.rows))
        if not todo:
            return
        prefixes = self.db.ensure_prefixes()
        parts = range(0, len(todo), self.chunk)
        for s in progress(parts, len(parts), "head key chunks"):
            part = todo[s : s + self.chunk]
            fs = [self.facts[j] for j in part]
            with self.db.disabled(), torch.no_grad():
                raw = compute_keys(self.db.model, self.db.tok, fs, self.db.layer, prefixes, self.db.config,
                                   space=self.wide, at="first")
            self.raw = torch.cat([self.raw, raw.cpu()])
            self.span = torch.cat([self.span, subject_spans(self.db.tok, fs, prefixes)])
            self.rows.update({j: len(self.rows) + k for k, j in enumerate(part)})
            ids_t = torch.tensor(list(self.rows), dtype=torch.long)  # insertion order = row order
            tmp = self.path.with_suffix(".tmp")
            save_file({"keys": self.raw.half().contiguous(), "span": self.span, "ids": ids_t}, str(tmp))
            tmp.rename(self.path)

    def cosines(self, ids: torch.Tensor, ctx: Context, space: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(Q,) the winners' (ids: (Q,)) cosine at their head in `space` (raw -> unit rows); +inf
        where the check passes unseen."""
        self._fill(ids)
        r = torch.tensor([self.rows[j] for j in ids.tolist()], dtype=torch.long)
        k = space(self.raw[r])  # (Q, dv)
        best = torch.full((len(ids),), -math.inf)
        for span in (self.span[r], self._bare_spans(ids)):  # (Q,) each: the subject reads either way
            at = ctx.pos - span  # the head's position in its sequence
            inside = at >= 1
            q = space(ctx.acts[torch.where(inside, ctx.row - span, ctx.row)])  # (Q, dv)
            best = torch.maximum(best, torch.where(inside, (q * k).sum(1), torch.full_like(best, math.inf)))
        return best

    def _bare_spans(self, ids: torch.Tensor) -> torch.Tensor:
        """(Q,) the span as the bare prompt tokenizes the subject (at a sentence start, say)."""
        todo = sorted(set(ids.tolist()) - set(self.bare))
        self.bare.update(zip(todo, subject_spans(self.db.tok, [self.facts[j] for j in todo], []).tolist()))
        return torch.tensor([self.bare[j] for j in ids.tolist()], dtype=torch.long)


# ----- measuring -------------------------------------------------------------------------------
def rates(score: torch.Tensor, ok: torch.Tensor, thresholds: Sequence[float]) -> list[float]:
    return [float(((score > t) & ok).float().mean()) if len(score) else float("nan") for t in thresholds]


HEAD_FLOOR = 0.6  # a head check looks only at winners above this cosine (gammas swept from here)
VERIFY_SWEEP = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2).tolist())  # gamma_v values of a `@*` design


def measure(keys: torch.Tensor, queries: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
            mention: Callable[[torch.Tensor], torch.Tensor], bank: torch.Tensor | None, gammas: Sequence[float],
            fprs: Sequence[float], check: tuple[Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor], Sequence[float]] | None = None,
            group: torch.Tensor | None = None, grid_from: float = 0.40) -> dict[str, Any]:
    """Operating points and the ROC of one design over m keys; `own` holds each positive's own
    group (`group[key row]`; default: the row itself), so a winner of the own group counts as
    the own fact (facts about one subject share one residual); `check` = (the winners' second
    cosine: f(query set, winner ids, winner cosines) -> (Q,), gamma_v values): a gate opens only
    where its winner also passes gamma_v there; gammas from `grid_from` are swept. With
    several gamma_v the ROC is the upper envelope over every (gamma, gamma_v) pair, and each
    operating point the best pair."""
    res: dict[str, Any] = {}
    s: dict[str, torch.Tensor] = {}
    won: dict[str, torch.Tensor] = {}  # the winner is the fact's own (positives) / every token (negatives)
    second: dict[str, torch.Tensor] = {}  # the winner's cosine in the verification space
    men = torch.zeros(0, dtype=torch.bool)
    for name, q in queries.items():
        sims, ids = top1(keys, q)
        if bank is not None:  # open iff cos > max(gamma, bank_j): score = cos - max(0, bank_j - gamma) per gamma
            s[name + ":bank"] = bank[ids]
        s[name] = sims
        won[name] = ((ids if group is None else group[ids]) == own[name]) if name in own else torch.ones_like(sims, dtype=torch.bool)
        if check is not None:  # one dot product per token
            second[name] = check[0](name, ids, sims)
        if name == "wikitext":  # the winner's subject occurs earlier in the passage: a mention
            men = mention(ids)
            res["mention_tokens"] = int(men.sum())

    def opened(name: str, g: float, mask: torch.Tensor) -> float:
        base = s[name]
        thr = torch.maximum(torch.full_like(base, g), s[name + ":bank"]) if name + ":bank" in s else g
        hit = (base > thr) & mask
        return float(hit.float().mean()) if len(base) else float("nan")

    def point(g: float, gv: float | None) -> dict[str, float]:
        ok = {n: won[n] & (second[n] > gv) if gv is not None else won[n] for n in won}
        out = {"gamma": g, "paraphrase_own_open": opened("paraphrase", g, ok["paraphrase"]),
               "rewrite_own_open": opened("rewrite", g, ok["rewrite"]),
               "spurious_open": opened("wikitext", g, ok["wikitext"] & ~men),
               "mention_open": opened("wikitext", g, ok["wikitext"] & men),
               "neighbourhood_open": opened("neighbourhood", g, ok["neighbourhood"])}
        return out if gv is None else {**out, "gamma_v": gv}

    grid = np.round(np.arange(grid_from, 1.0001, 0.005), 3)
    gvs: Sequence[float | None] = list(check[1]) if check is not None else [None]
    points = [point(float(g), gv) for gv in gvs for g in grid]
    env, top = [], -1.0  # the upper envelope: by spurious-open, each point that beats all before it
    for c in sorted(points, key=lambda c: (c["spurious_open"], -c["paraphrase_own_open"])):
        if c["paraphrase_own_open"] > top:
            env.append(c)
            top = c["paraphrase_own_open"]
    res["roc"] = [(c["spurious_open"], c["paraphrase_own_open"], c["gamma"]) for c in env]
    if check is not None:
        res["roc_gamma_v"] = [c["gamma_v"] for c in env]
    res["at_spurious"] = []
    for f in fprs:  # the best own-open whose spurious-open rate is <= f
        best = max((c for c in points if c["spurious_open"] <= f), key=lambda c: c["paraphrase_own_open"],
                   default=points[-1])
        res["at_spurious"].append({"target": f, **best})
    gv_star = res["at_spurious"][len(fprs) // 2].get("gamma_v") if check is not None else None
    res["at_gamma"] = [point(g, gv_star) for g in gammas]  # at the gamma_v best at the middle target
    return res


def plot(results: dict[int, dict[str, Any]], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib missing: no ROC plot (pip install neuraldb[plots])")
        return None
    ms = sorted(results)
    fig, axes = plt.subplots(1, len(ms), figsize=(5 * len(ms), 4.2), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], ms):
        for name, r in results[m].items():
            xs = [max(x, 1e-5) for x, _, _ in r["roc"]]
            ax.plot(xs, [100 * y for _, y, _ in r["roc"]], label=name)
        ax.set_xscale("log")
        ax.set_xlim(1e-5, 0.1)
        ax.set_title(f"m = {m:,} facts")
        ax.set_xlabel("spurious-open share of WikiText-2 tokens")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("paraphrase own-open (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    return save_figure(fig, out / "gate_roc.png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--layer", type=int, help="default: the model's")
    g.add_argument("--data", default="counterfact", help="as bench/scale.py --data")
    g.add_argument("--data-dir", help="root of the named data sources")
    g.add_argument("--m", default="1000", help="comma-separated database sizes")
    g.add_argument("--seed", type=int, default=0)
    d = ap.add_argument_group("designs")
    d.add_argument("--design", action="append", default=[],
                   help="ffn[+ctxC|+catC[@W]][,white][,bank][,learn][,map=NAME][,verify=[head-]SPACE[C]@G] "
                        "(repeatable; SPACE: ffn, ctx, cat, lo, and key with head-: the check at the winner's "
                        "subject's first token; G: a gamma_v, or * to sweep; default: ffn, ffn,bank, ffn,white, ffn+ctx3, ffn+ctx5, ffn+ctx7, ffn+ctx5@0.6)")
    d.add_argument("--gammas", default="0.65,0.7,0.75,0.8,0.85", help="operating points reported per design")
    d.add_argument("--bank-margin", type=float, default=0.05, help="per-fact threshold margin (',bank')")
    q = ap.add_argument_group("queries")
    q.add_argument("--sample", type=int, default=500, help="facts of the first m whose prompts are the positives")
    q.add_argument("--fit-texts", type=int, default=40, help="WikiText-2 passages for whitening and banks")
    q.add_argument("--test-texts", type=int, default=120, help="WikiText-2 passages measured (after the fit ones)")
    q.add_argument("--max-tokens", type=int, default=160)
    q.add_argument("--own", choices=("subject", "fact"), default="subject",
                   help="a positive is its own when the winner is a fact about its subject (the engine's default, "
                        "subject_groups: they share one residual) or only when it is the fact itself")
    t = ap.add_argument_group("learned transform (',learn')")
    t.add_argument("--learn-facts", default="10000:20000", help="facts A:B whose prompts are the fit's positives "
                   "(keep them out of the first m0: the sample is drawn there)")
    t.add_argument("--learn-texts", type=int, default=300, help="WikiText-2 passages of the fit's negatives")
    t.add_argument("--learn-texts-from", type=int, default=400, help="first passage of those (after every measured one "
                   "and bench/scale.py's retention passages)")
    t.add_argument("--learn-neighbourhood", type=int, default=3000, help="neighbourhood prompts of the fit's facts")
    t.add_argument("--learn-rank", type=int, default=64)
    t.add_argument("--learn-epochs", type=int, default=8)
    t.add_argument("--learn-gamma", type=float, default=0.8, help="the threshold the fit's margins aim at")
    t.add_argument("--learn-neg-weight", type=float, default=1.0, help="weight of the negatives' margin")
    t.add_argument("--learn-save", help="write the fitted transform of the last ',learn' design here")
    r = ap.add_argument_group("run")
    r.add_argument("--chunk", type=int, default=1024, help="facts per cached key file")
    r.add_argument("--out", default="results/gate")
    return ap.parse_args(argv)


DEFAULT_DESIGNS = ("ffn", "ffn,bank", "ffn,white", "ffn+ctx3", "ffn+ctx5", "ffn+ctx7", "ffn+ctx5@0.6")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    ms = [int(x) for x in args.m.split(",")]
    designs = [Design.parse(s) for s in (args.design or DEFAULT_DESIGNS)]
    model, tok = load_model(args.model)
    db = NeuralDB(model, tok, layer=args.layer, attach=False)
    wide = wide_space(model, db.layer)
    if max(d.context for d in designs) > len(wide.attn_paths):
        raise SystemExit(f"--design: layer {db.layer} has only {len(wide.attn_paths)} attention blocks")
    la, lb = (int(x) for x in args.learn_facts.split(":"))
    learning = any(d.learn for d in designs)
    if learning and la < ms[0]:
        raise SystemExit(f"--learn-facts {args.learn_facts}: must start at or after m0 = {ms[0]} (the sample's facts)")
    n_pool = max(ms[-1], lb if learning else 0)
    pool, _, sources = get_facts(args.data, n_pool, args.seed, extra=1, data_dir=args.data_dir)
    facts = list(pool)
    cache = out / "cache" / f"{Path(args.model).name}-L{db.layer}-{args.data.replace(',', '+')}-s{args.seed}"
    keys_raw = fact_keys(db, wide, facts, cache, args.chunk).float()  # (M, d_wide)
    log.warning("keys of %d facts ready (%.0f s)", len(facts), time.perf_counter() - t0)

    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(ms[0], size=min(args.sample, ms[0]), replace=False).tolist())
    para_rows = [(i, p) for i in sample for p in facts[i].paraphrases if facts[i].subject in p or "{}" in p]
    rew_rows = [(i, facts[i].prompt) for i in sample]
    neigh = [p for i in sample for p in facts[i].neighborhood]
    pas = wikitext_passages(resolve("wikitext", args.data_dir).path, args.fit_texts + args.test_texts, max_words=110)
    fit, test = pas[: args.fit_texts], pas[args.fit_texts :]
    q_para = subject_queries(db, wide, [(facts[i], p) for i, p in para_rows])
    q_rew = subject_queries(db, wide, [(facts[i], p) for i, p in rew_rows])
    q_fit, _ = text_queries(db, wide, fit, args.max_tokens)
    q_wiki, where, p_wiki = text_states(db, wide, test, args.max_tokens)
    q_neigh, _, p_neigh = text_states(db, wide, neigh, args.max_tokens)
    if any(d.head for d in designs):  # the tokens before each query, and the winners' head keys
        c_para = prompt_context(db, wide, [(facts[i], p) for i, p in para_rows])
        c_rew = prompt_context(db, wide, [(facts[i], p) for i, p in rew_rows])
        c_wiki = Context(q_wiki, torch.arange(len(q_wiki)), p_wiki)
        c_neigh = Context(q_neigh, torch.arange(len(q_neigh)), p_neigh)
        heads = HeadCheck(db, wide, facts, cache, args.chunk)
    if learning:  # the fit's own facts, prompts and text: none of them is measured
        l_pos, l_own, l_neg = fit_queries(db, wide, facts, la, lb, args, cache)
        log.warning("fit data: %d positives of facts %d:%d, %d negative tokens", len(l_pos), la, lb, len(l_neg))
    log.warning("queries: %d paraphrase, %d rewrite, %d WikiText, %d neighbourhood tokens (%.0f s)",
                len(q_para), len(q_rew), len(q_wiki), len(q_neigh), time.perf_counter() - t0)

    def mention(ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([facts[j].subject in test[t][:end] for j, (t, end) in zip(ids.tolist(), where)],
                            dtype=torch.bool)

    gammas = [float(x) for x in args.gammas.split(",")]
    group = subject_groups(facts) if args.own == "subject" else torch.arange(len(facts))
    fprs = (1e-2, 1e-3, 1e-4)
    fingerprint = layer_fingerprint(model, db.layer)
    results: dict[int, dict[str, Any]] = {m: {} for m in ms}
    for design in designs:
        white = whitening(q_fit[:, : wide.d_ffn]) if design.white else None
        dv = lambda x: derive(wide, design, x, white)  # noqa: E731
        # what a map of this design's space records (fitted here, or a saved one checked against it)
        meta = space_meta(db.layer, design.context, design.weight, dv(keys_raw[:1]).shape[1], fingerprint)
        if design.learn:
            from neuraldb.engine.map_fit import FitConfig, fit_transform

            fcfg = FitConfig(rank=args.learn_rank, epochs=args.learn_epochs, gamma=args.learn_gamma,
                             neg_weight=args.learn_neg_weight, seed=args.seed)
            T = fit_transform(dv(keys_raw[la:lb]), dv(l_pos), l_own, dv(l_neg), fcfg, meta)
            if args.learn_save:
                T.save(Path(args.learn_save))
            plain = dv
            dv = lambda x: T(plain(x))  # noqa: E731
        elif design.gate_map is not None:
            gm = load_map(design.gate_map)
            gm.check(meta, f"--design {design.name}")
            plain_dv = dv
            dv = lambda x: gm(plain_dv(x))  # noqa: E731
        K_all = dv(keys_raw)  # (M, dim)
        queries = {"paraphrase": dv(q_para), "rewrite": dv(q_rew), "wikitext": dv(q_wiki), "neighbourhood": dv(q_neigh)}
        own = {"paraphrase": group[torch.tensor([i for i, _ in para_rows])],
               "rewrite": group[torch.tensor([i for i, _ in rew_rows])]}
        bank_all = top1(dv(q_fit), K_all)[0] + args.bank_margin if design.bank else None  # (M,) per key
        check, grid_from = None, 0.40
        if design.verify is not None:
            kind = design.verify[0]
            vf = dv if kind == "key" else (lambda x: verifier(wide, design, x))  # noqa: E731
            if design.head:  # the winner's head, for winners that could open (cos > HEAD_FLOOR) only
                ctxs = {"paraphrase": c_para, "rewrite": c_rew, "wikitext": c_wiki, "neighbourhood": c_neigh}
                def second(name: str, ids: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
                    out = torch.full_like(sims, -math.inf)
                    sel = sims > HEAD_FLOOR
                    c = ctxs[name]
                    out[sel] = heads.cosines(ids[sel], Context(c.acts, c.row[sel], c.pos[sel]), vf)
                    return out
                grid_from = HEAD_FLOOR
            else:
                vk = vf(keys_raw)
                vq = {"paraphrase": vf(q_para), "rewrite": vf(q_rew), "wikitext": vf(q_wiki), "neighbourhood": vf(q_neigh)}
                second = lambda name, ids, sims: (vq[name] * vk[ids]).sum(1)  # noqa: E731
            check = (second, design.verify[2])  # gamma_v values
        for m in ms:
            r = measure(K_all[:m], queries, own, mention, None if bank_all is None else bank_all[:m], gammas, fprs,
                        check=check, group=group, grid_from=grid_from)
            results[m][design.name] = r
            log.warning("m=%d %-16s own-open at 0.1%% spurious: %.1f%% (gamma %.3f)", m, design.name,
                        100 * r["at_spurious"][1]["paraphrase_own_open"], r["at_spurious"][1]["gamma"])
    rows = []
    for m in ms:
        for name, r in results[m].items():
            for p in r["at_spurious"]:
                rows.append({"m": m, "design": name, "target": f"{100 * p['target']:g}%", "gamma": p["gamma"],
                             "gamma_v": p.get("gamma_v", ""),
                             "paraphrase own-open": f"{100 * p['paraphrase_own_open']:.1f}%",
                             "rewrite own-open": f"{100 * p['rewrite_own_open']:.1f}%",
                             "spurious-open": f"{100 * p['spurious_open']:.3f}%",
                             "neighbourhood-open": f"{100 * p['neighbourhood_open']:.2f}%"})
    table = markdown_table(rows, list(rows[0]))
    result = {"args": vars(args), "machine": machine(), "layer": db.layer, "sources": sources,
              "queries": {"paraphrase": len(q_para), "rewrite": len(q_rew), "wikitext_tokens": len(q_wiki),
                          "neighbourhood_tokens": len(q_neigh)},
              "results": {str(m): v for m, v in results.items()}, "wall_s": time.perf_counter() - t0}
    result["plot"] = plot(results, out)
    write_outputs(out, "gate", result, f"bench/gate.py: {args.model}, layer {db.layer}, {args.data}", table)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("neuraldb.engine.map_fit").setLevel(logging.INFO)
    run_main(main, "bench/gate.py")
