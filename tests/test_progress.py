"""Progress where people wait: without a terminal, `NeuralDB.add` logs its keys and residuals
at INFO with the rate and the time left (tqdm stays for terminals)."""
from __future__ import annotations

import logging

import pytest

from neuraldb import EditConfig, Fact, NeuralDB
from neuraldb.engine.progress import Progress

from conftest import make_model


def test_progress_logs_rate_and_time_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="neuraldb.engine.progress")
    with Progress(3, "residuals", "fact", every_s=0.0) as bar:
        for _ in range(3):
            bar.update(1, nll="0.010")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("residuals: 3/3 facts,")
    assert "facts/s" in lines[-1] and "s left" in lines[-1] and lines[-1].endswith("nll 0.010")


def test_add_reports_progress_without_a_terminal(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="neuraldb.engine.progress")
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, EditConfig(layer=1, n_prefixes=2, prefix_len=4, steps=3))
    db.add([Fact("Apple A5", "The maker of {}", "Toyota"), Fact("Michel Rocard", "A native speaker of {}", "Russian")])
    msgs = [r.getMessage() for r in caplog.records if r.name == "neuraldb.engine.progress"]
    assert any(m.startswith("keys: ") for m in msgs) and any(m.startswith("residuals: 2/2 facts") for m in msgs)


def test_a_bench_shows_progress_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    """A bench run from a log file (no terminal, no logging set up) prints its progress lines, as
    the CLI does: a 15-minute residual run must not be silent."""
    from neuraldb.bench.common import run_main

    logger = logging.getLogger("neuraldb.engine.progress")
    level = logger.level
    logger.setLevel(logging.NOTSET)  # as a fresh process has it: the root's WARNING decides

    def main() -> None:
        with Progress(3, "residuals", "fact") as bar:
            bar.update(3)

    try:
        run_main(main, "bench/x.py")
    finally:
        logger.setLevel(level)
    assert any("residuals: 3/3 facts" in r.getMessage() for r in caplog.records)
