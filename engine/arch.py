"""Architecture paths as data, keyed by `config.model_type` (never by sniffing model names)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    layers: str  # the ModuleList of decoder blocks
    ffn_out: str  # the FFN's down/out projection of layer {}; its input is the key
    conv1d: bool = False  # GPT-2 style Conv1D: weight is (in, out)
    suffix_cache: bool = True  # residual steps may serve earlier tokens from a KV cache (not with sliding windows)


ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch("transformer.h", "transformer.h.{}.mlp.c_proj", conv1d=True),
    "gptj": Arch("transformer.h", "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": Arch("gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    "llama": Arch("model.layers", "model.layers.{}.mlp.down_proj"),
    "mistral": Arch("model.layers", "model.layers.{}.mlp.down_proj"),
    "qwen2": Arch("model.layers", "model.layers.{}.mlp.down_proj"),
    "qwen3": Arch("model.layers", "model.layers.{}.mlp.down_proj"),
    "gemma": Arch("model.layers", "model.layers.{}.mlp.down_proj"),
    "gemma2": Arch("model.layers", "model.layers.{}.mlp.down_proj", suffix_cache=False),
    "gemma3_text": Arch("model.layers", "model.layers.{}.mlp.down_proj", suffix_cache=False),
    "gemma3": Arch("model.language_model.layers", "model.language_model.layers.{}.mlp.down_proj", suffix_cache=False),
    "phi3": Arch("model.layers", "model.layers.{}.mlp.down_proj"),
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


def ffn_dims(model: nn.Module, layer: int) -> tuple[int, int]:
    """(key dim = d_ff, residual dim = d_model) of the FFN output projection at `layer`."""
    arch = get_arch(model)
    mod = get_module(model, arch.ffn_out.format(layer))
    mod = getattr(mod, "base_layer", mod)
    w = mod.weight
    return (int(w.shape[0]), int(w.shape[1])) if arch.conv1d else (int(w.shape[1]), int(w.shape[0]))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
