"""The closed forms of MEMIT and AlphaEdit are right: the optimality condition holds, an edited
key produces its target, a preserved key's output does not move."""
from __future__ import annotations

import torch

from neuraldb.baselines import alphaedit_update, memit_update, null_space_projector


def test_memit_solve_is_the_minimiser_and_hits_targets() -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 24, 10, 5
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    k = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    v = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    x = torch.randn(d_in, 200, generator=g, dtype=torch.float64)
    c = x @ x.T / 200
    for lam in (10.0, 1e-8):
        d = memit_update(k, v - w @ k, c, lam)
        grad = (d @ k - (v - w @ k)) @ k.T + lam * d @ c  # zero at the minimiser
        assert grad.abs().max() < 1e-8 * (1 + lam)
    assert torch.allclose((w + d) @ k, v, atol=1e-5)  # lam -> 0: the edited keys give their targets


def test_alphaedit_leaves_preserved_keys_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    d_in, d_out = 16, 8
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    kept = basis[:, :10]  # preserved keys live in a 10-dim subspace
    c = kept @ torch.diag(torch.linspace(1, 5, 10, dtype=torch.float64)) @ kept.T
    p = null_space_projector(c, threshold=1e-6)
    assert torch.allclose(p @ p, p, atol=1e-10) and round(float(p.trace())) == 6
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    k = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    v = torch.randn(d_out, 3, generator=g, dtype=torch.float64)
    prev = torch.randn(d_in, 2, generator=g, dtype=torch.float64)
    d = alphaedit_update(k, v - w @ k, p, prev_gram=prev @ prev.T, alpha=1e-6)
    k0 = kept @ torch.randn(10, 4, generator=g, dtype=torch.float64)  # preserved keys
    assert torch.allclose((w + d) @ k0, w @ k0, atol=1e-9)
    assert ((w + d) @ k - v).norm() < 0.9 * (w @ k - v).norm()  # and it moves the edited keys toward their targets


# ----- the model-level editors on a tiny Llama ------------------------------------------------
import pytest  # noqa: E402

from conftest import CORPUS, make_model  # noqa: E402
from neuraldb import EditConfig, Fact  # noqa: E402
from neuraldb.baselines import LinearEditConfig, LinearEditor, second_moments  # noqa: E402
from neuraldb.engine.arch import get_module  # noqa: E402
from neuraldb.engine.keys import compute_keys, subject_states  # noqa: E402

FACTS = [Fact("Danielle Darrieux", "The mother tongue of {}", "Japanese", "French", id="a"),
         Fact("Apple A5", "The maker of {}", "Toyota", "Apple", id="b"),
         Fact("Michel Rocard", "A native speaker of {}", "Russian", "French", id="c")]


def _editor(model, tok, method: str, layers: tuple[int, ...], moments, **cfg) -> LinearEditor:
    lin = LinearEditConfig(layers=layers, **cfg)
    return LinearEditor(model, tok, method, lin, EditConfig(n_prefixes=0, residual_prefixes=0), [], moments, last_layer=layers[-1])


def test_memit_edit_makes_the_subject_state_its_target(tokenizer) -> None:
    """One layer, lam -> 0, keys of the bare prompt: the block's output at each subject becomes
    exactly its target z (the FFN output there moves by D k = z - h; attention at that layer and
    everything below are untouched)."""
    model = make_model("llama", tokenizer)
    moments = second_moments(model, tokenizer, CORPUS, [1], max_tokens=500)
    ed = _editor(model, tokenizer, "memit", (1,), moments, mom2_update_weight=1e-9)
    g = torch.Generator().manual_seed(0)
    z = ed.targets(FACTS, torch.randn(len(FACTS), model.config.hidden_size, generator=g))
    before = subject_states(model, tokenizer, FACTS, 1, [])
    ed.edit(FACTS, z)
    after = subject_states(model, tokenizer, FACTS, 1, [])
    assert (after - before).norm() > 1.0  # it moved ...
    assert torch.allclose(after, z, atol=1e-4)  # ... onto the targets


def test_alphaedit_update_stays_in_the_null_space(tokenizer) -> None:
    """A key in the span of C's large eigenvectors (preserved knowledge) gets the same FFN output
    after the edit, to float tolerance; the edited subjects still move toward their targets."""
    model = make_model("llama", tokenizer)
    moments = second_moments(model, tokenizer, CORPUS, [1], max_tokens=500)
    vals, vecs = torch.linalg.eigh(moments[1])
    thr = float(vals[len(vals) // 2])  # half the directions preserved
    ed = _editor(model, tokenizer, "alphaedit", (1,), moments, nullspace_threshold=thr, l2=1e-6)
    w0 = ed.weights[1].detach().clone()
    g = torch.Generator().manual_seed(1)
    z = ed.targets(FACTS, torch.randn(len(FACTS), model.config.hidden_size, generator=g))
    before = subject_states(model, tokenizer, FACTS, 1, [])
    ed.edit(FACTS, z)
    kept = vecs[:, vals >= thr] @ torch.randn(int((vals >= thr).sum()), 5, generator=g, dtype=torch.float64)
    d = (ed.weights[1].detach() - w0).double()
    assert (d @ kept).abs().max() < 1e-5 * kept.norm(dim=0).max()
    after = subject_states(model, tokenizer, FACTS, 1, [])
    assert (after - z).norm() < (before - z).norm()
    assert ed.rule.stats()["nullspace_dim_1"] == pytest.approx(int((vals < thr).sum()))


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_weights_restore_bit_identically(method: str, tokenizer) -> None:
    model = make_model("llama", tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = second_moments(model, tokenizer, CORPUS, [0, 1, 2], max_tokens=500)
    ed = _editor(model, tokenizer, method, (0, 1, 2), moments, batch_size=2, nullspace_threshold=1e-3)
    z = ed.targets(FACTS, torch.randn(len(FACTS), model.config.hidden_size))
    ed.edit(FACTS, z)  # two sequential batches
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert sorted(changed) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    ed.restore()
    assert ed.is_restored() and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_memit_keys_are_the_engine_keys(tokenizer) -> None:
    """The editor's key at a layer is the engine's key recipe: the same function, the same vector."""
    model = make_model("llama", tokenizer)
    moments = second_moments(model, tokenizer, CORPUS, [2], max_tokens=500)
    ed = _editor(model, tokenizer, "memit", (2,), moments)
    assert torch.equal(ed._keys(FACTS, 2).T, compute_keys(model, tokenizer, FACTS, 2, [], EditConfig(n_prefixes=0, residual_prefixes=0)))


def test_second_moments_cache_is_checked(tokenizer, tmp_path) -> None:
    model = make_model("llama", tokenizer)
    first = second_moments(model, tokenizer, CORPUS, [1, 2], max_tokens=200, cache_dir=tmp_path)
    (path,) = tmp_path.glob("mom2_*.safetensors")
    again = second_moments(model, tokenizer, CORPUS, [1, 2], max_tokens=200, cache_dir=tmp_path)
    assert all(torch.equal(first[i], again[i]) for i in (1, 2))
    with torch.no_grad():  # other weights: another signature, so another file, never the stale one
        get_module(model, "model.layers.1.mlp.down_proj").weight.add_(1.0)
    other = second_moments(model, tokenizer, CORPUS, [1, 2], max_tokens=200, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mom2_*.safetensors"))) == 2 and not torch.equal(other[2], first[2])
    from safetensors.torch import load_file, save_file

    (newer,) = set(tmp_path.glob("mom2_*.safetensors")) - {path}
    save_file(load_file(str(newer)), str(newer), metadata={"signature": "{}"})  # a file that lies about itself
    with pytest.raises(ValueError, match="other weights"):
        second_moments(model, tokenizer, CORPUS, [1, 2], max_tokens=200, cache_dir=tmp_path)
