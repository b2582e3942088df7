"""The gate's space with context (FFN input + summed attention output), and facts about one
subject sharing one jointly optimised residual; on tiny random models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuraldb import EditConfig, Fact, NeuralDB
from neuraldb.bench.gate import Design, derive, verifier, wide_space
from neuraldb.engine.keys import compute_keys
from neuraldb.engine.residuals import compute_residuals
from neuraldb.engine.space import Capture, key_space
from neuraldb.engine.tokens import encode_with_subject

from conftest import make_model
from test_engine import CFG, FACTS, UNRELATED, ffn_outputs, logits

CTX = CFG.replace(gate_context=2, gamma=0.6)


def test_context_keys_are_unit_cosine_mixtures(arch: str, tokenizer) -> None:
    """A key's cosine with a query in the context space is (1 - w) cos_ffn + w cos_context, and
    the bench's one-pass derivation gives the engine's own keys."""
    model = make_model(arch, tokenizer)
    db = NeuralDB(model, tokenizer, CTX, attach=False)
    assert db.d_key == db.space.d_ffn + db.space.d_ctx and len(db.space.attn_paths) == 2
    keys = db.encode_keys(FACTS)  # (F, d_ffn + d_model)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(len(FACTS)), atol=1e-5)
    plain = compute_keys(model, tokenizer, FACTS, db.layer, db.ensure_prefixes(), CTX)  # FFN only: MEMIT's key
    f = plain / plain.norm(dim=-1, keepdim=True)
    w = CTX.gate_context_weight
    assert torch.allclose(keys[:, : db.space.d_ffn], f * w**0.5, atol=1e-5)
    wide = wide_space(model, db.layer)
    raw = compute_keys(model, tokenizer, FACTS, db.layer, db.ensure_prefixes(), CTX, space=wide)
    assert torch.allclose(derive(wide, Design.parse("ffn+ctx2"), raw, None), keys, atol=1e-5)
    assert torch.allclose(derive(wide, Design.parse("ffn"), raw, None), f, atol=1e-5)
    # `cat`: each block's output unit, side by side: the cosine is (1 - w) cos_ffn + w * the blocks' mean cosine
    L = len(wide.attn_paths)
    blocks = raw[:, wide.d_ffn :].view(len(FACTS), L, wide.d_ctx)[:, L - 2 :]  # (F, 2, d_model)
    blocks = blocks / blocks.norm(dim=-1, keepdim=True)
    mean_cos = torch.einsum("icd,jcd->ij", blocks, blocks) / 2  # (F, F)
    cat = derive(wide, Design.parse("ffn+cat2"), raw, None)
    assert torch.allclose(cat @ cat.T, (1 - w) * f @ f.T + w * mean_cos, atol=1e-5)
    d = Design.parse("ffn+ctx2,verify=cat2@0.4")
    assert d.verify == ("cat", 2, (0.4,)) and d.context == 2 and d.mode == "ctx"
    assert len(Design.parse("ffn+ctx2,verify=lo1@*").verify[2]) > 10  # a sweep of gamma_v
    h = Design.parse("ffn+ctx2,white,map=m1,verify=head-key@0.7")  # every field lands in its own slot
    assert (h.head, h.learn, h.white, h.bank, h.gate_map, h.verify) == (True, False, True, False, "m1", ("key", 0, (0.7,)))
    assert not Design.parse("ffn,learn").head and Design.parse("ffn,learn").learn
    with pytest.raises(SystemExit, match="head-key"):
        Design.parse("ffn,verify=key@0.7")
    v = verifier(wide, d, raw)
    assert torch.allclose(v @ v.T, mean_cos, atol=1e-5)


def test_context_gate_opens_on_its_fact_and_is_exact_elsewhere(arch: str, tokenizer) -> None:
    """With context keys: the edited prompt's subject token opens its own fact's gate, the
    layer output is bit-identical wherever the gate stays closed, and detaching removes every
    hook (the context hooks too)."""
    model = make_model(arch, tokenizer)
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    db = NeuralDB(model, tokenizer, CTX.replace(steps=2, n_prefixes=0, residual_prefixes=0))
    ids = db.add(FACTS)
    enc = tokenizer([FACTS[0].text, UNRELATED[0]], return_tensors="pt", padding=True)
    out = ffn_outputs(model, db.add_path, enc)
    sims, hit, open_ = db.gate.last
    with db.disabled():
        base = ffn_outputs(model, db.add_path, enc)
    last = encode_with_subject(tokenizer, "", FACTS[0].prompt, FACTS[0].subject).subject_last
    assert bool(open_[0, last]) and int(hit[0, last]) == ids[0]  # bare keys: the query there is the key
    assert torch.equal(out[~open_], base[~open_])
    assert not torch.equal(out[open_], base[open_])
    db.detach()
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks


def test_context_query_equals_the_bare_key(tokenizer) -> None:
    """Keys of bare prompts only (no prefixes): the gate's query at the subject's last token of
    the fact's own prompt is that fact's key, so its cosine is 1."""
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CTX.replace(n_prefixes=0, residual_prefixes=0, steps=1))
    db.add(FACTS[:1])
    with torch.no_grad():
        model(**tokenizer([FACTS[0].text], return_tensors="pt"))
    sims, _, open_ = db.gate.last
    assert float(sims[0].max()) == pytest.approx(1.0, abs=1e-5)


def test_context_database_saves_and_loads(tokenizer, tmp_path: Path) -> None:
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CTX.replace(steps=2))
    db.add(FACTS)
    want = logits(model, tokenizer, [f.text for f in FACTS])
    db.save(tmp_path / "db")
    db.detach()
    back = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert back.config.gate_context == 2 and back.d_key == db.d_key
    assert torch.equal(logits(model, tokenizer, [f.text for f in FACTS]), want)


def test_capture_records_what_the_gate_queries(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    space = key_space(model, 1, CTX)
    enc = tokenizer(["The capital of France is Paris."], return_tensors="pt")
    with Capture(model, space) as cap, torch.no_grad():
        model(**enc)
    db = NeuralDB(model, tokenizer, CTX.replace(steps=1))
    db.add(FACTS[:1])
    with torch.no_grad():
        model(**enc)
    q = space.combine(cap.raw.reshape(-1, space.d_raw))  # (T, dim)
    k = db.index.export()[1]  # (1, dim) unit
    gated = db.gate.last_mask.reshape(-1)  # every token but the first (an attention sink, never searched)
    assert not bool(gated[0]) and bool(gated[1:].all())
    assert torch.allclose(db.gate.last[0].reshape(-1)[gated].float(), (q @ k.T)[gated, 0], atol=1e-5)


# ----- facts about one subject ---------------------------------------------------------------
S = "Danielle Darrieux"
SAME = [Fact(S, "The mother tongue of {}", "Japanese", "French", id="s0"),
        Fact(S, "{} was born in", "Berlin", "Paris", id="s1"),
        Fact(S, "{} plays the", "guitar", "piano", id="s2"),
        Fact(S, "The capital where {}", "Rome", "Paris", id="s3"),
        Fact(S, "{} is a citizen of", "Germany", "France", id="s4")]


def rows_of(db: NeuralDB, ids: list[int]) -> torch.Tensor:
    return db.table.gather(torch.tensor(ids))  # (n, d_res)


def joint(db: NeuralDB, facts: list[Fact]) -> torch.Tensor:
    """The residual of `facts` optimised together, as one group, from scratch (unedited model)."""
    with db.disabled():
        return compute_residuals(db.model, db.tok, facts, db.layer, db.ensure_prefixes(), db.config,
                                 groups=[0] * len(facts))[0]


def test_facts_about_one_subject_share_a_joint_residual(tokenizer) -> None:
    """Five facts about one subject: every row holds the same residual, the one optimised over
    all five together; updating one re-optimises it over the new five, removing one over the
    other four; a fact about another subject keeps its own residual throughout."""
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=3))
    ids = db.add(SAME[:3])
    ids += db.add(SAME[3:] + FACTS[1:2])  # two more about S, one about another subject
    other = rows_of(db, [ids[-1]])
    rows = rows_of(db, ids[:5])  # (5, d)
    assert all(torch.equal(rows[0], r) for r in rows[1:])
    assert torch.allclose(rows[0], joint(db, SAME)[0], atol=1e-5)
    assert db.same_subject([S]) == ids[:5]

    new = Fact(S, "{} was born in", "Rome", "Paris", id="s1b")
    db.update(ids[1], new)
    now = SAME[:1] + [new] + SAME[2:]
    assert torch.allclose(rows_of(db, [ids[3]])[0], joint(db, now)[0], atol=1e-5)
    db.remove(ids[2])
    left = [now[i] for i in (0, 1, 3, 4)]
    for i in (0, 1, 3, 4):
        assert torch.allclose(rows_of(db, [ids[i]])[0], joint(db, left)[0], atol=1e-5)
    assert torch.equal(rows_of(db, [ids[-1]]), other)
    assert db.same_subject([S]) == [ids[i] for i in (0, 1, 3, 4)]


def test_a_group_of_one_is_the_independent_residual(tokenizer) -> None:
    """Facts with distinct subjects: grouping changes no bit of any residual."""
    model = make_model("llama", tokenizer)
    on = NeuralDB(model, tokenizer, CFG.replace(steps=3), attach=False)
    off = NeuralDB(model, tokenizer, CFG.replace(steps=3, subject_groups=False), attach=False)
    assert torch.equal(on.encode_residuals(FACTS), off.encode_residuals(FACTS))


def test_subject_groups_survive_save_and_load(tokenizer, tmp_path: Path) -> None:
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    ids = db.add(SAME[:3])
    db.save(tmp_path / "db")
    db.detach()
    back = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert back.same_subject([S]) == ids
    back.remove(ids[0])  # the other two are re-optimised together
    assert torch.allclose(rows_of(back, [ids[1]])[0], joint(back, SAME[1:3])[0], atol=1e-5)


def test_state_round_trip_needs_no_files(tokenizer) -> None:
    """`from_state(state())` gives the same database on the same model (the seam persistence uses)."""
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    db.add(FACTS)
    want = logits(model, tokenizer, [f.text for f in FACTS])
    state = db.state()
    db.detach()
    back = NeuralDB.from_state(model, tokenizer, state)
    assert torch.equal(logits(model, tokenizer, [f.text for f in FACTS]), want)
    assert back.facts == db.facts and back.next_id == db.next_id


def test_gate_context_config_is_checked(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    with pytest.raises(ValueError, match="gate_context"):
        NeuralDB(model, tokenizer, CFG.replace(gate_context=3), attach=False)  # layer 1 has 2 blocks at or below
    with pytest.raises(ValueError, match="gate_context_weight"):
        EditConfig(gate_context_weight=1.0)


def test_head_check_reads_the_subjects_first_token(tokenizer, tmp_path: Path) -> None:
    """bench/gate.py's HeadCheck: each winner gets its own head key (also when many are filled
    in one chunk, and after reloading the cache); a prompt's own head compares at cosine ~1 in
    the FFN space where the prompt is a key context, and a head at or before the first token
    passes unseen (+inf)."""
    from neuraldb.bench.gate import HeadCheck, prompt_context

    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CTX.replace(n_prefixes=0, residual_prefixes=0), attach=False)
    wide = wide_space(model, db.layer)
    facts = [Fact("Danielle Darrieux", "The mother tongue of {} is", "English"),
             Fact("Toko Yasuda", "Everyone knows that {} plays the", "piano"),
             Fact("Michel Rocard", "Where is {} from? It is", "Rome")]
    ctx = prompt_context(db, wide, [(f, f.prompt) for f in facts])
    space = lambda x: verifier(wide, Design.parse("ffn,verify=ffn@0.5"), x)  # noqa: E731
    ids = torch.arange(len(facts))
    heads = HeadCheck(db, wide, facts, tmp_path, chunk=8)
    cos = heads.cosines(ids, ctx, space)
    assert len(set(heads.rows.values())) == len(facts)
    assert torch.allclose(cos, torch.ones(3), atol=1e-4), cos  # the bare prompt is the one key context
    wrong = heads.cosines(ids.roll(1), ctx, space)  # another fact's head key at this prompt's head
    assert (wrong < 0.999).all()
    again = HeadCheck(db, wide, facts, tmp_path, chunk=8).cosines(ids, ctx, space)
    assert torch.allclose(again, cos, atol=1e-2)  # the cache holds half precision
    lone = prompt_context(db, wide, [(facts[0], "{} speaks")])  # the subject opens the sequence
    assert HeadCheck(db, wide, facts, tmp_path, chunk=8).cosines(ids[:1], lone, space).isinf().all()


def test_a_stacked_capture_splits_into_each_contexts_space(tokenizer) -> None:
    """One capture of every context block serves each gate_context: its split gives the raw
    activations the space of that context records itself, and its width is its `dim`."""
    from neuraldb.engine.space import stacked_space

    model = make_model("llama", tokenizer)
    stacked = stacked_space(model, 2, 2)
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with Capture(model, stacked) as cap:
        model(input_ids=ids)
    raw = cap.raw  # (1, T, d_raw)
    assert stacked.dim == stacked.d_raw == raw.shape[-1] == stacked.combine(raw).shape[-1]
    for c in (0, 1, 2):
        space = key_space(model, 2, CFG.replace(layer=2, gate_context=c))
        with Capture(model, space) as one:
            model(input_ids=ids)
        assert torch.allclose(stacked.split(raw, c), one.raw, atol=1e-5)
        assert space.combine(stacked.split(raw, c)).shape[-1] == space.dim
