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
    d = alphaedit_update(k, v - w @ k, p, prev_keys=prev, alpha=1e-6)
    k0 = kept @ torch.randn(10, 4, generator=g, dtype=torch.float64)  # preserved keys
    assert torch.allclose((w + d) @ k0, w @ k0, atol=1e-9)
    assert ((w + d) @ k - v).norm() < 0.9 * (w @ k - v).norm()  # and it moves the edited keys toward their targets
