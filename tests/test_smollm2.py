"""The real default model: SmolLM2-135M-Instruct edits 10 CounterFact facts (slow, in CI)."""
from __future__ import annotations

from pathlib import Path

import pytest
from neuraldb import NeuralDB, load_facts, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_ten_counterfact_edits(smol, data_dir: Path) -> None:
    path = data_dir / "counterfact" / "counterfact-edit.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (set NEURALDB_DATA to the shared data directory)")
    model, tok = smol
    facts = load_facts(path, limit=10)
    unrelated = [f.neighborhood[0] for f in facts] + ["The capital of France is", "Water boils at a temperature of"]
    db = NeuralDB(model, tok)
    with db.disabled():
        before = [db.generate(p, 8) for p in unrelated]
    db.add(facts)
    answers = [db.generate(f.text, 6) for f in facts]
    hits = sum(a.strip().startswith(f.target_new) for a, f in zip(answers, facts))
    assert hits >= 9, list(zip(answers, [f.target_new for f in facts]))
    after = [db.generate(p, 8) for p in unrelated]
    assert after == before
    db.detach()
