"""Editing metrics as MEMIT computes them (kmeng01/memit experiments/py/eval_utils_*.py),
written anew: CounterFact NLL comparisons, zsRE teacher-forced token accuracy, fluency as
weighted n-gram entropy, and retention of the unedited model's behaviour on unrelated text."""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..engine.arch import model_device
from ..engine.residuals import logits_at
from ..engine.tokens import pad_right, target_ids


def _batches(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _sum_by(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) float64 sums of `values` grouped by `owner`."""
    return torch.zeros(n, dtype=torch.float64, device=values.device).index_add(0, owner, values.double())


@torch.no_grad()
def teacher_forced(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                   targets: Sequence[str], batch_size: int = 32) -> tuple[list[float], list[float]]:
    """For each (prompt, target): mean token NLL of " target" after the prompt, and the share of
    its tokens that are the argmax given the true prefix (zsRE token accuracy)."""
    device = model_device(model)
    nll_out, acc_out = [], []
    for sl in _batches(len(prompts), batch_size):
        seqs, rows, pos, toks, owner = [], [], [], [], []
        for k, (p, t) in enumerate(zip(prompts[sl], targets[sl])):
            pid, tid = tok(p)["input_ids"], target_ids(tok, t)
            for j, tk in enumerate(tid):
                rows.append(k)
                pos.append(len(pid) - 1 + j)
                toks.append(tk)
                owner.append(k)
            seqs.append(pid + tid[:-1])
        ids, mask = pad_right(seqs, tok.pad_token_id, device)  # (B, T)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]  # (B, T, d)
        r, p_, t_ = (torch.tensor(x, device=device) for x in (rows, pos, toks))
        logp = F.log_softmax(logits_at(model, hidden, r, p_), -1)  # (N, V)
        nll = -logp.gather(1, t_[:, None])[:, 0]
        hit = (logp.argmax(-1) == t_).float()
        o = torch.tensor(owner, device=device)
        n = _sum_by(torch.ones_like(nll), o, len(seqs))
        nll_out += (_sum_by(nll, o, len(seqs)) / n).tolist()
        acc_out += (_sum_by(hit, o, len(seqs)) / n).tolist()
    return nll_out, acc_out


def _pair_scores(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                 new: Sequence[str], true: Sequence[str]) -> np.ndarray:
    """1 where NLL(new) < NLL(true), per prompt."""
    n_new, _ = teacher_forced(model, tok, prompts, new)
    n_true, _ = teacher_forced(model, tok, prompts, true)
    return (np.asarray(n_new) < np.asarray(n_true)).astype(float)


@dataclass(frozen=True)
class Scores:
    efficacy: float
    generalization: float
    specificity: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"efficacy": self.efficacy, "generalization": self.generalization,
                "specificity": self.specificity, "n": self.n}


def _mean_per_record(values: np.ndarray, owners: Sequence[int], n: int) -> float:
    """Average within each record first, then over records (MEMIT), x100; nan if none."""
    if len(values) == 0:
        return float("nan")
    sums, counts = np.zeros(n), np.zeros(n)
    np.add.at(sums, owners, values)
    np.add.at(counts, owners, 1)
    have = counts > 0
    return float(100 * np.mean(sums[have] / counts[have]))


def counterfact_scores(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence) -> Scores:
    """Efficacy (rewrite prompt), generalization (paraphrases): share where the new object has
    lower NLL than the true one; specificity (neighbourhood prompts): share where the true one
    still wins. Facts without a true object are skipped."""
    facts = [f for f in facts if f.target_true]
    out = {}
    for name, prompts_of, want_new in (("efficacy", lambda f: [f.text], True),
                                       ("generalization", lambda f: list(f.paraphrases), True),
                                       ("specificity", lambda f: list(f.neighborhood), False)):
        prompts, new, true, owners = [], [], [], []
        for i, f in enumerate(facts):
            for p in prompts_of(f):
                prompts.append(p)
                new.append(f.target_new)
                true.append(f.target_true if want_new else (f.locality_target or f.target_true))
                owners.append(i)
        s = _pair_scores(model, tok, prompts, new, true) if prompts else np.zeros(0)
        out[name] = _mean_per_record(s if want_new else 1 - s, owners, len(facts))
    return Scores(out["efficacy"], out["generalization"], out["specificity"], len(facts))


def zsre_scores(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence) -> Scores:
    """Teacher-forced top-1 token accuracy of the new answer on the question (efficacy) and
    its rephrasings (generalization), and of `loc_ans` on the `loc` prompt (specificity)."""
    out = {}
    for name, prompts_of, target_of in (("efficacy", lambda f: [f.text], lambda f: f.target_new),
                                        ("generalization", lambda f: list(f.paraphrases), lambda f: f.target_new),
                                        ("specificity", lambda f: list(f.neighborhood) if f.locality_target else [],
                                         lambda f: f.locality_target)):
        prompts, targets, owners = [], [], []
        for i, f in enumerate(facts):
            for p in prompts_of(f):
                prompts.append(p)
                targets.append(target_of(f))
                owners.append(i)
        acc = np.asarray(teacher_forced(model, tok, prompts, targets)[1]) if prompts else np.zeros(0)
        out[name] = _mean_per_record(acc, owners, len(facts))
    return Scores(out["efficacy"], out["generalization"], out["specificity"], len(facts))


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """MEMIT's fluency of one text: mean over n of weight_n * entropy (bits) of its n-grams.
    Words are split by a regex (MEMIT uses nltk.word_tokenize; close on ordinary prose)."""
    words = _WORD.findall(text)
    ents = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ent = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        ents.append(w * ent)
    return float(np.mean(ents))


@torch.no_grad()
def fluency(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
            max_new_tokens: int = 100, batch_size: int = 8) -> float:
    """Mean n-gram entropy (x100, as MEMIT reports it) of greedy generations from `prompts`."""
    device = model_device(model)
    scores = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for sl in _batches(len(prompts), batch_size):
            enc = tok(list(prompts[sl]), return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            for row in gen:
                scores.append(ngram_entropy(tok.decode(row, skip_special_tokens=True)))
    finally:
        tok.padding_side = old_side
    return 100 * float(np.mean(scores)) if scores else float("nan")


@dataclass(frozen=True)
class Retention:
    false_open_rate: float  # share of gateable tokens whose gate opened
    identical_rate: float  # share of next-token distributions bit-identical to the unedited model
    mean_kl: float  # mean KL(unedited || edited) per token, nats
    ppl_before: float
    ppl_after: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def retention(db, texts: Sequence[str], batch_size: int = 16) -> Retention:
    """Compare the edited and the unedited model on unrelated `texts` token by token."""
    model, tok = db.model, db.tok
    device = model_device(model)
    opened = gateable = same = n_tok = n_pred = 0
    kl_sum = nll_before = nll_after = 0.0
    for sl in tqdm(list(_batches(len(texts), batch_size)), desc="retention", unit="batch", disable=None, leave=False):
        enc = tok(list(texts[sl]), return_tensors="pt", padding=True).to(device)
        with db.disabled():
            base = model(**enc).logits.float()  # (B, T, V)
        edited = model(**enc).logits.float()
        if db.gate is not None and db.gate.last is not None:
            opened += int(db.gate.last[2].sum())
        if db.gate is not None and db.gate.last_mask is not None:
            gateable += int(db.gate.last_mask.sum())
        m = enc["attention_mask"].bool()  # (B, T)
        same += int((base == edited).all(-1)[m].sum())
        n_tok += int(m.sum())
        lb, le = F.log_softmax(base, -1), F.log_softmax(edited, -1)
        kl_sum += float((lb.exp() * (lb - le)).sum(-1)[m].sum())
        nxt = enc["input_ids"][:, 1:]
        mm = m[:, 1:] & m[:, :-1]
        nll_before += float(-lb[:, :-1].gather(-1, nxt[..., None])[..., 0][mm].sum())
        nll_after += float(-le[:, :-1].gather(-1, nxt[..., None])[..., 0][mm].sum())
        n_pred += int(mm.sum())
    n_pred = max(n_pred, 1)
    return Retention(opened / max(gateable, 1), same / max(n_tok, 1), kl_sum / max(n_tok, 1),
                     math.exp(nll_before / n_pred), math.exp(nll_after / n_pred), n_tok)
