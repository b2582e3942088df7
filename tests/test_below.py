"""The gate probe from kept below-l* rows (evaluation/below.py): the same opens, to the bit, as a
probe from the embeddings, the blocks below l* not run, rows kept by the scorer's passes too,
a cache of another space refused and a torn tail ignored."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

pytest.importorskip("lm_eval", reason="the 'eval' extra (lm-evaluation-harness) is not installed")

from neuraldb import EditConfig, Fact, NeuralDB
from neuraldb.engine.arch import get_arch
from neuraldb.engine.config import ConfigError
from neuraldb.engine.hooks import get_module
from neuraldb.evaluation.below import BelowCache
from neuraldb.evaluation.general import evaluate, make_lm, request_key

from conftest import make_model
from test_general import ARC, FACT, arc_dir  # noqa: F401  (a fixture)

TEXTS = ["Everyone knows Danielle Darrieux speaks", "Berlin is the capital of",
         "The mother tongue of Danielle Darrieux is, as everyone here knows, not", "Where is it?"]


@pytest.fixture(scope="module")
def ctx_db(tokenizer) -> NeuralDB:
    """Layer 2 with the context of three attention blocks (two of them below l*), the head check
    and a low gamma, so that many tokens open and every cosine of theirs is compared."""
    cfg = EditConfig(layer=2, gamma=0.2, gate_context=3, head_gamma=-1.0, sink_gamma=0.1, n_prefixes=2,
                     prefix_len=4, residual_prefixes=1, steps=5, lr=0.5, weight_decay=0.0, clamp_norm=4.0)
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, cfg)
    db.add([FACT, Fact("Berlin", "{} is the capital of", "Germany", "Italy", id="b")])
    return db


def block_calls(db: NeuralDB) -> tuple[list[int], list]:
    """The tokens of every forward call of decoder block 0 (below l*)."""
    calls: list[int] = []
    block = get_module(db.model, get_arch(db.model).layers)[0]
    return calls, block.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[:2].numel()))


@contextlib.contextmanager
def counted_search(db: NeuralDB) -> Iterator[list[int]]:
    """The number of queries of every search of `db`'s index inside the block."""
    searched: list[int] = []
    search, above = db.index.search, db.index.search_above
    db.index.search = lambda q: (searched.append(q.shape[0]), search(q))[1]
    db.index.search_above = lambda q, f: (searched.append(q.shape[0]), above(q, f))[1]
    try:
        yield searched
    finally:
        del db.index.search, db.index.search_above


def test_a_probe_from_kept_rows_equals_the_probe_from_the_embeddings(ctx_db: NeuralDB, tmp_path: Path) -> None:
    inputs = [ctx_db.tok(t)["input_ids"] for t in TEXTS] + [ctx_db.tok(TEXTS[0])["input_ids"]]
    with counted_search(ctx_db) as searched:
        want = make_lm(ctx_db.model, ctx_db.tok, ctx_db, batch_size=2)._probe(inputs)
    assert sum(searched) == sum(len(x) - 1 for x in inputs[:4])  # each distinct input once, no pad, no sink
    assert sum(len(h) for h in want) > 10 and want[0] and want[1]  # many opens to compare
    first = make_lm(ctx_db.model, ctx_db.tok, ctx_db, batch_size=2, below=BelowCache.for_db(tmp_path, ctx_db))
    assert first._probe(inputs) == want and first.probe_inputs == (4, 0)  # from the embeddings, rows kept
    kept = BelowCache.for_db(tmp_path, ctx_db)  # read back from disk
    assert len(kept) == 4 and kept.context_paths == ("model.layers.0.self_attn", "model.layers.1.self_attn")
    again = make_lm(ctx_db.model, ctx_db.tok, ctx_db, batch_size=2, below=kept)
    calls, hook = block_calls(ctx_db)
    try:
        got = again._probe(inputs)
    finally:
        hook.remove()
    assert got == want  # every open, its position, fact and float64 cosine, to the bit
    # no block below l* ran on an input: one two-token pass learnt what a block returns
    assert again.probe_inputs == (0, 4) and calls == [2]


def test_the_scorer_keeps_the_rows_the_probe_then_reads(ctx_db: NeuralDB, arc_dir: Path, tmp_path: Path) -> None:
    with ctx_db.disabled():
        plain = make_lm(ctx_db.model, ctx_db.tok, batch_size=3, layer=ctx_db.layer,
                        below=BelowCache.for_db(tmp_path, ctx_db))
        evaluate(plain, ["arc_challenge"], data_dir=arc_dir)
    n_inputs = len(BelowCache.for_db(tmp_path, ctx_db))  # the distinct inputs of the 10 requests
    assert sum(len(d["choices"]["text"]) for d in ARC) - 2 <= n_inputs <= 10
    ref = make_lm(ctx_db.model, ctx_db.tok, ctx_db, batch_size=3)
    lm = make_lm(ctx_db.model, ctx_db.tok, ctx_db, batch_size=3, below=BelowCache.for_db(tmp_path, ctx_db))
    a, b = evaluate(ref, ["arc_challenge"], data_dir=arc_dir), evaluate(lm, ["arc_challenge"], data_dir=arc_dir)
    assert lm.probe_inputs == (0, n_inputs) and ref.opens  # every input probed from the scorer's rows
    assert [(o.doc_id, o.position, o.fact_id) for o in lm.opens] == [(o.doc_id, o.position, o.fact_id)
                                                                      for o in ref.opens]
    assert [o.similarity for o in lm.opens] == pytest.approx([o.similarity for o in ref.opens], abs=1e-5)
    assert b["scores"]["arc_challenge"]["acc"].value == a["scores"]["arc_challenge"]["acc"].value


def test_a_cache_of_another_space_is_refused_and_a_torn_tail_ignored(ctx_db: NeuralDB, tmp_path: Path) -> None:
    cache = BelowCache.for_db(tmp_path, ctx_db)
    rows = torch.randn(3, cache.d_model), torch.randn(3, cache.d_ctx)
    cache.put([("a", *rows)])
    with pytest.raises(ConfigError, match="meta.json"):
        BelowCache(tmp_path, ctx_db.layer + 1, cache.context_paths, cache.d_model, cache.d_ctx)
    with open(tmp_path / "rows.f32", "ab") as fh:
        fh.write(b"\0" * 10)  # a torn row
    with open(tmp_path / "index.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(["b", 3, 99]) + "\n" + '["c", 3')  # a row past the end, a torn line
    back = BelowCache.for_db(tmp_path, ctx_db)
    assert len(back) == 1 and "b" not in back
    hidden, context = back.get("a")
    assert torch.equal(hidden, rows[0]) and torch.equal(context, rows[1])
    back.put([("d", *rows)])  # appended after the torn bytes are dropped
    assert torch.equal(BelowCache.for_db(tmp_path, ctx_db).get("d")[1], rows[1])


def test_open_only_searches_late_tokens_above_gamma_and_opens_the_same(tokenizer) -> None:
    """With `open_only` (the probe's setting) a token past the head window after the text's first
    token is searched above gamma, not the index's floor (sink_gamma): the same opens, fewer
    candidate keys re-scored by the bound index."""
    from neuraldb.engine.tokens import pad_right

    cfg = EditConfig(layer=2, gamma=0.45, gate_context=3, head_gamma=-1.0, sink_gamma=0.1, head_window=2,
                     index="Proj8", n_prefixes=2, prefix_len=4, residual_prefixes=1, steps=3, lr=0.5,
                     weight_decay=0.0, clamp_norm=4.0)
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, cfg)
    subjects = ["Danielle Darrieux", "Berlin", "Paris", "Toyota", "Apple", "the Nile", "Mars", "Lenin"]
    db.add([Fact(s, "{} is located in", "Spain", "Peru", id=str(i)) for i, s in enumerate(subjects)])
    index = db.index.inner if hasattr(db.index, "inner") else db.index
    index.chooser = None  # always the bound, so that its candidates are counted
    ids, _ = pad_right([tokenizer(t)["input_ids"] for t in TEXTS + [" ".join(subjects) + " are all known"]], 0,
                       torch.device("cpu"))
    got = {}
    for only in (False, True):
        db.gate.open_only = only
        index.stats["candidates"] = 0
        try:
            with torch.no_grad(), db.record() as passes:
                db.model(ids, use_cache=False)
        finally:
            db.gate.open_only = False
        got[only] = ([(h.batch, h.position, h.fact_id, h.similarity) for h in passes[0]], index.stats["candidates"])
    assert got[True][0] == got[False][0] and len(got[True][0]) > 3
    assert got[True][1] < got[False][1]


def test_a_shared_prefix_is_searched_once(ctx_db: NeuralDB) -> None:
    """Inputs that share a prefix (a question and its choices) search it once: each input gets the
    opens a probe of it alone finds, and fewer tokens are searched."""
    from neuraldb.evaluation.general import shared_prefixes

    assert shared_prefixes([[1, 2, 3], [1, 2, 4], [5], [1, 2, 3, 9], [1, 7]]) == \
        [(-1, 0), (0, 2), (-1, 0), (0, 3), (0, 1)]
    assert shared_prefixes([[1, 2], [1, 2, 3], [1]], first=1) == [(0, 2), (0, 1)]
    stem = "Everyone knows Danielle Darrieux speaks"
    inputs = [ctx_db.tok(stem + end)["input_ids"] for end in (" French", " Japanese and Berlin", ", they say")]
    inputs.append(ctx_db.tok(TEXTS[1])["input_ids"])
    with counted_search(ctx_db) as searched:
        got = make_lm(ctx_db.model, ctx_db.tok, ctx_db, batch_size=2)._probe(inputs)
    with counted_search(ctx_db) as searched_alone:
        alone = [make_lm(ctx_db.model, ctx_db.tok, ctx_db, batch_size=2)._probe([x])[0] for x in inputs]
    assert sum(searched) < sum(searched_alone) - 10  # the stem was searched once, not three times
    assert [[(p, f) for p, f, _ in h] for h in got] == [[(p, f) for p, f, _ in h] for h in alone]
    n_stem = next(t for t, (a, b) in enumerate(zip(inputs[0], inputs[1])) if a != b)
    # the longest input is probed first; the others' opens inside the stem are copied from it
    assert sum(map(len, got)) > 5 and any(p < n_stem for p, _, _ in got[0]) and any(p < n_stem for p, _, _ in got[2])
    for a, b in zip(got, alone):
        assert [c for _, _, c in a] == pytest.approx([c for _, _, c in b], abs=1e-6)


def test_the_scorer_reads_each_shared_prefix_once_for_the_same_scores_and_rows(ctx_db: NeuralDB,
                                                                             tmp_path: Path) -> None:
    """GatedLM with and without prefix sharing: every loglikelihood within 1e-5 and every greedy
    flag equal, fewer tokens through block 0, and the same below-l* rows kept (hidden and the
    context part), under float32 and bf16-above (evaluation/prefix.py)."""
    db = ctx_db
    ctx = "The mother tongue of Danielle Darrieux is, as everyone in Paris and Berlin knows, a language:"
    pairs = [(ctx, c) for c in (" French", " Japanese and more words", " German", " A")]
    pairs += [("Where is it? What is it? Who made it? It is a city, a person, a language. " + q, " Paris")
              for q in ("Berlin?", "Rome and Italy?", "France")]
    pairs += [("Berlin", " is the capital of Germany")]
    for precision in ("float32", "bf16-above"):
        got, rows, tokens = [], [], []
        for share in (True, False):
            below = BelowCache.for_db(tmp_path / f"{precision}-{share}", db)
            lm = make_lm(db.model, db.tok, db, batch_size=3, precision=precision, below=below, share_prefixes=share)
            reqs = [((c, k), *lm._encode_pair(c, k)) for c, k in pairs]
            calls, hook = block_calls(db)
            try:
                with db.disabled(), lm._precision():
                    got.append(lm._score(reqs))
            finally:
                hook.remove()
            tokens.append(sum(calls))
            rows.append({request_key((c + k)[:-1], 0): below.get(request_key((c + k)[:-1], 0)) for _, c, k in reqs})
        assert [g for _, g in got[0]] == [g for _, g in got[1]]
        assert [ll for ll, _ in got[0]] == pytest.approx([ll for ll, _ in got[1]], abs=1e-5)
        assert tokens[0] < tokens[1], (precision, tokens)
        assert rows[0].keys() == rows[1].keys() and all(v is not None for v in rows[0].values())
        for key, (hidden, context) in rows[0].items():
            assert torch.allclose(hidden, rows[1][key][0], atol=1e-5)
            assert context.shape[1] > 0 and torch.allclose(context, rows[1][key][1], atol=1e-5)
