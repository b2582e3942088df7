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

from .arch import base_weight, get_arch, get_module

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


def llama_qkv(x: torch.Tensor, ln1: torch.Tensor, wqkv: torch.Tensor, eps: float) -> torch.Tensor:
    """The attention's input norm and fused q/k/v projection: x (..., d) float32 -> (..., (H+2Hkv)*hd)
    in the weights' dtype. Row-wise, so it runs on any number of tokens laid end to end."""
    return _rms(x, ln1, eps).to(wqkv.dtype) @ wqkv.t()


def llama_attn(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, past_k: torch.Tensor,
               past_v: torch.Tensor, shape: BlockShape) -> torch.Tensor:
    """Attention of suffix tokens over cached earlier keys/values and each other: qkv (R, S, ...)
    from `llama_qkv` -> (R, S, H*hd) in its dtype. `mask` (R, 1, G*S, P+S) is additive (causal
    within the suffix, padding masked), tiled over the G query heads of a KV head."""
    R, S, _ = qkv.shape
    H, Hkv, hd = shape.n_heads, shape.n_kv, shape.head_dim
    low = qkv.dtype
    q, k, v = qkv.view(R, S, H + 2 * Hkv, hd).transpose(1, 2).split([H, Hkv, Hkv], 1)  # (R, H|Hkv, S, hd)
    q, k = _rope(q.float(), cos, sin), _rope(k.float(), cos, sin)
    k = torch.cat([past_k, k.to(low)], 2)  # (R, Hkv, P+S, hd)
    v = torch.cat([past_v, v], 2)  # (R, Hkv, P+S, hd)
    q = q.to(low).reshape(R, Hkv, (H // Hkv) * S, hd)  # (R, Hkv, G*S, hd): a KV head's G query heads stacked
    att = ((q @ k.transpose(-1, -2)).float() * shape.scaling + mask).softmax(-1)  # (R, Hkv, G*S, P+S)
    return (att.to(low) @ v).view(R, H, S, hd).transpose(1, 2).reshape(R, S, H * hd)  # (R, S, H*hd)


def llama_mlp(x: torch.Tensor, o: torch.Tensor, wo: torch.Tensor, ln2: torch.Tensor, wgu: torch.Tensor,
              wd: torch.Tensor, eps: float) -> torch.Tensor:
    """The attention's output projection and residual, then the SwiGLU MLP and its residual:
    x (..., d) float32 and o (..., H*hd) -> (..., d) float32. Row-wise, like `llama_qkv`."""
    x = x + (o @ wo.t()).float()
    g, u = (_rms(x, ln2, eps).to(wgu.dtype) @ wgu.t()).chunk(2, -1)  # (..., d_ff) each
    return x + ((F.silu(g) * u) @ wd.t()).float()


def llama_block(x: torch.Tensor, ln1: torch.Tensor, wqkv: torch.Tensor, wo: torch.Tensor, ln2: torch.Tensor,
                wgu: torch.Tensor, wd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor, shape: BlockShape) -> torch.Tensor:
    """One Llama decoder block over suffix tokens with cached earlier keys/values: the stream x
    (R, S, d) float32 in and out, GEMMs in the weights' dtype (see `llama_attn` for the mask)."""
    o = llama_attn(llama_qkv(x, ln1, wqkv, shape.eps), cos, sin, mask, past_k, past_v, shape)  # (R, S, H*hd)
    return llama_mlp(x, o, wo, ln2, wgu, wd, shape.eps)


@dataclass(frozen=True)
class BlockParts:
    """A block as three calls, for the flat stream (`StepStack.run_flat`): the row-wise part before
    attention, attention itself (per length group), the row-wise part after it."""

    qkv: Callable[..., torch.Tensor]
    attn: Callable[..., torch.Tensor]
    mlp: Callable[..., torch.Tensor]


@dataclass
class StepStack:
    """The blocks from l* up of one model as `block` calls on fused weights (cast once to `dtype`),
    then the model's final norm. `run` adds the delta to block l*'s FFN output at one position per
    row, as the hooked model does; `run_flat` does the same for several length groups at once."""

    block: Callable[..., torch.Tensor]
    weights: list[tuple[torch.Tensor, ...]]  # per block from l*: (ln1, wqkv, wo, ln2, wgu, wd)
    shape: BlockShape
    rotary: torch.nn.Module
    norm: torch.nn.Module
    compiled: Callable[..., torch.Tensor] | None = None  # `block` under torch.compile, for blocks above l*
    parts: BlockParts | None = None  # `block` as three calls, for `run_flat`
    compiled_parts: BlockParts | None = None

    def _masks(self, hidden: torch.Tensor, position_ids: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary cos/sin (R, 1, S, hd) and the additive attention mask (R, 1, G*S, P+S) of a group
        whose suffix tokens (R, S) attend to P cached tokens (`mask` (R, P+S): 1 where real)."""
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
        return cos, sin, add

    def _first(self, hidden: torch.Tensor, delta: torch.Tensor, delta_pos: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, add: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Block l* eagerly (its input needs no gradient; the delta joins after it), delta added."""
        x = self.block(hidden.float(), *self.weights[0], cos, sin, add, *past, self.shape)  # (R, S, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return x.index_put((rows, delta_pos), delta.float(), accumulate=True)

    def run(self, hidden: torch.Tensor, delta: torch.Tensor, delta_pos: torch.Tensor, position_ids: torch.Tensor,
            mask: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """hidden (R, S, d) entering l*, delta (R, d), position_ids (R, S), mask (R, P+S) over the
        cached tokens then the suffix, past: (K, V) (R, Hkv, P, hd) per block from l*, in the
        weights' dtype (the caller's `_Steps.cast` puts them there once). Returns the
        final-norm hidden states (R, S, d)."""
        cos, sin, add = self._masks(hidden, position_ids, mask)
        if self.compiled is not None:  # rows, suffix and cached lengths vary from call to call
            _dynamic(_group_marks(cos, sin, add, past))
        with torch.autocast(hidden.device.type, enabled=False), compile_settings():  # the functions set every dtype
            x = self._first(hidden, delta, delta_pos, cos, sin, add, past[0])
            for w, (pk, pv) in zip(self.weights[1:], past[1:]):
                if self.compiled is not None:
                    _dynamic([(x, (0, 1))])
                x = self._call(x, *w, cos, sin, add, pk, pv, self.shape)
            return self.norm(x)

    def run_flat(self, groups: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """`run` for several length groups at once, each (hidden, delta, delta_pos, position_ids,
        mask, past) as `run` takes it. Above l* every group's tokens are laid end to end as one
        (N, d) stream for the norms, projections and MLP (one GEMM per weight per block, however
        many groups), and only attention runs per group, on views of that stream. Returns each
        group's final-norm hidden states (R, S, d)."""
        masks = [self._masks(h, pos, m) for h, _, _, pos, m, _ in groups]
        assert self.parts is not None, "run_flat needs the block's parts"
        if self.compiled_parts is not None:
            _dynamic([m for mk, g in zip(masks, groups) for m in _group_marks(*mk, g[5])])
        with torch.autocast(groups[0][0].device.type, enabled=False), compile_settings():
            xs = [self._first(h, dl, dp, *mk, past[0]) for (h, dl, dp, _, _, past), mk in zip(groups, masks)]
            sizes = [x.shape[:2] for x in xs]
            flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])  # (N, d): every group's tokens end to end
            for b, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.weights[1:], 1):
                if self.compiled_parts is not None:
                    _dynamic([(flat, (0,))])
                qkv = self._part("qkv", flat, ln1, wqkv, self.shape.eps)  # (N, (H+2Hkv)*hd)
                outs, at = [], 0
                for (R, S), mk, g in zip(sizes, masks, groups):
                    view = qkv[at : at + R * S].view(R, S, -1)  # (R, S, (H+2Hkv)*hd)
                    if self.compiled_parts is not None:
                        _dynamic([(view, (0, 1))])
                    o = self._part("attn", view, *mk, *g[5][b], self.shape)  # (R, S, H*hd)
                    outs.append(o.reshape(R * S, -1))  # (R*S, H*hd)
                    at += R * S
                flat = self._part("mlp", flat, torch.cat(outs), wo, ln2, wgu, wd, self.shape.eps)  # (N, d)
            out = self.norm(flat)  # (N, d)
        return [y.view(R, S, -1) for y, (R, S) in zip(out.split([R * S for R, S in sizes]), sizes)]  # (R, S, d) each

    def _part(self, name: str, *args: object) -> torch.Tensor:
        """One part of a block above l* (`run_flat`), compiled where it compiles (see `_compiled`)."""
        compiled = getattr(self.compiled_parts, name) if self.compiled_parts is not None else None
        return self._compiled("compiled_parts", "block parts", compiled, getattr(self.parts, name), args)

    def _call(self, *args: object) -> torch.Tensor:
        """One block above l*, compiled where it compiles (see `_compiled`)."""
        return self._compiled("compiled", "blocks", self.compiled, self.block, args)

    def _compiled(self, attr: str, what: str, compiled: Callable[..., torch.Tensor] | None,
                  eager: Callable[..., torch.Tensor], args: tuple[object, ...]) -> torch.Tensor:
        """`compiled(*args)`; a compiler that fails (no working C++ toolchain, an unsupported op) is
        logged once, `attr` is cleared so the stack runs `eager` from then on, and this call runs it."""
        if compiled is not None:
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001  a real fault of the function raises again below, eagerly
                log.warning("torch.compile of the residual steps' %s failed (%s: %s); running them eagerly",
                            what, type(e).__name__, e)
                setattr(self, attr, None)
        return eager(*args)


def _group_marks(cos: torch.Tensor, sin: torch.Tensor, add: torch.Tensor,
                 past: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """A group's varying sizes: rows and suffix length of cos/sin, those and the cached length of
    the mask and of every block's cached keys/values."""
    return [(cos, (0, 2)), (sin, (0, 2)), (add, (0, 2, 3))] + [(t, (0, 2)) for kv in past for t in kv]


def _dynamic(marks: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """Tell the compiler these sizes vary from call to call (rows, suffix and cached lengths)."""
    for t, dims in marks:
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _llama(model: PreTrainedModel, layer: int, dtype: torch.dtype) -> StepStack:
    cfg = model.config
    blocks = get_module(model, get_arch(model).layers)
    weights = []
    for blk in list(blocks)[layer:]:
        a, m = blk.self_attn, blk.mlp
        # through the gate's wrapper at l*: residuals are computed on the unedited projection
        cast = lambda *ms: torch.cat([base_weight(x).detach() for x in ms]).to(dtype)  # noqa: E731
        weights.append((blk.input_layernorm.weight.detach().float(), cast(a.q_proj, a.k_proj, a.v_proj),
                        cast(a.o_proj), blk.post_attention_layernorm.weight.detach().float(),
                        cast(m.gate_proj, m.up_proj), cast(m.down_proj)))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = BlockShape(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, float(cfg.rms_norm_eps),
                       head_dim**-0.5)
    return StepStack(llama_block, weights, shape, model.base_model.rotary_emb, model.base_model.norm,
                     parts=BlockParts(llama_qkv, llama_attn, llama_mlp))


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
        if stack.parts is not None:
            stack.compiled_parts = BlockParts(*(torch.compile(f) for f in (stack.parts.qkv, stack.parts.attn,
                                                                          stack.parts.mlp)))
    return stack


@contextmanager
def compile_settings() -> Iterator[None]:
    """Compiler settings for the step functions, scoped to their calls: sizes that happen to be
    equal (64 rows, head_dim 64) are not taken for one symbol, and a few more graphs may be kept
    (one-token suffixes and single rows are specialised) before calls fall back to eager."""
    from torch.fx.experimental import _config as fx_config

    with torch._dynamo.config.patch(recompile_limit=32), fx_config.patch(use_duck_shape=False):
        yield
