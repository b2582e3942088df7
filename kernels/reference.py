"""Torch reference kernels: the spec of every fused kernel, and the CPU path.

max_cosine:  for unit queries q (N, d) and stored unit keys K (M, d) with a validity mask,
             (max_j q.K_j, argmax_j) over valid j; (-inf, -1) where nothing is valid.
gate_add:    out + residual on rows whose similarity exceeds gamma, out untouched (bit for
             bit) elsewhere.
gather_add:  the same with the residual rows gathered by id from one dense table: the spec of
             the fused, sync-free gate of a GPU forward.
"""
from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise unit vectors, computed in float32 (or float64 if given)."""
    x = x if x.dtype == torch.float64 else x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def max_cosine(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None,
               chunk: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) best similarity and (N,) best row of `keys`; `queries` already unit-norm.

    Scores are accumulated in float32 (float64 for float64 inputs) whatever the key dtype;
    the work is split so no (N, M) block exceeds `chunk` elements."""
    n, m = queries.shape[0], keys.shape[0]
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    best = torch.full((n,), float("-inf"), dtype=acc, device=queries.device)
    arg = torch.full((n,), -1, dtype=torch.long, device=queries.device)
    if m == 0 or n == 0:
        return best, arg
    rows = max(1, chunk // max(m, 1))
    for s in range(0, n, rows):
        q = queries[s : s + rows]
        if keys.dtype in (torch.float16, torch.bfloat16) and q.device.type != "cpu":
            sims = (q.to(keys.dtype) @ keys.T).to(acc)  # (n, M): tensor cores, fp32 accumulate
        else:
            sims = q.to(acc) @ keys.to(acc).T  # (n, M)
        if valid is not None:
            sims = sims.masked_fill(~valid[None, :], float("-inf"))
        b, a = sims.max(dim=1)
        best[s : s + rows] = b
        arg[s : s + rows] = torch.where(torch.isfinite(b), a, torch.full_like(a, -1))
    return best, arg


def gate_add(out: torch.Tensor, open_: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """out (N, d) with residual (N, d) added where open_ (N,) is true; closed rows keep their bits."""
    return torch.where(open_[:, None], out + residual.to(out.dtype), out)


def gather_add(out: torch.Tensor, open_: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out (N, d) + rows[ids] (rows (R, d), ids (N,)) where open_ (N,) is true and 0 <= id < R;
    every other row keeps its bits. The residual is rounded to out's dtype before the add."""
    ok = open_ & (ids >= 0) & (ids < rows.shape[0])  # (N,)
    res = rows[ids.clamp(0, max(rows.shape[0] - 1, 0))] if rows.shape[0] else torch.zeros_like(out)  # (N, d)
    return gate_add(out, ok, res)
