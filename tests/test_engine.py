"""The editor on tiny random models of every architecture: exact no-op where the gate is
closed, edits that take, remove/update/save/load/detach, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuraldb import DatabaseError, EditConfig, Fact, FactError, NeuralDB, load_facts
from neuraldb.engine.arch import get_module
from neuraldb.index import ResidualTable

from conftest import make_model

# On random tiny models attention does not route the subject to later tokens, so the edited
# prompts end with the subject: the residual then acts where the next token is predicted.
FACTS = [
    Fact("Danielle Darrieux", "The mother tongue of {}", "Japanese", "French", id="a"),
    Fact("Apple A5", "The maker of {}", "Toyota", "Apple", id="b"),
    Fact("Michel Rocard", "A native speaker of {}", "Russian", "French", id="c"),
]
UNRELATED = ["Berlin is the capital of Germany.", "Where is it? Who made it?", "Toko Yasuda plays"]
CFG = EditConfig(layer=1, gamma=0.65, n_prefixes=2, prefix_len=4, residual_prefixes=1, steps=40, lr=0.5, weight_decay=0.0,
                 clamp_norm=4.0)


def logits(model: torch.nn.Module, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def greedy_next(db: NeuralDB, text: str) -> int:
    ids = db.tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return int(db.model(input_ids=ids).logits[0, -1].argmax())


def first_target_token(tok, fact: Fact) -> int:
    return tok(" " + fact.target_new, add_special_tokens=False)["input_ids"][0]


def test_empty_and_closed_gate_are_bit_identical(arch: str, tokenizer) -> None:
    model = make_model(arch, tokenizer)
    before = logits(model, tokenizer, UNRELATED)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    assert torch.equal(logits(model, tokenizer, UNRELATED), before)  # no facts
    db.add(FACTS)
    db.gate.gamma = 1.0  # every gate closed: cos can never exceed 1
    assert torch.equal(logits(model, tokenizer, UNRELATED), before)
    assert db.hits() == []


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])  # Linear and Conv1D projections
def test_add_remove_update_save_load_detach(arch_name: str, tokenizer, tmp_path: Path) -> None:
    model = make_model(arch_name, tokenizer)
    original = get_module(model, "model.layers.1.mlp.down_proj" if arch_name == "llama" else "transformer.h.1.mlp.c_proj")
    probe = [f.text for f in FACTS] + UNRELATED
    clean = logits(model, tokenizer, probe)
    db = NeuralDB(model, tokenizer, CFG)
    ids = db.add(FACTS)
    assert ids == [0, 1, 2]
    for f in FACTS:
        assert greedy_next(db, f.text) == first_target_token(tokenizer, f), f.text
        assert any(h.fact_id in ids for h in db.hits())
    edited = logits(model, tokenizer, probe)
    assert not torch.equal(edited, clean)

    db.save(tmp_path / "db")
    db.remove(ids)
    assert torch.equal(logits(model, tokenizer, probe), clean)  # removal restores exactly
    assert len(db) == 0

    db.detach()
    assert get_module(model, original_path(arch_name)) is original
    loaded = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert torch.equal(logits(model, tokenizer, probe), edited)  # save/load is exact
    new = Fact(FACTS[0].subject, FACTS[0].prompt, "Spanish", id="a2")
    loaded.update(0, new)
    assert greedy_next(loaded, new.text) == first_target_token(tokenizer, new)
    assert loaded.facts[0].target_new == "Spanish" and len(loaded) == 3
    with loaded.disabled():
        assert torch.equal(logits(model, tokenizer, probe), clean)
    loaded.detach()
    assert get_module(model, original_path(arch_name)) is original


def original_path(arch_name: str) -> str:
    return "model.layers.1.mlp.down_proj" if arch_name == "llama" else "transformer.h.1.mlp.c_proj"


def test_generate_through_gate(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG)
    db.add(FACTS[:1])
    text = db.generate(FACTS[0].text, max_new_tokens=3)
    assert text.startswith(tokenizer.decode([first_target_token(tokenizer, FACTS[0])]))
    assert db.generate_hits and all(h.fact_id == 0 for h in db.generate_hits)


def test_first_token_and_pads_are_never_gated(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=1))
    db.add(FACTS)
    db.gate.gamma = -1.0  # everything that may be gated opens
    enc = tokenizer(["Berlin is", "The capital of France is Paris"], return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**enc)
    opened = db.gate.last[2]
    assert not opened[:, 0].any()
    assert torch.equal(opened[0, 1:], enc["attention_mask"][0, 1:].bool())


def test_wrong_model_and_corrupt_files(tokenizer, tmp_path: Path) -> None:
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    db.add(FACTS[:2])
    db.save(tmp_path / "db")
    db.detach()
    other = make_model("llama", tokenizer, seed=1)
    with pytest.raises(DatabaseError, match="weights of layer 1"):
        NeuralDB.load(tmp_path / "db", other, tokenizer)
    with pytest.raises(DatabaseError, match="model_type"):
        NeuralDB.load(tmp_path / "db", make_model("gpt2", tokenizer), tokenizer)
    (tmp_path / "db" / "residuals.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DatabaseError, match="residuals|corrupted"):
        NeuralDB.load(tmp_path / "db", model, tokenizer)
    (tmp_path / "db" / "keys.safetensors").unlink()
    with pytest.raises(DatabaseError, match="keys.safetensors: missing"):
        NeuralDB.load(tmp_path / "db", model, tokenizer)
    with pytest.raises(DatabaseError, match="not found"):
        NeuralDB.load(tmp_path / "nothing", model, tokenizer)


def test_crash_during_save_keeps_previous_database(tokenizer, tmp_path: Path, monkeypatch) -> None:
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    db.add(FACTS[:1])
    db.save(tmp_path / "db")
    db.add(FACTS[1:])

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(ResidualTable, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        db.save(tmp_path / "db")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no temp dirs left behind
    db.detach()
    again = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert len(again) == 1


@pytest.mark.parametrize("record,message", [
    ({"subject": "X", "target_new": "Y"}, "field 'prompt' is missing"),
    ({"subject": "Paris", "prompt": "The capital of {} is", "target_new": ""}, "field 'target_new'"),
    ({"subject": "Paris", "prompt": "Berlin is the capital of", "target_new": "Y"}, "does not appear in prompt"),
])
def test_bad_fact_records(tmp_path: Path, record: dict, message: str) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"id": "ok", "subject": "A", "prompt": "{} is", "target_new": "B"}) + "\n"
                    + json.dumps(record) + "\n")
    with pytest.raises(FactError, match=rf"facts.jsonl:2: .*{message}"):
        load_facts(path)


def test_duplicate_ids_and_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    rec = {"id": "x", "subject": "A", "prompt": "{} is", "target_new": "B"}
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(FactError, match=r"f.jsonl:2: duplicate id 'x'"):
        load_facts(path)
    path.write_text(json.dumps({**rec, "colour": 1}) + "\n")
    with pytest.raises(FactError, match=r"unknown field\(s\) \['colour'\]"):
        load_facts(path)
    with pytest.raises(FactError, match="not found"):
        load_facts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("spec", ["torch", "Int8", "HNSW16", "torch,shards"])
def test_gated_layer_takes_any_index_spec(spec: str, tokenizer) -> None:
    """The same edits through another index spec open the same gates and give the same logits."""
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=3))
    ids = db.add(FACTS)
    keys = db.key_table.gather(torch.tensor(ids))
    res = db.table.gather(torch.tensor(ids))
    probe = [f.text for f in FACTS] + UNRELATED
    want = logits(model, tokenizer, probe)
    want_open = db.gate.last[2].clone()
    db.detach()
    other = NeuralDB(model, tokenizer, CFG.replace(steps=3, index=spec))
    other.insert(ids, FACTS, keys, res)
    got = logits(model, tokenizer, probe)
    assert torch.equal(other.gate.last[2], want_open)
    assert torch.allclose(got, want, atol=1e-5)
