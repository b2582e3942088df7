"""The editor on tiny random models of every architecture: exact no-op where the gate is
closed, edits that take, remove/update/save/load/detach, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuraldb import DatabaseError, EditConfig, Fact, FactError, NeuralDB, load_facts
from neuraldb.engine.arch import get_module
from neuraldb.engine.hooks import Trace
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


def ffn_outputs(model: torch.nn.Module, path: str, enc: dict) -> torch.Tensor:
    with Trace(model, path, retain_input=False, retain_output=True) as tr, torch.no_grad():
        model(**enc)
    return tr.output.detach().clone()


def test_closed_tokens_are_bit_identical_beside_open_ones(arch: str, tokenizer) -> None:
    """One padded batch in which some tokens open the gate and others do not: at every closed
    token the gated layer's output has exactly the unedited bits, at every open one it differs;
    and logits before the first open token of each row are bit-identical too."""
    model = make_model(arch, tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    enc = tokenizer([FACTS[0].text, UNRELATED[0], FACTS[1].text + " and more"], return_tensors="pt", padding=True)
    with db.disabled():
        base_out = ffn_outputs(model, db.add_path, enc)  # (B, T, d_model)
        base_logits = model(**enc).logits
    assert torch.equal(ffn_outputs(model, db.add_path, enc), base_out)  # no facts yet
    db.add(FACTS)
    ffn_outputs(model, db.add_path, enc)
    sims = db.gate.last[0]
    gateable = db.gate.last_mask & enc["attention_mask"].bool()
    # gamma in the middle of the observed similarities: guarantees both kinds in one batch
    db.gate.gamma = float(sims[gateable].median())
    out = ffn_outputs(model, db.add_path, enc)
    opened = db.gate.last[2]
    assert opened.any() and (gateable & ~opened).any()
    closed = ~opened
    assert torch.equal(out[closed].view(torch.int32), base_out[closed].view(torch.int32))
    assert not torch.equal(out[opened], base_out[opened])
    with torch.no_grad():
        edited = model(**enc).logits
    for b in range(opened.shape[0]):
        first = int(opened[b].nonzero()[0]) if opened[b].any() else opened.shape[1]
        assert torch.equal(edited[b, :first], base_logits[b, :first])


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
    text = db.generate(FACTS[0].text, max_new_tokens=3, record_hits=True)
    assert text.startswith(tokenizer.decode([first_target_token(tokenizer, FACTS[0])]))
    assert db.generate_hits and all(h.fact_id == 0 for h in db.generate_hits)
    assert db.generate(FACTS[0].text, max_new_tokens=3) == text and db.generate_hits == []  # not asked
    assert db._gate.history is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sync_free_gate_gives_the_same_bits(arch: str, tokenizer) -> None:
    """The accelerator's path (dense residual block by id, fused gather-add, no nonzero) and the
    CPU's (open rows listed and gathered) give bit-identical layer outputs, also after a remove
    and an update change the table under the dense block."""
    model = make_model(arch, tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    ids = db.add(FACTS)
    enc = tokenizer([FACTS[0].text, UNRELATED[0], FACTS[1].text + " and more"], return_tensors="pt", padding=True)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        db.gate.sync_free = False
        listed = ffn_outputs(model, db.add_path, enc)
        db.gate.sync_free = True
        fused = ffn_outputs(model, db.add_path, enc)
        return listed, fused

    ffn_outputs(model, db.add_path, enc)
    db.gate.gamma = float(db.gate.last[0][db.gate.last_mask].median())  # some tokens open, some not
    for step in range(3):
        listed, fused = both()
        assert db.gate.last[2].any()
        assert torch.equal(listed.view(torch.int32), fused.view(torch.int32)), step
        if step == 0:
            db.remove(ids[:1])
        elif step == 1:
            db.table.put([ids[1]], torch.randn(1, db.d_res))  # as update() writes a new residual


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
    with pytest.raises(DatabaseError, match="residuals.safetensors: .*truncated"):
        NeuralDB.load(tmp_path / "db", model, tokenizer)
    (tmp_path / "db" / "index.safetensors").unlink()
    with pytest.raises(DatabaseError, match="index.safetensors: missing"):
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".db.neuraldb-lock", "db"]  # no temp dirs left behind
    db.detach()
    again = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert len(again) == 1


@pytest.mark.parametrize("record,message", [
    ({"subject": "X", "target_new": "Y"}, "field 'prompt' is missing"),
    ({"subject": "Paris", "prompt": "The capital of {} is", "target_new": ""}, "field 'target_new'"),
    ({"subject": "Paris", "prompt": "Berlin is the capital of", "target_new": "Y"}, "holds neither"),
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


@pytest.mark.parametrize("spec", ["torch", "Int8", "Proj4", "HNSW16", "torch,shards"])
def test_gated_layer_takes_any_index_spec(spec: str, tokenizer) -> None:
    """The same edits through another index spec open the same gates and give the same logits."""
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=3))
    ids = db.add(FACTS)
    key_ids, keys = db.index.export()
    assert key_ids.tolist() == ids
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


def test_every_metric_path_gates_as_inference(tokenizer) -> None:
    """The metrics run the decoder (`model.base_model`) and the LM head at scored positions; the
    gate must see the same mask there as in `model(...)` and `generate` (first real token and
    pads never gated). gamma = -1 opens every token that may be gated, so a missing or stale
    mask shows at once."""
    from neuraldb.engine.residuals import logits_at
    from neuraldb.engine.tokens import pad_right
    from neuraldb.evaluation import teacher_forced

    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    db.add(FACTS)
    db.gate.gamma = -1.0
    texts = [f.text for f in FACTS] + UNRELATED
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    ids, mask = pad_right(seqs, tokenizer.pad_token_id, torch.device("cpu"))  # as teacher_forced pads
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        open_full = db.gate.last[2].clone()
        model(input_ids=ids[:1, :2])  # a different shape in between: nothing may leak into the next call
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        open_metric = db.gate.last[2].clone()
    assert torch.equal(open_metric, open_full)
    assert not open_full[:, 0].any() and torch.equal(open_full[:, 1:], mask[:, 1:].bool())
    rows, pos = mask.nonzero(as_tuple=True)
    assert torch.equal(logits_at(model, hidden, rows, pos), full[rows, pos])
    # teacher_forced's NLL equals the NLL read off model(...) logits
    target = FACTS[0].target_new
    nll, _ = teacher_forced(model, tokenizer, [texts[0]], [target])
    tid = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    seq = torch.tensor([seqs[0] + tid[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
    want = -sum(float(lp[len(seqs[0]) - 1 + j, t]) for j, t in enumerate(tid)) / len(tid)
    assert nll[0] == pytest.approx(want, abs=1e-5)
    # generate's first step opens the same gates and sees the same logits as model(...); its LM head
    # runs on the last position alone, so BLAS may round the last bits differently
    one = torch.tensor([seqs[1]])
    with torch.no_grad(), db.record() as passes:
        gen = model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=1, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=one).logits[0, -1]
    assert passes[0] == db.hits() and len(passes[0]) == len(seqs[1]) - 1
    assert torch.allclose(gen.logits[0][0], ref, atol=1e-6, rtol=0)


def test_model_to_moves_the_database(tokenizer) -> None:
    """dtype: the gate works in bf16 and closed tokens match the unedited bf16 model bit for bit;
    device: `model.to(...)` carries the key index and residual table along."""
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=10, index="torch"))
    db.add(FACTS)
    model.to(torch.bfloat16)
    enc = tokenizer([UNRELATED[0], FACTS[0].text], return_tensors="pt", padding=True)
    with db.disabled():
        base = ffn_outputs(model, db.add_path, enc)
    out = ffn_outputs(model, db.add_path, enc)
    opened = db.gate.last[2]
    assert out.dtype == torch.bfloat16 and opened.any()
    assert torch.equal(out[~opened].view(torch.int16), base[~opened].view(torch.int16))
    model.to("meta")
    assert db.table.device.type == "meta" and db.index.device.type == "meta"
    assert all(t.device.type == "meta" for t in db.table.shards.values())


def test_residual_rows_never_train_position_zero(tokenizer) -> None:
    """A subject that is one token at the start of the prompt: its bare row would train the
    residual at position 0, where the gate never opens; it is left out, the KL prompt gets a
    prefix, and the reference norm is read at a prefixed row."""
    from neuraldb.engine.residuals import _build

    subject = next(w for w in ("Paris", "French", "Apple", "Berlin", "It") if len(tokenizer(w)["input_ids"]) == 1)
    fact = Fact(subject, "{} is the home of", "Toyota")
    contexts = ["", "Because of this. ", "I think. "]
    b = _build(tokenizer, [fact], contexts, CFG, torch.device("cpu"))
    assert (b.lookup > 0).all()
    assert len(b.ids) == 3  # two prefixed target rows + the (prefixed) KL row
    assert b.norm_row.tolist() == [0] and b.lookup[b.kl_row].item() > 0
    assert torch.allclose(b.tgt_weight.sum(), torch.tensor(1.0))
    later = Fact("Danielle Darrieux", "The mother tongue of {} is", "English")  # subject not at 0: all rows kept
    b2 = _build(tokenizer, [later], contexts, CFG, torch.device("cpu"))
    assert len(b2.ids) == 4 and b2.norm_row.tolist() == [1]


def test_kl_term_is_memit_direction() -> None:
    """MEMIT: kl_div(init, now, log_target=True) = KL(now || init)."""
    from neuraldb.engine.residuals import kl_now_init

    g = torch.Generator().manual_seed(0)
    init = torch.log_softmax(torch.randn(4, 11, generator=g), -1)
    now = torch.log_softmax(torch.randn(4, 11, generator=g), -1)
    want = torch.nn.functional.kl_div(init, now, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_now_init(init, now), want, atol=1e-6)
    reverse = (init.exp() * (init - now)).sum(-1)
    assert not torch.allclose(kl_now_init(init, now), reverse, atol=1e-3)


def test_proj_index_trains_on_the_models_own_text(tokenizer, tmp_path) -> None:
    """A `Proj` index gets a query sample on the first insert: the gate queries of text the
    model generates from the prefix seeds (seeded: a reload gets the same sample); answers stay
    those of exact search."""
    from neuraldb.engine.keys import calibration_queries

    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=3, index="Proj4"))
    assert db.index._queries is None
    ids = db.add(FACTS)
    with db.disabled():
        q = calibration_queries(model, tokenizer, db.layer, db.config)
    assert q.shape[0] >= 8 * 2 and q.shape[1] == db.d_key  # 8 texts, every token but the first
    assert torch.allclose(db.index._queries.cpu(), q / q.norm(dim=1, keepdim=True), atol=1e-6)  # the same draw
    probe = [f.text for f in FACTS] + UNRELATED
    want = logits(model, tokenizer, probe)
    want_open = db.gate.last[2].clone()
    queries, basis = db.index._queries.clone(), db.index._basis.clone()
    db.save(tmp_path / "db")
    db.detach()
    back = NeuralDB.load(tmp_path / "db", model, tokenizer)
    # the basis is read with the keys: no refit, and the query sample is not even made
    assert back.index.spec == "Proj4" and back.index._queries is None and torch.equal(back.index._basis, basis)
    got = logits(model, tokenizer, probe)
    assert torch.equal(back.gate.last[2], want_open) and torch.allclose(got, want, atol=1e-5)
    stored = back._calibration()  # from the token ids saved in config.yaml: the same sample, no sampling
    assert torch.allclose(stored / stored.norm(dim=1, keepdim=True), queries, atol=1e-6)
    assert ids == sorted(back.facts)
    flat = NeuralDB(make_model("llama", tokenizer), tokenizer, CFG.replace(steps=3, index="Flat"))
    assert flat.train_index() is False  # Flat takes no training


def test_auto_index_switches_inside_a_database(tokenizer, tmp_path) -> None:
    """`Auto{n}`: `Flat` below n facts, `Proj` from n on, fitted to the model's own text only
    when the switch comes; gate decisions equal a `Flat` database's, before and after a reload."""
    model = make_model("llama", tokenizer)
    probe = [f.text for f in FACTS] + UNRELATED
    flat = NeuralDB(model, tokenizer, CFG.replace(steps=3, index="Flat"))
    flat.add(FACTS)
    logits(model, tokenizer, probe)
    want_open, want_ids = flat.gate.last[2].clone(), flat.gate.last[1].clone()
    flat.detach()
    db = NeuralDB(model, tokenizer, CFG.replace(steps=3, index="Auto3"))
    db.add(FACTS[:2])
    assert db.index.inner.spec == "Flat" and not isinstance(db.index._queries, torch.Tensor)  # not made yet
    db.add(FACTS[2:])
    assert db.index.inner.spec == f"Proj{db.d_key // 3}" and isinstance(db.index.inner._queries, torch.Tensor)
    logits(model, tokenizer, probe)
    assert torch.equal(db.gate.last[2], want_open)
    assert torch.equal(db.gate.last[1][want_open], want_ids[want_open])
    db.save(tmp_path / "db")
    db.detach()
    back = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert back.index.spec == "Auto3" and back.index.inner.spec == f"Proj{back.d_key // 3}"
    logits(model, tokenizer, probe)
    assert torch.equal(back.gate.last[2], want_open)
