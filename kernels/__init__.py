"""Lookup kernels. `reference` (torch) is the spec and the CPU path; the Triton kernel must match
it and is imported only when used (`lookup(..., impl="triton")`, or "auto" on a CUDA device
with Triton installed). `TRITON_INTERPRET=1` runs it on the CPU for tests."""
from __future__ import annotations

import importlib.util

import torch

from .reference import gate_add, l2_normalize, max_cosine


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def lookup(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None,
           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(max cosine, argmax row) per unit query; impl "torch", "triton" or "auto"."""
    if impl == "auto":
        impl = "triton" if queries.is_cuda and triton_available() else "torch"
    if impl == "triton":
        from .triton_lookup import max_cosine_triton

        return max_cosine_triton(queries, keys, valid)
    if impl != "torch":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return max_cosine(queries, keys, valid)


__all__ = ["gate_add", "l2_normalize", "lookup", "max_cosine", "triton_available"]
