"""General ability as the NeuralDB paper measures it: six lm-evaluation-harness tasks (MMLU,
SciQ, CommonsenseQA, ARC-Challenge, LAMBADA, WSC273), zero-shot, stock prompts and metrics.

The harness itself scores (the `eval` extra: `pip install 'neuraldb[eval]'`); this module
gives it the local task YAMLs (`evaluation/tasks/`, dataset keys resolved through
`neuraldb.data`) and the edited model in memory: `GatedLM` is lm-eval's `HFLM` over the
model with the database attached. HFLM right-pads and passes no attention mask, so every real
token sees exactly what it sees alone, and the gate decides per token from those tokens: a
batched score is the score of a full forward of that request (tests/test_general.py). It
scores as HFLM's own loop does, but runs the LM head and the log-softmax only at the positions a
continuation is read from (`GatedLM._score`; equal to HFLM's scores, tested).

Where no gate opens on any token of a request, the edited layer's output is bit-identical to
the unedited one, so the request's score is the unedited model's: `GatedLM` probes each
request's gate decisions with a forward that stops at layer l* (a fifth of SmolLM2's depth)
and re-scores only the requests on which a gate opened, reusing cached unedited scores for the
rest (`ScoreCache`; equal up to the float rounding of a different batch). Every open is listed
(task, document, token, fact, whether the request names the fact's subject)."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data import resolve
from ..engine.arch import model_device
from ..engine.config import ConfigError
from ..engine.hooks import Trace, autocast_above
from ..engine.progress import Progress
from ..engine.residuals import fast_bf16
from ..engine.tokens import pad_right
from .attribution import names
from .below import BelowCache, block_tuple_len, capture_below, start_below
from .prefix import SharedPrefix, families

log = logging.getLogger(__name__)

TASKS = ("mmlu", "sciq", "commonsense_qa", "arc_challenge", "lambada_openai", "wsc273")
# the metric each task is averaged by (the paper's Figure 1 right: accuracy; LAMBADA by acc)
MAIN_METRIC = {"mmlu": "acc", "sciq": "acc", "commonsense_qa": "acc", "arc_challenge": "acc",
               "lambada_openai": "acc", "wsc273": "acc"}
_DATA_REF = re.compile(r'"@data/([^"]+)"')
# how requests are scored: "float32" throughout, or "bf16-above": the blocks up to the gated layer
# (and so every gate decision) in float32, the blocks above it and the LM head under bf16 autocast
# (residual stream and log-softmax in float32); "auto" picks bf16-above where the device multiplies
# bf16 fast (engine.residuals.FAST_BF16); "bf16": every block and the LM head under bf16 autocast,
# the gate's decisions taken from the float32 probe (replayed, not searched again), so they are
# still exactly float32's. Both states of a comparison are scored the same way.
PRECISIONS = ("float32", "bf16-above", "bf16")
# what scores a request: "neuraldb" (`GatedLM._score`: the head and log-softmax only where a
# continuation is read) or "harness" (HFLM's own `_loglikelihood_tokens`, kept to measure against)
SCORERS = ("neuraldb", "harness")
# the shortest prefix the scorer runs once for the inputs that share it (evaluation/prefix.py)
MIN_SHARED = 16
WSC273_UTILS = ('"""The stock WSC273 document processing, from lm-evaluation-harness itself."""\n'
                "from lm_eval.tasks.wsc273.utils import process_doc  # noqa: F401\n")


class HarnessMissing(ImportError):
    """lm-evaluation-harness is not installed (the `eval` extra)."""


def _harness() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise HarnessMissing(f"general-ability evaluation needs lm-evaluation-harness: "
                             f"pip install 'neuraldb[eval]' ({exc})") from exc
    return HFLM


def task_dir(tasks: Sequence[str], out: Path, data_dir: str | Path | None = None) -> dict[str, str]:
    """Write the shipped YAMLs of `tasks` into `out` with their data files resolved; returns
    task -> where its data came from ("shared", "sample", ...)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ConfigError(f"unknown general task(s) {unknown}; choose from {','.join(TASKS)}")
    shipped = resources.files("neuraldb.evaluation").joinpath("tasks")
    out.mkdir(parents=True, exist_ok=True)
    origins = {}
    for task in tasks:
        src = resolve(task, data_dir)
        origins[task] = src.origin
        text = shipped.joinpath(f"{task}.yaml").read_text(encoding="utf-8")
        text = _DATA_REF.sub(lambda m: json.dumps(str(src.root / m.group(1))), text)
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
    # wsc273.yaml's `process_docs: !function wsc273_utils.process_doc` is the stock function
    (out / "wsc273_utils.py").write_text(WSC273_UTILS, encoding="utf-8")
    return origins


@dataclass(frozen=True)
class Open:
    """A gate that opened on a task's text: `token` is the text of the token it opened at."""
    task: str
    doc_id: int
    position: int
    token: str
    fact_id: int
    subject: str
    named: bool  # the request's text names the fact's subject (a real mention, not a spurious open)
    similarity: float


class JsonlCache:
    """Append-only JSONL of key -> value, one file per model state; a torn last line (a killed
    run) is ignored, so a run resumes where it stopped. Without a path it lives in memory (one
    process scoring two states: `neuraldb eval --general`). Subclasses say how a value is a row."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.scores: dict[str, Any] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.scores[row[0]] = self.decode(row[1:])
                except (ValueError, TypeError, IndexError):
                    continue

    def decode(self, row: list[Any]) -> Any:
        return row

    def encode(self, value: Any) -> list[Any]:
        return list(value)

    def get(self, key: str) -> Any:
        return self.scores.get(key)

    def put(self, items: Sequence[tuple[str, Any]]) -> None:
        if not items:
            return
        if self.path is None:
            self.scores.update(items)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for k, value in items:
                self.scores[k] = value
                fh.write(json.dumps([k, *self.encode(value)]) + "\n")


class ScoreCache(JsonlCache):
    """Request -> (loglikelihood, is_greedy)."""

    def decode(self, row: list[Any]) -> tuple[float, bool]:
        ll, greedy = row
        return float(ll), bool(greedy)


class ProbeCache(JsonlCache):
    """Input tokens -> the gate opens on them [(position, fact id, cosine)], for one database: the
    probe of a killed run resumes instead of starting again (at 100k facts it is the bulk of a
    state's time)."""

    def decode(self, row: list[Any]) -> list[tuple[int, int, float]]:
        (hits,) = row
        return [(int(p), int(f), float(c)) for p, f, c in hits]

    def encode(self, value: list[tuple[int, int, float]]) -> list[Any]:
        return [[list(h) for h in value]]


def right_padded_rows(rows: Sequence[torch.Tensor], t: int) -> torch.Tensor:
    """Per-token rows (T_i, d) as one (B, t, d) batch, zeros after each row's end."""
    out = torch.zeros(len(rows), t, rows[0].shape[-1], dtype=rows[0].dtype)  # (B, t, d)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def shared_prefixes(seqs: Sequence[Sequence[int]], first: int = 0) -> list[tuple[int, int]]:
    """For each sequence from `first` on, the earlier sequence it shares its longest prefix with
    and that prefix's length ((-1, 0) where none): a causal model computes the same activations
    there, so a probe need not search those positions again. Those before `first` only serve as
    earlier sequences. Prefixes are matched by hash and then compared token by token."""
    seen: dict[int, int] = {}  # hash of a prefix -> the first sequence that has it
    out = []
    for i, x in enumerate(seqs):
        h, owner, length, matching, hashes = 0, -1, 0, i >= first, []
        for t, tok in enumerate(x):
            h = hash((h, tok))
            hashes.append(h)
            if matching:
                j = seen.get(h)
                matching = j is not None
                if matching:
                    owner, length = j, t + 1
        if owner >= 0 and list(seqs[owner][:length]) != list(x[:length]):
            owner, length = -1, 0  # a hash collision: nothing shared
        for hh in hashes:
            seen.setdefault(hh, i)
        if i >= first:
            out.append((owner, length))
    return out


def request_key(tokens: Sequence[int], n_cont: int) -> str:
    return hashlib.sha1(json.dumps([list(tokens), n_cont]).encode()).hexdigest()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` with "auto" made concrete for `device` (see PRECISIONS)."""
    if precision == "auto":
        return "bf16-above" if fast_bf16(device) else "float32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto or one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def make_lm(model: Any, tok: Any, db: Any = None, batch_size: int = 16, unedited: ScoreCache | None = None,
            edited: ScoreCache | None = None, on_open: Callable[[set[int]], Any] | None = None,
            precision: str = "float32", layer: int | None = None, probes: ProbeCache | None = None,
            scorer: str = "neuraldb", below: BelowCache | None = None, share_prefixes: bool = True) -> Any:
    """lm-eval's HFLM over `model`, with the gate probe and the caches described above. With
    `db` (a `NeuralDB` attached to `model`) requests on which a gate opens are scored gated and
    the rest come from (or go to) `unedited`; without it every request is the unedited model's
    (run it with the database detached or inside `db.disabled()`). `on_open(fact ids)` is called
    with the facts that opened before they are scored (lazy residuals: bench/general.py).
    `precision` (PRECISIONS, or "auto") scores with the blocks above `layer` (default: the
    database's layer) in bf16; the unedited and the edited state must share it and the layer.
    `probes` keeps the probe's findings per input (for this database only), so a killed run's
    probe resumes. `scorer` is one of SCORERS. `below` (evaluation/below.py) keeps what enters
    the gated block for every input any float32 pass below it reads (the scorer's or the
    probe's), and lets the probe of any later state start at that block. `share_prefixes`: ungated
    inputs that share a prefix run it once (evaluation/prefix.py; where the model's attention
    implementation allows, else every input runs whole)."""
    HFLM = _harness()
    if scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}, not {scorer!r}")
    precision = resolve_precision(precision, model_device(model))
    split = db.layer if db is not None and layer is None else layer
    if precision == "bf16-above" and split is None:
        raise ConfigError(f"precision {precision!r} needs the gated layer (layer= or db=)")
    if precision == "bf16" and db is not None and scorer != "neuraldb":
        raise ConfigError("precision bf16 replays the probe's gate decisions: scorer neuraldb only")

    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    if below is not None and split is not None and below.layer != split:
        raise ConfigError(f"the below-l* cache holds layer {below.layer}, the scorer splits at {split}")
    # the scorer's passes compute the blocks below the split in float32 unless everything is bf16
    capture_scored = below is not None and precision != "bf16" and scorer == "neuraldb"
    sharer = None
    if share_prefixes and scorer == "neuraldb":
        why = SharedPrefix.unsupported(model)
        if why:
            log.info("prefix sharing off: %s", why)
        else:
            sharer = SharedPrefix(model)

    class GatedLM(HFLM):
        def __init__(self) -> None:
            super().__init__(pretrained=model, tokenizer=tok, batch_size=batch_size,
                             device=str(model_device(model)))
            self.db = db
            self.precision = precision
            self.opens: list[Open] = []
            self.reused = self.rescored = 0
            self.tokens = 0  # tokens the model read (each request's input), the base of the open share
            # inputs per forward of the probe and the scorer ("auto" batch sizes are HFLM's own)
            self._rows_per_forward = int(self.batch_size) if str(self.batch_size).isdigit() else 16
            self._meta: list[tuple[str, int]] = []
            self._tuple_len: int | None = None  # what decoder blocks return (below.block_tuple_len)
            self.probe_inputs = (0, 0)  # inputs the probe ran from the embeddings / from the below-l* cache
            self.probe_seconds = 0.0
            self._lowered: dict[Any, Any] = {}  # the bf16 weights autocast_above would cast in every pass

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            self._meta = [(r.task_name, r.doc_id) for r in requests]
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            # what HFLM feeds the model: (context + continuation)[-(max_length + 1):][:-1]
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in requests]
            keys = [request_key(ctx + cont, len(cont)) for _, ctx, cont in requests]
            self.tokens += sum(len(x) for x in inputs)
            opened = self._probe(inputs)
            meta = self._meta if len(self._meta) == len(requests) else [("?", -1)] * len(requests)
            self._meta = []
            for i, hits in enumerate(opened):
                if not hits:
                    continue
                text = self.tok_decode(inputs[i])
                for pos, fid, sim in hits:
                    fact = self.db.facts[fid]
                    self.opens.append(Open(meta[i][0], int(meta[i][1]), pos, self.tok_decode([inputs[i][pos]]),
                                           fid, fact.subject, names(text, fact.subject), sim))
            out: list[tuple[float, bool] | None] = [None] * len(requests)
            todo_plain, todo_gated = [], []
            for i, k in enumerate(keys):
                cache = edited if opened[i] else unedited
                hit = cache.get(k) if cache is not None else None
                if hit is None:
                    (todo_gated if opened[i] else todo_plain).append(i)
                else:
                    out[i] = hit
            if on_open is not None and todo_gated:
                on_open({fid for i in todo_gated for _, fid, _ in opened[i]})
            if self.db is not None:  # requests with an open are scored with the edit, the rest as unedited
                n_open = sum(1 for hits in opened if hits)
                self.rescored += n_open
                self.reused += len(requests) - n_open
            for todo, cache, gated in ((todo_plain, unedited, False), (todo_gated, edited, True)):
                if not todo:
                    continue
                with self._state(gated), self._precision():
                    subset = [requests[i] for i in todo]
                    got = self._score(subset, [opened[i] for i in todo] if gated else None) \
                        if scorer == "neuraldb" else super()._loglikelihood_tokens(subset, disable_tqdm, override_bs)
                for i, r in zip(todo, got):
                    out[i] = (float(r[0]), bool(r[1]))
                if cache is not None:
                    cache.put([(keys[i], out[i]) for i in todo])
            return out  # type: ignore[return-value]

        def _score(self, requests: list[Any],
                   hits: list[list[tuple[int, int, float]]] | None = None) -> list[tuple[float, bool]]:
            """HFLM's loglikelihoods computed as HFLM computes them (each input is
            `(context + continuation)[-(max_length + 1):][:-1]`, right-padded with token 0, no
            attention mask, longest first, requests with equal inputs forwarded once), except that
            the LM head and the log-softmax run only at the positions a continuation is read from
            instead of at every position: on MMLU, whose continuation is one token after a context
            of ~130, that is most of the head's FLOPs and all but one row of each (T, V) softmax.
            Ungated requests whose inputs share a prefix run it once (evaluation/prefix.py) unless
            `share_prefixes` is off. Under precision "bf16" a gated batch replays each input's
            probe `hits` (the gate's float32 decisions) instead of letting the gate search bf16
            activations."""
            full = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
            conts = [cont for _, _, cont in requests]
            same: dict[tuple[int, ...], list[int]] = {}
            for i, seq in enumerate(full):
                same.setdefault(tuple(seq[:-1]), []).append(i)
            # the first position of each input whose logits a continuation reads
            reads = {inp: len(inp) - max(len(conts[i]) for i in group) for inp, group in same.items()}
            distinct = list(same)
            whole, shared = distinct, []
            if sharer is not None and hits is None:  # gated passes run whole: the gate's masks read whole inputs
                grouped = families(distinct, [reads[x] for x in distinct], MIN_SHARED)
                whole = [distinct[m] for plen, members in grouped if not plen for m in members]
                shared = [(plen, [distinct[m] for m in members]) for plen, members in grouped if plen]
            order = sorted(whole, key=lambda x: (-len(x), x))
            replay = precision == "bf16" and hits is not None and self.db is not None
            out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)

            def take(logp: torch.Tensor, inp: tuple[int, ...], first: int) -> None:
                """Score every request of input `inp` from its log-probabilities `logp` (L, V),
                whose row 0 is input position `first`."""
                for i in same[inp]:
                    cont = torch.tensor(conts[i], device=logp.device)  # (C,)
                    read = logp[len(inp) - first - len(cont) : len(inp) - first]  # (C, V)
                    ll = read.gather(1, cont[:, None]).sum()
                    out[i] = (float(ll), bool((read.argmax(-1) == cont).all()))
                    bar.update(1)

            with torch.no_grad(), Progress(len(requests), "loglikelihood", "request") as bar:
                for s in range(0, len(order), self._rows_per_forward):
                    rows = order[s : s + self._rows_per_forward]
                    # (B, T), padded with token 0 as HFLM: with no attention mask each real token sees what it sees alone
                    ids, _ = pad_right(list(rows), 0, torch.device("cpu"))
                    lo = min(reads[inp] for inp in rows)  # the positions any continuation is read from: [lo, T)
                    if replay:  # the float32 probe's decisions, as (B, T) open / fact id
                        opened = torch.zeros(ids.shape, dtype=torch.bool)
                        fact = torch.full(ids.shape, -1, dtype=torch.long)
                        for b, inp in enumerate(rows):
                            for pos, fid, _ in hits[same[inp][0]]:
                                opened[b, pos], fact[b, pos] = True, fid
                        self.db.gate.forced = (opened, fact)
                    with capture_below(model, below) if capture_scored else contextlib.nullcontext() as got:
                        logp = torch.log_softmax(self._forward(ids, lo), dim=-1)  # (B, T - lo, V)
                    if capture_scored:
                        self._keep_below(rows, got)
                    for b, inp in enumerate(rows):
                        take(logp[b], inp, lo)
                self._score_shared(shared, reads, take)
            return out

        def _score_shared(self, shared: list[tuple[int, list[tuple[int, ...]]]], reads: dict[tuple[int, ...], int],
                          take: Callable[[torch.Tensor, tuple[int, ...], int], None]) -> None:
            """Score families of inputs (prefix length, members) with each prefix run once: up to a
            batch of families' prefixes together (longest first), then their members' suffixes in
            batches, longest first. Kept rows (`below`) join the prefix's and the suffix's."""
            n = self._rows_per_forward
            fams = sorted(shared, key=lambda f: -f[0])
            chunks, cur, members = [], [], 0  # a chunk: <= n families, or as many as give 4 batches of members
            for fam in fams:
                cur.append(fam)
                members += len(fam[1])
                if len(cur) == n or members >= 4 * n:
                    chunks.append(cur)
                    cur, members = [], 0
            chunks += [cur] if cur else []
            for chunk in chunks:
                with capture_below(model, below) if capture_scored else contextlib.nullcontext() as got:
                    pre = sharer.prefixes([members[0][:plen] for plen, members in chunk])
                kept = (got["hidden"], got["context"]) if capture_scored else (None, None)
                rows = sorted(((f, inp) for f, (_, members) in enumerate(chunk) for inp in members),
                              key=lambda r: (-(len(r[1]) - chunk[r[0]][0]), r[1]))
                for s in range(0, len(rows), n):
                    batch = rows[s : s + n]
                    lo = min(reads[inp] - chunk[f][0] for f, inp in batch)  # suffix positions read: [lo, S)
                    with capture_below(model, below) if capture_scored else contextlib.nullcontext() as got:
                        logits = sharer.suffixes(pre, [f for f, _ in batch], [inp[chunk[f][0]:] for f, inp in batch], lo)
                    logp = torch.log_softmax(logits, dim=-1)  # (B, S - lo, V)
                    if capture_scored:
                        self._keep_joined(batch, chunk, kept, got)
                    for b, (f, inp) in enumerate(batch):
                        take(logp[b], inp, chunk[f][0] + lo)

        def _keep_joined(self, batch: Sequence[tuple[int, tuple[int, ...]]],
                         chunk: Sequence[tuple[int, list[tuple[int, ...]]]],
                         kept: tuple[torch.Tensor | None, torch.Tensor | None],
                         got: dict[str, torch.Tensor | None]) -> None:
            """Store each member's rows: its prefix's (from the prefix pass) then its suffix's."""
            if got["hidden"] is None or kept[0] is None or below is None:
                return
            items = []
            for b, (f, inp) in enumerate(batch):
                plen, rest = chunk[f][0], len(inp) - chunk[f][0]
                rows = [torch.cat([k[f, :plen], g[b, :rest]]) if k is not None and g is not None else None
                        for k, g in zip(kept, (got["hidden"], got["context"]))]
                items.append((request_key(list(inp), 0), rows[0], rows[1]))
            below.put(items)

        def _keep_below(self, rows: Sequence[Sequence[int]], got: dict[str, torch.Tensor | None]) -> None:
            """Store each input's rows of a pass that ran the blocks below l* (`capture_below`)."""
            hidden, context = got["hidden"], got["context"]
            if hidden is None or below is None:
                return
            below.put([(request_key(list(x), 0), hidden[b, : len(x)],
                        None if context is None else context[b, : len(x)]) for b, x in enumerate(rows)])

        def _forward(self, ids: torch.Tensor, lo: int) -> torch.Tensor:
            """Logits of `ids` (B, T) at positions lo..T-1: (B, T - lo, V)."""
            ids = ids.to(model_device(model))
            if keep_arg:
                keep = torch.arange(lo, ids.shape[1], device=ids.device)
                return model(ids, use_cache=False, logits_to_keep=keep).logits
            return model(ids, use_cache=False).logits[:, lo:]

        def _state(self, gated: bool) -> Any:
            if self.db is None or gated:
                return contextlib.nullcontext()
            return self.db.disabled()  # no gate opens on these: the unedited model gives the same scores

        def _precision(self) -> Any:
            if precision == "float32":
                return contextlib.nullcontext()
            return autocast_above(model, -1 if precision == "bf16" else split, torch.bfloat16,  # -1: every block
                                  weights=self._lowered)

        def _probe(self, inputs: list[list[int]]) -> list[list[tuple[int, int, float]]]:
            """(position, fact id, cosine) of every open on each input, from a forward through l*.
            Equal inputs are probed once (a multiple-choice question whose choices are one token
            long feeds the model the same context for every choice)."""
            out: list[list[tuple[int, int, float]]] = [[] for _ in inputs]
            if self.db is None or not self.db.facts or self.db.gate is None or not self.db.gate.enabled:
                return out
            same: dict[tuple[int, ...], list[int]] = {}
            for i, x in enumerate(inputs):
                same.setdefault(tuple(x), []).append(i)
            first = [group[0] for group in same.values()]
            keys = {i: request_key(inputs[i], 0) for i in first}
            todo = []
            for i in first:
                known = probes.get(keys[i]) if probes is not None else None
                if known is None:
                    todo.append(i)
                else:
                    out[i] = list(known)
            cached = [i for i in todo if below is not None and keys[i] in below]
            cached_set = set(cached)
            full = [i for i in todo if below is None or keys[i] not in below]
            # longest first, the inputs whose below-l* rows are kept in batches of their own
            batches = [order[s : s + self._rows_per_forward]
                       for order in (sorted(full, key=lambda i: -len(inputs[i])),
                                     sorted(cached, key=lambda i: -len(inputs[i])))
                       for s in range(0, len(order), self._rows_per_forward)]
            # each shared prefix is searched once: (earlier input, shared length) per input
            pending = set(todo)
            done, order = [i for i in first if i not in pending], [i for rows in batches for i in rows]
            share = {i: ((done + order)[o] if o >= 0 else -1, n) for i, (o, n) in
                     zip(order, shared_prefixes([inputs[i] for i in done + order], len(done)))}
            pad = self.tokenizer.pad_token_id or 0
            dev, dtype = model_device(model), next(model.parameters()).dtype
            if cached and self._tuple_len is None:
                with self.db.disabled():
                    self._tuple_len = block_tuple_len(model, below.layer)
            self.probe_inputs = (self.probe_inputs[0] + len(full), self.probe_inputs[1] + len(cached))
            t0 = time.perf_counter()
            gate = self.db.gate
            with torch.no_grad(), self.db.record() as passes, Progress(len(todo), "gate probe", "input") as bar, \
                    contextlib.ExitStack() as undo:
                undo.callback(setattr, gate, "open_only", gate.open_only)
                gate.open_only = True  # only the opens are read: late tokens are searched above gamma
                real: list[torch.Tensor] = []  # (B, T) this batch's tokens to search

                def unpad(_mod: Any, _args: Any, _kwargs: Any) -> None:  # after the gate's own mask hook
                    if gate.token_mask is not None:  # neither pads nor shared prefixes are searched
                        gate.token_mask = gate.token_mask & real[0].to(gate.token_mask.device)

                undo.callback(model.base_model.register_forward_pre_hook(unpad, with_kwargs=True).remove)
                for rows in batches:
                    before = len(passes)  # a pass that gates nothing records nothing
                    ids, _ = pad_right([inputs[i] for i in rows], pad, dev)  # (B, T)
                    lengths = torch.tensor([len(inputs[i]) for i in rows])  # (B,)
                    starts = torch.tensor([share[i][1] for i in rows])  # (B,)
                    at = torch.arange(ids.shape[1])[None, :]  # (1, T)
                    real[:] = [(at < lengths[:, None]) & (at >= starts[:, None])]  # (B, T)
                    if rows[0] in cached_set:
                        parts = [below.get(keys[i]) for i in rows]
                        width = ids.shape[1]
                        hidden = right_padded_rows([h for h, _ in parts], width).to(dev, dtype)  # (B, T, d_model)
                        context = right_padded_rows([c for _, c in parts], width).to(dev) \
                            if below.context_paths else None  # (B, T, d_ctx)
                        with start_below(model, below, self.db.gate, hidden, context, self._tuple_len), \
                                Trace(self.db.model, self.db.path, retain_input=False, stop=True):
                            model(ids, use_cache=False)
                    else:
                        with capture_below(model, below) if below is not None else contextlib.nullcontext() as got, \
                                Trace(self.db.model, self.db.path, retain_input=False, stop=True):
                            model(ids, use_cache=False)
                        if below is not None:
                            self._keep_below([inputs[i] for i in rows], got)
                    for h in (h for hits in passes[before:] for h in hits):
                        i = rows[h.batch]
                        if h.position < len(inputs[i]):
                            out[i].append((int(h.position), int(h.fact_id), float(h.similarity)))
                    for i in rows:  # in order: an earlier input's opens are complete
                        o, n = share[i]
                        if o >= 0:
                            out[i] = [hit for hit in out[o] if hit[0] < n] + out[i]
                    if probes is not None:
                        probes.put([(keys[i], out[i]) for i in rows])
                    bar.update(len(rows))
            self.probe_seconds += time.perf_counter() - t0
            for group in same.values():
                for i in group[1:]:
                    out[i] = list(out[group[0]])
            return out

    return GatedLM()


@dataclass
class TaskScore:
    task: str
    metric: str
    value: float
    stderr: float
    n: int


def evaluate(lm: Any, tasks: Sequence[str] = TASKS, limit: int | None = None,
             data_dir: str | Path | None = None, work: Path | None = None) -> dict[str, Any]:
    """Run the harness on `tasks` (zero-shot) with `lm` (see `make_lm`); returns
    {"scores": {task: {metric: TaskScore}}, "origins": {task: data origin}, "n": {task: docs}}."""
    _harness()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="neuraldb-tasks-")) if work is None else work
    try:
        origins = task_dir(tasks, tmp, data_dir)
        manager = TaskManager(include_path=str(tmp), include_defaults=False)
        # bootstrap_iters > 0 or the harness reports no stderr at all; means get the closed form
        res = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
                              log_samples=True, bootstrap_iters=100, verbosity="WARNING")
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    scores: dict[str, dict[str, TaskScore]] = {}
    for task in tasks:
        row = res["results"][task]
        n = int(res.get("n-samples", {}).get(task, {}).get("effective", 0))
        per: dict[str, TaskScore] = {}
        for key, value in row.items():
            if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            err = row.get(f"{metric}_stderr,none")
            per[metric] = TaskScore(task, metric, float(value), float(err) if isinstance(err, (int, float)) else
                                    float("nan"), n)
        scores[task] = per
    # each document's main-metric outcome, for the paired standard error of a delta
    per_doc = {task: {int(x["doc_id"]): float(x[MAIN_METRIC[task]]) for x in res.get("samples", {}).get(task, [])}
               for task in tasks}
    return {"scores": scores, "origins": origins, "per_doc": per_doc}


def paired_stderr(a: dict[int, float], b: dict[int, float]) -> float:
    """Standard error of mean(b - a) over the documents both scored (the same documents under two
    model states: far tighter than the two scores' own errors combined)."""
    common = sorted(set(a) & set(b))
    n = len(common)
    if n < 2:
        return float("nan")
    d = [b[i] - a[i] for i in common]
    mu = sum(d) / n
    return math.sqrt(sum((x - mu) ** 2 for x in d) / (n - 1) / n)


def summary_rows(states: dict[str, dict[str, Any]], baseline: str = "unedited") -> list[dict[str, Any]]:
    """One row per state and task: score, stderr, delta to `baseline`; and an `average` row
    (mean of the tasks' main metrics, x100)."""
    rows = []
    base = states.get(baseline)
    for state, res in states.items():
        main = []
        for task, per in res["scores"].items():
            m = MAIN_METRIC[task]
            s = per[m]
            row = {"state": state, "task": task, "metric": m, "score": round(100 * s.value, 2),
                   "stderr": round(100 * s.stderr, 2), "n": s.n}
            if base is not None and task in base["scores"]:
                row["delta"] = round(100 * (s.value - base["scores"][task][m].value), 2)
                if task in res.get("per_doc", {}) and task in base.get("per_doc", {}):
                    row["delta_stderr"] = round(100 * paired_stderr(base["per_doc"][task], res["per_doc"][task]), 2)
            if "perplexity" in per:
                row["perplexity"] = round(per["perplexity"].value, 3)
            rows.append(row)
            main.append(s.value)
        if main:
            avg = {"state": state, "task": "average", "metric": "acc", "score": round(100 * sum(main) / len(main), 2)}
            if base is not None:
                bm = [base["scores"][t][MAIN_METRIC[t]].value for t in res["scores"] if t in base["scores"]]
                if len(bm) == len(main):
                    avg["delta"] = round(100 * (sum(main) - sum(bm)) / len(main), 2)
                    errs = [r["delta_stderr"] for r in rows if r["state"] == state and "delta_stderr" in r]
                    if len(errs) == len(main):  # tasks are independent samples
                        avg["delta_stderr"] = round(math.sqrt(sum(e * e for e in errs)) / len(errs), 2)
            rows.append(avg)
    return rows


def opens_table(opens: Sequence[Open]) -> Iterator[dict[str, Any]]:
    for o in opens:
        yield asdict(o)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as a markdown table (score +- stderr, delta to unedited)."""
    lines = ["| state | task | metric | score | stderr | delta | delta stderr (paired) | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['state']} | {r['task']} | {r['metric']} | {r['score']:.2f} | {r.get('stderr', '')} | "
                     f"{r.get('delta', '')} | {r.get('delta_stderr', '')} | {r.get('n', '')} |")
    return "\n".join(lines)
