"""Harm per open: what a fact's residual does to text it was not written for, per residual
recipe (MEMIT's KL on "{} is a" at the subject, and KL over more neutral contexts / positions).

    python3 bench/harm.py --facts 100 --recipes memit,span,contexts,contexts+span --out results/harm

For each recipe the same facts get residuals (keys are shared: the recipe only changes the
residual), then:
- **edit quality**: efficacy, generalization, specificity and greedy efficacy / generalization
  (CounterFact conventions) through the real gate;
- **mention harm**: held-out neutral sentences that mention the subject ("Last week a friend told
  me about {}." ...), through the real gate: mean KL(unedited || edited) per token from the
  subject's last token on, and the share of those tokens whose greedy next token changed;
- **spurious-open harm**: each fact's residual forced in at random tokens of WikiText-2 passages
  (what a gate that opens on a look-alike token does): KL at that token and mean KL over the
  next 16 tokens, top-1 changes likewise.
The held-out sentences share no template with the training contexts."""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neuraldb import NeuralDB, load_model
from neuraldb.bench.common import machine, markdown_table, run_main, write_outputs
from neuraldb.data import resolve
from neuraldb.engine.config import EditConfig, load_yaml, to_mapping
from neuraldb.engine.facts import load_facts
from neuraldb.engine.hooks import Trace
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.engine.tokens import encode_with_subject
from neuraldb.evaluation import counterfact_scores
from neuraldb.evaluation.texts import wikitext_passages

# neutral contexts a recipe may train on (beside MEMIT's "{} is a")
TRAIN_CONTEXTS = ("I heard about {} yesterday, and", "{} was", "The story of {} begins", "Some people say that {}")
# held-out: what the mention harm is measured on (no template in common with the above)
HELD_OUT = ("Last week a friend told me about {}.", "{} appeared in the newspaper this morning, and",
            "There is a long article about {} that I", "Nobody expected {} to come up, but")
RECIPES: dict[str, dict[str, Any]] = {
    "memit": {},
    "kl4": {"kl_factor": 0.25},
    "span": {"kl_span": "all"},
    "contexts": {"kl_contexts": TRAIN_CONTEXTS},
    "contexts+span": {"kl_contexts": TRAIN_CONTEXTS, "kl_span": "all"},
    "contexts+span+kl4": {"kl_contexts": TRAIN_CONTEXTS, "kl_span": "all", "kl_factor": 0.25},
}
FOLLOW = 16  # tokens after a forced open whose distributions are compared


def kl_and_flip(base: torch.Tensor, edited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position KL(base || edited) and whether the argmax changed: (..., V) -> (...), (...)."""
    lb, le = F.log_softmax(base.float(), -1), F.log_softmax(edited.float(), -1)
    return (lb.exp() * (lb - le)).sum(-1), base.argmax(-1) != edited.argmax(-1)


@torch.no_grad()
def mention_harm(db: NeuralDB, facts: list, batch: int = 16) -> dict[str, float]:
    tok, model = db.tok, db.model
    rows = [(encode_with_subject(tok, "", t, f.subject)) for f in facts for t in HELD_OUT]
    kls, flips = [], []
    for i in range(0, len(rows), batch):
        encs = rows[i:i + batch]
        T = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), T), tok.pad_token_id, dtype=torch.long)
        am = torch.zeros_like(ids)
        for b, e in enumerate(encs):
            ids[b, :len(e.ids)], am[b, :len(e.ids)] = torch.tensor(e.ids), 1
        with db.disabled():
            base = model(input_ids=ids, attention_mask=am).logits  # (B, T, V)
        edited = model(input_ids=ids, attention_mask=am).logits
        kl, flip = kl_and_flip(base, edited)  # (B, T)
        for b, e in enumerate(encs):
            sl = slice(e.subject_last, len(e.ids))
            kls.append(kl[b, sl])
            flips.append(flip[b, sl])
    kl, flip = torch.cat(kls), torch.cat(flips)
    return {"mention_kl": float(kl.mean()), "mention_flip": float(flip.float().mean())}


@torch.no_grad()
def spurious_harm(db: NeuralDB, residuals: torch.Tensor, passages: list[list[int]], rng: random.Random,
                  per_fact: int = 2, batch: int = 16) -> dict[str, float]:
    """Each fact's residual added at random tokens of passages, the gate bypassed (closed)."""
    model = db.model
    path = db.add_path
    jobs = [(f, rng.randrange(len(passages)), None) for f in range(len(residuals)) for _ in range(per_fact)]
    jobs = [(f, p, rng.randrange(1, len(passages[p]) - FOLLOW - 1)) for f, p, _ in jobs]
    at_open, after, flip_open, flip_after = [], [], [], []
    for i in range(0, len(jobs), batch):
        part = jobs[i:i + batch]
        T = max(len(passages[p]) for _, p, _ in part)
        ids = torch.full((len(part), T), db.tok.pad_token_id, dtype=torch.long)
        am = torch.zeros_like(ids)
        for b, (_, p, _) in enumerate(part):
            ids[b, :len(passages[p])], am[b, :len(passages[p])] = torch.tensor(passages[p]), 1
        rows = torch.arange(len(part))
        pos = torch.tensor([q for _, _, q in part])
        r = residuals[torch.tensor([f for f, _, _ in part])]  # (B, d)

        def add(out: torch.Tensor) -> torch.Tensor:
            return out.index_put((rows, pos), r.to(out.dtype), accumulate=True)

        with db.disabled():
            base = model(input_ids=ids, attention_mask=am).logits  # (B, T, V)
            with Trace(model, path, retain_input=False, edit_output=add):
                edited = model(input_ids=ids, attention_mask=am).logits
        kl, flip = kl_and_flip(base, edited)  # (B, T)
        for b, q in enumerate(pos.tolist()):
            at_open.append(float(kl[b, q]))
            flip_open.append(float(flip[b, q]))
            after.append(float(kl[b, q + 1:q + 1 + FOLLOW].mean()))
            flip_after.append(float(flip[b, q + 1:q + 1 + FOLLOW].float().mean()))
    return {"spurious_kl_at": float(np.mean(at_open)), "spurious_kl_after": float(np.mean(after)),
            "spurious_flip_at": float(np.mean(flip_open)), "spurious_flip_after": float(np.mean(flip_after))}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and facts")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--config", help="EditConfig YAML the recipes start from (default: the model's defaults)")
    g.add_argument("--facts", type=int, default=100, help="CounterFact facts (the first N)")
    g.add_argument("--data-dir")
    g.add_argument("--recipes", default="memit,span,contexts,contexts+span", help=f"of {sorted(RECIPES)}")
    g = p.add_argument_group("harm")
    g.add_argument("--texts", type=int, default=32, help="WikiText-2 passages for the spurious opens")
    g.add_argument("--per-fact", type=int, default=2, help="forced opens per fact")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("results/harm"))
    args = p.parse_args(argv)
    args.recipes = args.recipes.split(",")
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {unknown}; known: {sorted(RECIPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    t_start = time.perf_counter()
    facts = load_facts(resolve("counterfact", args.data_dir).path, limit=args.facts)
    model, tok = load_model(args.model)
    base = NeuralDB(model, tok, load_yaml(EditConfig, args.config) if args.config else None, attach=False)
    pre = counterfact_scores(model, tok, facts).as_dict()  # nothing attached: the unedited model
    keys = base.encode_keys(facts)
    texts = wikitext_passages(resolve("wikitext", args.data_dir).path, args.texts)
    passages = [tok(t)["input_ids"][:96] for t in texts]
    passages = [p for p in passages if len(p) > FOLLOW + 8]
    rows = []
    for name in args.recipes:
        cfg = base.config.replace(**RECIPES[name])
        db = NeuralDB(model, tok, cfg)
        db.prefixes = base.prefixes
        t0 = time.perf_counter()
        res = db.encode_residuals(facts)
        res_s = time.perf_counter() - t0
        db.insert(list(range(len(facts))), facts, keys, res)
        scores = counterfact_scores(model, tok, facts).as_dict()
        row = {"recipe": name, **{k: scores[k] for k in ("efficacy", "generalization", "specificity",
                                                          "greedy_efficacy", "greedy_generalization")},
               **mention_harm(db, facts), **spurious_harm(db, res, passages, random.Random(args.seed), args.per_fact),
               "residual_norm": float(res.norm(dim=1).mean()), "final_nll": float(db.last_stats.nll.mean()),
               "residuals_per_s": len(facts) / res_s}
        rows.append(row)
        db.detach()
        print(f"{name}: eff {row['efficacy']:.1f} greedy {row['greedy_efficacy']:.1f} mention KL "
              f"{row['mention_kl']:.4f} spurious KL after {row['spurious_kl_after']:.4f}", file=sys.stderr, flush=True)
    rows.insert(0, {"recipe": "unedited", **{k: pre[k] for k in ("efficacy", "generalization", "specificity",
                                                                  "greedy_efficacy", "greedy_generalization")}})
    cols = ["recipe", "efficacy", "generalization", "specificity", "greedy_efficacy", "greedy_generalization",
            "mention_kl", "mention_flip", "spurious_kl_at", "spurious_kl_after", "spurious_flip_at",
            "spurious_flip_after", "residual_norm", "final_nll", "residuals_per_s"]
    table = markdown_table(rows, cols)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "config": to_mapping(base.config),
              "recipes": {k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in RECIPES[k].items()}
                          for k in args.recipes},
              "held_out": HELD_OUT, "machine": machine(), "rows": rows, "wall_s": time.perf_counter() - t_start}
    write_outputs(args.out, "harm", result, f"Harm per open ({len(facts)} CounterFact facts)", table)


if __name__ == "__main__":
    run_main(main, "bench/harm.py")
