"""Two distinct small databases built without a model, for the save/load tests and the crash
child (`python tests/dbstate.py DIR MODE ...`), which must start fast (no transformers)."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraldb.engine.config import EditConfig, to_mapping
from neuraldb.engine.facts import Fact
from neuraldb.engine.persistence import FORMAT, DatabaseError, _siblings, read_db, write_db
from neuraldb.index import ResidualTable, make_index

D_KEY, D_RES = 16, 8


def version(v: int, spec: str = "Flat") -> dict[str, Any]:
    """Database number `v`: its own ids, keys, residuals and targets."""
    n = 40 + 7 * v
    ids = np.arange(n, dtype=np.int64) * 3 + 1000 * v
    g = torch.Generator().manual_seed(v)
    keys, res = torch.randn(n, D_KEY, generator=g), torch.randn(n, D_RES, generator=g)
    index = make_index(spec, D_KEY)
    index.add(ids, keys)
    table = ResidualTable(D_RES, shard_size=16)
    table.put(ids, res)
    facts = [(int(i), Fact(f"Subject {i}", "{} speaks", f"Target{v}", id=f"case-{i}")) for i in ids]
    model = {"name": "toy", "model_type": "llama", "num_layers": 3, "layer": 1, "d_key": D_KEY, "d_res": D_RES,
             "layer_sha256": "0" * 64}
    meta = {"format": FORMAT, "model": model, "next_id": int(ids.max()) + 1, "prefixes": ["A. "],
            "config": to_mapping(EditConfig(layer=1, index=spec)), "num_facts": n}
    return {"meta": meta, "facts": facts, "table": table, "index": index, "ids": ids, "residuals": res}


def save(directory: Path, v: int, fault: Any = None, spec: str = "Flat") -> None:
    s = version(v, spec)
    write_db(directory, s["meta"], s["facts"], s["table"], s["index"], fault=fault)


def which(directory: Path) -> int:
    """Which version is stored at `directory` (after recovery); raises if it is neither, or mixed."""
    stored = read_db(directory)
    for v in (0, 1):
        s = version(v)
        ids = s["ids"]
        if sorted(stored.facts) == ids.tolist():
            assert all(f.target_new == f"Target{v}" for f in stored.facts.values())
            assert torch.equal(stored.table.gather(torch.from_numpy(ids)), s["residuals"])
            assert np.array_equal(stored.index.ids(), ids)
            return v
    raise AssertionError(f"{directory}: holds neither version: ids {sorted(stored.facts)[:5]}...")


def _kill_trials(directory: Path, trials: int, seed: int) -> dict[str, Any]:
    """Fork a child that saves versions 1, 0, 1, ... in a loop; SIGKILL it at a random instant;
    then open the path. Repeated `trials` times. Runs single-threaded so fork is safe."""
    rng = random.Random(seed)
    save(directory, 0)
    t0 = time.perf_counter()
    for k in range(5):
        save(directory, 1 - k % 2)
    per_save = (time.perf_counter() - t0) / 5
    out: dict[str, Any] = {"per_save_s": per_save, "outcomes": [], "mid_save": 0, "errors": []}
    current = which(directory)
    for _ in range(trials):
        pid = os.fork()
        if pid == 0:  # the child: the other version first, then back and forth until killed
            try:
                k = 1
                while True:
                    save(directory, (current + k) % 2)
                    k += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, 4 * per_save))  # the child forks first: 2x left every kill inside its first save on a loaded machine
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        tmps, old, _ = _siblings(directory)
        out["mid_save"] += bool(tmps or old.exists())
        try:
            current = which(directory)
            out["outcomes"].append(current)
        except (DatabaseError, AssertionError) as exc:
            out["errors"].append(str(exc))
        tmps, old, _ = _siblings(directory)
        if tmps or old.exists():
            out["errors"].append(f"leftovers after recovery: {tmps} {old}")
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    directory, mode = Path(argv[0]), argv[1]
    if mode == "crash":  # version 0 saved, then version 1 dies at one stage
        stage = argv[2]
        save(directory, 0)

        def fault(s: str) -> None:
            if s == stage:
                os.kill(os.getpid(), signal.SIGKILL)

        save(directory, 1, fault=fault)
        print("stage never reached")
    elif mode == "kill":
        print(json.dumps(_kill_trials(directory, int(argv[2]), int(argv[3]))))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
