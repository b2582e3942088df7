"""Loaders for every format, and the frozen YAML configs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from neuraldb import EditConfig, Fact, FactError, load_facts
from neuraldb.engine.config import ConfigError, from_mapping, load_yaml, model_defaults

MEMIT_CF = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def test_memit_counterfact_format(tmp_path: Path) -> None:
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([MEMIT_CF]))
    (f,) = load_facts(path)
    assert (f.id, f.subject, f.prompt, f.target_new, f.target_true) == \
        ("7", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    assert f.neighborhood == ("Michel Rocard is a native speaker of",) and f.locality_target == "French"
    assert f.generation_prompts and f.paraphrases


def test_memit_counterfact_missing_field(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(MEMIT_CF))
    del bad["requested_rewrite"]["subject"]
    (tmp_path / "cf.json").write_text(json.dumps([MEMIT_CF, bad]))
    with pytest.raises(FactError, match=r"cf.json record 1: field 'subject' is missing"):
        load_facts(tmp_path / "cf.json")


def test_shared_counterfact_and_zsre(data_dir: Path) -> None:
    cf = data_dir / "counterfact" / "counterfact-edit.json"
    zs = data_dir / "zsre" / "zsre-1k.json"
    if not cf.is_file() or not zs.is_file():
        pytest.skip(f"shared data not found under {data_dir} (set NEURALDB_DATA)")
    facts = load_facts(cf, limit=50)
    assert len(facts) == 50 and all("{}" in f.prompt and f.paraphrases and f.neighborhood for f in facts)
    assert facts[0].text == "The mother tongue of Danielle Darrieux is"
    z = load_facts(zs, limit=20)
    assert len(z) == 20 and all(f.target_true and f.locality_target and f.neighborhood[0].endswith("?") for f in z)
    assert z[0].subject in z[0].text


def test_native_jsonl_roundtrip(tmp_path: Path) -> None:
    from neuraldb.engine.facts import save_facts_jsonl

    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"subject": "Paris", "prompt": "The city of Paris lies in", "target_new": "Spain",
                                "paraphrases": ["Paris is in"]}) + "\n")
    facts = load_facts(path)
    assert facts[0].prompt == "The city of {} lies in" and facts[0].id == "0"
    save_facts_jsonl(facts, tmp_path / "g.jsonl")
    assert load_facts(tmp_path / "g.jsonl") == facts


def test_config_rejects_unknown_keys_and_converts(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("layer: '6'\ngamma: 0.8\nprefix_seeds: [A, B]\n")
    cfg = load_yaml(EditConfig, p)
    assert cfg.layer == 6 and isinstance(cfg.layer, int) and cfg.prefix_seeds == ("A", "B")
    p.write_text("layer: 6\ngama: 0.8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key\(s\) \['gama'\]"):
        load_yaml(EditConfig, p)
    with pytest.raises(ConfigError, match="key 'steps': expected int"):
        from_mapping(EditConfig, {"steps": "many"})
    with pytest.raises(ConfigError, match="invalid value for \\['gamma'\\]"):
        EditConfig(gamma=3.0)
    with pytest.raises(FrozenInstanceError):
        cfg.layer = 3  # type: ignore[misc]


def test_model_defaults() -> None:
    assert model_defaults("smollm2-135m", "llama").layer >= 0
    assert model_defaults("unknown", "unknown") == EditConfig()


def test_smollm2_residual_defaults_and_bench_variants() -> None:
    """SmolLM2's residual optimiser settings come from its defaults file; bench/edit_speed.py's
    `--variant` changes fields with their types and rejects unknown keys by name."""
    from neuraldb.bench.edit_speed import variant

    cfg = model_defaults("smollm2-135m", "llama")
    assert (cfg.lr, cfg.steps, cfg.nll_stop, cfg.residual_dtype) == (4.0, 16, 0.02, "auto")  # the calibrator's
    assert (EditConfig().lr, EditConfig().steps, EditConfig().residual_dtype) == (0.5, 25, "float32")
    v = variant(cfg, "lr=0.5,steps=25")
    assert (v.lr, v.steps, v.layer) == (0.5, 25, cfg.layer) and isinstance(v.steps, int)
    with pytest.raises(ConfigError, match="--variant lrr=1: unknown key"):
        variant(cfg, "lrr=1")
    v = variant(cfg, "nll_stop=0.015,sink_gamma=none,residual_dtype=bfloat16")  # optional floats convert too
    assert (v.nll_stop, v.sink_gamma, v.residual_dtype) == (0.015, None, "bfloat16")
    with pytest.raises(ConfigError, match="key 'nll_stop': expected float"):
        variant(cfg, "nll_stop=low")


def test_fact_converts_a_verbatim_subject_as_the_loaders_do(tmp_path: Path) -> None:
    made = Fact("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French")
    assert made.prompt == "The mother tongue of {} is"
    assert made.text == "The mother tongue of Danielle Darrieux is"  # not "...isDanielle Darrieux"
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"subject": " Danielle Darrieux ", "prompt": made.text, "target_new": " English"}))
    (loaded,) = load_facts(path)
    assert (loaded.subject, loaded.prompt, loaded.target_new) == (made.subject, made.prompt, made.target_new)
    # braces in a verbatim prompt are kept literally; replace() re-checks an already-made fact
    braced = Fact("X", "{X} set X to", "y")
    assert braced.text == "{X} set X to" and dataclasses.replace(braced, target_new="z").prompt == braced.prompt


@pytest.mark.parametrize("args, field", [
    (("Paris", "Berlin is the capital of", "Y"), "prompt"),
    (("Paris", "{} and {} are", "Y"), "prompt"),
    (("Paris", "{0} is {1}", "Y"), "prompt"),
    (("", "{} is", "Y"), "subject"),
    (("Paris", "{} is", "  "), "target_new"),
    (("Paris", None, "Y"), "prompt"),
])
def test_a_wrong_fact_is_refused_where_it_is_made(args: tuple, field: str) -> None:
    with pytest.raises(FactError, match=rf"^Fact: field '{field}'"):
        Fact(*args)
    with pytest.raises(FactError, match=rf"^Fact 'f1': field '{field}'"):
        Fact(*args, id="f1")


def test_empty_target_true_means_unknown() -> None:
    assert Fact("Paris", "{} is in", "Italy", "").target_true is None
    with pytest.raises(FactError, match="'target_true'"):
        Fact("Paris", "{} is in", "Italy", 3)  # type: ignore[arg-type]
