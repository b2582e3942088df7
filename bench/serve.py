"""Load on a real `neuraldb serve` over loopback: K closed-loop clients (completions, greedy)
for T seconds, optionally a writer adding facts, and kill -9 restarts under that load.

    python3 bench/serve.py --db results/serve/build10k/db --facts results/serve/cf-more.jsonl \\
        --clients 1,8,16 --seconds 40 --out results/serve-bench

Scenarios (rows of the table):
- `db, K clients`: the database as given (its gate on), K = each of --clients;
- `db, K clients, batch 1`: the server takes one request at a time (--max-batch 1), at K = --batch-k;
- `empty, K clients`: the same load on an empty database of the same model (the gate's cost);
- `db, K clients + writer`: a writer posts one fact at a time, K = the largest of --clients;
- `kill -9`: --kills cycles of (load + writer for --kill-after s, SIGKILL, restart): the restart
  time until /health answers, and every acknowledged write checked after each restart.
Each scenario starts its own server on a copy of the database, so none sees another's writes."""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from neuraldb.bench.common import machine, markdown_table, run_main, with_neutral, write_outputs
from neuraldb.engine.facts import load_facts
from neuraldb.engine.persistence import read_meta
from neuraldb.serve.engine import wal_path
from neuraldb.serve.process import ServerProcess


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)  # write latencies
    acked: dict[int, dict] = field(default_factory=dict)  # db id -> record
    next_write: int = 0  # the next fact the writer sends (one sent without an answer is skipped)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(url: str, prompts: list[str], max_tokens: int, stop: threading.Event, load: Load,
                seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=300) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.post(url + "/v1/completions", json={"prompt": rng.choice(prompts), "max_tokens": max_tokens,
                                                          "temperature": 0})
            except httpx.HTTPError as exc:
                if not stop.is_set():
                    with load.lock:
                        load.errors.append(f"{type(exc).__name__}: {exc}")
                return
            with load.lock:
                if r.status_code != 200:
                    load.errors.append(f"{r.status_code}: {r.text[:200]}")
                elif not stop.is_set():  # only requests that ended inside the window count
                    load.latencies.append(time.perf_counter() - t0)
                    load.tokens += r.json()["usage"]["completion_tokens"]


def writer_loop(url: str, facts: list[dict], stop: threading.Event, load: Load) -> None:
    with httpx.Client(timeout=300) as c:
        while not stop.is_set() and load.next_write < len(facts):
            t0 = time.perf_counter()
            load.next_write += 1
            try:
                r = c.post(url + "/v1/facts", json=facts[load.next_write - 1])
            except httpx.HTTPError:
                return  # killed mid-write: in doubt, not counted
            with load.lock:
                if r.status_code != 200:
                    load.errors.append(f"write {r.status_code}: {r.text[:200]}")
                    continue
                load.writes.append(time.perf_counter() - t0)
                for item in r.json()["data"]:
                    load.acked[item["id"]] = item["fact"]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_load(server: ServerProcess, args: argparse.Namespace, clients: int, seconds: float, prompts: list[str],
             facts: list[dict] | None = None, load: Load | None = None) -> tuple[Load, float, list[threading.Thread]]:
    """Clients (and a writer) for `seconds`; returns (load, wall, the threads still finishing
    their last request: join them)."""
    load = load or Load()
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(server.url, prompts, args.max_tokens, stop, load, i))
               for i in range(clients)]
    if facts is not None:
        threads.append(threading.Thread(target=writer_loop, args=(server.url, facts, stop, load)))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    wall = time.perf_counter() - t0
    return load, wall, threads


def summary(name: str, load: Load, wall: float, clients: int) -> dict[str, Any]:
    lat = load.latencies
    return {"scenario": name, "clients": clients, "requests": len(lat), "requests_per_s": len(lat) / wall,
            "tokens_per_s": load.tokens / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "p99_s": pct(lat, 0.99), "errors": len(load.errors), "writes": len(load.writes),
            "write_p50_s": pct(load.writes, 0.5), "write_p95_s": pct(load.writes, 0.95),
            "error_samples": load.errors[:5]}


def fresh_copy(src: Path | None, work: Path, name: str) -> Path:
    """A private copy of the database (or a new empty one's path) for one scenario."""
    dst = work / name / "db"
    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    dst.parent.mkdir(parents=True)
    if src is not None:
        shutil.copytree(src, dst)
    return dst


def scenario(args: argparse.Namespace, name: str, db: Path | None, clients: int, prompts: list[str],
             extra: list[str] | None = None, facts: list[dict] | None = None) -> dict[str, Any]:
    path = fresh_copy(db, args.work, name.replace(" ", "_").replace(",", ""))
    new = ["--config", str(args.config)] if db is None else []  # an empty database with the same settings
    s = ServerProcess(path, args.model if db is None else None, [*args.server_args, *new, *(extra or [])],
                      log=path.parent / "server.log", threads=args.threads).start()
    try:
        for t in run_load(s, args, clients, args.warmup, prompts)[2]:  # warm-up, not counted
            t.join()
        load, wall, threads = run_load(s, args, clients, args.seconds, prompts, facts)
        for t in threads:
            t.join()
        row = summary(name, load, wall, clients)
        row["startup_s"] = s.started_s
    finally:
        s.stop()
    print(f"{name}: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tok/s, p50 {row['p50_s']:.2f}s, "
          f"errors {row['errors']}, writes {row['writes']}", file=sys.stderr, flush=True)
    return row


def kill_trials(args: argparse.Namespace, db: Path, prompts: list[str], facts: list[dict]) -> dict[str, Any]:
    """kill -9 under load + writer, restart, check every acknowledged write; repeated."""
    path = fresh_copy(db, args.work, "kill9")
    clients = max(args.clients)
    load, restarts, lost, rng = Load(), [], [], random.Random(args.seed)
    s = ServerProcess(path, None, args.server_args, log=path.parent / "server.log", threads=args.threads).start()
    base = set(s.facts())
    for trial in range(args.kills):
        threads = run_load(s, args, clients, rng.uniform(0.5, 1.0) * args.kill_after, prompts, facts, load)[2]
        s.kill()
        for t in threads:
            t.join()
        t0 = time.perf_counter()
        s = ServerProcess(path, None, args.server_args, log=path.parent / "server.log", threads=args.threads).start()
        restarts.append(time.perf_counter() - t0)
        now = s.facts()
        missing = [i for i, rec in load.acked.items() if now.get(i) != rec]
        lost += missing
        print(f"kill -9 #{trial + 1}: restart {restarts[-1]:.1f}s, {len(now)} facts, {len(load.acked)} acked writes, "
              f"{len(missing)} lost", file=sys.stderr, flush=True)
    health = httpx.get(s.url + "/health").json()
    s.stop()
    lat = load.latencies
    return {"scenario": f"kill -9 x{args.kills}", "clients": clients, "requests": len(lat),
            "errors": len([e for e in load.errors if not e.startswith(("ReadError", "RemoteProtocolError",
                                                                          "ConnectError"))]),
            "errors_from_kills": len(load.errors), "writes": len(load.acked), "lost_writes": len(lost),
            "restart_p50_s": statistics.median(restarts), "restart_max_s": max(restarts),
            "facts_start": len(base), "facts_end": health["facts"], "restarts": restarts,
            "error_samples": load.errors[:5]}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("database and model")
    g.add_argument("--db", type=Path, required=True, help="a saved database (copied for every scenario)")
    g.add_argument("--model", help="model of the empty-database scenario (default: the database's)")
    g.add_argument("--facts", help="facts the writer adds (a file or source name; default: the database's own "
                                   "facts under new subjects)")
    g = p.add_argument_group("load")
    g.add_argument("--clients", default="1,8,16", help="concurrent clients per scenario")
    g.add_argument("--batch-k", type=int, default=8, help="clients of the one-at-a-time scenario")
    g.add_argument("--seconds", type=float, default=40.0)
    g.add_argument("--warmup", type=float, default=5.0)
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--skip", default="", help="scenarios to skip: comma list of db,batch1,empty,writer,kill")
    g = p.add_argument_group("faults")
    g.add_argument("--kills", type=int, default=20)
    g.add_argument("--kill-after", type=float, default=8.0, help="seconds of load before each kill (0.5-1x)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("results/serve-bench"))
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
    args.skip = set(filter(None, args.skip.split(",")))
    args.work = args.out / "work"
    args.server_args = ["--max-batch", "16", "--checkpoint-records", "200"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    t_start = time.perf_counter()
    meta = read_meta(args.db, verify_files=False)
    args.model = args.model or meta["model"]["name"]
    args.out.mkdir(parents=True, exist_ok=True)
    args.config = (args.out / "db-config.yaml").resolve()
    args.config.write_text(yaml.safe_dump(meta["config"], sort_keys=False))
    if wal_path(args.db).exists():
        raise FileNotFoundError(f"{wal_path(args.db)}: the database has a pending log; serve and stop it first")
    with open(args.db / "facts.jsonl", encoding="utf-8") as fh:
        db_facts = [json.loads(line)["fact"] for line in fh]
    rng = random.Random(args.seed)
    prompts = with_neutral([f["prompt"].replace("{}", f["subject"])
                            for f in rng.sample(db_facts, min(200, len(db_facts)))])  # a third neutral
    if args.facts:
        write = [f.to_json() for f in load_facts(args.facts)]
    else:
        write = [dict(f, id=f"w{i}", subject=f"{f['subject']} Jr.") for i, f in enumerate(db_facts)]
    rows = []
    top = max(args.clients)
    # compared rows run back to back (the database, then the empty one, then one at a time), so
    # a machine whose load drifts during the bench shifts both sides of a ratio alike
    for k in args.clients:
        if "db" not in args.skip:
            rows.append(scenario(args, f"db, {k} clients", args.db, k, prompts))
        if "empty" not in args.skip and k in (args.batch_k, top):
            rows.append(scenario(args, f"empty, {k} clients", None, k, prompts))
        if "batch1" not in args.skip and k == args.batch_k:
            rows.append(scenario(args, f"db, {k} clients, batch 1", args.db, k, prompts, ["--max-batch", "1"]))
    if "writer" not in args.skip:
        rows.append(scenario(args, f"db, {top} clients + writer", args.db, top, prompts, facts=write))
    kill = kill_trials(args, args.db, prompts, write) if "kill" not in args.skip and args.kills else None
    by = {r["scenario"]: r for r in rows}
    derived = {}
    b8, one = by.get(f"db, {args.batch_k} clients"), by.get(f"db, {args.batch_k} clients, batch 1")
    if b8 and one:
        derived["batching_gain"] = b8["requests_per_s"] / one["requests_per_s"]
    for k in args.clients:
        e, d = by.get(f"empty, {k} clients"), by.get(f"db, {k} clients")
        if e and d:
            derived[f"gate_cost_{k}_clients"] = 1 - d["requests_per_s"] / e["requests_per_s"]
    cols = ["scenario", "clients", "requests", "requests_per_s", "tokens_per_s", "p50_s", "p95_s", "p99_s", "errors",
            "writes", "write_p50_s", "write_p95_s"]
    table = markdown_table(rows, cols)
    if kill:
        table += "\n\n" + markdown_table([kill], ["scenario", "clients", "requests", "errors", "errors_from_kills",
                                                  "writes", "lost_writes", "restart_p50_s", "restart_max_s",
                                                  "facts_start", "facts_end"])
    table += "\n\n" + "\n".join(f"- {k}: {v:.3f}" for k, v in derived.items())
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "db_facts": len(db_facts),
              "rows": rows, "kill": kill, "derived": derived, "wall_s": time.perf_counter() - t_start}
    write_outputs(args.out, "serve", result, f"neuraldb serve under load ({len(db_facts)} facts)", table)


if __name__ == "__main__":
    run_main(main, "bench/serve.py")
