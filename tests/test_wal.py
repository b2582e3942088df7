"""The write-ahead log: records round-trip bit for bit, a torn tail is cut off at any byte,
damage before the end is refused, and replaying over a checkpoint rebuilds the live database."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuraldb import EditConfig, Fact, NeuralDB
from neuraldb.engine.persistence import save_state
from neuraldb.serve.engine import EngineConfig, ServeEngine, wal_path
from neuraldb.serve.wal import HEADER, WALError, WriteAheadLog, decode, encode

from conftest import make_model

CFG = EditConfig(layer=1, gamma=0.65, n_prefixes=1, prefix_len=3, residual_prefixes=1, steps=4)
FACTS = [Fact("Danielle Darrieux", "The mother tongue of {}", "Japanese", "French"),
         Fact("Apple A5", "The maker of {}", "Toyota", "Apple"),
         Fact("Danielle Darrieux", "{} was born in", "Oslo", "Paris"),
         Fact("Michel Rocard", "A native speaker of {}", "Russian", "French")]


def same_db(a: NeuralDB, b: NeuralDB) -> None:
    assert a.facts == b.facts and a.next_id == b.next_id
    ia, ka = a.index.export()
    ib, kb = b.index.export()
    assert np.array_equal(ia, ib) and torch.equal(ka, kb)
    ids = np.asarray(sorted(a.facts), dtype=np.int64)
    assert np.array_equal(a.table.ids(), b.table.ids())
    assert torch.equal(a.table.gather(torch.from_numpy(ids)), b.table.gather(torch.from_numpy(ids)))
    assert (a.heads is None) == (b.heads is None)
    if a.heads is not None:  # the head check's rows travel in the logged key rows
        assert np.array_equal(a.heads.ids(), b.heads.ids()) and len(a.heads.ids()) == len(ids)
        assert torch.equal(a.heads.gather(torch.from_numpy(ids)), b.heads.gather(torch.from_numpy(ids)))


@pytest.fixture(params=[None, 0.5], ids=["plain", "head-check"])
def changes(tokenizer, request):
    """A live database and the Changes that built it: adds (one joins a subject group), an
    update and a remove; without and with the head check."""
    db = NeuralDB(make_model("llama", tokenizer), tokenizer, CFG.replace(head_gamma=request.param))
    out = []
    for step in (lambda: db.plan_add(FACTS[:2]), lambda: db.plan_add(FACTS[2:]),
                 lambda: db.plan_update(1, Fact("Apple A5", "The maker of {}", "Honda", "Apple")),
                 lambda: db.plan_remove([0])):
        ch = step()
        db.apply(ch)
        out.append(ch)
    return db, out


def test_records_round_trip_and_replay_rebuilds_the_database(changes, tokenizer, tmp_path) -> None:
    live, chs = changes
    for ch in chs:
        back = decode(encode(5, ch)[20:])  # past the record head
        assert back.op == ch.op and back.rows == ch.rows and back.facts == ch.facts and back.removed == ch.removed
        assert torch.equal(back.keys, ch.keys) and torch.equal(back.residuals, ch.residuals)
    wal = WriteAheadLog(tmp_path / "db.wal")
    assert wal.open() == []
    for seq, ch in enumerate(chs, 1):
        wal.append(seq, ch)
    wal.sync()
    wal.close()
    fresh = NeuralDB(live.model, tokenizer, live.config, attach=False)
    for rec in WriteAheadLog(tmp_path / "db.wal").open():
        fresh.apply(rec.change)
    same_db(live, fresh)
    assert fresh.prefixes == live.prefixes


def test_a_torn_tail_is_cut_at_any_byte(changes, tmp_path) -> None:
    _, chs = changes
    path = tmp_path / "db.wal"
    wal = WriteAheadLog(path)
    wal.open()
    sizes = [wal.append(seq, ch) for seq, ch in enumerate(chs[:3], 1)]
    wal.sync()
    wal.close()
    data = path.read_bytes()
    end2 = len(HEADER) + sizes[0] + sizes[1]
    for cut in sorted({1, 4, 12, 19, 20, 21, 100, sizes[2] // 2, sizes[2] - 1}):
        path.write_bytes(data[: end2 + cut])
        w = WriteAheadLog(path)
        recs = w.open()
        assert [r.seq for r in recs] == [1, 2] and w.torn_bytes == cut and path.stat().st_size == end2
        w.append(3, chs[2])  # the log goes on after the cut
        w.sync()
        w.close()
        assert [r.seq for r in WriteAheadLog(path).open()] == [1, 2, 3]
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a torn last page: the last record fails its checksum
    path.write_bytes(bytes(flipped))
    assert [r.seq for r in WriteAheadLog(path).open()] == [1, 2]
    path.write_bytes(data[:5])  # torn before the header was whole: an empty log
    assert WriteAheadLog(path).open() == [] and path.read_bytes() == HEADER


def test_damage_before_the_end_is_refused(changes, tmp_path) -> None:
    _, chs = changes
    path = tmp_path / "db.wal"
    wal = WriteAheadLog(path)
    wal.open()
    first = wal.append(1, chs[0])
    wal.append(2, chs[1])
    wal.sync()
    wal.close()
    data = bytearray(path.read_bytes())
    data[len(HEADER) + first // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WALError, match=r"db\.wal: record at byte 8 is damaged .* records follow"):
        WriteAheadLog(path).open()
    path.write_bytes(b"NOTAWAL!" + bytes(data[8:]))
    with pytest.raises(WALError, match="bad header"):
        WriteAheadLog(path).open()


def test_engine_replays_only_what_its_checkpoint_lacks(tiny_model_dir, tmp_path, tokenizer) -> None:
    """A crash between a checkpoint's save and the log's reset leaves records the checkpoint
    already holds: they are skipped by seq, never applied twice."""
    cfg = EngineConfig(tmp_path / "db", str(tiny_model_dir), edit_config=CFG)
    eng = ServeEngine(cfg)
    chs = [eng.db.plan_add(FACTS[:2])]
    eng.db.apply(chs[0])
    chs.append(eng.db.plan_add(FACTS[2:3]))
    eng.db.apply(chs[1])
    for seq, ch in enumerate(chs, 1):
        eng.wal.append(seq, ch)
    eng.wal.sync()
    eng.wal.close()
    checkpoint = NeuralDB(eng.model, eng.tok, CFG, attach=False)  # the checkpoint holds record 1 only
    checkpoint.apply(chs[0])
    save_state(cfg.db, _with_seq(checkpoint, 1))
    eng.db.detach()
    again = ServeEngine(cfg)
    assert again.replayed == 1 and again.seq == 2 and sorted(again.db.facts) == [0, 1, 2]
    same_db(eng.db, again.db)
    again.start()
    again.stop()  # drains and checkpoints: the log is empty, the database holds all
    assert again.wal.records == 0 and wal_path(cfg.db).stat().st_size == len(HEADER)
    again.db.detach()
    third = ServeEngine(cfg)
    assert third.replayed == 0 and sorted(third.db.facts) == [0, 1, 2]
    third.db.detach()


def _with_seq(db: NeuralDB, seq: int):
    state = db.state()
    state.meta["wal_seq"] = seq
    return state


def test_a_failed_fsync_acknowledges_nothing_and_stops_the_worker(tiny_model_dir, tmp_path) -> None:
    import threading

    from neuraldb.serve.engine import Job, JobError

    eng = ServeEngine(EngineConfig(tmp_path / "db", str(tiny_model_dir), edit_config=CFG))

    def broken_sync() -> None:
        raise OSError(5, "Input/output error")

    eng.wal.sync = broken_sync
    eng.start()
    got, done = [], threading.Event()
    eng.submit(Job("write", ("add", FACTS[:1]), lambda r, e: (got.append((r, e)), done.set())))
    assert done.wait(60)
    (res, err), = got
    assert res is None and isinstance(err, JobError) and err.status == 503 and "not made durable" in err.message
    eng._thread.join(10)
    assert eng.fatal is not None and not eng.alive
    with pytest.raises(JobError, match="engine stopped"):
        eng.submit(Job("generate", None, lambda r, e: None))
    eng.db.detach()


def test_generations_are_batched_up_to_max_batch(tiny_model_dir, tmp_path, tokenizer) -> None:
    """Requests queued together run as one batch, never more than max_batch at once."""
    import threading

    from neuraldb.serve.engine import Job
    from neuraldb.serve.generate import Sampling

    for max_batch, want in ((1, [1, 1, 1, 1, 1]), (4, [4, 1])):
        eng = ServeEngine(EngineConfig(tmp_path / f"db{max_batch}", str(tiny_model_dir), max_batch=max_batch,
                                       edit_config=CFG))
        sizes, done = [], threading.Semaphore(0)
        eng.metrics.observe = lambda name, value, *a, **k: sizes.append(int(value)) if name == \
            "neuraldb_batch_size" else None
        ids = tokenizer("Where is")["input_ids"]
        for _ in range(5):  # all queued before the worker starts
            eng.submit(Job("generate", Sampling(ids, 3, 0.0), lambda r, e: done.release()))
        eng.start()
        for _ in range(5):
            assert done.acquire(timeout=60)
        assert sizes == want
        eng.stop()
        eng.db.detach()
