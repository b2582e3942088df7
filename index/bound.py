"""An exact index that proves most gates closed from a low-dimensional projection.

With an orthonormal basis P (r, d) and unit q, k:  q.k = Pq.Pk + q_perp.k_perp, so
    q.k <= Pq.Pk + |q_perp| |k_perp|  =  [Pq, |q_perp|] . [Pk, |k_perp|]
one matmul in r + 1 dims instead of d. Keys whose bound is below `floor` (the gate's gamma)
can neither win nor open the gate; the rest are re-scored in float64 against the stored keys.
Gate decisions and winning ids equal exact float64 search for every query, whatever the basis:
the basis (PCA of the keys, plus a query sample given to `train`) only decides the speed.

Queries are projected once, in float64, and |q_perp| is bounded from above by
1 - 2 Pq.p + |p|^2 (1 + |P P^T - I|) with p the fp32 projection used (no second pass over the
basis). On CPUs whose bf16 matmul accumulates in fp32 and runs faster (AMX, AVX512-BF16: probed
once), the bound's (n, M) product runs on a bf16 copy of the rows at half the bytes, its cut
lowered by `low_slack` (about 4 bf16 roundings, 0.016): more candidates, the same answers.

Where no key exceeds the floor the gate is closed and the index returns (floor, -1): the floor
bounds the true maximum from above, and no (n, M) argmax is paid for an answer nobody uses. Similarities
are float64 so that `sims > gamma` decides exactly as float64 search does. Ties go to the
smallest id."""
from __future__ import annotations

import re
import time
from typing import Any, Callable

import torch

from .base import IndexError_, KeyIndex, as_ids, check_state, register
from .torch_index import ExactBacked, TorchIndex

_U = 2.0**-24  # fp32 unit roundoff


def _gamma(n: int) -> float:
    """Worst-case relative error of an n-term fp32 dot product: |fl(x.y) - x.y| <= gamma_n |x||y|."""
    return n * _U / (1 - n * _U)


def bound_slack(dim: int, rank: int, ortho_err: float) -> float:
    """How far the fp32 bound can fall below the true q.k, worst case. With p~ = P q + e (fp32
    projection, |e| <= sqrt(r) gamma_d) and s = q - P^T p~ (norms in float64):
    q.k = p~q.p~k - p~q.e_k - e_q.p~k + s_q.s_k <= p~q.p~k + |s_q||s_k| + 2 sqrt(r) gamma_d,
    plus the (r+1)-term fp32 matmul (2 gamma_{r+1}), the fp32 norms (2u) and P's deviation from
    orthonormality (2 |P P^T - I|)."""
    return 1.01 * (2 * rank**0.5 * _gamma(dim) + 2 * _gamma(rank + 1) + 2 * _U) + 2 * ortho_err


def scan_margin(dim: int) -> float:
    """An fp32 scan keeps every key within 2 (gamma_d + u) of its maximum: the true best is among them."""
    return 1.01 * 2 * (_gamma(dim) + _U)


_U_BF16 = 2.0**-8  # bf16 unit roundoff (8 significant bits)


def low_slack(rank: int, norm_a: float, norm_b: float) -> float:
    """How far a bf16 product of the bound's rows [Pq, |q_perp|] . [Pk, |k_perp|] can fall below
    its fp32 value, worst case: both operands rounded to bf16 (2u |a||b|), fp32 accumulation
    (gamma_{r+1}) and the product's own rounding to bf16 (at most 2u |a||b| even if truncated)."""
    ab = norm_a * norm_b
    return 1.01 * ((4 * _U_BF16 + _U_BF16**2) * ab + 2 * _gamma(rank + 1) * ab) + 1e-30 * (rank + 1)


def bf16_below(x: float) -> torch.Tensor:
    """The largest bf16 value <= x (a 0-dim tensor): a bf16 tensor compared with a Python float
    would round the float to bf16, possibly upwards."""
    b = torch.tensor(x, dtype=torch.float64).bfloat16()
    return b if float(b) <= x else torch.nextafter(b, torch.tensor(float("-inf"), dtype=torch.bfloat16))


def bf16_fits(device: torch.device, rank: int) -> bool:
    """Whether bf16 matmuls on `device` accumulate in fp32 (a bf16 accumulator stalls at 256 when
    adding ones) and beat fp32 on a bound-sized product: a one-time probe, since the slack of
    `low_slack` holds only for fp32 accumulation and the gain depends on the hardware."""
    ones = torch.ones(4, 1024, dtype=torch.bfloat16, device=device)
    if not bool(((ones @ ones.T).float() == 1024).all()):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = torch.randn(16, rank + 1, generator=g).to(device), torch.randn(8192, rank + 1, generator=g).to(device)
    la, lb = a.bfloat16(), b.bfloat16()

    def best(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: la @ lb.T) < 0.7 * best(lambda: a @ b.T)


def extend_bf16(low: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor:
    """A bf16 mirror of `src`'s rows (M, ...), the rows `low` already holds kept, the rest converted."""
    done = 0 if low is None else low.shape[0]
    if low is not None and done >= src.shape[0]:
        return low
    new = src[done:].bfloat16()
    return new if low is None else torch.cat([low, new])


class ScanChooser:
    """Which exact path a search takes, by measurement: per query-count bucket (log2 of the
    batch's queries), an EMA of seconds per query through the bound and through a plain fp32
    scan of every key; the cheaper runs, the other is re-timed every `probe`-th search of the
    bucket. The bound pays when it decides most tokens; where many queries sit near keys (text
    full of the facts' subjects) its re-scoring costs more than one scan, and the scan runs.
    Both paths are exact, so this only moves time. Host clocks only: used on CPUs."""

    def __init__(self, probe: int = 16, alpha: float = 0.3) -> None:
        self.probe, self.alpha = probe, alpha
        self.ema: dict[tuple[int, bool], float] = {}
        self.calls: dict[int, int] = {}

    @staticmethod
    def bucket(n: int) -> int:
        return min(int(n).bit_length(), 20)

    def pick(self, n: int) -> bool:
        """True: the bound; False: a scan of every key."""
        b = self.bucket(n)
        k = self.calls[b] = self.calls.get(b, 0) + 1
        bound, scan = self.ema.get((b, True)), self.ema.get((b, False))
        if bound is None or scan is None:
            return bound is None  # time each path once: the bound first
        best = bound <= scan
        return (not best) if k % self.probe == 0 else best

    def record(self, n: int, bound: bool, seconds: float) -> None:
        key, per = (self.bucket(n), bound), seconds / max(1, n)
        old = self.ema.get(key)
        self.ema[key] = per if old is None else (1 - self.alpha) * old + self.alpha * per


class ProjBoundIndex(ExactBacked):
    """Options: floor (the gate's gamma; required for any pruning), max_candidates (candidates
    per query above which that query takes an fp32 scan of all keys instead), adaptive (on a
    CPU, let a `ScanChooser` send whole batches to a plain scan when that is measured cheaper),
    low ("auto": on a CPU, bound in bf16 where `bf16_fits` says it accumulates in fp32 and runs
    faster; "bf16"; "fp32"), device. A bf16 bound only widens the slack (`low_slack`): the
    candidates it keeps are re-scored in float64 as before, so the answers stay exact."""

    block_elems = 1 << 26  # queries are bounded in blocks of at most this many (query, key) pairs
    fp32_pass_from = 2  # candidate pairs per query above which re-scoring filters in fp32 first

    def __init__(self, dim: int, rank: int, floor: float = -1.0, max_candidates: int = 256,
                 device: Any = "cpu", sample: int = 8192, adaptive: bool = True, low: str = "auto") -> None:
        if not 0 < rank < dim:
            raise ValueError(f"Proj{rank}: rank must be in (0, {dim})")
        if low not in ("auto", "bf16", "fp32"):
            raise ValueError(f"Proj{rank}: low must be 'auto', 'bf16' or 'fp32', not {low!r}")
        self.spec, self.dim, self.rank = f"Proj{rank}" + ("" if low == "auto" else f",{low}"), dim, rank
        self.floor, self.max_candidates, self.sample = floor, max_candidates, sample
        self.exact = TorchIndex(dim, device=device)
        self.device = self.exact.device
        self._basis: torch.Tensor | None = None  # (r, d) fp32, orthonormal rows
        self._basis64: torch.Tensor | None = None  # the same in float64: queries are projected in it
        self._ortho = 0.0  # |P P^T - I| of the fitted basis
        self.low = low
        self._low: torch.Tensor | None = None  # (M, r+1) bf16 copy of _proj when the bound runs in bf16
        self._low_slack, self._low_norm = 0.0, 0.0
        self._low_keys: torch.Tensor | None = None  # (M, d) bf16 keys for full scans, made when first needed
        self._low_ok: bool | None = None  # bf16_fits, probed once
        self._slack = bound_slack(dim, rank, 0.0)
        self._proj = torch.zeros(0, rank + 1, device=self.device)  # (M, r+1): [Pk, |k_perp|]
        self._queries: torch.Tensor | None = None  # (n, d) unit query sample for the basis
        self._make_queries: Callable[[], torch.Tensor] | None = None  # made only if a refit needs them
        self._fit_rows, self._version = 0, -1
        self.stats = {"queries": 0, "decided": 0, "candidates": 0, "full_scans": 0, "scanned_batches": 0}
        self.chooser = ScanChooser() if adaptive and self.device.type == "cpu" else None

    # -- basis ----------------------------------------------------------------------------------
    def train(self, queries: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """Give the basis a sample of real queries (activations of ordinary text at the layer), or
        a function that makes them: the bound is tight when both keys and queries lie mostly in
        the span. Refits now."""
        if not isinstance(queries, torch.Tensor):
            if self._basis is not None and self._fit_rows:  # a basis read with the keys: refit only when due
                self._make_queries = queries
                return
            queries = queries()
        q = queries.detach().reshape(-1, self.dim).double()
        self._queries = (q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)).float().to(self.device)
        self._fit()

    def _fit(self) -> None:
        if self._queries is None and self._make_queries is not None:
            q = self._make_queries().detach().reshape(-1, self.dim).double()
            self._queries = (q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)).float().to(self.device)
            self._make_queries = None
        n = self.exact._n
        rows = self.exact._valid[:n].nonzero()[:, 0]  # live rows
        g = torch.Generator(device="cpu").manual_seed(0)
        pick = rows[torch.randperm(rows.shape[0], generator=g)[: self.sample].to(rows.device)]
        parts = [self.exact._keys[pick].double()]  # (sample, d): only the sample goes to float64
        parts += [self._queries.double()] if self._queries is not None else []
        x = torch.cat(parts)  # (s, d)
        if x.shape[0] < self.rank:
            self._basis, self._low, self._low_keys = None, None, None  # too few rows: fp32 scans until there are more
            return
        _, vec = torch.linalg.eigh(x.T @ x)  # (d, d): the top right singular vectors of x, ascending
        self._set_basis(torch.linalg.qr(vec[:, -self.rank :].flip(1))[0].T.float().contiguous())  # (r, d)
        self._fit_rows, self._version = n, -1  # reproject every row

    def _set_basis(self, basis: torch.Tensor) -> None:
        """Take `basis` (r, d) and the slack its deviation from orthonormality costs."""
        ortho = (basis.double() @ basis.double().T - torch.eye(self.rank, dtype=torch.float64, device=self.device))
        self._ortho = float(ortho.norm())  # Frobenius: bounds the spectral norm of P P^T - I
        self._basis, self._slack = basis.to(self.device), bound_slack(self.dim, self.rank, self._ortho)
        self._basis64 = self._basis.double()
        self._low = None

    # -- saving: the basis and every live row's projection travel with the keys ------------------
    def _state(self) -> dict[str, Any]:
        state = super()._state()
        self._sync()
        if self._basis is not None:
            live = self.exact._valid[: self.exact._n].nonzero()[:, 0]  # slot order, as export()
            state["proj_basis"] = self._basis.cpu().numpy()
            state["proj_rows"] = self._proj[live].cpu().numpy()
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        check_state(state, self.dim)
        if len(state["ids"]):
            self.exact.add(state["ids"], torch.from_numpy(state["keys"]), unit=True)
        basis, rows = state.get("proj_basis"), state.get("proj_rows")
        if basis is None or rows is None:
            return  # fitted on the first search
        if basis.shape != (self.rank, self.dim) or rows.shape != (len(state["ids"]), self.rank + 1):
            raise IndexError_(f"index state: projection basis {basis.shape} / rows {rows.shape} do not fit "
                              f"Proj{self.rank} over {len(state['ids'])} keys of dim {self.dim}")
        self._set_basis(torch.from_numpy(basis))
        self._proj = torch.from_numpy(rows).to(self.device)
        self._fit_rows, self._version = self.exact._n, self.exact.compactions

    def _project(self, keys: torch.Tensor) -> torch.Tensor:
        """[P k, |k - P^T P k|] (n, r+1), the residual norm computed directly (not 1 - |Pk|^2)."""
        assert self._basis is not None
        out = torch.empty(keys.shape[0], self.rank + 1, device=self.device)  # (n, r+1)
        for s in range(0, keys.shape[0], 1 << 15):  # float64 temporaries of 32k rows, not of all
            k = keys[s : s + (1 << 15)].float()
            pk = k @ self._basis.T  # (b, r)
            out[s : s + k.shape[0], :-1] = pk
            out[s : s + k.shape[0], -1] = (k.double() - pk.double() @ self._basis64).norm(dim=1).float()
        return out

    def _sync(self) -> None:
        n = self.exact._n
        if self._basis is None or n >= 2 * max(self._fit_rows, self.rank):
            self._fit()  # first fit, or the table doubled since: refit (speed only, never exactness)
            if self._basis is None:
                return
        if self._version != self.exact.compactions or self._proj.shape[0] > n:
            self._proj = self._project(self.exact._keys[:n])
            self._version, self._low, self._low_keys = self.exact.compactions, None, None  # rows moved
        elif self._proj.shape[0] < n:
            self._proj = torch.cat([self._proj, self._project(self.exact._keys[self._proj.shape[0] : n])])
        if self._bf16():
            done = 0 if self._low is None else self._low.shape[0]
            if done < self._proj.shape[0]:
                self._low = extend_bf16(self._low, self._proj)
                self._note_rows(self._proj[done:], fresh=done == 0)

    def _note_rows(self, rows: torch.Tensor, fresh: bool = False) -> None:
        """Widen the bf16 slack to the largest stored row norm (about 1 for unit keys)."""
        top = float(rows.norm(dim=1).max()) if rows.shape[0] else 0.0
        self._low_norm = top if fresh else max(self._low_norm, top)
        # a query's row [Pq, |q_perp|] has norm |q| = 1 up to the projection's own error
        self._low_slack = low_slack(self.rank, 1.0 + self._slack, self._low_norm)

    def _bf16(self) -> bool:
        if self.low == "fp32":
            return False
        if self.low == "bf16":
            return True
        if self._low_ok is None:
            self._low_ok = self.device.type == "cpu" and bf16_fits(self.device, self.rank)
        return self._low_ok

    # -- mutation -------------------------------------------------------------------------------
    def add(self, ids: Any, keys: torch.Tensor, *, unit: bool = False) -> None:
        ids = self._check_add(ids, keys)
        self.exact.add(ids, keys, unit=unit)
        if self._basis is not None and self._version == self.exact.compactions:  # else the next sync remakes all
            rows = torch.from_numpy(self.exact.slots_of(ids)).to(self.device)
            if self._low_keys is not None:
                kept = rows[rows < self._low_keys.shape[0]]
                self._low_keys[kept] = self.exact._keys[kept].bfloat16()
            rows = rows[rows < self._proj.shape[0]]  # rewritten rows; appended ones come on sync
            if rows.numel():
                self._proj[rows] = self._project(self.exact._keys[rows])
                if self._low is not None:
                    rows = rows[rows < self._low.shape[0]]
                    self._low[rows] = self._proj[rows].bfloat16()
                    self._note_rows(self._proj[rows])

    def remove(self, ids: Any) -> int:
        return self.exact.remove(as_ids(ids))  # dead rows are masked in search

    def to(self, device: torch.device | str) -> "ProjBoundIndex":
        self.exact.to(device)
        self.device = self.exact.device
        self._proj = self._proj.to(self.device)
        self._basis = None if self._basis is None else self._basis.to(self.device)
        self._basis64 = None if self._basis is None else self._basis.double()
        self._low, self._low_ok, self._low_keys = None, None, None  # re-made (and re-probed) on the next search
        self._queries = None if self._queries is None else self._queries.to(self.device)
        return self

    # -- search ---------------------------------------------------------------------------------
    def _rescore(self, q64: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                 floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 cosines of the candidate pairs (query qi, row ki): each query's best and its
        row (-inf, -1 without candidates), ties to the smallest id."""
        n = q64.shape[0]
        best = torch.full((n,), float("-inf"), dtype=torch.float64, device=self.device)
        arg = torch.full((n,), -1, dtype=torch.long, device=self.device)
        if qi.numel() == 0:
            return best, arg
        keys = self.exact._keys
        if qi.numel() > self.fp32_pass_from * n:  # many pairs: an fp32 pass first, float64 only for its near-maxima
            q32 = q64.float()
            s32 = torch.cat([(q32[qi[s : s + 8192]] * keys[ki[s : s + 8192]]).sum(-1)
                             for s in range(0, qi.numel(), 8192)])  # (pairs,) fp32, within err of the truth
            err = scan_margin(self.dim) / 2
            top = torch.full((n,), float("-inf"), device=self.device).scatter_reduce_(0, qi, s32, "amax")
            cut = top[qi] - 2 * err  # the true maximum's pair is never below it
            if floor > -1.0:
                cut = cut.clamp_min(floor - err)  # nor is any pair that could open
            keep = s32 >= cut
            qi, ki = qi[keep], ki[keep]
            if qi.numel() == 0:
                return best, arg
        sims = torch.cat([(q64[qi[s : s + 4096]] * keys[ki[s : s + 4096]].double()).sum(-1)
                          for s in range(0, qi.numel(), 4096)])  # (pairs,) float64
        best.scatter_reduce_(0, qi, sims, "amax")
        big = torch.iinfo(torch.long).max
        ids = self.exact._ids[ki].masked_fill(sims != best[qi], big)
        win = torch.full((n,), big, dtype=torch.long, device=self.device)
        win.scatter_reduce_(0, qi, ids, "amin")  # the smallest id among each query's maxima
        found = win != big
        arg[found] = torch.from_numpy(self.exact.slots_of(win[found].cpu().numpy())).to(self.device)
        return best, arg

    def _full_scan(self, q64: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every live key: an fp32 matmul (or, where the bound runs in bf16, a bf16 one) keeps
        the keys within twice its error of the maximum and not below the floor by more than its
        error; they are then re-scored in float64."""
        n_rows = self.exact._n
        valid = self.exact._valid[:n_rows]
        keys = self._scan_keys()
        if keys.dtype == torch.bfloat16:
            err = low_slack(self.dim, 1.0 + 1e-6, 1.0 + 1e-6)  # unit float64 queries, fp32 unit keys
        else:
            err = scan_margin(self.dim) / 2
        step = max(1, (1 << 26) // max(1, n_rows))  # (step, M) fp32 blocks of at most 256 MB
        qis, kis = [], []
        for s in range(0, q64.shape[0], step):
            sims = (q64[s : s + step].to(keys.dtype) @ keys.T).float().masked_fill(~valid, float("-inf"))  # (step, M)
            top = sims.max(1).values  # (step,)
            cut = top - 2 * err
            if floor > -1.0:
                cut = cut.clamp_min(floor - err)  # below the floor by more than the error: closed anyway
            qi, ki = torch.nonzero(sims >= cut[:, None], as_tuple=True)
            qis.append(qi + s)
            kis.append(ki)
        return self._rescore(q64, torch.cat(qis), torch.cat(kis), floor)

    def _scan_keys(self) -> torch.Tensor:
        """The stored keys (M, d) a full scan reads: fp32, or a bf16 copy (made on the first scan,
        kept in step with the keys) where the bound runs in bf16."""
        n = self.exact._n
        if self._low is None:
            return self.exact._keys[:n]
        self._low_keys = extend_bf16(self._low_keys, self.exact._keys[:n])  # reset by _sync when rows move
        return self._low_keys

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._search(queries, self.floor)

    def search_above(self, queries: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` with the floor raised to `floor` for these queries: more keys pruned, and a
        query whose best key is not above it reads (floor, -1)."""
        return self._search(queries, max(self.floor, floor))

    def _search(self, queries: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        q64 = queries.to(self.device).double()
        q64 = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (n, d)
        n = q64.shape[0]
        self._sync()
        self.stats["queries"] += n
        if self.exact.ntotal == 0:
            return self.exact.search(queries)
        if self._basis is None or floor <= -1.0:
            self.stats["full_scans"] += n
            best, rows = self._full_scan(q64, floor)
            if floor > -1.0:  # the scan dropped keys below the floor: closed rows read (floor, -1)
                best, ids = self._closed(best, rows, floor)
                return best.to(queries.device), ids.to(queries.device)
            return best.to(queries.device), self.exact._ids[rows].to(queries.device)
        bound = self.chooser.pick(n) if self.chooser is not None else True
        t0 = time.perf_counter()
        if bound:
            step = max(1, self.block_elems // max(1, self._proj.shape[0]))  # (step, M) bound blocks
            parts = [self._bounded(q64[s : s + step], floor) for s in range(0, n, step)]
            best, ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            self.stats["full_scans"] += n
            self.stats["scanned_batches"] += 1
            best, arg = self._full_scan(q64, floor)
            best, ids = self._closed(best, arg, floor)
        if self.chooser is not None:
            self.chooser.record(n, bound, time.perf_counter() - t0)
        return best.to(queries.device), ids.to(queries.device)

    def _closed(self, best: torch.Tensor, arg: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(floor, -1) where no key exceeds the floor, else (similarity, id): both paths' answer."""
        closed = ~(best > floor)  # no key exceeds the floor: the floor bounds the maximum
        best = best.masked_fill(closed, floor)
        arg = arg.masked_fill(closed, -1)
        return best, torch.where(arg >= 0, self.exact._ids[arg.clamp_min(0)], arg)

    def _bounded(self, q64: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Search unit float64 queries (n, d) through the bound: (similarity, id) per query."""
        n = q64.shape[0]
        p64 = q64 @ self._basis64.T  # (n, r): one float64 product, no second pass over the basis
        pq = p64.float()  # the projection the bound uses
        pq64 = pq.double()
        # |q - P^T pq|^2 = 1 - 2 Pq.pq + pq.(P P^T) pq <= 1 - 2 Pq.pq + |pq|^2 (1 + |P P^T - I|)
        sq = 1 - 2 * (p64 * pq64).sum(1) + pq64.square().sum(1) * (1 + self._ortho)
        qperp = (sq.clamp_min(0) + 1e-12).sqrt().float()  # (n,): an upper bound on |q_perp|
        a = torch.cat([pq, qperp[:, None]], 1)  # (n, r+1)
        if self._low is not None:
            upper = a.bfloat16() @ self._low.T  # (n, M) bf16: >= q.k - slack - low slack
            cut = bf16_below(floor - self._slack - self._low_slack)  # compared in bf16: rounded down
        else:
            upper = a @ self._proj.T  # (n, M): >= q.k - slack
            cut = floor - self._slack
        qi, ki = torch.nonzero(upper >= cut, as_tuple=True)  # candidate pairs
        keep = self.exact._valid[ki]  # dead rows are zero: drop them here, not by masking (n, M)
        qi, ki = qi[keep], ki[keep]
        counts = torch.bincount(qi, minlength=n)  # (n,)
        over = counts > self.max_candidates  # too many near-ties: an fp32 scan is cheaper
        small = ~over[qi]
        best, arg = self._rescore(q64, qi[small], ki[small], floor)
        if bool(over.any()):
            best[over], arg[over] = self._full_scan(q64[over], floor)
        self.stats["decided"] += int((counts == 0).sum())
        self.stats["candidates"] += int(counts.sum())
        self.stats["full_scans"] += int(over.sum())
        return self._closed(best, arg, floor)

    @property
    def nbytes(self) -> int:
        low = sum(2 * t.nelement() for t in (self._low, self._low_keys) if t is not None)
        return self.exact.nbytes + 4 * self._proj.nelement() + low + (0 if self._basis is None else 12 * self._basis.nelement())

    @property
    def scanned_bytes_per_key(self) -> int:
        return (2 if self._low is not None else 4) * (self.rank + 1)  # the bound's row; candidates add 4 * dim each


@register(r"Proj(?P<rank>\d+)(,(?P<low>bf16|fp32))?")
def _proj(m: re.Match[str], dim: int, **options: Any) -> KeyIndex:
    """"Proj{r}": the bound in bf16 where the CPU does it fast and exactly enough, else fp32;
    "Proj{r},bf16" / "Proj{r},fp32" fix it."""
    keep = {k: options[k] for k in ("floor", "device", "max_candidates", "adaptive", "low") if k in options}
    if m.group("low"):
        keep["low"] = m.group("low")
    return ProjBoundIndex(dim, int(m.group("rank")), **keep)
