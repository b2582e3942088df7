"""Unrelated text for retention measurements: WikiText-2 raw passages (real Wikipedia text)."""
from __future__ import annotations

from pathlib import Path


def wikitext_passages(path: str | Path, n: int | None, max_words: int = 120, min_words: int = 40) -> list[str]:
    """The first `n` (None: all) paragraphs of a WikiText raw file with at least `min_words` words, each
    cut to `max_words` words; headings (" = Title = ") are skipped. WikiText's tokenisation
    artefacts (" @-@ ", " , ") are kept as they are: the same text before and after an edit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: WikiText raw file not found")
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            text = line.strip()
            if not text or text.startswith("="):
                continue
            words = text.split()
            if len(words) >= min_words:
                out.append(" ".join(words[:max_words]))
                if len(out) == n:
                    break
    if n is not None and len(out) < n:
        raise ValueError(f"{path}: only {len(out)} paragraphs of >= {min_words} words, asked for {n}")
    return out
