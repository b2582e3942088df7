"""Frozen dataclass configs loaded from YAML: unknown keys are rejected, values are converted
to the field's type, and every error names the offending key and file."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or mapping that does not fit its dataclass."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_convert(v, elem, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        if isinstance(value, bool) and tp is not str:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from exc
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], source: str = "<mapping>") -> T:
    """Build the frozen dataclass `cls` from `data`, rejecting unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    kwargs = {k: _convert(v, hints[k], f"{source}: key '{k}'") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return from_mapping(cls, data, str(path))


def to_mapping(obj: Any) -> dict[str, Any]:
    out = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


RESIDUAL_INITS = ("zero", "gradient")
RESIDUAL_DTYPES = ("float32", "bfloat16", "auto")
RESIDUAL_BLOCKS = ("auto", "hf", "fused", "compiled")
RESIDUAL_STREAMS = ("grouped", "flat")
KL_SPANS = ("subject", "all")


# fields added after residual caches and build chunks were written, with the value that behaves
# as before: a signature leaves such a field out at that value, so what was written still serves
NEUTRAL_LATER: dict[str, Any] = {"residual_warmup": 0}


@dataclass(frozen=True)
class EditConfig:
    """Everything that decides how facts become keys and residuals and how the gate fires."""

    layer: int = -1  # -1: take the model's default from defaults/<name>.yaml
    gamma: float = 0.65
    index: str = "Auto"  # exact: Flat below 5,000 keys, then Proj{d/3} (CPU); torch on a GPU
    gate_first_token: bool = False  # the first real token is an attention sink: never gate it
    # the gate's space (engine/space.py): 0 = the FFN input at l* alone; c > 0 adds the summed
    # self-attention output of the c blocks ending at l* (what the token read from the words
    # before it), weighted `gate_context_weight` in the cosine
    gate_context: int = 0
    gate_context_weight: float = 0.5
    # a learned map of that space applied to keys and queries alike (engine/gate_map.py): the
    # name of a map shipped under engine/maps/, or a file path; "" = none
    gate_map: str = ""
    # the head check (engine/heads.py): a winner must also match at its subject's first token,
    # cos(query there, the fact's head key) > head_gamma; None = no check (no head table).
    # Spans wider than head_window tokens are not checked.
    head_gamma: float | None = None
    head_window: int = 16
    # the key threshold where the winner's subject stands at the text's start: its head falls on
    # the first real token and that token is the subject's first (an exact id test); None = gamma.
    # A subject read right after the attention sink matches its averaged key less well.
    sink_gamma: float | None = None
    # keys (MEMIT compute_ks recipe)
    n_prefixes: int = 5
    prefix_len: int = 10
    prefix_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    seed: int = 0
    key_batch_size: int = 64
    # residuals (MEMIT compute_z recipe)
    residual_prefixes: int = 2
    lr: float = 0.5
    steps: int = 25
    loss_stop: float = 5e-2
    # a fact also stops once its target NLL alone is below this (None: only loss_stop). MEMIT's
    # loss adds the KL and weight-decay terms, which keep it above loss_stop for most facts
    nll_stop: float | None = None
    clamp_norm: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    # more neutral contexts of the subject whose distributions the KL term keeps, beside kl_prompt
    kl_contexts: tuple[str, ...] = ()
    kl_span: str = "subject"  # compare at the subject's last token (MEMIT), or "all" tokens from it on
    residual_batch_size: int = 16
    residual_suffix: bool = True  # steps run only the tokens from the subject on (False: whole rows)
    subject_groups: bool = True  # facts about one subject share one jointly optimised residual
    residual_pack: bool = True  # suffix rows run in groups of like length, facts batched by it (False: one padded batch)
    # where the optimiser starts: "zero" (MEMIT), or "gradient": the first step jumps along the
    # steepest-descent direction at zero, scaled to `init_scale` times the norm clamp (one step)
    residual_init: str = "zero"
    init_scale: float = 1.0
    # the precision of the optimiser's steps: "float32", "bfloat16" (the prefill, the blocks above l*
    # and the LM head under bf16 autocast; the loss and the residual stream stay float32, and
    # `residuals.residual_nll` measures the result in float32), or "auto": bfloat16 where this
    # device multiplies it fast
    residual_dtype: str = "float32"
    lr_decay: float = 1.0  # the learning rate is multiplied by this after every step
    # what runs the blocks from l* up at every step (engine/step_blocks.py): "hf" (the model's own
    # modules), "fused" (plain functions of fused weights, eager), "compiled" (those under
    # torch.compile), or "auto": compiled for calls of >= 256 facts where the architecture has the
    # functions and a compiler is found, the model's modules otherwise
    residual_blocks: str = "auto"
    # how the functions' path lays out the length groups above l*: "grouped" (each group its own
    # padded block calls) or "flat" (every group's tokens end to end for the projections and MLP,
    # attention per group: one GEMM per weight per block, so groups can be many and padding small)
    residual_stream: str = "grouped"
    # the first this-many steps read only each fact's first target row (the bare prompt where usable)
    # and its KL rows, its targets weighted to one; later steps read every row, and only they may stop
    # a fact (0: every step reads every row)
    residual_warmup: int = 0

    def __post_init__(self) -> None:
        checks = {
            "gamma": -1.0 <= self.gamma <= 1.0,
            "n_prefixes": self.n_prefixes >= 0,
            "residual_prefixes": 0 <= self.residual_prefixes <= self.n_prefixes,
            "steps": self.steps >= 1,
            "lr": self.lr > 0,
            "clamp_norm": self.clamp_norm > 0,
            "key_batch_size": self.key_batch_size >= 1,
            "residual_batch_size": self.residual_batch_size >= 1,
            "kl_prompt": "{}" in self.kl_prompt,
            "kl_contexts": all(isinstance(c, str) and "{}" in c for c in self.kl_contexts),
            "kl_span": self.kl_span in KL_SPANS,
            "gate_context": self.gate_context >= 0,
            "gate_context_weight": 0.0 < self.gate_context_weight < 1.0,
            "head_gamma": self.head_gamma is None or -1.0 <= self.head_gamma <= 1.0,
            "head_window": 1 <= self.head_window <= 512,
            "residual_init": self.residual_init in RESIDUAL_INITS,
            "residual_dtype": self.residual_dtype in RESIDUAL_DTYPES,
            "residual_blocks": self.residual_blocks in RESIDUAL_BLOCKS,
            "residual_stream": self.residual_stream in RESIDUAL_STREAMS,
            "init_scale": 0.0 < self.init_scale <= 1.0,
            "nll_stop": self.nll_stop is None or self.nll_stop >= 0.0,
            "residual_warmup": 0 <= self.residual_warmup < self.steps,
            "sink_gamma": self.sink_gamma is None or (-1.0 <= self.sink_gamma <= 1.0 and self.head_gamma is not None),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"EditConfig: invalid value for {bad}: {[getattr(self, k) for k in bad]}")

    @property
    def floor(self) -> float:
        """The lowest key similarity that can open a gate (what an index may prune below)."""
        return self.gamma if self.sink_gamma is None else min(self.gamma, self.sink_gamma)

    def replace(self, **changes: Any) -> "EditConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def model_defaults(name: str | None, model_type: str, cache: str | Path | None = None) -> EditConfig:
    """Per-model defaults: the profile of `name`, else of `model_type` (engine/profile.py:
    shipped under defaults/, or calibrated into `cache`/profiles/, by default the model cache's),
    else the built-ins."""
    from .models import cache_dir  # both build on this module
    from .profile import model_profile

    return model_profile(name, model_type, cache_dir() if cache is None else cache)[0]
