"""MEMIT and AlphaEdit as weight editors of a HuggingFace causal LM, in sequential batches.

Keys come from the engine's key recipe (`compute_keys`) at each edited layer and the target
states from the engine's residuals: z = (block output at the subject, unedited) + residual at
the last edited layer, which is MEMIT's `compute_z` result when that layer is NeuralDB's l*.
Per batch and layer i (of L layers), as MEMIT's `execute_memit`: the keys and the current
block output at the last layer are read from the model as edited so far, the remaining error
is split over the layers left, `(z - h) / (L - i)`, and the layer's update rule turns it into a
weight delta. The original weights are kept and `restore()` puts them back bit for bit."""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..engine.arch import base_weight, get_arch, get_module
from ..engine.config import EditConfig
from ..engine.facts import Fact
from ..engine.keys import compute_keys, subject_states
from .config import LinearEditConfig
from .linear import alphaedit_update, memit_update, null_space_projector

log = logging.getLogger(__name__)


class Memit:
    """D = R K^T (lam C + K K^T)^-1 per batch; earlier batches are not remembered (as MEMIT)."""

    remembers_keys = False  # no use for the keys of edited batches

    def __init__(self, cfg: LinearEditConfig, moments: dict[int, torch.Tensor]) -> None:
        self.cfg, self.moments = cfg, moments

    def delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return memit_update(keys, resid, self.moments[layer], self.cfg.mom2_update_weight)

    def after_batch(self, layer: int, keys: torch.Tensor) -> None:
        pass

    def reset(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}


class AlphaEdit:
    """MEMIT's update projected onto the null space of C (eigenvalues below the threshold), with
    the Gram matrix of every earlier batch's keys (read after that batch's edit) kept."""

    remembers_keys = True

    def __init__(self, cfg: LinearEditConfig, moments: dict[int, torch.Tensor]) -> None:
        self.cfg = cfg
        self.projectors = {i: null_space_projector(c, cfg.nullspace_threshold) for i, c in moments.items()}
        self.grams = {i: torch.zeros_like(p) for i, p in self.projectors.items()}

    def delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return alphaedit_update(keys, resid, self.projectors[layer], self.grams[layer], self.cfg.l2)

    def after_batch(self, layer: int, keys: torch.Tensor) -> None:
        self.grams[layer] += keys.double() @ keys.double().T  # (d_in, d_in)

    def reset(self) -> None:
        for g in self.grams.values():
            g.zero_()

    def stats(self) -> dict[str, float]:
        return {f"nullspace_dim_{i}": float(torch.trace(p)) for i, p in self.projectors.items()}


RULES: dict[str, Callable[[LinearEditConfig, dict[int, torch.Tensor]], Memit | AlphaEdit]] = {
    "memit": Memit, "alphaedit": AlphaEdit}


class LinearEditor:
    """editor = LinearEditor(model, tok, "memit", cfg, edit_cfg, prefixes, moments, last_layer)
    editor.edit(facts, targets)      # sequential batches of cfg.batch_size
    editor.restore()                 # the original weights, bit-identical"""

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, method: str, cfg: LinearEditConfig,
                 edit_cfg: EditConfig, prefixes: Sequence[str], moments: dict[int, torch.Tensor],
                 last_layer: int) -> None:
        if method not in RULES:
            raise ValueError(f"method {method!r}: choose one of {sorted(RULES)}")
        self.model, self.tok, self.cfg, self.edit_cfg = model, tok, cfg, edit_cfg
        self.prefixes = list(prefixes)
        self.layers = cfg.layer_range(last_layer)
        missing = [i for i in self.layers if i not in moments]
        if missing:
            raise ValueError(f"second moments missing for layer(s) {missing}")
        self.rule = RULES[method](cfg, {i: moments[i] for i in self.layers})
        arch = get_arch(model)
        self.conv1d = arch.conv1d
        self.weights = {i: base_weight(get_module(model, arch.ffn_out.format(i))) for i in self.layers}
        self.saved = {i: w.detach().clone() for i, w in self.weights.items()}
        self.timings = {"keys_s": 0.0, "states_s": 0.0, "solve_s": 0.0}

    def targets(self, facts: Sequence[Fact], residuals: torch.Tensor) -> torch.Tensor:
        """z (F, d_model): the last edited layer's output at each subject plus its residual.
        Call it on the unedited model (residuals are computed there)."""
        t0 = time.perf_counter()
        z = subject_states(self.model, self.tok, facts, self.layers[-1], self.prefixes) + residuals.to(
            self.saved[self.layers[-1]].device)
        self.timings["states_s"] += time.perf_counter() - t0
        return z

    def _keys(self, facts: Sequence[Fact], layer: int) -> torch.Tensor:
        t0 = time.perf_counter()
        k = compute_keys(self.model, self.tok, facts, layer, self.prefixes, self.edit_cfg).T  # (d_in, B)
        self.timings["keys_s"] += time.perf_counter() - t0
        return k

    @torch.no_grad()
    def _edit_batch(self, facts: Sequence[Fact], z: torch.Tensor) -> dict[str, float]:
        n_layers, last = len(self.layers), self.layers[-1]
        err = []
        for i, layer in enumerate(self.layers):
            keys = self._keys(facts, layer)  # (d_in, B) on the model as edited so far
            t0 = time.perf_counter()
            cur = subject_states(self.model, self.tok, facts, last, self.prefixes)  # (B, d_model)
            self.timings["states_s"] += time.perf_counter() - t0
            resid = (z - cur).T / (n_layers - i)  # (d_model, B): the error left, split over the layers left
            err.append(float((z - cur).norm(dim=-1).mean()))
            t0 = time.perf_counter()
            d = self.rule.delta(layer, keys, resid)  # (d_out, d_in) float64
            w = self.weights[layer]
            w.add_((d.T if self.conv1d else d).to(w.dtype))
            self.timings["solve_s"] += time.perf_counter() - t0
        if self.rule.remembers_keys:  # what later batches must not disturb: the keys as edited now
            for layer in self.layers:
                self.rule.after_batch(layer, self._keys(facts, layer))
        return {"z_error_first": err[0], "z_error_last": err[-1]}

    def edit(self, facts: Sequence[Fact], targets: torch.Tensor) -> list[dict[str, float]]:
        """Edit `facts` (targets from `targets()`) in sequential batches; returns per-batch
        z errors (mean |z - h| before the first and the last layer's update)."""
        if len(facts) != targets.shape[0]:
            raise ValueError(f"{len(facts)} facts but {targets.shape[0]} targets")
        log_rows = []
        bs = self.cfg.batch_size
        for s in tqdm(range(0, len(facts), bs), desc="batches", unit="batch", disable=None, leave=False):
            log_rows.append(self._edit_batch(facts[s : s + bs], targets[s : s + bs]))
        return log_rows

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back (bit-identical) and forget every edit."""
        for i, w in self.weights.items():
            w.copy_(self.saved[i])
        self.rule.reset()

    def is_restored(self) -> bool:
        return all(torch.equal(w, self.saved[i]) for i, w in self.weights.items())
