#!/usr/bin/env bash
# Build, on this machine (no GPU needed), everything the GPU checks of issue 8 run, laid
# out for the GPU machine (which has no Rust and reaches nothing):
#   carry/gpu/bin/hromada            the CUDA build of the CLI (stripped)
#   carry/gpu/bin/serve-gpu-tests    serve/tests/gpu.rs (kernels vs f64, GPU vs CPU
#                                    parity on the golden prompts, batching invariance)
#   carry/gpu/shared/...             the golden prompts those tests read, brown-uk and
#                                    the ZNO items for the training and eval benchmarks
#   carry/gpu/llama/...              llama.cpp's CUDA llama-bench, llama-server and
#                                    llama-batched-bench, when scripts/build-llama-cpp.sh
#                                    --cuda has built them
# packed for the device tool, whose calls carry at most 64 MiB each: the GGUF and
# carry/gpu (xz) joined and cut into pieces of 60 MiB, carry/gpu-0, carry/gpu-1, ... (three
# today), the last one also holding sizes.txt. Then one device call per piece, back to back
# (a machine stays warm ~30 s):
#   carry carry/gpu-N; command: mkdir -p /tmp/h && cp carry/gpu-N/* /tmp/h/
# and the last piece's call goes on with `&& scripts/gpu-check.sh`, which joins them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cuda-toolchain.sh >/dev/null
# shellcheck disable=SC1090
source <(scripts/cuda-toolchain.sh env)
scripts/setup.sh >/dev/null
SHARED="${HROMADA_SHARED:-$PWD/../shared}"
out=carry/gpu
mkdir -p "$out/bin" "$out/shared/golden"
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
llama="${HROMADA_CACHE:-$HOME/.cache/hromada}/llama.cpp-cuda/build/bin"
rm -rf "$out/llama"
if [ -x "$llama/llama-batched-bench" ]; then
    mkdir -p "$out/llama"
    for b in llama-bench llama-server llama-batched-bench; do strip -o "$out/llama/$b" "$llama/$b"; done
fi
model=$(ls "${HROMADA_CACHE:-$HOME/.cache/hromada}"/models/smollm2-135m-instruct/*.gguf | head -1)
sha256sum "$model" | cut -d' ' -f1 > "$out/smollm2.gguf.sha256"
rm -rf carry/gpu-[0-9]* carry/gpu-a carry/gpu-b carry/gpu.tar.xz carry/pieces
tar -C "$out" -cf - . | xz -T0 -6 > carry/gpu.tar.xz
mkdir -p carry/pieces
cat "$model" carry/gpu.tar.xz | split -b 60M -d -a 1 - carry/pieces/bundle.part-
n=0
for f in carry/pieces/bundle.part-*; do
    mkdir -p "carry/gpu-$n"
    mv "$f" "carry/gpu-$n/"
    n=$((n + 1))
done
last="carry/gpu-$((n - 1))"
echo "$(stat -c %s "$model") $(stat -c %s carry/gpu.tar.xz)" > "$last/sizes.txt"
rm -rf carry/pieces carry/gpu.tar.xz
du -sh "$out"/bin/* carry/gpu-*
echo "$n device calls carry the pieces: carry/gpu-0 .. $last"
