"""Saving and loading a database: config.yaml + facts.jsonl + keys/residuals/index safetensors.

save() writes everything into a fresh temporary directory beside the target and renames it
into place, so a crash mid-save leaves the previous database untouched. load() checks the
format, the model (type, layer count, a hash of the gated layer's weights), layer and dims."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..index import KeyIndex, ResidualTable
from .config import EditConfig, from_mapping, to_mapping
from .facts import FactError, parse_records, save_facts_jsonl
from .arch import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .editor import NeuralDB

log = logging.getLogger(__name__)
FORMAT = "neuraldb-db-1"
FILES = ("config.yaml", "facts.jsonl", "keys.safetensors", "residuals.safetensors", "index.safetensors")


class DatabaseError(RuntimeError):
    """A database directory that is missing, corrupted, or built for another model."""


def save_db(db: "NeuralDB", directory: Path) -> Path:
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        ids = np.asarray(sorted(db.facts), dtype=np.int64)
        meta = {"format": FORMAT, "model": db.fingerprint(), "next_id": db.next_id,
                "prefixes": db.prefixes, "config": to_mapping(db.config), "num_facts": len(ids)}
        (tmp / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
        save_facts_jsonl([replace(db.facts[int(i)], id=str(int(i))) for i in ids], tmp / "facts.jsonl")
        keys = db.key_table.gather(torch.from_numpy(ids), device=torch.device("cpu"))
        save_file({"ids": torch.from_numpy(ids), "keys": keys.cpu().contiguous()}, str(tmp / "keys.safetensors"))
        db.table.save(tmp / "residuals.safetensors")
        db.index.save(tmp / "index.safetensors")
        for f in FILES:  # flush to disk before the rename makes them visible
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rmdir(old)
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d facts to %s", len(db.facts), directory)
    return directory


def read_meta(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise DatabaseError(f"{directory}: database directory not found")
    for f in FILES:
        if not (directory / f).is_file():
            raise DatabaseError(f"{directory / f}: missing database file")
    try:
        meta = yaml.safe_load((directory / "config.yaml").read_text())
    except yaml.YAMLError as exc:
        raise DatabaseError(f"{directory / 'config.yaml'}: corrupted ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatabaseError(f"{directory / 'config.yaml'}: not a {FORMAT} database config")
    return meta


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


def load_db(cls: type["NeuralDB"], directory: Path, model: "PreTrainedModel", tok: "PreTrainedTokenizerBase",
            index: str | None = None, residual_mmap: bool = False) -> "NeuralDB":
    meta = read_meta(directory)
    cfg = from_mapping(EditConfig, meta["config"], str(directory / "config.yaml"))
    db = cls(model, tok, cfg.replace(index=index), attach=False)
    check_model(meta, db.fingerprint(), directory)
    try:
        facts = parse_records(((f"{directory / 'facts.jsonl'}:{n}", json.loads(line)) for n, line in
                               enumerate((directory / "facts.jsonl").read_text().splitlines(), 1)), "jsonl")
    except (FactError, json.JSONDecodeError) as exc:
        raise DatabaseError(f"{directory / 'facts.jsonl'}: corrupted ({exc})") from exc
    device = model_device(model)
    try:
        kt = load_file(str(directory / "keys.safetensors"))
        table = ResidualTable.load(directory / "residuals.safetensors", device=device, mmap=residual_mmap)
        same_index = index is None or index == meta["config"]["index"]
        if same_index:
            db.index = KeyIndex.load(directory / "index.safetensors", device=device, floor=cfg.gamma)
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise DatabaseError(f"{directory}: corrupted tensor file ({exc})") from exc
    ids, keys = kt["ids"].numpy(), kt["keys"]
    if keys.shape[1:] != (db.d_key,) or table.dim != db.d_res or len(ids) != len(facts):
        raise DatabaseError(f"{directory}: tensor shapes do not match the config "
                            f"(keys {tuple(keys.shape)}, residual dim {table.dim}, {len(facts)} facts)")
    if not np.array_equal(np.sort(table.ids()), ids):
        raise DatabaseError(f"{directory / 'residuals.safetensors'}: ids do not match keys.safetensors")
    db.table = table
    if not same_index and len(ids):
        db.index.add(ids, keys.to(device))  # a different index spec: rebuild it from the keys
    if len(ids):
        db.key_table.put(ids, keys)
    db.facts = {int(i): f for i, f in zip(ids, facts)}
    db.next_id, db.prefixes = int(meta["next_id"]), meta["prefixes"]
    db.attach()
    return db
