"""What the gate sees on ordinary text and on prompts that should open it, read from the gate
itself (`scan`), and the operating points that follow exactly from one scan: the spurious-open
share, the opens on subjects a passage names (mentions) and the own-open share at any thresholds
(`Scan`); the best thresholds within a budget (`fit_thresholds`); a log-log extrapolation of a
rate to more keys (`extrapolate`). Used by the calibrator (engine/calibrate.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .editor import NeuralDB
from .facts import names_subject
from .hooks import Trace
from .progress import Progress

GAMMAS = np.round(np.arange(0.40, 0.995, 0.01), 2)
HEAD_GAMMAS: tuple[float | None, ...] = (None, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8)
SINK_DROPS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1)  # sink_gamma = gamma - drop


@dataclass
class Scan:
    """What the gate saw: for ordinary tokens (N,) similarity, head score, anchored; for each
    prompt the best similarity of its own fact off / at the sink, per head threshold."""

    text_s: np.ndarray
    text_h: np.ndarray
    text_a: np.ndarray
    own: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # per prompt: s, h, a
    text_named: np.ndarray | None = None  # (N,) the passage names the token's winning subject: an open is a mention

    def __post_init__(self) -> None:
        self._by_head: dict[float | None, tuple[np.ndarray, ...]] = {}
        self._named: Scan | None = None  # the tokens whose passage names their winner, as a Scan

    def _at(self, head: float | None) -> tuple[np.ndarray, ...]:
        """For a head threshold: ordinary tokens' similarities off / at the sink that pass it
        (tokens whose passage names their winner's subject left out: an open there is a mention),
        and each prompt's best own similarity off / at the sink that passes it (-inf: none)."""
        if head not in self._by_head:
            def best(s: np.ndarray, ok: np.ndarray) -> float:
                return float(s[ok].max()) if ok.any() else float("-inf")
            spur = np.ones(len(self.text_s), bool) if self.text_named is None else ~self.text_named
            if head is None:  # no head check: no table, and no sink threshold either
                t_off, t_at = self.text_s[spur], self.text_s[:0]
                p_off = np.array([best(s, np.ones_like(a)) for s, h, a in self.own])
                p_at = np.full(len(self.own), float("-inf"))
            else:
                ok = (self.text_h > head) & spur
                t_off, t_at = self.text_s[ok & ~self.text_a], self.text_s[ok & self.text_a]
                p_off = np.array([best(s, (h > head) & ~a) for s, h, a in self.own])
                p_at = np.array([best(s, (h > head) & a) for s, h, a in self.own])
            self._by_head[head] = (t_off, t_at, p_off, p_at)
        return self._by_head[head]

    def spurious(self, gamma: float, head: float | None = None, sink: float | None = None) -> float:
        """Share of ordinary tokens whose gate opens at these thresholds where the passage does not
        name the winning fact's subject (spurious opens)."""
        if not len(self.text_s):
            return 0.0
        t_off, t_at, _, _ = self._at(head)
        return float(((t_off > gamma).sum() + (t_at > (gamma if sink is None else sink)).sum()) / len(self.text_s))

    def mentions(self, gamma: float, head: float | None = None, sink: float | None = None) -> int:
        """Ordinary tokens whose gate opens on a subject their passage names (not spurious)."""
        if self.text_named is None or not self.text_named.any():
            return 0
        if self._named is None:
            n = self.text_named
            self._named = Scan(self.text_s[n], self.text_h[n], self.text_a[n])
        return round(self._named.spurious(gamma, head, sink) * len(self._named.text_s))

    def own_open(self, gamma: float, head: float | None = None, sink: float | None = None) -> float:
        """Share of prompts on which their own fact's gate opens at these thresholds."""
        if not self.own:
            return 0.0
        _, _, p_off, p_at = self._at(head)
        return float(((p_off > gamma) | (p_at > (gamma if sink is None else sink))).mean())


@torch.no_grad()
def scan(db: NeuralDB, texts: Sequence[list[int]], prompts: Sequence[tuple[list[int], int]],
         batch_size: int = 16, raw: Sequence[str] | None = None) -> Scan:
    """Run token sequences through the model up to the gate (thresholds at their floor) and
    keep what it saw at every gateable token: `texts` are ordinary (every token counts; with
    their strings `raw`, a token whose passage names its winner's subject is marked a mention),
    `prompts` pair a sequence with the fact id that should open on it."""
    gate = db.gate
    pad = db.tok.pad_token_id if db.tok.pad_token_id is not None else 0
    seqs = [(ids, None) for ids in texts] + [(ids, own) for ids, own in prompts]
    ts, th, ta, tn, own = [], [], [], [], []
    bar = Progress(len(seqs), "gate scan", "seq")
    for i in range(0, len(seqs), batch_size):
        part = seqs[i : i + batch_size]
        width = max(len(s) for s, _ in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)  # (B, T) right-padded
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for b, (s, _) in enumerate(part):
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        with Trace(db.model, db.path, retain_input=False, stop=True):
            db.model(input_ids=ids, attention_mask=mask, use_cache=False)
        sims, win, _ = (t.float().cpu() if t.dtype.is_floating_point else t.cpu() for t in gate.last)  # (B, T)
        if gate.last_head is not None:
            head, anch = (t.cpu() for t in gate.last_head)
        else:
            head, anch = torch.full_like(sims, float("inf")), torch.zeros_like(sims, dtype=torch.bool)
        keep = gate.last_mask.cpu() & mask.bool()  # (B, T) gateable real tokens
        for b, (_, o) in enumerate(part):
            k = keep[b] if o is None else keep[b] & (win[b] == o)
            s, h, a = sims[b][k].numpy(), head[b][k].float().numpy(), anch[b][k].numpy()
            if o is None:
                ts.append(s), th.append(h), ta.append(a)
                j = i + b  # the text's index
                tn.append(np.array([raw is not None and names_subject(raw[j], db.facts[int(w)].subject)
                                    for w in win[b][k].tolist()], bool))
            else:
                own.append((s, h, a))
        bar.update(len(part))
    bar.close()
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return Scan(cat(ts, np.float32), cat(th, np.float32), cat(ta, bool), own, cat(tn, bool))


def sweep_point(sc: Scan, max_open: float) -> dict[str, float]:
    """The lowest grid gamma (no head check) whose spurious opens are <= max_open, and the own-open
    share there."""
    for g in GAMMAS:
        if sc.spurious(float(g)) <= max_open:
            return {"gamma": float(g), "spurious": sc.spurious(float(g)), "own_open": sc.own_open(float(g))}
    return {"gamma": 1.0, "spurious": 0.0, "own_open": 0.0}


def fit_thresholds(sc: Scan, max_open: float, max_mention: float | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best, every candidate's best point): for each head threshold, the (gamma, sink drop)
    with the highest own-open share whose spurious opens stay <= max_open (and, with
    `max_mention`, whose opens on subjects the passage names stay <= that share of ordinary
    tokens too); ties go to the higher gamma (fewer opens). Every point carries its mention-open
    share."""
    n_text = max(1, len(sc.text_s))
    cands = []
    for head in HEAD_GAMMAS:
        best = None
        for g in GAMMAS[::-1]:  # high to low: a tie keeps the higher gamma
            g = float(g)
            for drop in (SINK_DROPS if head is not None else (0.0,)):
                sink = None if head is None else round(g - drop, 2)
                sp = sc.spurious(g, head, sink)
                if sp > max_open:
                    continue
                men = sc.mentions(g, head, sink) / n_text if max_mention is not None else None
                if men is not None and men > max_mention:
                    continue
                own = sc.own_open(g, head, sink)
                if best is None or own > best["own_open"]:
                    best = {"gamma": g, "head_gamma": head, "sink_gamma": sink, "spurious": sp, "own_open": own,
                            "mention_open": men}
        if best is not None:
            if best["mention_open"] is None:  # unbudgeted: measured for the point kept only
                best["mention_open"] = sc.mentions(best["gamma"], head, best["sink_gamma"]) / n_text
            cands.append(best)
    if not cands:
        return {"gamma": 1.0, "head_gamma": None, "sink_gamma": None, "spurious": 0.0, "own_open": 0.0,
                "mention_open": 0.0}, cands
    return max(cands, key=lambda c: (c["own_open"], c["gamma"])), cands


def extrapolate(sizes: Sequence[int], rates: Sequence[float], to: int) -> float | None:
    """Spurious-open share at `to` keys from a log-log line through the measured sizes (None
    where fewer than two sizes opened at all)."""
    pts = [(math.log(n), math.log(r)) for n, r in zip(sizes, rates) if r > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    slope, icept = np.polyfit(x, y, 1)
    return float(math.exp(icept + slope * math.log(to)))
