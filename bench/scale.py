"""Editing quality, memory and latency as the database grows: the project's headline table.

    python bench/scale.py                          # CPU default: SmolLM2, 48 CounterFact facts
    python bench/scale.py --facts 100000 --data synthetic --device cuda --out results/scale-100k

Keys and residuals are computed in chunks and cached under OUT/cache (an interrupted run goes
on where it stopped). At each checkpoint m the first m facts are in the database, and a fixed
sample of the first checkpoint's facts is scored, so every row measures the same facts."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from neuraldb import Fact, NeuralDB, load_model
from neuraldb.data import is_source, resolve
from neuraldb.bench.common import machine, markdown_table, progress, run_main, write_json, write_outputs
from neuraldb.engine.arch import cache_kwargs, returned_cache
from neuraldb.engine.config import NEUTRAL_LATER, model_defaults, to_mapping
from neuraldb.engine.profile import load_config
from neuraldb.engine.editor import model_name, subject_key
from neuraldb.engine.models import DEFAULT_MODEL
from neuraldb.engine.pool import FactPool
from neuraldb.evaluation import counterfact_scores, fluency, retention, zsre_scores
from neuraldb.evaluation.attribution import gate_attribution
from neuraldb.evaluation.lazy import until_no_new_facts
from neuraldb.evaluation.texts import wikitext_passages
from neuraldb.evaluation.synthetic import synthetic_facts

log = logging.getLogger("bench.scale")
def _source(name: str, n: int, seed: int, data_dir: str | None = None) -> FactPool:
    if name == "synthetic":
        return FactPool.from_facts(synthetic_facts(n, seed=seed))
    files = resolve(name, data_dir).files if is_source(name) else (Path(name),)
    parts: list[FactPool] = []
    for f in files:  # the shared zsRE file holds two records with an empty new answer: they are skipped
        parts.append(FactPool.from_file(f, skip_invalid=is_source(name)))
        if sum(map(len, parts)) >= n:
            break
    return FactPool.concat(parts).head(n)


def get_facts(data: str, n: int, seed: int, extra: int, data_dir: str | None = None) -> tuple[FactPool, list[Fact], dict[str, int]]:
    """(n facts to edit as an Arrow-backed pool, `extra` held-out facts whose prompts serve as
    unrelated text, facts taken from each source). `data` is a comma-separated mix taken in
    order, each part `SOURCE` or `SOURCE:COUNT` (SOURCE: counterfact, zsre, synthetic, or a
    facts file or `save_to_disk` directory)."""
    parts: list[FactPool] = []
    counts: dict[str, int] = {}
    have = 0
    for part in data.split(","):
        name, _, count = part.partition(":")
        want = n + extra - have if not count else int(count)
        if want > 0:
            parts.append(_source(name, want, seed, data_dir))
            have += len(parts[-1])
            counts[name] = counts.get(name, 0) + len(parts[-1])
    if have < n + 1:
        raise SystemExit(f"--data {data}: only {have} facts available, asked for {n} (+ held-out text)")
    pool = FactPool.concat(parts) if len(parts) > 1 else parts[0]
    used, left = dict(counts), n
    for name, c in counts.items():  # how many of the n edited facts come from each source
        used[name], left = min(c, left), left - min(c, left)
    return pool.head(n), list(pool[n : n + extra]), used


def same_settings(stored: dict[str, Any], sig: dict[str, Any]) -> bool:
    """A cache's meta equals `sig`, but for residual-only fields (RESIDUAL_ONLY) that older key
    caches still list in their config: the keys do not depend on them."""
    if stored == sig:
        return True
    config = stored.get("config")
    if not isinstance(config, dict):
        return False
    return {**stored, "config": {k: v for k, v in config.items() if k not in RESIDUAL_ONLY}} == sig


class ChunkCache:
    """Keys of facts [k*key_size, (k+1)*key_size) in OUT/cache/keys_k.safetensors. Residuals in
    OUT/cache/res-<recipe>/res_n.safetensors, each file the residuals of at most `size` facts
    computed in one call (the optimiser batches them by suffix length) with their ids: eagerly,
    consecutive facts; lazily, the facts whose gates opened. A residual is computed once and read
    from here ever after, so lazy and eager evaluation over one cache see the same residuals.
    <recipe> is a hash of the residual-only settings, so residual recipes share one cache's keys."""

    def __init__(self, root: Path, size: int, signature: dict[str, Any], key_size: int | None = None,
                 residual_signature: dict[str, Any] | None = None) -> None:
        self.root, self.size, self.key_size = root, size, key_size or size
        recipe = hashlib.sha256(json.dumps(residual_signature or {}, sort_keys=True).encode()).hexdigest()[:10]
        self.res_root = root / f"res-{recipe}"  # this recipe's residuals and kept rows
        for where, sig in ((root, signature), (self.res_root, residual_signature or {})):
            where.mkdir(parents=True, exist_ok=True)
            meta = where / "meta.json"
            if meta.is_file():
                if not same_settings(json.loads(meta.read_text()), sig):
                    raise SystemExit(f"{meta}: the cache was made with other settings; use another --out or delete it")
            else:
                meta.write_text(json.dumps(sig, indent=1))
        self._where: dict[int, tuple[int, int]] = {}  # fact id -> (residual file, row)
        self._files = sorted(int(p.stem.split("_")[1]) for p in self.res_root.glob("res_*.safetensors"))
        for n in self._files:
            with safe_open(str(self.path("res", n)), framework="pt") as fh:
                self._where.update((i, (n, r)) for r, i in enumerate(fh.get_tensor("ids").tolist()))

    def path(self, kind: str, k: int) -> Path:
        return (self.res_root if kind == "res" else self.root) / f"{kind}_{k:06d}.safetensors"

    def _chunks(self, n: int, size: int | None = None) -> range:
        size = size or self.size
        return range((n + size - 1) // size)

    def _write(self, kind: str, k: int, tensors: dict[str, torch.Tensor], timings: dict[str, float]) -> None:
        tmp = self.path(kind, k).with_suffix(".tmp")
        save_file({name: t.cpu().contiguous() for name, t in tensors.items()}, str(tmp),
                  metadata={name: str(v) for name, v in timings.items()})
        tmp.rename(self.path(kind, k))

    def _key_rows(self, k: int) -> int:
        """Facts in key chunk k as written (0: none); a chunk written when fewer facts were asked
        for is shorter than a later, longer run needs."""
        if not self.path("keys", k).is_file():
            return 0
        with safe_open(str(self.path("keys", k)), framework="pt") as fh:
            return int(fh.get_slice("keys").get_shape()[0])

    def fill_keys(self, db: NeuralDB, facts: Sequence[Fact]) -> None:
        size, n = self.key_size, len(facts)
        todo = [k for k in self._chunks(n, size) if self._key_rows(k) < min(size, n - k * size)]
        db.ensure_prefixes()  # once, before timing: it is not per-fact work
        for k in progress(todo, len(todo), "key chunks"):
            chunk = facts[k * self.key_size : (k + 1) * self.key_size]
            t0 = time.perf_counter()
            keys = db.encode_keys(chunk)
            self._write("keys", k, {"keys": keys}, {"keys_s": time.perf_counter() - t0, "facts": len(chunk)})

    def fill_residuals(self, db: NeuralDB, facts: Sequence[Fact], ids: Iterable[int]) -> None:
        """Residuals of the facts `ids` (indices into `facts`) that are not cached yet."""
        todo = sorted(set(ids) - self._where.keys())
        calls = [todo[i : i + self.size] for i in range(0, len(todo), self.size)]
        for batch in progress(calls, len(calls), "residual files"):
            res = db.encode_residuals([facts[i] for i in batch])
            n = self._files[-1] + 1 if self._files else 0
            self._write("res", n, {"ids": torch.tensor(batch), "residuals": res, "nll": db.last_stats.nll,
                                   "steps": db.last_stats.steps}, db.timings)
            self._files.append(n)
            self._where.update((i, (n, r)) for r, i in enumerate(batch))

    def group_residuals(self, db: NeuralDB, facts: Sequence[Fact], groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The one residual (d,) of each group of facts about one subject (`groups`: indices into
        `facts`), optimised jointly over all the group's prompts (NeuralDB's subject_groups) and
        cached by members. The groups not cached yet are optimised together, in one call (their
        subjects differ, so each keeps its own slot): a lazy load of a few hundred groups is one
        batched run, not a few hundred runs of two facts each."""
        paths = [self.res_root / f"group_{hashlib.sha256(json.dumps(list(g)).encode()).hexdigest()[:16]}.safetensors"
                 for g in groups]
        out: list[torch.Tensor | None] = [None] * len(groups)
        for k, (g, path) in enumerate(zip(groups, paths)):
            if path.is_file():
                saved = load_file(str(path))
                if saved["ids"].tolist() == list(g):
                    out[k] = saved["residual"]
        todo = [k for k, r in enumerate(out) if r is None]
        if todo:
            plain = db.config
            db.config = plain.replace(subject_groups=True)
            try:
                res = db.encode_residuals([facts[i] for k in todo for i in groups[k]])  # a group's rows hold its residual
            finally:
                db.config = plain
            st, at = db.last_stats, 0
            for k in todo:
                out[k] = res[at].cpu().contiguous()
                n = len(groups[k])
                tmp = paths[k].with_suffix(".tmp")  # each member's final NLL and the group's steps beside it
                save_file({"ids": torch.tensor(list(groups[k])), "residual": out[k],
                           "nll": st.nll[at : at + n].cpu().contiguous(),
                           "steps": st.steps[at : at + n].cpu().contiguous()}, str(tmp))
                tmp.rename(paths[k])
                at += n
        return out  # type: ignore[return-value]

    def keys(self, start: int, stop: int) -> torch.Tensor:
        """Keys of facts [start, stop)."""
        parts = []
        for k in range(start // self.key_size, (stop + self.key_size - 1) // self.key_size):
            t = load_file(str(self.path("keys", k)))["keys"]
            want = min(stop - k * self.key_size, self.key_size)
            if t.shape[0] < want:
                raise SystemExit(f"{self.path('keys', k)}: {t.shape[0]} keys where {want} are needed (written for "
                                 f"fewer facts); run fill_keys for these facts first")
            parts.append(t[max(start - k * self.key_size, 0) : want])
        return torch.cat(parts)

    def residuals(self, ids: Sequence[int]) -> torch.Tensor:
        """Residuals of the facts `ids`, in that order (they must be cached): (len(ids), d)."""
        missing = [i for i in ids if i not in self._where]
        if missing:
            raise KeyError(f"{self.root}: no cached residual for facts {missing[:5]}")
        by_file: dict[int, list[int]] = {}
        for j, i in enumerate(ids):
            by_file.setdefault(self._where[i][0], []).append(j)
        out: torch.Tensor | None = None
        for n, js in by_file.items():
            t = load_file(str(self.path("res", n)))["residuals"]
            if out is None:
                out = t.new_empty(len(ids), t.shape[1])
            out[js] = t[[self._where[ids[j]][1] for j in js]]
        return out if out is not None else torch.empty(0, 0)

    def residual_rows(self, start: int, stop: int) -> torch.Tensor:
        """Residuals of facts [start, stop) (they must be cached)."""
        return self.residuals(range(start, stop))

    def computed(self) -> int:
        """How many residuals are cached."""
        return len(self._where)

    def throughput(self, n: int) -> dict[str, float]:
        """Keys and residuals per second over the cached files (facts [0, n) for keys, every
        residual file), and the final target NLL and optimisation steps of every cached residual."""
        totals = {"keys": [0.0, 0], "res": [0.0, 0]}
        nll, steps = [], []
        files = [("keys", "keys_s", k) for k in self._chunks(n, self.key_size)] + [("res", "residuals_s", k)
                                                                                    for k in self._files]
        for kind, field, k in files:
            if self.path(kind, k).is_file():
                with safe_open(str(self.path(kind, k)), framework="pt") as fh:
                    meta = fh.metadata()
                    if kind == "res":
                        nll.append(fh.get_tensor("nll"))
                        steps.append(fh.get_tensor("steps").float())
                totals[kind][0] += float(meta[field])
                totals[kind][1] += int(float(meta["facts"]))
        (ks, kn), (rs, rn) = totals["keys"], totals["res"]
        out = {"keys_per_s": kn / ks if ks else float("nan"), "residuals_per_s": rn / rs if rs else float("nan")}
        if nll:
            nl, st = torch.cat(nll), torch.cat(steps)
            out.update(residual_nll_mean=float(nl.mean()), residual_nll_p90=float(nl.quantile(0.9)),
                       residual_nll_max=float(nl.max()), residual_steps_mean=float(st.mean()))
        return {**out, **self.group_stats()}

    def group_stats(self) -> dict[str, float]:
        """The final NLL of every fact held by a cached group residual (facts about one subject,
        optimised jointly; the residual_nll columns are single facts'), and how many group files
        were written before their NLL was stored."""
        nll, old = [], 0
        for path in sorted(self.res_root.glob("group_*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                if "nll" in fh.keys():
                    nll.append(fh.get_tensor("nll"))
                else:
                    old += 1
        if not nll and not old:
            return {}
        nl = torch.cat(nll) if nll else torch.zeros(0)
        stats = {"group_facts": len(nl), "group_files_without_nll": old}
        if len(nl):
            stats.update(group_nll_mean=float(nl.mean()), group_nll_p90=float(nl.quantile(0.9)),
                         group_nll_max=float(nl.max()))
        return stats


GATE_ONLY = ("gamma", "head_gamma", "head_window", "sink_gamma", "index")  # config fields that change no key or residual
RESIDUAL_ONLY = ("residual_prefixes", "lr", "steps", "loss_stop", "clamp_norm", "weight_decay", "kl_factor",
                 "kl_prompt", "kl_contexts", "kl_span", "residual_batch_size", "residual_suffix", "subject_groups",
                 "residual_pack", "residual_init", "init_scale", "nll_stop", "residual_dtype",
                 "lr_decay", "residual_blocks", "residual_stream", "residual_warmup")  # change residuals, not keys
# residual-only fields added after caches were written, with the value that behaves as before:
# at that value a field stays out of the recipe, so the residuals cached before it still serve
ADDED_LATER = {"residual_stream": "grouped", **NEUTRAL_LATER}


def open_cache(root: Path, db: NeuralDB, args: argparse.Namespace, facts: Sequence[Fact]) -> ChunkCache:
    """The cache of `facts` for this model and config (args: data, seed, chunk, key_chunk); a
    cache made with other settings is refused."""
    # what keys and residuals depend on: not the gate's thresholds or index (a cache serves every
    # gamma / head_gamma), but whether key rows carry a head row, and its width (its layout);
    # residuals sit in a folder of their recipe (RESIDUAL_ONLY), so recipes share the keys
    full = to_mapping(db.config)
    config = {k: v for k, v in full.items() if k not in GATE_ONLY + RESIDUAL_ONLY}
    config["head_rows"] = db.heads is not None
    if db.heads is not None:
        config["head_dim"] = db.heads.dim
    signature = {"model": db.fingerprint(), "config": config, "data": args.data, "seed": args.seed,
                 "key_chunk": args.key_chunk, "first_ids": [f.id for f in facts[:3]]}
    return ChunkCache(root, args.chunk, signature, key_size=args.key_chunk,
                      residual_signature=residual_recipe(full, args.chunk))


def residual_recipe(config: dict[str, Any], chunk: int) -> dict[str, Any]:
    """What a cached residual depends on (its folder's name is a hash of it): the residual-only
    fields of an EditConfig mapping, less those added later that hold their old behaviour."""
    return {"config": {k: config[k] for k in RESIDUAL_ONLY if k not in ADDED_LATER or config[k] != ADDED_LATER[k]},
            "chunk": chunk, "residual_files": "ids"}


class Residuals:
    """Puts cached residuals into the database: every fact's (eager), or on demand those of the
    facts whose gates open (lazy). With `groups` (NeuralDB's subject_groups), a fact whose subject
    other facts in the database share gets the one residual optimised for all of them, as
    `NeuralDB.add` writes it; it is cached under the group's members (a group grows with m)."""

    def __init__(self, db: NeuralDB, cache: ChunkCache, facts: Sequence[Fact], groups: bool = False) -> None:
        self.db, self.cache, self.facts, self.groups = db, cache, facts, groups
        self.loaded: dict[int, tuple[int, ...]] = {}  # fact -> the group whose residual it holds

    def _group(self, i: int) -> tuple[int, ...]:
        return tuple(self.db.same_subject([subject_key(self.facts[i])])) if self.groups else (i,)

    def load(self, ids: set[int]) -> int:
        """Residuals of the facts in `ids` that are in the database and not loaded yet (or whose
        group has grown), computed first where the cache lacks them; returns how many were put."""
        groups = {i: self._group(i) for i in ids if i in self.db.facts}
        want = sorted(i for i, g in groups.items() if self.loaded.get(i) != g)
        single = [i for i in want if len(groups[i]) == 1]
        if single:
            self.cache.fill_residuals(self.db, self.facts, single)
            self.db.table.put(single, self.cache.residuals(single).to(self.db.table.device))
            self.loaded.update((i, (i,)) for i in single)
        put = len(single)
        joint = sorted({groups[i] for i in want if len(groups[i]) > 1})
        for group, res in zip(joint, self.cache.group_residuals(self.db, self.facts, joint) if joint else []):
            self.db.table.put(list(group), res.expand(len(group), -1).to(self.db.table.device))  # res (d,)
            self.loaded.update((j, group) for j in group)
            put += len(group)
        return put


def default_checkpoints(n: int) -> list[int]:
    ladder = [1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000, 1000000]
    cps = [c for c in ladder if c < n] if n > 1000 else [max(1, n // 4), max(1, n // 2)]
    return sorted(set(cps + [n]))


@torch.no_grad()
def latency(db: NeuralDB, texts: Sequence[str], batch: int, repeats: int) -> dict[str, float]:
    """Lookup time inside the forward pass, and its share of it, for prefill and one decode step."""
    model, tok, gate = db.model, db.tok, db.gate
    enc = tok(list(texts[:batch]), return_tensors="pt", padding=True).to(next(model.parameters()).device)
    sync = torch.cuda.synchronize if enc["input_ids"].is_cuda else (lambda: None)
    out: dict[str, float] = {"prefill_tokens": int(enc["input_ids"].numel()), "decode_tokens": enc["input_ids"].shape[0]}
    for phase in ("prefill", "decode"):
        look, full = [], []
        for _ in range(repeats + 1):
            if phase == "prefill":
                gate.timings = []
                sync(); t0 = time.perf_counter()
                model(**enc, use_cache=False)
            else:
                pre = model(**enc, use_cache=True)
                nxt = pre.logits[:, -1:].argmax(-1)
                mask = torch.cat([enc["attention_mask"], torch.ones_like(nxt)], 1)
                gate.timings = []
                sync(); t0 = time.perf_counter()
                model(input_ids=nxt, attention_mask=mask, use_cache=True, **cache_kwargs(model, returned_cache(pre)))
            sync()
            full.append(time.perf_counter() - t0)
            look.append(sum(gate.timings))
        look, full = look[1:], full[1:]  # the first is a warm-up
        out[f"{phase}_lookup_ms_median"] = 1e3 * statistics.median(look)
        out[f"{phase}_lookup_ms_p95"] = 1e3 * float(np.percentile(look, 95))
        out[f"{phase}_forward_ms_median"] = 1e3 * statistics.median(full)
        out[f"{phase}_lookup_share"] = statistics.median(l / f for l, f in zip(look, full))
    gate.timings = None
    return out


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def stage(m: int, t0: float, what: str) -> None:
    print(f"m={m}: {what} ({time.perf_counter() - t0:.0f} s into the checkpoint)", file=sys.stderr, flush=True)


QUALITY = ("efficacy", "generalization", "specificity", "greedy_efficacy", "greedy_generalization")


def plot(pre: dict[str, float], rows: list[dict[str, Any]], out: Path) -> list[str]:
    """quality.png: each score and fluency against m, the unedited model dashed in the same colour;
    cost.png: the false-open and changed-token shares, and the lookup's share of the forward."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install neuraldb[plots])")
        return []
    m = [r["m"] for r in rows]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, c in zip(QUALITY, colours):
        ax.plot(m, [r[key] for r in rows], marker="o", color=c, label=key.replace("_", " "))
        if key in pre:
            ax.axhline(pre[key], ls="--", lw=1, color=c)
    ax.set_title("editing scores (dashed: unedited model)"); ax.set_ylabel("%"); ax.set_ylim(-2, 102)
    bx.plot(m, [r["fluency"] for r in rows], marker="o", color=colours[0], label="fluency (n-gram entropy x100)")
    bx.axhline(pre.get("fluency", float("nan")), ls="--", lw=1, color=colours[0])
    tx = bx.twinx()
    tx.plot(m, [r["ppl_after"] for r in rows], marker="s", color=colours[1], label="WikiText-2 perplexity")
    tx.plot(m, [r["ppl_before"] for r in rows], ls="--", lw=1, color=colours[1])
    bx.set_title("fluency and perplexity (dashed: unedited)"); bx.set_ylabel("fluency"); tx.set_ylabel("perplexity")
    bx.legend(handles=bx.get_lines()[:1] + tx.get_lines()[:1], loc="lower left")
    for a in (ax, bx):
        a.set_xscale("log"); a.set_xlabel("facts in the database (m)"); a.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8); fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120); plt.close(fig)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(m, [100 * r["false_open"] for r in rows], marker="o", label="gate opened (false open)")
    ax.plot(m, [100 * (1 - r["identical"]) for r in rows], marker="s", label="next-token distribution changed")
    ax.set_title("WikiText-2 tokens touched by the database"); ax.set_ylabel("% of tokens")
    for phase in ("prefill", "decode"):
        bx.plot(m, [100 * r[f"{phase}_lookup_share"] for r in rows], marker="o", label=phase)
    bx.set_title("lookup's share of the forward pass"); bx.set_ylabel("% of forward time")
    for a in (ax, bx):
        a.set_xscale("log"); a.set_xlabel("facts in the database (m)"); a.grid(alpha=0.3); a.legend(); a.set_ylim(bottom=0)
    fig.tight_layout(); fig.savefig(out / "cost.png", dpi=120); plt.close(fig)
    return ["quality.png", "cost.png"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--data", default="counterfact", help="counterfact | zsre | synthetic | PATH to a facts file")
    g.add_argument("--facts", type=int, default=48)
    g.add_argument("--db", help="evaluate this saved database as it is (e.g. `neuraldb build`'s output), every "
                                "residual real and no cache: one row at its size, its facts in id order standing "
                                "for --facts (the sample is drawn from them as from the same facts given to --data; "
                                "--retention-data held-out takes its texts from --data's facts after them); its own "
                                "config, so --config, --layer and the thresholds do not apply")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", help="root of the named data sources (default: $NEURALDB_DATA, ../shared/data, "
                                      "then the bundled sample)")
    e = ap.add_argument_group("editing")
    e.add_argument("--config", help="EditConfig YAML or a profile file (default: the model's profile)")
    e.add_argument("--layer", type=int)
    e.add_argument("--gamma", type=float)
    e.add_argument("--head-gamma", type=float, help="the head check's threshold (EditConfig.head_gamma)")
    e.add_argument("--sink-gamma", type=float, help="the key threshold where the subject starts the text "
                                                     "(EditConfig.sink_gamma)")
    e.add_argument("--index", help="key index spec (Auto, Flat, Proj512, torch, ...)")
    e.add_argument("--chunk", type=int, default=64,
                   help="facts per residual file (computed together, in optimisation batches of the config's "
                        "residual_batch_size, like suffix lengths together)")
    e.add_argument("--key-chunk", type=int, default=256, help="facts per cached key file")
    e.add_argument("--subject-groups", choices=["on", "off"], default="on",
                   help="facts about one subject share one jointly optimised residual, as NeuralDB.add "
                        "writes them (off: each fact its own, as before session 18)")
    e.add_argument("--lazy-residuals", choices=["auto", "on", "off"], default="auto",
                   help="compute residuals only for facts whose gates open on evaluated tokens (exact; "
                        "auto: above 5000 facts)")
    v = ap.add_argument_group("evaluation")
    v.add_argument("--checkpoints", help="comma-separated m values (default: a ladder up to --facts)")
    v.add_argument("--eval-sample", type=int, default=48, help="facts scored at every checkpoint")
    v.add_argument("--sample-from", type=int, help="draw that sample from the first N facts (default: the first "
                                                   "checkpoint's), so a run of later checkpoints alone scores the "
                                                   "same facts as one that began lower")
    v.add_argument("--retention-texts", type=int, default=64)
    v.add_argument("--retention-data", default="held-out",
                   help="held-out (neighbourhood prompts of unedited facts + the model's continuations) | "
                        "wikitext (WikiText-2 test paragraphs from the shared data) | PATH to a WikiText raw file")
    v.add_argument("--fluency-tokens", type=int, default=40, help="0 skips fluency")
    v.add_argument("--fluency-sample", type=int, help="generate from this many sample facts (default: all)")
    v.add_argument("--latency-batch", type=int, default=8)
    v.add_argument("--latency-repeats", type=int, default=10)
    r = ap.add_argument_group("run")
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", default="results/scale")
    r.add_argument("--profile", action="store_true", help="save a torch.profiler trace of a few forwards")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    cache: ChunkCache | None = None
    if args.db:  # a built database as it is: every residual real, nothing cached or inserted here
        db = NeuralDB.load(args.db, model, tok)
        order = sorted(db.facts)  # database ids, in the order the facts were added
        facts = [db.facts[i] for i in order]
        held_out, sources = [], {str(args.db): len(facts)}
        if args.retention_data == "held-out":
            held_out = get_facts(args.data, len(facts), args.seed, extra=args.retention_texts,
                                 data_dir=args.data_dir)[1]
        checkpoints, lazy = [len(facts)], False
    else:
        cfg = load_config(args.config) if args.config else None
        if args.head_gamma is not None or args.sink_gamma is not None:
            cfg = (cfg or model_defaults(model_name(model), model.config.model_type)).replace(
                head_gamma=args.head_gamma, sink_gamma=args.sink_gamma)
        db = NeuralDB(model, tok, cfg, layer=args.layer, gamma=args.gamma, index=args.index)
        # Residuals are cached per fact and computed lazily, so each must depend on its fact alone:
        # a fact alone about its subject gets its own; a group's shared one (--subject-groups, as
        # NeuralDB.add writes it) is computed where the group is loaded (Residuals).
        db.config = db.config.replace(subject_groups=False)
        facts, held_out, sources = get_facts(args.data, args.facts, args.seed, extra=args.retention_texts,
                                             data_dir=args.data_dir)
        order = list(range(len(facts)))
        checkpoints = [int(c) for c in args.checkpoints.split(",")] if args.checkpoints else \
            default_checkpoints(len(facts))
        if checkpoints[-1] > len(facts):
            raise SystemExit(f"--checkpoints: {checkpoints[-1]} is more than --facts {len(facts)}")
        cache = open_cache(out / "cache", db, args, facts)
        lazy = args.lazy_residuals == "on" or (args.lazy_residuals == "auto" and len(facts) > 5000)
        cache.fill_keys(db, facts)
        if not lazy:
            cache.fill_residuals(db, facts, range(len(facts)))
        resid = Residuals(db, cache, facts, groups=args.subject_groups == "on")
    log.warning("facts: %s", ", ".join(f"{c} {name}" for name, c in sources.items()))
    kind = facts[0].kind

    rng = random.Random(args.seed)
    first = facts[: args.sample_from or checkpoints[0]]
    sample = rng.sample(first, min(args.eval_sample, len(first)))
    score = zsre_scores if kind == "zsre" else counterfact_scores
    unrelated = [p for f in held_out for p in f.neighborhood][: args.retention_texts]
    if not unrelated:
        unrelated = [p for f in facts for p in f.neighborhood][: args.retention_texts]
    with db.disabled():  # unrelated prompts + the unedited model's own continuations, or Wikipedia text
        if args.retention_data == "held-out":
            texts = [p + db.generate(p, 12) for p in tqdm(unrelated, desc="held-out text", disable=None, leave=False)]
        else:
            src = resolve("wikitext", args.data_dir).path if args.retention_data == "wikitext" else args.retention_data
            texts = wikitext_passages(src, args.retention_texts)
        pre_scores = score(model, tok, sample)
        pre = pre_scores.as_dict()
        unedited = {k: v[2] for k, v in pre_scores.outcomes.items()}  # per-prompt outcomes, for the clean split
        flu_prompts = [p for f in sample for p in (f.generation_prompts[:1] or (f.text,))][: args.fluency_sample]
        pre["fluency"] = fluency(model, tok, flu_prompts, args.fluency_tokens) if args.fluency_tokens else float("nan")
    db_id = {f.id: order[i] for i, f in enumerate(first)}  # the sample is drawn from the first checkpoint's facts
    # a finished checkpoint's row is kept, so a resumed run evaluates only what is left
    eval_sig = {k: getattr(args, k) for k in ("eval_sample", "retention_texts", "retention_data", "fluency_tokens",
                                              "fluency_sample", "latency_batch", "latency_repeats")}
    if args.subject_groups == "on":  # rows kept from before the flag had independent residuals
        eval_sig["subject_groups"] = True
    eval_sig["sample_from"] = len(first)  # the sample is drawn from the first checkpoint's facts (or --sample-from's)
    eval_sig["gate"] = {k: v for k, v in to_mapping(db.config).items() if k in GATE_ONLY}  # the cache spans gates; a row does not

    def measure(fn: Any) -> Any:  # lazily: repeat until no evaluated token opens a fact without its residual
        return until_no_new_facts(db, fn, resid.load) if lazy else fn()

    rows, done = [], 0
    for m in checkpoints:
        if cache is None:  # --db: the database as it was built
            kept, earlier = None, {}
        else:
            db.insert(list(range(done, m)), facts[done:m], cache.keys(done, m).to(args.device), None)
            done = m
            kept = cache.res_root / f"row_{m}.json"
            earlier = json.loads(kept.read_text()) if kept.is_file() else {}
        if kept is not None and earlier.get("eval") == eval_sig:
            row = earlier["row"]
            if "specificity_clean" not in row:  # kept from before the column: score the sample again, nothing else
                stage(m, time.perf_counter(), "scoring the sample for columns added since the row was kept")
                scores = measure(lambda: score(model, tok, sample))
                added = gate_attribution(db, scores.outcomes, db_id, unedited)
                row.update({k: v for k, v in added.items() if k not in row})
                write_json(kept, {"eval": eval_sig, "row": row})
            rows.append(row)
            print(f"m={m}: row kept from an earlier run ({kept})", file=sys.stderr, flush=True)
            continue
        if cache is not None and not lazy:
            resid.load(set(range(m)))
        t0 = time.perf_counter()
        stage(m, t0, "scoring the sample")
        scores = measure(lambda: score(model, tok, sample))
        post = scores.as_dict()
        post.update(gate_attribution(db, scores.outcomes, db_id, unedited))
        stage(m, t0, "fluency")
        post["fluency"] = measure(lambda: fluency(model, tok, flu_prompts, args.fluency_tokens)) \
            if args.fluency_tokens else float("nan")
        stage(m, t0, "retention")
        ret = measure(lambda: retention(db, texts).as_dict())
        stage(m, t0, "latency")
        head_bytes = db.heads.nbytes if db.heads is not None else 0
        row = {"m": m, **{k: v for k, v in post.items() if k != "n"},
               "false_open": ret["false_open_rate"], "identical": ret["identical_rate"], "kl": ret["mean_kl"],
               "kl_at_open": ret["kl_at_open"], "kl_after_open": ret["kl_after_open"], "reached": ret["reached_rate"],
               "ppl_before": ret["ppl_before"], "ppl_after": ret["ppl_after"],
               "key_bytes": db.index.nbytes, "residual_bytes": db.table.nbytes, "head_bytes": head_bytes,
               "bytes_per_fact": (db.index.nbytes + db.table.nbytes + head_bytes) / m,  # allocated (whole shards)
               # one fp32 key + residual, and an fp16 head row (head key + spans) with the head check
               "payload_bytes_per_fact": 4 * (db.d_key + db.d_res) + 2 * (db.d_row - db.d_key),
               **(cache.throughput(m) if cache is not None else {}),
               **latency(db, texts, args.latency_batch, args.latency_repeats),
               **peak_memory(), "eval_s": time.perf_counter() - t0, "residuals_in_db": len(db.table.ids()),
               "residuals_computed": cache.computed() if cache is not None else len(db.table.ids())}
        rows.append(row)
        if kept is not None:
            write_json(kept, {"eval": eval_sig, "row": row})
        print(f"m={m}: efficacy {row['efficacy']:.1f} generalization {row['generalization']:.1f} specificity "
              f"{row['specificity']:.1f} greedy {row['greedy_efficacy']:.1f} false-open {row['false_open']:.4f} "
              f"lookup(prefill) {row['prefill_lookup_ms_median']:.2f} ms, {row['residuals_in_db']} residuals",
              file=sys.stderr, flush=True)

    trace = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        enc = tok(texts[: args.latency_batch], return_tensors="pt", padding=True).to(args.device)
        with profile(activities=acts, record_shapes=True) as prof, torch.no_grad():
            for _ in range(3):
                model(**enc)
        trace = out / "trace.json"
        prof.export_chrome_trace(str(trace))
        (out / "profile.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    cols = ["m", "efficacy", "generalization", "specificity", "specificity_clean", "specificity_clean_unedited",
            "specificity_opened_edited", "greedy_efficacy", "greedy_generalization", "fluency",
            "false_open", "identical", "kl", "kl_at_open", "kl_after_open", "ppl_after",
            "bytes_per_fact", "keys_per_s", "residuals_per_s", "prefill_lookup_ms_median", "prefill_lookup_share",
            "decode_lookup_ms_median", "decode_lookup_share", "peak_rss_gib"]
    pre_row = {"m": "pre-edit", **{k: v for k, v in pre.items() if k != "n"},
               "ppl_after": rows[0]["ppl_before"] if rows else float("nan")}
    table = markdown_table([pre_row] + rows, cols)
    result = {"args": vars(args), "config": to_mapping(db.config), "model": db.fingerprint(), "machine": machine(),
              "data": {"kind": kind, "facts": len(facts), "sources": sources, "eval_sample": len(sample),
                       "retention_texts": len(texts)},
              "lazy_residuals": lazy,
              "pre": pre, "rows": rows, "trace": str(trace) if trace else None,
              "wall_s": time.perf_counter() - t_start}
    result["plots"] = plot(pre, rows, out)
    write_outputs(out, "scale", result, f"bench/scale.py: {args.model}, {args.data}, layer {db.layer}, gamma "
                                        f"{db.config.gamma}, index {db.config.index}", table)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_main(main, "bench/scale.py")
