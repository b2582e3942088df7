"""The head check in the engine's gate (engine/heads.py): the rule on hand-made tensors, then on a
tiny Llama: edits still take, a KV-cache decode, a left-padded batch and dropped cache rows
decide exactly as one full forward does, closed tokens keep the unedited bits, and the head
table saves, loads and is checked."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from neuraldb import DatabaseError, Fact, NeuralDB
from neuraldb.index import ResidualTable
from neuraldb.engine.arch import cache_kwargs, returned_cache
from neuraldb.engine.heads import UNKNOWN, extend, head_dim, head_pass, head_rows, select_rows, token_ids, widen

from conftest import make_model
from test_engine import CFG, FACTS, ffn_outputs, first_target_token, greedy_next

HCFG = CFG.replace(head_gamma=0.5, head_window=8)
TEXTS = ["The mother tongue of Danielle Darrieux is", "Where is it? The maker of Apple A5",
         "A native speaker of Michel Rocard and"]


def test_head_pass_rule() -> None:
    """One row of 6 tokens, d = 2: the winner at t=4 has span 2 (head at t=2) or span 9 (wider
    than the window: unchecked); its head key matches the query at t=2 only."""
    q = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [1, 0], [1, 0], [1, 0]]])  # (1, 6, 2)
    heads = head_rows(torch.tensor([[0.0, 3.0]]), torch.tensor([[2, 2]]), torch.tensor([[7, 5000]]))
    assert heads.shape == (1, head_dim(2)) and token_ids(heads[:, 4:].half().float()).tolist() == [[7, 5000]]
    ids = torch.tensor([[-1, -1, -1, -1, 0, 0]])
    ext = extend(torch.zeros(1, 4, 2), q)
    unknown = torch.tensor([UNKNOWN])
    passed, anchored = head_pass(heads, ids, ext, 0, torch.tensor([0]), unknown, 0.5)
    assert passed[0, 4] and not passed[0, 5]  # t=5 looks at t=3: (1, 0) against (0, 1)
    assert not anchored.any() and ext.shape == (1, 10, 2)
    # the head at t=3 is the first real token (the sink): its token id decides; only a known,
    # equal id anchors the subject at the text's start
    for sink, opens in ((UNKNOWN, True), (7, True), (5000, True), (8, False)):
        passed, anchored = head_pass(heads, ids, ext, 0, torch.tensor([3]), torch.tensor([sink]), 0.5)
        assert bool(passed[0, 5]) == opens and bool(anchored[0, 5]) == (opens and sink != UNKNOWN), sink
        assert not anchored[0, 4]  # t=4's head is at t=2, before the first real token
    # a head before the first real token: the subject cannot be whole in the text
    assert not head_pass(heads, ids, ext, 0, torch.tensor([4]), torch.tensor([7]), 0.5)[0][0, 5]
    wide = head_rows(torch.tensor([[0.0, 3.0]]), torch.tensor([[9, 9]]), torch.tensor([[7, 7]]))
    assert head_pass(wide, ids, ext, 0, torch.tensor([0]), unknown, 0.5)[0][0, 5]
    old = widen(heads[:, :4], 2)  # the first layout: ids unknown, the sink passes as it did, unanchored
    passed, anchored = head_pass(old, ids, ext, 0, torch.tensor([3]), torch.tensor([8]), 0.5)
    assert passed[0, 5] and not anchored[0, 5]


def _db(tokenizer, arch: str = "llama", **changes) -> NeuralDB:
    db = NeuralDB(make_model(arch, tokenizer), tokenizer, HCFG.replace(**changes))
    db.add(FACTS)
    return db


def test_edits_take_with_the_head_check(tokenizer) -> None:
    db = _db(tokenizer)
    assert db.heads is not None and db.d_row == db.d_key + head_dim(db.d_key)
    assert sorted(db.heads.ids().tolist()) == [0, 1, 2]
    for f in FACTS:
        assert greedy_next(db, f.text) == first_target_token(tokenizer, f), f


def test_a_head_gamma_of_one_closes_all_but_unchecked_tokens(tokenizer) -> None:
    db = _db(tokenizer)
    db.gate.gamma = -1.0
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with db.disabled():
        base = ffn_outputs(db.model, db.add_path, enc)
    db.gate.head_gamma = -1.0
    ffn_outputs(db.model, db.add_path, enc)
    all_open = db.gate.last[2].clone()
    db.gate.head_gamma = 1.0
    out = ffn_outputs(db.model, db.add_path, enc)
    some = db.gate.last[2]
    assert (all_open & ~some).any() and not (some & ~all_open).any()
    closed = ~some
    assert torch.equal(out[closed].view(torch.int32), base[closed].view(torch.int32))  # bit-identical where closed


def _between(sims: torch.Tensor) -> float:
    """A threshold near the median that no token's similarity sits on: the midpoint of the widest
    gap between neighbouring similarities in the middle third. Padding and a cache change the
    GEMMs' shapes and so their rounding (~1e-7; seen on an AVX2 CPU), so a token exactly at the
    threshold, as the median itself is, may decide either way; a gap keeps the test about the
    windows and the cache, not about rounding."""
    s = sims.flatten().sort().values  # (N,)
    lo, hi = len(s) // 3, max(len(s) // 3 + 1, 2 * len(s) // 3)
    gaps = s[lo + 1: hi + 1] - s[lo:hi]  # (hi - lo,)
    i = lo + int(gaps.argmax())
    assert float(s[i + 1] - s[i]) > 1e-4, "no gap between the similarities to put the threshold in"
    return float((s[i] + s[i + 1]) / 2)


def _decisions_full(db: NeuralDB, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        db.model(input_ids=ids, attention_mask=am)
    return db.gate.last[2].clone()  # (B, T)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])  # gemma3: sliding windows, one KV head, AddAfter
def test_kv_cache_decode_and_padding_decide_as_a_full_forward(arch_name: str, tokenizer) -> None:
    db = _db(tokenizer, arch_name)
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    ids, am = enc["input_ids"], enc["attention_mask"]
    sims = None
    with torch.no_grad():
        db.model(input_ids=ids, attention_mask=am)
        sims = db.gate.last[0][am.bool()]
    db.gate.gamma = _between(sims)  # about half the tokens pass the key test
    db.gate.head_gamma = 0.3
    full = _decisions_full(db, ids, am)
    assert full.any() and not full.all()
    for b, text in enumerate(TEXTS):  # each row alone, unpadded
        one = tokenizer([text], return_tensors="pt")
        n = one["input_ids"].shape[1]
        assert torch.equal(_decisions_full(db, one["input_ids"], one["attention_mask"])[0], full[b, -n:]), b
    # prefill 3 tokens, then one token a step, through a cache
    steps, cache = [], DynamicCache(config=db.model.config)
    with torch.no_grad():
        for s, e in [(0, 3)] + [(t, t + 1) for t in range(3, ids.shape[1])]:
            out = db.model(input_ids=ids[:, s:e], attention_mask=am[:, :e], use_cache=True,
                           **cache_kwargs(db.model, cache))
            cache = returned_cache(out)
            steps.append(db.gate.last[2].clone())
    assert torch.equal(torch.cat(steps, 1), full)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])
def test_at_the_sink_the_token_decides_in_a_forward_a_batch_and_a_decode(arch_name: str, tokenizer) -> None:
    """A head on a text's first token is tested by its token id: "Danielle Darrieux ..." opens
    the fact's gate, "Michelle Darrieux ..." (same span, another first token) does not; left
    padding and a one-token prefill then a decode decide the same."""
    fact = Fact("Danielle Darrieux", "{} was born in", "Paris", "Rome", id="d")
    db = NeuralDB(make_model(arch_name, tokenizer), tokenizer, HCFG)
    db.add([fact])
    db.gate.gamma, db.gate.head_gamma = -1.0, 1.0  # every token wins the key test, no cosine passes the head's
    span = int(db.heads.gather(torch.tensor([0]))[0, db.d_key + 1])  # the bare prompt's span
    texts = ["Danielle Darrieux was born in", "Michelle Darrieux was born in"]
    assert tokenizer(texts[0])["input_ids"][0] != tokenizer(texts[1])["input_ids"][0]
    alone = []
    for text in texts:
        one = tokenizer([text], return_tensors="pt")
        alone.append(_decisions_full(db, one["input_ids"], one["attention_mask"])[0])
    assert alone[0][span] and not alone[1][span]  # the subject's last token: the head is the sink
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    ids, am = enc["input_ids"], enc["attention_mask"]
    full = _decisions_full(db, ids, am)
    for b in range(2):
        assert torch.equal(full[b, -len(alone[b]):], alone[b]), b
    steps, cache = [], DynamicCache(config=db.model.config)
    pad = int((am[1] == 0).sum())
    with torch.no_grad():
        for s, e in [(0, pad + 1)] + [(t, t + 1) for t in range(pad + 1, ids.shape[1])]:
            out = db.model(input_ids=ids[:, s:e], attention_mask=am[:, :e], use_cache=True,
                           **cache_kwargs(db.model, cache))
            cache = returned_cache(out)
            steps.append(db.gate.last[2].clone())
    assert torch.equal(torch.cat(steps, 1), full)


def test_sink_gamma_applies_where_the_subject_starts_the_text(tokenizer) -> None:
    """With the key threshold above the own similarity, `sink_gamma` below it opens the gate
    where the text starts with the subject (its head is the sink, by token id) and nowhere
    else; it is the index's floor too."""
    fact = Fact("Danielle Darrieux", "{} was born in", "Paris", "Rome", id="d")
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, HCFG.replace(sink_gamma=0.3))
    assert db.config.floor == 0.3
    db.add([fact])
    db.gate.head_gamma = 1.0  # no cosine passes the head test: only the sink's id can
    span = int(db.heads.gather(torch.tensor([0]))[0, db.d_key + 1])
    texts = ["Danielle Darrieux was born in", "Michelle Darrieux was born in"]
    encs = [tokenizer([t], return_tensors="pt") for t in texts]
    _decisions_full(db, encs[0]["input_ids"], encs[0]["attention_mask"])  # the own similarity at the subject
    sim = float(db.gate.last[0][0, span])
    db.gate.gamma, db.gate.sink_gamma = min(0.99, sim + 0.01), sim - 0.01
    assert _decisions_full(db, encs[0]["input_ids"], encs[0]["attention_mask"])[0, span]
    assert not _decisions_full(db, encs[1]["input_ids"], encs[1]["attention_mask"])[0, span]
    db.gate.sink_gamma = None  # gamma everywhere: closed at the start too
    assert not _decisions_full(db, encs[0]["input_ids"], encs[0]["attention_mask"])[0, span]


def test_dropped_cache_rows_follow_with_select_rows(tokenizer) -> None:
    db = _db(tokenizer)
    db.gate.gamma, db.gate.head_gamma = -1.0, 0.3
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    ids, am = enc["input_ids"], enc["attention_mask"]
    full = _decisions_full(db, ids, am)
    t = ids.shape[1]
    with torch.no_grad():
        cache = DynamicCache(config=db.model.config)
        out = db.model(input_ids=ids[:, : t - 1], attention_mask=am[:, : t - 1], use_cache=True,
                       **cache_kwargs(db.model, cache))
        cache = returned_cache(out)
        keep = torch.tensor([2, 0])
        cache.batch_select_indices(keep)
        stale = copy.deepcopy(cache)  # a failed step leaves its cache half-written: fail on a copy
        with pytest.raises(RuntimeError, match="select_rows"):
            db.model(input_ids=ids[keep, t - 1 :], attention_mask=am[keep], use_cache=True,
                     **cache_kwargs(db.model, stale))
        select_rows(db.model, cache, keep)
        db.model(input_ids=ids[keep, t - 1 :], attention_mask=am[keep], use_cache=True,
                 **cache_kwargs(db.model, cache))
    assert torch.equal(db.gate.last[2][:, 0], full[keep, -1])


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])
def test_generate_matches_a_full_forward_of_its_output(arch_name: str, tokenizer) -> None:
    db = _db(tokenizer, arch_name)
    db.gate.gamma, db.gate.head_gamma = 0.0, 0.3
    prompt = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with db.record() as steps, torch.no_grad():
        gen = db.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    n = prompt.shape[1]
    opened = {(0, h.position) for h in steps[0]} | {(0, n + k - 1) for k, hs in enumerate(steps) if k for _ in hs}
    full = _decisions_full(db, gen[:, :-1], torch.ones_like(gen[:, :-1]))
    assert opened == {(0, p) for p in full[0].nonzero()[:, 0].tolist()}


def test_head_table_saves_loads_and_is_checked(tokenizer, tmp_path: Path) -> None:
    db = _db(tokenizer)
    db.remove([1])
    db.save(tmp_path / "db")
    back = NeuralDB.load(tmp_path / "db", make_model("llama", tokenizer), tokenizer)
    assert back.config.head_gamma == 0.5 and sorted(back.heads.ids().tolist()) == [0, 2]
    assert torch.equal(back.heads.gather(torch.tensor([0, 2])), db.heads.gather(torch.tensor([0, 2])))
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert torch.equal(ffn_outputs(back.model, back.add_path, enc), ffn_outputs(db.model, db.add_path, enc))
    plain = NeuralDB(make_model("llama", tokenizer), tokenizer, CFG)  # no head check: no head file
    plain.add(FACTS[:1])
    plain.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "heads.safetensors").exists()
    plain.detach()
    assert NeuralDB.load(tmp_path / "plain", plain.model, tokenizer).heads is None
    db.detach()
    (tmp_path / "db" / "heads.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DatabaseError, match="heads.safetensors"):
        NeuralDB.load(tmp_path / "db", db.model, tokenizer)


def test_a_database_of_the_first_head_layout_loads_with_unknown_head_ids(tokenizer, tmp_path: Path) -> None:
    """Head rows saved before the head token ids existed (d_key + 2) load widened, their ids
    unknown (the sink passes, as it did); key rows of that layout (a write-ahead log) insert."""
    db = _db(tokenizer)
    ids = torch.tensor([0, 1, 2])
    rows = db.heads.gather(ids)  # (3, head_dim)
    first = ResidualTable(db.d_key + 2, device="cpu", dtype=torch.float16)
    first.put(ids.numpy(), rows[:, : db.d_key + 2])
    db.heads = first
    db.save(tmp_path / "db")
    db.detach()
    back = NeuralDB.load(tmp_path / "db", db.model, tokenizer)
    got = back.heads.gather(ids)
    assert back.heads.dim == head_dim(back.d_key) and torch.equal(got[:, : back.d_key + 2], rows[:, : back.d_key + 2])
    assert (token_ids(got[:, back.d_key + 2 :].float()) < 0).all()
    keys = back.encode_keys([FACTS[0]])
    back.insert([7], [FACTS[0]], keys[:, : back.d_row - 4], None)  # the first layout's key row
    assert torch.equal(token_ids(back.heads.gather(torch.tensor([7]))[:, back.d_key + 2 :].float()),
                       torch.full((1, 2), -2048))  # UNKNOWN: digits (-1, 0)


def test_head_config_is_checked() -> None:
    from neuraldb.engine.config import ConfigError, from_mapping, EditConfig

    with pytest.raises(ConfigError, match="head_gamma"):
        from_mapping(EditConfig, {"head_gamma": 1.5})
    with pytest.raises(ConfigError, match="head_window"):
        from_mapping(EditConfig, {"head_window": 0})
    with pytest.raises(ConfigError, match="sink_gamma"):  # it needs the head check
        from_mapping(EditConfig, {"sink_gamma": 0.7})
    assert from_mapping(EditConfig, {"head_gamma": 0.5, "sink_gamma": 0.4, "gamma": 0.6}).floor == 0.4
