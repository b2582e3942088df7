"""`ServeEngine`: the one owner of the model and the database.

HTTP handlers never touch the model: they put jobs on a queue, and one worker thread runs
them in order. Each turn the worker takes everything queued (up to `max_batch` generations):
first the writes, as one group commit (plan each on the current state, apply it, append its
`Change` to the write-ahead log; one fsync; then every writer hears back), then explains, then
all generations as one batch (`generate_batch`). A request therefore sees every fact
acknowledged before it started and never half an edit; requests that arrive while a batch
runs join the next one. The log is compacted into a checkpoint (the crash-safe database save)
every `checkpoint_records` records, after `checkpoint_interval_s` with records pending, and on
`stop()` after the queue is drained."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.arch import model_device
from ..engine.editor import NeuralDB
from ..engine.facts import Fact
from ..engine.models import load_model
from ..engine.persistence import (
    DatabaseError,
    is_database,
    read_db,
    read_meta,
    recover,
    save_state,
)
from .generate import RowOut, generate_batch
from .metrics import Metrics
from .wal import WriteAheadLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    db: Path
    model: str | None = None  # None: the model the database was built for (smollm2-135m for a new one)
    max_batch: int = 16
    checkpoint_records: int = 1000
    checkpoint_interval_s: float = 300.0
    fsync: bool = True
    edit_config: Any = None  # an EditConfig for a new database (None: the model's defaults)


def wal_path(db: Path) -> Path:
    """The log lives beside the database directory (a save replaces that directory whole)."""
    return db.parent / f"{db.name}.wal"


class JobError(Exception):
    """A job that failed for a reason the client should hear (status, message, param)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Job:
    kind: str  # "write" | "explain" | "generate" | "checkpoint" | "stop"
    payload: Any
    done: Callable[[Any, BaseException | None], None]  # called once, from the worker thread
    on_step: Callable[[RowOut], None] | None = None  # generate: after every token (streaming)
    cancelled: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.perf_counter)


class ServeEngine:
    def __init__(self, cfg: EngineConfig, metrics: Metrics | None = None) -> None:
        self.cfg, self.metrics = cfg, metrics or Metrics()
        self.created = time.time()
        t0 = time.perf_counter()
        self.db, self.checkpoint_seq = self._open(cfg)
        self.model, self.tok = self.db.model, self.db.tok
        self.wal = WriteAheadLog(wal_path(cfg.db), fsync=cfg.fsync)
        replay = [r for r in self.wal.open() if r.seq > self.checkpoint_seq]
        for rec in replay:
            self.db.apply(rec.change)
        self.seq = replay[-1].seq if replay else self.checkpoint_seq
        self.replayed = len(replay)
        self.facts_lock = threading.Lock()
        self.facts: dict[int, Fact] = dict(self.db.facts)  # what handlers read (a copy the worker updates)
        self.started_s = time.perf_counter() - t0
        log.info("opened %s: %d facts, replayed %d log records (%d torn bytes dropped) in %.2fs",
                 cfg.db, len(self.db), len(replay), self.wal.torn_bytes, self.started_s)
        self._q: queue.Queue[Job] = queue.Queue()
        self._last_checkpoint = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="neuraldb-worker", daemon=True)
        self._stopped = threading.Event()
        self._fatal: BaseException | None = None
        self._update_gauges()

    # ----- opening ------------------------------------------------------------------------------
    @staticmethod
    def _open(cfg: EngineConfig) -> tuple[NeuralDB, int]:
        path = Path(cfg.db)
        # A checkpoint killed between its two renames leaves only the old copy beside the path:
        # finish or undo it before asking whether a database is there (else its log is orphaned).
        recover(path)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())) and not is_database(path):
            raise DatabaseError(f"{path}: exists and is not a neuraldb database")
        if is_database(path):
            if cfg.edit_config is not None:
                log.warning("%s: an existing database keeps its own config; --config is ignored", path)
            name = cfg.model or str(read_meta(path, verify_files=False)["model"].get("name") or "smollm2-135m")
            model, tok = load_model(name)
            stored = read_db(path, device=model_device(model))
            db = NeuralDB.from_state(model, tok, stored, where=path)
            return db, int(stored.meta.get("wal_seq", 0))
        model, tok = load_model(cfg.model or "smollm2-135m")
        db = NeuralDB(model, tok, cfg.edit_config)
        if wal_path(path).exists():  # a log without its checkpoint cannot be replayed onto anything
            raise DatabaseError(f"{wal_path(path)}: a write-ahead log exists but its database {path} does not; "
                                f"move the log away to start empty")
        state = db.state()
        state.meta["wal_seq"] = 0
        save_state(path, state)
        return db, 0

    # ----- the queue ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._fatal is not None:
            raise JobError(503, f"the engine stopped: {self._fatal}")
        if self._stopped.is_set():
            raise JobError(503, "the server is shutting down")
        self._q.put(job)
        self.metrics.gauge("neuraldb_queue_depth", self._q.qsize(), "jobs waiting for the worker")

    def stop(self, timeout: float | None = None) -> None:
        """Drain the queue, checkpoint, close the log (SIGTERM path)."""
        if self._thread.is_alive():
            self._q.put(Job("stop", None, lambda r, e: None))
            self._thread.join(timeout)
        self._stopped.set()

    @property
    def fatal(self) -> BaseException | None:
        """What stopped the worker (a failed fsync or checkpoint), if anything did."""
        return self._fatal

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._fatal is None

    def _run(self) -> None:
        try:
            while True:
                wait = max(0.05, self.cfg.checkpoint_interval_s - (time.monotonic() - self._last_checkpoint))
                try:
                    first = self._q.get(timeout=wait)
                except queue.Empty:
                    self._maybe_checkpoint(idle=True)
                    continue
                jobs, n_gen = [first], int(first.kind == "generate")
                while n_gen < self.cfg.max_batch:  # everything queued now, up to max_batch generations
                    try:
                        j = self._q.get_nowait()
                    except queue.Empty:
                        break
                    jobs.append(j)
                    n_gen += j.kind == "generate"
                stop = any(j.kind == "stop" for j in jobs)
                self._turn([j for j in jobs if j.kind != "stop"])
                if stop:
                    self._drain()
                    self._checkpoint()
                    self.wal.close()
                    return
                self._maybe_checkpoint(idle=False)
        except BaseException as exc:  # a failed fsync or save: memory may be ahead of the disk
            self._fatal = exc
            log.critical("worker stopped: %s", exc, exc_info=True)
            self._fail_all(exc)

    def _drain(self) -> None:
        while True:
            try:
                jobs = [self._q.get_nowait()]
            except queue.Empty:
                return
            self._turn([j for j in jobs if j.kind != "stop"])

    def _fail_all(self, exc: BaseException) -> None:
        while True:
            try:
                j = self._q.get_nowait()
            except queue.Empty:
                return
            j.done(None, JobError(503, f"the engine stopped: {exc}"))

    def _turn(self, jobs: list[Job]) -> None:
        writes = [j for j in jobs if j.kind == "write"]
        if writes:
            self._write_group(writes)
        for j in jobs:
            if j.kind == "explain":
                self._call(j, lambda j=j: self._explain(j.payload))
            elif j.kind == "checkpoint":
                self._call(j, self._checkpoint)
        gens = [j for j in jobs if j.kind == "generate" and not j.cancelled.is_set()]
        if gens:
            self._generate(gens)
        self._update_gauges()

    @staticmethod
    def _call(job: Job, fn: Callable[[], Any]) -> None:
        try:
            res = fn()
        except JobError as exc:
            job.done(None, exc)
        else:
            job.done(res, None)

    # ----- writes: plan, apply, log; one fsync; then acknowledge --------------------------------
    def _write_group(self, jobs: list[Job]) -> None:
        results: list[tuple[Job, Any, BaseException | None]] = []
        for j in jobs:
            op, arg = j.payload
            try:
                change = self._plan(op, arg)
            except KeyError as exc:
                results.append((j, None, JobError(404, str(exc.args[0]) if exc.args else "no such fact", "id")))
                continue
            except JobError as exc:
                results.append((j, None, exc))
                continue
            except Exception as exc:
                log.exception("planning a %s failed", op)
                results.append((j, None, JobError(500, f"the {op} failed: {exc}")))
                continue
            self.db.apply(change)
            self.seq += 1
            nbytes = self.wal.append(self.seq, change)
            self.metrics.inc("neuraldb_wal_appended_bytes_total", nbytes, "bytes appended to the write-ahead log")
            results.append((j, change, None))
        try:
            self.wal.sync()
        except BaseException as exc:  # not durable: no writer is told otherwise; the worker stops
            for j, _, _ in results:
                j.done(None, JobError(503, f"the write was not made durable ({exc}); the server stopped"))
            raise
        self.metrics.inc("neuraldb_wal_fsyncs_total", 1, "fsyncs of the write-ahead log (one per write group)")
        with self.facts_lock:
            for _, change, err in results:
                if err is None:
                    for i in change.removed:
                        self.facts.pop(i, None)
                    for i, f in zip(change.rows, change.facts):
                        self.facts[i] = f
        for j, change, err in results:
            j.done(change, err)

    def _plan(self, op: str, arg: Any):
        if op == "add":
            return self.db.plan_add(arg)
        if op == "update":
            return self.db.plan_update(*arg)
        if op == "remove":
            return self.db.plan_remove(arg)
        raise JobError(400, f"unknown write op {op!r}")

    # ----- checkpoints --------------------------------------------------------------------------
    def _maybe_checkpoint(self, idle: bool) -> None:
        due = self.wal.records >= self.cfg.checkpoint_records or (
            self.wal.records and time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_interval_s)
        if due:
            self._checkpoint()
        elif idle and not self.wal.records:  # nothing pending: the interval counts from now
            self._last_checkpoint = time.monotonic()

    def _checkpoint(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        records = self.wal.records
        if records or self.seq != self.checkpoint_seq:
            state = self.db.state()
            state.meta["wal_seq"] = self.seq
            save_state(Path(self.cfg.db), state)  # crash-safe; a crash before reset replays nothing twice
            self.checkpoint_seq = self.seq
            self.wal.reset()
            self.metrics.inc("neuraldb_checkpoints_total", 1, "checkpoints written")
        self._last_checkpoint = time.monotonic()
        return {"seq": self.seq, "records": records, "seconds": time.perf_counter() - t0}

    # ----- reads --------------------------------------------------------------------------------
    @torch.no_grad()
    def _explain(self, prompt_ids: list[int]) -> list[dict[str, Any]]:
        gate = self.db.gate
        ids = torch.tensor([prompt_ids], device=model_device(self.model))
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out = []
        sims, fids, open_ = (t.reshape(-1).tolist() for t in gate.last) if gate.last is not None else ([], [], [])
        mask = gate.token_mask.reshape(-1).tolist() if gate.token_mask is not None else [True] * len(prompt_ids)
        for p, t in enumerate(prompt_ids):
            gated = bool(mask[p]) and p < len(sims) and fids[p] >= 0
            out.append({"position": p, "token": self.tok.decode([t]), "token_id": t,
                        "fact_id": int(fids[p]) if gated else None,
                        "cosine": float(sims[p]) if gated else None,
                        "opened": bool(open_[p]) if gated else False})
        return out

    def _generate(self, jobs: list[Job]) -> None:
        self.metrics.observe("neuraldb_batch_size", len(jobs), "generation requests per batch",
                             buckets=(1, 2, 4, 8, 16, 32, 64))
        gate = self.db.gate

        def on_forward() -> None:
            if gate is not None and gate.last is not None:
                self.metrics.inc("neuraldb_gate_opens_total", int(gate.last[2].sum()),
                                 "tokens whose gate opened (a fact's residual was added)")

        def on_step(changed: list[int], outs: list[RowOut]) -> None:
            for b in changed:
                if jobs[b].on_step is not None:
                    jobs[b].on_step(outs[b])

        try:
            outs = generate_batch(self.model, self.tok, [j.payload for j in jobs], on_step=on_step,
                                  cancelled=lambda b: jobs[b].cancelled.is_set(), on_forward=on_forward)
        except Exception as exc:
            log.exception("generation batch failed")
            for j in jobs:
                j.done(None, JobError(500, f"generation failed: {exc}"))
            return
        for j, o in zip(jobs, outs):
            j.done(o, None)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.gauge("neuraldb_facts", len(self.db), "facts in the database")
        m.gauge("neuraldb_wal_bytes", self.wal.size, "size of the write-ahead log")
        m.gauge("neuraldb_wal_records", self.wal.records, "records in the write-ahead log since the checkpoint")
        m.gauge("neuraldb_queue_depth", self._q.qsize(), "jobs waiting for the worker")
