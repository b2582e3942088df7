"""Shared bench helpers: the machine and versions recorded with every result, JSON output,
progress that stays readable off a terminal."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import torch

from neuraldb.engine.progress import Progress

T = TypeVar("T")


def machine() -> dict[str, Any]:
    import faiss
    import numpy
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "faiss": faiss.__version__, "numpy": numpy.__version__, "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = fh.read()
        field = lambda key: next((ln.split(":", 1)[1] for ln in cpu.splitlines() if ln.startswith(key)), "")  # noqa: E731
        info["cpu"] = field("model name").strip() or None
        flags = field("flags").split()
        info["cpu_bf16"] = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]  # what residual_dtype auto reads
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


NEUTRAL = ["The weather today is", "My favourite book is about", "In the morning I usually", "The river flows",
           "A good recipe needs", "The history of music", "Children like to play", "The meeting starts at"]


def with_neutral(prompts: list[str]) -> list[str]:
    """Edit prompts followed by neutral text, about a third of the whole (the serving benches' load)."""
    return prompts + NEUTRAL * max(1, len(prompts) // (2 * len(NEUTRAL)))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)


def write_outputs(out: Path, name: str, result: dict[str, Any], title: str, table: str) -> None:
    """OUT/NAME.json (the result), OUT/NAME.md (title + table), and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(f"# {title}\n\n{table}\n")
    print(table)


SHARE_SUFFIXES = ("_open", "_share", "identical", "_rate")  # columns holding a fraction of 1


def size(n: float) -> str:
    """Bytes with a binary unit: 9,652 -> '9.4 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cell(col: str, v: Any) -> str:
    """A table cell by its column's kind: shares as percentages, byte counts and GiB with units."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        return "" if isinstance(v, float) else str(v)
    if col.endswith(SHARE_SUFFIXES) and not col.startswith("kl"):  # kl_at_open is nats, not a share
        return f"{100 * v:.2f}%"
    if "bytes" in col:
        return size(v)
    if col.endswith("_gib"):
        return f"{v:.2f} GiB"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every_s: float = 30.0) -> Iterator[T]:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a line on stderr at most every `every_s`
    seconds and at the end, with the rate and the time left (the engine's `Progress`)."""
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(n, desc, every_s=every_s, emit=lambda line: print(line, file=sys.stderr, flush=True)) as bar:
        for item in items:
            yield item
            bar.update()


def timed(fn: Any, device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of `fn` after one warm-up call, the device synchronised around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (the floor for a scan of the keys)."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = min(timed(lambda: y.copy_(x), device, 5))
    return 2 * 2**30 / t  # read + write


def run_main(main: Any, name: str) -> None:
    """A bench's entry point: user errors (a data source found nowhere, a bad facts file or
    config) are one line on stderr and exit code 2, never a traceback."""
    from neuraldb.engine import ConfigError, FactError

    if not logging.getLogger().handlers:  # a bench that set up no logging of its own
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    # progress lines (rate, time left) where people wait, with or without a terminal, as the CLI does
    logging.getLogger("neuraldb.engine.progress").setLevel(logging.INFO)
    try:
        main()
    except (FileNotFoundError, FactError, ConfigError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def save_figure(fig: Any, path: Path, dpi: int = 110) -> str:
    """Lay out, write and close a matplotlib figure; returns the path as a string."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
