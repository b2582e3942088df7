"""Facts per second of `neuraldb build` with 1 and several ranks (torchrun, gloo on a CPU, NCCL
on GPUs), from the same facts and chunking, and whether the databases agree bit for bit.

    python bench/build.py --facts 64 --chunk 16 --runs 1x1,1x2,2x1      # SmolLM2, CounterFact
    python bench/build.py --model DIR --facts 256 --runs 1x1,2x1         # any saved HF model directory

Each run is RANKSxTHREADS (`OMP_NUM_THREADS` per rank). On a CPU the machine's cores are shared,
not multiplied: 1x2 against 2x1 shows what splitting the work costs or gains at a fixed core
count, and 1x1 against 2x1 checks bit-equality at the same thread count. On a GPU machine use
1x1,2x1,...,Gx1 (one GPU per rank)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from neuraldb.bench.common import machine, markdown_table, run_main, write_outputs
from neuraldb.data import source_file
from neuraldb.engine.facts import load_facts, save_facts_jsonl
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.engine.persistence import read_db


def same(a: Path, b: Path) -> bool:
    x, y = read_db(a), read_db(b)
    (ia, ka), (ib, kb) = x.index.export(), y.index.export()
    ids = torch.from_numpy(ia)
    return (x.facts == y.facts and np.array_equal(ia, ib) and torch.equal(ka, kb)
            and torch.equal(x.table.gather(ids), y.table.gather(ids)))


def rank0_summary(stdout: str) -> dict[str, Any]:
    """Rank 0's JSON summary among the ones every rank prints."""
    dec, pos, found = json.JSONDecoder(), 0, []
    while (start := stdout.find("{", pos)) >= 0:
        obj, pos = dec.raw_decode(stdout, start)
        found.append(obj)
    return next(o for o in found if o.get("rank") == 0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default="counterfact", help="a source name or a facts file")
    ap.add_argument("--data-dir")
    ap.add_argument("--facts", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--runs", default="1x1,1x2,2x1",
                    help="RANKSxTHREADS per run (threads per rank; on a GPU ranks are GPUs): each run's database is "
                         "compared bit for bit with the first run of the same thread count")
    ap.add_argument("--config", help="EditConfig YAML passed to every build")
    ap.add_argument("--out", default="results/build")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts_file = out / "facts.jsonl"
    save_facts_jsonl(load_facts(source_file(args.data, args.data_dir), limit=args.facts), facts_file)
    rows: list[dict[str, Any]] = []
    first: dict[int, Path] = {}  # threads per rank -> the first database built with them
    for run in args.runs.split(","):
        ranks, threads = (int(x) for x in run.split("x"))
        work = out / f"ranks-{ranks}-threads-{threads}"
        shutil.rmtree(work, ignore_errors=True)
        cmd = ["-m", "neuraldb.cli", "build", "--facts", str(facts_file), "--model", args.model,
               "--chunk", str(args.chunk), "--out", str(work)] + (["--config", args.config] if args.config else [])
        launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc-per-node={ranks}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        done = subprocess.run(launch + cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"bench/build.py: {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
        summary = rank0_summary(done.stdout)
        row = {"ranks": ranks, "threads_per_rank": threads, "facts": args.facts, "wall_s": wall,
               "facts_per_s_wall": args.facts / wall, "rank0_compute_s": summary["compute_s"],
               "assemble_s": summary.get("assemble_s"),
               "bit_equal_to": "(reference)" if threads not in first else
               f"{first[threads].parent.name}: {same(first[threads], work / 'db')}"}
        first.setdefault(threads, work / "db")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    cols = ["ranks", "threads_per_rank", "facts", "wall_s", "facts_per_s_wall", "rank0_compute_s", "assemble_s",
            "bit_equal_to"]
    result = {"args": vars(args), "machine": machine(), "rows": rows}
    write_outputs(out, "build", result, f"bench/build.py: {args.model}, {args.facts} facts, chunk {args.chunk}",
                  markdown_table(rows, cols))
    return result


if __name__ == "__main__":
    run_main(main, "bench/build.py")
