"""Architecture paths as data, keyed by `config.model_type` (never by sniffing model names)."""
from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    layers: str  # the ModuleList of decoder blocks
    ffn_out: str  # the FFN's down/out projection of layer {}; its input is the key
    attn: str  # the self-attention module of layer {}; its output (first element) joins a context key
    conv1d: bool = False  # GPT-2 style Conv1D: weight is (in, out)
    suffix_cache: bool = True  # residual steps may serve earlier tokens from a KV cache
    # where a residual is added when not to ffn_out's output: the norm that the FFN's output passes
    # before it joins the residual stream (Gemma 2/3's post_feedforward_layernorm). Added before
    # such a norm, a residual is rescaled with the FFN output and cannot outgrow it.
    ffn_add: str = ""

    def add_path(self, layer: int) -> str:
        """The module of layer `layer` whose output a residual is added to."""
        return (self.ffn_add or self.ffn_out).format(layer)


ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch("transformer.h", "transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn", conv1d=True),
    "gptj": Arch("transformer.h", "transformer.h.{}.mlp.fc_out", "transformer.h.{}.attn"),
    "gpt_neox": Arch("gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}.attention"),
    "llama": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn"),
    "mistral": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn"),
    "qwen2": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn"),
    "qwen3": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn"),
    "gemma": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn"),
    "gemma2": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn",
                   ffn_add="model.layers.{}.post_feedforward_layernorm"),
    "gemma3_text": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn",
                        ffn_add="model.layers.{}.post_feedforward_layernorm"),
    "gemma3": Arch("model.language_model.layers", "model.language_model.layers.{}.mlp.down_proj",
                   "model.language_model.layers.{}.self_attn",
                   ffn_add="model.language_model.layers.{}.post_feedforward_layernorm"),
    "phi3": Arch("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn"),
}


class UnsupportedModelError(ValueError):
    pass


def get_arch(model: nn.Module) -> Arch:
    model_type = getattr(model.config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type '{model_type}' has no entry in neuraldb.engine.arch.ARCHITECTURES; "
            f"supported: {sorted(ARCHITECTURES)}"
        ) from None


def get_module(model: nn.Module, path: str) -> nn.Module:
    mod: nn.Module = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)  # type: ignore[index]
    return mod


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if name.isdigit():
        parent[int(name)] = new  # type: ignore[index]
    else:
        setattr(parent, name, new)


def num_layers(model: nn.Module) -> int:
    return len(get_module(model, get_arch(model).layers))


def base_weight(mod: nn.Module) -> torch.Tensor:
    """A projection's own weight, read through a wrapper that keeps the original as `base_layer`
    (the gate around block l*'s FFN output, as PEFT does)."""
    return getattr(mod, "base_layer", mod).weight


def ffn_dims(model: nn.Module, layer: int) -> tuple[int, int]:
    """(key dim = d_ff, residual dim = d_model) of the FFN output projection at `layer`."""
    arch = get_arch(model)
    w = base_weight(get_module(model, arch.ffn_out.format(layer)))
    return (int(w.shape[0]), int(w.shape[1])) if arch.conv1d else (int(w.shape[1]), int(w.shape[0]))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@functools.lru_cache(maxsize=None)
def _cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: object) -> dict[str, object]:
    """The KV-cache keyword of `model.forward`: `cache` on transformers >= 5.2x, where
    `past_key_values` is deprecated, `past_key_values` before."""
    return {_cache_name(type(model)): cache}


def passed_cache(kwargs: dict[str, object]) -> object:
    """The KV cache a forward call received, under either keyword."""
    got = kwargs.get("cache")
    return got if got is not None else kwargs.get("past_key_values")


def returned_cache(out: object) -> object:
    """The KV cache a forward returned: `out.cache` where the installed transformers names it
    so (reading `out.past_key_values` there logs a deprecation), else `out.past_key_values`."""
    got = out.get("cache") if hasattr(out, "get") else None  # ModelOutput is a mapping
    return got if got is not None else getattr(out, "past_key_values")


def layer_fingerprint(model: nn.Module, layer: int) -> str:
    """sha256 of the FFN output weight of `layer` in bfloat16: identifies the model's weights
    whether it is loaded in fp32, fp16 or bf16."""
    mod = get_module(model, get_arch(model).ffn_out.format(layer))
    w = base_weight(mod).detach().to("cpu", torch.bfloat16).contiguous()
    return hashlib.sha256(w.view(torch.int16).numpy().tobytes()).hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 over every layer's `layer_fingerprint`: which weights a calibrated profile fits."""
    return hashlib.sha256("".join(layer_fingerprint(model, i) for i in range(num_layers(model))).encode()).hexdigest()
