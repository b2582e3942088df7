"""The calibrator on tiny models: it reads the gate's own operating points (a threshold's opens
follow from one scan exactly as the gate decides them), picks the best candidate under the
spurious-open budget, keeps residual NLL histories, resumes from its key cache, and writes a
profile that NeuralDB then finds by the model's name."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuraldb import EditConfig, NeuralDB
from neuraldb.engine.calibrate import CalibrateConfig, Calibrator, markdown_report
from neuraldb.engine.gate_scan import Scan, extrapolate, fit_thresholds, scan
from neuraldb.engine.profile import PROFILE_DIR, Profile, find_profile, read_profile
from neuraldb.engine.residuals import compute_residuals
from neuraldb.engine.keys import generate_prefixes
from neuraldb.evaluation.synthetic import synthetic_facts

from conftest import CORPUS, make_model

FACTS = list(synthetic_facts(40, seed=3))
BASE = EditConfig(n_prefixes=2, prefix_len=4, residual_prefixes=1, weight_decay=0.0, clamp_norm=4.0)
SMALL = CalibrateConfig(sizes=(10, 30), layer_facts=10, layers=(1, 2), contexts=(0, 1), residual_facts=4,
                        confirm_facts=4, lrs=(0.5, 2.0), max_steps=4, text_tokens=32, batch_size=4)


def _opens(db: NeuralDB, texts: list[list[int]]) -> int:
    opened = 0
    with torch.no_grad():
        for t in texts:
            db.model(input_ids=torch.tensor([t]))
            opened += int(db.gate.last[2].sum())
    return opened


@pytest.mark.parametrize("head", [True, False])
def test_scan_thresholds_decide_as_the_gate(head: bool, tokenizer) -> None:
    """Opens counted from one batched scan at the floor equal the gate's own opens, one text at
    a time, at each threshold triple (head check or none)."""
    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(BASE, layer=1, gate_context=1, gamma=-1.0, index="Flat",
                              head_gamma=-1.0 if head else None, sink_gamma=-1.0 if head else None)
    db = NeuralDB(model, tokenizer, cfg)
    facts = FACTS[:20]
    db.insert(list(range(20)), facts, db.encode_keys(facts), None)
    texts = [tokenizer(t)["input_ids"] for t in CORPUS]
    sc = scan(db, texts, [], batch_size=3)
    triples = [(0.5, 0.3, 0.45), (0.2, 0.0, 0.2), (0.3, 0.1, 0.1)] if head else [(0.7, None, None), (0.3, None, None)]
    counts = []
    for g, hg, sg in triples:
        db.gate.gamma, db.gate.sink_gamma, db.gate.head_gamma = g, sg, hg or 0.0
        counts.append(_opens(db, texts))
        assert round(sc.spurious(g, hg, sg) * len(sc.text_s)) == counts[-1]
    assert max(counts) > 0  # some threshold opened somewhere: the comparison counted something
    db.detach()


def test_fit_thresholds_keeps_the_budget_and_prefers_own_opens() -> None:
    rng = np.random.default_rng(0)
    text_s = rng.uniform(0.3, 0.8, 10_000).astype(np.float32)
    text_h = rng.uniform(0.0, 0.7, 10_000).astype(np.float32)
    own = [(np.array([0.85 - 0.1 * (i % 3)], np.float32), np.array([0.9], np.float32), np.array([False]))
           for i in range(30)]
    sc = Scan(text_s, text_h, np.zeros(10_000, bool), own)
    best, cands = fit_thresholds(sc, 1e-3)
    assert best["spurious"] <= 1e-3 and all(c["spurious"] <= 1e-3 for c in cands)
    assert best["own_open"] == max(c["own_open"] for c in cands)
    assert best["head_gamma"] is not None and best["own_open"] == 1.0  # the head check lets gamma fall to 0.64
    named = np.zeros(10_000, bool)
    named[:2000] = True  # a fifth of the tokens sit in passages naming their winner: mentions, which match well
    ms, mh = text_s.copy(), text_h.copy()
    ms[named], mh[named] = rng.uniform(0.6, 0.9, 2000), 0.95
    sc_m = Scan(ms, mh, np.zeros(10_000, bool), own, named)
    free, _ = fit_thresholds(sc_m, 1e-3)
    tight, _ = fit_thresholds(sc_m, 1e-3, max_mention=1e-4)
    assert sc_m.mentions(free["gamma"], free["head_gamma"], free["sink_gamma"]) > 1  # mentions are not budgeted
    assert tight["mention_open"] <= 1e-4 and tight["gamma"] >= free["gamma"] and tight["own_open"] <= free["own_open"]
    assert sc_m.mentions(tight["gamma"], tight["head_gamma"], tight["sink_gamma"]) <= 1
    assert extrapolate([1000, 10_000], [1e-5, 1e-4], 100_000) == pytest.approx(1e-3)
    assert extrapolate([1000, 10_000], [0.0, 1e-4], 100_000) is None


def test_residual_history_matches_the_final_nll(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(BASE, layer=1, steps=5, lr=0.5, residual_batch_size=3)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    _, st = compute_residuals(model, tokenizer, FACTS[:7], 1, prefixes, cfg, history=True)
    assert st.history.shape[1] == 7 and st.history.shape[0] <= 5
    last = [float(st.history[~torch.isnan(st.history[:, f]), f][-1]) for f in range(7)]
    torch.testing.assert_close(torch.tensor(last), st.nll.cpu())
    assert not torch.isnan(st.history[0]).any()


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])
def test_calibrate_writes_a_profile_that_neuraldb_finds(arch_name: str, tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path / "cache"))
    model = make_model(arch_name, tokenizer)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, SMALL, cache=tmp_path / "keys", base=BASE)
    profile = cal.run(provenance="test run")
    rep = cal.report
    assert profile.layer in (1, 2) and profile.gate_context in (0, 1)
    assert {r["layer"] for r in rep["layers"]["candidates"]} == {1, 2}
    assert rep["thresholds"]["chosen"]["spurious"] <= SMALL.target_open
    assert [r["keys"] for r in rep["thresholds"]["at_sizes"]] == [10, 30]
    curve = rep["thresholds"]["mention_curve"]  # tighter mention budgets never open more own prompts
    assert curve[0]["mention_budget"] is None and all(a["own_open"] >= b["own_open"] for a, b in zip(curve, curve[1:]))
    assert all(c["mention_budget"] is None or c["mention_open"] <= c["mention_budget"] for c in curve)
    assert {r["lr"] for r in rep["optimiser"]["candidates"]} == {0.5, 2.0}
    assert profile.steps <= 4 and profile.lr in (0.5, 2.0)
    assert "Thresholds" in markdown_report(rep, profile)
    stages = rep["stage_seconds"]  # where the time went, every stage timed once
    assert {"layer screen", "optimiser"} <= set(stages) and sum(stages.values()) <= rep["seconds"]
    assert any(k.endswith(": map") for k in stages) and "; optimiser " in markdown_report(rep, profile)
    # written to the model cache's profiles/, found by the model's name, round-tripped exactly
    name = model.config.neuraldb_name
    path = tmp_path / "cache" / PROFILE_DIR / f"{name}.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(profile.to_yaml())
    assert read_profile(path) == profile
    found, where = find_profile(name, arch_name, tmp_path / "cache")
    assert found == profile and where == str(path)
    db = NeuralDB(model, tokenizer)
    assert (db.layer, db.config.gamma, db.config.lr) == (profile.layer, profile.gamma, profile.lr)
    assert db.profile == str(path)  # the database records where its settings came from, and keeps it
    db.add(FACTS[:2])
    db.save(tmp_path / "db")
    db.detach()
    back = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert back.profile == str(path) and back.config == db.config
    back.detach()
    # a second run reads its keys from the cache: the same choices
    again = Calibrator(model, tokenizer, FACTS, CORPUS * 3, SMALL, cache=tmp_path / "keys", base=BASE)
    assert dataclasses.replace(again.run(provenance="test run"), lr=profile.lr, steps=profile.steps) == profile


def test_layer_is_decided_with_its_space(tokenizer, tmp_path, monkeypatch) -> None:
    """The screen ranks the layers; the best `space_layers` of them are each measured with every
    space, map and the thresholds, and the best own-open share within the budgets decides the
    layer, even against the screen's order; the report's space and thresholds are that layer's."""
    model = make_model("llama", tokenizer)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, SMALL, cache=tmp_path, base=BASE)
    monkeypatch.setattr(Calibrator, "rank_layers", lambda self: self.report.setdefault(
        "layers", {"candidates": [], "chosen": 1, "why": "screen"}) and [1, 2])
    real = Calibrator.choose_space

    def favour_two(self, layer):  # layer 2's best space opens more own prompts than it measured
        context, th = real(self, layer)
        if layer == 2:
            th = self.report["thresholds"]["chosen"] = {**th, "own_open": th["own_open"] + 2.0}
        return context, th

    monkeypatch.setattr(Calibrator, "choose_space", favour_two)
    layer, context, gate_map, th = cal.choose_gate()
    rows = cal.report["gate"]["candidates"]
    assert [r["layer"] for r in rows] == [1, 2] and layer == 2  # the screen's second wins with its space
    assert th["own_open"] == max(r["own_open"] for r in rows) and cal.report["layers"]["chosen"] == 2
    assert cal.report["thresholds"]["chosen"] == th and cal.report["space"]["chosen"] == context
    assert set(cal.report["gate"]["per_layer"]) == {"1", "2"} and "decided with its space" in cal.report["layers"]["why"]
    assert "Layer and gate space together" in markdown_report(cal.report, Profile(layer=layer, gamma=th["gamma"]))
    one = Calibrator(model, tokenizer, FACTS, CORPUS * 3, dataclasses.replace(SMALL, space_layers=1), cache=tmp_path,
                     base=BASE)
    assert one.choose_gate()[0] == 1 and [r["layer"] for r in one.report["gate"]["candidates"]] == [1]


def test_a_given_profile_is_measured_as_the_candidates_are(tokenizer, tmp_path) -> None:
    """`measure` reads a given profile's gate on the same material and scans: at the thresholds
    the calibrator chose it finds the operating point the calibrator reported for them."""
    model = make_model("llama", tokenizer)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, SMALL, cache=tmp_path, base=BASE)
    th = cal.choose_thresholds(1, 1)
    got = cal.measure(Profile(layer=1, gate_context=1, gamma=th["gamma"], head_gamma=th["head_gamma"],
                              sink_gamma=th["sink_gamma"]))
    want = cal.report["thresholds"]["at_sizes"]
    assert [{k: r[k] for k in ("keys", "spurious", "mention_opens", "own_open")} for r in got["at_sizes"]] == want
    assert cal.report["measured"] is got and got["profile"]["gamma"] == th["gamma"]
    assert "A given profile, measured" in markdown_report(cal.report, Profile(layer=1, gamma=th["gamma"]))


def test_key_cache_is_per_context_weight(tokenizer, tmp_path) -> None:
    """Keys cached for one context weight are not served to another (the weight changes every key)."""
    model = make_model("llama", tokenizer)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, SMALL, cache=tmp_path, base=BASE)
    got = {}
    for w in (0.5, 0.3, 0.5):
        cal.base = dataclasses.replace(BASE, gate_context_weight=w)
        db = cal._db(1, 1, head=False)
        try:
            got.setdefault(w, []).append(cal._keys(db, FACTS[:6], "sweep"))
        finally:
            db.detach()
    assert len(list(tmp_path.glob("keys-sweep-*.safetensors"))) == 2
    assert torch.equal(got[0.5][0], got[0.5][1]) and not torch.allclose(got[0.5][0], got[0.3][0])


def test_calibrate_needs_enough_material(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    with pytest.raises(ValueError, match="calibration needs 38 facts"):
        Calibrator(model, tokenizer, FACTS[:20], CORPUS, SMALL)
    with pytest.raises(ValueError, match="texts is empty"):
        Calibrator(model, tokenizer, FACTS, [], SMALL)


def test_optimiser_is_confirmed_on_other_facts_as_configured(tokenizer, monkeypatch) -> None:
    """The screen's fastest setting is run as configured on facts the screen never saw; where it
    fails there, the next (lr, step budget) is tried, fastest first, and the best confirmed one
    wins; a confirmed setting also needs `greedy_share` of its facts answering the new object."""
    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(SMALL, nll_goal=1e9, lrs=(0.5, 2.0), max_steps=8, confirm_max=2,  # budgets 4 and 8
                              greedy_share=0.0)  # the random model answers nothing right: NLL alone decides
    cal = Calibrator(model, tokenizer, FACTS, CORPUS, cfg, base=BASE)
    assert not {f.id for f in cal.confirm_facts} & {f.id for f in cal.res_facts + cal.facts}
    best = cal.choose_optimiser(1)
    sec = cal.report["optimiser"]
    screen_best = min(sec["candidates"], key=lambda r: (r["steps_mean"], -r["share_below_goal"], r["nll_mean"]))
    assert len(sec["confirmed"]) == 1 and sec["confirmed"][0]["steps"] == screen_best["steps"]
    assert best is sec["chosen"] and best["facts_per_s"] > 0 and "other facts" in sec["why"]
    assert 0.0 <= best["greedy"] <= 1.0 and all("greedy" in r for r in sec["candidates"])
    # a greedy share no setting reaches: every shortlisted one is run, the best greedy share wins
    strict = Calibrator(model, tokenizer, FACTS, CORPUS, dataclasses.replace(cfg, greedy_share=1.01), base=BASE)
    best = strict.choose_optimiser(1)
    sec = strict.report["optimiser"]
    assert len(sec["confirmed"]) == 2 and "greedy share" in sec["why"]
    assert best["greedy"] == max(c["greedy"] for c in sec["confirmed"])
    # greedy answers decide between settings the NLL criteria pass alike: the first confirmed
    # setting leaves one fact's answer wrong, the next none; the next is chosen
    from neuraldb.engine import calibrate as cal_mod

    calls = []

    def one_wrong_first(*a, **k):
        r, st = compute_residuals(*a, **k)
        calls.append(1)
        st.greedy = torch.ones_like(st.nll)
        if len(calls) == 1:
            st.greedy[0] = 0.0
        return r, st

    picky = Calibrator(model, tokenizer, FACTS, CORPUS, dataclasses.replace(cfg, greedy_share=1.0), base=BASE)
    monkeypatch.setattr(cal_mod, "compute_residuals", lambda *a, **k: one_wrong_first(*a, **k)
                        if len(a) > 3 and a[2] is picky.confirm_facts else compute_residuals(*a, **k))
    best = picky.choose_optimiser(1)
    sec = picky.report["optimiser"]
    assert [c["greedy"] for c in sec["confirmed"]] == [0.75, 1.0] and best is sec["confirmed"][1]
    monkeypatch.setattr(cal_mod, "compute_residuals", compute_residuals)
    # nothing passes on the confirmation facts: one setting per (lr, step budget), fastest first
    monkeypatch.setattr(Calibrator, "_passes", lambda self, r, confirmed: not confirmed)
    best = cal.choose_optimiser(1)
    sec = cal.report["optimiser"]
    assert len(sec["confirmed"]) == 2
    assert len({(c["lr"], c["steps"]) for c in sec["confirmed"]}) == 2
    est = {(r["lr"], r["steps"], r["nll_stop"]): r["steps_mean"] for r in sec["candidates"]}
    steps = [est[(c["lr"], c["steps"], c["nll_stop"])] for c in sec["confirmed"]]
    assert steps == sorted(steps) and steps[0] == min(est.values())
    assert best in sec["confirmed"] and "none of the 2" in sec["why"]
    # the choice does not follow the clock: the same screen under other timings picks the same setting
    clock = iter(np.cumsum(np.random.default_rng(0).uniform(0.1, 50.0, 10_000)))
    monkeypatch.setattr(Calibrator, "_passes", lambda self, r, confirmed: True)
    first = {k: cal.choose_optimiser(1)[k] for k in ("lr", "steps", "nll_stop")}
    monkeypatch.setattr("neuraldb.engine.calibrate.time.perf_counter", lambda: float(next(clock)))
    assert {k: cal.choose_optimiser(1)[k] for k in ("lr", "steps", "nll_stop")} == first


def test_profile_rejects_unknown_keys(tmp_path) -> None:
    from neuraldb.engine.config import ConfigError

    p = tmp_path / "x.yaml"
    p.write_text("layer: 3\ngamma: 0.8\nwhatever: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        read_profile(p)
    assert Profile(layer=3, gamma=0.8).config().layer == 3


def test_opens_on_a_named_subject_are_mentions_not_spurious(tokenizer) -> None:
    """A passage that names a calibration subject opens its gate for real: the scan marks those
    tokens, and they count as mentions, not as spurious opens."""
    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(BASE, layer=1, gamma=-1.0, index="Flat")
    db = NeuralDB(model, tokenizer, cfg)
    facts = FACTS[:5]
    db.insert(list(range(5)), facts, db.encode_keys(facts), None)
    raw = [facts[0].text + " and so on.", CORPUS[0]]
    sc = scan(db, [tokenizer(t)["input_ids"] for t in raw], [], batch_size=2, raw=raw)
    named = sc.text_named
    assert named.any() and not named.all()
    n0 = len(tokenizer(raw[0])["input_ids"]) - 1  # gateable tokens of the first passage (not its first)
    assert named[n0:].sum() == 0  # the second passage names no subject
    g = float(np.quantile(sc.text_s, 0.1))
    assert sc.mentions(g) == int((sc.text_s[named] > g).sum())
    assert sc.spurious(g) * len(sc.text_s) == pytest.approx(float((sc.text_s[~named] > g).sum()))
    db.detach()


def test_edit_with_calibrate_profiles_an_unknown_model_once(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    """`neuraldb edit --calibrate` on a model with no profile calibrates it first, caches the
    profile for these weights, and the database records it; a second run finds it; a profile
    calibrated on other weights under the same name is passed over."""
    from neuraldb import load_model
    from neuraldb.cli import main as cli
    from neuraldb.data import sample_root
    from neuraldb.engine.arch import weights_sha256
    from neuraldb.engine.editor import model_name
    from neuraldb.engine.persistence import read_meta

    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    facts = sample_root() / "counterfact" / "counterfact-edit.json"
    argv = ["edit", "--model", str(tiny_model_dir), "--facts", str(facts), "--limit", "2", "--no-eval",
            "--data-dir", str(sample_root()), "--calibrate", "--calibrate-facts", "40"]
    assert cli(argv + ["--out", "db1"]) == 0
    assert "calibrating it first" in capsys.readouterr().err
    m, _ = load_model(str(tiny_model_dir))
    name = Path(model_name(m)).name  # a model loaded from a directory is known by the directory's name
    cached = tmp_path / "cache" / PROFILE_DIR / f"{name}.yaml"
    prof = read_profile(cached)
    assert prof.model_sha256 == weights_sha256(m) and "calibrated by" in prof.provenance
    assert read_meta(tmp_path / "db1", verify_files=False)["profile"] == str(cached)
    assert cli(argv + ["--out", "db2"]) == 0  # found in the cache: no second calibration
    assert "calibrating" not in capsys.readouterr().err
    # `calibrate --measure` reads that profile's gate on the calibration material, choosing nothing
    assert cli(["calibrate", "--model", str(tiny_model_dir), "--facts", "40", "--data-dir", str(sample_root()),
                "--measure", str(cached), "--out", "measured"]) == 0
    got = json.loads((tmp_path / "measured" / "measured.json").read_text())["measured"]
    assert [r["keys"] for r in got["at_sizes"]] == [4, 13, 40] and got["profile"]["gamma"] == prof.gamma
    assert not (tmp_path / "measured" / "profile.yaml").exists()
    cached.write_text(dataclasses.replace(prof, model_sha256="0" * 64).to_yaml())  # other weights, same name
    assert find_profile(name, "llama", tmp_path / "cache", lambda: weights_sha256(m)) is None


def test_gate_map_is_fitted_measured_and_kept_only_where_it_pays(tokenizer, tmp_path) -> None:
    """The calibrator fits a map on other facts and texts, measures it as the plain space, and
    keeps it only where it opens more own prompts within the budget; a kept map loads."""
    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(SMALL, map_rank=8, map_facts=20, map_epochs=2)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, cfg, cache=tmp_path, base=BASE, fit_texts=CORPUS[::-1])
    plain = cal.choose_thresholds(1, 1)
    gm, th = cal.choose_map(1, 1, plain)
    rep = cal.report["map"]
    assert rep["fit"]["positives"] > 0 and rep["fit"]["negatives"] > 0
    assert (gm != "") == (rep["mapped"]["own_open"] > plain["own_open"] and rep["mapped"]["spurious"] <= cfg.target_open)
    assert th == (rep["mapped"] if gm else plain)
    gm, th = cal.choose_map(1, 1, {**plain, "own_open": -1.0})  # a plain space that opens nothing: the map pays
    assert gm and th == cal.report["thresholds"]["chosen"] and cal.report["thresholds_plain"]
    db = NeuralDB(model, tokenizer, dataclasses.replace(BASE, layer=1, gate_context=1, gamma=th["gamma"], gate_map=gm))
    assert db.gate_map is not None and db.gate_map.dim == db.space.dim
    db.detach()
    no_texts = Calibrator(model, tokenizer, FACTS, CORPUS * 3, cfg, cache=tmp_path, base=BASE)
    assert no_texts.choose_map(1, 1, plain) == ("", plain)


def test_the_map_stage_reads_its_spaces_key_file_once(tokenizer, tmp_path, monkeypatch) -> None:
    """Fitting a map and scanning the mapped space both start from the plain space's cached
    rows: the file is read once, and a fresh calibrator reads the same rows from it."""
    import safetensors.torch as st

    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(SMALL, map_rank=8, map_facts=20, map_epochs=1)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, cfg, cache=tmp_path, base=BASE, fit_texts=CORPUS[::-1])
    plain = cal.choose_thresholds(1, 1)  # writes the space's rows
    reads, real = [], st.load_file
    monkeypatch.setattr(st, "load_file", lambda path, *a, **k: reads.append(Path(path).name) or real(path, *a, **k))
    fresh = Calibrator(model, tokenizer, FACTS, CORPUS * 3, cfg, cache=tmp_path, base=BASE, fit_texts=CORPUS[::-1])
    fresh.choose_map(1, 1, plain)
    full = [r for r in reads if r.startswith("keys-full-")]
    assert len(full) == 1, reads
    assert torch.equal(fresh._space_keys(1, 1), cal._space_keys(1, 1))


@pytest.mark.parametrize("context", [0, 1])
def test_mapped_key_rows_follow_from_the_plain_rows(context: int, tokenizer, tmp_path) -> None:
    """A map's key rows (gate key and head key) derived from the plain space's cached rows are
    the rows a database with that map encodes itself."""
    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(SMALL, map_rank=8, map_facts=20, map_epochs=2)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, cfg, cache=tmp_path, base=BASE, fit_texts=CORPUS[::-1])
    path = str(cal.fit_map(1, context, 0.8))
    derived, plain = cal._space_keys(1, context, path), cal._space_keys(1, context)
    db = cal._db(1, context, head=True, gate_map=path)
    try:
        direct = db.encode_keys(cal.facts)
    finally:
        db.detach()
    assert derived.shape == direct.shape == plain.shape and (derived - direct).abs().max() <= 1e-5
    assert (derived - plain).abs().max() > 1e-2  # the map moved them


@pytest.mark.parametrize("map_layers", [1, 2])
def test_a_map_is_fitted_only_at_the_best_plain_layers(map_layers: int, tokenizer, tmp_path, monkeypatch) -> None:
    model = make_model("llama", tokenizer)
    cfg = dataclasses.replace(SMALL, map_rank=8, map_facts=20, map_epochs=1, map_layers=map_layers)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, cfg, cache=tmp_path, base=BASE, fit_texts=CORPUS[::-1])
    monkeypatch.setattr(Calibrator, "rank_layers", lambda self: self.report.setdefault(
        "layers", {"candidates": [], "chosen": 1, "why": "screen"}) and [1, 2])
    real, fitted = Calibrator.choose_space, []

    def favour_two(self, layer):  # layer 2's plain space opens more own prompts, against the screen's order
        context, th = real(self, layer)
        if layer == 2:
            th = self.report["thresholds"]["chosen"] = {**th, "own_open": th["own_open"] + 2.0}
        return context, th

    monkeypatch.setattr(Calibrator, "choose_space", favour_two)
    monkeypatch.setattr(Calibrator, "choose_map", lambda self, layer, c, th: (
        fitted.append(layer), self.report.__setitem__("map", {"chosen": "", "why": "fitted"}), ("", th))[-1])
    cal.choose_gate()
    assert fitted == ([2] if map_layers == 1 else [1, 2])
    per = cal.report["gate"]["per_layer"]
    assert ("not fitted" in per["1"]["map"]["why"]) == (map_layers == 1) and per["2"]["map"]["why"] == "fitted"
    assert {f"layer {k}: map" for k in fitted} == {k for k in cal.report["stage_seconds"] if k.endswith(": map")}


@pytest.mark.parametrize("cache", [False, True])
def test_the_spaces_of_a_layer_are_keyed_in_one_pass(cache: bool, tokenizer, tmp_path, monkeypatch) -> None:
    """choose_space keys every calibration fact once for all its spaces (no database encodes
    them one space at a time), and each space's rows are those its database would encode."""
    model = make_model("llama", tokenizer)
    cal = Calibrator(model, tokenizer, FACTS, CORPUS * 3, dataclasses.replace(SMALL, contexts=(0, 1, 2)),
                     cache=tmp_path if cache else None, base=BASE)
    real, calls = NeuralDB.encode_keys, []
    monkeypatch.setattr(NeuralDB, "encode_keys", lambda self, facts: calls.append(len(facts)) or real(self, facts))
    cal.choose_space(2)
    assert len(cal.facts) not in calls and len(cal.report["space"]["candidates"]) == 3
    assert len(list(tmp_path.glob("keys-full-*.safetensors"))) == (3 if cache else 0)
    for c in (0, 1, 2):
        db = cal._db(2, c, head=True)
        try:
            want = real(db, cal.facts)
        finally:
            db.detach()
        assert (cal._space_keys(2, c) - want).abs().max() <= 1e-5

