"""Lookup kernels. `reference` (torch) is the spec and the CPU path; the Triton kernel must match
it and is imported only when used (`lookup(..., impl="triton")`, or "auto" on a CUDA device
with Triton installed). `TRITON_INTERPRET=1` runs it on the CPU for tests."""
from __future__ import annotations

import importlib.util

import torch

from .reference import gate_add, gather_add, l2_normalize, max_cosine


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# Measured on an H100 (bench/gpu.py, README "On a GPU"): below ~2^20 (query, key) pairs both
# implementations cost the same ~0.2 ms of launches; above it the fused kernel wins (1.7x at 256 x
# 100k x 1536, 8x at 2048 x 1M x 1536, where torch writes the whole (N, M) score matrix), except
# for long prefills on very wide keys, where cuBLAS's tiles beat ours (2048 x 100k x 14336:
# 15.5 ms against 19.9), hence `TORCH_MIN_QUERIES` / `TORCH_MIN_DIM`.
TRITON_MIN_PAIRS = 1 << 20
TORCH_MIN_QUERIES, TORCH_MIN_DIM = 1024, 8192


def choose_impl(n_queries: int, n_keys: int, on_cuda: bool, have_triton: bool, dim: int = 0) -> str:
    """The implementation "auto" runs: Triton on a CUDA device for problems of at least
    `TRITON_MIN_PAIRS` pairs, except compute-bound ones (>= TORCH_MIN_QUERIES queries of
    >= TORCH_MIN_DIM dims); torch otherwise (the CPU, tiny problems)."""
    if not (on_cuda and have_triton) or n_queries * n_keys < TRITON_MIN_PAIRS:
        return "torch"
    return "torch" if n_queries >= TORCH_MIN_QUERIES and dim >= TORCH_MIN_DIM else "triton"


def lookup(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None,
           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(max cosine, argmax row) per unit query; impl "torch", "triton" or "auto" (`choose_impl`)."""
    if impl == "auto":
        impl = choose_impl(queries.shape[0], keys.shape[0], queries.is_cuda, queries.is_cuda and triton_available(),
                           keys.shape[1])
    if impl == "triton":
        from .triton_lookup import max_cosine_triton

        return max_cosine_triton(queries, keys, valid)
    if impl != "torch":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return max_cosine(queries, keys, valid)


def gather_add_(out: torch.Tensor, open_: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor,
                impl: str = "auto") -> torch.Tensor:
    """`reference.gather_add` without a host sync: in place by the fused Triton kernel ("auto" on
    a CUDA device with Triton), else through torch's gather + where (a new tensor). Use the result."""
    if impl == "auto":
        impl = "triton" if out.is_cuda and triton_available() else "torch"
    if impl == "triton":
        from .triton_gather import gather_add_triton

        return gather_add_triton(out, open_, ids, rows)
    if impl != "torch":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return gather_add(out, open_, ids, rows)


__all__ = ["TORCH_MIN_DIM", "TORCH_MIN_QUERIES", "TRITON_MIN_PAIRS", "choose_impl", "gate_add", "gather_add",
           "gather_add_", "l2_normalize", "lookup", "max_cosine", "triton_available"]
