"""General ability through lm-evaluation-harness itself: the shipped task YAMLs on a few
documents, the edited model handed to the harness in memory (batched, right-padded scores equal
a full forward of each request alone), and the reuse of unedited scores where no gate opens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the 'eval' extra (lm-evaluation-harness) is not installed")

from neuraldb import EditConfig, Fact, NeuralDB
from neuraldb.data import sample_root
from neuraldb.evaluation.general import TASKS, ScoreCache, evaluate, make_lm, request_key, summary_rows, task_dir

from conftest import make_model

FACT = Fact("Danielle Darrieux", "The mother tongue of {}", "Japanese", "French", id="a")
CFG = EditConfig(layer=1, gamma=0.65, n_prefixes=2, prefix_len=4, residual_prefixes=1, steps=40, lr=0.5,
                 weight_decay=0.0, clamp_norm=4.0)
# tiny ARC-style documents: two name the edited subject, two do not
ARC = [
    {"id": "q0", "question": "The mother tongue of Danielle Darrieux", "answerKey": "B",
     "choices": {"text": ["French", "Japanese", "Apple"], "label": ["A", "B", "C"]}},
    {"id": "q1", "question": "Where is it? Who made it?", "answerKey": "A",
     "choices": {"text": ["Paris", "Berlin"], "label": ["A", "B"]}},
    {"id": "q2", "question": "Berlin is the capital of", "answerKey": "1",
     "choices": {"text": ["Germany", "Italy", "France"], "label": ["1", "2", "3"]}},
    {"id": "q3", "question": "Everyone knows Danielle Darrieux speaks", "answerKey": "A",
     "choices": {"text": ["Japanese", "French"], "label": ["A", "B"]}},
]


@pytest.fixture(scope="module")
def tiny_db(tokenizer) -> NeuralDB:
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, CFG)
    db.add([FACT])
    return db


@pytest.fixture()
def arc_dir(tmp_path: Path) -> Path:
    (tmp_path / "general" / "arc_challenge").mkdir(parents=True)
    (tmp_path / "general" / "arc_challenge" / "test.jsonl").write_text("\n".join(json.dumps(d) for d in ARC) + "\n")
    return tmp_path


def test_shipped_yamls_resolve_every_data_file(tmp_path: Path) -> None:
    origins = task_dir(TASKS, tmp_path, sample_root())
    assert set(origins) == set(TASKS) and set(origins.values()) == {"data-dir"}
    for task in TASKS:
        text = (tmp_path / f"{task}.yaml").read_text()
        assert "@data/" not in text and str(sample_root()) in text, task
    assert (tmp_path / "wsc273_utils.py").is_file()
    with pytest.raises(ValueError, match="unknown general task"):
        task_dir(["mmlu", "hellaswag"], tmp_path)


def test_every_task_runs_in_the_harness_on_the_sample(tiny_db: NeuralDB) -> None:
    """The six stock tasks (local YAMLs) on 3 documents each of the bundled sample, scored by
    lm-eval with the edited tiny model in memory."""
    lm = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=4)
    res = evaluate(lm, TASKS, limit=3, data_dir=sample_root())
    assert set(res["scores"]) == set(TASKS)
    for task, per in res["scores"].items():
        assert 0.0 <= per["acc"].value <= 1.0 and per["acc"].n == 3, task
    assert res["scores"]["lambada_openai"]["perplexity"].value > 1.0
    assert {"sciq": "acc_norm", "arc_challenge": "acc_norm"}.items() <= {t: m for t, p in res["scores"].items()
                                                                         for m in p if m == "acc_norm"}.items()
    rows = summary_rows({"unedited": res, "edited": res})
    assert [r["delta"] for r in rows if r["state"] == "edited"] == [0.0] * (len(TASKS) + 1)


def test_every_task_runs_on_the_shared_files(tiny_db: NeuralDB, data_dir: Path) -> None:
    """The shipped YAMLs on the real evaluation files (../shared/data/general): the harness reads
    every task's data through them and scores two documents of each with the tiny edited model."""
    if not all((data_dir / "general" / t).is_dir() for t in TASKS):
        pytest.skip(f"the six tasks' files are not under {data_dir}/general (set NEURALDB_DATA)")
    res = evaluate(make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=4), TASKS, limit=2, data_dir=data_dir)
    assert set(res["origins"].values()) == {"data-dir"}
    assert all(per["acc"].n == 2 for per in res["scores"].values())


def full_forward_loglik(db: NeuralDB, ctx: list[int], cont: list[int]) -> float:
    """The continuation's log-probability from one unpadded forward of this request alone."""
    ids = torch.tensor([ctx + cont])[:, :-1]  # (1, T)
    with torch.no_grad():
        logp = db.model(ids).logits.log_softmax(-1)[0]  # (T, V)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_batched_scores_equal_one_full_forward_each_and_reuse_is_exact(tiny_db: NeuralDB, arc_dir: Path,
                                                                     tmp_path: Path) -> None:
    plain_cache, gated_cache = ScoreCache(tmp_path / "u.jsonl"), ScoreCache(tmp_path / "e.jsonl")
    with tiny_db.disabled():
        plain_lm = make_lm(tiny_db.model, tiny_db.tok, batch_size=3, unedited=plain_cache)
        plain = evaluate(plain_lm, ["arc_challenge"], data_dir=arc_dir)
    assert len(plain_cache.scores) == sum(len(d["choices"]["text"]) for d in ARC)
    lm = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=3, unedited=plain_cache, edited=gated_cache)
    edited = evaluate(lm, ["arc_challenge"], data_dir=arc_dir)
    # the gate opened on the documents that name the subject, and only there
    docs = {o.doc_id for o in lm.opens}
    assert docs and docs <= {0, 3} and all(o.named and o.fact_id == 0 for o in lm.opens)
    assert lm.rescored == sum(len(ARC[d]["choices"]["text"]) for d in docs)
    assert lm.reused == sum(len(d["choices"]["text"]) for d in ARC) - lm.rescored
    # every batched, right-padded score equals a full forward of the request alone, gated
    reqs = [("Question: " + d["question"] + "\nAnswer:", " " + c) for d in ARC for c in d["choices"]["text"]]
    for ctx, cont in reqs:
        c_enc, k_enc = lm._encode_pair(ctx, cont)
        want = full_forward_loglik(tiny_db, c_enc, k_enc)
        key = request_key(c_enc + k_enc, len(k_enc))
        got = (gated_cache.get(key) or plain_cache.get(key))[0]
        assert got == pytest.approx(want, abs=1e-4), (ctx, cont)
    # a second run is served from the caches alone (resumable) and gives the same scores
    again = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=3, unedited=plain_cache, edited=gated_cache)

    def no_model_call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a cached request was scored again")
    again._model_call = again._forward = no_model_call
    rerun = evaluate(again, ["arc_challenge"], data_dir=arc_dir)
    assert rerun["scores"]["arc_challenge"]["acc"].value == edited["scores"]["arc_challenge"]["acc"].value
    assert plain["scores"]["arc_challenge"]["acc"].n == 4


def test_a_torn_cache_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    ScoreCache(path).put([("k1", (-1.5, True)), ("k2", (-2.0, False))])
    with open(path, "a") as fh:
        fh.write('["k3", -0.')  # a run killed mid-write
    cache = ScoreCache(path)
    assert cache.get("k1") == (-1.5, True) and cache.get("k2") == (-2.0, False) and cache.get("k3") is None
    memory = ScoreCache()  # no path: kept in memory, nothing written
    memory.put([("k1", (-1.5, True))])
    assert memory.get("k1") == (-1.5, True) and memory.path is None


def test_cli_eval_general_writes_the_table_and_the_opens(tiny_model_dir: Path, arc_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from neuraldb.cli import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACT.to_json()) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("layer: 1\ngamma: 0.65\nn_prefixes: 2\nprefix_len: 4\nresidual_prefixes: 1\nsteps: 40\nlr: 0.5\n"
                   "weight_decay: 0.0\nclamp_norm: 4.0\n")
    assert main(["edit", "--model", str(tiny_model_dir), "--facts", str(facts), "--config", str(cfg),
                 "--out", str(tmp_path / "db"), "--no-eval"]) == 0
    out = tmp_path / "general.json"
    assert main(["eval", "--db", str(tmp_path / "db"), "--general", "--tasks", "arc_challenge", "--data-dir",
                 str(arc_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| unedited | arc_challenge | acc |" in printed and "| 1 facts | average |" in printed
    got = json.loads(out.read_text())
    assert {r["state"] for r in got["general"]} == {"unedited", "1 facts"}
    assert got["opens"] and all(o["named"] and o["task"] == "arc_challenge" for o in got["opens"])
    assert got["rescored"] and got["reused"] and got["rescored"] + got["reused"] == sum(len(d["choices"]["text"])
                                                                                     for d in ARC)
    assert main(["eval", "--db", str(tmp_path / "db"), "--general", "--tasks", "arc,mmlu"]) == 2


def test_bf16_above_keeps_the_gate_in_float32_and_restores_the_model(tiny_db: NeuralDB) -> None:
    """Under autocast_above the blocks up to the gated layer (and the gate's decisions and the
    residual it adds) are bit-identical to float32; the blocks above run their GEMMs in bf16; the
    logits come back float32 and close; on exit the model is exactly the float32 model again."""
    from neuraldb.engine.hooks import Trace, autocast_above

    model, layer = tiny_db.model, tiny_db.layer
    ids = torch.tensor([tiny_db.tok("The mother tongue of Danielle Darrieux is")["input_ids"]])  # (1, T)
    above = f"model.layers.{layer + 1}.mlp.down_proj"
    with torch.no_grad():
        with Trace(model, tiny_db.path, retain_input=False, retain_output=True) as at, \
                Trace(model, above, retain_input=False, retain_output=True) as up, tiny_db.record() as opened:
            ref = model(ids).logits  # (1, T, V)
        with autocast_above(model, layer), \
                Trace(model, tiny_db.path, retain_input=False, retain_output=True) as at16, \
                Trace(model, above, retain_input=False, retain_output=True) as up16, tiny_db.record() as opened16:
            low = model(ids).logits
        after = model(ids).logits
    assert any(opened) and [[(h.position, h.fact_id) for h in p] for p in opened] == \
        [[(h.position, h.fact_id) for h in p] for p in opened16]
    assert torch.equal(at.output, at16.output)  # the gated layer's output, residual included
    assert up.output.dtype == torch.float32 and up16.output.dtype == torch.bfloat16
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.equal(after, ref) and not any("forward" in m.__dict__ for m in model.modules())


def test_bf16_above_scores_reuse_exactly_where_no_gate_opens(tiny_db: NeuralDB, arc_dir: Path,
                                                              tmp_path: Path) -> None:
    """With the blocks above in bf16 a closed gate still leaves the logits bit-identical to the
    unedited model's (so reusing unedited scores stays exact), and a request with an open is scored
    as one gated forward of it alone under the same precision."""
    from neuraldb.engine.hooks import autocast_above

    ids = torch.tensor([tiny_db.tok("Berlin is the capital of Germany")["input_ids"]])  # (1, T)
    with torch.no_grad(), autocast_above(tiny_db.model, tiny_db.layer):
        with tiny_db.record() as opened:
            gated = tiny_db.model(ids).logits
        with tiny_db.disabled():
            plain = tiny_db.model(ids).logits
    assert not any(opened) and torch.equal(gated, plain)

    plain_cache, gated_cache = ScoreCache(tmp_path / "u.jsonl"), ScoreCache(tmp_path / "e.jsonl")
    with tiny_db.disabled():
        evaluate(make_lm(tiny_db.model, tiny_db.tok, batch_size=1, unedited=plain_cache, precision="bf16-above",
                         layer=tiny_db.layer), ["arc_challenge"], data_dir=arc_dir)
    lm = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=1, unedited=plain_cache, edited=gated_cache,
                 precision="bf16-above")
    evaluate(lm, ["arc_challenge"], data_dir=arc_dir)
    assert lm.precision == "bf16-above" and lm.rescored == len(gated_cache.scores) > 0 and lm.reused > 0
    d = ARC[lm.opens[0].doc_id]
    c_enc, k_enc = lm._encode_pair("Question: " + d["question"] + "\nAnswer:", " " + d["choices"]["text"][0])
    with autocast_above(tiny_db.model, tiny_db.layer):
        want = full_forward_loglik(tiny_db, c_enc, k_enc)
    assert gated_cache.get(request_key(c_enc + k_enc, len(k_enc)))[0] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="needs the gated layer"):
        make_lm(tiny_db.model, tiny_db.tok, precision="bf16-above")
    with pytest.raises(ValueError, match="precision must be"):
        make_lm(tiny_db.model, tiny_db.tok, tiny_db, precision="fp8")
    with pytest.raises(ValueError, match="scorer must be"):
        make_lm(tiny_db.model, tiny_db.tok, tiny_db, scorer="vllm")


def test_autocast_above_on_every_architecture(arch: str, tokenizer) -> None:
    """Blocks up to the layer unchanged bit for bit, logits float32 and close, the model restored."""
    from neuraldb.engine.arch import get_arch
    from neuraldb.engine.hooks import Trace, autocast_above

    model = make_model(arch, tokenizer)
    path = get_arch(model).add_path(1)
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])  # (1, T)
    with torch.no_grad():
        with Trace(model, path, retain_input=False, retain_output=True) as ref_at:
            ref = model(ids).logits  # (1, T, V)
        with autocast_above(model, 1), Trace(model, path, retain_input=False, retain_output=True) as at:
            low = model(ids).logits
        after = model(ids).logits
    assert torch.equal(ref_at.output, at.output)
    assert low.dtype == ref.dtype and not torch.equal(low, ref) and torch.allclose(low, ref, atol=0.05 * ref.abs().max())
    assert torch.equal(after, ref) and not any("forward" in m.__dict__ for m in model.modules())
    # the weights cast once and kept: the same logits, bit for bit; cast again after an edit
    weights: dict = {}
    with torch.no_grad():
        with autocast_above(model, 1, weights=weights):
            kept = model(ids).logits
        held = {m: w for m, (_, w, _) in weights.items()}
        with autocast_above(model, 1, weights=weights):
            again = model(ids).logits
        assert torch.equal(kept, low) and torch.equal(again, low)
        assert all(weights[m][1] is w for m, w in held.items())
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        assert not linears or weights  # every nn.Linear model lowers its linears through the kept weights
        head = model.get_output_embeddings()
        if head in weights:
            head.weight.mul_(2.0)
            with autocast_above(model, 1, weights=weights):
                edited = model(ids).logits
            head.weight.mul_(0.5)
            assert weights[head][1] is not held[head] and not torch.equal(edited, low)
    assert not any("forward" in m.__dict__ for m in model.modules()) and torch.equal(model(ids).logits, ref)


def test_bench_general_end_to_end_on_a_tiny_model(tiny_model_dir: Path, arc_dir: Path, tmp_path: Path) -> None:
    """bench/general.py: the unedited state and a database, one score cache per precision, the
    opens and the share of read tokens they make, JSON + markdown; a second run reads its caches."""
    from neuraldb.bench import general

    facts = tmp_path / "facts.jsonl"
    other = Fact("Berlin", "{} is the capital of", "Italy", "Germany", id="b")
    facts.write_text("\n".join(json.dumps(f.to_json()) for f in (FACT, other)) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("layer: 1\ngamma: 0.65\nn_prefixes: 2\nprefix_len: 4\nresidual_prefixes: 1\nsteps: 10\nlr: 0.5\n"
                   "weight_decay: 0.0\nclamp_norm: 4.0\n")
    argv = ["--model", str(tiny_model_dir), "--data", str(facts), "--sizes", "1", "--baselines", "none", "--config",
            str(cfg), "--tasks", "arc_challenge", "--data-dir", str(arc_dir), "--precision", "bf16-above",
            "--batch-size", "2", "--scale-out", str(tmp_path / "scale"), "--out", str(tmp_path / "out")]
    res = general.main(argv)
    assert res["precision"] == "bf16-above"
    avg = {r["method"]: r for r in res["rows"] if r["task"] == "average"}
    assert set(avg) == {"unedited", "neuraldb"} and avg["neuraldb"]["opens"] > 0
    assert float(avg["neuraldb"]["open_share"].rstrip("%")) > 0 and avg["neuraldb"]["reused"] > 0
    assert list((tmp_path / "out" / "scores").glob("*/bf16-above/unedited.jsonl"))
    assert (tmp_path / "out" / "general.json").is_file() and (tmp_path / "out" / "general.md").is_file()
    first = {f.name: f.read_bytes() for f in (tmp_path / "out" / "states").glob("*.json")}
    scored = general.evaluate
    general.evaluate = lambda *a, **k: pytest.fail("a state scored under the same key was scored again")
    try:  # a resumed run keeps every state it already scored, with the seconds its scoring took
        again = general.main(argv)
    finally:
        general.evaluate = scored
    assert [r["score"] for r in again["rows"]] == [r["score"] for r in res["rows"]]
    assert [r.get("seconds") for r in again["rows"]] == [r.get("seconds") for r in res["rows"]]
    assert {f.name: f.read_bytes() for f in (tmp_path / "out" / "states").glob("*.json")} == first
    (tmp_path / "out" / "general.json").unlink()  # --report: the same table from the states' files alone
    rebuilt = general.main(["--report", "--out", str(tmp_path / "out")])
    assert [(r["state"], r["task"], r["score"], r.get("delta"), r.get("opens")) for r in rebuilt["rows"]] == \
        [(r["state"], r["task"], r["score"], r.get("delta"), r.get("opens")) for r in again["rows"]]
    assert (tmp_path / "out" / "general.json").is_file()
    (tmp_path / "out" / "general.json").unlink()  # and as a script, as the docs run it
    import subprocess
    import sys
    run = subprocess.run([sys.executable, general.__file__, "--report", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "| neuraldb | 1 | average |" in run.stdout, run.stderr[-2000:]
    assert (tmp_path / "out" / "general.json").is_file()
    with pytest.raises(SystemExit, match="no scored states"):
        general.main(["--report", "--out", str(tmp_path / "nothing")])
    assert general.main(argv[:-6] + ["--precision", "float32"] + argv[-4:])["precision"] == "float32"


def test_probe_runs_equal_inputs_once_and_gives_each_its_opens(tiny_db: NeuralDB) -> None:
    lm = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=2)
    named = tiny_db.tok("Everyone knows Danielle Darrieux speaks")["input_ids"]
    plain = tiny_db.tok("Berlin is the capital of")["input_ids"]
    calls = []
    hook = tiny_db.model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        got = lm._probe([named, plain, named, named])
    finally:
        hook.remove()
    assert sum(calls) == 2  # two distinct inputs, one row each
    assert got[0] and got[0] == got[2] == got[3] == lm._probe([named])[0] and not got[1]


def test_a_probe_cache_resumes_the_probe(tiny_db: NeuralDB, tmp_path: Path) -> None:
    """With `probes` a probe's findings are kept per input (a torn last line ignored): a second
    run of the same inputs forwards nothing and finds the same opens; a new input is probed."""
    from neuraldb.evaluation.general import ProbeCache

    named = tiny_db.tok("Everyone knows Danielle Darrieux speaks")["input_ids"]
    plain = tiny_db.tok("Berlin is the capital of")["input_ids"]
    path = tmp_path / "probe.jsonl"
    first = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=2, probes=ProbeCache(path))._probe([named, plain])
    assert first[0] and not first[1]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('["torn", [[1, 0')  # a killed writer's last line
    calls = []
    hook = tiny_db.model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        lm = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=2, probes=ProbeCache(path))
        assert lm._probe([plain, named]) == [first[1], first[0]] and calls == []
        other = tiny_db.tok("Danielle Darrieux was born in")["input_ids"]
        again = lm._probe([named, other])
    finally:
        hook.remove()
    assert sum(calls) == 1 and again[0] == first[0]


@pytest.mark.parametrize("precision", ["float32", "bf16-above"])
def test_scores_equal_the_harness_own_loop(tiny_db: NeuralDB, precision: str) -> None:
    """GatedLM's scorer (the head and log-softmax only where a continuation is read) gives HFLM's
    own `_loglikelihood_tokens` scores: contexts of several lengths, one- and many-token
    continuations, equal inputs with different last tokens (MMLU's one-token choices), a batch
    whose rows read from different spans, and inputs truncated to the model's max length."""
    from lm_eval.models.huggingface import HFLM

    lm = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=3, precision=precision)
    pairs = [("Question: where is Paris?\nAnswer:", c) for c in (" A", " B", " C", " D")]
    pairs += [("The mother tongue of Danielle Darrieux is", c) for c in (" French", " Japanese and more words")]
    pairs += [("Berlin", " is the capital of Germany, a country in Europe"), ("A much longer context " * 9, " x")]
    reqs = [((c, k), *lm._encode_pair(c, k)) for c, k in pairs]
    ctx = reqs[0][1]
    with torch.no_grad():
        top = int(tiny_db.model(torch.tensor([ctx])).logits[0, -1].argmax())  # the greedy next token
    reqs.insert(1, (("", ""), ctx, [top]))
    long_ctx, long_cont = reqs[-1][1], reqs[-1][2]
    lm._max_length = len(long_ctx) - 5  # the last request is truncated from the left
    assert len(long_ctx) + len(long_cont) > lm.max_length + 1
    with lm._precision():
        want = HFLM._loglikelihood_tokens(lm, reqs, disable_tqdm=True)
        got = lm._score(reqs)
    harness = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=3, precision=precision, scorer="harness")
    harness._max_length = lm._max_length
    assert harness._loglikelihood_tokens(reqs) == want  # the option that times HFLM's loop runs it
    assert [g for _, g in got] == [g for _, g in want] and got[1][1]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)


def test_bf16_replays_the_float32_gate_and_reuses_exactly(tiny_db: NeuralDB, arc_dir: Path, tmp_path: Path) -> None:
    """precision "bf16" (every block under bf16 autocast): the gate does not search bf16
    activations but replays the float32 probe's decisions. Replaying a float32 forward's own
    decisions gives its logits bit for bit; forced decisions that open nothing leave the logits
    bit-identical to the unedited model's under the same precision (reuse stays exact); an opened
    request scores close to its float32 gated forward."""
    from neuraldb.engine.hooks import autocast_above

    ids = torch.tensor([tiny_db.tok("Everyone knows Danielle Darrieux speaks French")["input_ids"]])  # (1, T)
    gate = tiny_db.gate
    with torch.no_grad():
        with tiny_db.record() as passes:
            decided = tiny_db.model(ids).logits  # (1, T, V)
        hits = [h for p in passes for h in p]
        assert hits
        opened = torch.zeros(ids.shape, dtype=torch.bool)
        fact = torch.full(ids.shape, -1, dtype=torch.long)
        for h in hits:
            opened[h.batch, h.position], fact[h.batch, h.position] = True, h.fact_id
        gate.forced = (opened, fact)
        assert torch.equal(tiny_db.model(ids).logits, decided) and gate.forced is None  # consumed
        with autocast_above(tiny_db.model, -1):
            gate.forced = (torch.zeros_like(opened), torch.full_like(fact, -1))
            closed = tiny_db.model(ids).logits
            with tiny_db.disabled():
                plain = tiny_db.model(ids).logits
        assert torch.equal(closed, plain) and closed.dtype == torch.float32
        gate.forced = (torch.zeros(1, 3, dtype=torch.bool), torch.full((1, 3), -1))
        with pytest.raises(RuntimeError, match="forced gate decisions for 3 tokens"):
            tiny_db.model(ids)
        gate.forced = None

    plain_cache, gated_cache = ScoreCache(tmp_path / "u.jsonl"), ScoreCache(tmp_path / "e.jsonl")
    with tiny_db.disabled():
        evaluate(make_lm(tiny_db.model, tiny_db.tok, batch_size=2, unedited=plain_cache, precision="bf16"),
                 ["arc_challenge"], data_dir=arc_dir)
    lm = make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=2, unedited=plain_cache, edited=gated_cache,
                 precision="bf16")
    evaluate(lm, ["arc_challenge"], data_dir=arc_dir)
    assert lm.rescored == len(gated_cache.scores) > 0 and lm.reused > 0
    d = ARC[lm.opens[0].doc_id]
    c_enc, k_enc = lm._encode_pair("Question: " + d["question"] + "\nAnswer:", " " + d["choices"]["text"][0])
    got = gated_cache.get(request_key(c_enc + k_enc, len(k_enc)))[0]
    assert got == pytest.approx(full_forward_loglik(tiny_db, c_enc, k_enc), abs=0.05 * abs(got) + 0.05)
    with pytest.raises(ValueError, match="scorer neuraldb only"):
        evaluate(make_lm(tiny_db.model, tiny_db.tok, tiny_db, batch_size=2, precision="bf16", scorer="harness"),
                 ["arc_challenge"], data_dir=arc_dir)
