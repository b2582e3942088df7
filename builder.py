"""`neuraldb build`: keys and residuals of a large fact pool, on one process or many
(torch.distributed: `torchrun --nnodes N --nproc-per-node G -m neuraldb.cli build ...`).

The pool is planned into chunks of about `--chunk` facts. Every fact about one subject lands in
the chunk of that subject's first fact, so a subject's facts share one residual as
`NeuralDB.add` gives them. Chunk k goes to rank k % world_size. A rank computes each of its
chunks on its own device, from the Arrow-backed `FactPool` (only the chunk's rows become Python
objects), and writes OUT/chunks/chunk_K.safetensors (ids, keys, residuals, NLL, steps; written
to a temporary name, fsynced, renamed). A restart skips every chunk whose file is complete, so
a chunk whose writer died is redone and nothing else. When every chunk exists, rank 0 assembles
one database through the crash-safe save (the `Proj` basis is fitted once, there) into OUT/db.

A chunk's residuals depend on the chunk alone (its facts, in pool order, batched as
`compute_residuals` batches them), so the database built by any number of ranks equals the one
built by one process with the same `--chunk`, bit for bit at the same thread count."""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

FAIL_ENV = "NEURALDB_BUILD_FAIL_CHUNK"  # fault injection for tests: this chunk raises
KILL_ENV = "NEURALDB_BUILD_KILL_AFTER"  # fault injection for tests: SIGKILL self after writing this many chunks


class BuildError(RuntimeError):
    """A chunk that could not be computed (the message names it), or a broken work directory."""


@dataclass(frozen=True)
class Plan:
    chunks: list[np.ndarray]  # pool indices of each chunk, ascending
    signature: str  # what the chunk files must have been made for


def plan(subjects: Sequence[str], size: int, signature: dict[str, Any]) -> Plan:
    """Chunks of about `size` facts; each fact goes to the chunk of its subject's first fact."""
    first: dict[str, int] = {}
    owner = np.empty(len(subjects), dtype=np.int64)
    for i, s in enumerate(subjects):
        owner[i] = first.setdefault(s.strip(), i) // size
    n_chunks = int(owner.max()) + 1 if len(owner) else 0
    order = np.argsort(owner, kind="stable")  # pool order within each chunk
    bounds = np.searchsorted(owner[order], np.arange(n_chunks + 1))
    sig = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    chunks = [order[bounds[k] : bounds[k + 1]] for k in range(n_chunks)]
    return Plan([c for c in chunks if len(c)], sig)  # a range whose facts all joined earlier subjects is dropped


def _chunk_path(out: Path, k: int) -> Path:
    return out / "chunks" / f"chunk_{k:06d}.safetensors"


def chunk_done(out: Path, k: int, ids: np.ndarray, sig: str) -> bool:
    """Whether chunk k's file is complete and was made for these facts and settings."""
    from safetensors import SafetensorError, safe_open

    path = _chunk_path(out, k)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="np") as fh:
            return (fh.metadata() or {}).get("signature") == sig and np.array_equal(fh.get_tensor("ids"), ids)
    except (SafetensorError, OSError, ValueError):
        log.warning("%s: unreadable, redone", path)
        return False


def write_chunk(out: Path, k: int, tensors: dict[str, torch.Tensor], sig: str) -> None:
    from safetensors.torch import save_file

    path = _chunk_path(out, k)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, str(tmp), metadata={"signature": sig})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """One line per rank at most every `every` seconds: chunks done, facts/s, time left."""

    def __init__(self, rank: int, total_facts: int, every: float = 30.0) -> None:
        self.rank, self.total, self.every = rank, total_facts, every
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def update(self, facts: int, chunk: int) -> None:
        self.done += facts
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            rate = self.done / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / rate if rate else float("inf")
            print(f"rank {self.rank}: chunk {chunk}, {self.done}/{self.total} facts, {rate:.2f} facts/s, "
                  f"{left / 60:.1f} min left", file=sys.stderr, flush=True)
            self.last = now


def _dist() -> tuple[int, int, Any]:
    """(rank, world size, the process group module or None) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), dist


def settings(facts_path: str | Path, n: int, chunk: int, fingerprint: Any, config: Any) -> dict[str, Any]:
    """What a chunk file must have been made for: the facts file, pool size, chunk size, model
    and EditConfig (not the index; not a field added later while at the value that behaves as
    before, so chunks written before it still count)."""
    from .engine.config import NEUTRAL_LATER

    cfg = {k: v for k, v in vars(config).items()
           if k != "index" and not (k in NEUTRAL_LATER and v == NEUTRAL_LATER[k])}
    return {"facts": str(Path(facts_path).resolve()), "n": n, "chunk": chunk, "model": fingerprint, "config": cfg}


def build(facts_path: str | Path, out: str | Path, model_name: str, chunk: int = 1024,
          config: Any = None, layer: int | None = None, gamma: float | None = None,
          index: str | None = None) -> dict[str, Any]:
    """Compute this rank's chunks, then (rank 0) assemble OUT/db. Returns a summary."""
    from .engine import NeuralDB, load_model
    from .engine.pool import FactPool

    rank, world, dist = _dist()
    out = Path(out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    pool = FactPool.from_file(facts_path, skip_invalid=False)
    model, tok = load_model(model_name, device=device)
    db = NeuralDB(model, tok, config, layer=layer, gamma=gamma, index=index, attach=False)
    sig = settings(facts_path, len(pool), chunk, db.fingerprint(), db.config)
    the_plan = plan(pool.table["subject"], chunk, sig)
    mine = [k for k in range(len(the_plan.chunks)) if k % world == rank]
    todo = [k for k in mine if not chunk_done(out, k, the_plan.chunks[k], the_plan.signature)]
    print(f"rank {rank}/{world} on {device}: {len(mine)} chunks, {len(mine) - len(todo)} already done",
          file=sys.stderr, flush=True)
    progress = _Progress(rank, int(sum(len(the_plan.chunks[k]) for k in todo)))
    fail, kill_after = os.environ.get(FAIL_ENV), os.environ.get(KILL_ENV)
    t0 = time.perf_counter()
    for n_written, k in enumerate(todo):
        ids = the_plan.chunks[k]
        try:
            if fail is not None and int(fail) == k:
                raise RuntimeError(f"injected failure ({FAIL_ENV}={fail})")
            facts = FactPool(pool.table.select(ids.tolist()))[:]  # only this chunk as Python objects
            keys = db.encode_keys(facts)
            res = db.encode_residuals(facts)
        except Exception as exc:
            raise BuildError(f"chunk {k} ({len(ids)} facts, pool rows {int(ids[0])}..{int(ids[-1])}) failed on "
                             f"rank {rank}: {type(exc).__name__}: {exc}") from exc
        stats = db.last_stats
        write_chunk(out, k, {"ids": torch.from_numpy(ids), "keys": keys, "residuals": res,
                             "nll": stats.nll, "steps": stats.steps}, the_plan.signature)
        progress.update(len(ids), k)
        if kill_after is not None and n_written + 1 >= int(kill_after):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    compute_s = time.perf_counter() - t0
    computed = int(sum(len(the_plan.chunks[k]) for k in todo))
    if dist is not None:
        dist.barrier()
    summary: dict[str, Any] = {"rank": rank, "world_size": world, "facts": len(pool), "chunks": len(the_plan.chunks),
                               "chunks_computed_here": len(todo), "facts_computed_here": computed,
                               "compute_s": compute_s, "facts_per_s_here": computed / compute_s if compute_s else None}
    if rank == 0:
        missing = [k for k in range(len(the_plan.chunks))
                   if not chunk_done(out, k, the_plan.chunks[k], the_plan.signature)]
        if missing:
            raise BuildError(f"{out / 'chunks'}: chunks {missing[:10]} are missing after every rank finished")
        t1 = time.perf_counter()
        summary.update(assemble(db, pool, the_plan, out))
        summary["assemble_s"] = time.perf_counter() - t1
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def assemble(db: Any, pool: Any, the_plan: Plan, out: Path) -> dict[str, Any]:
    """Every chunk into one database (a fact's id is its pool row), inserted at once so the
    index is planned and its basis fitted once, and saved crash-safely to OUT/db."""
    from safetensors.torch import load_file

    from .engine.arch import model_device
    from .engine.pool import FactPool

    parts: dict[str, list[torch.Tensor]] = {"ids": [], "keys": [], "residuals": [], "nll": [], "steps": []}
    for k in range(len(the_plan.chunks)):
        t = load_file(str(_chunk_path(out, k)))
        for name in parts:
            parts[name].append(t[name])
    cat = {name: torch.cat(v) for name, v in parts.items()}
    order = torch.argsort(cat["ids"])
    ids = cat["ids"][order]
    facts = FactPool(pool.table.select(ids.tolist()))[:]
    db.ensure_prefixes()
    db.insert(ids.tolist(), facts, cat["keys"][order].to(model_device(db.model)), cat["residuals"][order])
    path = db.save(out / "db")
    return {"db": str(path), "mean_final_nll": float(cat["nll"].mean()) if len(ids) else None,
            "mean_steps": float(cat["steps"].float().mean()) if len(ids) else None}
