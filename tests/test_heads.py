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

from neuraldb import DatabaseError, NeuralDB
from neuraldb.engine.arch import cache_kwargs, returned_cache
from neuraldb.engine.heads import extend, head_pass, head_rows, select_rows

from conftest import make_model
from test_engine import CFG, FACTS, ffn_outputs, first_target_token, greedy_next

HCFG = CFG.replace(head_gamma=0.5, head_window=8)
TEXTS = ["The mother tongue of Danielle Darrieux is", "Where is it? The maker of Apple A5",
         "A native speaker of Michel Rocard and"]


def test_head_pass_rule() -> None:
    """One row of 6 tokens, d = 2: the winner at t=4 has span 2 (head at t=2) or span 9 (wider
    than the window: unchecked); its head key matches the query at t=2 only."""
    q = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [1, 0], [1, 0], [1, 0]]])  # (1, 6, 2)
    heads = head_rows(torch.tensor([[0.0, 3.0]]), torch.tensor([[2, 2]]))  # fact 0: head (0, 1), spans 2, 2
    ids = torch.tensor([[-1, -1, -1, -1, 0, 0]])
    ext = extend(torch.zeros(1, 4, 2), q)
    passed = head_pass(heads, ids, ext, 0, torch.tensor([0]), 0.5)
    assert passed[0, 4] and not passed[0, 5]  # t=5 looks at t=3: (1, 0) against (0, 1)
    assert ext.shape == (1, 10, 2)
    first_late = head_pass(heads, ids, ext, 0, torch.tensor([3]), 0.5)
    assert first_late[0, 5]  # the head at t=3 is the first real token: nothing to compare, passes
    wide = head_rows(torch.tensor([[0.0, 3.0]]), torch.tensor([[9, 9]]))
    assert head_pass(wide, ids, ext, 0, torch.tensor([0]), 0.5)[0, 5]


def _db(tokenizer, **changes) -> NeuralDB:
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, HCFG.replace(**changes))
    db.add(FACTS)
    return db


def test_edits_take_with_the_head_check(tokenizer) -> None:
    db = _db(tokenizer)
    assert db.heads is not None and db.d_row == 2 * db.d_key + 2
    assert sorted(db.heads.ids().tolist()) == [0, 1, 2]
    for f in FACTS:
        assert greedy_next(db, f.text) == first_target_token(tokenizer, f), f


def test_a_head_gamma_of_one_closes_all_but_unchecked_tokens(tokenizer) -> None:
    db = _db(tokenizer)
    db.gate.gamma = -1.0
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with db.disabled():
        base = ffn_outputs(db.model, db.path, enc)
    db.gate.head_gamma = -1.0
    ffn_outputs(db.model, db.path, enc)
    all_open = db.gate.last[2].clone()
    db.gate.head_gamma = 1.0
    out = ffn_outputs(db.model, db.path, enc)
    some = db.gate.last[2]
    assert (all_open & ~some).any() and not (some & ~all_open).any()
    closed = ~some
    assert torch.equal(out[closed].view(torch.int32), base[closed].view(torch.int32))  # bit-identical where closed


def _decisions_full(db: NeuralDB, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        db.model(input_ids=ids, attention_mask=am)
    return db.gate.last[2].clone()  # (B, T)


def test_kv_cache_decode_and_padding_decide_as_a_full_forward(tokenizer) -> None:
    db = _db(tokenizer)
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    ids, am = enc["input_ids"], enc["attention_mask"]
    sims = None
    with torch.no_grad():
        db.model(input_ids=ids, attention_mask=am)
        sims = db.gate.last[0][am.bool()]
    db.gate.gamma = float(sims.median())  # half the tokens pass the key test
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


def test_generate_matches_a_full_forward_of_its_output(tokenizer) -> None:
    db = _db(tokenizer)
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
    assert torch.equal(ffn_outputs(back.model, back.path, enc), ffn_outputs(db.model, db.path, enc))
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


def test_head_config_is_checked() -> None:
    from neuraldb.engine.config import ConfigError, from_mapping, EditConfig

    with pytest.raises(ConfigError, match="head_gamma"):
        from_mapping(EditConfig, {"head_gamma": 1.5})
    with pytest.raises(ConfigError, match="head_window"):
        from_mapping(EditConfig, {"head_window": 0})
