"""The residual optimiser's blocks from l* up as plain functions, for `torch.compile`.

Every residual step runs the decoder blocks above l* forward and backward over a few hundred
suffix tokens. Through the model's own modules that is ~60 small ops per block, each a separate
pass over memory with its own dispatch, and the GEMMs are only a third of the time
(docs/editing-speed.md). Here one block is one function of its weights (q/k/v and gate/up fused
into one matrix each), so `torch.compile` makes one graph that serves every block and fuses the
norms, rotary, softmax and SwiGLU (and their backward) into a few kernels.

The model's modules stay the spec (`residual_blocks: hf`, the CPU fallback and every other
architecture); tests hold the functions here to them on tiny models. An architecture is served
here only when its `model_type` is in `STEP_BLOCKS`."""
from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .arch import get_arch, get_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockShape:
    """What a block function needs beside tensors (constants of the model)."""

    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    scaling: float


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of a float32 stream: (..., d) -> (..., d) float32."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as the model applies it: x (R, H, S, hd), cos/sin (R, 1, S, hd)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def llama_block(x: torch.Tensor, ln1: torch.Tensor, wqkv: torch.Tensor, wo: torch.Tensor, ln2: torch.Tensor,
                wgu: torch.Tensor, wd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor, shape: BlockShape) -> torch.Tensor:
    """One Llama decoder block over suffix tokens with cached earlier keys/values: the stream x
    (R, S, d) float32 in and out, GEMMs in the weights' dtype. `mask` (R, 1, G*S, P+S) is additive
    (causal within the suffix, padding masked), tiled over the G query heads of a KV head."""
    R, S, _ = x.shape
    H, Hkv, hd = shape.n_heads, shape.n_kv, shape.head_dim
    low = wqkv.dtype
    qkv = (_rms(x, ln1, shape.eps).to(low) @ wqkv.t()).view(R, S, H + 2 * Hkv, hd).transpose(1, 2)  # (R, H+2Hkv, S, hd)
    q, k, v = qkv.split([H, Hkv, Hkv], 1)
    q, k = _rope(q.float(), cos, sin), _rope(k.float(), cos, sin)
    k = torch.cat([past_k, k.to(low)], 2)  # (R, Hkv, P+S, hd)
    v = torch.cat([past_v, v], 2)  # (R, Hkv, P+S, hd)
    q = q.to(low).reshape(R, Hkv, (H // Hkv) * S, hd)  # (R, Hkv, G*S, hd): a KV head's G query heads stacked
    att = ((q @ k.transpose(-1, -2)).float() * shape.scaling + mask).softmax(-1)  # (R, Hkv, G*S, P+S)
    o = (att.to(low) @ v).view(R, H, S, hd).transpose(1, 2).reshape(R, S, H * hd)  # (R, S, H*hd)
    x = x + (o @ wo.t()).float()
    g, u = (_rms(x, ln2, shape.eps).to(low) @ wgu.t()).chunk(2, -1)  # (R, S, d_ff) each
    return x + ((F.silu(g) * u) @ wd.t()).float()


@dataclass
class StepStack:
    """The blocks from l* up of one model as `block` calls on fused weights (cast once to `dtype`),
    then the model's final norm. `run` adds the delta to block l*'s FFN output at one position per
    row, as the hooked model does."""

    block: Callable[..., torch.Tensor]
    weights: list[tuple[torch.Tensor, ...]]  # per block from l*: (ln1, wqkv, wo, ln2, wgu, wd)
    shape: BlockShape
    rotary: torch.nn.Module
    norm: torch.nn.Module
    compiled: Callable[..., torch.Tensor] | None = None  # `block` under torch.compile, for blocks above l*

    def run(self, hidden: torch.Tensor, delta: torch.Tensor, delta_pos: torch.Tensor, position_ids: torch.Tensor,
            mask: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """hidden (R, S, d) entering l*, delta (R, d), position_ids (R, S), mask (R, P+S) over the
        cached tokens then the suffix, past: (K, V) (R, Hkv, P, hd) per block from l*, in the
        weights' dtype (the caller's `_Steps.cast` puts them there once). Returns the
        final-norm hidden states (R, S, d)."""
        R, S, _ = hidden.shape
        P = mask.shape[1] - S
        with torch.no_grad():
            cos, sin = self.rotary(hidden, position_ids)  # (R, S, hd) each
            cos, sin = cos.float()[:, None], sin.float()[:, None]  # (R, 1, S, hd)
            causal = torch.ones(S, S, dtype=torch.bool, device=hidden.device).tril()  # (S, S)
            allowed = torch.cat([mask[:, None, :P].bool().expand(R, S, P),
                                 causal[None] & mask[:, None, P:].bool()], 2)  # (R, S, P+S)
            add = torch.zeros(allowed.shape, device=hidden.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
            add = add[:, None].repeat(1, 1, self.shape.n_heads // self.shape.n_kv, 1)  # (R, 1, G*S, P+S)
        rows = torch.arange(R, device=hidden.device)
        x = hidden.float()
        if self.compiled is not None:  # rows, suffix and cached lengths vary from call to call
            marks = [(cos, (0, 2)), (sin, (0, 2)), (add, (0, 2, 3))] + [(t, (0, 2)) for kv in past for t in kv]
            for t, dims in marks:
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        with torch.autocast(hidden.device.type, enabled=False), compile_settings():  # the functions set every dtype
            # block l* eagerly: its input needs no gradient (the delta joins after it), every later
            # block's does, and one compiled graph serves those
            x = self.block(x, *self.weights[0], cos, sin, add, *past[0], self.shape)
            x = x.index_put((rows, delta_pos), delta.float(), accumulate=True)  # (R, S, d)
            for w, (pk, pv) in zip(self.weights[1:], past[1:]):
                if self.compiled is not None:
                    torch._dynamo.maybe_mark_dynamic(x, 0)
                    torch._dynamo.maybe_mark_dynamic(x, 1)
                x = self._call(x, *w, cos, sin, add, pk, pv, self.shape)
            return self.norm(x)

    def _call(self, *args: object) -> torch.Tensor:
        """One block above l*: compiled where it compiles; a compiler that fails (no working C++
        toolchain, an unsupported op) is logged once and the stack runs eagerly from then on."""
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001  a real fault of the function raises again below, eagerly
                log.warning("torch.compile of the residual steps' blocks failed (%s: %s); running them eagerly",
                            type(e).__name__, e)
                self.compiled = None
        return self.block(*args)


def _llama(model: PreTrainedModel, layer: int, dtype: torch.dtype) -> StepStack:
    cfg = model.config
    blocks = get_module(model, get_arch(model).layers)
    weights = []
    for blk in list(blocks)[layer:]:
        a, m = blk.self_attn, blk.mlp
        cast = lambda *ws: torch.cat([w.detach() for w in ws]).to(dtype)  # noqa: E731
        weights.append((blk.input_layernorm.weight.detach().float(), cast(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                        cast(a.o_proj.weight), blk.post_attention_layernorm.weight.detach().float(),
                        cast(m.gate_proj.weight, m.up_proj.weight), cast(m.down_proj.weight)))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = BlockShape(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, float(cfg.rms_norm_eps),
                       head_dim**-0.5)
    return StepStack(llama_block, weights, shape, model.base_model.rotary_emb, model.base_model.norm)


def _llama_like(model: PreTrainedModel) -> bool:
    """The Llama block exactly: no biases, SiLU, plain RoPE; else the model's own modules run."""
    cfg = model.config
    return (not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "hidden_act", "silu") == "silu" and getattr(cfg, "pretraining_tp", 1) == 1)


# model_type -> (does this model fit the functions?, build its stack)
STEP_BLOCKS: dict[str, tuple[Callable[[PreTrainedModel], bool], Callable[..., StepStack]]] = {
    "llama": (_llama_like, _llama),
    "mistral": (_llama_like, _llama),
}

COMPILE_MIN_FACTS = 256  # "auto" compiles for a call of at least this many facts (a compile costs ~40 s)


def supported(model: PreTrainedModel) -> bool:
    entry = STEP_BLOCKS.get(getattr(model.config, "model_type", ""))
    return entry is not None and entry[0](model)


def compiler_available() -> bool:
    """Whether `torch.compile` can build CPU kernels here (Inductor needs a C++ compiler)."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def choose(mode: str, model: PreTrainedModel, n_facts: int, device: torch.device) -> str:
    """What `residual_blocks` runs: "hf" (the model's modules), "fused" (the functions here, eager)
    or "compiled". "auto" compiles for calls of >= COMPILE_MIN_FACTS facts on a supported model
    where a compiler is found (the GPU compiles with Triton), and runs the model's modules otherwise."""
    if mode != "auto":
        if mode != "hf" and not supported(model):
            log.info("residual_blocks %s: model_type %r has no step functions; the model's modules run",
                     mode, model.config.model_type)
            return "hf"
        return mode
    if supported(model) and n_facts >= COMPILE_MIN_FACTS and (device.type != "cpu" or compiler_available()):
        return "compiled"
    return "hf"


def build(model: PreTrainedModel, layer: int, dtype: torch.dtype, compiled: bool) -> StepStack:
    """The stack of `model` from block `layer` up, weights cast to `dtype`; with `compiled` its
    block is `torch.compile`d (one graph for every block, shapes dynamic)."""
    stack = STEP_BLOCKS[model.config.model_type][1](model, layer, dtype)
    if compiled:
        stack.compiled = torch.compile(stack.block)
    return stack


@contextmanager
def compile_settings() -> Iterator[None]:
    """Compiler settings for the step functions, scoped to their calls: sizes that happen to be
    equal (64 rows, head_dim 64) are not taken for one symbol, and a few more graphs may be kept
    (one-token suffixes and single rows are specialised) before calls fall back to eager."""
    from torch.fx.experimental import _config as fx_config

    with torch._dynamo.config.patch(recompile_limit=32), fx_config.patch(use_duck_shape=False):
        yield
