"""`neuraldb build` on one process and on two gloo ranks (torchrun) gives the same database;
a rank that fails names its chunk and the rerun finishes; a rank SIGKILLed mid-run leaves its
finished chunks, which the rerun skips."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import neuraldb
from neuraldb.builder import plan, settings
from neuraldb.engine.persistence import read_db

SUBJECTS = ["Danielle Darrieux", "Apple A5", "Michel Rocard", "Toko Yasuda", "Ferrari F40"]
CONFIG = "layer: 1\nsteps: 3\nn_prefixes: 2\nprefix_len: 4\nresidual_prefixes: 1\nresidual_batch_size: 4\n"


@pytest.fixture
def job(tmp_path: Path, tiny_model_dir: Path) -> dict:
    rows = []
    for i in range(13):  # subjects repeat: a subject's facts must land in one chunk
        s = SUBJECTS[(i * 3) % len(SUBJECTS)] if i % 4 else SUBJECTS[0]
        rows.append({"id": f"f{i}", "subject": s, "prompt": ["The maker of {}", "{} was born in", "{} plays the"][i % 3],
                     "target_new": ["Toyota", "Paris", "guitar", "Rome"][i % 4]})
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEURALDB_CACHE": str(tmp_path / "cache")}
    return {"facts": facts, "model": tiny_model_dir, "cfg": tmp_path / "cfg.yaml", "env": env, "tmp": tmp_path}


def run_build(job: dict, out: Path, ranks: int, **env: str) -> subprocess.CompletedProcess:
    args = ["-m", "neuraldb.cli", "build", "--facts", str(job["facts"]), "--model", str(job["model"]),
            "--config", str(job["cfg"]), "--chunk", "3", "--out", str(out)]
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={ranks}"]
    # from the checkout's root, as the README runs it (the root must not shadow `kernels` there)
    return subprocess.run(launch + args, capture_output=True, text=True, timeout=600, env={**job["env"], **env},
                          cwd=Path(neuraldb.__file__).parent)


def same_db(a: Path, b: Path) -> None:
    x, y = read_db(a), read_db(b)
    assert x.facts == y.facts and x.next_id == y.next_id
    (ia, ka), (ib, kb) = x.index.export(), y.index.export()
    assert np.array_equal(ia, ib) and torch.equal(ka, kb)  # keys bit for bit
    ids = torch.from_numpy(ia)
    assert torch.equal(x.table.gather(ids), y.table.gather(ids))  # residuals bit for bit


def test_plan_keeps_a_subject_in_one_chunk() -> None:
    subjects = ["a", "b", "a", "c", "d", "b", "e", "a"]
    p = plan(subjects, 3, {})
    where = {i: k for k, c in enumerate(p.chunks) for i in c.tolist()}
    assert sorted(where) == list(range(8))
    for s in set(subjects):
        assert len({where[i] for i, t in enumerate(subjects) if t == s}) == 1
    assert [c.tolist() for c in p.chunks] == [[0, 1, 2, 5, 7], [3, 4], [6]]


def test_a_field_added_later_keeps_earlier_chunks_at_its_neutral_value(tmp_path: Path) -> None:
    """A chunk's settings name every EditConfig field but the index; a field added after chunks
    were written stays out at the value that behaves as before, and counts where it differs."""
    from neuraldb import EditConfig
    from neuraldb.engine.config import NEUTRAL_LATER

    plain = settings(tmp_path / "f.jsonl", 10, 4, "fp", EditConfig())
    assert "index" not in plain["config"] and "lr" in plain["config"]
    assert not set(NEUTRAL_LATER) & set(plain["config"])  # what a build before those fields wrote
    warm = settings(tmp_path / "f.jsonl", 10, 4, "fp", EditConfig(residual_warmup=3))
    assert warm["config"]["residual_warmup"] == 3 and plan(["a"], 4, warm).signature != plan(["a"], 4, plain).signature


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_recover(job: dict) -> None:
    one = run_build(job, job["tmp"] / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_build(job, job["tmp"] / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    same_db(job["tmp"] / "one" / "db", job["tmp"] / "two" / "db")
    assert "rank 1/2" in two.stderr

    failed = run_build(job, job["tmp"] / "fail", 2, NEURALDB_BUILD_FAIL_CHUNK="1")
    assert failed.returncode != 0 and "chunk 1 " in failed.stderr and "failed on rank 1" in failed.stderr
    assert not (job["tmp"] / "fail" / "db").exists()
    again = run_build(job, job["tmp"] / "fail", 2)
    assert again.returncode == 0, again.stderr[-3000:]
    same_db(job["tmp"] / "one" / "db", job["tmp"] / "fail" / "db")

    killed = run_build(job, job["tmp"] / "kill", 2, NEURALDB_BUILD_KILL_AFTER="1")
    assert killed.returncode != 0
    left = len(list((job["tmp"] / "kill" / "chunks").glob("chunk_*.safetensors")))
    assert left >= 1  # the killed rank's finished chunk is on disk
    resumed = run_build(job, job["tmp"] / "kill", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = [int(m) for m in re.findall(r"chunks, (\d+) already done", resumed.stderr)]
    assert len(skipped) == 2 and sum(skipped) == left  # the rerun redid only what was missing
    same_db(job["tmp"] / "one" / "db", job["tmp"] / "kill" / "db")
