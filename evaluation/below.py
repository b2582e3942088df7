"""What the gate probe reads below l*, kept per input so that every database's probe starts at l*.

The probe of a request (evaluation/general.py) runs the model up to the gated FFN at l* to learn
where a gate opens. Everything it computes below block l* (the residual stream entering the
block, and the attention outputs of the key space's context blocks below it, summed in forward
order) depends on the model and the input only, never on the database. `BelowCache` keeps those
two tensors per input, in float32, on disk; `capture_below` records them during any forward
pass that runs the blocks below l* in float32 (the unedited model's scoring, or a probe), and
`start_below` makes a later probe feed them to block l* (`engine.hooks.start_at_layer`), so it
runs one block instead of l* + 1. Block l* then sees the same values a full forward computed
(bit for bit when the batch has the same shape: a row's float32 GEMM results do not depend on
the other rows), so its gate decisions are those of a probe from the embeddings.

On disk: `rows.f32` (each input's (T, d_model + d_ctx) rows, appended), `index.jsonl` (key,
first row, length; a line is written only after its rows are flushed, so a torn tail is
ignored) and `meta.json` (the layer, the context modules and the widths; a cache made for
another space is refused)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.arch import ffn_dims, get_arch, model_device
from ..engine.config import ConfigError
from ..engine.hooks import Trace, get_module, start_at_layer


class BelowCache:
    """Per input key: (hidden (T, d_model), context (T, d_ctx)) float32 below block `layer`.
    `context_paths` are the key space's attention modules below l* whose outputs the gate's
    context part sums (empty: the space has no context part below l*)."""

    def __init__(self, path: Path, layer: int, context_paths: Sequence[str], d_model: int, d_ctx: int) -> None:
        self.path, self.layer, self.context_paths = Path(path), layer, tuple(context_paths)
        self.d_model, self.d_ctx = d_model, d_ctx if self.context_paths else 0
        self.width = self.d_model + self.d_ctx
        meta = {"layer": layer, "context_paths": list(self.context_paths), "d_model": d_model, "d_ctx": self.d_ctx}
        self.path.mkdir(parents=True, exist_ok=True)
        mfile = self.path / "meta.json"
        if mfile.is_file():
            have = json.loads(mfile.read_text(encoding="utf-8"))
            if have != meta:
                raise ConfigError(f"{mfile}: made for {have}, not {meta}; use another folder")
        else:
            mfile.write_text(json.dumps(meta), encoding="utf-8")
        self.rows_file, self.index_file = self.path / "rows.f32", self.path / "index.jsonl"
        self.entries: dict[str, tuple[int, int]] = {}  # key -> (first row, rows)
        total = self.rows_file.stat().st_size // (4 * self.width) if self.rows_file.is_file() else 0
        if self.index_file.is_file():
            for line in self.index_file.read_text(encoding="utf-8").splitlines():
                try:
                    key, first, n = json.loads(line)
                except (ValueError, TypeError):
                    continue  # a torn last line
                if int(first) + int(n) <= total:
                    self.entries[str(key)] = (int(first), int(n))
        self._map: np.memmap | None = None

    @classmethod
    def for_db(cls, path: Path, db: Any) -> "BelowCache":
        """The cache of `db`'s layer and key space (its context modules below l*)."""
        block = get_arch(db.model).attn.format(db.layer)
        below = tuple(p for p in db.space.attn_paths if p != block)
        _, d_model = ffn_dims(db.model, db.layer)
        return cls(path, db.layer, below, d_model, db.space.d_ctx)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        first, n = hit
        if self._map is None or self._map.shape[0] < first + n:  # whole rows only: a torn tail is not read
            total = self.rows_file.stat().st_size // (4 * self.width)
            self._map = np.memmap(self.rows_file, dtype=np.float32, mode="r", shape=(total, self.width))
        rows = torch.from_numpy(np.array(self._map[first : first + n]))  # (T, d_model + d_ctx), a copy
        return rows[:, : self.d_model], rows[:, self.d_model :]

    def put(self, items: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]]) -> None:
        """Append (key, hidden (T, d_model), context (T, d_ctx) or None) for keys not held yet."""
        items = [it for it in items if it[0] not in self.entries]
        if not items:
            return
        first = self.rows_file.stat().st_size // (4 * self.width) if self.rows_file.is_file() else 0
        lines = []
        with open(self.rows_file, "ab") as fh:
            fh.truncate(first * 4 * self.width)  # drop a torn partial row
            for key, hidden, context in items:
                parts = [hidden.detach().float().cpu()] + ([context.detach().float().cpu()] if self.d_ctx else [])
                rows = torch.cat(parts, -1)  # (T, d_model + d_ctx)
                if rows.shape[1] != self.width:
                    raise ValueError(f"{self.path}: rows of width {rows.shape[1]}, this cache holds {self.width}")
                fh.write(rows.contiguous().numpy().tobytes())
                lines.append((key, first, rows.shape[0]))
                first += rows.shape[0]
            fh.flush()
            os.fsync(fh.fileno())
        torn = False
        if self.index_file.is_file() and self.index_file.stat().st_size > 0:
            with open(self.index_file, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
        with open(self.index_file, "a", encoding="utf-8") as fh:
            if torn:  # a killed writer's partial line: end it, so that it spoils only itself
                fh.write("\n")
            for key, f, n in lines:
                self.entries[key] = (f, n)
                fh.write(json.dumps([key, f, n]) + "\n")


@contextlib.contextmanager
def capture_below(model: nn.Module, cache: BelowCache) -> Iterator[dict[str, torch.Tensor | None]]:
    """Record, for every forward pass in the block, what enters block l* ("hidden", (B, T,
    d_model)) and the context modules' outputs summed in forward order ("context", (B, T, d_ctx)
    float32, as the gate's space sums them; None without context modules). Each pass overwrites
    the last: read them after each forward."""
    got: dict[str, torch.Tensor | None] = {"hidden": None, "context": None}
    layers = get_module(model, get_arch(model).layers)
    handles = []

    def enter(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        got["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handles.append(layers[cache.layer].register_forward_pre_hook(enter, with_kwargs=True))
    for k, path in enumerate(cache.context_paths):
        def ctx(_mod: nn.Module, _args: Any, out: Any, first: bool = k == 0) -> None:
            a = (out[0] if isinstance(out, tuple) else out).detach().float()  # (B, T, d_ctx)
            got["context"] = a if first or got["context"] is None else got["context"] + a

        handles.append(get_module(model, path).register_forward_hook(ctx))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def start_below(model: nn.Module, cache: BelowCache, gate: Any, hidden: torch.Tensor,
                context: torch.Tensor | None, tuple_len: int) -> Iterator[None]:
    """Run a forward pass from block l* on: `hidden` (B, T, d_model) enters it in place of the
    blocks below, and the gate's context sum starts from `context` (B, T, d_ctx) before block
    l*'s own attention output joins it (as the hooks below l* would have left it). `tuple_len`:
    `block_tuple_len`."""
    layers = get_module(model, get_arch(model).layers)
    handle = None
    if cache.context_paths:
        if context is None:
            raise ValueError("this cache's space sums context below l*: give the context rows")

        def preset(_mod: nn.Module, _args: tuple, _kwargs: dict) -> None:
            gate.context = context

        handle = layers[cache.layer].register_forward_pre_hook(preset, with_kwargs=True)
    try:
        with start_at_layer(model, get_arch(model).layers, cache.layer, hidden, tuple_len):
            yield
    finally:
        if handle is not None:
            handle.remove()


def block_tuple_len(model: nn.Module, layer: int) -> int:
    """How many items decoder block `layer` returns (0: a tensor, as transformers 5's Llama):
    what `start_at_layer`'s stand-ins must mimic. Measured once per model by a two-token forward
    that stops after the block (run it with any gate disabled: its search is not wanted)."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
    with torch.no_grad(), Trace(model, f"{get_arch(model).layers}.{layer}", retain_input=False,
                                retain_output=True, stop=True) as tr:
        model(ids, use_cache=False)
    return len(tr.output) if isinstance(tr.output, tuple) else 0
