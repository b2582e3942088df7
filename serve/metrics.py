"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms;
one `Metrics` per server (no module state), safe to update from any thread."""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Sequence

Labels = tuple[tuple[str, str], ...]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _fmt(name: str, labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return name
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in items)
    return f"{name}{{{body}}}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kind: dict[str, str] = {}
        self._help: dict[str, str] = {}
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hist: dict[str, dict[Labels, list[float]]] = defaultdict(dict)  # counts per bucket, sum, count
        self._buckets: dict[str, Sequence[float]] = {}

    def _declare(self, name: str, kind: str, help_: str) -> None:
        if self._kind.setdefault(name, kind) != kind:
            raise ValueError(f"metric {name} is a {self._kind[name]}, not a {kind}")
        self._help.setdefault(name, help_)

    def inc(self, name: str, value: float = 1, help_: str = "", labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._declare(name, "counter", help_)
            key = _labels(labels)
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def gauge(self, name: str, value: float, help_: str = "", labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._declare(name, "gauge", help_)
            self._values[name][_labels(labels)] = float(value)

    def observe(self, name: str, value: float, help_: str = "", labels: dict[str, str] | None = None,
                buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        with self._lock:
            self._declare(name, "histogram", help_)
            bs = self._buckets.setdefault(name, tuple(buckets))
            h = self._hist[name].setdefault(_labels(labels), [0.0] * (len(bs) + 2))
            for i, b in enumerate(bs):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_labels(labels), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._kind):
                lines += [f"# HELP {name} {self._help[name]}", f"# TYPE {name} {self._kind[name]}"]
                if self._kind[name] != "histogram":
                    for lab, v in sorted(self._values[name].items()):
                        lines.append(f"{_fmt(name, lab)} {v:.17g}")
                    continue
                for lab, h in sorted(self._hist[name].items()):
                    for b, c in zip(self._buckets[name], h):
                        lines.append(f"{_fmt(name + '_bucket', lab, (('le', f'{b:g}'),))} {c:.17g}")
                    lines.append(f"{_fmt(name + '_bucket', lab, (('le', '+Inf'),))} {h[-1]:.17g}")
                    lines.append(f"{_fmt(name + '_sum', lab)} {h[-2]:.17g}")
                    lines.append(f"{_fmt(name + '_count', lab)} {h[-1]:.17g}")
        return "\n".join(lines) + "\n"
