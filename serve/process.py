"""A `neuraldb serve` child process on a free loopback port: started, health-checked, killed
(SIGKILL) or stopped (SIGTERM: drain, checkpoint). For tests, benchmarks and crash trials."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


PATH_OPTIONS = ("--config",)


def absolute_paths(args: list[str]) -> list[str]:
    """Server options with the values of path options (`--config`) made absolute."""
    return [os.path.abspath(a) if i and args[i - 1] in PATH_OPTIONS else a for i, a in enumerate(args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """s = ServerProcess(db, model=..., args=[...]).start(); s.url; s.kill() or s.stop()"""

    def __init__(self, db: str | Path, model: str | Path | None = None, args: list[str] | None = None,
                 log: str | Path | None = None, api_key: str | None = None, threads: int | None = 1) -> None:
        # absolute: the child runs in the database's parent directory
        self.db, self.api_key = Path(os.path.abspath(db)), api_key
        self.model = os.path.abspath(model) if model is not None and Path(model).exists() else model
        self.args = absolute_paths(list(args or []))
        self.log = Path(log) if log else self.db.parent / f"{self.db.name}.server.log"
        self.threads = threads
        self.port, self.proc, self.fh, self.started_s = 0, None, None, float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        """Spawn the server and wait until /health answers 200; `started_s` is that wait."""
        self.port = free_port()
        cmd = [sys.executable, "-m", "neuraldb.cli", "serve", "--db", str(self.db), "--port", str(self.port),
               *(["--model", str(self.model)] if self.model else []),
               *(["--api-key", self.api_key] if self.api_key else []), *self.args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.fh = open(self.log, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.db.parent, env=env, stdout=self.fh, stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", headers=self.headers(), timeout=2).status_code == 200:
                    self.started_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not answer /health in {timeout}s: {self.tail()}")

    def facts(self) -> dict[int, dict]:
        """Every stored fact, {db id: record}, read page by page from GET /v1/facts."""
        out, after = {}, None
        with httpx.Client(timeout=60, headers=self.headers()) as c:
            while True:
                page = c.get(self.url + "/v1/facts",
                             params={"limit": 1000, **({"after": after} if after is not None else {})}).json()
                out.update({d["id"]: d["fact"] for d in page["data"]})
                if not page["has_more"]:
                    return out
                after = page["last_id"]

    def tail(self, n: int = 3000) -> str:
        if self.fh is not None and not self.fh.closed:
            self.fh.flush()
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no drain, no checkpoint."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.fh is not None:
            self.fh.close()

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM: the server drains its requests, checkpoints and exits; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()
