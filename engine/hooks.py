"""Hook context managers in the style of MEMIT's nethook: hooks are always removed on exit."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .arch import get_module, set_module


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed activations are captured."""


class Trace(contextlib.AbstractContextManager):
    """Record a module's input and/or output; optionally stop the forward pass after it.

    with Trace(model, "model.layers.6.mlp.down_proj", stop=True) as tr:
        run(model)          # StopForward is swallowed by the context
    tr.input  # (B, T, d_ff)
    """

    def __init__(self, model: nn.Module, path: str, retain_input: bool = True,
                 retain_output: bool = False, stop: bool = False,
                 edit_output: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.input: torch.Tensor | None = None
        self.output: Any = None
        module = get_module(model, path)

        def hook(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if retain_input:
                self.input = args[0] if args else next(iter(kwargs.values()))
            if edit_output is not None:
                out = edit_output(out)
            if retain_output:
                self.output = out
            if stop:
                raise StopForward
            return out

        self._handle = module.register_forward_hook(hook, with_kwargs=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._handle.remove()
        return exc_type is StopForward


class TraceDict(contextlib.ExitStack):
    """Several Traces at once, keyed by path; all are removed on exit."""

    def __init__(self, model: nn.Module, paths: list[str], **kwargs: Any) -> None:
        super().__init__()
        self.traces = {p: self.enter_context(Trace(model, p, **kwargs)) for p in paths}

    def __getitem__(self, path: str) -> Trace:
        return self.traces[path]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        super().__exit__(exc_type, exc, tb)
        return exc_type is StopForward


def first_hidden(out: Any) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5 Llama, GPT-2) or a tuple (GPT-J)."""
    return out[0] if isinstance(out, tuple) else out


class _Passthrough(nn.Module):
    """Stands in for a decoder block whose output is replaced anyway; mimics its return type."""

    def __init__(self, tuple_len: int) -> None:
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.tuple_len:
            return (hidden_states,) + (None,) * (self.tuple_len - 1)
        return hidden_states


@contextlib.contextmanager
def start_at_layer(model: nn.Module, layers_path: str, layer: int, hidden: torch.Tensor,
                   tuple_len: int) -> Iterator[None]:
    """Run forward passes from decoder block `layer` on, feeding it the cached `hidden`
    (B, T, d_model) instead of recomputing every block below it."""
    layers = get_module(model, layers_path)
    saved = [layers[i] for i in range(layer)]

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(layer):
            set_module(model, f"{layers_path}.{i}", _Passthrough(tuple_len))
        yield
    finally:
        handle.remove()
        for i, mod in enumerate(saved):
            set_module(model, f"{layers_path}.{i}", mod)


@contextlib.contextmanager
def autocast_above(model: nn.Module, layer: int, dtype: torch.dtype = torch.bfloat16,
                   weights: dict[nn.Module, tuple[int, torch.Tensor, torch.Tensor | None]] | None = None
                   ) -> Iterator[None]:
    """Run the decoder blocks above `layer` and the LM head under `torch.autocast(dtype)`; the
    blocks up to `layer`, and so every gate decision at it, keep the model's own precision.
    The residual stream stays in the model's dtype (autocast only lowers the GEMMs and attention)
    and the head's logits come back in it, so log-softmaxes are taken at full precision. `layer`
    -1 lowers every block. `weights`, a dict the caller keeps across calls, holds each lowered
    `nn.Linear`'s weight already cast (keyed by module, cast again when the weight's version
    moves): autocast would cast it in every forward, to the same values (bit for bit), at a cost
    that dominates a short pass."""
    from .arch import get_arch, model_device

    device = model_device(model).type
    full = next(model.parameters()).dtype
    layers = get_module(model, get_arch(model).layers)
    head = model.get_output_embeddings()
    patched: list[tuple[nn.Module, Any]] = []

    def wrap(mod: nn.Module, cast_back: bool) -> None:
        inner = mod.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device, dtype=dtype):
                out = inner(*args, **kwargs)
            return out.to(full) if cast_back else out

        patched.append((mod, mod.__dict__.get("forward")))
        mod.forward = forward  # an instance attribute: nn.Module.__call__ reads self.forward

    def pre_cast(lin: nn.Linear, cache: dict[nn.Module, tuple[int, torch.Tensor, torch.Tensor | None]]) -> None:
        have = cache.get(lin)
        if have is None or have[0] != lin.weight._version:
            bias = None if lin.bias is None else lin.bias.detach().to(dtype)
            have = cache[lin] = (lin.weight._version, lin.weight.detach().to(dtype), bias)
        _, w, b = have

        def forward(x: torch.Tensor) -> torch.Tensor:  # autocast's own casts, done once
            return torch.nn.functional.linear(x.to(dtype), w, b)

        patched.append((lin, lin.__dict__.get("forward")))
        lin.forward = forward

    try:
        lowered = list(layers)[layer + 1:]
        if weights is not None:  # inside the autocast wrappers below
            for mod in [m for block in lowered for m in block.modules()] + [head]:
                if type(mod) is nn.Linear and "forward" not in mod.__dict__:
                    pre_cast(mod, weights)
        for block in lowered:
            wrap(block, cast_back=False)
        wrap(head, cast_back=True)
        yield
    finally:
        for mod, prev in reversed(patched):
            if prev is None:
                del mod.forward
            else:
                mod.forward = prev
