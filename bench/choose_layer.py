"""Choose the gated layer and gamma for a model by measurement.

For each layer: keys of N CounterFact facts; then, per gamma, the share of edited prompts
whose own fact opens the gate (edit-open), the same on paraphrases (paraphrase-open), and the
share of tokens of unrelated text (neighbourhood prompts of facts not in the set) that open
any gate (false-open). Efficacy itself needs residuals: --efficacy N adds it for N facts.

    python bench/choose_layer.py --layers 3,6,9,12 --facts 300 --out results/choose_layer
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from neuraldb import NeuralDB, load_facts, load_model
from neuraldb.bench.common import machine, markdown_table, run_main, write_json
from neuraldb.engine.config import model_defaults
from neuraldb.data import source_file
from neuraldb.engine.models import DEFAULT_MODEL


@torch.no_grad()
def token_matches(db: NeuralDB, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(similarity, fact id) of every gateable token of each text."""
    out = []
    gate = db.gate
    for t in texts:
        enc = db.tok(t, return_tensors="pt")
        db.model(**enc)
        sims, ids, _ = gate.last
        keep = gate.last_mask[0]
        out.append((sims[0][keep].numpy(), ids[0][keep].numpy()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--data", default="counterfact", help="a source name (counterfact, zsre) or a facts file")
    g.add_argument("--data-dir", help="root of the named sources (default: $NEURALDB_DATA, ../shared/data, the sample)")
    g.add_argument("--facts", type=int, default=300)
    g.add_argument("--unrelated", type=int, default=300, help="facts whose neighbourhood prompts are the unrelated text")
    s = ap.add_argument_group("sweep")
    s.add_argument("--layers", default="3,6,9,12")
    s.add_argument("--gammas", default="0.6,0.65,0.7,0.75,0.8,0.85,0.9")
    s.add_argument("--efficacy", type=int, default=0, help="also edit this many facts per layer and score them")
    ap.add_argument("--out", default="results/choose_layer")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    all_facts = load_facts(source_file(args.data, args.data_dir), limit=args.facts + args.unrelated)
    facts, others = all_facts[: args.facts], all_facts[args.facts:]
    unrelated = [p for f in others for p in f.neighborhood]
    gammas = [float(x) for x in args.gammas.split(",")]
    rows = []
    base = model_defaults(args.model, model.config.model_type)
    for layer in [int(x) for x in args.layers.split(",")]:
        t0 = time.perf_counter()
        db = NeuralDB(model, tok, base.replace(layer=layer, gamma=-1.0))
        keys = db.encode_keys(facts)
        db.insert(list(range(len(facts))), facts, keys, torch.zeros(len(facts), db.d_res))
        own = token_matches(db, [f.text for f in facts])
        para = token_matches(db, [f.paraphrases[0] for f in facts if f.paraphrases])
        unrel = token_matches(db, unrelated)
        un_s = np.concatenate([s for s, _ in unrel])
        for gamma in gammas:
            edit_open = np.mean([bool(((s > gamma) & (i == k)).any()) for k, (s, i) in enumerate(own)])
            para_open = np.mean([bool(((s > gamma) & (i == k)).any()) for k, (s, i) in enumerate(para)])
            rows.append({"layer": layer, "gamma": gamma, "edit_open": float(edit_open),
                         "paraphrase_open": float(para_open), "false_open": float(np.mean(un_s > gamma)),
                         "unrelated_tokens": int(un_s.size)})
        db.detach()
        print(f"layer {layer}: {time.perf_counter() - t0:.1f}s", flush=True)
    table = markdown_table(rows, ["layer", "gamma", "edit_open", "paraphrase_open", "false_open"])
    print(table)
    out = Path(args.out)
    write_json(out / "choose_layer.json", {"config": vars(args), "machine": machine(), "rows": rows})
    (out / "choose_layer.md").write_text(table + "\n")


if __name__ == "__main__":
    run_main(main, "bench/choose_layer.py")
