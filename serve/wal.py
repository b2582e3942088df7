"""The server's write-ahead log: every fact operation, as the `Change` it computed, appended
and fsynced before the client hears back; replayed over the last checkpoint on start.

File: an 8-byte header `NDBWAL1\\n`, then records

    b"NDBR" | seq u64 | body_len u32 | crc32(seq, body_len, body) u32 | body
    body = json_len u32 | json (op, ids, fact records, dtypes) | keys bytes | residual bytes

(little-endian). Records are appended in seq order and fsynced in groups (`append` several,
then one `sync`). Recovery (`open`) reads records until the end; a last record that is
incomplete or fails its checksum is a torn write: it is cut off (that write was never
acknowledged), with a warning. A damaged record with valid data after it is not a torn tail
but corruption, and opening refuses with an error naming the file and offset."""
from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..engine.change import Change
from ..engine.facts import FactError, fact_from_json
from ..engine.persistence import DatabaseError, fsync_dir

log = logging.getLogger(__name__)
HEADER = b"NDBWAL1\n"
MAGIC = b"NDBR"
_HEAD = struct.Struct("<4sQII")  # magic, seq, body_len, crc
MAX_BODY = 1 << 31


class WALError(DatabaseError):
    """A write-ahead log that is damaged beyond a torn last record."""


@dataclass(frozen=True)
class Record:
    seq: int
    change: Change
    offset: int  # where the record starts in the file


def _tensor_bytes(t: torch.Tensor) -> tuple[bytes, str, list[int]]:
    a = t.detach().to("cpu").contiguous().numpy()
    return a.tobytes(), a.dtype.str, list(a.shape)


def encode(seq: int, change: Change) -> bytes:
    kb, kdt, kshape = _tensor_bytes(change.keys)
    rb, rdt, rshape = _tensor_bytes(change.residuals)
    head = {"op": change.op, "rows": list(change.rows), "facts": [f.to_json() for f in change.facts],
            "removed": list(change.removed), "res_ids": list(change.res_ids),
            "prefixes": list(change.prefixes) if change.prefixes is not None else None,
            "keys": [kdt, kshape], "residuals": [rdt, rshape]}
    js = json.dumps(head, ensure_ascii=False).encode("utf-8")
    body = struct.pack("<I", len(js)) + js + kb + rb
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<QI", seq, len(body))))
    return _HEAD.pack(MAGIC, seq, len(body), crc) + body


def _array(buf: memoryview, at: int, spec: list[Any]) -> tuple[torch.Tensor, int]:
    dt, shape = np.dtype(spec[0]), tuple(int(s) for s in spec[1])
    n = int(np.prod(shape)) * dt.itemsize
    a = np.frombuffer(buf[at:at + n], dtype=dt).reshape(shape).copy()
    return torch.from_numpy(a), at + n


def decode(body: bytes) -> Change:
    (n,) = struct.unpack_from("<I", body, 0)
    head = json.loads(body[4:4 + n].decode("utf-8"))
    view = memoryview(body)
    keys, at = _array(view, 4 + n, head["keys"])
    res, at = _array(view, at, head["residuals"])
    if at != len(body):
        raise ValueError(f"body holds {len(body) - at} bytes past its tensors")
    facts = tuple(fact_from_json(rec, "write-ahead log record") for rec in head["facts"])
    prefixes = tuple(head["prefixes"]) if head.get("prefixes") is not None else None
    return Change(head["op"], tuple(head["rows"]), facts, keys, tuple(head["removed"]), tuple(head["res_ids"]),
                  res, prefixes)


class WriteAheadLog:
    """wal = WriteAheadLog(path); records = wal.open()   # recover, then append at the end
    wal.append(seq, change); ...; wal.sync()               # one fsync for the group
    wal.reset()                                            # after a checkpoint holds everything"""

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path, self.fsync = Path(path), fsync
        self._fh: BinaryIO | None = None
        self.records = 0
        self.torn_bytes = 0  # bytes cut off the tail by the last open

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def open(self) -> list[Record]:
        """Read every whole record (cutting off a torn tail), then open for appending."""
        if not self.path.exists() or self.path.stat().st_size < len(HEADER):
            self._create()
            return []
        data = self.path.read_bytes()
        if data[: len(HEADER)] != HEADER:
            raise WALError(f"{self.path}: not a neuraldb write-ahead log (bad header)")
        out, at, last_seq = [], len(HEADER), -1
        while at < len(data):
            rec, end, why = self._read_one(data, at)
            if rec is None:
                if self._more_records_after(data, at):
                    raise WALError(f"{self.path}: record at byte {at} is damaged ({why}) and records follow it; "
                                   f"refusing to replay (restore the file or remove it with its checkpoint)")
                self.torn_bytes = len(data) - at
                log.warning("%s: dropped a torn last record (%d bytes at %d: %s); it was never acknowledged",
                            self.path, self.torn_bytes, at, why)
                with open(self.path, "r+b") as fh:
                    fh.truncate(at)
                    os.fsync(fh.fileno())
                break
            if rec.seq <= last_seq:
                raise WALError(f"{self.path}: record at byte {at} has seq {rec.seq} after {last_seq}")
            last_seq = rec.seq
            out.append(rec)
            at = end
        self._fh = open(self.path, "ab")
        self.records = len(out)
        return out

    def _read_one(self, data: bytes, at: int) -> tuple[Record | None, int, str]:
        if len(data) - at < _HEAD.size:
            return None, at, "incomplete header"
        magic, seq, n, crc = _HEAD.unpack_from(data, at)
        if magic != MAGIC:
            return None, at, "bad magic"
        end = at + _HEAD.size + n
        if n > MAX_BODY or end > len(data):
            return None, at, "incomplete body"
        body = data[at + _HEAD.size: end]
        if zlib.crc32(body, zlib.crc32(struct.pack("<QI", seq, n))) != crc:
            return None, at, "checksum mismatch"
        try:
            change = decode(body)
        except (ValueError, KeyError, TypeError, FactError, struct.error, UnicodeDecodeError) as exc:
            return None, at, f"undecodable ({exc})"
        return Record(seq, change, at), end, ""

    def _more_records_after(self, data: bytes, at: int) -> bool:
        """Whether a whole, valid record starts anywhere after `at` (then `at` is not a tail)."""
        k = data.find(MAGIC, at + 1)
        while k != -1:
            if self._read_one(data, k)[0] is not None:
                return True
            k = data.find(MAGIC, k + 1)
        return False

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(HEADER)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._fh = open(self.path, "ab")
        self.records = 0

    def append(self, seq: int, change: Change) -> int:
        """Buffer one record (durable only after `sync`); returns its size in bytes."""
        if self._fh is None:
            raise WALError(f"{self.path}: log not open")
        rec = encode(seq, change)
        self._fh.write(rec)
        self.records += 1
        return len(rec)

    def sync(self) -> None:
        """Flush and fsync every record appended so far: after this they are durable."""
        if self._fh is None:
            return
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def reset(self) -> None:
        """Start an empty log (after a checkpoint that holds every record): atomic replace."""
        self.close()
        self._create()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

