"""Architectures whose FFN output passes a norm before it joins the residual stream (Gemma 2/3's
post_feedforward_layernorm): the residual is added after that norm, where the optimiser put it,
so its full size reaches the stream; closed tokens keep the norm's bits; detach restores both
modules."""
from __future__ import annotations

import torch

from neuraldb import NeuralDB
from neuraldb.engine.arch import get_arch, get_module
from neuraldb.engine.gated import AddAfter

from conftest import make_model
from test_engine import CFG, FACTS, UNRELATED, ffn_outputs


def test_gemma3_residual_joins_after_the_post_ffn_norm(tokenizer) -> None:
    model = make_model("gemma3_text", tokenizer)
    arch = get_arch(model)
    norm = get_module(model, arch.ffn_add.format(CFG.layer))
    proj = get_module(model, arch.ffn_out.format(CFG.layer))
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    assert db.add_path == arch.ffn_add.format(CFG.layer) != db.path
    assert isinstance(get_module(model, db.add_path), AddAfter)
    enc = tokenizer([FACTS[0].text, UNRELATED[0], FACTS[1].text], return_tensors="pt", padding=True)
    with db.disabled():
        base = ffn_outputs(model, db.add_path, enc)  # (B, T, d_model) the norm's own output
    db.add(FACTS)
    ffn_outputs(model, db.add_path, enc)
    gateable = db.gate.last_mask & enc["attention_mask"].bool()
    db.gate.gamma = float(db.gate.last[0][gateable].median())  # both kinds in one batch
    out = ffn_outputs(model, db.add_path, enc)
    _, ids, opened = db.gate.last
    assert opened.any() and (gateable & ~opened).any()
    assert torch.equal(out[~opened].view(torch.int32), base[~opened].view(torch.int32))
    res = db.table.gather(ids[opened])  # (n_open, d_model)
    # the whole residual reaches the stream (before the norm it would be rescaled with the FFN output)
    torch.testing.assert_close(out[opened] - base[opened], res.to(out.dtype), rtol=1e-5, atol=1e-5)
    db.detach()
    assert get_module(model, db.add_path) is norm and get_module(model, db.path) is proj


def test_archs_without_a_post_norm_add_at_the_projection(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    assert db.add_path == db.path and not db.gate.deferred


def test_gemma3_kv_cache_decode_adds_as_a_full_forward(tokenizer) -> None:
    """Prefill then one token a step through a cache: the same gates open and the logits with the
    residuals added after the norm equal a full forward's."""
    from transformers import DynamicCache

    from neuraldb.engine.arch import cache_kwargs, returned_cache

    model = make_model("gemma3_text", tokenizer)
    db = NeuralDB(model, tokenizer, CFG.replace(steps=2))
    db.add(FACTS)
    ids = tokenizer(FACTS[0].text + " and " + FACTS[1].text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
        sims = db.gate.last[0][db.gate.last_mask].sort().values
        k = len(sims) // 2
        db.gate.gamma = float(sims[k] + sims[k + 1]) / 2  # between two tokens: no decision rests on rounding
        full = model(input_ids=ids).logits  # (1, T, V)
        opened = db.gate.last[2].clone()
        cache, logits, steps = DynamicCache(config=model.config), [], []
        for s, e in [(0, 3)] + [(t, t + 1) for t in range(3, ids.shape[1])]:
            out = model(input_ids=ids[:, s:e], use_cache=True, **cache_kwargs(model, cache))
            cache = returned_cache(out)
            logits.append(out.logits)
            steps.append(db.gate.last[2].clone())
    assert opened.any() and torch.equal(torch.cat(steps, 1), opened)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)
