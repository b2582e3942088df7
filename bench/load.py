"""How fast a saved database opens: `NeuralDB.load`, `neuraldb info`, and the first forward
pass after a load against a warm one, at m facts, each measured in a fresh process.

    python bench/load.py --m 30000,100000

The databases are built from synthetic facts with keys and residuals drawn at random (the
files, checks and index are those of any database of that size; computing 100k real residuals
takes a day on a CPU), through `NeuralDB.insert` and `save`, so the index is what the default
spec builds (`Auto`: `Proj{d/3}` from 5,000 keys, its basis fitted to the model's own text)."""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from neuraldb import NeuralDB, load_model
from neuraldb.bench.common import machine, markdown_table, run_main, write_outputs
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.evaluation.synthetic import synthetic_facts

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch
from neuraldb import NeuralDB, load_model
t1 = time.perf_counter()
model, tok = load_model(sys.argv[1])
t2 = time.perf_counter()
db = NeuralDB.load(sys.argv[2], model, tok)
t3 = time.perf_counter()
enc = tok(["The mother tongue of Danielle Darrieux is French, and she was born in Paris."] * 4, return_tensors="pt")
times = []
with torch.no_grad():
    for _ in range(6):
        s = time.perf_counter(); model(**enc); times.append(time.perf_counter() - s)
print(json.dumps({"import_s": t1 - t0, "model_s": t2 - t1, "load_s": t3 - t2, "first_forward_s": times[0],
                  "warm_forward_s": sorted(times[1:])[2], "facts": len(db), "index": db.index.spec}))
"""


def build(model: Any, tok: Any, m: int, path: Path, seed: int) -> dict[str, float]:
    db = NeuralDB(model, tok, attach=False)
    g = torch.Generator().manual_seed(seed)
    facts = list(synthetic_facts(m, seed=seed))
    t0 = time.perf_counter()
    for s in range(0, m, 10_000):
        n = min(10_000, m - s)
        keys = torch.randn(n, db.d_row, generator=g) + 2.0  # (n, d_row): a shared direction, as activations have
        res = 0.1 * torch.randn(n, db.d_res, generator=g)  # (n, d_res)
        db.insert(list(range(s, s + n)), facts[s : s + n], keys, res)
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    db.save(path)
    return {"insert_s": insert_s, "save_s": time.perf_counter() - t0,
            "bytes": sum(f.stat().st_size for f in path.iterdir())}


def probe(model: str, path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PROBE, model, str(path)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neuraldb.cli", "info", "--db", str(path)], capture_output=True, check=True)
    res["info_s"] = time.perf_counter() - t0
    return res


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--m", default="30000,100000", help="comma-separated database sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process probes per size (medians reported)")
    ap.add_argument("--out", default="results/load")
    args = ap.parse_args(argv)
    out = Path(args.out)
    model, tok = load_model(args.model)
    rows = []
    for m in (int(x) for x in args.m.split(",")):
        path = out / f"db-{m}"
        if path.exists():
            import shutil

            shutil.rmtree(path)
        row: dict[str, Any] = {"m": m, **build(model, tok, m, path, args.seed)}
        gc.collect()  # the built database leaves this process's memory before the probes run
        probes = [probe(args.model, path) for _ in range(args.repeats)]
        row.update({k: statistics.median(p[k] for p in probes) if isinstance(probes[0][k], float) else probes[0][k]
                    for k in probes[0]})
        row["first_over_warm"] = row["first_forward_s"] / row["warm_forward_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    cols = ["m", "index", "bytes", "save_s", "info_s", "model_s", "load_s", "first_forward_s", "warm_forward_s",
            "first_over_warm"]
    result = {"args": vars(args), "machine": machine(), "rows": rows}
    write_outputs(out, "load", result, f"bench/load.py: {args.model}", markdown_table(rows, cols))
    return result


if __name__ == "__main__":
    run_main(main, "bench/load.py")
