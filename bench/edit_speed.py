"""Edit throughput on one machine, in one run: keys by the reference recipe (every row run in
full) and with the prefix KV cache, and residuals; the keys of both paths compared.

    python3 bench/edit_speed.py --facts 256 --residual-facts 16 --whole-rows
    python3 bench/edit_speed.py --facts 256 --residual-facts 64 --residual-batch 16,32,64
    python3 bench/edit_speed.py --facts 64 --residual-facts 64 --unpacked
    python3 bench/edit_speed.py --facts 64 --residual-facts 64 --residual-batch 64 \
        --variant lr=0.5,steps=25 --variant lr=2,steps=14     # optimiser settings side by side
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from neuraldb import NeuralDB, load_facts, load_model
from neuraldb.bench.common import machine, markdown_table, run_main, write_json
from neuraldb.engine.config import EditConfig, from_mapping, to_mapping
from neuraldb.engine.keys import compute_keys
from neuraldb.data import source_file
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.engine.residuals import compute_residuals
from neuraldb.evaluation import counterfact_scores, zsre_scores

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--data", default="counterfact", help="a source name (counterfact, zsre) or a facts file")
    g.add_argument("--data-dir", help="root of the named sources (default: $NEURALDB_DATA, ../shared/data, the sample)")
    g.add_argument("--facts", type=int, default=256, help="facts whose keys are timed")
    g.add_argument("--residual-facts", type=int, default=16, help="facts whose residuals are timed (0: skip)")
    r = ap.add_argument_group("run")
    r.add_argument("--key-batch", type=int, default=None, help="rows per key batch (default: the config's)")
    r.add_argument("--residual-batch", default="", help="facts per residual batch, comma-separated (default: the config's)")
    r.add_argument("--whole-rows", action="store_true", help="also time residuals with whole rows run every step")
    r.add_argument("--unpacked", action="store_true",
                   help="also time residual suffixes run as one padded batch (rows not grouped by length)")
    r.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE,...",
                   help="residual config changes timed on the same facts (repeatable); each fact's final NLL "
                        "is compared with the first residual run's")
    r.add_argument("--score", action="store_true",
                   help="also score each residual run: a database of the residual facts (keys computed once) "
                        "and its efficacy, generalization, specificity and greedy efficacy / generalization")
    r.add_argument("--out", default="results/edit_speed")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    db = NeuralDB(model, tok, attach=False)
    cfg = db.config.replace(key_batch_size=args.key_batch)
    facts = load_facts(source_file(args.data, args.data_dir), limit=args.facts)
    prefixes = db.ensure_prefixes()
    rows, keys = [], {}
    for name, reuse in (("keys, reference (rows in full)", False), ("keys, prefix KV cache", True)):
        t0 = time.perf_counter()
        keys[reuse] = compute_keys(model, tok, facts, db.layer, prefixes, cfg, reuse_prefix_cache=reuse)
        dt = time.perf_counter() - t0
        rows.append({"what": name, "facts": len(facts), "seconds": dt, "facts_per_s": len(facts) / dt})
    diff = float((keys[True] - keys[False]).abs().max())
    res = {}
    batches = [int(b) for b in args.residual_batch.split(",")] if args.residual_batch else [cfg.residual_batch_size]
    runs = [("residuals, whole rows every step", False, False, batches[0], cfg)] if args.whole_rows else []
    runs += [("residuals, suffix, one padded batch", True, False, b, cfg) for b in batches] if args.unpacked else []
    if not args.variant:
        runs += [("residuals, suffix, rows grouped by length", True, True, b, cfg) for b in batches]
    runs += [(f"residuals, {v}", True, True, b, variant(cfg, v)) for v in args.variant for b in batches]
    first_nll = None
    score_keys = None
    for name, suffix, pack, batch, base in runs:
        if not args.residual_facts:
            break
        sub = facts[: args.residual_facts]
        t0 = time.perf_counter()
        res[(suffix, pack, batch, name)], stats = compute_residuals(
            model, tok, sub, db.layer, prefixes,
            base.replace(residual_suffix=suffix, residual_pack=pack, residual_batch_size=batch))
        dt = time.perf_counter() - t0
        first_nll = stats.nll if first_nll is None else first_nll
        if args.score and score_keys is None:  # one key set for every scored run
            score_keys = db.encode_keys(sub)
        quality = score(db, sub, score_keys, res[(suffix, pack, batch, name)], args.data) if args.score else {}
        rows.append({"what": name, "batch": batch, "facts": len(sub), "seconds": dt, "facts_per_s": len(sub) / dt,
                     "mean_final_nll": float(stats.nll.mean()), "p90_final_nll": float(stats.nll.quantile(0.9)),
                     "max_final_nll": float(stats.nll.max()), "facts_nll_le_first": int((stats.nll <= first_nll).sum()),
                     "facts_nll_over_0.05": int((stats.nll > 0.05).sum()), "facts_nll_over_0.5": int((stats.nll > 0.5).sum()),
                     "mean_steps": float(stats.steps.float().mean()), **quality})
    table = markdown_table(rows, ["what", "batch", "facts", "seconds", "facts_per_s", "mean_final_nll",
                                  "p90_final_nll", "max_final_nll", "facts_nll_le_first", "facts_nll_over_0.05",
                                  "facts_nll_over_0.5", "mean_steps"] + (list(QUALITY) if args.score else []))
    print(table)
    print(f"max |key(cache) - key(reference)| = {diff:.3g}")
    ref = [(name, r) for (suffix, pack, _, _), r in res.items() for name in ["whole rows" if not suffix else "one padded batch"]
           if not pack][:1]
    for (suffix, pack, batch, _), r in res.items():
        if pack and ref:
            rel = float(((r - ref[0][1]).norm(dim=1) / ref[0][1].norm(dim=1)).max())
            print(f"max relative |residual(grouped, batch {batch}) - residual({ref[0][0]})| = {rel:.3g}")
    write_json(Path(args.out) / "edit_speed.json", {"args": vars(args), "machine": machine(), "rows": rows,
                                                     "key_max_abs_diff": diff, "config": cfg.__dict__})


QUALITY = ("efficacy", "generalization", "specificity", "greedy_efficacy", "greedy_generalization")


def score(db: NeuralDB, facts: list, keys: torch.Tensor, residuals: torch.Tensor, data: str) -> dict[str, float]:
    """The facts' metrics with these keys and residuals: a fresh database over `db`'s model."""
    live = NeuralDB(db.model, db.tok, db.config)
    try:
        live.insert(list(range(len(facts))), facts, keys, residuals)
        kind = "zsre" if "zsre" in str(data) else "counterfact"
        scores = (zsre_scores if kind == "zsre" else counterfact_scores)(db.model, db.tok, facts).as_dict()
    finally:
        live.detach()
    return {k: scores[k] for k in QUALITY}


def variant(cfg: EditConfig, spec: str) -> EditConfig:
    """`cfg` with the changes "key=value,key=value" (values converted to each field's type)."""
    changes = dict(item.split("=", 1) for item in spec.split(",") if item)
    return from_mapping(EditConfig, {**to_mapping(cfg), **changes}, source=f"--variant {spec}")


if __name__ == "__main__":
    run_main(main, "bench/edit_speed.py")
