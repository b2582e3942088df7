"""The real default model: SmolLM2-135M-Instruct edits 10 CounterFact facts (slow, in CI)."""
from __future__ import annotations

from pathlib import Path

import pytest
from neuraldb import Fact, NeuralDB, load_facts, load_model
from neuraldb.data import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_ten_counterfact_edits(smol) -> None:
    path = resolve("counterfact").path  # the shared set, else the bundled sample (same first cases)
    model, tok = smol
    facts = load_facts(path, limit=10)
    unrelated = [f.neighborhood[0] for f in facts] + ["The capital of France is", "Water boils at a temperature of"]
    db = NeuralDB(model, tok)
    with db.disabled():
        before = [db.generate(p, 8) for p in unrelated]
    db.add(facts)
    answers = [db.generate(f.text, 6) for f in facts]
    hits = sum(a.strip().startswith(f.target_new) for a, f in zip(answers, facts))
    assert hits >= 9, list(zip(answers, [f.target_new for f in facts]))
    after = [db.generate(p, 8) for p in unrelated]
    assert after == before
    db.detach()


def test_compare_bench_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    """bench/compare.py on SmolLM2 at toy size: every method edits, scores and (for the weight
    editors) restores the original weights, which the bench checks bit for bit."""
    if not (data_dir / "counterfact" / "counterfact-edit.json").is_file():
        pytest.skip("CounterFact not found (set NEURALDB_DATA to the shared data directory)")
    from neuraldb.bench import compare

    cfg = tmp_path / "linear.yaml"
    # C must be full rank (d_ff = 1536: 3,000 tokens) for MEMIT's solve; a small lambda, because
    # the authors' 15,000 leaves MEMIT's edit of 4 facts too weak to show (the full run keeps it)
    cfg.write_text("mom2_tokens: 3000\nmom2_update_weight: 0.01\n")
    res = compare.main(["--facts", "4,8", "--eval-sample", "4", "--fluency-sample", "1", "--fluency-tokens", "4",
                        "--retention-texts", "2", "--batch", "4", "--chunk", "4", "--config", str(cfg),
                        "--out", str(tmp_path / "out")])
    rows = {(r["method"], r["facts"]): r for r in res["rows"]}
    assert sorted(rows) == sorted((m, n) for m in ("neuraldb", "memit", "alphaedit") for n in (4, 8))
    before = res["unedited"]["efficacy"]
    assert all(r["efficacy"] > before for r in rows.values()), (before, {k: r["efficacy"] for k, r in rows.items()})
    assert (tmp_path / "out" / "compare.json").is_file(), res.get("plot")
    assert res["layers"] == [2, 3, 4, 5, 6], res["layers"]


S = "Danielle Darrieux"
SUBJECT_FACTS = [Fact(S, "The mother tongue of {} is", "English", "French"),
                 Fact(S, "{} was born in", "Tokyo", "Paris"),
                 Fact(S, "{} plays the", "violin", "piano"),
                 Fact(S, "{} is a citizen of", "Canada", "France"),
                 Fact(S, "The occupation of {} is", "lawyer", "actress")]


def test_five_facts_about_one_subject(smol) -> None:
    """Five relations of one subject, three of whose prompts start with it (so their keys are
    the same vector): every one edits, and after replacing one and removing another the
    others still answer with their new objects. Without subject groups only one of the three
    same-key facts can win (measured: 3 of 5 edit)."""
    model, tok = smol
    db = NeuralDB(model, tok)

    def edited(facts: list[Fact]) -> list[str]:
        return [f.text for f in facts if not db.generate(f.text, 4).strip().startswith(f.target_new)]

    ids = db.add(SUBJECT_FACTS)
    assert edited(SUBJECT_FACTS) == []
    new = Fact(S, "{} was born in", "Berlin", "Paris")
    db.update(ids[1], new)
    now = [SUBJECT_FACTS[0], new, *SUBJECT_FACTS[2:]]
    assert edited(now) == []
    db.remove(ids[2])
    assert edited([now[i] for i in (0, 1, 3, 4)]) == []
    with db.disabled():
        assert not db.generate(SUBJECT_FACTS[2].text, 4).strip().startswith("violin")
    assert not db.generate(SUBJECT_FACTS[2].text, 4).strip().startswith("violin")  # removed: unedited again
    db.detach()


def test_server_edits_smollm2_over_http(tmp_path: Path) -> None:
    """`neuraldb serve` on the real model: a fact posted over HTTP is the next greedy answer (the
    openai client, completions and a chat stream), DELETE gives the old answer back, and after a
    SIGKILL the acknowledged fact is still served."""
    import httpx
    import openai

    from neuraldb.serve.process import ServerProcess

    facts = load_facts(resolve("counterfact").path, limit=2)
    s = ServerProcess(tmp_path / "db", "smollm2-135m", threads=None).start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = lambda f: c.completions.create(model="smollm2-135m", prompt=f.text, max_tokens=6,  # noqa: E731
                                             temperature=0).choices[0].text
        before = [ask(f) for f in facts]
        r = httpx.post(s.url + "/v1/facts", json=[f.to_json() for f in facts], timeout=300)
        assert r.status_code == 200, r.text
        ids = [d["id"] for d in r.json()["data"]]
        after = [ask(f) for f in facts]
        assert all(a.strip().startswith(f.target_new) for a, f in zip(after, facts)), (after, before)
        chunks = c.chat.completions.create(model="smollm2-135m", stream=True, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": facts[0].text}])
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert httpx.delete(f"{s.url}/v1/facts/{ids[1]}", timeout=300).status_code == 200
        assert ask(facts[1]) == before[1]
        s.kill()
        s = ServerProcess(tmp_path / "db", None, threads=None).start()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert ask(facts[0]) == after[0] and ask(facts[1]) == before[1]
        assert httpx.get(s.url + "/health").json()["replayed"] == 2
    finally:
        s.kill()


def test_the_shipped_gate_map_serves_the_hand_fitted_profile(smol, tmp_path: Path) -> None:
    """The hand-fitted profile (shipped as the default until session 33, kept in bench/profiles/)
    names the shipped map; it matches the model's space, a database saved with it holds a copy
    and answers as before after a reload."""
    from importlib import resources

    from neuraldb.engine.gate_map import maps
    from neuraldb.engine.profile import load_config

    model, tok = smol
    hand = resources.files("neuraldb.bench").joinpath("profiles/smollm2-135m-hand.yaml")
    db = NeuralDB(model, tok, load_config(str(hand)))
    assert db.config.gate_map in maps() and db.gate_map is not None
    want = db.map_meta()
    assert {k: db.gate_map.meta[k] for k in want} == want
    db.add(SUBJECT_FACTS[:2])
    answers = [db.generate(f.text, 4) for f in SUBJECT_FACTS[:2]]
    assert all(a.strip().startswith(f.target_new) for a, f in zip(answers, SUBJECT_FACTS[:2])), answers
    db.save(tmp_path / "db")
    db.detach()
    assert (tmp_path / "db" / "gate_map.safetensors").is_file()
    back = NeuralDB.load(tmp_path / "db", model, tok)
    assert [back.generate(f.text, 4) for f in SUBJECT_FACTS[:2]] == answers
    back.detach()
