"""Inputs that share a prefix scored with the prefix run once (evaluation/prefix.py): the same
logits as a full forward on every architecture (sliding windows included), families that do
not trade a long shared context for a short common opening, and a scorer that reads fewer
tokens for the same scores and keeps the same below-l* rows (tests/test_below.py)."""
from __future__ import annotations

import pytest
import torch

from neuraldb.engine.tokens import common_length
from neuraldb.evaluation.prefix import SharedPrefix, families

from conftest import make_model

TEXTS = ["The capital of France is Paris and the mother tongue of Danielle Darrieux is French",
         "The capital of France is Paris and Berlin is the capital of Germany and Rome of Italy",
         "The capital of France is Paris.",
         "Toko Yasuda plays the guitar. Where is it? What is it? Who made it? It is a city"]


def test_families_share_long_contexts_and_cap_at_the_reads() -> None:
    ctx_a, ctx_b = list(range(100, 140)), list(range(100, 120)) + list(range(300, 320))
    inputs = [ctx_a + [1, 2], ctx_a + [3], ctx_b + [4, 5], ctx_b + [6], [7] * 30, ctx_a + [8, 9, 10]]
    reads = [len(x) - 1 for x in inputs]
    reads[5] = 38  # this input's continuation is read from inside the shared context
    got = sorted(families(inputs, reads, min_shared=16), key=lambda f: sorted(f[1]))
    # ctx_a's and ctx_b's choices share 40 tokens each; joined they would share 20
    assert got == [(38, [0, 1, 5]), (40, [2, 3]), (0, [4])]
    assert families([], [], 16) == [] and common_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert families([[1] * 20, [1] * 20 + [2]], [19, 20], min_shared=30) == [(0, [0]), (0, [1])]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_suffixes_on_a_shared_prefix_equal_full_forwards(arch: str, impl: str, tokenizer) -> None:
    """Two prefixes of different lengths in one batch, members of each with suffixes of different
    lengths, positions past Gemma-3's 16-token sliding window: every logit as one full forward."""
    model = make_model(arch, tokenizer)
    model.set_attn_implementation(impl)
    assert SharedPrefix.unsupported(model) is None
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert max(len(x) for x in seqs) > 20
    sp = SharedPrefix(model)
    prefixes = [seqs[0][:6], seqs[3][:3]]
    rows = [(0, seqs[0]), (0, seqs[1]), (0, seqs[2]), (1, seqs[3])]
    with torch.no_grad():
        pre = sp.prefixes(prefixes)
        logits = sp.suffixes(pre, [f for f, _ in rows], [x[len(prefixes[f]):] for f, x in rows], 0)
        for b, (f, x) in enumerate(rows):
            want = model(torch.tensor([x])).logits[0, len(prefixes[f]):]  # (T - P, V)
            assert torch.allclose(logits[b, : len(want)], want, atol=1e-5), (arch, impl, b)
        late = sp.suffixes(pre, [0], [seqs[0][6:]], 4)  # (1, S - 4, V): only positions from 4 on
        assert torch.allclose(late[0], logits[0, 4 : len(seqs[0]) - 6], atol=1e-5)


def test_an_attention_without_a_mask_of_ours_is_refused(tokenizer) -> None:
    model = make_model("llama", tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in SharedPrefix.unsupported(model)
    with pytest.raises(ValueError, match="attention implementation"):
        SharedPrefix(model)
