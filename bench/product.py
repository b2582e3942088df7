"""The whole product on one real model, end to end: facts (two about one subject) edited through
the API with the model's shipped profile, a save / load round trip, then `neuraldb serve` over
loopback with the `openai` client: completions, a live fact write, kill -9, restart, the write
still there. Each step prints a row (what was checked, the answer seen, pass or fail).

    python3 bench/product.py --model gemma3-270m --out results/product-gemma3-270m
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from neuraldb import Fact, NeuralDB, load_facts, load_model
from neuraldb.bench.common import machine, markdown_table, run_main, write_outputs
from neuraldb.data import resolve, source_file
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.evaluation.texts import wikitext_passages

SAME_SUBJECT = ("{} was born in the city of", "The native language of {} is")  # two facts about one subject


def facts_for(args: argparse.Namespace) -> tuple[list[Fact], Fact]:
    """`--facts` CounterFact facts, two more about the first one's subject, and one for the live write."""
    pool = load_facts(source_file("counterfact", args.data_dir), limit=args.facts + 1)
    s = pool[0].subject
    same = [Fact(s, SAME_SUBJECT[0], "Reykjavik"), Fact(s, SAME_SUBJECT[1], "Finnish")]
    return pool[: args.facts] + same, pool[args.facts]


def check(rows: list[dict[str, Any]], step: str, ok: bool, seen: str) -> None:
    rows.append({"step": step, "seen": seen.replace("\n", " ")[:90], "ok": "pass" if ok else "FAIL"})
    print(f"[{rows[-1]['ok']}] {step}: {rows[-1]['seen']}", file=sys.stderr)


def answers(db: NeuralDB, facts: Sequence[Fact], tokens: int) -> list[str]:
    return [db.generate(f.text, tokens) for f in facts]


def said(answer: str, f: Fact) -> bool:
    return answer.strip().startswith(f.target_new.strip())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--facts", type=int, default=4, help="CounterFact facts (two more share the first's subject)")
    p.add_argument("--data-dir")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens per answer")
    p.add_argument("--out", type=Path, default=Path("results/product"))
    args = p.parse_args(argv)
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    facts, live = facts_for(args)

    # 1. the API, with the model's own profile
    db = NeuralDB(model, tok)
    check(rows, "profile", db.profile != "built-in", f"{db.profile}: layer {db.layer}, gamma {db.config.gamma}")
    db.add(facts)
    got = answers(db, facts, args.tokens)
    for f, a in zip(facts, got):
        check(rows, f"edit {f.text!r} -> {f.target_new!r}", said(a, f), a)
    text = wikitext_passages(resolve("wikitext", args.data_dir).path, 1)[0]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with db.disabled():
            plain = model(input_ids=ids).logits
    check(rows, "ordinary text: logits equal the unedited model's", torch.equal(logits, plain),
          f"{ids.shape[1]} tokens, max |diff| {float((logits - plain).abs().max()):.3g}")

    # 2. save / load round trip
    db.save(out / "db")
    db.detach()
    back = NeuralDB.load(out / "db", model, tok)
    again = answers(back, facts, args.tokens)
    check(rows, "save / load: the same greedy answers", again == got, f"{len(facts)} facts, profile {back.profile}")
    back.detach()

    # 3. the server: openai client, a live write, kill -9, restart
    from openai import OpenAI

    from neuraldb.serve.process import ServerProcess

    srv_db = out / "served"
    shutil.copytree(out / "db", srv_db)
    srv = ServerProcess(srv_db, model=args.model, log=out / "server.log", threads=None).start()
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused")
        name = client.models.list().data[0].id
        first = client.completions.create(model=name, prompt=facts[0].text, max_tokens=args.tokens, temperature=0)
        check(rows, "serve: completion over a saved fact", said(first.choices[0].text, facts[0]), first.choices[0].text)
        import httpx

        r = httpx.post(srv.url + "/v1/facts", json=live.to_json(), timeout=600)
        check(rows, "serve: live write acknowledged", r.status_code == 200, f"HTTP {r.status_code}")
        new = client.completions.create(model=name, prompt=live.text, max_tokens=args.tokens, temperature=0)
        check(rows, f"serve: the live fact answers {live.target_new!r}", said(new.choices[0].text, live),
              new.choices[0].text)
        srv.kill()
        srv = ServerProcess(srv_db, model=args.model, log=out / "server.log", threads=None).start()
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused")
        kept = [f for f in srv.facts().values() if f["subject"] == live.subject and f["target_new"] == live.target_new]
        after = client.completions.create(model=name, prompt=live.text, max_tokens=args.tokens, temperature=0)
        check(rows, "kill -9, restart: the acknowledged write survives", bool(kept) and said(after.choices[0].text, live),
              f"{len(kept)} stored; answer {after.choices[0].text!r}; restart {srv.started_s:.1f} s")
    finally:
        srv.stop()
    result = {"model": args.model, "rows": rows, "passed": all(r["ok"] == "pass" for r in rows),
              "seconds": time.perf_counter() - t0, "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "command": "python3 bench/product.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_outputs(out, "product", result, f"The product end to end on {args.model}",
                  markdown_table(rows, ["step", "seen", "ok"]))
    return result


if __name__ == "__main__":
    run_main(main, "bench/product.py")
