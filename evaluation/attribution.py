"""Where editing quality is lost: for every scored prompt, which gate decision lies behind it.

A prompt of fact i (its rewrite prompt or a paraphrase) should open fact i's gate somewhere;
a neighbourhood prompt should open none. One forward pass per prompt under `db.record()` shows
which facts opened (gate decisions at layer l* depend on the tokens alone, so no residual is
needed), and the metric's own pass/fail per prompt (`Scores.outcomes`) says which prompts lost.
Shares are percentages of all prompts of that kind:

    efficacy / generalization: own (fact i opened), other (another fact opened, i did not: a
        wrong argmax above gamma), closed (no gate opened: i's similarity fell below gamma);
        fail_own / fail_other / fail_closed: the failed prompts split the same way.
    specificity: opened (a gate opened on a prompt about a neighbour), closed; fail_opened /
        fail_closed (a failure with every gate closed is the model's own); opened_edited: an
        opened fact's subject is named in the prompt (at 100k facts the neighbour is often itself
        an edited subject: such an open is the edit working, not a false one). `clean` is the
        specificity of the other prompts, and `clean_unedited` the unedited model's on them
        (given its per-prompt outcomes), the fair reference for it. A zsRE specificity prompt
        counts as failed when under half of its answer tokens are right (its outcome is the
        token accuracy the metric averages)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..engine.arch import model_device
from ..engine.facts import names_subject


def opened_per_prompt(db: Any, prompts: list[str], batch_size: int = 32) -> list[set[int]]:
    """The ids of the facts whose gate opened at any token of each prompt."""
    model, tok = db.model, db.tok
    out: list[set[int]] = [set() for _ in prompts]
    with torch.no_grad(), db.record() as passes:
        for s in range(0, len(prompts), batch_size):
            enc = tok(prompts[s : s + batch_size], return_tensors="pt", padding=True).to(model_device(model))
            model.base_model(**enc, use_cache=False)
            for h in passes[-1]:
                out[s + h.batch].add(h.fact_id)
    return out


names = names_subject  # whether a prompt names a subject as a whole word sequence


def gate_attribution(db: Any, outcomes: Mapping[str, tuple[list[str], list[str | None], np.ndarray]],
                     db_id: Mapping[str | None, int],
                     unedited: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """Flat {"<kind>_<category>": percent} for the outcomes of `counterfact_scores` or
    `zsre_scores`; `db_id` maps a fact's `id` to its id in the database; `unedited`: the
    unedited model's per-prompt outcomes, kind -> array (for `specificity_clean_unedited`)."""
    res: dict[str, float] = {}
    for kind, (prompts, owners, ok) in outcomes.items():
        if not prompts:
            continue
        opened = opened_per_prompt(db, prompts)
        failed = np.asarray(ok) < 0.5
        if kind == "specificity":
            cat = np.array(["opened" if o else "closed" for o in opened])
        else:
            cat = np.array(["own" if db_id.get(f) in o else "other" if o else "closed" for f, o in zip(owners, opened)])
        for c in (("opened", "closed") if kind == "specificity" else ("own", "other", "closed")):
            res[f"{kind}_{c}"] = float(100 * np.mean(cat == c))
            res[f"{kind}_fail_{c}"] = float(100 * np.mean(failed & (cat == c)))
        if kind == "specificity":
            edited = np.array([any(names(p, db.facts[i].subject) for i in o if i in db.facts)
                               for p, o in zip(prompts, opened)])
            res["specificity_opened_edited"] = float(100 * np.mean(edited))
            res["specificity_fail_opened_edited"] = float(100 * np.mean(failed & edited))
            clean = ~edited
            res["specificity_clean"] = float(100 * np.mean(np.asarray(ok)[clean])) if clean.any() else float("nan")
            if unedited is not None and kind in unedited and clean.any():
                res["specificity_clean_unedited"] = float(100 * np.mean(np.asarray(unedited[kind])[clean]))
    return res
