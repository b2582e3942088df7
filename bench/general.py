"""General ability as the NeuralDB paper measures it (its Figure 1 right): the six
lm-evaluation-harness tasks (MMLU, SciQ, CommonsenseQA, ARC-Challenge, LAMBADA, WSC273),
zero-shot, for the unedited model and with databases of growing size, beside MEMIT and AlphaEdit.

    python bench/general.py --sizes 1000,10000,100000 --data counterfact,synthetic \\
        --scale-out results/scale-100k     # shares bench/scale.py's key cache (same facts, same keys)

The databases are bench/scale.py's (same facts, seed and keys, read from its chunk cache).
Residuals are computed lazily for the facts whose gate opens on task text, which is exact:
where no gate opens on a request its score is the unedited model's (evaluation/general.py),
so those come from the unedited run's score cache and only requests with an open are scored
again. Every open is listed (task, document, token, fact, whether the text names the subject).
MEMIT and AlphaEdit (bench/compare.py's editors, sequential batches of 100) edit the weights,
so every request is scored again for them. Scores are cached per state (OUT/scores/), so an
interrupted run resumes; `--limit N` takes the first N documents of each task."""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from neuraldb import EditConfig, NeuralDB, load_model
from neuraldb.baselines import RULES, LinearEditConfig, LinearEditor, second_moments
from neuraldb.bench.common import machine, markdown_table, run_main, save_figure, write_json, write_outputs
from neuraldb.bench.scale import Residuals, get_facts, open_cache
from neuraldb.data import resolve
from neuraldb.engine.arch import model_device
from neuraldb.engine.config import load_yaml, to_mapping
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.evaluation.below import BelowCache
from neuraldb.evaluation.general import (MAIN_METRIC, PRECISIONS, SCORERS, TASKS, ProbeCache, ScoreCache, TaskScore,
                                         evaluate, make_lm, opens_table, resolve_precision, summary_rows)
from neuraldb.evaluation.texts import wikitext_passages

log = logging.getLogger("bench.general")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--data", default="counterfact,synthetic", help="facts, as bench/scale.py --data")
    g.add_argument("--sizes", default="1000,10000,100000", help="database sizes (facts), comma-separated")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", help="root of the named data sources (facts and the six tasks)")
    e = ap.add_argument_group("editing")
    e.add_argument("--config", help="EditConfig YAML (default: the model's defaults)")
    e.add_argument("--chunk", type=int, default=64, help="as bench/scale.py --chunk (part of its cache's recipe)")
    e.add_argument("--key-chunk", type=int, default=256, help="as bench/scale.py --key-chunk")
    e.add_argument("--subject-groups", choices=["on", "off"], default="on")
    e.add_argument("--scale-out", default="results/scale-general",
                   help="a bench/scale.py --out whose cache holds (or will hold) the keys and residuals")
    b = ap.add_argument_group("baselines")
    b.add_argument("--baselines", default="memit,alphaedit", help=f"any of {sorted(RULES)}, or 'none'")
    b.add_argument("--baseline-sizes", default="100,1000", help="facts edited into the weights")
    b.add_argument("--stats", help="second-moment cache of the baselines (default OUT/stats)")
    v = ap.add_argument_group("evaluation")
    v.add_argument("--tasks", default=",".join(TASKS))
    v.add_argument("--limit", type=int, help="the first N documents of each task (a quick run)")
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="bf16-above: blocks above the gated layer and the LM head in bf16, the gate in float32 "
                        "(auto: where the device multiplies bf16 fast)")
    v.add_argument("--below", default="on", choices=("on", "off"),
                   help="on: keep what enters the gated block for every input scored or probed (OUT/scores/"
                        "MODEL/below/), so that every state's gate probe starts at that block "
                        "(evaluation/below.py); off: every probe runs from the embeddings")
    v.add_argument("--scorer", default="neuraldb", choices=SCORERS,
                   help="neuraldb: the LM head only where a continuation is read; harness: HFLM's own loop "
                        "(to time against; use another --out)")
    v.add_argument("--share-prefixes", default="on", choices=("on", "off"),
                   help="on: ungated inputs that share a prefix of 16+ tokens run it once (evaluation/prefix.py: "
                        "a choice's context, MMLU's opening sentence); off: every input runs whole")
    r = ap.add_argument_group("run")
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", default="results/general")
    r.add_argument("--report", action="store_true", help="rebuild OUT's table, JSON and plot from OUT/states/*.json "
                                                         "(the states scored so far), scoring nothing")
    return ap.parse_args(argv)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def state_run(name: str, lm: Any, args: argparse.Namespace, out: Path, t0: float, key: str) -> dict[str, Any]:
    """Score one model state, or keep OUT/states/NAME.json where it was scored under the same `key`
    (model, precision, tasks, limit and database recipe): a resumed run neither re-times a state
    nor overwrites the seconds its first scoring took with those of a replay from the caches."""
    path = out / "states" / f"{name}.json"
    if path.is_file():
        kept = read_state(path)
        if kept.get("key") == key:
            log.warning("%s: kept %s (scored in %.0f s)", name, path, kept["seconds"])
            return kept
    tasks = args.tasks.split(",")
    res = evaluate(lm, tasks, args.limit, args.data_dir)
    res["seconds"] = time.perf_counter() - t0
    res["reused"], res["rescored"], res["tokens"] = lm.reused, lm.rescored, lm.tokens
    res["probe_s"], res["probe_inputs"] = lm.probe_seconds, list(lm.probe_inputs)
    res["opens"] = list(opens_table(getattr(lm, "opens", [])))
    write_json(path, {"key": key, "scores": {t: {m: vars(s) for m, s in per.items()} for t, per in res["scores"].items()},
                                                "seconds": res["seconds"], "reused": res["reused"],
                                                "rescored": res["rescored"], "tokens": res["tokens"],
                                                "probe_s": res["probe_s"], "probe_inputs": res["probe_inputs"],
                                                "origins": res["origins"],
                                                "opens": res["opens"],
                                                "per_doc": res["per_doc"]})
    log.warning("%s: %s in %.0f s (%d requests reused, %d scored with the gate, %d opens; gate probe %.0f s, "
                "%d inputs from the embeddings, %d from kept below-l* rows)", name,
                {t: round(100 * per[MAIN_METRIC[t]].value, 2) for t, per in res["scores"].items()},
                res["seconds"], res["reused"], res["rescored"], len(res["opens"]), res["probe_s"],
                *res["probe_inputs"])
    return res


PLOT_SPAN = 5.0  # points of average accuracy shown at least either side of the unedited model


def plot(rows: list[dict[str, Any]], out: Path) -> str | None:
    """Average general ability against the number of edits, one line per method (Figure 1 right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    avg = [r for r in rows if r["task"] == "average"]
    base = next((r["score"] for r in avg if r["method"] == "unedited"), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in avg} - {"unedited"}):
        pts = sorted((r["facts"], r["score"]) for r in avg if r["method"] == method)
        ax.plot([0] + [p[0] for p in pts], [base] + [p[1] for p in pts], marker="o", label=method)
    if base is not None:
        ax.axhline(base, ls="--", c="grey", lw=1, label="unedited")
        # at least 5 points either side of unedited: autoscaling would blow a 0.01-point change
        # up to the plot's full height
        scores = [r["score"] for r in avg]
        ax.set_ylim(min(scores + [base - PLOT_SPAN]) - 1, max(scores + [base + PLOT_SPAN]) + 1)
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xlim(left=0)
    ax.set_xlabel("facts edited")
    ax.set_ylabel("average accuracy of the six tasks (%)")
    ax.legend()
    return save_figure(fig, out / "general.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    if args.report:
        return report(load_states(out), out, {"args": vars(args), "machine": machine(), "report_of": str(out)},
                      f"bench/general.py --report: {out}")
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    baselines = [] if args.baselines == "none" else args.baselines.split(",")
    unknown = [m for m in baselines if m not in RULES]
    if unknown:
        raise SystemExit(f"--baselines: unknown {unknown}; choose from {sorted(RULES)} or none")
    bsizes = sorted(int(s) for s in args.baseline_sizes.split(",") if s) if baselines else []
    model, tok = load_model(args.model, device=args.device)
    cfg = load_yaml(EditConfig, args.config) if args.config else None
    db = NeuralDB(model, tok, cfg)
    db.config = db.config.replace(subject_groups=False)  # groups get their joint residual in Residuals
    n = max(sizes + bsizes, default=0)  # 0: the unedited model alone
    facts, _, sources = get_facts(args.data, n, args.seed, extra=1, data_dir=args.data_dir) if n else ([], None, {})
    if n:
        cache = open_cache(Path(args.scale_out) / "cache", db, args, facts)
        cache.fill_keys(db, facts)
        resid = Residuals(db, cache, facts, groups=args.subject_groups == "on")
    # score caches are keyed by request tokens; a folder per model, and per database recipe inside it
    precision = resolve_precision(args.precision, model_device(model))
    scores = out / "scores" / digest(db.fingerprint()) / ("" if precision == "float32" else precision)
    below = BelowCache.for_db(out / "scores" / digest(db.fingerprint()) / "below" /
                              digest({"layer": db.layer, "context": db.space.attn_paths}), db) \
        if args.below == "on" else None
    score = functools.partial(make_lm, model, tok, batch_size=args.batch_size, precision=precision, layer=db.layer,
                              scorer=args.scorer, below=below, share_prefixes=args.share_prefixes == "on")
    recipe = digest({"config": to_mapping(db.config), "data": args.data, "seed": args.seed,
                     "groups": args.subject_groups, "first_ids": [f.id for f in facts[:3]]})
    unedited_cache = ScoreCache(scores / "unedited.jsonl")
    base_key = {"model": db.fingerprint(), "precision": precision, "tasks": args.tasks, "limit": args.limit}
    if args.scorer != "neuraldb":  # (states scored before the option existed keep their key)
        base_key["scorer"] = args.scorer

    states: dict[str, dict[str, Any]] = {}

    def written() -> dict[str, Any]:  # the table so far, after every state
        return report(states, out, {"args": vars(args), "precision": precision, "config": to_mapping(db.config),
                                    "model": db.fingerprint(), "machine": machine(), "sources": sources,
                                    "wall_s": time.perf_counter() - t_start},
                      f"bench/general.py: {args.model}, tasks {args.tasks}, limit {args.limit or 'all'}, "
                      f"NeuralDB layer {db.layer}, {precision}")

    t0 = time.perf_counter()
    with db.disabled():
        states["unedited"] = state_run("unedited", score(unedited=unedited_cache), args, out, t0,
                                       digest(base_key))
    written()
    done = 0
    for m in sizes:
        db.insert(list(range(done, m)), facts[done:m], cache.keys(done, m).to(args.device), None)
        done = m
        t0 = time.perf_counter()
        lm = score(db=db, unedited=unedited_cache, edited=ScoreCache(scores / recipe / f"neuraldb-{m}.jsonl"),
                   probes=ProbeCache(scores / recipe / f"neuraldb-{m}.probe.jsonl"),
                   on_open=resid.load)
        states[f"neuraldb {m}"] = state_run(f"neuraldb-{m}", lm, args, out, t0,
                                            digest({**base_key, "recipe": recipe, "facts": m}))
        written()

    if baselines:
        lin = LinearEditConfig()
        layers = lin.layer_range(db.layer)
        cache.fill_residuals(db, facts, range(bsizes[-1]))
        db.detach()  # the weights alone carry these edits
        try:
            corpus = wikitext_passages(resolve("wikitext", args.data_dir).path, None, max_words=400, min_words=1)
            moments = second_moments(model, tok, corpus, range(db.layer + 1), lin.mom2_tokens,
                                     cache_dir=Path(args.stats) if args.stats else out / "stats")
            for method in baselines:
                editor = LinearEditor(model, tok, method, lin, db.config, db.ensure_prefixes(), moments, db.layer)
                z = editor.targets(facts[: bsizes[-1]], cache.residual_rows(0, bsizes[-1]))
                edited = 0
                try:
                    for m in bsizes:
                        editor.edit(facts[edited:m], z[edited:m])
                        edited = m
                        t0 = time.perf_counter()
                        lm = score(unedited=ScoreCache(scores / recipe / f"{method}-{m}.jsonl"))
                        key = digest({**base_key, "recipe": recipe, "method": method, "edits": m,
                                      "linear": to_mapping(lin)})
                        states[f"{method} {m}"] = state_run(f"{method}-{m}", lm, args, out, t0, key)
                        written()
                finally:
                    editor.restore()
                if not editor.is_restored():
                    raise RuntimeError(f"{method}: the original weights were not restored")
        finally:
            db.attach()

    return written()


def report(states: dict[str, dict[str, Any]], out: Path, head: dict[str, Any], title: str) -> dict[str, Any]:
    """The table (markdown), JSON and plot of the states scored so far (written after every state,
    so a run stopped between states leaves its table)."""
    rows = summary_rows(states)
    for r in rows:
        method, _, m = r["state"].partition(" ")
        r["method"], r["facts"] = method, int(m) if m else 0
    for name, res in states.items():
        for r in rows:
            if r["state"] == name and r["task"] == "average":
                r.update(seconds=round(res["seconds"]), reused=res["reused"], rescored=res["rescored"],
                         open_share=f"{100 * len(res['opens']) / res['tokens']:.4f}%" if res.get("tokens") else "",
                         opens=len(res["opens"]), opens_named=sum(o["named"] for o in res["opens"]))
    cols = ["method", "facts", "task", "metric", "score", "stderr", "delta", "delta_stderr", "n", "perplexity", "seconds",
            "reused", "rescored", "opens", "opens_named", "open_share"]
    table = markdown_table(rows, cols)
    first = next(iter(states.values()), {})
    result = {**head, "data": first.get("origins", {}), "rows": rows,
              "opens": {k: v["opens"] for k, v in states.items() if v["opens"]}}
    result["plot"] = plot(rows, out)
    write_outputs(out, "general", result, title, table)
    return result


def load_states(out: Path) -> dict[str, dict[str, Any]]:
    """OUT/states/*.json as scored states (the unedited one first), for --report."""
    states: dict[str, dict[str, Any]] = {}
    files = sorted((out / "states").glob("*.json"), key=lambda p: (p.stem != "unedited", p.stem.split("-")[0],
                                                                    int(p.stem.split("-")[-1]) if "-" in p.stem else 0))
    for path in files:
        states["unedited" if path.stem == "unedited" else path.stem.replace("-", " ", 1)] = read_state(path)
    if "unedited" not in states:
        raise SystemExit(f"--report: no scored states under {out / 'states'}")
    return states


def read_state(path: Path) -> dict[str, Any]:
    """One OUT/states/*.json as a scored state (TaskScores, per-document scores keyed by int)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["scores"] = {t: {m: TaskScore(**v) for m, v in per.items()} for t, per in raw["scores"].items()}
    raw["per_doc"] = {t: {int(i): v for i, v in per.items()} for t, per in raw.get("per_doc", {}).items()}
    return raw


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("neuraldb.engine.progress").setLevel(logging.INFO)  # the gate probe's rate and time left
    run_main(main, "bench/general.py")
