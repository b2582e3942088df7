"""A model's profile: the gate's knobs and the residual optimiser, in one type and one file
(`defaults/<name>.yaml` shipped with the package, or `<cache>/profiles/<name>.yaml` written by
`neuraldb calibrate`). What made a profile (command, data ranges, date) is its `provenance`;
the measurements behind each value are in the calibration report it names."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from .config import EditConfig, from_mapping, load_yaml, to_mapping

log = logging.getLogger(__name__)

PROFILE_DIR = "profiles"  # under the model cache (engine.models.cache_dir)
ABOUT = ("model_sha256", "provenance")  # what a profile says about itself, not settings


@dataclass(frozen=True)
class Profile:
    layer: int  # the gated FFN layer l*
    gamma: float  # key threshold: cos(query, key) above it opens the gate
    gate_context: int = 0  # blocks of attention output joined to the FFN input in the gate's space
    gate_context_weight: float = 0.5
    gate_map: str = ""  # a learned map of that space (engine/maps/), "" = none
    head_gamma: float | None = None  # the head check's threshold (None: no head check)
    sink_gamma: float | None = None  # key threshold where the subject starts the text
    lr: float = 0.5  # residual optimiser: Adam's learning rate
    steps: int = 25  # and its step budget per fact
    nll_stop: float | None = None  # a fact stops once its target NLL is below this
    clamp_norm: float = 0.75  # residual norm clamp, times |z| at the subject
    residual_dtype: str = "float32"  # the optimiser steps' precision ("auto": bf16 where the device is fast at it)
    model_sha256: str = ""  # the weights it was calibrated on (arch.weights_sha256); "" = any with this name
    provenance: str = ""  # what made this profile: command, data ranges, date, report

    def config(self, base: EditConfig | None = None) -> EditConfig:
        """`base` (default: the built-in EditConfig) with this profile's values."""
        vals = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ABOUT}
        return from_mapping(EditConfig, {**to_mapping(base or EditConfig()), **vals}, "profile")

    def to_yaml(self) -> str:
        """The profile file: its values, then the provenance as a literal block."""
        data = to_mapping(self)
        prov = data.pop("provenance")
        body = yaml.safe_dump(data, sort_keys=False, width=100)
        return body + ("provenance: |-\n" + "".join(f"  {line}\n" for line in prov.splitlines()) if prov else "")


def read_profile(path: str | Path) -> Profile:
    """A profile file; unknown keys, bad values or a missing file raise ConfigError naming it."""
    return load_yaml(Profile, path)


def load_config(path: str | Path) -> EditConfig:
    """An EditConfig YAML, or a profile file (it has `provenance`, as `neuraldb calibrate` writes
    one) as the EditConfig it gives; unknown keys or bad values raise ConfigError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        data = None  # load_yaml names the file and what is wrong with it
    if isinstance(data, dict) and "provenance" in data:
        return read_profile(path).config()
    return load_yaml(EditConfig, path)


def find_profile(name: str | None, model_type: str, cache: str | Path | None = None,
                 sha256: Callable[[], str] | None = None) -> tuple[Profile, str] | None:
    """The profile of model `name` (else of its model_type) and where it was found: the
    package's defaults/ first, then `cache`/profiles/ (what `neuraldb calibrate` wrote). A
    calibrated profile that records other weights than `sha256()` gives is passed over."""
    shipped = resources.files("neuraldb.engine").joinpath("defaults")
    for stem in (name, model_type):
        if not stem:
            continue
        stem = Path(stem).name
        cand = shipped.joinpath(f"{stem}.yaml")
        if cand.is_file():
            return from_mapping(Profile, yaml.safe_load(cand.read_text()) or {}, f"defaults/{cand.name}"), \
                f"defaults/{cand.name}"
        if cache is not None:
            local = Path(cache) / PROFILE_DIR / f"{stem}.yaml"
            if local.is_file():
                found = read_profile(local)
                if found.model_sha256 and sha256 is not None and found.model_sha256 != sha256():
                    log.warning("%s was calibrated on other weights (model_sha256 %s...); not used", local,
                                found.model_sha256[:12])
                    continue
                return found, str(local)
    return None


def model_profile(name: str | None, model_type: str, cache: str | Path | None = None,
                  sha256: Callable[[], str] | None = None) -> tuple[EditConfig, str]:
    """The EditConfig of model `name`'s profile (`find_profile`) and where it came from; the
    built-in EditConfig and "built-in" where there is none."""
    found = find_profile(name, model_type, cache, sha256)
    return (found[0].config(), found[1]) if found is not None else (EditConfig(), "built-in")
