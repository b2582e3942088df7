"""The projection-bound index (`Proj{r}`) decides every gate and winning id exactly as float64
search does: random, clustered, adversarial near-gamma and tied keys, after edits and reloads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuraldb.index import make_index
from neuraldb.index.base import KeyIndex

GAMMA = 0.7


def reference(keys: torch.Tensor, ids: np.ndarray, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 cosine against the stored fp32 unit keys; ties to the smallest id."""
    q = queries.double() / queries.double().norm(dim=1, keepdim=True)
    sims = q @ keys.double().T  # (n, M)
    best = sims.max(1).values
    tied = torch.where(sims == best[:, None], torch.from_numpy(ids)[None], torch.iinfo(torch.long).max)
    return best, tied.min(1).values


def check(idx: KeyIndex, queries: torch.Tensor, atol: float = 1e-12, gamma: float = GAMMA) -> None:
    """Float64 decisions and ids; `atol` 1e-6 for an fp32 scan (`Flat`), whose similarities are fp32."""
    ids, keys = idx.export()
    want_sim, want_id = reference(keys, ids, queries)
    sim, got = idx.search(queries)
    sim = sim.double()
    want_open, got_open = want_sim > gamma, sim > gamma
    assert torch.equal(got_open, want_open)
    assert torch.equal(got[want_open], want_id[want_open])
    assert torch.allclose(sim[want_open], want_sim[want_open], rtol=0, atol=atol)
    assert bool((sim[~want_open] >= want_sim[~want_open] - atol).all())  # closed: a bound, never below


def clustered(m: int, d: int, g: torch.Generator) -> torch.Tensor:
    centres = torch.randn(8, d, generator=g)
    x = 0.5 * torch.randn(d, generator=g) + centres[torch.randint(0, 8, (m,), generator=g)] \
        + 0.6 * torch.randn(m, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("low", ["bf16", "fp32"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [4, 24])
def test_random_and_clustered_keys(seed: int, rank: int, low: str) -> None:
    g = torch.Generator().manual_seed(seed)
    d, m = 48, 300
    for keys in (torch.randn(m, d, generator=g), clustered(m, d, g)):
        idx = make_index(f"Proj{rank}", d, floor=GAMMA, low=low)
        idx.add(np.arange(m) * 3 + 1, keys)
        near = keys[torch.randint(0, m, (40,), generator=g)] + 0.3 * torch.randn(40, d, generator=g)
        queries = torch.cat([near, torch.randn(40, d, generator=g), clustered(40, d, g)])
        check(idx, queries)
        idx.block_elems = 7 * m  # 7 queries per bound block: the blocked search answers the same
        check(idx, queries)


@pytest.mark.parametrize("low", ["bf16", "fp32"])
def test_adversarial_near_gamma_and_ties(low: str) -> None:
    g = torch.Generator().manual_seed(5)
    d = 32
    base = torch.nn.functional.normalize(torch.randn(200, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0).double()
    # keys at cos gamma +- 1e-9 .. 1e-6 from q: the decision is on the 7th-9th decimal
    near = []
    for eps in (1e-9, -1e-9, 1e-7, -1e-7, 1e-6, -1e-6):
        perp = torch.randn(d, generator=g).double()
        perp = torch.nn.functional.normalize(perp - (perp @ q) * q, dim=0)
        c = GAMMA + eps
        near.append(c * q + (1 - c * c) ** 0.5 * perp)
    for i, k in enumerate(near):
        idx = make_index("Proj8", d, floor=GAMMA, low=low)
        idx.add(np.arange(200), base)
        idx.add([1000 + i], k[None].float(), unit=True)
        check(idx, q[None].float())
        idx.fp32_pass_from = 0  # re-scoring through its fp32 pre-filter: the same answers
        check(idx, q[None].float())
    # exact ties: the same key under three ids, the smallest id wins
    idx = make_index("Proj8", d, floor=GAMMA)
    idx.add(np.arange(200), base)
    idx.add([907, 905, 906], base[:1].expand(3, -1).clone(), unit=True)
    sim, got = idx.search(base[:1])
    assert int(got[0]) == 0  # id 0 holds the same key and is smallest
    idx.remove([0])
    sim, got = idx.search(base[:1])
    assert int(got[0]) == 905 and float(sim[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("low", ["bf16", "fp32"])
def test_edits_reloads_query_training_and_overflow(tmp_path, low: str) -> None:
    g = torch.Generator().manual_seed(9)
    d, m = 40, 400
    keys = clustered(m, d, g)
    idx = make_index("Proj6", d, floor=GAMMA, max_candidates=3, low=low)  # tiny cap: overflow path runs
    idx.add(np.arange(m), keys)
    queries = torch.cat([keys[:50] + 0.2 * torch.randn(50, d, generator=g), torch.randn(50, d, generator=g)])
    check(idx, queries)
    idx.add(np.arange(0, 100), torch.randn(100, d, generator=g))  # replace rows in place
    idx.remove(np.arange(100, 250))  # tombstones past a quarter: compaction moves rows
    check(idx, queries)
    idx.train(clustered(64, d, g))  # a query sample changes the basis, never the answers
    check(idx, queries)
    idx.add(np.arange(5000, 6000), clustered(1000, d, g))  # the table more than doubles: refit
    check(idx, queries)
    idx.save(tmp_path / "i.safetensors")
    back = KeyIndex.load(tmp_path / "i.safetensors", floor=GAMMA)  # the spec carries low
    assert back.spec == idx.spec == f"Proj6,{low}" and back.low == low and np.array_equal(back.ids(), idx.ids())
    check(back, queries)
    assert idx.stats["decided"] > 0 and idx.stats["full_scans"] > 0


@pytest.mark.parametrize("low", ["bf16", "fp32"])
def test_bound_where_it_is_tight(low: str) -> None:
    """Keys inside the basis's span, and a query with a part outside it that the near-gamma key
    shares (k = c q + sqrt(1 - c^2) u, u in the span and orthogonal to q): then q_perp and k_perp
    are parallel and the bound equals the cosine, so nothing but the slack stands between a
    rounded product (or an underestimated |q_perp|) and a wrong decision. Keys at gamma +- 1e-7
    .. 1e-3 and +- one bf16 step decide as float64 does, and the bound did prune. Gamma 0.70125
    lies just above the midpoint of two bf16 values (0.69921875, 0.703125): a bf16 cut rounded
    to nearest would prune keys that open."""
    g = torch.Generator().manual_seed(11)
    gamma, d, r = 0.70125, 64, 32
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T  # (d, d) orthonormal
    span, out = basis[:r], basis[r:]
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    inside = lambda n: unit(torch.randn(n, r, generator=g, dtype=torch.float64) @ span)  # noqa: E731
    q = unit(0.8 * inside(1)[0] + 0.6 * unit(torch.randn(d - r, generator=g, dtype=torch.float64) @ out))
    keys = [inside(300)]
    for eps in (1e-7, -1e-7, 1e-5, -1e-5, 1e-3, -1e-3, 2**-8, -(2**-8)):
        u = inside(1)[0]
        u = unit(u - (u @ q) * q)  # still in the span: q's outside part is orthogonal to it
        c = gamma + eps
        keys.append((c * q + (1 - c * c) ** 0.5 * u)[None])
    keys = torch.cat(keys).float()
    for k in range(300, keys.shape[0]):  # one near-gamma key at a time beside the 300 others
        idx = make_index(f"Proj{r}", d, floor=gamma, low=low)
        idx.add(np.arange(301), torch.cat([keys[:300], keys[k : k + 1]]), unit=True)
        queries = torch.cat([q[None].float(), inside(64).float()])
        check(idx, queries, gamma=gamma)
        assert (idx._low is not None) == (low == "bf16") and idx.stats["decided"] > 0
        idx.chooser.pick = lambda n: False  # the same through a full scan (bf16 keys where the bound is bf16)
        check(idx, queries, gamma=gamma)
        assert (idx._low_keys is not None) == (low == "bf16")


@pytest.mark.parametrize("low", ["bf16", "fp32"])
def test_fp32_prefilter_of_rescoring_keeps_keys_a_hair_above_gamma(low: str) -> None:
    """40 queries, each with its own key at cos gamma + 1e-9 (fp32 rounds about half of them
    below gamma): re-scoring through its fp32 pre-filter opens every one, as float64 does."""
    g = torch.Generator().manual_seed(21)
    d = 32
    qs = torch.nn.functional.normalize(torch.randn(40, d, generator=g, dtype=torch.float64), dim=1)
    perp = torch.randn(40, d, generator=g, dtype=torch.float64)
    perp = torch.nn.functional.normalize(perp - (perp * qs).sum(1, keepdim=True) * qs, dim=1)
    c = GAMMA + 1e-9
    near = (c * qs + (1 - c * c) ** 0.5 * perp).float()
    idx = make_index("Proj8", d, floor=GAMMA, low=low)
    idx.add(np.arange(40), near, unit=True)
    idx.add(np.arange(100, 300), torch.randn(200, d, generator=g))
    idx.fp32_pass_from = 0
    check(idx, qs.float())


def test_bf16_slack_covers_worst_case_rounding() -> None:
    """Operands whose every component sits just under a bf16 rounding midpoint all round the
    same way, so their errors add up: the bf16 product falls short of the fp32 one by about
    2u |a||b| + the output's rounding. `low_slack` covers it; `bf16_below` never rounds up."""
    from neuraldb.index.bound import bf16_below, low_slack

    g = torch.Generator().manual_seed(2)
    for r in (8, 64, 512):
        base = torch.rand(r + 1, generator=g, dtype=torch.float64) + 0.5
        lo = base.float().bfloat16().double()  # a bf16 grid value near each component
        ulp = torch.exp2(torch.floor(torch.log2(lo)) - 7)  # bf16 spacing at lo (8 significant bits)
        a = lo + 0.499 * ulp  # just under the midpoint: rounds down to lo
        b = a.clone()
        exact = float(a @ b)
        low = float((a.float().bfloat16()[None] @ b.float().bfloat16()[:, None]).float())
        short = exact - low
        assert short > 2.0**-9 * exact  # the errors did add up: a cut without slack would prune this pair
        assert short <= low_slack(r, float(a.norm()), float(b.norm()))
    for x in (0.7, 0.703, 0.78, -0.3, 0.999):
        b = bf16_below(x)
        assert b.dtype == torch.bfloat16 and float(b) <= x and float(b) > x - 2.0**-7


def test_few_keys_and_no_floor_scan_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    idx = make_index("Proj16", 24, floor=GAMMA)
    idx.add([4, 2], torch.randn(2, 24, generator=g))  # fewer rows than the rank: no basis yet
    check(idx, torch.randn(10, 24, generator=g))
    idx = make_index("Proj16", 24)  # no floor: nothing can be pruned, every query scans
    idx.add(np.arange(50), torch.randn(50, 24, generator=g))
    q = torch.randn(10, 24, generator=g)
    sim, got = idx.search(q)
    ids, keys = idx.export()
    want_sim, want_id = reference(keys, ids, q)
    assert torch.equal(got, want_id) and torch.allclose(sim, want_sim, atol=1e-12)
    with pytest.raises(ValueError, match="rank"):
        make_index("Proj24", 24)


def test_auto_switches_from_flat_to_proj_at_its_size(tmp_path) -> None:
    """`Auto{n}` is `Flat` below n keys and `Proj` from n on; the stored keys move bit for bit,
    the query sample is made only when the switch needs it, answers stay exact throughout."""
    g = torch.Generator().manual_seed(11)
    d = 48
    keys = clustered(600, d, g)
    made = []

    def sample() -> torch.Tensor:
        made.append(1)
        return clustered(64, d, g)

    idx = make_index("Auto500", d, floor=GAMMA)
    idx.train(sample)
    idx.add(np.arange(400), keys[:400])
    assert idx.inner.spec == "Flat" and not made  # below the switch: no sample made
    queries = torch.cat([keys[:40] + 0.2 * torch.randn(40, d, generator=g), torch.randn(40, d, generator=g)])
    check(idx, queries, atol=1e-6)
    before = idx.export()[1]
    idx.add(np.arange(400, 600), keys[400:])
    assert idx.inner.spec == f"Proj{d // 3}" and made == [1] and idx.inner._queries is not None
    assert torch.equal(idx.export()[1][:400], before)  # moved bit for bit
    check(idx, queries)
    assert idx.stats["queries"] == queries.shape[0]
    idx.remove(np.arange(300))
    assert idx.inner.spec.startswith("Proj")  # stays: exact either way
    check(idx, queries)
    idx.save(tmp_path / "a.safetensors")
    back = KeyIndex.load(tmp_path / "a.safetensors", floor=GAMMA)
    assert back.spec == "Auto500" and back.inner.spec == "Flat"  # 300 keys: a reload picks by size
    check(back, queries, atol=1e-6)
    assert make_index("Auto", 1536, floor=GAMMA).choice(5000) == "Proj512"
    assert make_index("Auto", 1536, floor=GAMMA).choice(4999) == "Flat"
    assert make_index("Auto", 1536).choice(10**6) == "Flat"  # no gamma, nothing to prune with


@pytest.mark.parametrize("spec", ["Proj16", "Auto100"])
def test_basis_and_projections_are_saved_with_the_keys(spec: str, tmp_path) -> None:
    """A saved Proj (or an Auto past its switch) writes its basis and every live row's
    projection; the reload uses them as they are (no refit, the query function never called)
    and answers exactly, also after a remove and an add."""
    g = torch.Generator().manual_seed(3)
    keys = clustered(400, 48, g)
    idx = make_index(spec, 48, floor=GAMMA)
    idx.add(np.arange(400), keys)
    idx.train(lambda: clustered(64, 48, g))
    idx.remove(np.arange(0, 400, 7))
    q = torch.cat([keys[:50] + 0.05 * torch.randn(50, 48, generator=g), torch.randn(50, 48, generator=g)])
    before = idx.search(q)
    idx.save(tmp_path / "idx.safetensors")
    called = []
    back = KeyIndex.load(tmp_path / "idx.safetensors", floor=GAMMA)
    back.train(lambda: called.append(1) or clustered(64, 48, g))
    inner = getattr(back, "inner", back)
    assert inner.spec == "Proj16" and not called
    src = getattr(idx, "inner", idx)
    assert torch.equal(inner._basis, src._basis)
    assert torch.equal(inner._proj, src._proj[src.exact._valid[: src.exact._n]])
    after = back.search(q)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    check(back, q)
    back.add(np.arange(1000, 1010), clustered(10, 48, g))
    back.remove(np.arange(1, 50, 3))
    check(back, q)


def test_both_paths_of_the_chooser_answer_alike_and_the_cheaper_runs() -> None:
    """The adaptive choice sends a batch through the bound or through a plain scan: the same
    decisions, ids and similarities either way; once both are timed, the cheaper one runs and
    the other is re-timed every `probe`-th search."""
    from neuraldb.index.bound import ScanChooser

    g = torch.Generator().manual_seed(5)
    keys = clustered(3000, 48, g)
    near = keys[torch.randint(0, 3000, (60,), generator=g)] + 0.3 * torch.randn(60, 48, generator=g)
    queries = torch.cat([near, torch.randn(60, 48, generator=g)])
    idx = make_index("Proj12", 48, floor=GAMMA)
    idx.add(np.arange(3000) * 3 + 1, keys)
    idx.train(torch.randn(500, 48, generator=g))
    answers = []
    for bound in (True, False):
        idx.chooser.pick = lambda n, b=bound: b  # force the path
        check(idx, queries)
        answers.append(idx.search(queries))
    assert torch.equal(answers[0][0], answers[1][0]) and torch.equal(answers[0][1], answers[1][1])
    assert idx.stats["scanned_batches"] >= 1

    c = ScanChooser(probe=4)
    assert c.pick(10) is True  # untimed: the bound first
    c.record(10, True, 10 * 3.0)
    assert c.pick(10) is False  # then the scan
    c.record(10, False, 10 * 1.0)
    picks = [c.pick(10) for _ in range(8)]
    assert picks.count(False) == 6 and picks.count(True) == 2  # the scan, with a probe of the bound
    assert c.pick(1000) is True  # another batch size is timed on its own


@pytest.mark.parametrize("spec", ["Proj8", "Proj8,fp32", "Auto", "Flat"])
def test_search_above_a_higher_floor_decides_as_the_exact_search(spec: str) -> None:
    """`search_above(q, f)`: for a query whose best key exceeds f, the exact best and its id; for
    the rest, a similarity not above f and no id that could open (a pruning index prunes more:
    fewer candidates re-scored than with its own floor)."""
    g = torch.Generator().manual_seed(11)
    d, m = 32, 400
    keys = clustered(m, d, g)
    idx = make_index(spec, d, floor=0.5, **({"adaptive": False} if spec.startswith("Proj") else {}))
    ids = np.arange(m) * 2 + 5
    idx.add(ids, keys)
    near = [keys[20 * j : 20 * j + 20] + s * torch.randn(20, d, generator=g) for j, s in enumerate((0.03, 0.1, 0.2))]
    queries = torch.cat(near + [clustered(60, d, g)])
    have_ids, have_keys = idx.export()
    want_sim, want_id = reference(have_keys, have_ids, queries)
    for f in (0.5, 0.8, 0.9):
        sim, got = idx.search_above(queries, f)
        above = want_sim > f
        assert 0 < int(above.sum()) < len(queries)
        assert torch.equal(got[above], want_id[above])
        assert torch.allclose(sim.double()[above], want_sim[above], rtol=0, atol=1e-6)
        assert bool((sim.double()[~above] <= f + 1e-6).all() or spec == "Flat")
    if spec.startswith("Proj"):
        idx.stats["candidates"] = 0
        idx.search_above(queries, 0.5)
        low = idx.stats["candidates"]
        idx.stats["candidates"] = 0
        idx.search_above(queries, 0.9)
        assert idx.stats["candidates"] < low
