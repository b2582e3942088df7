"""Metric functions on hand-computed cases, the synthetic generator, and a smoke run of
bench/scale.py on a tiny model that checks every field of its JSON."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from neuraldb import Fact
from neuraldb.evaluation import counterfact_scores, ngram_entropy, teacher_forced, zsre_scores
from neuraldb.evaluation.metrics import _mean_per_record
from neuraldb.evaluation.synthetic import RELATIONS, subject_name, synthetic_facts

from conftest import make_model


def test_ngram_entropy_by_hand() -> None:
    # "a b a b": bigrams ab, ba, ab -> p = (2/3, 1/3); trigrams aba, bab -> p = (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx(np.mean([2 / 3 * h2, 4 / 3 * h3]))
    assert ngram_entropy("word") == 0.0


def test_mean_per_record_averages_records_first() -> None:
    # record 0 has scores (1, 0) -> 0.5; record 1 has (1) -> 1.0; mean 0.75 (not 2/3)
    assert _mean_per_record(np.array([1.0, 0.0, 1.0]), [0, 0, 1], 2) == pytest.approx(75.0)


class _Fixed(torch.nn.Module):
    """A 'model' whose next-token distribution is a fixed table: logits[t] depend on token t."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = type("C", (), {"final_logit_softcapping": None})()
        self.base_model = self

    def forward(self, input_ids: torch.Tensor, **_: object) -> tuple[torch.Tensor]:
        return (torch.nn.functional.one_hot(input_ids, self.table.shape[0]).float(),)

    def get_output_embeddings(self):
        table = self.table
        return lambda h: h @ table


class _Tok:
    pad_token_id = 0
    vocab = {"<pad>": 0, "q": 1, " A": 2, " B": 3, " C": 4}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.vocab[w] for w in re.findall(r" ?\S+", text)]}


def test_teacher_forced_by_hand() -> None:
    # after "q": p(A)=0.7, p(B)=0.2, p(C)=0.1 ; after " A": p(B)=0.9
    probs = torch.full((5, 5), 1e-9)
    probs[1, 2], probs[1, 3], probs[1, 4] = 0.7, 0.2, 0.1
    probs[2, 3], probs[2, 2] = 0.9, 0.1
    model, tok = _Fixed(probs.log()), _Tok()
    nll, acc = teacher_forced(model, tok, ["q", "q"], ["A B", "C"])
    assert nll[0] == pytest.approx((-math.log(0.7) - math.log(0.9)) / 2, rel=1e-4)
    assert nll[1] == pytest.approx(-math.log(0.1), rel=1e-4)
    assert acc == [1.0, 0.0]
    f = Fact("q", "{}", "A", "C", neighborhood=("q",), locality_target="C", paraphrases=("q",))
    s = counterfact_scores(model, tok, [f])
    assert (s.efficacy, s.generalization, s.specificity) == (100.0, 100.0, 0.0)
    z = zsre_scores(model, tok, [Fact("q", "{}", "C", "A", neighborhood=("q",), locality_target="A")])
    assert (z.efficacy, z.specificity) == (0.0, 100.0)
    # greedy decoding from "q" emits A then B: "A B" and "A" are its answer, "A C" and "B" are
    # not (though the NLL comparison prefers "B" to "C")
    for new, greedy in (("A B", 100.0), ("A", 100.0), ("A C", 0.0), ("B", 0.0)):
        g = counterfact_scores(model, tok, [Fact("q", "{}", new, "C", paraphrases=("q",))])
        assert (g.greedy_efficacy, g.greedy_generalization) == (greedy, greedy)
    assert counterfact_scores(model, tok, [Fact("q", "{}", "B", "C")]).efficacy == 100.0
    assert zsre_scores(model, tok, [Fact("q", "{}", "A B", None)]).greedy_efficacy == 100.0


def test_specificity_split_counts_opens_on_an_edited_neighbour_apart(tokenizer) -> None:
    """A neighbourhood prompt that names another edited fact's subject, and whose gate opens on
    that fact, is the edit working (opened_edited); `specificity_clean` scores the rest, and
    `specificity_clean_unedited` the unedited model on the same rest."""
    import dataclasses

    from neuraldb import EditConfig, NeuralDB
    from neuraldb.evaluation.attribution import gate_attribution, names

    assert names("Elvis Presley's profession is", "Elvis Presley") and not names("Arnold is", "Arno")
    facts = list(synthetic_facts(6, seed=4))
    facts[0] = dataclasses.replace(facts[0], neighborhood=(facts[1].text,))  # names an edited subject
    facts[2] = dataclasses.replace(facts[2], neighborhood=("zq xv wk",))  # names none
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, EditConfig(layer=1, n_prefixes=1, prefix_len=3, residual_prefixes=1, gamma=0.9))
    db.insert(list(range(6)), facts, db.encode_keys(facts), None)  # keys only: gates decide, nothing is added
    scores = counterfact_scores(model, tokenizer, [facts[0], facts[2]])
    with db.disabled():
        unedited = {k: v[2] for k, v in counterfact_scores(model, tokenizer, [facts[0], facts[2]]).outcomes.items()}
    res = gate_attribution(db, scores.outcomes, {f.id: i for i, f in enumerate(facts)}, unedited)
    with torch.no_grad(), db.record() as passes:
        model(**tokenizer([facts[1].text], return_tensors="pt"))
    assert 1 in {h.fact_id for h in passes[0]}  # fact 1's own text opens fact 1
    assert res["specificity_opened_edited"] == 50
    ok = scores.outcomes["specificity"][2]
    assert res["specificity_clean"] == 100 * ok[1] and res["specificity_clean_unedited"] == 100 * unedited["specificity"][1]


def test_gate_attribution_matches_the_gate(tokenizer) -> None:
    """Each prompt's category is what model(...) on that prompt alone opens; the failure split
    adds up to the metric's failures."""
    from neuraldb import EditConfig, NeuralDB
    from neuraldb.evaluation.attribution import gate_attribution

    facts = list(synthetic_facts(10, seed=2))
    for gamma in (-1.0, 0.5, 1.0):
        model = make_model("llama", tokenizer)
        db = NeuralDB(model, tokenizer, EditConfig(layer=1, n_prefixes=1, prefix_len=3,
                                                                 residual_prefixes=1, gamma=gamma))
        db.insert(list(range(10)), facts, db.encode_keys(facts), None)  # keys only: gates decide, nothing is added
        scores = counterfact_scores(model, tokenizer, facts[:6])
        res = gate_attribution(db, scores.outcomes, {f.id: i for i, f in enumerate(facts)})
        want = {"own": 0, "other": 0, "closed": 0}
        for i, f in enumerate(facts[:6]):
            with torch.no_grad(), db.record() as passes:
                model(**tokenizer([f.text], return_tensors="pt"))
            opened = {h.fact_id for h in passes[0]}
            want["own" if i in opened else "other" if opened else "closed"] += 1
        assert {c: res[f"efficacy_{c}"] for c in want} == {c: 100 * n / 6 for c, n in want.items()}
        for kind, cats in (("efficacy", ("own", "other", "closed")), ("specificity", ("opened", "closed"))):
            assert sum(res[f"{kind}_{c}"] for c in cats) == pytest.approx(100)
            failed = 100 - 100 * float(np.mean(scores.outcomes[kind][2]))
            assert sum(res[f"{kind}_fail_{c}"] for c in cats) == pytest.approx(failed)
        if gamma == 1.0:
            assert res["efficacy_closed"] == res["specificity_closed"] == 100
        if gamma < -0.5:
            assert res["specificity_opened"] == 100 and res["efficacy_closed"] == 0


def test_synthetic_is_deterministic_and_valid() -> None:
    a, b = list(synthetic_facts(300, seed=3)), list(synthetic_facts(300, seed=3))
    assert a == b and a != list(synthetic_facts(300, seed=4))
    assert len({f.subject for f in a}) == 300
    for f in a:
        assert f.subject in f.text and f.target_new != f.target_true
        assert all(f.subject in p for p in f.paraphrases) and len(f.paraphrases) >= 2
        assert all(f.subject not in p for p in f.neighborhood)
        assert f.target_new in RELATIONS[f.meta["relation"]][2]
    assert len({subject_name(i, 0) for i in range(50000)}) == 50000


def test_scale_smoke(tokenizer, tmp_path: Path) -> None:
    from neuraldb.bench import scale

    model_dir = tmp_path / "tiny"
    make_model("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("layer: 1\nn_prefixes: 1\nprefix_len: 3\nresidual_prefixes: 1\nsteps: 3\n")
    argv = ["--model", str(model_dir), "--data", "synthetic", "--facts", "6", "--chunk", "4", "--checkpoints",
            "3,6", "--eval-sample", "3", "--retention-texts", "4", "--fluency-tokens", "4", "--latency-repeats",
            "2", "--latency-batch", "2", "--config", str(cfg), "--out", str(tmp_path / "out"), "--profile"]
    scale.main(argv)
    res = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert [r["m"] for r in res["rows"]] == [3, 6]
    for r in res["rows"]:
        for k in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= r[k] <= 100.0
        assert 0.0 <= r["false_open"] <= 1.0 and 0.0 <= r["identical"] <= 1.0 and r["kl"] >= 0
        assert r["key_bytes"] > 0 and r["residual_bytes"] > 0 and r["bytes_per_fact"] > 0
        assert r["keys_per_s"] > 0 and r["residuals_per_s"] > 0 and r["peak_rss_gib"] > 0
        for phase in ("prefill", "decode"):
            assert r[f"{phase}_lookup_ms_median"] > 0 and r[f"{phase}_lookup_ms_p95"] >= r[f"{phase}_lookup_ms_median"]
            assert 0 < r[f"{phase}_lookup_share"] < 1
    assert res["machine"]["torch"] and res["pre"]["efficacy"] >= 0 and res["data"]["eval_sample"] == 3
    assert (tmp_path / "out" / "scale.md").read_text().count("\n") >= 4
    assert (tmp_path / "out" / "trace.json").is_file()
    # resumable: a second run reuses every cached chunk and agrees on the edits
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "out" / "cache").glob("*.safetensors"))
    scale.main(argv)
    after = sorted(p.stat().st_mtime_ns for p in (tmp_path / "out" / "cache").glob("*.safetensors"))
    assert before == after


def test_lazy_residuals_equal_eager(tokenizer, tmp_path: Path, data_dir: Path) -> None:
    """Keys for every fact and residuals only where a gate opens give the same logits, bit for
    bit, as the database with every residual (the rest computed afterwards into the same cache:
    a residual is computed once); and bench/scale.py's metrics agree both ways."""
    import torch

    from neuraldb import EditConfig, NeuralDB
    from neuraldb.bench import scale
    from neuraldb.evaluation.lazy import until_no_new_facts
    from neuraldb.evaluation.synthetic import synthetic_facts

    cfg = EditConfig(layer=1, n_prefixes=1, prefix_len=3, residual_prefixes=1, steps=3, gamma=0.9)
    facts = list(synthetic_facts(12, seed=0))
    probe = [facts[1].text, facts[7].text, facts[7].paraphrases[0], "Where is it? Who made it?"]
    enc = tokenizer(probe, return_tensors="pt", padding=True)
    cache = scale.ChunkCache(tmp_path / "cache", 3, {"test": 1})
    logits, computed = {}, {}
    for lazy in (True, False):  # lazily first: eagerly, every residual is computed
        model = make_model("llama", tokenizer)
        db = NeuralDB(model, tokenizer, cfg)
        cache.fill_keys(db, facts)
        db.insert(list(range(len(facts))), facts, cache.keys(0, len(facts)), None)
        resid = scale.Residuals(db, cache, facts)
        run = lambda: model(**enc).logits  # noqa: E731
        with torch.no_grad():
            if lazy:
                logits[lazy] = until_no_new_facts(db, run, resid.load)
            else:
                resid.load(set(range(len(facts))))
                logits[lazy] = run()
        computed[lazy] = cache.computed()
    assert torch.equal(logits[True], logits[False])
    assert 1 <= computed[True] < len(facts) and computed[False] == len(facts)  # lazily, not every fact was needed
    short = scale.ChunkCache(tmp_path / "short", 3, {"test": 1}, key_size=4)  # 5 facts: chunk 1 holds one key
    short.fill_keys(db, facts[:5])
    with pytest.raises(SystemExit, match="1 keys where 4 are needed"):
        short.keys(0, 8)
    short.fill_keys(db, facts[:8])  # a longer run completes the short chunk
    assert torch.allclose(short.keys(0, 8), cache.keys(0, 8), atol=1e-5)  # other batches: last bits differ
    with pytest.raises(KeyError, match="no cached residual"):
        scale.ChunkCache(tmp_path / "cache-empty", 3, {"test": 1}).residuals([0])
    again = scale.ChunkCache(tmp_path / "cache", 3, {"test": 1})  # reopened: every residual found again
    assert again.computed() == len(facts) and torch.equal(again.residual_rows(0, 12), cache.residual_rows(0, 12))
    with pytest.raises(SystemExit, match="other settings"):
        scale.ChunkCache(tmp_path / "cache", 3, {"test": 2})
    # a key cache written when nll_stop still counted as a key setting serves the same keys now
    assert scale.same_settings({"config": {"layer": 1, "nll_stop": None}, "seed": 0}, {"config": {"layer": 1}, "seed": 0})
    assert not scale.same_settings({"config": {"layer": 2, "nll_stop": None}}, {"config": {"layer": 1}})
    # a residual-only field added later names a new recipe only away from its old behaviour
    from neuraldb.engine.config import to_mapping
    plain = scale.residual_recipe(to_mapping(EditConfig()), 64)
    assert not set(scale.ADDED_LATER) & set(plain["config"])  # fields added later stay out at their neutral value
    assert set(plain["config"]) == set(scale.RESIDUAL_ONLY) - set(scale.ADDED_LATER)
    assert scale.residual_recipe(to_mapping(EditConfig(residual_warmup=2)), 64)["config"]["residual_warmup"] == 2
    assert scale.residual_recipe(to_mapping(EditConfig(residual_stream="flat")), 64)["config"]["residual_stream"] == "flat"

    model_dir = tmp_path / "tiny"
    make_model("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "cfg.yaml").write_text("layer: 1\nn_prefixes: 1\nprefix_len: 3\nresidual_prefixes: 1\nsteps: 3\n"
                                       "gamma: 0.9\n")
    rows = {}
    wiki = ["--retention-data", "wikitext"] if (data_dir / "wikitext" / "wiki.test.raw").is_file() else []
    out = tmp_path / "out"
    for mode in ("on", "off"):  # one cache: the eager run computes only the residuals the lazy one did not
        for kept in (out / "cache").rglob("row_*.json"):  # under the recipe's folder
            kept.unlink()  # a finished checkpoint's row would be reused
        scale.main(["--model", str(model_dir), "--data", "synthetic", "--facts", "12", "--chunk", "3",
                    "--checkpoints", "5,12", "--eval-sample", "3", "--retention-texts", "4", "--fluency-tokens", "6",
                    "--latency-repeats", "1", "--latency-batch", "2", "--config", str(tmp_path / "cfg.yaml"),
                    "--lazy-residuals", mode, "--out", str(out), *wiki])
        rows[mode] = json.loads((out / "scale.json").read_text())["rows"]
    metrics = ("efficacy", "generalization", "specificity", "greedy_efficacy", "greedy_generalization", "fluency",
               "false_open", "identical", "kl", "ppl_after", "efficacy_own", "efficacy_fail_closed",
               "specificity_fail_opened")
    assert [r["residuals_in_db"] for r in rows["off"]] == [5, 12]
    assert [r["residuals_computed"] for r in rows["off"]] == [12, 12]
    assert rows["on"][-1]["residuals_computed"] < 12
    for eager, lazy in zip(rows["off"], rows["on"]):
        assert {k: eager[k] for k in metrics} == {k: lazy[k] for k in metrics}


def test_scale_evaluates_a_built_database_as_the_cache_run_does(tokenizer, tmp_path: Path) -> None:
    """bench/scale.py --db: a database built by NeuralDB.add and saved is evaluated with every
    residual it holds, and scores the same sample as the cache run of the same facts."""
    from neuraldb import EditConfig, NeuralDB
    from neuraldb.bench import scale
    from neuraldb.engine.facts import save_facts_jsonl
    from neuraldb.evaluation.synthetic import synthetic_facts

    model_dir = tmp_path / "tiny"
    make_model("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    facts = list(synthetic_facts(10, seed=0))
    save_facts_jsonl(facts, tmp_path / "facts.jsonl")
    cfg_text = "layer: 1\nn_prefixes: 1\nprefix_len: 3\nresidual_prefixes: 1\nsteps: 3\ngamma: 0.9\n"
    (tmp_path / "cfg.yaml").write_text(cfg_text)
    from neuraldb.engine.config import load_yaml
    from neuraldb.engine.models import load_model

    model, tok = load_model(str(model_dir))
    db = NeuralDB(model, tok, load_yaml(EditConfig, tmp_path / "cfg.yaml"))
    db.add(facts[:8])
    db.save(tmp_path / "db")
    common = ["--model", str(model_dir), "--data", str(tmp_path / "facts.jsonl"), "--eval-sample", "4",
              "--retention-texts", "2", "--fluency-tokens", "4", "--latency-repeats", "1", "--latency-batch", "2"]
    built = scale.main(common + ["--db", str(tmp_path / "db"), "--out", str(tmp_path / "built")])
    cached = scale.main(common + ["--facts", "8", "--chunk", "8", "--checkpoints", "8", "--config",
                                  str(tmp_path / "cfg.yaml"), "--lazy-residuals", "off", "--out", str(tmp_path / "c")])
    b, c = built["rows"][0], cached["rows"][0]
    assert b["m"] == c["m"] == 8 and b["residuals_in_db"] == b["residuals_computed"] == 8
    assert built["lazy_residuals"] is False and "keys_per_s" not in b
    for k in ("efficacy", "generalization", "specificity", "greedy_efficacy", "false_open", "identical"):
        assert b[k] == pytest.approx(c[k], abs=1e-6), k
    assert not (tmp_path / "built" / "cache").exists()


def test_wikitext_passages(tmp_path: Path, data_dir: Path) -> None:
    from neuraldb.evaluation.texts import wikitext_passages

    raw = tmp_path / "wiki.raw"
    raw.write_text(" = Title = \n\n" + " ".join(f"w{i}" for i in range(50)) + " \n short line \n"
                   + " ".join(f"v{i}" for i in range(200)) + " \n")
    got = wikitext_passages(raw, 2, max_words=100)
    assert got[0] == " ".join(f"w{i}" for i in range(50)) and len(got[1].split()) == 100
    with pytest.raises(ValueError, match="only 2 paragraphs"):
        wikitext_passages(raw, 3)
    real = data_dir / "wikitext" / "wiki.test.raw"
    if real.is_file():
        texts = wikitext_passages(real, 64)
        assert len(texts) == 64 and texts[0].startswith("Robert Boulter is an English film")


def test_retention_harm_lies_after_the_first_open(tokenizer) -> None:
    """Tokens before a text's first open are bit-identical, so every nat of KL sits at or after
    one: mean_kl * tokens == kl_after_open * reached tokens; the open itself carries KL."""
    from neuraldb import EditConfig, NeuralDB
    from neuraldb.evaluation import retention

    facts = list(synthetic_facts(6, seed=3))
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, EditConfig(layer=1, n_prefixes=1, prefix_len=3, residual_prefixes=1,
                                               steps=3, gamma=0.3))
    db.add(facts)
    texts = [f"Yesterday {f.subject} was mentioned again, and then the talk moved on." for f in facts]
    r = retention(db, texts, batch_size=3)
    assert 0 < r.reached_rate < 1 and r.false_open_rate > 0
    assert r.kl_at_open > 0
    assert r.mean_kl == pytest.approx(r.kl_after_open * r.reached_rate, rel=1e-5)
    with db.disabled():
        assert retention(db, texts).mean_kl == 0


def test_lazy_group_residuals_are_one_batched_call(tokenizer, tmp_path: Path) -> None:
    """bench/scale.py's lazy load of facts that share a subject: every group not cached yet is
    optimised in one call (each group its own joint residual, as optimised alone) and cached by
    its members, so a later load computes nothing."""
    import torch

    from neuraldb import EditConfig, Fact, NeuralDB
    from neuraldb.bench import scale

    facts = [Fact("Danielle Darrieux", "The mother tongue of {} is", "French", "Japanese", id="0"),
             Fact("Danielle Darrieux", "{} was born in", "Paris", "Rome", id="1"),
             Fact("Berlin", "{} is the capital of", "Germany", "Italy", id="2"),
             Fact("Berlin", "{} lies on the river", "Spree", "Thames", id="3"),
             Fact("Berlin", "The mayor of {} is", "Wegner", "Smith", id="4"),
             Fact("Toyota", "{} was founded in", "Japan", "Peru", id="5")]
    cfg = EditConfig(layer=1, n_prefixes=1, prefix_len=3, residual_prefixes=1, steps=4, lr=0.5, gamma=0.9,
                     loss_stop=0.0)
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, cfg.replace(subject_groups=False))
    cache = scale.ChunkCache(tmp_path / "cache", 3, {"test": 1})
    cache.fill_keys(db, facts)
    db.insert(list(range(len(facts))), facts, cache.keys(0, len(facts)), None)
    calls = []
    encode = db.encode_residuals
    db.encode_residuals = lambda fs: calls.append(len(fs)) or encode(fs)  # type: ignore[method-assign]
    resid = scale.Residuals(db, cache, facts, groups=True)
    assert resid.load(set(range(len(facts)))) == len(facts)
    assert sorted(calls) == [1, 5]  # the single fact, then both groups in one call
    db.config = cfg.replace(subject_groups=True)
    for group in ([0, 1], [2, 3, 4]):
        alone = encode([facts[i] for i in group])[0]  # (d,): the group optimised by itself
        got = db.table.gather(torch.tensor(group)).float()  # (n, d): every member holds the group's residual
        assert torch.allclose(got, alone.expand_as(got), rtol=1e-3, atol=1e-4), float((got - alone).abs().max())
    encode(facts[:5])  # the lazy call again: each member's final NLL is kept beside its group's residual
    stats = cache.throughput(len(facts))
    assert stats["group_facts"] == 5 and stats["group_files_without_nll"] == 0
    assert abs(stats["group_nll_mean"] - float(db.last_stats.nll.mean())) <= 1e-4
    assert stats["group_nll_max"] == pytest.approx(float(db.last_stats.nll.max()), abs=1e-4)
    calls.clear()
    assert scale.Residuals(db, cache, facts, groups=True).load(set(range(len(facts)))) == len(facts)
    assert calls == []  # every residual came from the cache
