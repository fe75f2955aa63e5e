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
HROMADA_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/hromada" .venv/bin/python -m pytest -q tests/python
# HROMADA_TEST_LEAN=1 (CI, a throwaway clone): drop the debug build and the Python
# environment (torch's CUDA wheels: ~6 GB) before the CUDA check, so the disk holds one
# phase at a time.
if [ "${HROMADA_TEST_LEAN:-0}" = 1 ]; then
    rm -rf .venv "${CARGO_TARGET_DIR:-$PWD/target}/debug"
fi
# The CUDA code compiles (no GPU here): the pip CUDA 13.0 toolchain, then a check of every
# crate and test with `--features cuda` in target/cuda (candle's kernels: ~15 min on 2 cores
# the first time). HROMADA_SKIP_CUDA_CHECK=1 skips it for a quick local run.
if [ "${HROMADA_SKIP_CUDA_CHECK:-0}" != 1 ]; then
    scripts/cuda-toolchain.sh
    (
        # shellcheck disable=SC1090
        source <(scripts/cuda-toolchain.sh env)
        cargo check --features cuda --workspace --tests
    )
fi
