"""The space the gate compares in. Keys and queries are built by the same code from the same
activations, so a fact's key and a token's query always live in one space.

- **FFN only** (`gate_context = 0`): the input of the FFN's down/out projection at l*, as MEMIT's
  `compute_ks` takes it. At early-middle layers this vector encodes the token itself far more
  than the words before it, so "Naktong River" matches a fact about "Dawa River".
- **FFN + context** (`gate_context = c > 0`): that vector and the summed output of the
  self-attention of the c blocks ending at l* (what the token has read from the text before
  it, the rest of the subject included), each scaled to unit length, concatenated with
  weights sqrt(1 - w) and sqrt(w) (w = `gate_context_weight`). The result is a unit vector
  whose cosine with another is (1 - w) cos_ffn + w cos_context: the gate stays one exact
  cosine test (argmax, then threshold) and every exact index answers it unchanged.

Attention outputs of blocks <= l* never see a residual the gate adds at l* (it is added after
them, and later tokens attend to block l*'s input), so gate decisions within a forward pass
still do not depend on residuals."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import ffn_dims, get_arch, get_module, num_layers
from .config import ConfigError, EditConfig
from .gate_map import GateMap
from .hooks import StopForward


@dataclass(frozen=True)
class KeySpace:
    ffn_path: str  # the down/out projection of l*: its input is the FFN part
    attn_paths: tuple[str, ...]  # attention modules whose summed output is the context part
    d_ffn: int
    d_ctx: int
    context_weight: float
    gate_map: GateMap | None = None  # a learned map applied last to keys and queries alike (engine/gate_map.py)

    @property
    def dim(self) -> int:
        return self.d_ffn + (self.d_ctx if self.attn_paths else 0)

    @property
    def d_raw(self) -> int:
        """Width of what a capture records: the FFN input, then the context sum if any."""
        return self.dim

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw activations (..., d_raw), or their mean over contexts, -> gate vectors (..., dim):
        the plain space (`plain`), then the gate map if there is one."""
        v = self.plain(raw)
        return v if self.gate_map is None else self.gate_map(v)

    def plain(self, raw: torch.Tensor) -> torch.Tensor:
        """The space before any map. FFN only: the activations as they are (the index
        normalises). With context: each part unit, weighted, concatenated (a unit vector)."""
        if not self.attn_paths:
            return raw
        f, c = raw[..., : self.d_ffn].float(), raw[..., self.d_ffn :].float()  # (..., d_ffn), (..., d_ctx)
        w = self.context_weight
        unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
        return torch.cat([unit(f) * math.sqrt(1 - w), unit(c) * math.sqrt(w)], -1)

    def query(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The gate's queries (N, dim) from the FFN input x (..., d_ffn) and the context sum
        (..., d_ctx) recorded by `context_hooks` in the same forward pass."""
        if not self.attn_paths:
            return self.combine(x.reshape(-1, x.shape[-1]))  # (N, d_ffn)
        if context is None or context.shape[:-1] != x.shape[:-1]:
            raise RuntimeError("the gate's context hooks recorded no attention output for this forward pass "
                               f"(context {None if context is None else tuple(context.shape)}, input {tuple(x.shape)})")
        raw = torch.cat([x.float(), context.float()], -1)  # (..., d_raw)
        return self.combine(raw.reshape(-1, raw.shape[-1]))  # (N, dim)

    def join(self, context: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """How a later attention block's output joins the context part: summed."""
        return context + a

    def context_hooks(self, model: nn.Module, sink: Any) -> list[Any]:
        """Forward hooks that leave the summed attention output of this forward pass in
        `sink.context` (fp32), set by the first module and added to by the others. Nothing is
        recorded while `sink.enabled` is False (a disabled gate), nor by a later module in a
        pass whose first module did not run (blocks below l* skipped: `start_at_layer`)."""
        handles = []
        for k, path in enumerate(self.attn_paths):
            def hook(_mod: nn.Module, _args: Any, out: Any, first: bool = k == 0) -> None:
                if not getattr(sink, "enabled", True):
                    return
                a = (out[0] if isinstance(out, tuple) else out).float()  # (B, T, d_ctx)
                if first:
                    sink.context = a
                elif sink.context is not None:
                    sink.context = self.join(sink.context, a)
            handles.append(get_module(model, path).register_forward_hook(hook))
        return handles


def key_space(model: nn.Module, layer: int, cfg: EditConfig | None = None,
              gate_map: GateMap | None = None) -> KeySpace:
    """The space of `cfg` at `layer` (None: FFN only, as the baselines' keys are), mapped by
    `gate_map` (checked by the caller against `cfg.gate_map`'s space)."""
    arch = get_arch(model)
    c = 0 if cfg is None else cfg.gate_context
    if c > layer + 1:
        raise ConfigError(f"gate_context {c}: layer {layer} has only {layer + 1} attention blocks at or below it")
    if not 0 <= layer < num_layers(model):
        raise ConfigError(f"layer {layer} is out of range for a {num_layers(model)}-layer model")
    d_ffn, d_model = ffn_dims(model, layer)
    w = 0.0 if cfg is None else cfg.gate_context_weight
    return KeySpace(arch.ffn_out.format(layer), tuple(arch.attn.format(i) for i in range(layer - c + 1, layer + 1)),
                    d_ffn, d_model, w, gate_map)


@dataclass(frozen=True)
class StackedSpace(KeySpace):
    """A capture of every context block's attention output kept apart (raw: the FFN input, then
    each block's output in forward order), nothing combined: one pass over the model serves every
    gate_context up to len(attn_paths) (`split`). The calibrator measures several spaces of a
    layer; their keys are linear in the raw activations, so averaging over prefixes commutes
    with summing the blocks."""

    @property
    def d_raw(self) -> int:
        return self.d_ffn + self.d_ctx * len(self.attn_paths)

    @property
    def dim(self) -> int:
        """Nothing is combined: a vector of this space is its raw capture."""
        return self.d_raw

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def join(self, context: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.cat([context, a], -1)

    def split(self, raw: torch.Tensor, context: int) -> torch.Tensor:
        """Raw activations (..., d_raw) of this capture -> the raw activations of the space with
        the last `context` of its blocks (..., d_ffn [+ d_ctx]): their outputs summed."""
        if not 0 <= context <= len(self.attn_paths):
            raise ValueError(f"gate_context {context}: this capture holds {len(self.attn_paths)} blocks")
        f = raw[..., : self.d_ffn]
        if context == 0:
            return f
        blocks = raw[..., self.d_ffn :].unflatten(-1, (len(self.attn_paths), self.d_ctx))  # (..., C, d_ctx)
        return torch.cat([f, blocks[..., -context:, :].sum(-2)], -1)  # (..., d_ffn + d_ctx)


def stacked_space(model: nn.Module, layer: int, context: int) -> StackedSpace:
    """The capture that serves every gate_context <= `context` at `layer` (`StackedSpace`)."""
    ks = key_space(model, layer, EditConfig(layer=layer, gate_context=context))
    return StackedSpace(ks.ffn_path, ks.attn_paths, ks.d_ffn, ks.d_ctx, 0.0)


class Capture(contextlib.AbstractContextManager):
    """Record the raw activations of `space` (B, T, d_raw) for one forward pass, and stop it at
    the FFN of l* when `stop` (nothing above l* is needed).

    with Capture(model, space, stop=True) as cap:
        model(input_ids=ids, attention_mask=mask)
    cap.raw  # (B, T, d_raw) float32
    """

    def __init__(self, model: nn.Module, space: KeySpace, stop: bool = True) -> None:
        self.context: torch.Tensor | None = None
        self.ffn_in: torch.Tensor | None = None

        def ffn_hook(_mod: nn.Module, args: tuple, out: Any) -> None:
            self.ffn_in = args[0]
            if stop:
                raise StopForward

        self._handles = space.context_hooks(model, self)
        self._handles.append(get_module(model, space.ffn_path).register_forward_hook(ffn_hook))
        self.space = space

    @property
    def raw(self) -> torch.Tensor:
        assert self.ffn_in is not None, "the forward pass never reached the gated layer"
        if not self.space.attn_paths:
            return self.ffn_in.float()
        assert self.context is not None
        return torch.cat([self.ffn_in.float(), self.context], -1)  # (B, T, d_raw)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        for h in self._handles:
            h.remove()
        return exc_type is StopForward
