"""No documented way of starting Python from the checkout may import a project folder as a
top-level module (transformers imports the PyPI package `kernels`; our root holds `kernels/`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import neuraldb

ROOT = Path(neuraldb.__file__).resolve().parent
# every folder of the checkout that Python could take for a top-level module, and its own files
FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
FILES = sorted(p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("_"))

PROBE = f"""
import importlib.util, json, os, sys
import neuraldb, transformers, kernels
import transformers.activations  # what imports `kernels` inside transformers
root = {str(ROOT)!r}
found = {{}}
for name in {FOLDERS + FILES!r}:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.realpath(spec.origin).startswith(root + os.sep):
        found[name] = spec.origin
print(json.dumps({{"kernels": kernels.__file__, "shadowed": found}}))
"""


@pytest.mark.parametrize("where", [".", "tests"])
def test_no_project_folder_is_a_top_level_module(where: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT / where, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shadowed"] == {}
    assert not os.path.realpath(got["kernels"]).startswith(str(ROOT) + os.sep)


def test_folders_cover_the_layout() -> None:
    assert {"kernels", "index", "engine", "evaluation", "baselines", "bench", "data", "serve"} <= set(FOLDERS)


def test_project_paths_names_root_and_subpackages(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "__init__.py").write_text("")
    (root / "tests").mkdir()
    entries = [str(root), str(root / "kernels"), str(root / "tests"), str(tmp_path), "/usr/lib"]
    assert neuraldb.project_paths(entries, root=str(root.resolve())) == [str(root), str(root / "kernels")]


def test_a_shadow_imported_first_is_refused() -> None:
    code = "import sys; sys.path.insert(0, '.'); import kernels; import neuraldb"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "['kernels'] were imported from the checkout" in out.stderr.strip().splitlines()[-1]


def test_bench_script_runs_from_root() -> None:
    out = subprocess.run([sys.executable, "bench/scale.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--facts" in out.stdout


def test_readme_api_in_a_repl_started_in_the_root(tiny_model_dir: Path) -> None:
    """The README's Python API typed into `python3` started in the checkout ('' first on sys.path)."""
    session = "\n".join([
        "from neuraldb import NeuralDB, Fact, load_model, EditConfig",
        f"model, tok = load_model({str(tiny_model_dir)!r})",
        "db = NeuralDB(model, tok, EditConfig(layer=1, gamma=0.65, n_prefixes=2, prefix_len=4, steps=4))",
        "ids = db.add(Fact('Danielle Darrieux', 'The mother tongue of Danielle Darrieux is', 'English', 'French'))",
        "import kernels, sys",
        "print('OK', ids, db.facts[ids[0]].prompt, kernels.__file__.startswith(sys.prefix))",
    ]) + "\n"
    out = subprocess.run([sys.executable, "-i", "-q"], input=session, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert "OK [0] The mother tongue of {} is True" in out.stdout, out.stderr[-3000:]
