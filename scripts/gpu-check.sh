#!/usr/bin/env bash
# On the GPU machine, with what scripts/gpu-build.sh laid out (carry/gpu) and the model
# pieces copied to /tmp/hromada-pieces: every GPU check of issue 8 in one command.
#   1. serve/tests/gpu.rs: paged-attention kernels against a float64 reference on fresh
#      random inputs, GPU vs CPU argmax on the golden prompts (f32 and bf16), batching
#      invariance of 32 concurrent greedy requests;
#   2. the server on the GPU streaming 64 concurrent requests (all must complete), then
#      aggregate output tok/s at 1, 8, 32, 64 and 128 concurrent (512 in / 128 out);
#   3. batch-1 decode and prompt speed (hromada bench generate --device cuda);
#   4. training tokens/s, LoRA and full, bf16 mixed precision, beside PyTorch + PEFT on the
#      same data and config (the machine's python3 has torch, transformers and peft);
#   5. zno_uk items/s in process on the GPU beside the transformers loop.
# Results go to $OUT (the device tool's output folder) or ./gpu-out.
set -euo pipefail
cd "$(dirname "$0")/.."
G="${HROMADA_GPU_DIST:-carry/gpu}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export HROMADA_SHARED="$PWD/$G/shared"
export HROMADA_CACHE="${HROMADA_CACHE:-/tmp/hromada-cache}"
m="$HROMADA_CACHE/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$m" ]; then
    mkdir -p "$(dirname "$m")"
    cat /tmp/hromada-pieces/smollm2.gguf.part-* > "$m"
fi
if [ "$(sha256sum "$m" | cut -d' ' -f1)" != "$(cat "$G/smollm2.gguf.sha256")" ]; then
    echo "the reassembled model does not match its sha256: carry every piece again" >&2
    rm -f "$m"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== 1. GPU tests"
"$G/bin/serve-gpu-tests" --test-threads 1 2>&1 | tee "$OUT/gpu-tests.txt"

echo "== 2. the server on the GPU"
port=18091
"$G/bin/hromada" serve --device cuda --port $port > "$OUT/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
    sleep 1
done
"$G/bin/hromada" bench serve --endpoint "http://127.0.0.1:$port" --num-prompts 64 --max-concurrency 64 \
    --input-len 128 --output-len 64 --json "$OUT/stream-64.json"
python3 - "$OUT/stream-64.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["completed"] == 64 and r["failed"] == 0, f"64 concurrent streams: {r['completed']} completed, {r['failed']} failed"
print("64 concurrent streaming requests: all completed")
PY
for c in 1 8 32 64 128; do
    n=$(( c < 8 ? 8 : 2 * c ))
    "$G/bin/hromada" bench serve --endpoint "http://127.0.0.1:$port" --num-prompts $n --max-concurrency $c \
        --input-len 512 --output-len 128 --json "$OUT/serve-c$c.json"
done
kill $pid
wait $pid 2>/dev/null || true

echo "== 3. batch-1 speed"
"$G/bin/hromada" bench generate --device cuda --reps 5 --json "$OUT/generate-q4_1.json"
"$G/bin/hromada" bench generate --device cuda --dtype bf16 --reps 5 --json "$OUT/generate-bf16.json"

echo "== 4. training"
"$G/bin/hromada" bench train --device cuda --seq-len 512 --batch 8 --steps 10 --warmup 2 \
    --torch-python "${PYTHON:-python3}" --json "$OUT/train.json"

echo "== 5. eval"
"$G/bin/hromada" eval run --model smollm2-135m --device cuda --dtype f32 --tasks zno_uk --output "$OUT/zno-smollm2" \
    2>&1 | tee "$OUT/zno-hromada.txt"
"$G/bin/hromada" convert smollm2-135m --out /tmp/smol-hf --dtype f32
"${PYTHON:-python3}" scripts/bench_zno_hf.py /tmp/smol-hf --task zno_uk 2>&1 | tee "$OUT/zno-hf.txt"
echo "all GPU checks passed; results in $OUT"
