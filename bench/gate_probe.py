"""A probe beside bench/gate.py, over its key cache: which facts open spuriously on WikiText-2
under a map (with the text that opened them), which facts take a paraphrase's argmax, and
per-fact thresholds max(gamma, the key's best cosine over a bank of other passages + delta).

    python bench/gate.py --data counterfact,synthetic --m 1000,10000,100000 --out results/gate-s14
    python bench/gate_probe.py --gate-out results/gate-s14 --m 100000 --bank-texts 400"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from neuraldb import NeuralDB, load_model
from neuraldb.bench import gate as G
from neuraldb.bench.scale import get_facts
from neuraldb.data import resolve
from neuraldb.engine.gate_map import load_map

torch.set_grad_enabled(False)
t0 = time.time()
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--gate-out", default="results/gate", help="bench/gate.py's --out (its key cache)")
ap.add_argument("--m", type=int, default=100000)
ap.add_argument("--bank-from", type=int, default=700, help="first WikiText-2 passage of the bank")
ap.add_argument("--bank-texts", type=int, default=400)
ap.add_argument("--map", default="smollm2-135m-l6-ctx5")
args = ap.parse_args()
M, BANK_FROM, BANK_N = args.m, args.bank_from, args.bank_texts
model, tok = load_model(G.DEFAULT_MODEL)
db = NeuralDB(model, tok, attach=False)
wide = G.wide_space(model, db.layer)
pool, _, sources = get_facts("counterfact,synthetic", M, 0, extra=1)
facts = list(pool)
cache = Path(args.gate_out) / "cache" / f"{Path(G.DEFAULT_MODEL).name}-L{db.layer}-counterfact+synthetic-s0"
keys_raw = G.fact_keys(db, wide, facts, cache, 1024).float()
rng = np.random.default_rng(0)
sample = sorted(rng.choice(1000, size=500, replace=False).tolist())
para_rows = [(i, p) for i in sample for p in facts[i].paraphrases if facts[i].subject in p or "{}" in p]
pas = G.wikitext_passages(resolve("wikitext", None).path, 160, max_words=110)
test = pas[40:]
q_para = G.subject_queries(db, wide, [(facts[i], p) for i, p in para_rows])
q_wiki, where = G.text_queries(db, wide, test, 160)
bank_pas = G.wikitext_passages(resolve("wikitext", None).path, BANK_FROM + BANK_N, max_words=110)[BANK_FROM:]
q_bank, _ = G.text_queries(db, wide, bank_pas, 160)
print(f"queries ready {time.time() - t0:.0f}s: para {len(q_para)} wiki {len(q_wiki)} bank {len(q_bank)}", flush=True)

design = G.Design.parse("ffn+ctx5")
gm = load_map(args.map)
group = G.subject_groups(facts)
n_cf = sources.get("counterfact", 0)  # facts [0, n_cf) are CounterFact's, the rest synthetic
out = {}
for name, dv in [("map", lambda x: gm(G.derive(wide, design, x, None))), ("plain", lambda x: G.derive(wide, design, x, None))]:
    K = dv(keys_raw[:M])
    qp, qw, qb = dv(q_para), dv(q_wiki), dv(q_bank)
    own = torch.tensor([i for i, _ in para_rows])
    sp, ip = G.top1(K, qp)
    sw, iw = G.top1(K, qw)
    men = torch.tensor([facts[j].subject in test[t][:end] for j, (t, end) in zip(iw.tolist(), where)])
    lost = (ip != own).nonzero()[:, 0].tolist()
    same = int((group[ip[lost]] == group[own[lost]]).sum())
    print(f"{name}: paraphrase argmax lost {len(lost)}/{len(own)}, to a same-subject fact {same}", flush=True)
    for k in lost[:12]:
        print(f"    {para_rows[k][1]!r} -> {facts[int(ip[k])].subject!r} ({facts[int(ip[k])].prompt!r}) {sp[k]:.3f}")
    bank = G.top1(qb, K)[0]  # (M,) each key's best cosine over the bank
    print(f"{name}: bank done {time.time() - t0:.0f}s; bank quantiles",
          [round(float(x), 3) for x in torch.quantile(bank[:50000], torch.tensor([0.5, 0.9, 0.99, 0.999]))], flush=True)
    for g in (0.82, 0.86, 0.9):
        o = (sw > g) & ~men
        ids = iw[o]
        cnt = torch.bincount(ids, minlength=M)
        top = torch.argsort(cnt, descending=True)[:15]
        print(f"  {name} gamma {g}: spurious {int(o.sum())} / {len(sw)} = {100 * o.float().mean():.3f}%, "
              f"distinct winners {int((cnt > 0).sum())}, from CounterFact {int((ids < n_cf).sum())}, "
              f"own-open {100 * ((ip == own) & (sp > g)).float().mean():.1f}%")
        for j in top[:10].tolist():
            if cnt[j] == 0:
                break
            toks = [k for k in torch.nonzero(o & (iw == j))[:, 0].tolist()][:3]
            ctx = [test[where[k][0]][max(0, where[k][1] - 30): where[k][1]] for k in toks]
            print(f"    {int(cnt[j])}x {facts[j].subject!r} (bank {bank[j]:.3f}) <- {ctx}")
    # per-key thresholds: open iff cos > max(gamma, bank_j + delta)
    grid = np.round(np.arange(0.6, 1.0, 0.005), 3)
    res = {}
    for delta in (None, 0.0, 0.02, 0.05, 0.08):
        pts = []
        for g in grid:
            tp = torch.full_like(sp, g) if delta is None else torch.maximum(torch.full_like(sp, g), bank[ip] + delta)
            tw = torch.full_like(sw, g) if delta is None else torch.maximum(torch.full_like(sw, g), bank[iw] + delta)
            pts.append((float(((sw > tw) & ~men).float().mean()), float(((ip == own) & (sp > tp)).float().mean()), float(g)))
        row = []
        for f in (1e-2, 1e-3, 5e-4, 1e-4):
            best = max((p for p in pts if p[0] <= f), key=lambda p: p[1], default=(0, 0, 0))
            row.append(f"{100 * best[1]:.1f} ({best[2]})")
        res[str(delta)] = {"points": pts, "row": row}
        print(f"  {name} delta {delta}: own-open at 1% / 0.1% / 0.05% / 0.01%: {row}", flush=True)
    out[name] = res
(Path(args.gate_out) / f"probe-{M}-{BANK_N}.json").write_text(json.dumps(out))
print(f"done {time.time() - t0:.0f}s")
