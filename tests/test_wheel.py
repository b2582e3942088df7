"""The wheel works on its own: built from a copy of the source, installed into a fresh virtual
environment (no editable checkout reachable), it ships the defaults, the data sample and the
gate map, and its `neuraldb` command edits two facts into a tiny model and answers from the saved database."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "results", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".venv", ".whl", ".gl", "cache")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_installs_and_runs_without_the_checkout(tmp_path: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("build")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)])
    wheel = next((tmp_path / "dist").glob("neuraldb-*.whl"))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    # The dependencies come from this interpreter's site-packages as plain path entries, after
    # the venv's own: their .pth files (the editable checkout's finder among them) never run.
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NEURALDB_DATA")}
    env["NEURALDB_CACHE"] = str(tmp_path / "model-cache")
    where = run([str(py), "-c", "import neuraldb, neuraldb.data as d; print(neuraldb.__file__); "
                 "r = d.resolve('counterfact'); print(r.origin, r.path.stat().st_size); "
                 "from neuraldb.engine.gate_map import load_map; print(load_map('smollm2-135m-l6-ctx5').dim)"],
                env=env, cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(env_dir)), f"neuraldb imported from {where[0]}, not the wheel"
    assert where[1] == "sample" and int(where[2]) > 10_000
    assert where[3] == "2112"  # SmolLM2's shipped gate map
    # the general-ability task YAMLs and the six tasks' sample ship in the wheel
    tasks = run([str(py), "-c", "import pathlib, tempfile; from neuraldb.data import sample_root; "
                 "from neuraldb.evaluation.general import TASKS, task_dir; "
                 "print(len(task_dir(TASKS, pathlib.Path(tempfile.mkdtemp()), sample_root())))"],
                env=env, cwd=tmp_path).stdout.split()
    assert tasks == ["6"]
    neuraldb = str(env_dir / "bin" / "neuraldb")
    assert "edit" in run([neuraldb, "--help"], env=env).stdout

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "subject": "Danielle Darrieux", "prompt": "The mother tongue of {}", "target_new": "Japanese"},
        {"id": "b", "subject": "Apple A5", "prompt": "The maker of {}", "target_new": "Toyota"}]) + "\n")
    db = tmp_path / "db"
    run([neuraldb, "edit", "--model", str(tiny_model_dir), "--facts", str(facts), "--out", str(db), "--layer", "1",
         "--gamma", "0.5",
         "--no-eval"], env=env, cwd=tmp_path)
    answer = run([neuraldb, "ask", "--db", str(db), "--model", str(tiny_model_dir), "--max-new-tokens", "3",
                  "The mother tongue of Danielle Darrieux"], env=env, cwd=tmp_path)
    assert answer.stdout.startswith("The mother tongue of Danielle Darrieux")
    assert "fired: fact 0" in answer.stderr
    assert "verified" in run([neuraldb, "info", "--db", str(db)], env=env).stdout
