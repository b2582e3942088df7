"""Fused max-cosine lookup in Triton: one pass over the keys per block of queries, keeping a
running (max, argmax) in registers, so the (N, M) similarity matrix is never written.

Split over keys: program (i, s) scans queries block i against the s-th of `split` key ranges and
writes a partial (max, argmax); a second reduction over the splits (first split wins ties, as the
first row does in torch) gives the answer. A decode step has one query block, so without the
split it would run on one SM; `split` defaults to enough programs to fill the device.
Addresses are int64: m * d >= 2^31 elements (100k x 14336 keys) does not overflow.

Spec: `neuraldb.kernels.reference.max_cosine` (queries cast to the key dtype, fp32 accumulate).
Imported lazily; `TRITON_INTERPRET=1` runs it on CPU tensors for tests."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _max_cos_kernel(q_ptr, k_ptr, valid_ptr, best_ptr, arg_ptr, n, m, d, stride_q, stride_k, per_split,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr):
    pid, sid = tl.program_id(0), tl.program_id(1)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_N], -1, tl.int64)
    lo = sid * per_split  # this program's key range [lo, hi), per_split a multiple of BLOCK_M
    hi = tl.minimum(lo + per_split, m)
    for start in range(lo, hi, BLOCK_M):
        cols = (start + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for dk in range(0, d, BLOCK_D):
            ds = dk + tl.arange(0, BLOCK_D)
            q = tl.load(q_ptr + rows[:, None] * stride_q + ds[None, :],
                        mask=(rows[:, None] < n) & (ds[None, :] < d), other=0.0)  # (BLOCK_N, BLOCK_D)
            k = tl.load(k_ptr + cols[:, None] * stride_k + ds[None, :],
                        mask=(cols[:, None] < hi) & (ds[None, :] < d), other=0.0)  # (BLOCK_M, BLOCK_D)
            if IEEE:
                acc += tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                acc += tl.dot(q, tl.trans(k))
        ok = (tl.load(valid_ptr + cols, mask=cols < hi, other=0) != 0) & (cols < hi)
        acc = tl.where(ok[None, :], acc, float("-inf"))
        blk_best = tl.max(acc, axis=1)
        blk_arg = tl.argmax(acc, axis=1).to(tl.int64) + start
        upd = blk_best > best  # strict: the first of equal maxima wins, as in torch
        best = tl.where(upd, blk_best, best)
        arg = tl.where(upd, blk_arg, arg)
    out = sid.to(tl.int64) * n + rows  # partials laid out (split, n)
    tl.store(best_ptr + out, best, mask=rows < n)
    tl.store(arg_ptr + out, arg, mask=rows < n)


def query_block(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for N queries. Every query block re-reads all keys, so wide blocks pay
    off once there are many queries; measured on an H100 (README, "On a GPU"): 16 rows for a
    decode step, 64 up to 128 queries, 128 rows and 8 warps for a prefill (1M x 1536 keys, 2048
    queries: 19.7 ms against 55.2 with 16 rows)."""
    if n <= 16:
        return 16, 4
    return (64, 4) if n <= 128 else (128, 8)


def default_split(n: int, m: int, device: torch.device, block_n: int, block_m: int) -> int:
    """Key splits so that query blocks x splits fill the device (4 programs per SM; 8 under the
    interpreter), never more splits than key blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    want = 4 * sms
    return max(1, min(triton.cdiv(want, triton.cdiv(n, block_n)), triton.cdiv(m, block_m)))


def max_cosine_triton(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None,
                      block_n: int | None = None, block_m: int = 64, block_d: int = 64,
                      split: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the reference `max_cosine`; unit `queries` (N, d), `keys` (M, d).
    `block_n`/`num_warps` default to `query_block(N)`."""
    n, d = queries.shape
    auto_n, auto_w = query_block(n)
    block_n, num_warps = block_n or auto_n, num_warps or auto_w
    m = keys.shape[0]
    q = queries.to(keys.dtype).contiguous()
    k = keys.contiguous()
    v = (valid if valid is not None else torch.ones(m, dtype=torch.bool, device=keys.device)).to(torch.int8)
    if n == 0:
        return torch.empty(0, device=queries.device), torch.empty(0, dtype=torch.long, device=queries.device)
    split = split or default_split(n, m, keys.device, block_n, block_m)
    per_split = max(1, triton.cdiv(triton.cdiv(m, split), block_m)) * block_m  # whole key blocks per split
    split = max(1, triton.cdiv(m, per_split))  # one program row even without keys
    best = torch.empty(split, n, dtype=torch.float32, device=queries.device)  # (split, n) partials
    arg = torch.empty(split, n, dtype=torch.long, device=queries.device)
    grid = (triton.cdiv(n, block_n), split)
    _max_cos_kernel[grid](q, k, v, best, arg, n, m, d, q.stride(0), k.stride(0), per_split, BLOCK_N=block_n,
                          BLOCK_M=block_m, BLOCK_D=block_d, IEEE=keys.dtype == torch.float32,
                          num_warps=num_warps)
    top = best.max(0).values  # (n,)
    first = (best == top[None]).to(torch.int8).argmax(0)  # the first split holding the maximum
    return top, arg.gather(0, first[None])[0]
