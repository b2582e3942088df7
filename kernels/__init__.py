"""Lookup kernels. `reference` (torch) is the spec and the CPU path; accelerated versions must
match it. Nothing here imports an accelerator toolkit at import time."""
from .reference import gate_add, l2_normalize, max_cosine

__all__ = ["gate_add", "l2_normalize", "max_cosine"]
