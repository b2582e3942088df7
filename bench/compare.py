"""NeuralDB beside MEMIT and AlphaEdit: the same model, the same facts, the same evaluation sample.

    python bench/compare.py --methods neuraldb,memit,alphaedit --facts 100,1000,2000

Facts are the first N CounterFact cases (`--data` as in bench/scale.py); at each checkpoint m the
first m facts are edited and a fixed sample of the first checkpoint's facts is scored, so every
row measures the same facts and shows what later edits do to earlier ones. NeuralDB puts the
facts in its database; MEMIT and AlphaEdit edit the weights in sequential batches (`--batch`,
100 as AlphaEdit's protocol) and the original weights are restored afterwards (checked).
Keys and residuals are shared through bench/scale.py's chunk cache: a linear editor's target
`z` is the unedited state at its last layer plus the fact's residual (MEMIT's `compute_z` at
that layer), so all three methods start from the same optimisation result."""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from neuraldb import Fact, NeuralDB, load_model
from neuraldb.baselines import RULES, LinearEditConfig, LinearEditor, second_moments
from neuraldb.bench.common import machine, markdown_table, run_main, save_figure, write_json, write_outputs
from neuraldb.bench.scale import get_facts, open_cache
from neuraldb.data import resolve
from neuraldb.engine.arch import model_device
from neuraldb.engine.config import from_mapping, load_yaml, to_mapping
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.evaluation import counterfact_scores, fluency, perplexity
from neuraldb.evaluation.texts import wikitext_passages

log = logging.getLogger("bench.compare")
METRICS = ("efficacy", "generalization", "specificity", "greedy_efficacy", "greedy_generalization", "fluency",
           "ppl")


def evaluate(model: Any, tok: Any, sample: Sequence[Fact], flu_prompts: Sequence[str], texts: Sequence[str],
             fluency_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    out = counterfact_scores(model, tok, sample).as_dict()
    out.pop("n")
    out["fluency"] = fluency(model, tok, flu_prompts, fluency_tokens) if fluency_tokens else float("nan")
    out["ppl"] = perplexity(model, tok, texts)
    out["eval_s"] = time.perf_counter() - t0
    return out


class Rows:
    """Finished (method, m) rows kept on disk, so a resumed run evaluates only what is left."""

    def __init__(self, root: Path, signature: dict[str, Any], linear: dict[str, Any]) -> None:
        self.root, self.signature, self.linear = root, signature, linear

    def _sig(self, method: str) -> dict[str, Any]:
        return {**self.signature, "linear": self.linear} if method in RULES else self.signature

    def _path(self, method: str, m: int) -> Path:
        layers = "-".join(map(str, self.linear["layers"])) if method in RULES else ""
        return self.root / f"{method}{'_L' + layers if layers else ''}_{m}.json"

    def get(self, method: str, m: int) -> dict[str, Any] | None:
        p = self._path(method, m)
        kept = json.loads(p.read_text()) if p.is_file() else {}
        return kept["row"] if kept.get("eval") == self._sig(method) else None

    def put(self, row: dict[str, Any]) -> None:
        write_json(self._path(row["method"], row["facts"]), {"eval": self._sig(row["method"]), "row": row})
        print(f"{row['method']} m={row['facts']}: " + ", ".join(f"{k} {row[k]:.1f}" for k in METRICS),
              file=sys.stderr, flush=True)


def run_neuraldb(db: NeuralDB, facts: Sequence[Fact], cache: Any, checkpoints: Sequence[int], rows: Rows,
                 score: Callable[[], dict[str, float]]) -> list[dict[str, Any]]:
    out, done, dev = [], 0, model_device(db.model)
    for m in checkpoints:
        keys, res = cache.keys(done, m), cache.residual_rows(done, m)
        db.insert(list(range(done, m)), facts[done:m], keys.to(dev), res.to(dev))
        done = m
        row = rows.get("neuraldb", m)
        if row is None:
            tp = cache.throughput(m)
            row = {"method": "neuraldb", "facts": m, **score(),
                   "edit_s_per_fact": 1 / tp["keys_per_s"] + 1 / tp["residuals_per_s"]}
            rows.put(row)
        out.append(row)
    db.remove(list(range(done)))
    return out


def run_linear(method: str, db: NeuralDB, facts: Sequence[Fact], cache: Any, checkpoints: Sequence[int],
               rows: Rows, score: Callable[[], dict[str, float]], lin: LinearEditConfig,
               moments: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
    kept = [rows.get(method, m) for m in checkpoints]
    if all(r is not None for r in kept):
        return kept  # type: ignore[return-value]
    editor = LinearEditor(db.model, db.tok, method, lin, db.config, db.ensure_prefixes(), moments, db.layer)
    res = cache.residual_rows(0, checkpoints[-1])
    z = editor.targets(facts[: checkpoints[-1]], res)  # on the unedited model
    z_s = editor.timings["states_s"]  # for every fact at once: charged per fact below
    res_s = 1 / cache.throughput(checkpoints[-1])["residuals_per_s"]
    out, done = [], 0
    try:
        for m, row in zip(checkpoints, kept):
            t0 = time.perf_counter()
            batches = editor.edit(facts[done:m], z[done:m])
            log.info("%s: %d facts edited in %.0f s; z error %s", method, m, time.perf_counter() - t0, batches[-1:])
            done = m
            if row is None:
                own = (sum(editor.timings.values()) - z_s) / m + z_s / checkpoints[-1]
                row = {"method": method, "facts": m, **score(), "edit_s_per_fact": res_s + own,
                       "own_s_per_fact": own, "z_error_last_batch": batches[-1]["z_error_first"],
                       **editor.rule.stats()}
                rows.put(row)
            out.append(row)
    finally:
        editor.restore()
    if not editor.is_restored():
        raise RuntimeError(f"{method}: the original weights were not restored")
    return out


def plot(pre: dict[str, float], rows: list[dict[str, Any]], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install neuraldb[plots])")
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))
    for ax, key in zip(axes, METRICS):
        for meth in methods:
            rs = [r for r in rows if r["method"] == meth]
            ax.plot([r["facts"] for r in rs], [r[key] for r in rs], marker="o", label=meth)
        ax.axhline(pre[key], ls="--", lw=1, color="grey", label="unedited")
        ax.set_xscale("log"); ax.set_title(key.replace("_", " ")); ax.set_xlabel("facts edited"); ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, out / "compare.png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--data", default="counterfact", help="as bench/scale.py --data")
    g.add_argument("--facts", default="100,1000,2000", help="comma-separated checkpoints (facts edited)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", help="root of the named data sources (default: $NEURALDB_DATA, ../shared/data, "
                                      "then the bundled sample)")
    e = ap.add_argument_group("methods")
    e.add_argument("--methods", default="neuraldb,memit,alphaedit", help=f"neuraldb and any of {sorted(RULES)}")
    e.add_argument("--config", help="LinearEditConfig YAML for MEMIT / AlphaEdit")
    e.add_argument("--layers", help="edited layers of MEMIT / AlphaEdit, comma-separated; the last must be "
                                    "NeuralDB's layer (default: the 5 layers ending there)")
    e.add_argument("--batch", type=int, help="sequential batch size of MEMIT / AlphaEdit (default 100)")
    e.add_argument("--chunk", type=int, default=16, help="facts per cached residual chunk")
    e.add_argument("--key-chunk", type=int, default=256, help="facts per cached key file")
    v = ap.add_argument_group("evaluation")
    v.add_argument("--eval-sample", type=int, default=100, help="facts scored at every checkpoint")
    v.add_argument("--fluency-sample", type=int, default=50)
    v.add_argument("--fluency-tokens", type=int, default=40)
    v.add_argument("--retention-texts", type=int, default=32, help="WikiText-2 passages for perplexity")
    r = ap.add_argument_group("run")
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", default="results/compare")
    r.add_argument("--cache", help="key/residual cache (default OUT/cache)")
    r.add_argument("--stats", help="second-moment cache (default OUT/stats)")
    r.add_argument("--rows", help="finished rows, reused when their settings match (default OUT/rows)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = sorted(int(x) for x in args.facts.split(","))
    methods = args.methods.split(",")
    unknown = [m for m in methods if m != "neuraldb" and m not in RULES]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from neuraldb, {', '.join(sorted(RULES))}")
    lin = load_yaml(LinearEditConfig, args.config) if args.config else LinearEditConfig()
    changes = {k: v for k, v in (("layers", args.layers and args.layers.split(",")), ("batch_size", args.batch)) if v}
    lin = from_mapping(LinearEditConfig, {**to_mapping(lin), **changes}, "--layers/--batch")

    model, tok = load_model(args.model, device=args.device)
    db = NeuralDB(model, tok)
    layers = lin.layer_range(db.layer)
    if layers[-1] != db.layer:
        raise SystemExit(f"--layers: the last edited layer must be NeuralDB's layer {db.layer} (its residuals are z)")
    facts, _, sources = get_facts(args.data, checkpoints[-1], args.seed, extra=1, data_dir=args.data_dir)
    cache = open_cache(Path(args.cache) if args.cache else out / "cache", db, args, facts)
    cache.fill_keys(db, facts)
    cache.fill_residuals(db, facts, range(len(facts)))

    first = facts[: checkpoints[0]]
    sample = random.Random(args.seed).sample(first, min(args.eval_sample, len(first)))
    flu_prompts = [p for f in sample for p in (f.generation_prompts[:1] or (f.text,))][: args.fluency_sample]
    texts = wikitext_passages(resolve("wikitext", args.data_dir).path, args.retention_texts)

    def score() -> dict[str, float]:
        return evaluate(model, tok, sample, flu_prompts, texts, args.fluency_tokens)

    signature = {k: getattr(args, k) for k in ("eval_sample", "fluency_sample", "fluency_tokens", "retention_texts")}
    signature.update(first_checkpoint=checkpoints[0], model=db.fingerprint(), data=args.data, seed=args.seed)
    rows = Rows(Path(args.rows) if args.rows else out / "rows", signature, {**to_mapping(lin), "layers": list(layers)})
    pre = rows.get("unedited", 0)
    if pre is None:
        with db.disabled():
            pre = {"method": "unedited", "facts": 0, **score(), "edit_s_per_fact": 0.0}
        rows.put(pre)

    results: list[dict[str, Any]] = []
    moments = None
    for method in methods:
        if method == "neuraldb":
            results += run_neuraldb(db, facts, cache, checkpoints, rows, score)
            continue
        db.detach()  # the weights alone carry these edits
        try:
            if moments is None:
                corpus = wikitext_passages(resolve("wikitext", args.data_dir).path, None, max_words=400, min_words=1)
                # every layer up to l* in one pass (any layer range ending there reuses the file)
                moments = second_moments(model, tok, corpus, range(db.layer + 1), lin.mom2_tokens,
                                         cache_dir=Path(args.stats) if args.stats else out / "stats")
            results += run_linear(method, db, facts, cache, checkpoints, rows, score, lin, moments)
        finally:
            db.attach()

    cols = ["method", "facts", *METRICS, "edit_s_per_fact"]
    table = markdown_table([pre] + results, cols)
    result = {"args": vars(args), "linear": to_mapping(lin), "layers": list(layers), "config": to_mapping(db.config),
              "model": db.fingerprint(), "machine": machine(), "sources": sources, "eval_sample": len(sample),
              "unedited": pre, "rows": results, "wall_s": time.perf_counter() - t_start}
    result["plot"] = plot(pre, results, out)
    write_outputs(out, "compare", result, f"bench/compare.py: {args.model}, {args.data}, NeuralDB layer {db.layer}, "
                                          f"MEMIT/AlphaEdit layers {list(layers)}", table)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_main(main, "bench/compare.py")
