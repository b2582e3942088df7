"""Fitting the gate map (`neuraldb.engine.gate_map.GateMap`, `T(v) = unit(v + (v V) U^T)`) so
that a fact's prompts land on its key and ordinary text lands on none.

Fitting (`fit_transform`) takes, in the plain space: a bank of keys, positive queries (a fact's
prompts at its subject's last token, each with its own key's row) and negative queries (tokens
of ordinary text, neighbourhood prompts). Every epoch it mines, for each query, the `hard` keys
nearest to it under the current T (exact, no gradient); then minibatches minimise

- InfoNCE of the own key against the mined keys (the own key wins the argmax),
- softplus((gamma - cos_own) / s) (the own key passes the threshold),
- softplus((max_mined cos_neg - gamma) / s) (no key passes it on a negative),

with Adam on U and V. Nothing here knows about models: the calibrator (engine/calibrate.py) and
bench/gate.py (design `,learn`) build the vectors."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from tqdm.auto import tqdm

from .gate_map import GateMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    rank: int = 64
    epochs: int = 8
    batch: int = 512
    lr: float = 2e-3
    hard: int = 32  # keys mined per query each epoch
    gamma: float = 0.8  # the threshold the margins aim at
    scale: float = 0.02  # softness of the margins
    temperature: float = 0.05  # InfoNCE
    neg_weight: float = 1.0
    seed: int = 0


def _mine(T: GateMap, keys: torch.Tensor, q: torch.Tensor, hard: int, block: int = 4096) -> torch.Tensor:
    """Indices (N, hard) of the keys nearest each query under T, exact."""
    tk = T(keys)  # (M, dim)
    out = []
    for s in range(0, q.shape[0], block):
        out.append((T(q[s : s + block]) @ tk.T).topk(min(hard, keys.shape[0]), dim=1).indices)  # (b, hard)
    return torch.cat(out)


def _map_whole_bank(bank: int, gathered: int) -> bool:
    """Map every key once and gather the mined ones (True), or map the gathered rows (False):
    the same values, whichever maps fewer rows (the calibrator's bank of 3,000 keys against
    2 x 512 x 33 gathered rows a step: Gemma-3-270M's map epochs ran ~55 s the other way)."""
    return bank < gathered


def fit_transform(keys: torch.Tensor, pos: torch.Tensor, own: torch.Tensor, neg: torch.Tensor,
                  cfg: FitConfig = FitConfig(), meta: Mapping[str, str] | None = None) -> GateMap:
    """Fit T on unit vectors: keys (M, d), positive queries (P, d) with their own key rows
    own (P,), negative queries (N, d). Returns the fitted map, carrying `meta` (what space it
    was fitted for: `neuraldb.engine.gate_map.space_meta`)."""
    g = torch.Generator().manual_seed(cfg.seed)
    d = keys.shape[1]
    U = torch.zeros(d, cfg.rank, requires_grad=True)
    V = (torch.randn(d, cfg.rank, generator=g) / d**0.5).requires_grad_(True)
    opt = torch.optim.Adam([U, V], lr=cfg.lr)
    keys, pos, neg = keys.float(), pos.float(), neg.float()
    for epoch in range(cfg.epochs):
        with torch.no_grad():
            T = GateMap(U.detach(), V.detach())
            pos_hard, neg_hard = _mine(T, keys, pos, cfg.hard + 1), _mine(T, keys, neg, cfg.hard)
        # each positive: its own key first, then the mined keys that are not it
        others = torch.where(pos_hard == own[:, None], pos_hard[:, -1:], pos_hard)[:, : cfg.hard]  # (P, hard)
        pos_cand = torch.cat([own[:, None], others], 1)  # (P, 1 + hard)
        n_pos, n_neg = pos.shape[0], neg.shape[0]
        order_p = torch.randperm(n_pos, generator=g)
        order_n = torch.randperm(n_neg, generator=g)
        steps = max(1, (n_pos + n_neg) // cfg.batch)
        total = {"nce": 0.0, "pos": 0.0, "neg": 0.0}
        for s in tqdm(range(steps), desc=f"gate transform epoch {epoch + 1}/{cfg.epochs}", leave=False):
            bp = order_p[s * n_pos // steps : (s + 1) * n_pos // steps]
            bn = order_n[s * n_neg // steps : (s + 1) * n_neg // steps]
            T = GateMap(U, V)  # float32 already: U, V themselves, gradients flow
            tk = T(keys) if _map_whole_bank(keys.shape[0], (len(bp) + len(bn)) * (1 + cfg.hard)) else None  # (M, d)
            mapped = lambda idx: tk[idx] if tk is not None else T(keys[idx])  # noqa: E731 (..., d)
            qp = T(pos[bp])  # (b, d)
            kp = mapped(pos_cand[bp])  # (b, 1 + hard, d)
            cp = (kp @ qp[:, :, None])[..., 0]  # (b, 1 + hard)
            nce = torch.nn.functional.cross_entropy(cp / cfg.temperature, torch.zeros(len(bp), dtype=torch.long))
            l_pos = torch.nn.functional.softplus((cfg.gamma - cp[:, 0]) / cfg.scale).mean()
            qn = T(neg[bn])  # (b, d)
            kn = mapped(neg_hard[bn])  # (b, hard, d)
            cn = (kn @ qn[:, :, None])[..., 0].max(1).values  # (b,)
            l_neg = torch.nn.functional.softplus((cn - cfg.gamma) / cfg.scale).mean()
            loss = nce + l_pos + cfg.neg_weight * l_neg
            opt.zero_grad()
            loss.backward()
            opt.step()
            total["nce"] += nce.item() / steps
            total["pos"] += l_pos.item() / steps
            total["neg"] += l_neg.item() / steps
        log.info("gate transform epoch %d: nce %.3f pos %.4f neg %.4f", epoch + 1, total["nce"], total["pos"], total["neg"])
    return GateMap(U.detach().clone(), V.detach().clone(), meta)
