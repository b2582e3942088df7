"""Gate lookup on real keys and real queries: how much of each token's scan a bound saves, and
the lookup's share of SmolLM2's own forward, measured in the same run.

    python bench/bound.py --keys results/scale-100k/cache --m 20000,100000 \\
        --spec Flat --spec Int8 --spec Proj256 --spec Proj384 --out results/bound

Keys: the fp32 keys a `bench/scale.py` run cached (CounterFact first, then synthetic facts).
Queries: every token (but the first) of WikiText-2 passages at layer l*, plus the rewrite prompts
and paraphrases of the first CounterFact facts. `Proj` bases are trained (`index.train`) on
the first --train-passages passages (never measured), on text the model samples itself (what
`NeuralDB` does, `--train generated`), or on nothing but the keys (`--train none`). Decisions are checked against a float64
scan for every measured query."""
from __future__ import annotations

import argparse
import glob
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from neuraldb import load_facts, load_model
from neuraldb.bench.common import machine, markdown_table, timed, write_json
from neuraldb.engine.arch import cache_kwargs, returned_cache
from neuraldb.engine.config import model_defaults
from neuraldb.engine.space import Capture, KeySpace, key_space
from neuraldb.data import source_file
from neuraldb.engine.keys import calibration_queries
from neuraldb.evaluation.metrics import prompts_of
from neuraldb.evaluation.texts import wikitext_passages
from neuraldb.index import make_index


def layer_inputs(model: Any, tok: Any, texts: list[str], space: KeySpace) -> torch.Tensor:
    """The gate's query (in the model's key space) at every token but the first (never gated) of each text."""
    out = []
    with torch.no_grad():
        for t in texts:
            with Capture(model, space) as cap:
                model(**tok(t, return_tensors="pt"))
            out.append(space.combine(cap.raw[0, 1:]))  # (T-1, d_key)
    return torch.cat(out)


def entity_inputs(model: Any, tok: Any, texts: list[str], space: KeySpace, limit: int) -> torch.Tensor:
    """Gate queries at the capitalised-word tokens of `texts` (names, places: what subjects look
    like), up to `limit`: keys for a database whose facts are about the entities of ordinary text."""
    out, n = [], 0
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            keep = [p for p in range(1, len(ids)) if tok.decode([ids[p]]).strip()[:1].isupper()]
            if not keep:
                continue
            with Capture(model, space) as cap:
                model(**enc)
            out.append(space.combine(cap.raw[0, keep]))  # (K, d_key)
            n += len(keep)
            if n >= limit:
                break
    return torch.cat(out)[:limit]


def float64_search(keys: torch.Tensor, queries: torch.Tensor, block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: float64 cosine against the unit keys, every query, every key; keys are
    converted a block at a time, so 1M keys never exist in float64 at once."""
    q = queries.double() / queries.double().norm(dim=1, keepdim=True)
    best = torch.full((q.shape[0],), float("-inf"), dtype=torch.float64)
    arg = torch.zeros(q.shape[0], dtype=torch.long)
    for s in range(0, keys.shape[0], block):
        k = keys[s : s + block].double()
        k = k / k.norm(dim=1, keepdim=True)  # (block, d)
        v, i = (q @ k.T).max(1)  # (n,)
        better = v > best  # strict: the first of equal maxima wins, as in one scan
        best, arg = torch.where(better, v, best), torch.where(better, i + s, arg)
    return best, arg


def median_s(fn: Any, repeats: int) -> float:
    return statistics.median(timed(fn, torch.device("cpu"), repeats))


def forward_times(model: Any, tok: Any, text: str, repeats: int) -> dict[str, float]:
    """SmolLM2's own forward: a prefill of `text` and one decode step at B = 1 and 8 (ms)."""
    ids = tok(text, return_tensors="pt").input_ids  # (1, T)
    out: dict[str, float] = {"prefill_tokens": ids.shape[1]}
    with torch.no_grad():
        out["prefill"] = 1e3 * median_s(lambda: model(ids), repeats)
        for b in (1, 8):
            batch = ids.expand(b, -1)  # (b, T)
            cache = returned_cache(model(batch, use_cache=True))
            step = batch[:, -1:]

            def decode() -> None:
                model(step, use_cache=True, **cache_kwargs(model, cache))
                cache.crop(-1)  # drop the step: the cache stays at the prefill length
            out[f"decode_B{b}"] = 1e3 * median_s(decode, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--keys", required=True, help="a bench/scale.py cache directory (keys_*.safetensors)")
    g.add_argument("--m", default="20000,100000", help="key counts (first m cached keys)")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--wikitext", default="wikitext", help="a source name or a WikiText raw file")
    g.add_argument("--counterfact", default="counterfact", help="a source name or a facts file")
    g.add_argument("--data-dir", help="root of the named sources (default: $NEURALDB_DATA, ../shared/data, the sample)")
    g.add_argument("--passages", type=int, default=48, help="measured WikiText passages")
    g.add_argument("--train-passages", type=int, default=24, help="passages that train Proj bases")
    g.add_argument("--train", default="wikitext",
                   help="what trains Proj bases, comma-separated: wikitext (--train-passages passages), generated "
                        "(the model's own sampled text, as NeuralDB does), none (the keys alone)")
    g.add_argument("--edit-facts", type=int, default=100)
    g = ap.add_argument_group("indexes")
    g.add_argument("--spec", action="append", help="index spec (repeatable); default Flat, Int8, Proj256, Proj384")
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--entity-keys", type=int, default=0,
                   help="add a row of this many keys taken at capitalised-word tokens of other WikiText-2 "
                        "passages (a database about the entities of ordinary text: many tokens open)")
    g.add_argument("--near-queries", type=int, default=0,
                   help="also time this many queries that are stored keys plus noise 0.01 (every gate opens)")
    g.add_argument("--synthetic-m", type=int, default=0, help="add a row of this many synthetic keys with the real keys' spectrum")
    g.add_argument("--synthetic-queries", type=int, default=2000,
                   help="queries per kind checked and counted on the synthetic row (float64 over 1M keys is slow)")
    ap.add_argument("--out", default="results/bound")
    args = ap.parse_args()
    specs = args.spec or ["Flat", "Int8", "Proj256", "Proj384"]
    torch.manual_seed(0)

    model, tok = load_model(args.model)
    cfg = model_defaults(args.model, model.config.model_type)
    space = key_space(model, cfg.layer, cfg)  # the space the cached keys were made in
    passages = wikitext_passages(source_file(args.wikitext, args.data_dir), args.train_passages + args.passages)
    trainers = {"wikitext": lambda: layer_inputs(model, tok, passages[: args.train_passages], space),
                "generated": lambda: calibration_queries(model, tok, cfg.layer, cfg), "none": lambda: None}
    train_sets = {name: trainers[name]() for name in args.train.split(",")}
    facts = load_facts(source_file(args.counterfact, args.data_dir), limit=args.edit_facts)
    edit_texts = prompts_of(facts, "efficacy")[0] + prompts_of(facts, "generalization")[0]
    wiki_q = layer_inputs(model, tok, passages[args.train_passages :], space)
    queries = {"wikitext": wiki_q, "edit prompts": layer_inputs(model, tok, edit_texts, space)}
    prefill_text = max(passages[args.train_passages :], key=len)
    fwd = forward_times(model, tok, prefill_text, args.repeats)
    n_prefill = int(fwd["prefill_tokens"]) - 1
    print(f"SmolLM2 forward: prefill {n_prefill + 1} tokens {fwd['prefill']:.1f} ms, "
          f"decode B=1 {fwd['decode_B1']:.1f} ms, B=8 {fwd['decode_B8']:.1f} ms")

    keys_all = torch.cat([load_file(f)["keys"] for f in sorted(glob.glob(f"{args.keys}/keys_*.safetensors"))]).float()
    keys_all = keys_all[:, : space.dim]  # a key row with the head check is the key, then its head row
    keys_all = keys_all / keys_all.norm(dim=1, keepdim=True)  # (M, d) unit rows
    sets = [(f"real {m}", keys_all[:m]) for m in (int(v) for v in args.m.split(",") if v)]
    if args.entity_keys:
        others = wikitext_passages(source_file(args.wikitext, args.data_dir), None)[args.train_passages + args.passages:]
        ent = entity_inputs(model, tok, others, space, args.entity_keys)
        sets.append((f"wikitext entities {len(ent)}", ent / ent.norm(dim=1, keepdim=True)))
    if args.synthetic_m:  # Gaussian keys whose covariance matches the real keys' (same spectrum)
        sample = keys_all[torch.randperm(len(keys_all))[:20000]]
        mean, cov = sample.mean(0), torch.cov(sample.T)
        chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(cov.shape[0]))
        syn = torch.empty(args.synthetic_m, len(mean))  # (m, d), filled in place: no second copy
        for s in range(0, args.synthetic_m, 65536):
            x = mean + torch.randn(min(65536, args.synthetic_m - s), len(mean)) @ chol.T
            syn[s : s + x.shape[0]] = x / x.norm(dim=1, keepdim=True)  # unit rows, as indexes store them
        sets.append((f"synthetic {args.synthetic_m}", syn))
    rows = []
    for name, keys in sets:
        m = keys.shape[0]
        qs = queries if not name.startswith("synthetic") else {k: q[: args.synthetic_queries] for k, q in queries.items()}
        if args.near_queries:  # near-duplicates of stored keys: the bound decides nothing cheaply, every gate opens
            g = torch.Generator().manual_seed(1)
            pick = torch.randint(0, m, (max(args.near_queries, n_prefill),), generator=g)
            qs = {**qs, "near keys": keys[pick] + 0.01 * torch.randn(len(pick), keys.shape[1], generator=g)}
        want = {k: float64_search(keys, q) for k, q in qs.items()}
        runs = [(spec, t) for spec in specs for t in (train_sets if spec.startswith("Proj") else [""])]
        for spec, trained_on in runs:
            idx = make_index(spec, keys.shape[1], floor=cfg.gamma)
            t0 = time.perf_counter()
            idx.add(torch.arange(m), keys, unit=True)  # unit rows already: no normalised copy
            if train_sets.get(trained_on) is not None:
                idx.train(train_sets[trained_on])
            idx.search(wiki_q[:1])  # builds codes / projections
            row: dict[str, Any] = {"keys": name, "spec": spec, "trained on": trained_on,
                                   "build_s": time.perf_counter() - t0, "bytes_per_fact": idx.nbytes / m}
            for kind, q in qs.items():
                stats0 = dict(getattr(idx, "stats", {}))
                sims, ids = idx.search(q)
                ws, wi = want[kind]
                open_w, open_g = ws > cfg.gamma, sims.double() > cfg.gamma
                # same decisions, and an open gate's id holds the maximum (facts sharing a subject
                # share a key: exact ties, any of them is the exact answer)
                qn = q[open_w].double() / q[open_w].double().norm(dim=1, keepdim=True)
                got = (qn * keys[ids[open_w]].double()).sum(1) / keys[ids[open_w]].double().norm(dim=1)
                row[f"{kind} agree"] = bool(torch.equal(open_w, open_g) and torch.allclose(got, ws[open_w], rtol=0, atol=1e-6))
                row[f"{kind} open %"] = 100 * float(open_w.float().mean())
                if hasattr(idx, "stats"):
                    d = {k: idx.stats[k] - stats0.get(k, 0) for k in idx.stats}
                    row[f"{kind} decided %"] = 100 * d["decided"] / max(1, d["queries"])
                    row[f"{kind} cand/token"] = d["candidates"] / max(1, d["queries"])
            pre = wiki_q[:n_prefill]
            row["prefill ms"] = 1e3 * median_s(lambda: idx.search(pre), args.repeats)
            for b in (1, 8):
                row[f"decode B{b} ms"] = 1e3 * median_s(lambda: idx.search(wiki_q[100 : 100 + b]), args.repeats)
            if "near keys" in qs:
                near = qs["near keys"]
                row["near prefill ms"] = 1e3 * median_s(lambda: idx.search(near[:n_prefill]), args.repeats)
                for b in (1, 8):
                    row[f"near decode B{b} ms"] = 1e3 * median_s(lambda: idx.search(near[:b]), args.repeats)
            rows.append(row)
            print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
            del idx  # before the next spec is built: two 1M-key indexes at once do not fit in RAM
        del keys, want
    # the forward again, after the lookups: the faster of the two runs (a busy moment inflates one)
    again = forward_times(model, tok, prefill_text, args.repeats)
    fwd = {k: min(v, again[k]) for k, v in fwd.items()}
    print(f"SmolLM2 forward (min of start and end): prefill {fwd['prefill']:.1f} ms, "
          f"decode B=1 {fwd['decode_B1']:.1f} ms, B=8 {fwd['decode_B8']:.1f} ms")
    for row in rows:
        row["prefill % of fwd"] = 100 * row["prefill ms"] / fwd["prefill"]
        for b in (1, 8):
            row[f"decode B{b} % of fwd"] = 100 * row[f"decode B{b} ms"] / fwd[f"decode_B{b}"]
    cols = list(dict.fromkeys(k for row in rows for k in row))  # Flat rows lack the bound's columns
    print(markdown_table(rows, cols))
    out = Path(args.out)
    write_json(out / "bound.json", {"machine": machine(), "args": vars(args), "forward_ms": fwd,
                                    "queries": {k: int(q.shape[0]) for k, q in queries.items()}, "rows": rows})


if __name__ == "__main__":
    main()
