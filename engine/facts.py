"""The `Fact` type and loaders for CounterFact (EasyEdit-style and MEMIT `requested_rewrite`),
zsRE (MEMIT field set) and neuraldb's own JSONL.

neuraldb JSONL, one object per line:
    {"id": "cf-0", "subject": "Danielle Darrieux",
     "prompt": "The mother tongue of {} is",          # "{}" marks the subject; or the subject verbatim
     "target_new": "English", "target_true": "French", # target_true optional
     "paraphrases": ["..."], "neighborhood": ["..."], "locality_target": "French",
     "generation_prompts": ["..."]}                     # all lists optional, full prompts
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm


class FactError(ValueError):
    """A fact record that cannot be used; the message names the record and field."""


@dataclass(frozen=True)
class Fact:
    subject: str
    prompt: str  # a template: "{}" stands for the subject (a verbatim subject is converted)
    target_new: str
    target_true: str | None = None
    id: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    locality_target: str | None = None
    generation_prompts: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # The rule every way of making a fact shares (the API, the loaders, the server, a loaded
        # database): a verbatim subject becomes "{}", anything unusable raises naming the field.
        where = "Fact" if self.id is None else f"Fact {self.id!r}"
        subject, prompt, target_new = checked_fields(self.subject, self.prompt, self.target_new, where)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "target_new", target_new)
        if self.target_true is not None and not (isinstance(self.target_true, str) and self.target_true.strip()):
            if isinstance(self.target_true, str):
                object.__setattr__(self, "target_true", None)  # "" means unknown
            else:
                raise FactError(f"{where}: field 'target_true' must be a string")
        for name in ("paraphrases", "neighborhood", "generation_prompts"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def kind(self) -> str:
        """"zsre" for zsRE-style facts (scored by token accuracy), else "counterfact"."""
        return "zsre" if self.meta.get("format") == "zsre" else "counterfact"

    @property
    def text(self) -> str:
        """The edited prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "subject": self.subject, "prompt": self.prompt,
                               "target_new": self.target_new}
        for k in ("target_true", "locality_target"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        for k in ("paraphrases", "neighborhood", "generation_prompts"):
            if getattr(self, k):
                out[k] = list(getattr(self, k))
        if self.meta:
            out["meta"] = self.meta
        return out


def checked_fields(subject: Any, prompt: Any, target_new: Any, where: str) -> tuple[str, str, str]:
    """`(subject, prompt template, target_new)` validated and normalised; `prompt` may hold "{}" or
    the subject verbatim (its first occurrence becomes "{}"). Errors name `where` and the field."""
    for name, value in (("subject", subject), ("prompt", prompt), ("target_new", target_new)):
        if not isinstance(value, str) or not value.strip():
            raise FactError(f"{where}: field '{name}' is missing or empty")
    subject = subject.strip()
    if "{}" not in prompt:
        if subject not in prompt:
            raise FactError(f"{where}: field 'prompt' {prompt!r} holds neither '{{}}' nor the subject {subject!r}")
        prompt = prompt.replace("{", "{{").replace("}", "}}").replace(subject, "{}", 1)
    elif prompt.count("{}") != 1:
        raise FactError(f"{where}: field 'prompt' {prompt!r} must mark the subject with exactly one '{{}}'")
    try:
        prompt.format(subject)
    except (IndexError, KeyError, ValueError) as exc:
        raise FactError(f"{where}: field 'prompt' {prompt!r} has stray braces ({exc})") from exc
    return subject, prompt, target_new.strip()


def make_fact(subject: Any, prompt: Any, target_new: Any, where: str, **extra: Any) -> Fact:
    """Validate and build a fact; `prompt` may hold "{}" or the subject verbatim. Errors name `where`."""
    subject, prompt, target_new = checked_fields(subject, prompt, target_new, where)
    return Fact(subject=subject, prompt=prompt, target_new=target_new, **extra)  # Fact drops an empty target_true


def _strings(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FactError(f"{where}: field '{name}' must be a string or a list of strings")
    return tuple(value)


def _counterfact_memit(rec: dict[str, Any], where: str) -> Fact:
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise FactError(f"{where}: field 'requested_rewrite' must be an object")
    tn, tt = rw.get("target_new") or {}, rw.get("target_true") or {}
    return make_fact(
        rw.get("subject"), rw.get("prompt"), tn.get("str") if isinstance(tn, dict) else None, where,
        target_true=tt.get("str") if isinstance(tt, dict) else None,
        id=str(rec.get("case_id", "")) or None,
        paraphrases=_strings(rec.get("paraphrase_prompts"), where, "paraphrase_prompts"),
        neighborhood=_strings(rec.get("neighborhood_prompts"), where, "neighborhood_prompts"),
        locality_target=tt.get("str") if isinstance(tt, dict) else None,
        generation_prompts=_strings(rec.get("generation_prompts"), where, "generation_prompts"),
    )


def _counterfact_easyedit(rec: dict[str, Any], where: str) -> Fact:
    return make_fact(
        rec.get("subject"), rec.get("prompt"), rec.get("target_new"), where,
        target_true=rec.get("ground_truth"),
        id=str(rec["case_id"]) if "case_id" in rec else None,
        paraphrases=_strings(rec.get("rephrase_prompt"), where, "rephrase_prompt"),
        neighborhood=_strings(rec.get("locality_prompt"), where, "locality_prompt"),
        locality_target=rec.get("locality_ground_truth"),
    )


def _zsre(rec: dict[str, Any], where: str) -> Fact:
    answers = rec.get("answers")
    true = answers[0] if isinstance(answers, list) and answers else None
    loc = rec.get("loc")
    return make_fact(
        rec.get("subject"), rec.get("src"), rec.get("alt"), where,
        target_true=true,
        id=str(rec["case_id"]) if "case_id" in rec else None,
        paraphrases=_strings(rec.get("rephrase"), where, "rephrase"),
        neighborhood=(loc + "?",) if isinstance(loc, str) and loc else (),  # MEMIT scores loc + "?"
        locality_target=rec.get("loc_ans"),
        meta={"pred": rec["pred"]} if "pred" in rec else {},
    )


def fact_from_json(rec: dict[str, Any], where: str) -> Fact:
    """A fact from its documented JSON form (`Fact.to_json`); errors name `where`."""
    allowed = {"id", "subject", "prompt", "target_new", "target_true", "paraphrases", "neighborhood",
               "locality_target", "generation_prompts", "meta"}
    unknown = sorted(set(rec) - allowed)
    if unknown:
        raise FactError(f"{where}: unknown field(s) {unknown}")
    return make_fact(
        rec.get("subject"), rec.get("prompt"), rec.get("target_new"), where,
        target_true=rec.get("target_true"),
        id=str(rec["id"]) if rec.get("id") is not None else None,
        paraphrases=_strings(rec.get("paraphrases"), where, "paraphrases"),
        neighborhood=_strings(rec.get("neighborhood"), where, "neighborhood"),
        locality_target=rec.get("locality_target"),
        generation_prompts=_strings(rec.get("generation_prompts"), where, "generation_prompts"),
        meta=rec.get("meta") or {},
    )


FORMATS = {
    "counterfact-memit": _counterfact_memit,
    "counterfact": _counterfact_easyedit,
    "zsre": _zsre,
    "jsonl": fact_from_json,
}


def detect_format(rec: dict[str, Any]) -> str:
    if "requested_rewrite" in rec:
        return "counterfact-memit"
    if "src" in rec and "alt" in rec:
        return "zsre"
    if "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec:
        return "counterfact"
    return "jsonl"


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FactError(f"{path}: not valid JSON ({exc})") from exc
        for i, rec in enumerate(data):
            yield f"{path} record {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise FactError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc


def record_to_fact(rec: Any, where: str, fmt: str = "auto", index: int = 0) -> Fact:
    """One record in any supported format (`fmt`, or detected) as a `Fact`; a record without an
    id gets `index`. Errors name `where`."""
    if not isinstance(rec, dict):
        raise FactError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    kind = detect_format(rec) if fmt == "auto" else fmt
    if kind not in FORMATS:
        raise FactError(f"unknown facts format {fmt!r}; choose from {sorted(FORMATS)} or 'auto'")
    try:
        fact = FORMATS[kind](rec, where)
    except KeyError as exc:
        raise FactError(f"{where}: field {exc} is missing") from None
    if fact.id is None:
        fact = replace(fact, id=str(index))
    if kind != "jsonl":
        fact = replace(fact, meta={**fact.meta, "format": kind})
    return fact


def parse_records(records: Iterable[tuple[str, Any]], fmt: str = "auto") -> list[Fact]:
    facts: list[Fact] = []
    seen: dict[str, str] = {}
    for where, rec in tqdm(records, desc="facts", unit="fact", leave=False, disable=None):
        fact = record_to_fact(rec, where, fmt, len(facts))
        if fact.id in seen:
            raise FactError(f"{where}: duplicate id {fact.id!r} (first seen at {seen[fact.id]})")
        seen[fact.id] = where
        facts.append(fact)
    return facts


def load_facts(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[Fact]:
    """Read facts from a JSON array or JSONL file in any supported format (auto-detected)."""
    path = Path(path)
    if not path.is_file():
        raise FactError(f"{path}: facts file not found")

    def limited() -> Iterator[tuple[str, Any]]:
        for n, item in enumerate(_records(path)):
            if limit is not None and n >= limit:
                return
            yield item

    facts = parse_records(limited(), fmt)
    if not facts:
        raise FactError(f"{path}: no facts found")
    return facts


def save_facts_jsonl(facts: Iterable[Fact], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for f in facts:
            fh.write(json.dumps(f.to_json(), ensure_ascii=False) + "\n")


def names_subject(text: str, subject: str) -> bool:
    """Whether `text` names `subject` as a whole word sequence (case-sensitive)."""
    return bool(subject) and subject in text and re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", text) is not None
