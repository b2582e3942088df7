"""Saving and loading a database directory: config.yaml + facts.jsonl + residuals + index,
gate_map.safetensors (a copy of the learned map) when the config names one, and
heads.safetensors (the head check's table, engine/heads.py) when the config sets head_gamma.

What a save guarantees
- It never deletes what is not a database: a path that exists and is neither empty nor a
  neuraldb database is refused, and nothing there is touched.
- It survives SIGKILL at any instant. The new database is written and fsynced in a sibling
  `.NAME.neuraldb-tmp-*`; the old one is renamed to `.NAME.neuraldb-old`, the new one renamed
  into place, the old one deleted, and the parent directory fsynced after each rename. Whoever
  next opens or saves the path (under an flock on `.NAME.neuraldb-lock`) finishes or undoes an
  interrupted save: the old copy comes back if the new one never reached the path, and
  leftovers are deleted only if they hold nothing but database files.
- Removed facts are gone: only live rows are written (removed rows are zeroed in memory too).

What a load checks, before any model is touched (`read_db`, also `neuraldb info`)
- config.yaml ends with a sha256 of itself, lists every other file with its size and sha256,
  and holds every required key with the right type; each file must match.
- Tensor headers, shapes and dims; facts, residuals and index hold exactly the same ids.
- Then, against the model: model_type, layer count, layer, dims, and a hash of the gated
  layer's weights. Every failure is one `DatabaseError` line that names the file."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import yaml

from ..index import IndexError_, KeyIndex, ResidualTable
from .config import ConfigError, EditConfig, from_mapping, to_mapping
from .facts import Fact, FactError, fact_from_json
from .gate_map import GateMap
from .heads import N_SPANS, head_dim, widen


log = logging.getLogger(__name__)
FORMAT = "neuraldb-db-2"
DATA_FILES = ("facts.jsonl", "residuals.safetensors", "index.safetensors")
FILES = ("config.yaml", *DATA_FILES)
MAP_FILE = "gate_map.safetensors"  # a copy of the gate map, when the config names one
HEADS_FILE = "heads.safetensors"  # the head table, when the config sets head_gamma
OPTIONAL = (MAP_FILE, HEADS_FILE)
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str, "model": dict, "next_id": int, "prefixes": (list, type(None)), "config": dict,
    "num_facts": int, "files": dict}
MODEL_KEYS = ("name", "model_type", "num_layers", "layer", "d_key", "d_res", "layer_sha256")
CHECKSUM_PREFIX = "# sha256 "


class DatabaseError(RuntimeError):
    """A database directory that is missing, damaged, or built for another model."""


# ----- the directory protocol ----------------------------------------------------------------
def _siblings(directory: Path) -> tuple[list[Path], Path, Path]:
    """(temporary dirs, the old copy, the lock file) that a save of `directory` uses."""
    parent, name = directory.parent, directory.name
    tmps = sorted(parent.glob(f".{name}.neuraldb-tmp-*")) if parent.is_dir() else []
    return tmps, parent / f".{name}.neuraldb-old", parent / f".{name}.neuraldb-lock"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _only_db_files(path: Path) -> bool:
    """Nothing but what a save writes: the database files, and the `.tmp*` files through which
    safetensors writes them (left behind when a save is killed mid-write)."""
    return path.is_dir() and all(p.is_file() and (p.name in (*FILES, *OPTIONAL) or p.name.startswith(".tmp"))
                                 for p in path.iterdir())


def is_database(path: Path) -> bool:
    """A directory whose config.yaml says it is a neuraldb database (any format version)."""
    cfg = path / "config.yaml"
    if not cfg.is_file():
        return False
    with open(cfg, "rb") as fh:
        head = fh.read(256)
    return b"format: neuraldb-db-" in head


@contextlib.contextmanager
def flocked(fh: IO[bytes]) -> Iterator[None]:
    """An exclusive `flock` on the open lock file `fh`, held inside the block: one process at a
    time (a database's saves; an embedded model's conversion into the cache)."""
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    _, _, lock = _siblings(directory)
    try:
        fh = open(lock, "a+b")
    except OSError as exc:
        raise DatabaseError(f"{lock}: cannot open the lock file ({exc.strerror})") from exc
    with fh, flocked(fh):
        yield


def _recover_locked(directory: Path) -> None:
    tmps, old, _ = _siblings(directory)
    if old.exists():
        if directory.exists():  # the new database reached the path: the old copy is garbage
            _remove_leftover(old)
        else:  # killed between the two renames: bring the old database back
            os.rename(old, directory)
            log.warning("%s: restored the previous database after an interrupted save", directory)
        fsync_dir(directory.parent)
    for t in tmps:  # a save that never reached its renames
        _remove_leftover(t)


def _remove_leftover(path: Path) -> None:
    if _only_db_files(path):
        shutil.rmtree(path)
    else:
        log.warning("%s: left in place (it holds files that a neuraldb save does not write)", path)


def recover(directory: Path) -> None:
    """Finish or undo an interrupted save of `directory` (a no-op when there is none)."""
    tmps, old, _ = _siblings(directory)
    if tmps or old.exists():
        with _locked(directory):
            _recover_locked(directory)


# ----- writing -------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sealed_yaml(meta: dict[str, Any]) -> str:
    """YAML followed by a line holding the sha256 of everything above it."""
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return body + CHECKSUM_PREFIX + hashlib.sha256(body.encode()).hexdigest() + "\n"


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _refuse_foreign(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise DatabaseError(f"{directory}: exists and is not a directory; refusing to replace it")
    if directory.is_dir() and any(directory.iterdir()) and not is_database(directory):
        raise DatabaseError(f"{directory}: exists and is not a neuraldb database; refusing to overwrite it "
                            f"(choose an empty or new directory)")


def write_db(directory: Path, meta: dict[str, Any], facts: Sequence[tuple[int, Fact]], table: ResidualTable,
             index: KeyIndex, fault: Callable[[str], None] | None = None, gate_map: GateMap | None = None,
             heads: ResidualTable | None = None) -> Path:
    """Write a database to `directory`, atomically replacing a database already there.
    `fault(stage)` is called between the steps (tests inject crashes there)."""
    fault = fault or (lambda stage: None)
    directory = Path(os.path.abspath(directory))
    _refuse_foreign(directory)  # before anything is created beside it
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        _recover_locked(directory)
        _refuse_foreign(directory)
        _, old, _ = _siblings(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.neuraldb-tmp-", dir=directory.parent))
        try:
            with open(tmp / "facts.jsonl", "w", encoding="utf-8") as fh:
                for i, f in facts:
                    fh.write(json.dumps({"db_id": int(i), "fact": f.to_json()}, ensure_ascii=False) + "\n")
            fault("facts")
            table.save(tmp / "residuals.safetensors")
            fault("residuals")
            index.save(tmp / "index.safetensors")
            fault("index")
            written = DATA_FILES
            if gate_map is not None:
                gate_map.save(tmp / MAP_FILE)
                written += (MAP_FILE,)
            if heads is not None:
                heads.save(tmp / HEADS_FILE)
                written += (HEADS_FILE,)
            for f in written:  # flush to disk before the renames make them visible
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in written}
            _write_durable(tmp / "config.yaml", _sealed_yaml({**meta, "files": files}))
            fsync_dir(tmp)
            fault("written")
            if directory.exists():
                if is_database(directory):
                    os.rename(directory, old)
                else:
                    directory.rmdir()  # an empty directory (anything else was refused above)
                fsync_dir(directory.parent)
            fault("old-moved")
            os.rename(tmp, directory)
            fsync_dir(directory.parent)
            fault("new-in-place")
            if old.exists():
                shutil.rmtree(old)
                fsync_dir(directory.parent)
            fault("done")
        except BaseException:
            if not directory.exists() and old.exists():  # an in-process failure: undo at once
                os.rename(old, directory)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("saved %d facts to %s", len(facts), directory)
    return directory


def save_state(directory: Path, state: "Stored", fault: Callable[[str], None] | None = None) -> Path:
    """Write a database's state (`NeuralDB.state()`) to `directory`, crash-safely."""
    ids = np.asarray(sorted(state.facts), dtype=np.int64)
    parts = [("residual table", state.table.ids()), ("key index", state.index.ids())]
    for name, other in parts + ([("head table", state.heads.ids())] if state.heads is not None else []):
        if not np.array_equal(np.sort(other), ids):
            raise DatabaseError(f"{directory}: not saved: the {name} holds {len(other)} ids for {len(ids)} facts "
                                f"(facts inserted without residuals?)")
    # "format" leads: is_database() recognises a database by its first 256 bytes
    meta = {"format": FORMAT, "model": state.meta["model"], "next_id": state.next_id, **state.meta,
            "config": to_mapping(state.config), "num_facts": len(ids)}
    return write_db(directory, meta, [(int(i), state.facts[int(i)]) for i in ids], state.table, state.index, fault,
                    state.gate_map, state.heads)


# ----- reading -------------------------------------------------------------------------------
def read_meta(directory: Path, verify_files: bool = True) -> dict[str, Any]:
    """config.yaml, its checksum and its keys verified; with `verify_files`, every data file's
    size and sha256 too."""
    directory = Path(directory)
    recover(directory)
    if not directory.is_dir():
        raise DatabaseError(f"{directory}: database directory not found")
    cfg = directory / "config.yaml"
    for f in FILES:
        if not (directory / f).is_file():
            raise DatabaseError(f"{directory / f}: missing database file")
    raw = cfg.read_bytes()
    body, sep, tail = raw.rpartition(CHECKSUM_PREFIX.encode())
    if not sep or tail != hashlib.sha256(body).hexdigest().encode() + b"\n":
        raise DatabaseError(f"{cfg}: checksum mismatch (the file is damaged or was edited by hand)")
    try:
        meta = yaml.safe_load(body.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"{cfg}: not valid YAML ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatabaseError(f"{cfg}: expected a mapping")
    for key, tp in META_TYPES.items():
        if key not in meta:
            raise DatabaseError(f"{cfg}: key '{key}' is missing")
        if not isinstance(meta[key], tp) or isinstance(meta[key], bool):
            raise DatabaseError(f"{cfg}: key '{key}' has the wrong type ({type(meta[key]).__name__})")
    if meta["format"] != FORMAT:
        raise DatabaseError(f"{cfg}: format {meta['format']!r} is not {FORMAT!r}")
    missing = [k for k in MODEL_KEYS if k not in meta["model"]]
    if missing:
        raise DatabaseError(f"{cfg}: key 'model' lacks {missing}")
    listed = DATA_FILES + tuple(f for f in OPTIONAL if f in meta["files"])
    for f in listed if verify_files else ():
        entry = meta["files"].get(f)
        if not isinstance(entry, dict) or "bytes" not in entry or "sha256" not in entry:
            raise DatabaseError(f"{cfg}: key 'files' has no size and sha256 for {f}")
        path = directory / f
        if not path.is_file():
            raise DatabaseError(f"{path}: missing database file")
        if path.stat().st_size != entry["bytes"]:
            raise DatabaseError(f"{path}: {path.stat().st_size} bytes, expected {entry['bytes']} (truncated or damaged)")
        if _sha256(path) != entry["sha256"]:
            raise DatabaseError(f"{path}: checksum mismatch (the file is damaged)")
    return meta


@dataclass
class Stored:
    """A database's whole state, with no model involved: what `read_db` verified on disk, or
    what `NeuralDB.state()` hands to `save_state`. `meta` holds at least "model" (the
    fingerprint) and "prefixes"."""

    meta: dict[str, Any]
    config: EditConfig
    facts: dict[int, Fact]
    table: ResidualTable
    index: KeyIndex
    next_id: int
    gate_map: GateMap | None = None
    heads: ResidualTable | None = None  # the head table (engine/heads.py), when config.head_gamma is set

    @property
    def prefixes(self) -> list[str] | None:
        return self.meta.get("prefixes")


def _stored_fact(rec: dict[str, Any]) -> Fact:
    """A record this module wrote (`Fact.to_json` of a fact that was checked when it was made),
    from a file whose sha256 matched: rebuilt without re-running every field check (at 100k
    facts those took 2 of a load's 7 seconds). A record of the wrong shape still fails."""
    return Fact(**{k: (str(v) if k == "id" and v is not None else v) for k, v in rec.items()})


def _read_facts(path: Path, verified: bool = True) -> dict[int, Fact]:
    facts: dict[int, Fact] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("db_id"), int) or not isinstance(row.get("fact"), dict):
                raise DatabaseError(f"{where}: expected {{'db_id': int, 'fact': {{...}}}}")
            fact = _stored_fact(row["fact"]) if verified else fact_from_json(row["fact"], where)
        except (json.JSONDecodeError, FactError, KeyError, TypeError) as exc:
            raise DatabaseError(f"{where}: damaged fact record ({exc})") from exc
        if row["db_id"] in facts:
            raise DatabaseError(f"{where}: duplicate db_id {row['db_id']}")
        facts[row["db_id"]] = fact
    return facts


def read_db(directory: Path, device: str | torch.device = "cpu", residual_mmap: bool = False,
            index_options: dict[str, Any] | None = None) -> Stored:
    """Read and cross-check every file of a database (see the module docstring)."""
    directory = Path(directory)
    meta = read_meta(directory)
    cfg_path = directory / "config.yaml"
    try:
        config = from_mapping(EditConfig, meta["config"], f"{cfg_path}: key 'config'")
    except ConfigError as exc:
        raise DatabaseError(str(exc)) from exc
    facts = _read_facts(directory / "facts.jsonl")
    d_key, d_res = meta["model"]["d_key"], meta["model"]["d_res"]
    path = directory / "residuals.safetensors"
    table = _load_table(path, "residual table", device, residual_mmap)
    if table.dim != d_res:
        raise DatabaseError(f"{path}: residual dim {table.dim}, config says d_res={d_res}")
    path = directory / "index.safetensors"
    try:
        index = KeyIndex.load(path, device=device, floor=config.floor, **(index_options or {}))
    except (IndexError_, OSError) as exc:
        raise DatabaseError(f"{path}: damaged key index ({exc})") from exc
    if index.dim != d_key:
        raise DatabaseError(f"{path}: key dim {index.dim}, config says d_key={d_key}")
    ids = np.fromiter(sorted(facts), np.int64, len(facts))
    if len(ids) != meta["num_facts"]:
        raise DatabaseError(f"{directory / 'facts.jsonl'}: {len(ids)} facts, config says {meta['num_facts']}")
    heads = _read_heads(directory, meta, config, device)
    by_file = [("residuals.safetensors", table.ids()), ("index.safetensors", index.ids())]
    for name, other in by_file + ([(HEADS_FILE, heads.ids())] if heads is not None else []):
        if not np.array_equal(np.sort(other), ids):
            raise DatabaseError(f"{directory / name}: ids do not match facts.jsonl "
                                f"({len(other)} vs {len(ids)} ids, {len(np.setxor1d(other, ids))} differ)")
    next_id = max(meta["next_id"], int(ids.max()) + 1 if len(ids) else 0)
    return Stored(meta, config, facts, table, index, next_id, _read_map(directory, meta, config), heads)


def _load_table(path: Path, what: str, device: str | torch.device, mmap: bool = False) -> ResidualTable:
    try:
        return ResidualTable.load(path, device=device, mmap=mmap)
    except (ValueError, KeyError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"{path}: damaged {what} ({exc})") from exc


def _read_heads(directory: Path, meta: dict[str, Any], config: EditConfig,
                device: str | torch.device) -> ResidualTable | None:
    """The head table: present exactly when the config sets head_gamma (its ids are checked
    with the other files')."""
    listed = HEADS_FILE in meta["files"]
    if (config.head_gamma is not None) != listed:
        raise DatabaseError(f"{directory / 'config.yaml'}: head_gamma {config.head_gamma!r} but {HEADS_FILE} is "
                            f"{'listed' if listed else 'not listed'} in 'files'")
    if not listed:
        return None
    path = directory / HEADS_FILE
    heads = _load_table(path, "head table", device)
    d_key = meta["model"]["d_key"]
    if heads.dim == d_key + N_SPANS:  # the first layout, without head token ids: widened, ids unknown
        ids = torch.as_tensor(heads.ids(), dtype=torch.long)
        wide = ResidualTable(head_dim(d_key), device=device, dtype=heads.dtype)
        if ids.numel():
            wide.put(ids.numpy(), widen(heads.gather(ids), d_key))
        heads = wide
    if heads.dim != head_dim(d_key):
        raise DatabaseError(f"{path}: head rows of dim {heads.dim}, expected head_dim(d_key={d_key}) = {head_dim(d_key)}")
    return heads


def _read_map(directory: Path, meta: dict[str, Any], config: EditConfig) -> GateMap | None:
    """The database's copy of its gate map: present exactly when the config names one."""
    listed = MAP_FILE in meta["files"]
    if bool(config.gate_map) != listed:
        raise DatabaseError(f"{directory / 'config.yaml'}: gate_map {config.gate_map!r} but {MAP_FILE} is "
                            f"{'listed' if listed else 'not listed'} in 'files'")
    if not listed:
        return None
    try:
        return GateMap.load(directory / MAP_FILE)
    except ValueError as exc:
        raise DatabaseError(f"{directory / MAP_FILE}: damaged gate map ({exc})") from exc


def check_model(meta: dict[str, Any], fp: dict[str, Any], directory: Path) -> None:
    want = meta["model"]
    for key in ("model_type", "num_layers", "layer", "d_key", "d_res"):
        if want.get(key) != fp.get(key):
            raise DatabaseError(
                f"{directory}: database was built for {want.get('name')!r} with {key}={want.get(key)}, "
                f"but the model given has {key}={fp.get(key)}")
    if want.get("layer_sha256") != fp.get("layer_sha256"):
        raise DatabaseError(f"{directory}: database was built for model {want.get('name')!r}; the weights of "
                            f"layer {want['layer']} of the model given ({fp.get('name')!r}) differ")
