"""Named data sources (`counterfact`, `zsre`, `wikitext`, and the six general-ability tasks
`mmlu`, `sciq`, `commonsense_qa`, `arc_challenge`, `lambada_openai`, `wsc273`) resolved to
files, in this order:

1. `data_dir` (a `--data-dir` option) or `$NEURALDB_DATA`;
2. `../shared/data` beside the checkout (the full data sets of this workspace);
3. a small sample shipped inside the package (`neuraldb/data/sample`: 300 CounterFact cases,
   200 zsRE records, 80 WikiText-2 paragraphs, 24 rows of each general task; licences in
   `sample/LICENSES.md`).

A source found nowhere is a `DataError` (a `FileNotFoundError`) whose one line names every
place looked. `where()` tells which step a source came from, so results can say so."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

# source -> files under a data root, in the order they are read (CounterFact: edit split, then train)
SOURCES: dict[str, tuple[str, ...]] = {
    "counterfact": ("counterfact/counterfact-edit.json", "counterfact/counterfact-train.json"),
    "zsre": ("zsre/zsre-1k.json",),
    "wikitext": ("wikitext/wiki.test.raw",),
    # the six lm-evaluation-harness tasks (HF field layouts, one JSON object a line)
    "mmlu": ("general/mmlu/test.jsonl", "general/mmlu/dev.jsonl"),
    "sciq": ("general/sciq/test.jsonl",),
    "commonsense_qa": ("general/commonsense_qa/validation.jsonl",),
    "arc_challenge": ("general/arc_challenge/test.jsonl",),
    "lambada_openai": ("general/lambada_openai/test.jsonl",),
    "wsc273": ("general/wsc273/test.jsonl",),
}


class DataError(FileNotFoundError):
    """A named data source that is in none of the places looked."""


@dataclass(frozen=True)
class Resolved:
    name: str
    files: tuple[Path, ...]  # the files of the source that exist at `root`, in reading order
    root: Path
    origin: str  # "data-dir", "NEURALDB_DATA", "shared" or "sample"

    @property
    def path(self) -> Path:
        """The first file (single-file sources)."""
        return self.files[0]


def sample_root() -> Path:
    return Path(str(resources.files("neuraldb.data").joinpath("sample")))


def shared_root() -> Path:
    """`../shared/data` beside the checkout this package is imported from."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def roots(data_dir: str | Path | None = None) -> list[tuple[Path, str]]:
    """The places looked, in order, with their origin names."""
    out: list[tuple[Path, str]] = []
    if data_dir is not None:
        out.append((Path(data_dir), "data-dir"))
    elif os.environ.get("NEURALDB_DATA"):
        out.append((Path(os.environ["NEURALDB_DATA"]), "NEURALDB_DATA"))
    out += [(shared_root(), "shared"), (sample_root(), "sample")]
    return out


def resolve(name: str, data_dir: str | Path | None = None) -> Resolved:
    """The files of source `name` from the first place that holds its first file."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    first, *rest = SOURCES[name]
    looked = []
    for root, origin in roots(data_dir):
        if (root / first).is_file():
            files = (root / first, *(root / r for r in rest if (root / r).is_file()))
            if origin == "sample":
                log.warning("data source %r: using the bundled sample (%s); set --data-dir or NEURALDB_DATA "
                            "for the full data set", name, root)
            return Resolved(name, files, root, origin)
        looked.append(str(root / first))
    raise DataError(f"data source {name!r} not found; looked in: {', '.join(looked)}")


def is_source(name: str) -> bool:
    return name in SOURCES


def source_file(name_or_path: str | Path, data_dir: str | Path | None = None) -> Path:
    """A source name's first file (`counterfact` -> its edit split), or the path as given."""
    return resolve(str(name_or_path), data_dir).path if is_source(str(name_or_path)) else Path(name_or_path)
