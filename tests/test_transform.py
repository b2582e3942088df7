"""The learned map of the gate's space (engine/gate_map.py, fitted by engine/map_fit.py): identity at U = 0, unit vectors
out, a round trip through safetensors, refusal of a foreign file, and a fit that separates
what the plain space cannot: positives that share a nuisance direction with ordinary text."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuraldb.engine.map_fit import FitConfig, fit_transform
from neuraldb.engine.gate_map import GateMap
from neuraldb.kernels import l2_normalize


def test_identity_at_zero_and_unit_out(tmp_path: Path) -> None:
    v = l2_normalize(torch.randn(10, 16))
    T = GateMap(torch.zeros(16, 4), torch.randn(16, 4))
    assert torch.allclose(T(v), v, atol=1e-6)
    T = GateMap(torch.randn(16, 4), torch.randn(16, 4))
    assert torch.allclose(T(v).norm(dim=-1), torch.ones(10), atol=1e-5)
    T.save(tmp_path / "t.safetensors")
    back = GateMap.load(tmp_path / "t.safetensors")
    assert torch.equal(back(v), T(v)) and torch.equal(back.U, T.U) and torch.equal(back.V, T.V)


def test_foreign_files_refused(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="junk: not a gate map"):
        GateMap.load(tmp_path / "junk")
    from safetensors.torch import save_file

    save_file({"W": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="holds tensors U and V"):
        GateMap.load(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="must both be"):
        GateMap(torch.zeros(4, 2), torch.zeros(4, 3))


def test_fit_suppresses_a_shared_nuisance() -> None:
    """Keys and their queries agree on an identity part; text tokens share a strong 'token'
    direction with the keys. In the plain space text comes within 0.05 of the positives' cosines;
    after the fit the own key still wins and text stays far below."""
    g = torch.Generator().manual_seed(0)
    d, m = 96, 64
    ident = torch.randn(m, 80, generator=g)
    token = torch.randn(1, 16, generator=g) * 6  # the look-alike part every key and text token carry
    keys = l2_normalize(torch.cat([ident, token.expand(m, -1)], 1))
    own = torch.arange(m).repeat(2)
    pos = l2_normalize(torch.cat([ident[own] + 0.5 * torch.randn(2 * m, 80, generator=g),
                                  token.expand(2 * m, -1)], 1))
    neg = l2_normalize(torch.cat([torch.randn(400, 80, generator=g), token.expand(400, -1)], 1))

    def gap(T) -> tuple[float, float]:
        k, p, n = T(keys), T(pos), T(neg)
        wins = float(((p @ k.T).argmax(1) == own).float().mean())
        return wins, float((p * k[own]).sum(1).quantile(0.1) - (n @ k.T).max(1).values.max())

    plain = GateMap(torch.zeros(d, 4), torch.zeros(d, 4))
    fitted = fit_transform(keys, pos, own, neg, FitConfig(rank=4, epochs=10, batch=64, lr=2e-2, hard=8, gamma=0.6))
    (w0, g0), (w1, g1) = gap(plain), gap(fitted)
    assert g1 > g0 + 0.2 and w1 >= w0, (w0, g0, w1, g1)  # measured: gap 0.05 -> 0.37


def test_fit_maps_the_bank_once_or_per_row_alike(monkeypatch) -> None:
    """Mapping every key once and gathering the mined ones is the same fit as mapping the
    gathered rows (the two paths `_map_whole_bank` picks between)."""
    from neuraldb.engine import map_fit

    g = torch.Generator().manual_seed(1)
    keys = l2_normalize(torch.randn(50, 24, generator=g))
    own = torch.arange(50).repeat(2)
    pos = l2_normalize(keys[own] + 0.3 * torch.randn(100, 24, generator=g))
    neg = l2_normalize(torch.randn(120, 24, generator=g))
    fits = []
    for whole in (True, False):
        monkeypatch.setattr(map_fit, "_map_whole_bank", lambda bank, gathered, w=whole: w)
        fits.append(fit_transform(keys, pos, own, neg, FitConfig(rank=4, epochs=3, batch=32, hard=6, gamma=0.6)))
    assert (fits[0].U - fits[1].U).abs().max() <= 1e-5 and (fits[0].V - fits[1].V).abs().max() <= 1e-5
    assert fits[0].U.abs().max() > 1e-3  # it trained


def test_bench_design_names_the_fit() -> None:
    from neuraldb.bench.gate import Design

    d = Design.parse("ffn+ctx5,learn")
    assert d.learn and d.context == 5 and not d.white
    assert not Design.parse("ffn+ctx5").learn
    with pytest.raises(SystemExit, match="learn"):
        Design.parse("ffn+ctx5,lern")
