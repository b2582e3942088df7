"""`neuraldb serve`: the engine, the app and uvicorn, wired from command-line options."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn

from .app import ServerSettings, create_app
from .engine import EngineConfig, ServeEngine

log = logging.getLogger(__name__)
API_KEY_ENV = "NEURALDB_API_KEY"


class _Server(uvicorn.Server):
    """uvicorn's server, except that after SIGTERM / SIGINT and a clean drain the process
    exits 0 (uvicorn re-raises the signal, which kills it with -15)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        sigs = (signal.SIGINT, signal.SIGTERM)
        prev = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, h in prev.items():
                signal.signal(s, h)


def serve(db: str | Path, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, read_only: bool = False, edit_config: Any = None,
          max_batch: int = 16, checkpoint_records: int = 1000, checkpoint_interval_s: float = 300.0,
          fsync: bool = True, **limits: Any) -> int:
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    engine = ServeEngine(EngineConfig(Path(os.path.abspath(db)), model, max_batch, checkpoint_records,
                                      checkpoint_interval_s, fsync, edit_config))
    name = str(getattr(engine.model.config, "neuraldb_name", None) or model or "neuraldb")
    settings = ServerSettings(name, api_key, read_only, **limits)
    app = create_app(engine, settings)
    print(f"neuraldb serve: {engine.cfg.db} ({len(engine.db)} facts; {engine.replayed} log records replayed; "
          f"opened in {engine.started_s:.1f}s) on http://{host}:{port}{' (read-only)' if read_only else ''}"
          f"{'' if api_key else ' (no API key)'}", file=sys.stderr, flush=True)
    _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)).run()
    if engine.fatal is not None:
        print(f"neuraldb serve: error: the engine stopped: {engine.fatal}", file=sys.stderr)
        return 1
    return 0
