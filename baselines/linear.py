"""The closed-form weight updates of MEMIT and AlphaEdit for one linear layer W (d_out, d_in),
in float64. Keys are columns: K (d_in, n), residuals R (d_out, n) = V_target - W K.

MEMIT (Meng et al. 2023): minimise ||(W + D) K - V||^2 + lam * tr(D C D^T), C = E[k k^T] of
preserved keys (lam = mom2_update_weight), so D = R K^T (lam C + K K^T)^-1.

AlphaEdit (Fang et al. 2025): restrict the update to the null space of the preserved keys,
D = D' P with P the projector on the eigenvectors of C whose eigenvalues are below a threshold;
with the Gram matrix G_p = K_p K_p^T of earlier batches' keys kept,
D = R K^T P (G_p P + K K^T P + alpha I)^-1. For a
preserved key k0 (P k0 = 0), D k0 = 0 exactly."""
from __future__ import annotations

import torch


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """D (d_out, d_in) for keys (d_in, n), residuals (d_out, n), second moment cov (d_in, d_in)."""
    k, r, c = keys.double(), resid.double(), cov.double()
    a = lam * c + k @ k.T  # (d_in, d_in), symmetric positive definite for lam > 0
    return torch.linalg.solve(a, k @ r.T).T  # D = R K^T A^-1 (A symmetric)


def null_space_projector(cov: torch.Tensor, threshold: float = 1e-2) -> torch.Tensor:
    """P (d_in, d_in): projector on the eigenvectors of cov with eigenvalue below `threshold`."""
    vals, vecs = torch.linalg.eigh(cov.double())  # ascending
    u = vecs[:, vals < threshold]  # (d_in, k)
    return u @ u.T


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor,
                     prev_gram: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """D (d_out, d_in) for keys (d_in, n) and residuals (d_out, n); `prev_gram` (d_in, d_in):
    sum of k k^T over the keys edited by earlier batches, whose edits the update should not disturb."""
    k, r, p = keys.double(), resid.double(), projector.double()
    acc = k @ k.T if prev_gram is None else k @ k.T + prev_gram.double()
    m = p @ acc + alpha * torch.eye(p.shape[0], dtype=torch.float64, device=p.device)  # (d_in, d_in)
    return torch.linalg.solve(m, p @ k @ r.T).T  # D = R K^T P M^-T
