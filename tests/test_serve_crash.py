"""kill -9 while writers post facts: after every restart each acknowledged write is there (an
acknowledged delete stays deleted) and every unacknowledged one is absent or whole. The log
checkpoints every few records, so kills also land inside checkpoints."""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from serving import TINY_CONFIG, Server

TRIALS = 24
WRITERS = 3


class Ledger:
    """What the writers were told (acked) and what they never heard back about (in doubt)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[int, dict] = {}  # db id -> record, acknowledged and not acknowledged-deleted
        self.deleted: set[int] = set()  # acknowledged deletes
        self.doubt_add: dict[str, dict] = {}  # external id -> record: add sent, no answer
        self.doubt_del: set[int] = set()

    def check(self, facts: dict[int, dict]) -> None:
        for i, rec in self.acked.items():
            if i in self.doubt_del:
                assert i not in facts or facts[i] == rec
            else:
                assert facts.get(i) == rec, f"acknowledged fact {i} lost or changed: {facts.get(i)} != {rec}"
        for i in self.deleted:
            assert i not in facts, f"acknowledged delete of {i} undone"
        known = {r["id"] for r in self.acked.values()}
        for i, rec in facts.items():
            if rec["id"] in known:
                continue
            assert rec["id"] in self.doubt_add, f"fact {i} ({rec['id']}) was never sent"
            assert rec == self.doubt_add[rec["id"]], f"half-written fact {i}: {rec}"
        with self.lock:  # what survived is now known; forget the doubt
            for i, rec in facts.items():
                if rec["id"] in self.doubt_add:
                    self.acked[i] = self.doubt_add.pop(rec["id"])
            self.doubt_add.clear()
            for i in self.doubt_del:
                if i not in facts:
                    self.acked.pop(i, None)
                    self.deleted.add(i)
            self.doubt_del.clear()


def writer(s: Server, ledger: Ledger, rng: random.Random, tag: str, stop: threading.Event) -> None:
    k = 0
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            if ledger.acked and rng.random() < 0.2:
                with ledger.lock:
                    victim = rng.choice(sorted(ledger.acked))
                    ledger.doubt_del.add(victim)
                try:
                    r = c.delete(f"{s.url}/v1/facts/{victim}")
                except httpx.HTTPError:
                    return
                with ledger.lock:
                    ledger.doubt_del.discard(victim)
                    if r.status_code == 200:
                        ledger.acked.pop(victim, None)
                        ledger.deleted.add(victim)
                continue
            recs = [{"id": f"{tag}-{k}-{j}", "subject": f"Entity {tag} {k} {j}", "prompt": "The home of {} is",
                     "target_new": rng.choice(["Oslo", "Lima", "Kyoto", "Cairo"])} for j in range(rng.randint(1, 3))]
            k += 1
            with ledger.lock:
                ledger.doubt_add.update({r["id"]: r for r in recs})
            try:
                r = c.post(s.url + "/v1/facts", json=recs if len(recs) > 1 else recs[0])
            except httpx.HTTPError:
                return  # killed mid-request: in doubt
            assert r.status_code == 200, r.text
            with ledger.lock:
                for item in r.json()["data"]:
                    ledger.doubt_add.pop(item["fact"]["id"], None)
                    ledger.acked[item["id"]] = item["fact"]


@pytest.mark.slow
def test_kill_9_while_writing_loses_no_acknowledged_write(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(TINY_CONFIG.replace("steps: 40", "steps: 2"))
    args = ["--config", str(tmp_path / "cfg.yaml"), "--checkpoint-records", "7"]
    ledger, rng = Ledger(), random.Random(1234)
    restarts = []
    for trial in range(TRIALS):
        s = Server(tmp_path / "db", tiny_model_dir, args, log=tmp_path / "server.log").start()
        restarts.append(s.started_s)
        ledger.check(s.facts())
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(s, ledger, random.Random(rng.random()), f"t{trial}w{w}", stop))
                   for w in range(WRITERS)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 2.5))
        s.kill()  # SIGKILL: no drain, no checkpoint
        stop.set()
        for t in threads:
            t.join(60)
    s = Server(tmp_path / "db", tiny_model_dir, args, log=tmp_path / "server.log").start()
    facts = s.facts()
    ledger.check(facts)
    assert len(ledger.acked) > 50 and ledger.deleted, (len(ledger.acked), len(ledger.deleted))
    assert s.stop() == 0
    s = Server(tmp_path / "db", tiny_model_dir, args, log=tmp_path / "server.log").start()  # after a clean stop
    assert s.facts() == facts and httpx.get(s.url + "/health").json()["replayed"] == 0
    assert s.stop() == 0


def test_a_checkpoint_killed_between_its_renames_keeps_the_log(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A checkpoint saves by renaming the database aside, then the new copy into place. A kill
    between the two leaves only the old copy beside the path; the server must restore it and
    replay the log onto it, not take the path for a new database and refuse the orphaned log
    (seen once in the kill -9 trials above)."""
    (tmp_path / "cfg.yaml").write_text(TINY_CONFIG.replace("steps: 40", "steps: 2"))
    args = ["--config", str(tmp_path / "cfg.yaml")]
    db = tmp_path / "db"
    s = Server(db, tiny_model_dir, args, log=tmp_path / "server.log").start()
    r = httpx.post(s.url + "/v1/facts", json={"id": "a", "subject": "Entity A", "prompt": "The home of {} is",
                                              "target_new": "Oslo"}, timeout=60)
    assert r.status_code == 200, r.text
    before = s.facts()
    s.kill()
    db.rename(tmp_path / ".db.neuraldb-old")  # the state between a checkpoint's two renames
    s = Server(db, tiny_model_dir, args, log=tmp_path / "server.log").start()
    assert s.facts() == before and len(before) == 1
    assert httpx.get(s.url + "/health").json()["replayed"] == 1
    assert s.stop() == 0
