#!/usr/bin/env bash
# Build, on this machine (no GPU needed), everything the GPU checks of issue 8 run, laid
# out for the GPU machine (which has no Rust and reaches nothing):
#   carry/gpu/bin/hromada            the CUDA build of the CLI (stripped)
#   carry/gpu/bin/serve-gpu-tests    serve/tests/gpu.rs (kernels vs f64, GPU vs CPU
#                                    parity on the golden prompts, batching invariance)
#   carry/gpu/shared/...             the golden prompts those tests read, brown-uk and
#                                    the ZNO items for the training and eval benchmarks
#   carry/gpu-model/smollm2.gguf.part-NN   the SmolLM2 GGUF in pieces under the 64 MiB
#                                    a device call carries
# Then, with the device tool: one call per model piece
#   (carry carry/gpu-model/<piece>; command: mkdir -p /tmp/hromada-pieces && cp carry/gpu-model/* /tmp/hromada-pieces/)
# and one call that carries carry/gpu and runs scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cuda-toolchain.sh >/dev/null
# shellcheck disable=SC1090
source <(scripts/cuda-toolchain.sh env)
scripts/setup.sh >/dev/null
SHARED="${HROMADA_SHARED:-$PWD/../shared}"
out=carry/gpu
mkdir -p "$out/bin" "$out/shared/golden" carry/gpu-model
cargo build --release --features cuda --bin hromada
tests=$(cargo test --release --features cuda -p hromada-serve --test gpu --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys, json
for l in sys.stdin:
    j = json.loads(l)
    if j.get("reason") == "compiler-artifact" and j.get("executable") and j["target"]["name"] == "gpu":
        print(j["executable"])')
strip -o "$out/bin/hromada" "$CARGO_TARGET_DIR/release/hromada"
strip -o "$out/bin/serve-gpu-tests" "$tests"
cp "$SHARED/golden/smollm2-135m-instruct-reference.json" "$out/shared/golden/"
# The data the GPU benchmarks read: brown-uk (bench train) and the ZNO items (eval).
mkdir -p "$out/shared/data/uk/brown-uk/data" "$out/shared/data/eval/zno"
rm -rf "$out/shared/data/uk/brown-uk/data/good" "$out/shared/data/eval/zno/data"
cp -r "$SHARED/data/uk/brown-uk/data/good" "$out/shared/data/uk/brown-uk/data/"
cp -r "$SHARED/data/eval/zno/data" "$out/shared/data/eval/zno/"
model=$(ls "${HROMADA_CACHE:-$HOME/.cache/hromada}"/models/smollm2-135m-instruct/*.gguf | head -1)
rm -f carry/gpu-model/smollm2.gguf.part-*
split -b 48M -d "$model" carry/gpu-model/smollm2.gguf.part-
sha256sum "$model" | cut -d' ' -f1 > "$out/smollm2.gguf.sha256"
du -sh "$out"/bin/* carry/gpu-model/*
