"""Single-fact replace cost of every index spec: `n` calls of `add([id], key)` on an id already
present, at m facts. Run it against two checkouts (PYTHONPATH) to compare before/after on one
machine; prints a markdown table and writes JSON.

    python3 bench/update_cost.py --m 10000,100000 --d 1536 --spec Flat --spec HNSW32 --n 100
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from neuraldb.bench.common import machine, markdown_table, write_json
from neuraldb.index import make_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("grid")
    g.add_argument("--spec", action="append", default=None)
    g.add_argument("--m", default="10000,100000")
    g.add_argument("--d", type=int, default=1536)
    g.add_argument("--n", type=int, default=100, help="single-fact updates timed per cell")
    r = ap.add_argument_group("run")
    r.add_argument("--label", default="", help="a name for this checkout in the table (e.g. before/after)")
    r.add_argument("--out", default="results/update_cost")
    args = ap.parse_args()
    rows = []
    for m in (int(x) for x in args.m.split(",")):
        keys = torch.randn(m, args.d, generator=torch.Generator().manual_seed(0))
        fresh = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(1))
        for spec in args.spec or ["Flat", "HNSW32"]:
            spec = spec.format(nlist=int(m**0.5))
            idx = make_index(spec, args.d, train_size=min(m, 40 * int(m**0.5)))
            idx.add(np.arange(m), keys)
            t0 = time.perf_counter()
            for k in range(args.n):
                idx.add([k * 7 % m], fresh[k : k + 1])
            per = (time.perf_counter() - t0) / args.n
            rows.append({"label": args.label, "spec": spec, "m": m, "d": args.d, "updates": args.n,
                         "ms_per_update": 1e3 * per, "update_1k_s_est": per * 1000})
            print(rows[-1], flush=True)
    table = markdown_table(rows, ["label", "spec", "m", "d", "updates", "ms_per_update", "update_1k_s_est"])
    print(table)
    write_json(Path(args.out) / f"update_cost{'-' + args.label if args.label else ''}.json",
               {"args": vars(args), "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
