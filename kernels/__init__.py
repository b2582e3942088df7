"""Lookup kernels. `reference` (torch) is the spec and the CPU path; the Triton kernel must match
it and is imported only when used (`lookup(..., impl="triton")`, or "auto" on a CUDA device
with Triton installed). `TRITON_INTERPRET=1` runs it on the CPU for tests."""
from __future__ import annotations

import importlib.util

import torch

from .reference import gate_add, l2_normalize, max_cosine


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# Below this many (query, key) pairs a Triton launch (two, with the split over keys) costs more
# than it saves against torch's matmul + max; a guess from launch overheads (~10 us each), not
# yet measured on a GPU.
TRITON_MIN_PAIRS = 1 << 20


def choose_impl(n_queries: int, n_keys: int, on_cuda: bool, have_triton: bool) -> str:
    """The implementation "auto" runs: Triton on a CUDA device for problems of at least
    `TRITON_MIN_PAIRS` pairs, torch otherwise (the CPU, or tiny query x key counts)."""
    return "triton" if on_cuda and have_triton and n_queries * n_keys >= TRITON_MIN_PAIRS else "torch"


def lookup(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None,
           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(max cosine, argmax row) per unit query; impl "torch", "triton" or "auto" (`choose_impl`)."""
    if impl == "auto":
        impl = choose_impl(queries.shape[0], keys.shape[0], queries.is_cuda, queries.is_cuda and triton_available())
    if impl == "triton":
        from .triton_lookup import max_cosine_triton

        return max_cosine_triton(queries, keys, valid)
    if impl != "torch":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return max_cosine(queries, keys, valid)


__all__ = ["TRITON_MIN_PAIRS", "choose_impl", "gate_add", "l2_normalize", "lookup", "max_cosine",
           "triton_available"]
