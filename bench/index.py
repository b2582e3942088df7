"""Key-index benchmark: search latency, build/add/remove time, bytes per fact, and agreement
with exact search, for every index spec over fact counts m, key dims d and query batches B.

    python bench/index.py                                   # CPU default grid (minutes)
    python bench/index.py --m 10000,100000,1000000 --d 1536,3072,6400,14336 --batch 1,32,512,4096 \\
        --spec Flat --spec torch,fp16 --spec Int8 --device cuda --out results/index-gpu

Keys imitate FFN activations: a shared mean direction, clusters and heavy-tailed noise, unit
normalised. Queries are near-duplicates of stored keys (cosine about 0.9) and unrelated draws.
Agreement: same argmax as exact float32 search, and the same gate decision at --gamma."""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraldb.bench.common import copy_bandwidth, machine, markdown_table, timed, write_json
from neuraldb.index import make_index
from neuraldb.kernels import l2_normalize, max_cosine

DEFAULT_SPECS = ["Flat", "torch", "Int8", "IVF{nlist},Flat", "IVF{nlist},SQ8", "IVF{nlist},PQ{pq}", "HNSW32"]


def activation_like(m: int, d: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_clusters = max(8, m // 200)
    mean = torch.randn(d, generator=g)
    centres = torch.randn(n_clusters, d, generator=g)
    out = torch.empty(m, d)
    for s in range(0, m, 65536):  # bounded temporaries
        n = min(65536, m - s)
        c = centres[torch.randint(0, n_clusters, (n,), generator=g)]
        tail = torch.distributions.Laplace(0.0, 1.0).sample((n, d))
        out[s : s + n] = 0.6 * mean + 0.8 * c + 1.2 * tail
    return l2_normalize(out).to(device)


def queries_for(keys: torch.Tensor, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    m, d = keys.shape
    pick = torch.randint(0, m, (batch,), generator=g)
    near = keys[pick].cpu() + 0.48 / d**0.5 * torch.randn(batch, d, generator=g)  # cos ~ 0.9
    unrelated = activation_like(batch, d, seed + 7, torch.device("cpu"))
    return {"near": l2_normalize(near).to(keys.device), "unrelated": unrelated.to(keys.device)}


def build_gflop(spec: str, m: int, d: int, nlist: int) -> float:
    """Rough work to build an index: k-means for IVF (10 iterations over 40*nlist points), PQ
    codebooks (256 centroids, 25 iterations over <= 65536 points), HNSW inserts."""
    work = 0.0
    if spec.startswith("IVF"):
        work += 2 * 10 * min(m, 40 * nlist) * nlist * d
    if "PQ" in spec:
        work += 2 * 25 * min(m, 65536) * 256 * d
    if "HNSW" in spec:
        work += 2 * m * d * 40 * 40  # efConstruction x neighbours visited per insert
    return work / 1e9


def run_one(spec: str, keys: torch.Tensor, qs: dict[str, torch.Tensor], ref: dict[str, tuple], args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    m, d = keys.shape
    ids = np.arange(m, dtype=np.int64)
    idx = make_index(spec, d, device=device, shortlist=args.shortlist, nprobe=args.nprobe, efSearch=args.ef_search,
                     floor=args.gamma, train_size=min(m - 1000, 40 * int(m**0.5)))  # IVF/PQ: first build
    t0 = time.perf_counter()
    idx.add(ids[: m - 1000], keys[: m - 1000])
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx.add(ids[m - 1000 :], keys[m - 1000 :])
    add_1k = time.perf_counter() - t0
    row: dict[str, Any] = {"spec": spec, "m": m, "d": d, "build_s": build, "add_1k_s": add_1k,
                           "trained": bool(getattr(getattr(idx, "index", None), "is_trained", True)),
                           "bytes_per_fact": idx.nbytes / m}
    for batch in args.batches:
        q = qs["near"][:batch]
        t = timed(lambda q=q: idx.search(q), device, args.repeats)
        row[f"B{batch}_ms_median"] = 1e3 * statistics.median(t)
        row[f"B{batch}_ms_p95"] = 1e3 * float(np.percentile(t, 95))
        if args.floor_bw:
            row[f"B{batch}_of_floor"] = (m * d * keys.element_size() / args.floor_bw) / statistics.median(t)
    for kind, q in qs.items():
        s, i = idx.search(q)
        rs, ri = ref[kind]
        row[f"{kind}_same_argmax"] = float((i.cpu() == ri).float().mean())
        row[f"{kind}_same_gate"] = float(((s.cpu() > args.gamma) == (rs > args.gamma)).float().mean())
        row[f"{kind}_over_true_max"] = int((s.cpu() > rs + 1e-4).sum())
    fresh = keys[torch.randperm(m, generator=torch.Generator().manual_seed(1))[:1000]]
    t0 = time.perf_counter()
    for k in range(1000):  # 1000 single-fact replacements: what NeuralDB.update() does to the index
        idx.add(ids[1000 + k : 1001 + k], fresh[k : k + 1])
    row["update_1k_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx.remove(ids[:1000])
    row["remove_1k_s"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("grid")
    g.add_argument("--spec", action="append", help=f"index spec, repeatable (default: {DEFAULT_SPECS}); "
                                                   "{nlist} = sqrt(m) and {pq} = d/16 are filled per m and d")
    g.add_argument("--m", default="10000,100000")
    g.add_argument("--d", default="576,1536,3072")
    g.add_argument("--batch", default="1,32,512")
    s = ap.add_argument_group("search parameters")
    s.add_argument("--shortlist", type=int, default=8)
    s.add_argument("--nprobe", type=int, default=16)
    s.add_argument("--ef-search", type=int, default=64)
    s.add_argument("--gamma", type=float, default=0.65)
    r = ap.add_argument_group("run")
    r.add_argument("--device", default="cpu")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--mem-gib", type=float, default=6.0, help="skip (m, d) whose fp32 keys exceed this")
    r.add_argument("--max-gflop", type=float, default=300.0, help="skip specs whose build is estimated above "
                                                               "this much work (IVF/PQ training, HNSW inserts)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="results/index")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.batches = [int(b) for b in args.batch.split(",")]
    args.floor_bw = copy_bandwidth(device) if device.type == "cuda" else None
    rows, skipped = [], []
    for m in [int(x) for x in args.m.split(",")]:
        for d in [int(x) for x in args.d.split(",")]:
            if m * d * 4 / 2**30 > args.mem_gib:
                skipped.append({"m": m, "d": d, "why": f"fp32 keys need {m * d * 4 / 2**30:.1f} GiB > --mem-gib"})
                continue
            keys = activation_like(m, d, args.seed, device)
            qs = queries_for(keys, max(args.batches), args.seed)
            ref = {k: tuple(t.cpu() for t in max_cosine(q, keys)) for k, q in qs.items()}
            for spec_t in args.spec or DEFAULT_SPECS:
                nlist = int(m**0.5)
                spec = spec_t.format(nlist=nlist, pq=d // 16)
                work = build_gflop(spec, m, d, nlist)
                if work > args.max_gflop:
                    skipped.append({"spec": spec, "m": m, "d": d, "why": f"~{work:.0f} GFLOP > --max-gflop"})
                    continue
                t0 = time.perf_counter()
                row = run_one(spec, keys, qs, ref, args, device)
                print(f"{spec:>16} m={m} d={d}: build {row['build_s']:.1f}s, B={args.batches[-1]} "
                      f"{row[f'B{args.batches[-1]}_ms_median']:.2f} ms, near argmax {row['near_same_argmax']:.3f} "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
                rows.append(row)
                gc.collect()
            del keys
            gc.collect()
    cols = ["spec", "m", "d", "bytes_per_fact", "build_s", "add_1k_s", "update_1k_s", "remove_1k_s"] + \
        [f"B{b}_ms_median" for b in args.batches] + [f"B{args.batches[-1]}_ms_p95", "near_same_argmax",
                                                      "near_same_gate", "unrelated_same_gate", "near_over_true_max"]
    if args.floor_bw:
        cols += [f"B{b}_of_floor" for b in args.batches]
    table = markdown_table(rows, cols)
    print(table)
    out = Path(args.out)
    res = {"args": {k: v for k, v in vars(args).items()}, "machine": machine(), "rows": rows, "skipped": skipped}
    write_json(out / "index.json", res)
    (out / "index.md").write_text(table + "\n\nSkipped:\n" + "\n".join(f"- {s}" for s in skipped) + "\n")
    return res


if __name__ == "__main__":
    main()
