"""Named data sources: each resolution step, the bundled sample, and a missing source as one
line naming every place looked (exit 2 from the CLI and the benches, never a traceback)."""
from __future__ import annotations

from pathlib import Path

import pytest

from neuraldb import data, load_facts
from neuraldb.bench.common import run_main
from neuraldb.cli import main as cli_main
from neuraldb.data import DataError, resolve, source_file


def put(root: Path, rel: str, text: str = "x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No shared data and no sample: only what a test puts under tmp_path/... is found."""
    monkeypatch.delenv("NEURALDB_DATA", raising=False)
    monkeypatch.setattr(data, "shared_root", lambda: tmp_path / "shared")
    monkeypatch.setattr(data, "sample_root", lambda: tmp_path / "sample")
    return tmp_path


def test_each_step_in_order(nowhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in ("sample", "shared", "env", "dir"):
        put(nowhere / step, "wikitext/wiki.test.raw")
    monkeypatch.setenv("NEURALDB_DATA", str(nowhere / "env"))
    assert resolve("wikitext", nowhere / "dir").origin == "data-dir"
    assert resolve("wikitext").origin == "NEURALDB_DATA"
    monkeypatch.delenv("NEURALDB_DATA")
    assert resolve("wikitext").origin == "shared"
    (nowhere / "shared" / "wikitext" / "wiki.test.raw").unlink()
    got = resolve("wikitext")
    assert got.origin == "sample" and got.path == nowhere / "sample" / "wikitext" / "wiki.test.raw"


def test_counterfact_reads_both_splits_where_present(nowhere: Path) -> None:
    put(nowhere / "d", "counterfact/counterfact-edit.json")
    assert len(resolve("counterfact", nowhere / "d").files) == 1
    put(nowhere / "d", "counterfact/counterfact-train.json")
    assert [p.name for p in resolve("counterfact", nowhere / "d").files] == ["counterfact-edit.json",
                                                                                "counterfact-train.json"]


def test_missing_source_names_every_place(nowhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURALDB_DATA", str(nowhere / "env"))
    with pytest.raises(DataError) as err:
        resolve("zsre")
    msg = str(err.value)
    assert "\n" not in msg
    for place in ("env", "shared", "sample"):
        assert str(nowhere / place / "zsre" / "zsre-1k.json") in msg
    with pytest.raises(DataError, match="unknown data source 'nope'"):
        resolve("nope")
    assert source_file("some/file.json") == Path("some/file.json")  # a path is taken as given


def test_cli_and_bench_exit_2_with_one_line(nowhere: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli_main(["edit", "--model", str(tiny_model_dir), "--facts", "counterfact", "--out", str(nowhere / "db")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "looked in" in err and err.startswith("neuraldb edit: error:") and str(nowhere / "sample") in err
    from neuraldb.bench import scale

    with pytest.raises(SystemExit) as exc:
        run_main(lambda: scale.main(["--model", str(tiny_model_dir), "--layer", "1", "--out", str(nowhere / "out")]),
                 "bench/scale.py")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err.startswith("bench/scale.py: error: data source 'counterfact' not found")


def test_the_bundled_sample_is_small_licensed_and_loads() -> None:
    root = data.sample_root()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    licences = (root / "LICENSES.md").read_text()
    assert "MIT" in licences and "CC BY-SA 3.0" in licences
    facts = load_facts(root / "counterfact" / "counterfact-edit.json")
    assert len(facts) >= 300 and all(f.paraphrases and f.neighborhood for f in facts[:10])
    assert len(load_facts(root / "zsre" / "zsre-1k.json")) >= 190
    from neuraldb.evaluation.texts import wikitext_passages

    assert len(wikitext_passages(root / "wikitext" / "wiki.test.raw", 64)) == 64
