#!/usr/bin/env bash
# The test command (README, CI): fetch the real models, set up the Python test
# environment, then run the Rust and Python test suites.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Python clients for the cross-checks (transformers loads our exports).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, pytest" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r tests/python/requirements.txt
fi
cargo build --bins
cargo test --workspace
HROMADA_BIN="$PWD/target/debug/hromada" .venv/bin/python -m pytest -q tests/python
