"""Edit throughput on one machine, in one run: keys by the reference recipe (every row run in
full) and with the prefix KV cache, and residuals; the keys of both paths compared.

    python3 bench/edit_speed.py --facts 256 --residual-facts 16 --whole-rows
    python3 bench/edit_speed.py --facts 256 --residual-facts 64 --residual-batch 16,32,64
    python3 bench/edit_speed.py --facts 64 --residual-facts 64 --unpacked
    python3 bench/edit_speed.py --facts 64 --residual-facts 64 --residual-batch 64 \
        --variant lr=0.5,steps=25 --variant lr=2,steps=14     # optimiser settings side by side
    python3 bench/edit_speed.py --facts 300 --residual-facts 300 --residual-batch 64 --check-nll --score \
        --variant residual_dtype=float32 --variant residual_dtype=bfloat16   # bf16 steps, checked in float32
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from neuraldb import NeuralDB, load_facts, load_model
from neuraldb.bench.common import machine, markdown_table, run_main, write_json
from neuraldb.engine.config import EditConfig, from_mapping, to_mapping
from neuraldb.engine.arch import model_device
from neuraldb.engine.keys import compute_keys
from neuraldb.data import source_file
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.engine.residuals import compute_residuals, residual_nll, step_dtype
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
    r.add_argument("--residual-prefix-cache", type=on_off, default=[True], metavar="on|off|on,off",
                   help="each generated prefix run once per call and read by its rows (on, the library's "
                        "default), or every row run in full (off); both: every residual run twice, interleaved")
    r.add_argument("--score", action="store_true",
                   help="also score each residual run: a database of the residual facts (keys computed once) "
                        "and its efficacy, generalization, specificity and greedy efficacy / generalization")
    r.add_argument("--check-nll", action="store_true",
                   help="also measure every run's residuals in float32 (engine.residuals.residual_nll): what "
                        "residuals optimised in bf16 reach in the model that serves them")
    r.add_argument("--profile", action="store_true",
                   help="also profile one residual batch of the last run's config: seconds per phase (prefill, "
                        "blocks, LM head and loss, backward, update), GEMM share and the GEMM-only floor "
                        "(reading the trace back takes minutes: millions of small ops)")
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
    runs = [(name if reuse else f"{name}, prefixes run per row", *rest, reuse)
            for name, *rest in runs for reuse in args.residual_prefix_cache]
    first_nll = None
    score_keys = None
    for name, suffix, pack, batch, base, reuse in runs:
        if not args.residual_facts:
            break
        sub = facts[: args.residual_facts]
        run_cfg = base.replace(residual_suffix=suffix, residual_pack=pack, residual_batch_size=batch)
        t0 = time.perf_counter()
        res[(suffix, pack, batch, name)], stats = compute_residuals(model, tok, sub, db.layer, prefixes, run_cfg,
                                                                    reuse_prefix_cache=reuse)
        dt = time.perf_counter() - t0
        first_nll = stats.nll if first_nll is None else first_nll
        check = {}
        if args.check_nll:
            nll32 = residual_nll(model, tok, sub, db.layer, prefixes, run_cfg, res[(suffix, pack, batch, name)])
            check = {"fp32_mean_nll": float(nll32.mean()), "fp32_p90_nll": float(nll32.quantile(0.9)),
                     "fp32_max_nll": float(nll32.max()), "fp32_over_0.05": int((nll32 > 0.05).sum())}
        if args.score and score_keys is None:  # one key set for every scored run
            score_keys = db.encode_keys(sub)
        quality = score(db, sub, score_keys, res[(suffix, pack, batch, name)], args.data) if args.score else {}
        dtype = str(step_dtype(run_cfg, model_device(model))).removeprefix("torch.")
        rows.append({"what": name, "batch": batch, "dtype": dtype,
                     "facts": len(sub), "seconds": dt, "facts_per_s": len(sub) / dt,
                     "mean_final_nll": float(stats.nll.mean()), "p90_final_nll": float(stats.nll.quantile(0.9)),
                     "max_final_nll": float(stats.nll.max()), "facts_nll_le_first": int((stats.nll <= first_nll).sum()),
                     "facts_nll_over_0.05": int((stats.nll > 0.05).sum()), "facts_nll_over_0.5": int((stats.nll > 0.5).sum()),
                     "mean_steps": float(stats.steps.float().mean()),
                     "block_tokens_per_fact": stats.block_tokens / len(sub),  # the steps' work, load-independent
                     "greedy_right": float(stats.greedy.mean()), **check, **quality})
    table = markdown_table(rows, ["what", "batch", "dtype", "facts", "seconds", "facts_per_s", "mean_final_nll",
                                  "p90_final_nll", "max_final_nll", "facts_nll_le_first", "facts_nll_over_0.05",
                                  "facts_nll_over_0.5", "mean_steps", "block_tokens_per_fact", "greedy_right"]
                           + (list(CHECK) if args.check_nll else [])
                           + (list(QUALITY) if args.score else []))
    print(table)
    print(f"max |key(cache) - key(reference)| = {diff:.3g}")
    ref = [(name, r) for (suffix, pack, _, _), r in res.items() for name in ["whole rows" if not suffix else "one padded batch"]
           if not pack][:1]
    for (suffix, pack, batch, _), r in res.items():
        if pack and ref:
            rel = float(((r - ref[0][1]).norm(dim=1) / ref[0][1].norm(dim=1)).max())
            print(f"max relative |residual(grouped, batch {batch}) - residual({ref[0][0]})| = {rel:.3g}")
    prof = None
    if args.profile and runs and args.residual_facts:
        _, _, _, batch, base, _ = runs[-1]
        sub = facts[: min(args.residual_facts, batch)]
        prof = profile_batch(model, tok, sub, db.layer, prefixes, base.replace(residual_batch_size=batch))
        print(markdown_table(prof["phases"], ["phase", "seconds", "share", "gemm_seconds", "gemm_share"]))
        print({k: v for k, v in prof.items() if k != "phases"})
    write_json(Path(args.out) / "edit_speed.json", {"args": vars(args), "machine": machine(), "rows": rows,
                                                     "key_max_abs_diff": diff, "config": cfg.__dict__,
                                                     "profile": prof})


GEMMS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
PHASES = ("residuals.prefill", "residuals.blocks", "residuals.head", "residuals.backward")


def _descendants(ev):  # every op an event's scope ran
    for c in ev.cpu_children:
        yield c
        yield from _descendants(c)


def gemm_rate(dtype: torch.dtype, m: int = 512, k: int = 576, n: int = 1536, reps: int = 20) -> float:
    """FLOP/s of one (m, k) @ (k, n) GEMM in `dtype` on this CPU (a block's shape, the steps' row count)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


def profile_batch(model, tok, facts: list, layer: int, prefixes: list, cfg: EditConfig) -> dict:
    """Where one residual batch's time goes: each phase's seconds and the GEMMs' part of them, the
    GEMM FLOPs, and the floor they imply at this CPU's measured GEMM rate (nothing but GEMMs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as p:
        t0 = time.perf_counter()
        _, st = compute_residuals(model, tok, facts, layer, prefixes, cfg)
        wall = time.perf_counter() - t0
    events = [e for e in p.events() if e.cpu_parent is None or e.name in PHASES]
    phases, flops = [], 0.0
    for name in PHASES:
        evs = [e for e in events if e.name == name]
        secs = sum(e.cpu_time_total for e in evs) / 1e6
        ops = [d for e in evs for d in _descendants(e) if d.name in GEMMS]
        gemm = sum(d.self_cpu_time_total for d in ops) / 1e6
        flops += sum(d.flops or 0 for d in ops)
        phases.append({"phase": name.split(".")[1], "seconds": secs, "share": secs / wall, "gemm_seconds": gemm,
                       "gemm_share": gemm / max(secs, 1e-9)})
    rest = wall - sum(r["seconds"] for r in phases)
    phases.append({"phase": "rest (update, clamp, batching, Python)", "seconds": rest, "share": rest / wall})
    dtype = step_dtype(cfg, model_device(model))
    rate = gemm_rate(dtype)
    return {"facts": len(facts), "wall_s": wall, "facts_per_s": len(facts) / wall,
            "mean_steps": float(st.steps.float().mean()), "dtype": str(dtype).removeprefix("torch."),
            "gemm_flops": flops, "gemm_rate_flops": rate,
            "gemm_floor_s": flops / rate, "gemm_floor_facts_per_s": len(facts) / max(flops / rate, 1e-9),
            "phases": phases}


CHECK = ("fp32_mean_nll", "fp32_p90_nll", "fp32_max_nll", "fp32_over_0.05")
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


def on_off(text: str) -> list[bool]:
    """"on", "off" or a comma-separated list of them."""
    words = text.split(",")
    if any(w not in ("on", "off") for w in words):
        raise argparse.ArgumentTypeError(f"expected on, off or a comma-separated list of them, got {text!r}")
    return [w == "on" for w in words]


def variant(cfg: EditConfig, spec: str) -> EditConfig:
    """`cfg` with the changes "key=value,key=value" (values converted to each field's type)."""
    changes = dict(item.split("=", 1) for item in spec.split(",") if item)
    return from_mapping(EditConfig, {**to_mapping(cfg), **changes}, source=f"--variant {spec}")


if __name__ == "__main__":
    run_main(main, "bench/edit_speed.py")
