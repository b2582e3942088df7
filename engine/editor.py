"""`NeuralDB`: the editor API. Facts become rows (key, residual) of a neural KV database
attached to one FFN layer; add, remove, update, attach/detach, disable, save and load."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..index import KeyIndex, ResidualTable, make_index
from .arch import (ffn_dims, get_arch, get_module, layer_fingerprint, model_device, num_layers, set_module,
                   weights_sha256)
from .change import Change
from .config import ConfigError, EditConfig
from .facts import Fact
from .gate_map import GateMap, load_map, space_meta
from .gated import AddAfter, GatedFFNOut, Hit, gate_mask_hook
from .heads import N_SPANS, head_dim, widen
from .models import cache_dir
from .profile import model_profile
from .keys import calibration_queries, calibration_texts, compute_keys, generate_prefixes, with_head_rows
from .persistence import Stored, check_model, read_db, save_state
from .residuals import ResidualStats, compute_residuals
from .space import key_space

log = logging.getLogger(__name__)


def subject_key(fact: Fact) -> str:
    """How facts are grouped by subject: the subject as written, outer spaces stripped."""
    return fact.subject.strip()


def model_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "neuraldb_name", None) or getattr(model.config, "_name_or_path", ""))


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
                 gamma: float | None = None, index: str | None = None, attach: bool = True,
                 gate_map: GateMap | None = None) -> None:
        self.model, self.tok = model, tokenizer
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        # the settings and where they came from (saved with the database)
        base, self.profile = (config, "given") if config is not None else \
            model_profile(model_name(model), model.config.model_type, cache_dir(), lambda: weights_sha256(model))
        self.config = base.replace(layer=layer, gamma=gamma, index=index)
        n = num_layers(model)
        if self.config.layer == -1:  # no defaults/<name>.yaml nor defaults/<model_type>.yaml
            raise ConfigError(f"no defaults for model {model_name(model)!r} (model_type "
                              f"{model.config.model_type}, {n} layers): calibrate it once with "
                              f"'neuraldb calibrate --model {model_name(model)}' (or add --calibrate to edit / build / serve; "
                              f"docs/models.md), or give "
                              f"EditConfig(layer=..., gamma=...) / --layer and --gamma")
        if not 0 <= self.config.layer < n:
            raise ConfigError(f"layer {self.config.layer} is out of range for a {n}-layer model "
                              f"(set EditConfig.layer or --layer)")
        self.layer = self.config.layer
        plain = key_space(model, self.layer, self.config)
        self.gate_map = self._gate_map(gate_map, plain.dim)
        self.space = dataclasses.replace(plain, gate_map=self.gate_map)
        self.d_key, self.d_res = self.space.dim, ffn_dims(model, self.layer)[1]
        device = model_device(model)
        self.index: KeyIndex = make_index(self.config.index, self.d_key, device=device, floor=self.config.floor)
        self.table = ResidualTable(self.d_res, device=device)
        # the head check's table (engine/heads.py): the unit head key, the spans, the head token ids
        self.heads = ResidualTable(head_dim(self.d_key), device=device, dtype=torch.float16) \
            if self.config.head_gamma is not None else None
        # a fact's stored key row: the gate key, then its head row when there is a head table
        self.d_row = self.d_key + (head_dim(self.d_key) if self.heads is not None else 0)
        self.facts: dict[int, Fact] = {}
        self._by_subject: dict[str, set[int]] = {}  # subject_key -> ids of the facts about it
        self.prefixes: list[str] | None = None
        self.calibration: list[list[int]] | None = None  # token ids of the calibration texts, once sampled
        self.next_id = 0
        self.last_stats: ResidualStats | None = None
        self.timings: dict[str, float] = {}
        self._trained: KeyIndex | None = None  # the index train_index() last trained
        self._gate: GatedFFNOut | None = None
        self._hooks: list[Any] = []
        self.generate_hits: list[Hit] = []  # hits of every step of the last generate()
        if attach:
            self.attach()

    def _gate_map(self, given: GateMap | None, dim: int) -> GateMap | None:
        """The map `config.gate_map` names (or `given`, a stored database's copy of it), checked
        against this model, layer and `dim`-dimensional space."""
        if not self.config.gate_map:
            if given is not None:
                raise ConfigError("a gate map was given but EditConfig.gate_map is empty")
            return None
        gm = given if given is not None else load_map(self.config.gate_map)
        gm.check(self.map_meta(dim), f"EditConfig.gate_map {self.config.gate_map!r}")
        return gm

    def map_meta(self, dim: int | None = None) -> dict[str, str]:
        """What a gate map fitted for this database's space records (`GateMap.meta`)."""
        dim = self.space.dim if dim is None else dim
        return space_meta(self.layer, self.config.gate_context, self.config.gate_context_weight, dim,
                          layer_fingerprint(self.model, self.layer))

    # ----- the gate -------------------------------------------------------------------
    @property
    def path(self) -> str:
        return get_arch(self.model).ffn_out.format(self.layer)

    @property
    def add_path(self) -> str:
        """The module whose output the residuals join: the FFN output projection, or the norm
        after it where the architecture has one (Arch.ffn_add)."""
        return get_arch(self.model).add_path(self.layer)

    @property
    def gate(self) -> GatedFFNOut | None:
        return self._gate

    def attach(self) -> None:
        if self._gate is not None:
            return
        base = get_module(self.model, self.path)
        if isinstance(base, GatedFFNOut):
            raise RuntimeError(f"{self.path} is already gated by another NeuralDB; detach it first")
        self._gate = GatedFFNOut(base, self.index, self.table, self.config.gamma, self.space, self.heads,
                                 self.config.head_gamma or 0.0, self.config.head_window, self.config.sink_gamma)
        set_module(self.model, self.path, self._gate)
        after = get_arch(self.model).ffn_add
        if after:  # the residual joins after the norm that follows the FFN (Arch.ffn_add)
            path = after.format(self.layer)
            self._gate.deferred = True
            set_module(self.model, path, AddAfter(get_module(self.model, path), self._gate))
        self._hooks += self.space.context_hooks(self.model, self._gate)
        # On the decoder, not the LM wrapper: every path (model(...), generate, model.base_model(...)
        # as the metrics call it) passes through it, so the mask is never stale.
        self._hooks.append(self.model.base_model.register_forward_pre_hook(
            gate_mask_hook(self._gate, self.config.gate_first_token), with_kwargs=True))

    def detach(self) -> None:
        """Remove the gate: the model gets its original module object back."""
        if self._gate is None:
            return
        set_module(self.model, self.path, self._gate.base_layer)
        after = get_arch(self.model).ffn_add
        if after:
            path = after.format(self.layer)
            set_module(self.model, path, get_module(self.model, path).base_layer)
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
            if self.calibration is None:  # sampled once, then kept (and saved) as token ids
                self.calibration = calibration_texts(self.model, self.tok, self.config)
            return calibration_queries(self.model, self.tok, self.layer, self.config, self.calibration)

    def encode_keys(self, facts: Sequence[Fact]) -> torch.Tensor:
        """Key rows (F, d_row) of facts on the unedited model: the gate key (F, d_key), then,
        with a head table, the head row (F, head_dim(d_key)): the head key read from the same
        passes, the spans and the head token ids."""
        prefixes = self.ensure_prefixes()
        with self.disabled():
            if self.heads is None:
                return compute_keys(self.model, self.tok, facts, self.layer, prefixes, self.config, space=self.space)
            both = compute_keys(self.model, self.tok, facts, self.layer, prefixes, self.config, space=self.space,
                                at="both")  # (F, 2, d_key)
        return with_head_rows(self.tok, facts, prefixes, both)  # (F, d_row)

    def encode_residuals(self, facts: Sequence[Fact]) -> torch.Tensor:
        """Residuals (F, d_res) of facts, computed on the unedited model (stats in `last_stats`).
        With `subject_groups`, facts about one subject among `facts` share one residual,
        optimised jointly over all their prompts and targets."""
        prefixes = self.ensure_prefixes()
        groups = [subject_key(f) for f in facts] if self.config.subject_groups else None
        with self.disabled():
            t0 = time.perf_counter()
            res, self.last_stats = compute_residuals(self.model, self.tok, facts, self.layer, prefixes, self.config,
                                                     groups=groups)
        self.timings = {"residuals_s": time.perf_counter() - t0, "facts": float(len(facts))}
        return res

    def encode(self, facts: Sequence[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        """Key rows (F, d_row) and residuals (F, d_res) of facts, computed on the unedited model."""
        t0 = time.perf_counter()
        keys = self.encode_keys(facts)
        keys_s = time.perf_counter() - t0
        res = self.encode_residuals(facts)
        self.timings["keys_s"] = keys_s
        return keys, res

    # ----- facts about one subject ----------------------------------------------------
    def same_subject(self, subjects: Iterable[str]) -> list[int]:
        """Ids of stored facts about any of `subjects` (as `subject_key` spells them), ascending."""
        return sorted(i for s in set(subjects) for i in self._by_subject.get(s, ()))

    def add(self, facts: Fact | Iterable[Fact]) -> list[int]:
        """Edit facts into the model; returns their ids. With `subject_groups` (the default),
        a fact about a subject the database already holds facts about joins them: one residual,
        optimised for all of their prompts at once, is written to each of their rows."""
        change = self.plan_add(facts)
        self.apply(change)
        return list(change.rows)

    def plan_add(self, facts: Fact | Iterable[Fact]) -> Change:
        """What `add(facts)` writes, computed on the unedited model and not yet applied."""
        facts = [facts] if isinstance(facts, Fact) else list(facts)
        if not facts:
            return Change("add", (), (), torch.zeros(0, self.d_row), (), (), torch.zeros(0, self.d_res))
        fresh = self.prefixes is None
        ids = list(range(self.next_id, self.next_id + len(facts)))
        t0 = time.perf_counter()
        keys = self.encode_keys(facts)
        keys_s = time.perf_counter() - t0
        old = self.same_subject(map(subject_key, facts)) if self.config.subject_groups else []
        # a group's facts are optimised in id order (the stored ones, then the new), whatever
        # order they arrived in: Adam's first steps follow gradient signs, so order matters
        res = self.encode_residuals([self.facts[i] for i in old] + facts)  # (O + F, d_res)
        self.timings["keys_s"] = keys_s
        return Change("add", tuple(ids), tuple(facts), keys, (), tuple(old) + tuple(ids), res,
                      self._new_prefixes(fresh))

    def _new_prefixes(self, fresh: bool) -> tuple[str, ...] | None:
        return tuple(self.prefixes) if fresh and self.prefixes is not None else None

    def apply(self, change: Change) -> None:
        """Write a planned change: index and table inserts only, the model is not run. A change
        must be applied to the database state it was planned on (ids and groups are its)."""
        keys = self._widen(change.keys)
        if keys.shape[0] and keys.shape[1] != self.d_row:
            raise ValueError(f"change keys have dim {keys.shape[1]}, the database's key rows {self.d_row}")
        if change.prefixes is not None and self.prefixes is None:
            self.prefixes = list(change.prefixes)
        if change.removed:
            arr = np.asarray(change.removed, dtype=np.int64)
            self.index.remove(arr)
            self.table.remove(arr)
            if self.heads is not None:
                self.heads.remove(arr)
            for i in change.removed:
                self._forget(i)
                del self.facts[i]
        if change.rows:
            self.insert(list(change.rows), list(change.facts), keys, None)
        if change.res_ids:
            self.table.put(np.asarray(change.res_ids, dtype=np.int64), change.residuals)

    def insert(self, ids: Sequence[int], facts: Sequence[Fact], keys: torch.Tensor,
               residuals: torch.Tensor | None) -> None:
        """Store precomputed rows (e.g. from a cache) under `ids`. `residuals=None` stores keys
        only (an evaluation strategy: the residuals of the facts whose gates open are put into
        `table` later; until then such a fact adds nothing); such a database is not saved."""
        n_res = len(ids) if residuals is None else residuals.shape[0]
        if not (len(ids) == len(facts) == keys.shape[0] == n_res):
            raise ValueError("ids, facts, keys and residuals must have the same length")
        keys = self._widen(keys)
        if keys.shape[1] != self.d_row or (residuals is not None and residuals.shape[1] != self.d_res):
            raise ValueError(f"key rows must have dim {self.d_row} and residuals {self.d_res}, got "
                             f"{keys.shape[1]} and {None if residuals is None else residuals.shape[1]}"
                             + (" (with a head table a key row is the key, then its head row: encode_keys)"
                                if self.heads is not None else ""))
        arr = np.asarray(ids, dtype=np.int64)
        if self._trained is not self.index:
            self.train_index()
        self.index.add(arr, keys[:, : self.d_key])
        if self.heads is not None:
            self.heads.put(arr, keys[:, self.d_key :])
        if residuals is not None:
            self.table.put(arr, residuals)
        for i, f in zip(ids, facts):
            self._forget(int(i))
            self.facts[int(i)] = f
            self._by_subject.setdefault(subject_key(f), set()).add(int(i))
        self.next_id = max(self.next_id, int(arr.max()) + 1)

    def _widen(self, keys: torch.Tensor) -> torch.Tensor:
        """Key rows whose head part has the first layout (no head token ids, e.g. a log written
        by session-17 code) widened to today's; other rows as they are."""
        if self.heads is not None and keys.shape[1] == self.d_key + (self.d_key + N_SPANS):  # key, first-layout head
            return torch.cat([keys[:, : self.d_key], widen(keys[:, self.d_key :], self.d_key)], 1)  # (F, d_row)
        return keys

    def _forget(self, id_: int) -> None:
        """Drop `id_` from the subject map (its record, key and residual are the caller's)."""
        old = self.facts.get(id_)
        if old is not None:
            group = self._by_subject.get(subject_key(old), set())
            group.discard(id_)
            if not group:
                self._by_subject.pop(subject_key(old), None)

    def remove(self, ids: int | Iterable[int]) -> int:
        """Remove facts; the other facts about their subjects get their shared residual
        re-optimised without them."""
        change = self.plan_remove(ids)
        self.apply(change)
        return len(change.removed)

    def plan_remove(self, ids: int | Iterable[int]) -> Change:
        ids = [ids] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]
        missing = [i for i in ids if i not in self.facts]
        if missing:
            raise KeyError(f"no fact with id(s) {missing[:10]}")
        gone = set(ids)
        ids = sorted(gone)
        rest = [i for i in self.same_subject(subject_key(self.facts[i]) for i in ids) if i not in gone] \
            if self.config.subject_groups else []
        res = self.encode_residuals([self.facts[i] for i in rest]) if rest else torch.zeros(0, self.d_res)
        return Change("remove", (), (), torch.zeros(0, self.d_row), tuple(ids), tuple(rest), res)

    def update(self, id_: int, fact: Fact) -> None:
        """Replace fact `id_` with `fact`, keeping its id. The facts about its old and its new
        subject get their shared residuals re-optimised."""
        self.apply(self.plan_update(id_, fact))

    def plan_update(self, id_: int, fact: Fact) -> Change:
        if id_ not in self.facts:
            raise KeyError(f"no fact with id {id_}")
        fresh = self.prefixes is None
        keys = self.encode_keys([fact])
        if self.config.subject_groups:  # both subjects' groups, with the new fact in its place
            group = sorted(set(self.same_subject({subject_key(self.facts[id_]), subject_key(fact)})) | {id_})
            res = self.encode_residuals([fact if i == id_ else self.facts[i] for i in group])
        else:
            group, res = [id_], self.encode_residuals([fact])
        return Change("update", (id_,), (fact,), keys, (), tuple(group), res, self._new_prefixes(fresh))

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

    # ----- state: what persistence reads and writes -------------------------------------
    def state(self) -> Stored:
        """The whole database as plain parts (no model): what `save` writes."""
        meta = {"model": self.fingerprint(), "prefixes": self.prefixes, "calibration": self.calibration,
                "profile": self.profile}
        return Stored(meta, self.config, self.facts, self.table, self.index, self.next_id, self.gate_map, self.heads)

    @classmethod
    def from_state(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, state: Stored,
                   index: str | None = None, where: str | Path = "<state>") -> "NeuralDB":
        """A database over `model` from a state (`read_db`'s, or another database's), after
        checking that the state was built for this model. `index` re-indexes the keys."""
        db = cls(model, tokenizer, state.config.replace(index=index), attach=False, gate_map=state.gate_map)
        check_model(state.meta, db.fingerprint(), Path(where))
        if index is not None and index != state.index.spec:  # another spec: re-index the stored keys
            ids, keys = state.index.export()
            db.index = make_index(index, db.d_key, device=model_device(model), floor=db.config.floor)
            if len(ids):
                db.index.add(ids, keys.to(model_device(model)), unit=True)
        else:
            db.index = state.index
        db.table, db.next_id, db.prefixes, db.heads = state.table, state.next_id, state.prefixes, state.heads
        db.calibration = state.meta.get("calibration")  # absent from databases saved before it was kept
        db.profile = str(state.meta.get("profile", "given"))  # where the first build's settings came from
        for i, f in state.facts.items():
            db.facts[i] = f
            db._by_subject.setdefault(subject_key(f), set()).add(i)
        db.train_index()  # a Proj read with its basis keeps it; one without refits to the stored calibration text
        db.attach()
        return db

    def save(self, directory: str | Path) -> Path:
        """Write the database (atomic, crash-safe; refuses a path that holds anything else)."""
        return save_state(Path(directory), self.state())

    @classmethod
    def load(cls, directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             index: str | None = None, residual_mmap: bool = False) -> "NeuralDB":
        """Open a saved database for `model` (every file verified, then the model checked)."""
        stored = read_db(Path(directory), device=model_device(model), residual_mmap=residual_mmap)
        return cls.from_state(model, tokenizer, stored, index=index, where=directory)
