"""Fused max-cosine lookup in Triton: one pass over the keys per block of queries, keeping a
running (max, argmax) in registers, so the (N, M) similarity matrix is never written.

Spec: `neuraldb.kernels.reference.max_cosine` (queries cast to the key dtype, fp32 accumulate).
Imported lazily; `TRITON_INTERPRET=1` runs it on CPU tensors for tests."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _max_cos_kernel(q_ptr, k_ptr, valid_ptr, best_ptr, arg_ptr, n, m, d, stride_q, stride_k,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_N], -1, tl.int32)
    for start in range(0, m, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for dk in range(0, d, BLOCK_D):
            ds = dk + tl.arange(0, BLOCK_D)
            q = tl.load(q_ptr + rows[:, None] * stride_q + ds[None, :],
                        mask=(rows[:, None] < n) & (ds[None, :] < d), other=0.0)  # (BLOCK_N, BLOCK_D)
            k = tl.load(k_ptr + cols[:, None] * stride_k + ds[None, :],
                        mask=(cols[:, None] < m) & (ds[None, :] < d), other=0.0)  # (BLOCK_M, BLOCK_D)
            if IEEE:
                acc += tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                acc += tl.dot(q, tl.trans(k))
        ok = (tl.load(valid_ptr + cols, mask=cols < m, other=0) != 0) & (cols < m)
        acc = tl.where(ok[None, :], acc, float("-inf"))
        blk_best = tl.max(acc, axis=1)
        blk_arg = tl.argmax(acc, axis=1).to(tl.int32) + start
        upd = blk_best > best  # strict: the first of equal maxima wins, as in torch
        best = tl.where(upd, blk_best, best)
        arg = tl.where(upd, blk_arg, arg)
    tl.store(best_ptr + rows, best, mask=rows < n)
    tl.store(arg_ptr + rows, arg, mask=rows < n)


def max_cosine_triton(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None,
                      block_n: int = 16, block_m: int = 64, block_d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the reference `max_cosine`; unit `queries` (N, d), `keys` (M, d)."""
    n, d = queries.shape
    m = keys.shape[0]
    q = queries.to(keys.dtype).contiguous()
    k = keys.contiguous()
    v = (valid if valid is not None else torch.ones(m, dtype=torch.bool, device=keys.device)).to(torch.int8)
    best = torch.empty(n, dtype=torch.float32, device=queries.device)
    arg = torch.empty(n, dtype=torch.int32, device=queries.device)
    if n == 0:
        return best, arg.long()
    grid = (triton.cdiv(n, block_n),)
    _max_cos_kernel[grid](q, k, v, best, arg, n, m, d, q.stride(0), k.stride(0), BLOCK_N=block_n,
                          BLOCK_M=block_m, BLOCK_D=block_d, IEEE=keys.dtype == torch.float32)
    return best, arg.long()
