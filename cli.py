"""The `neuraldb` command: edit, ask, info, eval, build, serve, calibrate. Errors are one clear line and exit code 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .builder import BuildError
from .data import source_file
from .engine import ConfigError, DatabaseError, EditConfig, FactError, NeuralDB, load_facts, load_model
from .engine.arch import UnsupportedModelError
from .engine.models import DEFAULT_MODEL, ModelLoadError
from .engine.persistence import read_db, read_meta
from .engine.profile import load_config
from .evaluation import counterfact_scores, retention, zsre_scores
from .index import IndexError_

log = logging.getLogger("neuraldb")
USER_ERRORS = (ConfigError, DatabaseError, FactError, ModelLoadError, UnsupportedModelError, IndexError_,
               FileNotFoundError, KeyError, BuildError)


def _edit_config(args: argparse.Namespace) -> EditConfig | None:
    return load_config(args.config) if args.config else None


def _summary(db: NeuralDB, facts: Sequence, kind: str) -> dict:
    score = zsre_scores if kind == "zsre" else counterfact_scores
    with db.disabled():
        pre = score(db.model, db.tok, facts).as_dict()
    post = score(db.model, db.tok, facts).as_dict()
    return {"pre": pre, "post": post}


def cmd_edit(args: argparse.Namespace) -> int:
    facts = load_facts(source_file(args.facts, args.data_dir), limit=args.limit)  # before the model: fail fast
    model, tok = load_model(args.model)
    _ensure_profile(args, model, tok)
    db = NeuralDB(model, tok, _edit_config(args), layer=args.layer, gamma=args.gamma, index=args.index)
    print(f"editing {len(facts)} facts into {args.model} at layer {db.layer} (gamma {db.config.gamma}, "
          f"index {db.config.index})", file=sys.stderr)
    t0 = time.perf_counter()
    db.add(facts)
    took = time.perf_counter() - t0
    out = db.save(args.out)
    kind = facts[0].kind
    summary = {"facts": len(facts), "seconds": round(took, 1), "keys_per_s": round(len(facts) / db.timings["keys_s"], 2),
               "residuals_per_s": round(len(facts) / db.timings["residuals_s"], 3), "db": str(out)}
    if not args.no_eval:
        summary.update(_summary(db, facts, kind))
        hits = sum(db.generate(f.text, 8).strip().startswith(f.target_new) for f in facts)
        summary["greedy_new_target"] = f"{hits}/{len(facts)}"
    print(json.dumps(summary, indent=2))
    return 0


def _open_db(args: argparse.Namespace) -> NeuralDB:
    meta = read_meta(Path(args.db), verify_files=False)  # fails early, naming a missing or damaged config
    model, tok = load_model(args.model or meta["model"].get("name") or DEFAULT_MODEL)
    return NeuralDB.load(args.db, model, tok, index=getattr(args, "index", None))


def cmd_ask(args: argparse.Namespace) -> int:
    db = _open_db(args)
    answer = db.generate(args.prompt, args.max_new_tokens, record_hits=True)
    print(args.prompt + answer)
    fired = {h.fact_id for h in db.generate_hits}
    for fid in sorted(fired):
        f = db.facts[fid]
        sims = [h.similarity for h in db.generate_hits if h.fact_id == fid]
        print(f"  fired: fact {fid} ({f.subject!r}: {f.text} -> {f.target_new}) cos={max(sims):.3f}", file=sys.stderr)
    if not fired:
        print("  fired: none (the unedited model answered)", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Verify every file (checksums, headers, shapes, ids) without loading a model, then describe."""
    import yaml

    stored = read_db(Path(args.db))
    meta = stored.meta
    ids = sorted(stored.facts)
    info = {"verified": "ok: checksums, tensor headers, dims and ids of every file agree",
            "facts": len(ids), "ids": f"{ids[0]}..{ids[-1]}" if ids else "none", "next_id": stored.next_id,
            "index": stored.index.spec, "model": meta["model"], "config": meta["config"],
            "files": {name: entry["bytes"] for name, entry in meta["files"].items()}}
    print(yaml.safe_dump(info, sort_keys=False))
    return 0


def _general(db: NeuralDB, args: argparse.Namespace) -> dict:
    """The six lm-eval tasks for the unedited model and with the database (evaluation/general.py)."""
    from .evaluation.general import (TASKS, HarnessMissing, ScoreCache, evaluate, make_lm, markdown, opens_table,
                                     summary_rows)

    tasks = args.tasks.split(",") if args.tasks else list(TASKS)  # an unknown one: ConfigError from task_dir
    scores = ScoreCache()  # the unedited scores, reused for every request on which no gate opens (exact)
    try:
        with db.disabled():
            plain = evaluate(make_lm(db.model, db.tok, batch_size=args.batch_size, unedited=scores,
                                     precision=args.precision, layer=db.layer), tasks, args.limit, args.data_dir)
        lm = make_lm(db.model, db.tok, db, batch_size=args.batch_size, unedited=scores, precision=args.precision)
        edited = evaluate(lm, tasks, args.limit, args.data_dir)
    except HarnessMissing as exc:
        raise ConfigError(str(exc)) from None
    rows = summary_rows({"unedited": plain, f"{len(db)} facts": edited})
    print(markdown(rows))
    opens = list(opens_table(lm.opens))
    print(f"gate opens on task text: {len(opens)} ({sum(o['named'] for o in opens)} name the fact's subject); "
          f"requests re-scored with the gate: {lm.rescored}, reused from the unedited run: {lm.reused}", file=sys.stderr)
    return {"general": rows, "opens": opens, "data": plain["origins"], "limit": args.limit, "precision": lm.precision,
            "rescored": lm.rescored, "reused": lm.reused}


def cmd_eval(args: argparse.Namespace) -> int:
    db = _open_db(args)
    if args.general:
        result = _general(db, args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    facts = load_facts(source_file(args.facts, args.data_dir), limit=args.limit) if args.facts else list(db.facts.values())
    kind = args.kind or facts[0].kind
    result = _summary(db, facts, kind)
    texts = [p for f in facts for p in f.neighborhood][: args.retention_texts]
    if texts:
        result["retention"] = retention(db, texts).as_dict()
    print(json.dumps(result, indent=2))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .builder import build

    _ensure_profile(args)
    summary = build(source_file(args.facts, args.data_dir), args.out, args.model, chunk=args.chunk,
                    config=_edit_config(args), layer=args.layer, gamma=args.gamma, index=args.index)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve.server import serve
    except ImportError as exc:
        raise ConfigError(f"neuraldb serve needs the 'serve' extra (pip install 'neuraldb[serve]'): {exc}") from exc
    if not Path(args.db).exists():  # a new database: its model's profile is needed now
        _ensure_profile(args)
    return serve(args.db, args.model, args.host, args.port, args.api_key, args.read_only, _edit_config(args),
                 max_batch=args.max_batch, checkpoint_records=args.checkpoint_records,
                 checkpoint_interval_s=args.checkpoint_interval, max_body_bytes=args.max_body_bytes,
                 max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                 max_facts_per_request=args.max_facts_per_request)


CALIBRATION_FACTS_FROM = 10_000  # rows of a one-file source from here on: no evaluation measures them
CALIBRATION_TEXTS_FROM = 400  # WikiText-2 passages from here on: retention reads the first ones


def _calibration_material(args: argparse.Namespace, need: int) -> tuple[list, list[str], list[str], str]:
    """Calibration facts, ordinary passages and the gate map's own passages (the ones after
    those), from fixed ranges no evaluation reads (the tail of what exists where a source is
    smaller, as the bundled sample is), and a line saying which."""
    from .data import is_source, resolve
    from .evaluation.texts import wikitext_passages

    start = CALIBRATION_FACTS_FROM
    if is_source(args.data):  # a source in splits (CounterFact: edit, then train): the last split, whole
        files = resolve(args.data, args.data_dir).files
        path, start = files[-1], (0 if len(files) > 1 else start)
    else:
        path = Path(args.data)
    pool = load_facts(path, limit=start + need)
    f0 = min(start, max(0, len(pool) - need))
    facts = pool[f0 : f0 + need]
    if len(facts) < need:
        raise ConfigError(f"--facts/--residual-facts/--confirm-facts: calibration needs {need} facts, "
                          f"{path} holds {len(pool)}")
    wiki = resolve("wikitext", args.data_dir).path
    try:
        passages = wikitext_passages(wiki, CALIBRATION_TEXTS_FROM + 2 * args.texts)
    except ValueError:  # a smaller file (the bundled sample): its tail, below
        passages = wikitext_passages(wiki, None)
    t0 = min(CALIBRATION_TEXTS_FROM, max(0, len(passages) - 2 * args.texts))
    half = min(args.texts, (len(passages) - t0) // 2)
    texts, fit_texts = passages[t0 : t0 + half], passages[t0 + half : t0 + 2 * half]
    return facts, texts, fit_texts, f"facts: {path.name} rows {f0}-{f0 + len(facts) - 1}; texts: {wiki.name} " \
                                    f"passages {t0}-{t0 + half - 1} (the gate map's: {t0 + half}-{t0 + 2 * half - 1})"


def calibrate_into(args: argparse.Namespace, model: Any, tok: Any, install: bool) -> Path:
    """Run the calibrator with `args` (the calibrate command's options) on a loaded model; write
    the report and profile to args.out, and with `install` to the model cache's profiles/ (found
    by the model's name from then on, for these weights only). Returns where the profile went."""
    from datetime import date

    from .engine.arch import weights_sha256
    from .engine.calibrate import CalibrateConfig, Calibrator, markdown_report
    from .engine.editor import model_name
    from .engine.models import cache_dir
    from .engine.profile import PROFILE_DIR

    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else \
        tuple(sorted({max(1, args.facts // 10), max(1, args.facts // 3), args.facts}))
    cfg = CalibrateConfig(sizes=sizes, layer_facts=min(args.layer_facts, max(sizes)),
                          layers=tuple(int(x) for x in args.layers.split(",")) if args.layers else (),
                          space_layers=args.space_layers,
                          target_open=args.target_open,
                          mention_open=args.mention_open if args.mention_open >= 0 else None,
                          residual_facts=args.residual_facts, confirm_facts=args.confirm_facts,
                          greedy_share=args.greedy_share,
                          map_rank=args.map_rank, map_facts=args.map_facts, map_layers=args.map_layers,
                          lrs=tuple(float(x) for x in args.lrs.split(",")), max_steps=args.max_steps, seed=args.seed)
    facts, texts, fit_texts, material = _calibration_material(args, cfg.facts_needed)
    name = Path(model_name(model) or args.model).name
    out = Path(args.out or f"results/calibrate-{name}")
    cal = Calibrator(model, tok, facts, texts, cfg, cache=out / "cache", fit_texts=fit_texts)
    if getattr(args, "measure", None):  # a given profile's operating point on this material; nothing chosen
        from .engine.profile import read_profile

        given = read_profile(args.measure)
        cal.measure(given)
        out.mkdir(parents=True, exist_ok=True)
        (out / "measured.json").write_text(json.dumps({**cal.report, "material_ranges": material,
                                                       "measured_profile": str(args.measure)}, indent=2))
        print(markdown_report(cal.report, given))
        print(f"measured {args.measure}: {out / 'measured.json'}", file=sys.stderr)
        return out / "measured.json"
    command = "neuraldb " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(("neuraldb", "cli.py")) else \
        f"neuraldb calibrate --model {args.model} --facts {args.facts} --texts {args.texts}"
    profile = cal.run(provenance=f"calibrated by: {command}\n{material}\ndate: {date.today().isoformat()}; "
                                 f"report: {out / 'report.md'}")
    profile = dataclasses.replace(profile, model_sha256=weights_sha256(model))
    out.mkdir(parents=True, exist_ok=True)
    if profile.gate_map:  # the fitted map travels with the profile
        shutil.copyfile(profile.gate_map, out / "gate_map.safetensors")
        profile = dataclasses.replace(profile, gate_map=str((out / "gate_map.safetensors").resolve()))
    (out / "profile.yaml").write_text(profile.to_yaml())
    (out / "report.json").write_text(json.dumps({**cal.report, "profile": profile.__dict__}, indent=2))
    (out / "report.md").write_text(markdown_report(cal.report, profile))
    where = out / "profile.yaml"
    if install:  # NeuralDB(model, tok) finds it by the model's name from now on
        where = cache_dir() / PROFILE_DIR / f"{name}.yaml"
        where.parent.mkdir(parents=True, exist_ok=True)
        if profile.gate_map:
            shutil.copyfile(profile.gate_map, where.with_suffix(".map.safetensors"))
            profile = dataclasses.replace(profile, gate_map=str(where.with_suffix(".map.safetensors")))
        tmp = where.with_suffix(".tmp")
        tmp.write_text(profile.to_yaml())
        tmp.replace(where)
    print(markdown_report(cal.report, profile))
    print(f"profile written to {where}; report in {out}", file=sys.stderr)
    return where


def cmd_calibrate(args: argparse.Namespace) -> int:
    model, tok = load_model(args.model)
    calibrate_into(args, model, tok, install=not args.no_install)
    return 0


def _ensure_profile(args: argparse.Namespace, model: Any = None, tok: Any = None) -> None:
    """With --calibrate and no --config: a model with no profile is calibrated first (the
    calibrate command's defaults, --calibrate-facts facts) and its profile cached."""
    if not getattr(args, "calibrate", False) or args.config:
        return
    from .engine.arch import weights_sha256
    from .engine.editor import model_name
    from .engine.models import cache_dir
    from .engine.profile import find_profile

    if model is None:
        model, tok = load_model(args.model or DEFAULT_MODEL)
    if find_profile(model_name(model), model.config.model_type, cache_dir(), lambda: weights_sha256(model)):
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--calibrate: {model_name(model)!r} has no profile; calibrate it before a multi-rank build "
                          f"(neuraldb calibrate --model {args.model})")
    print(f"no profile for {model_name(model)!r}: calibrating it first ({args.calibrate_facts} facts; "
          "docs/models.md)", file=sys.stderr)
    cal = build_parser().parse_args(["calibrate", "--model", args.model or DEFAULT_MODEL,
                                     "--facts", str(args.calibrate_facts)])
    cal.data_dir = getattr(args, "data_dir", None)
    calibrate_into(cal, model, tok, install=True)


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibrate", action="store_true", help="a model with no profile is calibrated first and its "
                                                            "profile cached (neuraldb calibrate; docs/models.md)")
    p.add_argument("--calibrate-facts", type=int, default=9_000, help="with --calibrate: calibration facts")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuraldb", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("edit", help="edit facts into a model and save the database")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--facts", required=True, help="CounterFact / zsRE / neuraldb JSONL file, or a source name "
                                                  "(counterfact, zsre)")
    e.add_argument("--data-dir", help="root of the named sources (default: $NEURALDB_DATA, ../shared/data, the sample)")
    e.add_argument("--limit", type=int)
    e.add_argument("--out", required=True, help="database directory to write")
    e.add_argument("--config", help="EditConfig YAML or a profile file")
    e.add_argument("--layer", type=int)
    e.add_argument("--gamma", type=float)
    e.add_argument("--index", help="key index spec, e.g. Auto, Flat, torch, Proj512, HNSW32")
    e.add_argument("--no-eval", action="store_true", help="skip the efficacy summary")
    _calibrate_args(e)
    e.set_defaults(fn=cmd_edit)
    b = sub.add_parser("build", help="keys and residuals of a fact pool in chunks, on one process or under "
                                     "torchrun; rank 0 assembles OUT/db")
    b.add_argument("--facts", required=True, help="facts file (JSON, JSONL, CSV, Parquet), save_to_disk "
                                                  "directory, or a source name")
    b.add_argument("--data-dir", help="root of the named sources")
    b.add_argument("--out", required=True, help="work directory: OUT/chunks, then OUT/db")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--chunk", type=int, default=1024, help="facts per chunk file")
    b.add_argument("--config", help="EditConfig YAML or a profile file")
    b.add_argument("--layer", type=int)
    b.add_argument("--gamma", type=float)
    b.add_argument("--index", help="key index spec")
    _calibrate_args(b)
    b.set_defaults(fn=cmd_build)
    a = sub.add_parser("ask", help="greedy answer from an edited model, and which fact fired")
    a.add_argument("--db", required=True)
    a.add_argument("--model", help="defaults to the model the database was built for")
    a.add_argument("--max-new-tokens", type=int, default=16)
    a.add_argument("prompt")
    a.set_defaults(fn=cmd_ask)
    i = sub.add_parser("info", help="describe a saved database")
    i.add_argument("--db", required=True)
    i.set_defaults(fn=cmd_info)
    v = sub.add_parser("eval", help="CounterFact / zsRE metrics and retention of an edited model")
    v.add_argument("--db", required=True)
    v.add_argument("--model")
    v.add_argument("--facts", help="facts to score: a file or a source name (default: the database's own)")
    v.add_argument("--data-dir", help="root of the named sources (default: $NEURALDB_DATA, ../shared/data, the sample)")
    v.add_argument("--limit", type=int)
    v.add_argument("--kind", choices=["counterfact", "zsre"])
    v.add_argument("--index")
    v.add_argument("--retention-texts", type=int, default=200)
    v.add_argument("--general", action="store_true", help="general ability instead: the six lm-evaluation-harness "
                                                          "tasks, unedited and with the database (the 'eval' extra)")
    v.add_argument("--tasks", help="with --general: a comma-separated subset of mmlu,sciq,commonsense_qa,"
                                   "arc_challenge,lambada_openai,wsc273")
    v.add_argument("--batch-size", type=int, default=16, help="with --general: requests per forward")
    v.add_argument("--precision", default="auto", choices=("auto", "float32", "bf16-above", "bf16"),
                   help="with --general: bf16-above scores the blocks above the gated layer and the LM head in "
                        "bf16 with the gate in float32; bf16 every block, the gate replaying a float32 probe "
                        "(auto: where the device multiplies bf16 fast)")
    v.add_argument("--out", help="with --general: write the table and every gate open as JSON here")
    v.set_defaults(fn=cmd_eval)
    s = sub.add_parser("serve", help="an OpenAI-compatible server over the edited model, with a knowledge API "
                                     "for live, durable fact edits")
    s.add_argument("--db", required=True, help="database directory (created empty for --model if absent); "
                                               "its write-ahead log is DB.wal beside it")
    s.add_argument("--model", help="model for a new database (default smollm2-135m); an existing database "
                                   "defaults to the model it was built for")
    s.add_argument("--config", help="EditConfig YAML or a profile file for a new database")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route (or $NEURALDB_API_KEY)")
    s.add_argument("--read-only", action="store_true", help="refuse fact writes")
    s.add_argument("--max-batch", type=int, default=16, help="generation requests per batch")
    s.add_argument("--checkpoint-records", type=int, default=1000, help="checkpoint after this many log records")
    s.add_argument("--checkpoint-interval", type=float, default=300.0,
                   help="seconds after which pending log records are checkpointed")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-prompt-tokens", type=int, default=2048)
    s.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
    s.add_argument("--max-facts-per-request", type=int, default=64)
    _calibrate_args(s)
    s.set_defaults(fn=cmd_serve)
    c = sub.add_parser("calibrate", help="derive a model's profile (layer, gate space, thresholds, residual "
                                         "optimiser) from its own activations; docs/models.md")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--out", help="report directory (default results/calibrate-MODEL)")
    c.add_argument("--facts", type=int, default=9_000, help="calibration facts keyed at the largest size")
    c.add_argument("--sizes", help="key counts measured, comma-separated (default FACTS/10, FACTS/3, FACTS)")
    c.add_argument("--texts", type=int, default=256, help="ordinary WikiText-2 passages")
    c.add_argument("--data", default="counterfact", help="calibration facts: a source name or a facts file")
    c.add_argument("--data-dir", help="root of the named sources (default: $NEURALDB_DATA, ../shared/data, the sample)")
    c.add_argument("--layers", help="candidate layers, comma-separated (default: 10-33%% of the depth)")
    c.add_argument("--layer-facts", type=int, default=300, help="keys per candidate layer and gate space")
    c.add_argument("--target-open", type=float, default=1e-4, help="spurious opens allowed, share of ordinary tokens")
    c.add_argument("--space-layers", type=int, default=2, help="the layer screen's best layers whose gate spaces, "
                                                                "thresholds and maps are measured (the layer is "
                                                                "decided with its space)")
    c.add_argument("--mention-open", type=float, default=5e-4, help="opens on subjects a passage names allowed too, "
                                                                     "share of ordinary tokens (negative: no limit)")
    c.add_argument("--residual-facts", type=int, default=32, help="facts each residual learning rate is screened on")
    c.add_argument("--confirm-facts", type=int, default=128,
                   help="other facts the fastest screened optimiser settings are run on as configured (0: none)")
    c.add_argument("--greedy-share", type=float, default=1.0,
                   help="share of those facts whose greedy answer must be the new object for a setting to pass")
    c.add_argument("--map-rank", type=int, default=64, help="the gate map tried (0: none)")
    c.add_argument("--map-facts", type=int, default=3000, help="facts the gate map is fitted on")
    c.add_argument("--map-layers", type=int, default=1, help="of the --space-layers, how many get a map fitted (those "
                                                              "whose plain spaces open the most own prompts)")
    c.add_argument("--lrs", default="1,2,4,8", help="residual learning rates tried")
    c.add_argument("--max-steps", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--measure", metavar="PROFILE", help="measure this profile's gate (a YAML file, e.g. a shipped "
                                                         "engine/defaults one) on the calibration material instead of "
                                                         "choosing one: its opens and own-open share at every size")
    c.add_argument("--no-install", action="store_true", help="write the profile only to OUT, not to the model cache")
    c.set_defaults(fn=cmd_calibrate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # progress lines (rate, time left) where people wait, with or without a terminal
    logging.getLogger("neuraldb.engine.progress").setLevel(logging.INFO)
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"neuraldb {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
