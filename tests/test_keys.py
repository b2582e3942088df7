"""Keys: the prefix-cache path equals the reference recipe (every row run in full)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuraldb import EditConfig, Fact
from neuraldb.engine.arch import get_module
from neuraldb.engine.tokens import shared_len
from neuraldb.engine.keys import (calibration_queries, compute_keys, generate_prefixes, key_inputs,
                                 key_rows_by_context)

from conftest import make_model

FACTS = [Fact("Danielle Darrieux", "The mother tongue of {} is", "English"), Fact("Paris", "{} is the capital of", "Italy"),
         Fact("Apple A5", "The maker of {}", "Toyota"), Fact("Toko Yasuda", "{} plays the", "piano"),
         Fact("Michel Rocard", "Where is {} from? It is", "Rome")]
CFG = EditConfig(layer=1, n_prefixes=3, prefix_len=4, key_batch_size=3)  # batches of 3: odd sizes, buckets


def test_prefix_cache_keys_equal_reference(arch: str, tokenizer) -> None:
    model = make_model(arch, tokenizer)
    prefixes = generate_prefixes(model, tokenizer, CFG)
    for k, p in enumerate(prefixes):  # the cache really is used: some tokens are shared
        rows = [key_inputs(tokenizer, f, prefixes)[1 + k] for f in FACTS]
        assert shared_len(tokenizer(p)["input_ids"], rows) > 0
    ref = compute_keys(model, tokenizer, FACTS, 1, prefixes, CFG, reuse_prefix_cache=False)
    fast = compute_keys(model, tokenizer, FACTS, 1, prefixes, CFG)
    assert fast.shape == ref.shape == (len(FACTS), model.config.intermediate_size if hasattr(
        model.config, "intermediate_size") else ref.shape[1])
    assert (fast - ref).abs().max() <= 1e-5
    assert not torch.equal(ref[0], ref[1])


def test_calibration_queries_run_in_batches_as_one_at_a_time(arch: str, tokenizer) -> None:
    """Texts of unequal length, bucketed and right-padded, give each text's queries in order, as
    one forward per text does (every token but the first, context blocks joined)."""
    model = make_model(arch, tokenizer)
    texts = [tokenizer(t)["input_ids"] for t in ("Paris is the capital of France, a country in Europe.",
                                                 "The piano", "Toko Yasuda plays the guitar and sings", "A")]
    cfg = EditConfig(layer=1, gate_context=2)
    one = calibration_queries(model, tokenizer, 1, cfg, texts, batch=1)
    assert one.shape[0] == sum(len(t) - 1 for t in texts)
    for batch in (2, 3):
        got = calibration_queries(model, tokenizer, 1, cfg, texts, batch=batch)
        assert got.shape == one.shape and (got - one).abs().max() <= 1e-5
    assert calibration_queries(model, tokenizer, 1, cfg, []).shape[0] == 0


@pytest.mark.parametrize("heads", [True, False])
def test_one_pass_serves_every_context_as_its_own_database_does(arch: str, heads: bool, tokenizer) -> None:
    """Key rows of several gate spaces of a layer from one pass (each block's attention output
    kept apart, then summed per space) are the rows each space's database encodes itself."""
    from neuraldb import NeuralDB

    model = make_model(arch, tokenizer)
    cfg = CFG.replace(layer=2, gate_context_weight=0.3)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    got = key_rows_by_context(model, tokenizer, FACTS, 2, prefixes, cfg, (0, 1, 3), heads=heads)
    for c, rows in got.items():
        db = NeuralDB(model, tokenizer, cfg.replace(gate_context=c, gamma=0.5, head_gamma=0.5 if heads else None))
        try:
            want = db.encode_keys(FACTS)
        finally:
            db.detach()
        assert rows.shape == want.shape and (rows - want).abs().max() <= 1e-5, c
    assert got[1].shape[1] == got[3].shape[1] and not torch.allclose(got[1], got[3])


def test_suffix_residuals_match_full_rows(arch: str, tokenizer) -> None:
    """Residual steps that run only the tokens from the subject on (earlier tokens' keys and
    values cached) optimise the same function as steps over whole rows."""
    from neuraldb.engine.arch import get_arch
    from neuraldb.engine.residuals import compute_residuals

    model = make_model(arch, tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=6, lr=0.5, weight_decay=0.1, residual_batch_size=3,
                      loss_stop=0.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    full, s_full = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_suffix=False))
    fast, s_fast = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    assert torch.equal(s_full.steps, s_fast.steps)
    assert torch.allclose(fast, full, atol=1e-4, rtol=1e-3), (fast - full).abs().max()
    assert torch.allclose(s_fast.nll, s_full.nll, atol=1e-4)
    assert full.norm(dim=1).min() > 0  # the optimisation moved every residual
    window = getattr(model.config, "sliding_window", None) or 10**9
    if get_arch(model).suffix_cache and window >= 32:  # the suffix path really ran (bit-identical would mean it did not)
        assert not torch.equal(fast, full)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_residuals_read_a_shared_prefix_from_its_one_run(arch: str, dtype: str, tokenizer, monkeypatch) -> None:
    """Rows that start with a generated prefix read its keys, values and hidden states from one
    run of it (`reuse_prefix_cache`): the same steps, NLL and residuals as running every row in
    full, up to float rounding; the shared tokens really are left out of the rows' passes."""
    from neuraldb.engine import residuals
    from neuraldb.engine.arch import get_arch

    model = make_model(arch, tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=6, lr=0.5, weight_decay=0.1, residual_batch_size=3,
                      loss_stop=0.0, residual_dtype=dtype, kl_contexts=("{} was",))
    prefixes = generate_prefixes(model, tokenizer, cfg)
    shared = []
    real = residuals._parts
    monkeypatch.setattr(residuals, "_parts", lambda *a: shared.append(p := real(*a)) or p)
    ref, s_ref = residuals.compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg, reuse_prefix_cache=False)
    assert not shared
    got, s_got = residuals.compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    window = getattr(model.config, "sliding_window", None) or 10**9
    assert bool(shared) == (get_arch(model).suffix_cache and window >= 32)  # rows longer than a window run whole
    if not shared:
        assert torch.equal(got, ref)
    if shared:  # each batch: the bare rows and both prefixes' rows, every prefix sharing tokens
        assert all(len(parts) == 3 and all((n > 0) == (pre is not None) for _, n, pre in parts) for parts in shared)
        assert all(sum(n > 0 for _, n, _ in parts) == 2 for parts in shared)
    assert torch.equal(s_ref.steps, s_got.steps)
    tol = 1e-4 if dtype == "float32" else 3e-2
    assert torch.allclose(got, ref, atol=tol, rtol=tol), (got - ref).abs().max()
    assert torch.allclose(s_got.nll, s_ref.nll, atol=tol)
    assert ref.norm(dim=1).min() > 0


@pytest.mark.parametrize("window", [4, 128])
def test_sliding_window_models_serve_suffix_steps_from_a_cache_only_within_the_window(window: int, tokenizer,
                                                                                       monkeypatch) -> None:
    """Gemma 3 (sliding-window layers): within the window the suffix path runs and optimises the
    same function as whole rows; rows longer than the window run whole (a sliding layer's cache
    would drop their first tokens)."""
    from transformers import AutoModelForCausalLM

    from conftest import CONFIGS
    from neuraldb.engine import residuals

    torch.manual_seed(0)
    conf = CONFIGS["gemma3_text"](len(tokenizer))
    conf.sliding_window = window
    conf.eos_token_id = conf.pad_token_id = conf.bos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").eval()
    calls = []
    real = residuals._suffix_steps
    monkeypatch.setattr(residuals, "_suffix_steps", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = CFG.replace(n_prefixes=1, residual_prefixes=1, steps=4, lr=0.5, loss_stop=0.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    full, _ = residuals.compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_suffix=False))
    fast, _ = residuals.compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    assert bool(calls) == (window == 128)
    assert torch.allclose(fast, full, atol=1e-4, rtol=1e-3)
    assert torch.equal(fast, full) == (window == 4)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_more_kl_contexts_over_every_position_run_the_same_on_both_paths(arch_name: str, tokenizer) -> None:
    """`kl_contexts` + `kl_span: all`: KL entries at every token of several neutral prompts
    score the same on suffix rows as on whole rows, and they change the residual."""
    from neuraldb.engine.residuals import compute_residuals

    model = make_model(arch_name, tokenizer)
    cfg = CFG.replace(n_prefixes=1, residual_prefixes=1, steps=5, lr=0.5, loss_stop=0.0, kl_factor=1.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    wide = cfg.replace(kl_contexts=("Yesterday I read about {} and then", "{} was"), kl_span="all")
    full, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, wide.replace(residual_suffix=False))
    fast, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, wide)
    assert torch.allclose(fast, full, atol=1e-4, rtol=1e-3), (fast - full).abs().max()
    plain, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    assert not torch.allclose(plain, fast, atol=1e-3)


def test_length_groups_are_the_cheapest_partition() -> None:
    """The dynamic programme against every split of the sorted distinct lengths into runs."""
    import itertools
    import random

    from neuraldb.engine.residuals import length_groups

    rng = random.Random(0)
    for trial in range(200):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 14))]
        cost = rng.choice([0, 1, 8, 50])
        groups = length_groups(lengths, cost)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))  # a partition of the rows
        price = lambda gs: sum(cost + len(g) * max(lengths[r] for r in g) for g in gs)  # noqa: E731
        vals = sorted(set(lengths))
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=len(vals) - 1):
            runs, cur = [], [vals[0]]
            for v, c in zip(vals[1:], cuts):
                if c:
                    runs.append(cur)
                    cur = []
                cur.append(v)
            runs.append(cur)
            best = min(best, price([[r for r, x in enumerate(lengths) if x in run] for run in runs]))
        assert price(groups) == best, (lengths, cost, groups)
    assert length_groups([3, 1, 3, 1], cost=0) == [[1, 3], [0, 2]]
    assert length_groups([3, 1, 3, 1], cost=100) == [[0, 1, 2, 3]]


def test_grouped_suffix_rows_match_one_padded_batch(tokenizer) -> None:
    """Rows run in groups of like length (KL rows apart from target rows) optimise the same
    function as one padded batch, and results come back in the caller's order."""
    from neuraldb.engine.residuals import compute_residuals, suffix_length

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=5, residual_batch_size=2, loss_stop=0.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    lens = [suffix_length(tokenizer, f) for f in FACTS]
    assert lens != sorted(lens)  # the batches really are reordered
    one, s_one = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_pack=False))
    grouped, s_grouped = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    assert torch.equal(s_one.steps, s_grouped.steps)
    assert torch.allclose(grouped, one, atol=1e-4, rtol=1e-3), (grouped - one).abs().max()
    assert torch.allclose(s_grouped.nll, s_one.nll, atol=1e-4)
    assert not torch.equal(grouped, one)


def test_stopped_facts_leave_the_batch(arch: str, tokenizer) -> None:
    """Facts stop at different steps (loss below `loss_stop`) and their rows leave every later
    step; each fact's residual, NLL and step count equal those of optimising it alone."""
    from neuraldb.engine.residuals import compute_residuals

    model = make_model(arch, tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=8, lr=0.5, weight_decay=0.1, residual_batch_size=5)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    _, probe = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(loss_stop=0.0))
    cfg = cfg.replace(loss_stop=float(probe.nll.median()) + 1e-3)  # about half the facts stop early
    together, s_together = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    alone, s_alone = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_batch_size=1))
    assert len(set(s_together.steps.tolist())) > 1 and int(s_together.steps.min()) < cfg.steps  # facts stopped apart
    assert torch.equal(s_together.steps, s_alone.steps)
    assert torch.allclose(together, alone, atol=1e-4, rtol=1e-3), (together - alone).abs().max()
    assert torch.allclose(s_together.nll, s_alone.nll, atol=1e-4)


def test_subject_first_and_last_tokens_bound_the_subject(tokenizer) -> None:
    from neuraldb.engine.keys import subject_spans

    prefixes = ["Because of this.", "Hello world."]
    for fact in FACTS:
        for ids, first in key_inputs(tokenizer, fact, prefixes, at="first"):
            text = tokenizer.decode(ids)
            assert 0 <= first < len(ids)
            assert tokenizer.decode(ids[first:]).lstrip().startswith(fact.subject[:1]), (text, first)
        lasts = [i for _, i in key_inputs(tokenizer, fact, prefixes)]
        firsts = [i for _, i in key_inputs(tokenizer, fact, prefixes, at="first")]
        assert all(f <= last for f, last in zip(firsts, lasts))
    spans = subject_spans(tokenizer, FACTS, prefixes)
    assert spans.shape == (len(FACTS),) and (spans >= 0).all()
    with pytest.raises(ValueError, match="at"):
        compute_keys(None, tokenizer, FACTS, 1, prefixes, CFG, at="middle")


def test_gradient_start_jumps_to_the_clamp_along_steepest_descent(tokenizer) -> None:
    """`residual_init: gradient`: the first step is -grad / |grad| scaled to `init_scale` times the
    norm clamp (no Adam state), every later step is Adam's; the result still lowers the NLL."""
    from neuraldb.engine.residuals import compute_residuals

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=1, lr=0.5, loss_stop=0.0, weight_decay=0.0,
                      clamp_norm=2.0, residual_init="gradient", init_scale=0.5)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    one, s_one = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    again, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(init_scale=1.0))
    ratio = again.norm(dim=1) / one.norm(dim=1)
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=1e-4)  # the clamp's scale, same direction
    assert torch.allclose(again / again.norm(dim=1, keepdim=True), one / one.norm(dim=1, keepdim=True), atol=1e-5)
    _, s_zero = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_init="zero", steps=1))
    _, s_more = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(steps=8))
    assert float(s_more.nll.mean()) < float(s_zero.nll.mean())
    with pytest.raises(Exception, match="residual_init"):
        cfg.replace(residual_init="newton")


def test_nll_stop_ends_a_fact_once_its_target_is_learned(tokenizer) -> None:
    """With `nll_stop`, a fact stops at the first step whose target NLL is below it, though MEMIT's
    loss (NLL + KL + weight decay) is still above `loss_stop`; the others run on, as alone."""
    from neuraldb.engine.residuals import compute_residuals

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=1, residual_prefixes=1, steps=8, lr=0.5, weight_decay=0.1, residual_batch_size=5,
                      loss_stop=0.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    _, ref = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg, history=True)
    stop = float(ref.history[4].median())  # about half the facts get below it by step 4
    _, st = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(nll_stop=stop), history=True)
    first_below = [int((ref.history[:, f] < stop).nonzero()[0]) if (ref.history[:, f] < stop).any() else cfg.steps
                   for f in range(len(FACTS))]
    assert st.steps.tolist() == [min(k, cfg.steps) for k in first_below]
    assert 0 < int((st.steps < cfg.steps).sum()) < len(FACTS)
    stopped = st.steps < cfg.steps
    assert bool((st.nll[stopped] < stop).all())
    with pytest.raises(Exception, match="nll_stop"):
        EditConfig(nll_stop=-1.0)


def _greedy_right(model, tokenizer, facts, layer: int, prefixes, residuals: torch.Tensor) -> list[bool]:
    """Per fact, from a plain forward: is every token of " target_new" the argmax on the rewrite
    prompt (the first prefixed one where the subject starts the prompt, as the optimiser does) with
    the residual added to the FFN output at the subject's last token?"""
    from neuraldb.engine.arch import get_arch
    from neuraldb.engine.hooks import Trace
    from neuraldb.engine.tokens import encode_with_subject, target_ids

    out = []
    for f, r in zip(facts, residuals):
        enc = encode_with_subject(tokenizer, "", f.prompt, f.subject)
        if enc.subject_last == 0:
            enc = encode_with_subject(tokenizer, prefixes[0], f.prompt, f.subject)
        tgt = target_ids(tokenizer, f.target_new)
        ids = torch.tensor([enc.ids + tgt[:-1]])  # (1, T)

        def add(o: torch.Tensor, at: int = enc.subject_last, r: torch.Tensor = r) -> torch.Tensor:
            o = o.clone()
            o[0, at] += r
            return o

        with torch.no_grad(), Trace(model, get_arch(model).add_path(layer), retain_input=False, edit_output=add):
            logits = model(ids).logits[0]  # (T, V)
        pred = logits[len(enc.ids) - 1 :].argmax(-1)  # (n_target,) what greedy decoding emits
        out.append(pred.tolist() == tgt)
    return out


def test_warmup_steps_read_each_facts_first_row_only(tokenizer, monkeypatch) -> None:
    """With `residual_warmup` W the first W steps are the steps of the first row alone (the bare
    prompt here: the history equals a run with no prefixed rows), run fewer rows, stop no fact;
    then every row is read and the result ends near the plain run's NLL."""
    from neuraldb.engine import residuals as R

    model = make_model("llama", tokenizer)
    facts = [f for f in FACTS if not f.prompt.startswith("{}")]  # the bare prompt is each one's first row
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=12, lr=0.5, weight_decay=0.1, loss_stop=0.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    rows: list[int] = []
    real = R._Steps.run
    monkeypatch.setattr(R._Steps, "run", lambda self, *a, **k: rows.append(len(self.rows)) or real(self, *a, **k))
    # the clamp and weight decay scale with the block's output norm at a prefixed row: off for the comparison
    free = cfg.replace(weight_decay=0.0, clamp_norm=100.0)
    _, bare = R.compute_residuals(model, tokenizer, facts, 1, prefixes, free.replace(residual_prefixes=0, steps=4),
                                  history=True)
    _, warm = R.compute_residuals(model, tokenizer, facts, 1, prefixes, free.replace(residual_warmup=4), history=True)
    assert torch.allclose(warm.history[:4], bare.history[:4], atol=1e-5)  # the warm-up: the bare rows' steps
    assert torch.equal(warm.greedy_history[:4], bare.greedy_history[:4])
    _, plain = R.compute_residuals(model, tokenizer, facts, 1, prefixes, cfg, history=True)
    rows.clear()
    _, warm = R.compute_residuals(model, tokenizer, facts, 1, prefixes, cfg.replace(residual_warmup=4), history=True)
    # no fact stops (loss_stop 0): 4 steps of the bare and KL rows, 8 of all four rows per fact
    assert sum(rows) == len(facts) * (4 * 2 + 8 * (cfg.residual_prefixes + 2)), rows
    assert 0 < warm.block_tokens < plain.block_tokens
    assert float(warm.nll.mean()) <= 1.5 * float(plain.nll.mean()) + 0.05, (warm.nll, plain.nll)
    _, early = R.compute_residuals(model, tokenizer, facts, 1, prefixes, cfg.replace(residual_warmup=4, nll_stop=1e3))
    assert early.steps.tolist() == [4] * len(facts)  # nothing stops before every row was read
    with pytest.raises(Exception, match="residual_warmup"):
        EditConfig(steps=4, residual_warmup=4)


def test_the_optimiser_reports_whether_each_facts_greedy_answer_is_right(tokenizer) -> None:
    """`ResidualStats.greedy` says, per fact, whether greedy decoding of the rewrite prompt with the
    residual at the subject emits the whole new object, as a plain forward with that residual
    finds: at zero, at large random residuals, and at one steered along the LM head's row of a
    one-token object where the subject ends the prompt (right there). `greedy_history` follows
    the NLL history's steps (NaN where it is), its first row the unedited model's answers."""
    from neuraldb.engine.residuals import _optimise, compute_residuals, residual_contexts
    from neuraldb.engine.tokens import target_ids

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=1, residual_prefixes=1, steps=6, lr=0.5, residual_batch_size=3, loss_stop=0.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    word = next(w for w in ("piano", "speak", "the", "is") if len(target_ids(tokenizer, w)) == 1)
    facts = [*FACTS, Fact("Apple A5", "The maker of {}", word)]  # the subject's last token predicts the object
    contexts = residual_contexts(prefixes, cfg)
    d = model.config.hidden_size
    zero = torch.zeros(len(facts), d)
    big = torch.randn(len(facts), d, generator=torch.Generator().manual_seed(0)) * 30
    steer = zero.clone()
    steer[-1] = model.get_output_embeddings().weight[target_ids(tokenizer, word)[0]].detach() * 1e3
    seen = set()
    for r in (zero, big, steer):
        _, st = _optimise(model, tokenizer, facts, 1, contexts, cfg, start=r)  # measured at r, no step
        want = _greedy_right(model, tokenizer, facts, 1, prefixes, r)
        assert [bool(g) for g in st.greedy.tolist()] == want
        seen |= set(want)
    assert seen == {True, False}
    _, ref = compute_residuals(model, tokenizer, facts, 1, prefixes, cfg, history=True)
    assert ref.greedy_history.shape == ref.history.shape
    assert torch.equal(torch.isnan(ref.greedy_history), torch.isnan(ref.history))
    unedited = _greedy_right(model, tokenizer, facts, 1, prefixes, zero)
    assert ref.greedy_history[0].tolist() == [float(z) for z in unedited]


def test_bf16_steps_learn_what_float32_steps_learn_and_leave_the_model_as_it_was(arch: str, tokenizer) -> None:
    """`residual_dtype: bfloat16`: the steps' GEMMs run in bf16 (weights cast once per batch), the
    loss and the residual stream in float32. Measured in float32 (`residual_nll`), the residuals
    lower every fact's NLL about as far as float32 steps do; the model keeps its float32 weights
    and its attention implementation."""
    from neuraldb.engine.residuals import compute_residuals, residual_nll

    model = make_model(arch, tokenizer)
    model.set_attn_implementation("sdpa")
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=8, lr=0.5, weight_decay=0.0, clamp_norm=4.0,
                      loss_stop=0.0, residual_batch_size=5)  # room to learn: every fact's NLL falls
    prefixes = generate_prefixes(model, tokenizer, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref, s_ref = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    low, s_low = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_dtype="bfloat16"))
    assert model.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # the bf16 path really ran
    zero = residual_nll(model, tokenizer, FACTS, 1, prefixes, cfg, torch.zeros_like(ref))
    n_ref = residual_nll(model, tokenizer, FACTS, 1, prefixes, cfg, ref)
    n_low = residual_nll(model, tokenizer, FACTS, 1, prefixes, cfg, low)
    assert bool((n_low < zero).all()) and bool((n_ref < zero).all())
    gain_ref, gain_low = zero - n_ref, zero - n_low  # (F,) what each run learned
    assert bool((gain_low >= 0.8 * gain_ref).all()), (gain_low, gain_ref)
    assert torch.allclose(s_low.nll, s_ref.nll, atol=0.01)  # the NLL each run reports, bf16 and float32
    assert float(F.cosine_similarity(low, ref).min()) > 0.99  # and the residuals point the same way


def test_residual_nll_measures_residuals_where_the_optimiser_left_them(tokenizer) -> None:
    """A fact that stopped on `nll_stop` keeps the residual whose NLL the optimiser reported:
    `residual_nll` (float32, no step) reads that same number back; zero residuals give the
    unedited NLL, which every learned residual lowers."""
    from neuraldb.engine.residuals import compute_residuals, residual_nll

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=1, residual_prefixes=1, steps=8, lr=0.5, weight_decay=0.0, clamp_norm=4.0,
                      residual_batch_size=2, loss_stop=0.0)
    prefixes = generate_prefixes(model, tokenizer, cfg)
    _, ref = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg, history=True)
    cfg = cfg.replace(nll_stop=float(ref.history[4].median()))
    res, st = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    nll = residual_nll(model, tokenizer, FACTS, 1, prefixes, cfg, res)
    stopped = st.steps < cfg.steps
    assert 0 < int(stopped.sum()) < len(FACTS)
    assert torch.allclose(nll[stopped], st.nll[stopped], atol=1e-5)
    zero = residual_nll(model, tokenizer, FACTS, 1, prefixes, cfg, torch.zeros_like(res))
    assert torch.allclose(zero, ref.history[0], atol=1e-5)  # the first step's NLL is the unedited one
    moved = st.steps > 0  # a fact below the stop from the start keeps a zero residual
    assert bool(moved.any()) and bool((nll[moved] < zero[moved]).all()) and torch.equal(nll[~moved], zero[~moved])


def test_auto_step_precision_follows_the_device(monkeypatch) -> None:
    from neuraldb.engine.residuals import FAST_BF16, step_dtype

    cpu = torch.device("cpu")
    assert step_dtype(EditConfig(), cpu) == torch.float32  # the built-in default is float32 everywhere
    assert step_dtype(EditConfig(residual_dtype="bfloat16"), cpu) == torch.bfloat16
    monkeypatch.setitem(FAST_BF16, "cpu", lambda: True)
    assert step_dtype(EditConfig(residual_dtype="auto"), cpu) == torch.bfloat16
    monkeypatch.setitem(FAST_BF16, "cpu", lambda: False)
    assert step_dtype(EditConfig(residual_dtype="auto"), cpu) == torch.float32
    assert step_dtype(EditConfig(residual_dtype="auto"), torch.device("meta")) == torch.float32  # unknown: float32
    with pytest.raises(Exception, match="residual_dtype"):
        EditConfig(residual_dtype="float16")


@pytest.mark.parametrize("arch", sorted(__import__("neuraldb.engine.step_blocks", fromlist=["x"]).STEP_BLOCKS))
def test_fused_step_blocks_compute_what_the_models_modules_compute(arch: str, tokenizer, monkeypatch) -> None:
    """`residual_blocks: fused` (engine/step_blocks.py: a block as one function of fused weights)
    is held to the model's own modules: in float32 the same residuals, NLLs and step counts; in
    bf16 the same within bf16's rounding. The model is left as it was."""
    from neuraldb.engine.residuals import compute_residuals
    from neuraldb.engine import step_blocks

    model = make_model(arch, tokenizer)
    assert step_blocks.supported(model)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=6, lr=0.5, weight_decay=0.1, clamp_norm=4.0,
                      loss_stop=0.0, residual_batch_size=3, residual_blocks="hf")
    prefixes = generate_prefixes(model, tokenizer, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref, s_ref = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    calls = []
    run = step_blocks.StepStack.run
    monkeypatch.setattr(step_blocks.StepStack, "run", lambda self, *a: calls.append(1) or run(self, *a))
    fused, s_fused = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_blocks="fused"))
    assert torch.allclose(fused, ref, rtol=1e-4, atol=1e-5), float((fused - ref).abs().max())
    assert torch.allclose(s_fused.nll, s_ref.nll, atol=1e-5) and torch.equal(s_fused.steps, s_ref.steps)
    assert calls  # the functions ran
    low = cfg.replace(residual_dtype="bfloat16")
    ref_b, s_ref_b = compute_residuals(model, tokenizer, FACTS, 1, prefixes, low)
    fused_b, s_fused_b = compute_residuals(model, tokenizer, FACTS, 1, prefixes, low.replace(residual_blocks="fused"))
    assert float(F.cosine_similarity(fused_b, ref_b).min()) > 0.99
    assert torch.allclose(s_fused_b.nll, s_ref_b.nll, atol=0.02)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_step_blocks_read_the_projection_the_gate_wraps(tokenizer) -> None:
    """With a database attached, block l*'s down projection is the gate's wrapper (the original
    kept as `base_layer`): the step functions read its weight through it, so residuals of a live
    database (a call of >= 256 facts under `auto` compiles them) equal the model's modules'."""
    from neuraldb import NeuralDB

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=4, lr=0.5, loss_stop=0.0, residual_batch_size=3,
                      residual_blocks="hf")
    db = NeuralDB(model, tokenizer, cfg)
    db.add(FACTS[:1])
    assert hasattr(get_module(model, db.add_path), "base_layer")  # wrapped, as in every live database
    ref = db.encode_residuals(FACTS)
    db.config = db.config.replace(residual_blocks="fused")
    fused = db.encode_residuals(FACTS)
    assert torch.allclose(fused, ref, rtol=1e-4, atol=1e-5), float((fused - ref).abs().max())


@pytest.mark.parametrize("arch", sorted(__import__("neuraldb.engine.step_blocks", fromlist=["x"]).STEP_BLOCKS))
def test_the_flat_stream_computes_what_the_groups_compute(arch: str, tokenizer, monkeypatch) -> None:
    """`residual_stream: flat` (every length group's tokens end to end above l*, attention per
    group) gives the model's modules' residuals, NLLs and step counts in float32, with every row in
    a group of its own length (so one call carries several groups), and a stopped fact still
    leaves the stream."""
    from neuraldb.engine import residuals, step_blocks
    from neuraldb.engine.residuals import compute_residuals

    model = make_model(arch, tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=6, lr=0.5, weight_decay=0.1, clamp_norm=4.0,
                      loss_stop=0.0, residual_batch_size=3, residual_blocks="hf")
    prefixes = generate_prefixes(model, tokenizer, cfg)
    ref, s_ref = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    monkeypatch.setattr(residuals, "FLAT_GROUP_COST", 0)  # a group per suffix length
    calls: list[int] = []
    run_flat = step_blocks.StepStack.run_flat
    monkeypatch.setattr(step_blocks.StepStack, "run_flat", lambda self, g: calls.append(len(g)) or run_flat(self, g))
    flat, s_flat = compute_residuals(model, tokenizer, FACTS, 1, prefixes,
                                     cfg.replace(residual_blocks="fused", residual_stream="flat"))
    assert torch.allclose(flat, ref, rtol=1e-4, atol=1e-5), float((flat - ref).abs().max())
    assert torch.allclose(s_flat.nll, s_ref.nll, atol=1e-5) and torch.equal(s_flat.steps, s_ref.steps)
    assert max(calls) > 1  # several groups in one call
    stop = cfg.replace(nll_stop=float(s_ref.nll.median()), steps=12)  # some facts stop early, others run on
    ref_s, st_ref = compute_residuals(model, tokenizer, FACTS, 1, prefixes, stop)
    calls.clear()
    got_s, st_got = compute_residuals(model, tokenizer, FACTS, 1, prefixes,
                                      stop.replace(residual_blocks="fused", residual_stream="flat"))
    assert torch.allclose(got_s, ref_s, rtol=1e-4, atol=1e-5) and torch.equal(st_got.steps, st_ref.steps)
    assert len(set(st_got.steps.tolist())) > 1
    with pytest.raises(Exception, match="residual_stream"):
        EditConfig(residual_stream="ragged")


def test_residual_blocks_choice(tokenizer, monkeypatch) -> None:
    """"auto" compiles only for large calls on a supported model with a compiler; an architecture
    without step functions always runs its own modules."""
    from neuraldb.engine import step_blocks

    cpu = torch.device("cpu")
    llama, gpt2 = make_model("llama", tokenizer), make_model("gpt2", tokenizer)
    monkeypatch.setattr(step_blocks, "compiler_available", lambda: True)
    assert step_blocks.choose("auto", llama, step_blocks.COMPILE_MIN_FACTS, cpu) == "compiled"
    assert step_blocks.choose("auto", llama, 4, cpu) == "hf"
    assert step_blocks.choose("auto", gpt2, 10**6, cpu) == "hf"
    assert step_blocks.choose("fused", gpt2, 4, cpu) == "hf"
    assert step_blocks.choose("fused", llama, 4, cpu) == "fused"
    monkeypatch.setattr(step_blocks, "compiler_available", lambda: False)
    assert step_blocks.choose("auto", llama, 10**6, cpu) == "hf"
    with pytest.raises(Exception, match="residual_blocks"):
        EditConfig(residual_blocks="triton")


def test_compiled_step_blocks_equal_the_eager_functions(tokenizer) -> None:
    """`residual_blocks: compiled`: the same functions under torch.compile (one graph for every
    block above l*, sizes dynamic) give the eager functions' residuals, in float32 and over
    batches of several row and suffix lengths. Compiling takes a minute on two cores."""
    from neuraldb.engine.residuals import compute_residuals

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=2, residual_prefixes=2, steps=4, lr=0.5, weight_decay=0.1, clamp_norm=4.0,
                      loss_stop=0.0, residual_batch_size=3, residual_blocks="fused")
    prefixes = generate_prefixes(model, tokenizer, cfg)
    ref, s_ref = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    got, s_got = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_blocks="compiled"))
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-5), float((got - ref).abs().max())
    assert torch.allclose(s_got.nll, s_ref.nll, atol=1e-4)
    flat = cfg.replace(residual_stream="flat")  # the block's three parts compiled, the stream laid flat
    got, s_got = compute_residuals(model, tokenizer, FACTS, 1, prefixes, flat.replace(residual_blocks="compiled"))
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-5), float((got - ref).abs().max())
    assert torch.allclose(s_got.nll, s_ref.nll, atol=1e-4)


def test_a_compiler_that_fails_leaves_the_eager_functions(tokenizer, monkeypatch, caplog) -> None:
    """Where torch.compile cannot build (no C++ toolchain, an unsupported op), the warning says so
    once and the residuals are the eager functions'."""
    from neuraldb.engine import step_blocks
    from neuraldb.engine.residuals import compute_residuals

    def broken(fn):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")
        return call

    model = make_model("llama", tokenizer)
    cfg = CFG.replace(n_prefixes=1, residual_prefixes=1, steps=3, lr=0.5, loss_stop=0.0, residual_batch_size=3,
                      residual_blocks="fused")
    prefixes = generate_prefixes(model, tokenizer, cfg)
    ref, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg)
    monkeypatch.setattr(step_blocks.torch, "compile", broken)
    with caplog.at_level("WARNING", logger="neuraldb.engine.step_blocks"):
        got, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, cfg.replace(residual_blocks="compiled"))
    assert torch.equal(got, ref)
    assert sum("running them eagerly" in r.message for r in caplog.records) == 1
    flat = cfg.replace(residual_stream="flat")
    ref, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, flat)
    caplog.clear()
    with caplog.at_level("WARNING", logger="neuraldb.engine.step_blocks"):
        got, _ = compute_residuals(model, tokenizer, FACTS, 1, prefixes, flat.replace(residual_blocks="compiled"))
    assert torch.equal(got, ref)
    assert sum("block parts failed" in r.message for r in caplog.records) == 1
