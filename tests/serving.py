"""Start and stop a real `neuraldb serve` process on a free loopback port (tests and trials)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# the tiny models' edit settings (tests/test_engine.py's CFG): strong enough to change an answer
TINY_CONFIG = ("layer: 1\ngamma: 0.65\nn_prefixes: 2\nprefix_len: 4\nresidual_prefixes: 1\nsteps: 40\nlr: 0.5\n"
               "weight_decay: 0.0\nclamp_norm: 4.0\n")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """server = Server(db, model=..., args=[...]).start(); server.url; server.kill() / .stop()"""

    def __init__(self, db: Path, model: str | Path | None = None, args: list[str] | None = None,
                 log: Path | None = None, api_key: str | None = None) -> None:
        self.db, self.model, self.args, self.api_key = Path(db), model, list(args or []), api_key
        self.log = log or self.db.parent / f"{self.db.name}.server.log"
        self.port, self.proc = 0, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 120.0) -> "Server":
        self.port = free_port()
        cmd = [sys.executable, "-m", "neuraldb.cli", "serve", "--db", str(self.db), "--port", str(self.port),
               *(["--model", str(self.model)] if self.model else []),
               *(["--api-key", self.api_key] if self.api_key else []), *self.args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.fh = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.db.parent, env=env, stdout=self.fh, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", headers=self.headers(), timeout=2).status_code == 200:
                    self.started_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not answer /health in {timeout}s: {self.tail()}")

    def tail(self) -> str:
        if not self.fh.closed:
            self.fh.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.fh.close()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM: drain, checkpoint, exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        return rc
