"""Progress where people wait: a tqdm bar on a terminal; elsewhere (a log file, a server, CI,
`torchrun`'s captured output) an INFO line from this module's logger at most every `every_s`
seconds and at the end, with the count, the rate and the time left. The CLI turns this logger
on, so `neuraldb edit` and `build` show it without a terminal."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Progress:
    """with Progress(n, "residuals", "fact") as bar: ...; bar.update(k, nll=0.01)"""

    def __init__(self, total: int, desc: str, unit: str = "item", every_s: float = 10.0,
                 emit: Callable[[str], None] | None = None) -> None:
        """`emit` takes each line instead of this module's logger at INFO (the benches print them)."""
        self.total, self.desc, self.unit, self.every_s, self.emit = total, desc, unit, every_s, emit
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if sys.stderr.isatty() else None

    def line(self) -> str:
        took = time.perf_counter() - self.t0
        rate = self.n / took if took > 0 else float("nan")
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}s, {rate:.3g} {self.unit}s/s, "
                f"{took:.0f} s so far, {left:.0f} s left")

    def update(self, k: int = 1, **postfix: Any) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            if postfix:
                self.bar.set_postfix(**postfix)
            return
        now = time.perf_counter()
        if (now - self.last >= self.every_s or self.n >= self.total) and (
                self.emit is not None or log.isEnabledFor(logging.INFO)):
            line = self.line() + "".join(f", {k} {v}" for k, v in postfix.items())
            (self.emit or log.info)(line)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
