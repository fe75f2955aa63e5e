#!/usr/bin/env bash
# The test command (README, CI): fetch the real models, set up the Python test
# environment, then run the Rust and Python test suites.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Python clients for the cross-checks (transformers loads our exports).
[ -x .venv/bin/python ] || python3 -m venv .venv
# A no-op in seconds when everything is already installed.
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --bins
cargo test --workspace
HROMADA_BIN="$PWD/target/debug/hromada" .venv/bin/python -m pytest -q tests/python
