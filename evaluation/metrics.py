"""Editing metrics as MEMIT computes them (kmeng01/memit experiments/py/eval_utils_*.py),
written anew: CounterFact NLL comparisons, zsRE teacher-forced token accuracy, fluency as
weighted n-gram entropy, and retention of the unedited model's behaviour on unrelated text."""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

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
                 new: Sequence[str], true: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: 1 where NLL(new) < NLL(true), and 1 where the greedy continuation starts with
    `new` (every token of " new" is the argmax given the prompt and the new tokens before it:
    that is exactly what greedy decoding emits, with no generate call)."""
    n_new, acc_new = teacher_forced(model, tok, prompts, new)
    n_true, _ = teacher_forced(model, tok, prompts, true)
    return (np.asarray(n_new) < np.asarray(n_true)).astype(float), (np.asarray(acc_new) == 1.0).astype(float)


@dataclass(frozen=True)
class Scores:
    efficacy: float
    generalization: float
    specificity: float
    n: int
    greedy_efficacy: float = float("nan")  # share of rewrite prompts whose greedy answer is the new object
    greedy_generalization: float = float("nan")  # the same on paraphrases
    # per prompt kind: (prompts, the id of the fact each belongs to, 1.0 where it passed; zsRE
    # specificity: the prompt's token accuracy, what the metric averages)
    outcomes: dict[str, tuple[list[str], list[str | None], np.ndarray]] = field(
        default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {"efficacy": self.efficacy, "generalization": self.generalization,
                "specificity": self.specificity, "greedy_efficacy": self.greedy_efficacy,
                "greedy_generalization": self.greedy_generalization, "n": self.n}


def _mean_per_record(values: np.ndarray, owners: Sequence[int], n: int) -> float:
    """Average within each record first, then over records (MEMIT), x100; nan if none."""
    if len(values) == 0:
        return float("nan")
    sums, counts = np.zeros(n), np.zeros(n)
    np.add.at(sums, owners, values)
    np.add.at(counts, owners, 1)
    have = counts > 0
    return float(100 * np.mean(sums[have] / counts[have]))


def prompts_of(facts: Sequence, kind: str) -> tuple[list[str], list[int]]:
    """The prompts of one kind (efficacy: the rewrite prompt; generalization: paraphrases;
    specificity: neighbourhood prompts) and the index of the fact each belongs to."""
    prompts, owners = [], []
    for i, f in enumerate(facts):
        for p in {"efficacy": (f.text,), "generalization": f.paraphrases, "specificity": f.neighborhood}[kind]:
            prompts.append(p)
            owners.append(i)
    return prompts, owners


def counterfact_scores(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence) -> Scores:
    """Efficacy (rewrite prompt), generalization (paraphrases): share where the new object has
    lower NLL than the true one; specificity (neighbourhood prompts): share where the true one
    still wins; greedy efficacy / generalization: share where greedy decoding starts with the new
    object. Facts without a true object are skipped."""
    facts = [f for f in facts if f.target_true]
    out, outcomes = {}, {}
    for name in ("efficacy", "generalization", "specificity"):
        prompts, owners = prompts_of(facts, name)
        want_new = name != "specificity"
        new = [facts[i].target_new for i in owners]
        true = [facts[i].target_true if want_new else (facts[i].locality_target or facts[i].target_true) for i in owners]
        s, greedy = _pair_scores(model, tok, prompts, new, true) if prompts else (np.zeros(0), np.zeros(0))
        ok = s if want_new else 1 - s
        out[name] = _mean_per_record(ok, owners, len(facts))
        outcomes[name] = (prompts, [facts[i].id for i in owners], ok)
        if want_new:
            out[f"greedy_{name}"] = _mean_per_record(greedy, owners, len(facts))
    return Scores(out["efficacy"], out["generalization"], out["specificity"], len(facts),
                  out["greedy_efficacy"], out["greedy_generalization"], outcomes)


def zsre_scores(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence) -> Scores:
    """Teacher-forced top-1 token accuracy of the new answer on the question (efficacy) and
    its rephrasings (generalization), and of `loc_ans` on the `loc` prompt (specificity); greedy:
    share of prompts where every answer token is right (the greedy answer is the new one)."""
    out, outcomes = {}, {}
    for name in ("efficacy", "generalization", "specificity"):
        prompts, owners = prompts_of(facts, name)
        if name == "specificity":
            keep = [j for j, i in enumerate(owners) if facts[i].locality_target]
            prompts, owners = [prompts[j] for j in keep], [owners[j] for j in keep]
        targets = [facts[i].locality_target if name == "specificity" else facts[i].target_new for i in owners]
        acc = np.asarray(teacher_forced(model, tok, prompts, targets)[1]) if prompts else np.zeros(0)
        out[name] = _mean_per_record(acc, owners, len(facts))
        # per prompt: all answer tokens right; for specificity the metric's own unit, the token accuracy
        outcomes[name] = (prompts, [facts[i].id for i in owners], acc if name == "specificity" else (acc == 1.0).astype(float))
        if name != "specificity":
            out[f"greedy_{name}"] = _mean_per_record(outcomes[name][2], owners, len(facts))
    return Scores(out["efficacy"], out["generalization"], out["specificity"], len(facts),
                  out["greedy_efficacy"], out["greedy_generalization"], outcomes)


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


@torch.no_grad()
def perplexity(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over every predicted token of `texts` (what `retention` reports)."""
    device = model_device(model)
    nll, n = 0.0, 0
    for sl in _batches(len(texts), batch_size):
        enc = tok(list(texts[sl]), return_tensors="pt", padding=True).to(device)
        s, c = _next_token_nll(F.log_softmax(model(**enc).logits.float(), -1), enc)
        nll, n = nll + s, n + c
    return math.exp(nll / max(n, 1))


def _next_token_nll(logp: torch.Tensor, enc: Any) -> tuple[float, int]:
    """(sum of next-token NLL, tokens predicted) over the real tokens of a padded batch; logp (B, T, V)."""
    m = enc["attention_mask"].bool()  # (B, T)
    mm = m[:, 1:] & m[:, :-1]
    nll = -logp[:, :-1].gather(-1, enc["input_ids"][:, 1:, None])[..., 0]  # (B, T-1)
    return float(nll[mm].sum()), int(mm.sum())


@dataclass(frozen=True)
class Retention:
    false_open_rate: float  # share of gateable tokens whose gate opened
    identical_rate: float  # share of next-token distributions bit-identical to the unedited model
    mean_kl: float  # mean KL(unedited || edited) per token, nats
    kl_at_open: float  # mean KL at the tokens whose gate opened (harm per open, at the open)
    kl_after_open: float  # mean KL over the tokens at or after a text's first open (all an open can reach)
    reached_rate: float  # share of tokens at or after their text's first open
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
    opened = gateable = same = n_tok = n_pred = n_reached = 0
    kl_sum = kl_open = kl_reached = nll_before = nll_after = 0.0
    for sl in tqdm(list(_batches(len(texts), batch_size)), desc="retention", unit="batch", disable=None, leave=False):
        enc = tok(list(texts[sl]), return_tensors="pt", padding=True).to(device)
        with db.disabled():
            base = model(**enc).logits.float()  # (B, T, V)
        edited = model(**enc).logits.float()
        m = enc["attention_mask"].bool()  # (B, T)
        open_ = torch.zeros_like(m)
        if db.gate is not None and db.gate.last is not None:
            open_ = db.gate.last[2].reshape(m.shape).bool() & m  # (B, T)
            opened += int(open_.sum())
        if db.gate is not None and db.gate.last_mask is not None:
            gateable += int(db.gate.last_mask.sum())
        reached = (open_.cumsum(-1) > 0) & m  # (B, T): at or after the text's first open
        same += int((base == edited).all(-1)[m].sum())
        n_tok += int(m.sum())
        lb, le = F.log_softmax(base, -1), F.log_softmax(edited, -1)
        kl = (lb.exp() * (lb - le)).sum(-1)  # (B, T)
        kl_sum += float(kl[m].sum())
        kl_open += float(kl[open_].sum())
        kl_reached += float(kl[reached].sum())
        n_reached += int(reached.sum())
        (before, n), (after, _) = _next_token_nll(lb, enc), _next_token_nll(le, enc)
        nll_before, nll_after, n_pred = nll_before + before, nll_after + after, n_pred + n
    n_pred = max(n_pred, 1)
    return Retention(opened / max(gateable, 1), same / max(n_tok, 1), kl_sum / max(n_tok, 1),
                     kl_open / max(opened, 1), kl_reached / max(n_reached, 1), n_reached / max(n_tok, 1),
                     math.exp(nll_before / n_pred), math.exp(nll_after / n_pred), n_tok)
