"""The Arrow-backed fact pool: every file type `datasets` reads gives the facts `load_facts` gives."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuraldb import FactError, load_facts
from neuraldb.engine.pool import FactPool
from neuraldb.evaluation.synthetic import synthetic_facts

CF = [{"case_id": 7 + i, "prompt": f"The mother tongue of Person {i} is", "target_new": "English",
       "subject": f"Person {i}", "ground_truth": "French", "rephrase_prompt": f"Person {i} speaks",
       "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"} for i in range(5)]


def test_json_array_matches_load_facts(tmp_path: Path) -> None:
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(CF))
    pool = FactPool.from_file(path)
    assert list(pool) == load_facts(path) and len(pool) == 5
    assert pool[-1] == pool[4] and pool[1:3] == load_facts(path)[1:3]
    assert pool[0].id == "7" and pool[0].meta == {"format": "counterfact"}
    assert FactPool.from_file(path, limit=2)[:] == load_facts(path)[:2]
    with pytest.raises(IndexError):
        pool[5]


def test_every_file_type_round_trips(tmp_path: Path) -> None:
    facts = list(synthetic_facts(7, seed=1))
    pool = FactPool.from_facts(facts, batch=3)
    assert list(pool) == facts and [f.meta for f in pool] == [f.meta for f in facts]
    pool.save_to_disk(tmp_path / "saved")
    assert list(FactPool.from_file(tmp_path / "saved")) == facts
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text("".join(json.dumps(f.to_json()) + "\n" for f in facts))
    assert list(FactPool.from_file(jsonl)) == facts
    pool.table.to_parquet(str(tmp_path / "f.parquet"))
    assert list(FactPool.from_file(tmp_path / "f.parquet")) == facts
    # CSV: list fields as JSON arrays in their cells, meta as a JSON string
    import csv

    with open(tmp_path / "f.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "subject", "prompt", "target_new", "target_true", "paraphrases",
                                           "neighborhood", "locality_target"])
        w.writeheader()
        for f in facts:
            w.writerow({"id": f.id, "subject": f.subject, "prompt": f.prompt, "target_new": f.target_new,
                        "target_true": f.target_true, "paraphrases": json.dumps(list(f.paraphrases)),
                        "neighborhood": json.dumps(list(f.neighborhood)), "locality_target": f.locality_target})
    got = list(FactPool.from_file(tmp_path / "f.csv"))
    assert [(g.subject, g.prompt, g.paraphrases, g.neighborhood) for g in got] == \
        [(f.subject, f.prompt, f.paraphrases, f.neighborhood) for f in facts]
    mixed = FactPool.concat([pool, FactPool.from_file(jsonl)])
    assert len(mixed) == 14 and mixed[7] == facts[0]


def test_bad_records_name_file_record_and_field(tmp_path: Path) -> None:
    bad = [dict(CF[0]), dict(CF[1], target_new="")]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(FactError, match=r"bad.json record 1: field 'target_new'"):
        FactPool.from_file(path)
    assert len(FactPool.from_file(path, skip_invalid=True)) == 1
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([CF[0], CF[0]]))
    with pytest.raises(FactError, match="dup.json record 1: duplicate id '7'"):
        FactPool.from_file(dup)
    with pytest.raises(FactError, match="not found"):
        FactPool.from_file(tmp_path / "missing.json")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(FactError, match="unknown file type"):
        FactPool.from_file(tmp_path / "x.txt")
    (tmp_path / "broken.jsonl").write_text('{"subject": "a", \n')
    with pytest.raises(FactError, match="broken.jsonl: cannot be read"):
        FactPool.from_file(tmp_path / "broken.jsonl")
