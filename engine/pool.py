"""A pool of facts held as an Arrow table (Hugging Face `datasets`), for runs of 100k facts and more.

Rows are neuraldb's own fact form (`Fact.to_json`), one column per field and `meta` as a JSON
string; `pool[i]` builds one `Fact`, `pool[a:b]` a list of them, so a 100k-fact pool is one
memory-mapped table, not 100k Python objects. Files are read by `datasets`: a JSON array or JSONL
file in any record format `load_facts` knows (auto-detected per record), CSV (list fields as JSON
arrays or single strings), Parquet, or a directory written by `FactPool.save_to_disk`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, overload

from tqdm.auto import tqdm

from .facts import Fact, FactError, record_to_fact

log = logging.getLogger(__name__)

LISTS = ("paraphrases", "neighborhood", "generation_prompts")
STRINGS = ("id", "subject", "prompt", "target_new", "target_true", "locality_target", "meta")
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _features() -> Any:
    from datasets import Features, Sequence as Seq, Value

    return Features({**{k: Value("string") for k in STRINGS}, **{k: Seq(Value("string")) for k in LISTS}})


def _row(fact: Fact) -> dict[str, Any]:
    row: dict[str, Any] = {k: getattr(fact, k) for k in STRINGS if k != "meta"}
    row.update({k: list(getattr(fact, k)) for k in LISTS})
    row["meta"] = json.dumps(fact.meta, ensure_ascii=False) if fact.meta else None
    return row


def _fact(row: dict[str, Any]) -> Fact:
    return Fact(subject=row["subject"], prompt=row["prompt"], target_new=row["target_new"],
                target_true=row["target_true"], id=row["id"], locality_target=row["locality_target"],
                **{k: tuple(row[k] or ()) for k in LISTS}, meta=json.loads(row["meta"]) if row["meta"] else {})


def _unlist_csv(rec: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are strings: a cell holding a JSON array becomes the list it spells."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, str) and v.lstrip().startswith("["):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def _convert(batch: dict[str, list[Any]], idx: list[int], *, fmt: str, where: str, csv: bool,
             skip_invalid: bool) -> dict[str, list[Any]]:
    """One batch of raw records (any supported format) to rows in neuraldb's form; with
    `skip_invalid`, records that are not valid facts are left out (and logged)."""
    rows: dict[str, list[Any]] = {k: [] for k in STRINGS + LISTS}
    for j, i in enumerate(idx):
        rec = {k: v[j] for k, v in batch.items() if v[j] is not None}  # absent fields come back as None
        rec = _unlist_csv(rec) if csv else rec
        try:
            fact = record_to_fact(rec, f"{where} record {i}", fmt, i)
        except FactError as exc:
            if not skip_invalid:
                raise
            log.warning("skipped: %s", exc)
            continue
        for k, v in _row(fact).items():
            rows[k].append(v)
    return rows


class FactPool(Sequence[Fact]):
    """An ordered, read-only pool of facts over a `datasets.Dataset` in neuraldb's fact form."""

    def __init__(self, table: Any) -> None:
        missing = set(STRINGS + LISTS) - set(table.column_names)
        if missing:
            raise FactError(f"fact pool: column(s) {sorted(missing)} missing")
        self.table = table

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, fmt: str = "auto", limit: int | None = None,
                  skip_invalid: bool = False) -> "FactPool":
        """Facts from one file (JSON, JSONL, CSV, Parquet) or a `save_to_disk` directory. A record
        that is not a valid fact raises `FactError` naming the file, record and field, or is left
        out with a warning when `skip_invalid`."""
        import datasets

        path = Path(path)
        if path.is_dir():
            try:
                table = datasets.load_from_disk(str(path))
            except (FileNotFoundError, ValueError) as exc:
                raise FactError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
            pool = cls(table)
        else:
            if not path.is_file():
                raise FactError(f"{path}: facts file not found")
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise FactError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(BUILDERS)}")
            try:
                raw = datasets.load_dataset(builder, data_files=str(path), split="train")
            except Exception as exc:  # datasets wraps parser errors in several types
                raise FactError(f"{path}: cannot be read as {builder} ({type(exc).__name__}: {exc})") from None
            if limit is not None:
                raw = raw.select(range(min(limit, len(raw))))
            table = raw.map(_convert, batched=True, batch_size=1000, with_indices=True,
                            remove_columns=raw.column_names, features=_features(), desc=f"facts from {path.name}",
                            fn_kwargs={"fmt": fmt, "where": str(path), "csv": builder == "csv",
                                       "skip_invalid": skip_invalid})
            pool = cls(table)
        if limit is not None and len(pool) > limit:
            pool = pool.head(limit)
        if len(pool) == 0:
            raise FactError(f"{path}: no facts found")
        pool.check_ids(str(path))
        return pool

    @classmethod
    def from_facts(cls, facts: Iterable[Fact], batch: int = 10_000) -> "FactPool":
        """A pool from facts made in Python (e.g. the synthetic generator), converted `batch` at a time."""
        from datasets import Dataset, concatenate_datasets

        parts, rows = [], []
        feats = _features()
        for fact in tqdm(facts, desc="facts to arrow", unit="fact", disable=None, leave=False):
            rows.append(_row(fact))
            if len(rows) == batch:
                parts.append(Dataset.from_list(rows, features=feats))
                rows = []
        if rows or not parts:
            parts.append(Dataset.from_list(rows, features=feats))
        return cls(concatenate_datasets(parts) if len(parts) > 1 else parts[0])

    @classmethod
    def concat(cls, pools: Sequence["FactPool"]) -> "FactPool":
        from datasets import concatenate_datasets

        return cls(concatenate_datasets([p.table for p in pools]))

    def head(self, n: int) -> "FactPool":
        return FactPool(self.table.select(range(min(n, len(self)))))

    def save_to_disk(self, path: str | Path) -> None:
        self.table.save_to_disk(str(path))

    def check_ids(self, where: str) -> None:
        seen: dict[str, int] = {}
        for i, fid in enumerate(self.table["id"]):
            if fid in seen:
                raise FactError(f"{where} record {i}: duplicate id {fid!r} (first seen at record {seen[fid]})")
            seen[fid] = i

    # access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    @overload
    def __getitem__(self, i: int) -> Fact: ...
    @overload
    def __getitem__(self, i: slice) -> list[Fact]: ...
    def __getitem__(self, i: int | slice) -> Fact | list[Fact]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            cols = self.table[start:stop]  # dict of column lists
            return [_fact({k: cols[k][j] for k in cols}) for j in range(stop - start if stop > start else 0)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"fact {i} out of range for a pool of {len(self)}")
        return _fact(self.table[i])

    def __iter__(self) -> Iterator[Fact]:
        for s in range(0, len(self), 1000):
            yield from self[s : s + 1000]
