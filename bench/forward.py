"""The gate's cost inside the forward pass, in-process: a prefill of B prompts and D decode steps
with the gate on, against the same work with it off, alternated round by round so that drift on
a shared machine falls on both. Decode steps run a fixed count (no early stop), so both sides
do identical work; the lookup's own time is read from the gate.

    python3 bench/forward.py --db results/serve/cheap10k/db --batch 1,8,16 --out results/forward

`--index SPEC` (repeatable) re-indexes the database's keys under each spec (`Flat`,
`Proj256`, ...) for a side-by-side; the default is the database's own index. Prompts: as
bench/serve.py sends, two thirds the database's own edit prompts and a third neutral text."""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from neuraldb.bench.common import machine, markdown_table, run_main, with_neutral, write_outputs
from neuraldb.engine import NeuralDB
from neuraldb.engine.arch import cache_kwargs, model_device, returned_cache
from neuraldb.engine.models import load_model
from neuraldb.engine.persistence import read_db, read_meta


def prompts_of(db: NeuralDB, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    facts = list(db.facts.values())
    out = with_neutral([f.prompt.replace("{}", f.subject) for f in rng.sample(facts, min(len(facts), 2 * n))])
    rng.shuffle(out)
    return out


@torch.no_grad()
def one_round(db: NeuralDB, texts: list[str], decode: int, on: bool) -> dict[str, float]:
    """Seconds of one prefill and the mean decode step, and the gate's lookup seconds in each."""
    model, tok, gate = db.model, db.tok, db.gate
    assert gate is not None
    gate.enabled = on
    enc = tok(texts, return_tensors="pt", padding=True).to(model_device(model))
    am = enc["attention_mask"]
    pos = (am.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    gate.timings = []
    t0 = time.perf_counter()
    out = model(input_ids=enc["input_ids"], attention_mask=am, position_ids=pos, use_cache=True)
    prefill, look_prefill = time.perf_counter() - t0, sum(gate.timings)
    nxt = out.logits[:, -1:].argmax(-1)  # (B, 1)
    cache, pos = returned_cache(out), pos[:, -1:]
    gate.timings = []
    t0 = time.perf_counter()
    for _ in range(decode):
        am = torch.cat([am, torch.ones_like(nxt)], 1)  # (B, T+1)
        pos = pos + 1
        out = model(input_ids=nxt, attention_mask=am, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
        cache, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)
    step = (time.perf_counter() - t0) / decode
    look_decode = sum(gate.timings) / decode
    gate.timings, gate.enabled = None, True
    return {"prefill_s": prefill, "decode_step_s": step, "prefill_lookup_s": look_prefill,
            "decode_lookup_s": look_decode, "prefill_tokens": int(am.shape[0] * enc["input_ids"].shape[1])}


def measure(db: NeuralDB, spec: str, batch: int, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    on: list[dict[str, float]] = []
    off: list[dict[str, float]] = []
    rng = random.Random(batch)
    for r in range(args.rounds + 1):  # round 0 warms up both sides
        sample = rng.sample(texts, batch)
        for side in ((True, False) if r % 2 else (False, True)):
            (on if side else off).append(one_round(db, sample, args.decode, side))
    on, off = on[1:], off[1:]
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    row: dict[str, Any] = {"index": spec, "batch": batch, "facts": len(db)}
    for phase, key in (("prefill", "prefill_s"), ("decode", "decode_step_s")):
        t_on, t_off = med(on, key), med(off, key)
        row[f"{phase}_ms_off"], row[f"{phase}_ms_on"] = 1e3 * t_off, 1e3 * t_on
        row[f"{phase}_lookup_ms"] = 1e3 * med(on, f"{phase}_lookup_s")
        row[f"{phase}_cost"] = t_on / t_off - 1  # the gate's share added to the forward
    row["prefill_tokens"] = med(on, "prefill_tokens")
    stats = getattr(db.index, "stats", None)
    if stats:
        row["decided_share"] = stats["decided"] / max(1, stats["queries"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("database")
    g.add_argument("--db", type=Path, required=True, help="a saved database")
    g.add_argument("--model", help="model (default: the database's)")
    g.add_argument("--index", action="append", help="re-index under this spec (repeatable; default: as saved)")
    g = p.add_argument_group("load")
    g.add_argument("--batch", default="1,8,16", help="prompts per forward, comma-separated")
    g.add_argument("--decode", type=int, default=16, help="decode steps per round")
    g.add_argument("--rounds", type=int, default=6, help="rounds per side (after one warm-up)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("results/forward"))
    args = p.parse_args()

    name = args.model or str(read_meta(args.db, verify_files=False)["model"].get("name") or "smollm2-135m")
    model, tok = load_model(name)
    rows: list[dict[str, Any]] = []
    for spec in args.index or [None]:
        db = NeuralDB.from_state(model, tok, read_db(args.db, device=model_device(model)), index=spec, where=args.db)
        texts = prompts_of(db, 100, args.seed)
        spec = db.index.spec
        inner = getattr(db.index, "inner", db.index)
        for b in (int(x) for x in args.batch.split(",")):
            if hasattr(inner, "stats"):
                inner.stats.update({k: 0 for k in inner.stats})
            rows.append(measure(db, f"{spec} ({inner.spec})" if inner is not db.index else spec, b, texts, args))
            print(rows[-1], flush=True)
        db.detach()
    cols = ["index", "batch", "prefill_tokens", "prefill_ms_off", "prefill_ms_on", "prefill_lookup_ms", "prefill_cost",
            "decode_ms_off", "decode_ms_on", "decode_lookup_ms", "decode_cost", "decided_share"]
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    write_outputs(args.out, "forward", result, f"The gate's cost in the forward pass ({args.db}, {len(db)} facts)",
                  markdown_table(rows, cols))


if __name__ == "__main__":
    run_main(main, "bench/forward.py")
