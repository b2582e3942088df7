"""`NeuralDB`: the editor API. Facts become rows (key, residual) of a neural KV database
attached to one FFN layer; add, remove, update, attach/detach, disable, save and load."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..index import KeyIndex, ResidualTable, make_index
from .arch import ffn_dims, get_arch, get_module, model_device, num_layers, set_module
from .config import ConfigError, EditConfig, model_defaults
from .facts import Fact
from .gated import GatedFFNOut, Hit, gate_mask_hook
from .keys import calibration_queries, compute_keys, generate_prefixes
from .residuals import ResidualStats, compute_residuals

log = logging.getLogger(__name__)


def model_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "neuraldb_name", None) or getattr(model.config, "_name_or_path", ""))


def layer_fingerprint(model: PreTrainedModel, layer: int) -> str:
    """sha256 of the FFN output weight of `layer` in bfloat16: identifies the model's weights
    whether it is loaded in fp32, fp16 or bf16."""
    mod = get_module(model, get_arch(model).ffn_out.format(layer))
    w = getattr(mod, "base_layer", mod).weight.detach().to("cpu", torch.bfloat16).contiguous()
    return hashlib.sha256(w.view(torch.int16).numpy().tobytes()).hexdigest()


class NeuralDB:
    """A gated neural key-value database of facts attached to one FFN layer of a causal LM.

    db = NeuralDB(model, tok)                  # per-model defaults (layer, gamma, index)
    ids = db.add(facts)                        # keys + residuals, gate attached
    db.remove(ids[:1]); db.update(ids[1], f)   # stable int64 ids
    with db.disabled(): ...                    # the unedited model
    db.save("db/"); NeuralDB.load("db/", model, tok)
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 config: EditConfig | None = None, *, layer: int | None = None,
                 gamma: float | None = None, index: str | None = None, attach: bool = True) -> None:
        self.model, self.tok = model, tokenizer
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        base = config or model_defaults(model_name(model), model.config.model_type)
        self.config = base.replace(layer=layer, gamma=gamma, index=index)
        n = num_layers(model)
        if not 0 <= self.config.layer < n:
            raise ConfigError(f"layer {self.config.layer} is out of range for a {n}-layer model "
                              f"(set EditConfig.layer or --layer)")
        self.layer = self.config.layer
        self.d_key, self.d_res = ffn_dims(model, self.layer)
        device = model_device(model)
        self.index: KeyIndex = make_index(self.config.index, self.d_key, device=device, floor=self.config.gamma)
        self.table = ResidualTable(self.d_res, device=device)
        self.facts: dict[int, Fact] = {}
        self.prefixes: list[str] | None = None
        self.next_id = 0
        self.last_stats: ResidualStats | None = None
        self.timings: dict[str, float] = {}
        self._trained: KeyIndex | None = None  # the index train_index() last trained
        self._gate: GatedFFNOut | None = None
        self._hooks: list[Any] = []
        self.generate_hits: list[Hit] = []  # hits of every step of the last generate()
        if attach:
            self.attach()

    # ----- the gate -------------------------------------------------------------------
    @property
    def path(self) -> str:
        return get_arch(self.model).ffn_out.format(self.layer)

    @property
    def gate(self) -> GatedFFNOut | None:
        return self._gate

    def attach(self) -> None:
        if self._gate is not None:
            return
        base = get_module(self.model, self.path)
        if isinstance(base, GatedFFNOut):
            raise RuntimeError(f"{self.path} is already gated by another NeuralDB; detach it first")
        self._gate = GatedFFNOut(base, self.index, self.table, self.config.gamma)
        set_module(self.model, self.path, self._gate)
        # On the decoder, not the LM wrapper: every path (model(...), generate, model.base_model(...)
        # as the metrics call it) passes through it, so the mask is never stale.
        self._hooks.append(self.model.base_model.register_forward_pre_hook(
            gate_mask_hook(self._gate, self.config.gate_first_token), with_kwargs=True))

    def detach(self) -> None:
        """Remove the gate: the model gets its original module object back."""
        if self._gate is None:
            return
        set_module(self.model, self.path, self._gate.base_layer)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._gate = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the unedited model inside this block."""
        gate = self._gate
        prev = gate.enabled if gate is not None else None
        if gate is not None:
            gate.enabled = False
        try:
            yield
        finally:
            if gate is not None:
                gate.enabled = bool(prev)

    def hits(self) -> list[Hit]:
        """Where the gate opened in the last forward pass (`generate_hits` covers a whole generate)."""
        return self._gate.hits() if self._gate is not None else []

    @contextlib.contextmanager
    def record(self) -> Iterator[list[list[Hit]]]:
        """Collect the hits of every forward pass inside the block, one list per pass."""
        gate = self._gate
        if gate is None:
            yield []
            return
        gate.history = []
        try:
            yield gate.history
        finally:
            gate.history = None

    # ----- editing --------------------------------------------------------------------
    def ensure_prefixes(self) -> list[str]:
        """The generated context prefixes of the key/residual recipe (generated once, seeded)."""
        if self.prefixes is None:
            with self.disabled():
                self.prefixes = generate_prefixes(self.model, self.tok, self.config)
        return self.prefixes

    def train_index(self, queries: torch.Tensor | None = None) -> bool:
        """Give an index that fits itself to real queries (`Proj`'s basis) a sample of them: by
        default the gate queries of text the model generates itself (`calibration_queries`),
        handed over as a function so that an index which needs them only later (`Auto`, below
        its switch) never pays for them. Speed only: such an index answers exactly whatever it
        was trained on. Returns whether the index takes training; done once per index, on the
        first insert or load."""
        train = getattr(self.index, "train", None)
        if train is not None:
            train(self._calibration if queries is None else queries)
        self._trained = self.index
        return train is not None

    def _calibration(self) -> torch.Tensor:
        with self.disabled():
            return calibration_queries(self.model, self.tok, self.layer, self.config)

    def encode_keys(self, facts: Sequence[Fact]) -> torch.Tensor:
        """Keys (F, d_key) of facts on the unedited model."""
        prefixes = self.ensure_prefixes()
        with self.disabled():
            return compute_keys(self.model, self.tok, facts, self.layer, prefixes, self.config)

    def encode_residuals(self, facts: Sequence[Fact]) -> torch.Tensor:
        """Residuals (F, d_res) of facts, computed on the unedited model (stats in `last_stats`)."""
        prefixes = self.ensure_prefixes()
        with self.disabled():
            t0 = time.perf_counter()
            res, self.last_stats = compute_residuals(self.model, self.tok, facts, self.layer, prefixes, self.config)
        self.timings = {"residuals_s": time.perf_counter() - t0, "facts": float(len(facts))}
        return res

    def encode(self, facts: Sequence[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (F, d_key) and residuals (F, d_res) of facts, computed on the unedited model."""
        t0 = time.perf_counter()
        keys = self.encode_keys(facts)
        keys_s = time.perf_counter() - t0
        res = self.encode_residuals(facts)
        self.timings["keys_s"] = keys_s
        return keys, res

    def add(self, facts: Fact | Iterable[Fact]) -> list[int]:
        """Edit facts into the model; returns their ids."""
        facts = [facts] if isinstance(facts, Fact) else list(facts)
        if not facts:
            return []
        keys, res = self.encode(facts)
        ids = list(range(self.next_id, self.next_id + len(facts)))
        self.insert(ids, facts, keys, res)
        return ids

    def insert(self, ids: Sequence[int], facts: Sequence[Fact], keys: torch.Tensor,
               residuals: torch.Tensor | None) -> None:
        """Store precomputed rows (e.g. from a cache) under `ids`. `residuals=None` stores keys
        only (an evaluation strategy: the residuals of the facts whose gates open are put into
        `table` later; until then such a fact adds nothing); such a database is not saved."""
        n_res = len(ids) if residuals is None else residuals.shape[0]
        if not (len(ids) == len(facts) == keys.shape[0] == n_res):
            raise ValueError("ids, facts, keys and residuals must have the same length")
        if keys.shape[1] != self.d_key or (residuals is not None and residuals.shape[1] != self.d_res):
            raise ValueError(f"keys must have dim {self.d_key} and residuals {self.d_res}, got "
                             f"{keys.shape[1]} and {None if residuals is None else residuals.shape[1]}")
        arr = np.asarray(ids, dtype=np.int64)
        if self._trained is not self.index:
            self.train_index()
        self.index.add(arr, keys)
        if residuals is not None:
            self.table.put(arr, residuals)
        for i, f in zip(ids, facts):
            self.facts[int(i)] = f
        self.next_id = max(self.next_id, int(arr.max()) + 1)

    def remove(self, ids: int | Iterable[int]) -> int:
        ids = [ids] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]
        missing = [i for i in ids if i not in self.facts]
        if missing:
            raise KeyError(f"no fact with id(s) {missing[:10]}")
        arr = np.asarray(ids, dtype=np.int64)
        n = self.index.remove(arr)
        self.table.remove(arr)
        for i in ids:
            del self.facts[i]
        return n

    def update(self, id_: int, fact: Fact) -> None:
        """Replace fact `id_` with `fact`, keeping its id."""
        if id_ not in self.facts:
            raise KeyError(f"no fact with id {id_}")
        keys, res = self.encode([fact])
        self.insert([id_], [fact], keys, res)

    def __len__(self) -> int:
        return len(self.facts)

    # ----- convenience ----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 12, record_hits: bool = False) -> str:
        """Greedy continuation of `prompt`. With `record_hits`, `generate_hits` lists every gate
        that opened (reading them back costs a host sync per step, so it is off by default)."""
        ids = self.tok(prompt, return_tensors="pt")["input_ids"].to(model_device(self.model))
        self.generate_hits = []
        with self.record() if record_hits else contextlib.nullcontext([]) as steps:
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tok.pad_token_id)
        # positions of decode steps count from the prompt's end
        self.generate_hits = [Hit(h.batch, h.position + (ids.shape[1] + k - 1 if k else 0), h.fact_id, h.similarity)
                          for k, hs in enumerate(steps) for h in hs]
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def fingerprint(self) -> dict[str, Any]:
        return {"name": model_name(self.model), "model_type": self.model.config.model_type,
                "num_layers": num_layers(self.model), "layer": self.layer, "d_key": self.d_key,
                "d_res": self.d_res, "layer_sha256": layer_fingerprint(self.model, self.layer)}

    def save(self, directory: str | Path) -> Path:
        """Write the database (atomic, crash-safe; refuses a path that holds anything else)."""
        from .persistence import save_db

        return save_db(self, Path(directory))

    @classmethod
    def load(cls, directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             index: str | None = None, residual_mmap: bool = False) -> "NeuralDB":
        from .persistence import load_db

        return load_db(cls, Path(directory), model, tokenizer, index=index, residual_mmap=residual_mmap)
