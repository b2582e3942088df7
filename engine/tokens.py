"""Tokenisation helpers: prompts with a known subject span, right padding, exact target ids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    subject_last: int  # index of the subject's last token in `ids`
    subject_first: int = -1  # index of its first token (-1: not located)


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Target tokens as they follow a prompt: a leading space, no BOS (MEMIT/AlphaEdit)."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def encode_with_subject(tok: PreTrainedTokenizerBase, prefix: str, template: str, subject: str,
                        truncate_after_subject: bool = False) -> Encoded:
    """Tokenise prefix + template.format(subject) and locate the subject's last and first tokens
    (the first: the first token that ends inside the subject; one merged with the text before
    it counts)."""
    before, _, after = template.partition("{}")
    head = prefix + before
    text = head + subject + ("" if truncate_after_subject else after)
    subj_end = len(head) + len(subject)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        span = [i for i, (s, e) in enumerate(offsets) if e > s and s < subj_end and e > len(head)]
        last = max(i for i, (s, e) in enumerate(offsets) if e > s and s < subj_end)
        first = min(span) if span else last
    else:  # MEMIT's rule: the length of the tokenised text up to the end of the subject
        ids = tok(text)["input_ids"]
        last = len(tok(text[:subj_end])["input_ids"]) - 1
        first = min(last, len(tok(head)["input_ids"]))  # BOS (if any) counted as in `last`
    return Encoded(list(ids), last, first)


def pad_right(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (B, T) input ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_len(prefix_ids: list[int], rows: Sequence[tuple[list[int], int]]) -> int:
    """Tokens that every row starts with, as tokenised alone, and that lie before every
    subject-last position (a prefix's last token may merge with the prompt's first)."""
    n = len(prefix_ids)
    for ids, last in rows:
        n = min(n, common_length(prefix_ids, ids), min(last) if isinstance(last, tuple) else last)
    return n
