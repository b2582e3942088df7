"""The GPU paths in one run (sized for one 10-minute call on a lent H100/H200):

1. ceilings: device-to-device copy bandwidth and a bf16 matmul rate;
2. kernels against their references on the device: the Triton lookup vs float64 search over
   dtypes and odd sizes, int64 addressing past 2^31 key elements, the fused gather-add bit for bit;
3. lookup latency, torch vs Triton block shapes, over queries N x keys m x dim d, beside the floor
   (the key bytes over the copy bandwidth): this picks `kernels.TRITON_MIN_PAIRS`;
4. the gated forward: a random-weight model of SmolLM2-135M's shape (and of Llama-3-8B's) with
   100k keys, prefill and decode with the gate on and off (CUDA events), whether the gate syncs
   the host, and closed tokens bit-identical to the unedited layer;
5. keys and residuals per second on the GPU for SmolLM2's shape (random weights: the step count
   per fact is the configured maximum, so this is a floor on facts/s).

    python3 bench/gpu.py --big --out results/gpu --tokenizer DIR --facts counterfact.json

Random weights time the same arithmetic as trained ones; they cannot say anything about quality."""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from neuraldb.bench.common import copy_bandwidth, machine, markdown_table, write_json
from neuraldb.kernels import gather_add, l2_normalize, max_cosine

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, head_dim=64, tie_word_embeddings=True)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
VARIANTS = {"t16x64": dict(block_n=16, block_m=64, block_d=64, num_warps=4),
            "t64x64": dict(block_n=64, block_m=64, block_d=64, num_warps=4),
            "t128x64w8": dict(block_n=128, block_m=64, block_d=64, num_warps=8)}


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median ms by CUDA events (triton's do_bench: warm-up, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def events_ms(fn: Callable[[], Any], reps: int = 5) -> list[float]:
    """ms of `reps` whole calls each (host launch work included), by CUDA events."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def on_off_ms(gate: Any, fn: Callable[[], Any], rounds: int = 12) -> tuple[float, float]:
    """Median ms with the gate off and on, alternated round by round so clock and host drift
    fall on both alike (after a warm-up of both)."""
    off, on = [], []
    for r in range(rounds + 1):
        for flag, acc in ((False, off), (True, on)) if r % 2 else ((True, on), (False, off)):
            gate.enabled = flag
            t = events_ms(fn)
            if r:
                acc.extend(t)
    gate.enabled = True
    return statistics.median(off), statistics.median(on)


def unit_keys(m: int, d: int, dtype: torch.dtype, seed: int, shared: float = 0.5) -> torch.Tensor:
    """(m, d) unit rows with a shared mean direction of weight `shared` (FFN activations have one),
    made on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mean = torch.randn(d, device="cuda", generator=g)
    out = torch.empty(m, d, dtype=dtype, device="cuda")
    for s in range(0, m, 1 << 16):  # bounded fp32 temporaries
        x = torch.randn(min(1 << 16, m - s), d, device="cuda", generator=g) + shared * mean
        out[s : s + x.shape[0]] = l2_normalize(x).to(dtype)
    return out


# ----- 1. ceilings ------------------------------------------------------------------------
def ceilings() -> dict[str, float]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 3.0:  # raise the clocks from idle before anything is timed
        a @ a
    torch.cuda.synchronize()
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = bench_ms(lambda: a @ b)
    del a, b
    return {"copy_gb_s": copy_bandwidth(torch.device("cuda")) / 1e9, "bf16_tflops": 2 * 8192**3 / mm / 1e9}


# ----- 2. correctness ---------------------------------------------------------------------
def check_kernels(seed: int) -> list[dict[str, Any]]:
    from neuraldb.kernels.triton_gather import gather_add_triton
    from neuraldb.kernels.triton_lookup import max_cosine_triton

    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, m, d in ((1, 1000, 1536), (7, 100_003, 576), (200, 30_011, 1536), (1, 100_000, 14336)):
            g = torch.Generator(device="cuda").manual_seed(seed + n + m)
            k = unit_keys(m, d, dtype, seed + m)
            q = l2_normalize(torch.randn(n, d, device="cuda", generator=g) + k[:n].float())  # near some keys
            valid = torch.rand(m, device="cuda", generator=g) > 0.1
            for name, kw in {**VARIANTS, "auto": {}}.items():
                best, arg = max_cosine_triton(q, k, valid, **kw)
                exact = (q.to(dtype).double() @ k.double().T).masked_fill(~valid, float("-inf"))  # (n, m)
                top2 = exact.topk(2, dim=1).values
                err = float((best.double() - top2[:, 0]).abs().max())
                tol = 1e-5 if dtype == torch.float32 else 1e-3
                clear = top2[:, 0] - top2[:, 1] > 2 * tol
                same = bool(torch.equal(arg[clear], exact.argmax(1)[clear]))
                rows.append({"check": f"lookup {name}", "dtype": str(dtype).split(".")[1], "n": n, "m": m, "d": d,
                             "max_abs_err": err, "argmax_same": same, "ok": err <= tol and same})
            del k, exact
    # int64 addressing: m * d > 2^31 elements; queries equal the last rows
    m, d = 1_400_011, 1536
    k = unit_keys(m, d, torch.float16, seed)
    q = k[[m - 1, m - 2, 5]].float()
    best, arg = max_cosine_triton(q, k)
    rows.append({"check": "lookup int64", "dtype": "float16", "n": 3, "m": m, "d": d,
                 "max_abs_err": float((best - 1).abs().max()), "argmax_same": arg.tolist() == [m - 1, m - 2, 5],
                 "ok": arg.tolist() == [m - 1, m - 2, 5] and float((best - 1).abs().max()) < 1e-3})
    del k
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, r, d in ((1, 1, 576), (201, 5000, 576), (4096, 100_000, 4096)):
            g = torch.Generator(device="cuda").manual_seed(seed + n)
            out = torch.randn(n, d, device="cuda", generator=g).to(dtype)
            table = torch.randn(r, d, device="cuda", generator=g)
            ids = torch.randint(-1, r + 1, (n,), device="cuda", generator=g)
            open_ = torch.rand(n, device="cuda", generator=g) > 0.5
            want = gather_add(out, open_, ids, table)
            got = gather_add_triton(out.clone(), open_, ids, table)
            iv = torch.int32 if dtype == torch.float32 else torch.int16
            same = bool(torch.equal(got.view(iv), want.view(iv)))
            rows.append({"check": "gather_add", "dtype": str(dtype).split(".")[1], "n": n, "m": r, "d": d,
                         "max_abs_err": float((got.float() - want.float()).abs().max()), "argmax_same": same,
                         "ok": same})
    return rows


# ----- 3. lookup latency ------------------------------------------------------------------
def lookup_sweep(cells: list[tuple[int, int]], batches: list[int], bw: float, seed: int) -> list[dict[str, Any]]:
    from neuraldb.kernels.triton_lookup import max_cosine_triton

    rows = []
    for m, d in cells:
        k = unit_keys(m, d, torch.float16, seed)
        floor_ms = m * d * 2 / bw * 1e3  # the fp16 keys read once
        for n in batches:
            q = l2_normalize(torch.randn(n, d, device="cuda"))
            row: dict[str, Any] = {"m": m, "d": d, "n": n, "floor_ms": floor_ms,
                                   "torch_ms": bench_ms(lambda: max_cosine(q, k))}
            for name, kw in VARIANTS.items():
                if kw["block_n"] > 16 and n < 8:  # a 64-row query block for one query only wastes it
                    continue
                row[f"{name}_ms"] = bench_ms(lambda kw=kw: max_cosine_triton(q, k, **kw))
            row["auto_ms"] = bench_ms(lambda: max_cosine_triton(q, k))  # query_block(n)'s choice
            best = min((v, key[:-3]) for key, v in row.items() if key.startswith("t") and key.endswith("_ms")
                       and key != "torch_ms")
            row["best_triton"], row["best_triton_ms"] = best[1], best[0]
            row["triton_speedup"] = row["torch_ms"] / best[0]
            rows.append(row)
            row["auto_share_of_bandwidth"] = floor_ms / row["auto_ms"]
            print(f"  lookup m={m} d={d} n={n}: torch {row['torch_ms']:.3f} ms, best {best[1]} {best[0]:.3f} ms, "
                  f"auto {row['auto_ms']:.3f}, floor {floor_ms:.3f}", flush=True)
        del k
        torch.cuda.empty_cache()
    return rows


# ----- 4. the gated forward ---------------------------------------------------------------
def random_model(shape: dict[str, Any], dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


@torch.no_grad()
def gated_forward(label: str, shape: dict[str, Any], m: int, layer: int, dtype: torch.dtype, gamma: float,
                  spec: str, seed: int) -> dict[str, Any]:
    from neuraldb.engine.arch import cache_kwargs, returned_cache
    from neuraldb.engine.gated import GatedFFNOut
    from neuraldb.engine.hooks import Trace
    from neuraldb.engine.space import key_space
    from neuraldb.index import ResidualTable, make_index

    model = random_model(shape, dtype)
    path = f"model.layers.{layer}.mlp.down_proj"
    base = model.get_submodule(path)
    d_ff, d_model = shape["intermediate_size"], shape["hidden_size"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    prompt = torch.randint(3, shape["vocab_size"], (8, 200), device="cuda", generator=g)  # (B, T)
    with Trace(model, path, retain_input=True, retain_output=False) as tr:
        model(prompt[:1])
    acts = tr.input[0].detach()  # (T, d_ff): real queries of this model at l*
    index = make_index(spec, d_ff, device="cuda", floor=gamma)
    keys = unit_keys(m, d_ff, torch.float16, seed, shared=0.0)  # unrelated to this model's activations
    planted = [10, 50, 120, 199]  # these prompt tokens open: their own activations are keys
    keys[: len(planted)] = l2_normalize(acts[planted].float()).half()
    t0 = time.perf_counter()
    index.add(np.arange(m), keys, unit=True)
    del keys
    table = ResidualTable(d_model, device="cuda")
    for s in range(0, m, 1 << 15):
        table.put(np.arange(s, min(m, s + (1 << 15))), torch.randn(min(1 << 15, m - s), d_model, device="cuda"))
    build_s = time.perf_counter() - t0
    gate = GatedFFNOut(base, index, table, gamma, key_space(model, layer))  # FFN-only keys
    model.get_submodule(f"model.layers.{layer}.mlp").down_proj = gate
    out: dict[str, Any] = {"model": label, "dtype": str(dtype).split(".")[1], "m": m, "spec": spec,
                           "index_bytes_per_fact": index.nbytes / m, "build_s": build_s}

    # bit identity on the device: closed rows equal the unedited layer's, open rows differ, both paths agree
    x = acts[None]  # (1, T, d_ff)
    gate.enabled = False
    plain = gate(x).clone()
    gate.enabled = True
    fused = gate(x).clone()
    opened = gate.last[2][0]
    gate.sync_free = False
    listed = gate(x).clone()
    gate.sync_free = None
    iv = torch.int16 if dtype != torch.float32 else torch.int32
    out["open_tokens"] = int(opened.sum())
    out["closed_bit_identical"] = bool(torch.equal(fused[0][~opened].view(iv), plain[0][~opened].view(iv)))
    out["open_rows_changed"] = bool((fused[0][opened] != plain[0][opened]).any(dim=-1).all())
    out["fused_equals_listed"] = bool(torch.equal(fused.view(iv), listed.view(iv)))

    # host syncs: a known sync first (the check must catch it), the gate alone, the whole forward
    for what, fn in (("control_item", lambda: gate(x).sum().item()), ("gate", lambda: gate(x)),
                     ("decoder_forward", lambda: model(prompt[:1]))):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            out[f"{what}_syncs"] = "none"
        except RuntimeError as e:
            out[f"{what}_syncs"] = str(e).splitlines()[0][:120]
        finally:
            torch.cuda.set_sync_debug_mode(0)

    # latency: prefill of 200 tokens (B = 1), decode steps after it (B = 1 and 8)
    def prefill() -> None:
        model(prompt[:1], use_cache=False)

    out["prefill_b1_off_ms"], out["prefill_b1_on_ms"] = on_off_ms(gate, prefill)
    for b in (1, 8):
        gate.enabled = False
        pre = model(prompt[:b], use_cache=True)
        nxt = pre.logits[:, -1:].argmax(-1)  # (B, 1)
        cache = returned_cache(pre)

        def step() -> None:
            model(nxt, use_cache=True, **cache_kwargs(model, cache))
            cache.crop(-1)  # drop the step's token: the same step again, not a growing cache

        out[f"decode_b{b}_off_ms"], out[f"decode_b{b}_on_ms"] = on_off_ms(gate, step)
    for phase in ("prefill_b1", "decode_b1", "decode_b8"):
        off, on = out[f"{phase}_off_ms"], out[f"{phase}_on_ms"]
        out[f"{phase}_overhead"] = (on - off) / off
    # the lookup alone, for the same query counts
    for n, phase in ((200, "prefill_b1"), (1, "decode_b1"), (8, "decode_b8")):
        q = acts[:n].float() if n <= acts.shape[0] else acts.float()
        out[f"{phase}_lookup_ms"] = bench_ms(lambda q=q: index.search(q))
    del model, index, table, gate
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ----- 5. keys and residuals per second ---------------------------------------------------
def edit_speed(tokenizer: Path, facts_file: Path, n_facts: int, batches: list[int]) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from neuraldb import EditConfig, NeuralDB, load_facts

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    facts = load_facts(str(facts_file))[:n_facts]
    model = random_model(SMOL, torch.float32)
    rows = []
    for bs in batches:
        db = NeuralDB(model, tok, EditConfig(layer=6, gamma=0.7, residual_batch_size=bs, key_batch_size=256))
        db.ensure_prefixes()
        db.encode_keys(facts[:8])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        db.encode_keys(facts)
        torch.cuda.synchronize()
        t_keys = time.perf_counter() - t0
        t0 = time.perf_counter()
        db.encode_residuals(facts)
        torch.cuda.synchronize()
        t_res = time.perf_counter() - t0
        st = db.last_stats
        rows.append({"residual_batch": bs, "facts": len(facts), "keys_facts_per_s": len(facts) / t_keys,
                     "residual_facts_per_s": len(facts) / t_res,
                     "mean_steps": float(st.steps.float().mean()) if st is not None else None})
        db.detach()
        print(f"  edit speed batch {bs}: {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to run")
    g.add_argument("--parts", default="ceilings,kernels,lookup,forward,edit", help="comma-separated")
    g.add_argument("--m", default="100000,1000000", help="keys in the gated forward of SmolLM2's shape")
    g.add_argument("--big", action="store_true", help="also the gated forward of Llama-3-8B's shape")
    g = ap.add_argument_group("edit speed")
    g.add_argument("--tokenizer", default="", help="a directory with SmolLM2's tokenizer files")
    g.add_argument("--facts", default="", help="a CounterFact JSON file")
    g.add_argument("--edit-facts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/gpu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    parts = set(args.parts.split(","))
    res: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    out = Path(args.out)
    t_all = time.perf_counter()

    def save() -> None:
        res["wall_s"] = time.perf_counter() - t_all
        write_json(out / "gpu.json", res)

    res["ceilings"] = ceilings() if "ceilings" in parts or "lookup" in parts else {}
    print("ceilings", res["ceilings"], flush=True)
    save()
    if "kernels" in parts:
        res["kernels"] = check_kernels(args.seed)
        bad = [r for r in res["kernels"] if not r["ok"]]
        print(f"kernels: {len(res['kernels']) - len(bad)}/{len(res['kernels'])} checks ok", flush=True)
        for r in bad:
            print("  FAILED", r, flush=True)
        save()
    if "lookup" in parts:
        bw = res["ceilings"]["copy_gb_s"] * 1e9
        res["lookup"] = lookup_sweep([(10_000, 1536), (100_000, 1536), (1_000_000, 1536), (100_000, 14336)],
                                     [1, 8, 64, 256, 2048], bw, args.seed)
        save()
    if "forward" in parts:
        res["forward"] = []
        for m in (int(v) for v in args.m.split(",")):
            res["forward"].append(gated_forward("SmolLM2-135M shape", SMOL, m, 6, torch.bfloat16, 0.7, "torch,fp16",
                                                args.seed))
            print("forward", res["forward"][-1], flush=True)
            save()
        if args.big:
            res["forward"].append(gated_forward("Llama-3-8B shape", LLAMA3_8B, 100_000, 8, torch.bfloat16, 0.7,
                                                "torch,fp16", args.seed))
            print("forward", res["forward"][-1], flush=True)
            save()
    if "edit" in parts and args.tokenizer and args.facts:
        res["edit"] = edit_speed(Path(args.tokenizer), Path(args.facts), args.edit_facts, [16, 64])
        save()
    for key in ("lookup", "forward", "edit"):
        if res.get(key):
            cols = list(dict.fromkeys(c for r in res[key] for c in r))
            print(f"\n## {key}\n\n" + markdown_table(res[key], cols))
    save()
    return res


if __name__ == "__main__":
    main()
