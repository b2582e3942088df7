"""The Triton lookup against its torch reference over dtypes, odd sizes and seeds. On a machine
without a GPU it runs under TRITON_INTERPRET=1 (set in conftest before Triton is imported)."""
from __future__ import annotations

import os

import pytest
import torch

from neuraldb.kernels import l2_normalize, lookup, max_cosine, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,m,d", [(1, 1, 16), (5, 70, 33), (17, 130, 64), (33, 65, 100)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split", [None, 1, 3])
def test_triton_matches_reference(dtype: torch.dtype, n: int, m: int, d: int, seed: int, split: int | None) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + n)
    q = l2_normalize(torch.randn(n, d, generator=g)).to(DEVICE)
    k = l2_normalize(torch.randn(m, d, generator=g)).to(DEVICE, dtype)
    valid = (torch.rand(m, generator=g) > 0.2).to(DEVICE)
    valid[0] = True
    from neuraldb.kernels.triton_lookup import max_cosine_triton

    best, arg = max_cosine_triton(q, k, valid, split=split)
    ref_best, ref_arg = max_cosine(q.to(dtype).float() if dtype != torch.float32 else q, k.float(), valid)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(best.cpu(), ref_best.cpu(), atol=tol)
    # the argmax agrees wherever the top two are not a near-tie at this precision
    full = (q.to(dtype).float() @ k.float().T).masked_fill(~valid, float("-inf"))
    top2 = full.topk(min(2, m), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > 2 * tol) if m > 1 else torch.ones(n, dtype=torch.bool, device=full.device)
    assert torch.equal(arg[clear].cpu(), ref_arg[clear].cpu())
    assert bool((valid[arg]).all())


@pytest.mark.parametrize("split", [1, 2, 5])
def test_split_reduction_keeps_the_first_of_equal_maxima(split: int) -> None:
    """The same best key in several key ranges: the lowest row wins, as in the reference."""
    from neuraldb.kernels.triton_lookup import max_cosine_triton

    g = torch.Generator().manual_seed(7)
    k = l2_normalize(torch.randn(150, 24, generator=g)).to(DEVICE)
    k[[40, 90, 140]] = k[3].clone()  # rows 3, 40, 90, 140 tie; the splits put them in different ranges
    q = k[[3, 0, 149]].clone()
    best, arg = max_cosine_triton(q, k, block_m=16, split=split)
    ref_best, ref_arg = max_cosine(q, k)
    assert torch.equal(arg.cpu(), ref_arg.cpu()) and int(arg[0]) == 3
    assert torch.allclose(best.cpu(), ref_best.cpu(), atol=1e-5)
    assert torch.equal(lookup(q, k, impl="triton")[1].cpu(), ref_arg.cpu())


def test_no_keys_gives_minus_inf_and_minus_one() -> None:
    from neuraldb.kernels.triton_lookup import max_cosine_triton

    best, arg = max_cosine_triton(torch.ones(3, 8, device=DEVICE), torch.zeros(0, 8, device=DEVICE))
    assert bool(torch.isinf(best).all()) and arg.tolist() == [-1, -1, -1]


def test_auto_picks_torch_for_tiny_problems_and_the_cpu() -> None:
    from neuraldb.kernels import TRITON_MIN_PAIRS, choose_impl

    assert choose_impl(1, 100_000, on_cuda=False, have_triton=True) == "torch"  # the CPU: always torch
    assert choose_impl(1, 100_000, on_cuda=True, have_triton=False) == "torch"  # no Triton installed
    assert choose_impl(1, 1_000, on_cuda=True, have_triton=True) == "torch"  # a tiny decode step
    assert choose_impl(8, TRITON_MIN_PAIRS // 8, on_cuda=True, have_triton=True) == "triton"
    assert choose_impl(1, TRITON_MIN_PAIRS - 1, on_cuda=True, have_triton=True) == "torch"
    assert choose_impl(2048, 100_000, on_cuda=True, have_triton=True, dim=1536) == "triton"
    assert choose_impl(2048, 100_000, on_cuda=True, have_triton=True, dim=14336) == "torch"  # cuBLAS-bound
    assert choose_impl(16, 100_000, on_cuda=True, have_triton=True, dim=14336) == "triton"  # a decode step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,r,d", [(1, 1, 8), (7, 5, 33), (64, 40, 300)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_gather_add_matches_reference_and_leaves_closed_rows(dtype: torch.dtype, n: int, r: int, d: int,
                                                                   seed: int) -> None:
    """In place, bit for bit the reference's result; closed rows and ids outside the table keep
    their bits (negative zeros included, which `x + 0` would turn positive)."""
    from neuraldb.kernels import gather_add
    from neuraldb.kernels.triton_gather import gather_add_triton

    g = torch.Generator().manual_seed(seed * 100 + n)
    out = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    out[0, 0] = -0.0
    rows = torch.randn(r, d, generator=g).to(DEVICE)  # float32 residuals, as the table keeps them
    ids = torch.randint(-1, r + 2, (n,), generator=g).to(DEVICE)  # some -1 and some past the table
    open_ = (torch.rand(n, generator=g) > 0.4).to(DEVICE)
    want = gather_add(out, open_, ids, rows)
    got = gather_add_triton(out.clone(), open_, ids, rows)
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    shut = ~(open_ & (ids >= 0) & (ids < r))
    assert torch.equal(got[shut], out[shut]) and bool(torch.signbit(got[0, 0]) == torch.signbit(out[0, 0]) or not shut[0])
