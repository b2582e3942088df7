"""Fused gate in Triton: out[r] += rows[ids[r]] in place for every open row r, with no host sync
and no temporaries (the torch path gathers an (N, d) block and writes a new output).

Program (i, j) handles row i and columns [j * BLOCK_D, (j + 1) * BLOCK_D); a closed row (or an
id outside the table) loads nothing and stores nothing, so its bits are untouched.
Spec: `neuraldb.kernels.reference.gather_add` (the residual rounded to out's dtype, then added).
Imported lazily; `TRITON_INTERPRET=1` runs it on CPU tensors for tests."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _to_bf16(x):
    """float32 -> bfloat16, round to nearest even, by bits: the same on a GPU and under the
    interpreter (whose own cast truncates); NaNs stay NaN."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(x != x, (b >> 16) | 0x40, r)  # a NaN keeps a quiet-NaN payload
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gather_add_kernel(out_ptr, open_ptr, ids_ptr, rows_ptr, n_rows, d, stride_out, stride_rows,
                       BLOCK_D: tl.constexpr, BF16: tl.constexpr):
    r, j = tl.program_id(0), tl.program_id(1)
    slot = tl.load(ids_ptr + r).to(tl.int64)
    ok = (tl.load(open_ptr + r) != 0) & (slot >= 0) & (slot < n_rows)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (cols < d) & ((tl.zeros([BLOCK_D], tl.int32) + ok.to(tl.int32)) != 0)  # (BLOCK_D,)
    dst = out_ptr + r.to(tl.int64) * stride_out + cols
    x = tl.load(dst, mask=m)
    res = tl.load(rows_ptr + slot * stride_rows + cols, mask=m)
    if BF16:  # both roundings of torch's `out + res.to(bf16)`, each to nearest even
        y = _to_bf16(x.to(tl.float32) + _to_bf16(res.to(tl.float32)).to(tl.float32))
    else:
        y = (x.to(tl.float32) + res.to(x.dtype).to(tl.float32)).to(x.dtype)
    tl.store(dst, y, mask=m)


def gather_add_triton(out: torch.Tensor, open_: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor,
                      block_d: int = 256) -> torch.Tensor:
    """In place on `out` (N, d), which must be contiguous in its last dimension; returns it."""
    n, d = out.shape
    if n == 0 or rows.shape[0] == 0:
        return out
    if out.stride(1) != 1 or rows.stride(1) != 1:
        raise ValueError("gather_add_triton needs rows contiguous in the last dimension")
    grid = (n, triton.cdiv(d, block_d))
    _gather_add_kernel[grid](out, open_.to(torch.int8), ids, rows, rows.shape[0], d, out.stride(0),
                             rows.stride(0), BLOCK_D=block_d,
                             BF16=out.dtype == torch.bfloat16)
    return out
