#!/usr/bin/env bash
# On the GPU machine: every GPU check of issues 6 and 8 in one command, from what
# scripts/gpu-build.sh packed into carry/gpu-0, carry/gpu-1, ... (the GGUF and a tar.xz of
# the binaries, the data they read and, when built, llama.cpp's CUDA tools, joined and cut
# into pieces under what one device call carries):
#
#   one device call per piece: carry carry/gpu-N; mkdir -p /tmp/h && cp carry/gpu-N/* /tmp/h/
#   the last one goes on:      ... && scripts/gpu-check.sh
#
# Sections, each under its own time limit, each run even when an earlier one failed (a
# device lease is short: one failure must not hide the rest), a table of outcomes last:
#   tests     serve/tests/gpu.rs: paged-attention kernels against float64 on fresh random
#             inputs, GPU vs CPU argmax on the golden prompts (f32 and bf16), batching
#             invariance of 32 concurrent greedy requests on the GPU
#   generate  batch-1 decode and prompt tok/s (Q4_1 and bf16) beside llama-bench (CUDA)
#   serve     the server on the GPU: 64 concurrent streams must all complete; aggregate
#             output tok/s at 1, 8, 32, 64 and 128 concurrent (512 in / 128 out)
#   llama     llama-batched-bench and llama-server at the same concurrencies
#   train     training tokens/s (LoRA, full; bf16 autocast, f32 master weights)
#   torch     PyTorch + PEFT on the same model, data and config
#   eval      zno_uk in process on the GPU beside the transformers loop
#   events    (only when GPU_CHECK_ONLY names it) batch 1, the server at 1 and 64
#             concurrent and training with cudarc's event tracking on, then off; then
#             the GPU tests with it off
# Results go to $OUT (the device tool's output folder) or ./gpu-out, packed as one
# gpu-results.tar.gz (the device tool brings back at most 8 files) beside summary.md.
# Env: GPU_CHECK_BUDGET (seconds for the whole script, default 500), GPU_CHECK_ONLY (a
# space-separated list of sections to run).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-500}"
ONLY="${GPU_CHECK_ONLY:-tests generate serve llama train torch eval}"  # events: on request
H="${HROMADA_GPU_PIECES:-/tmp/h}"
FINAL="${OUT:-$PWD/gpu-out}"
OUT=/tmp/gpu-results
rm -rf "$OUT" && mkdir -p "$OUT" "$FINAL"
pack() {
    pkill -f "hromada-gpu/bin/hromada serve" 2>/dev/null || true
    pkill -f "hromada-gpu/llama/llama-server" 2>/dev/null || true
    tar -C "$OUT" -czf "$FINAL/gpu-results.tar.gz" . 2>/dev/null
    cp "$OUT/summary.md" "$OUT/sections.txt" "$FINAL/" 2>/dev/null || true
}
trap pack EXIT
G=/tmp/hromada-gpu
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export HROMADA_SHARED="$G/shared"
# candle's kernels are PTX that the driver compiles at first use; its cache keeps them for
# the next process (the default size can be too small for candle's quantized kernels).
export CUDA_CACHE_MAXSIZE=4294967296
export HROMADA_CACHE="${HROMADA_CACHE:-/tmp/hromada-cache}"
PY="${PYTHON:-python3}"

rm -rf "$G" && mkdir -p "$G"
m="$HROMADA_CACHE/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$(dirname "$m")"
if ! read -r model_bytes tar_bytes < "$H/sizes.txt"; then
    echo "no $H/sizes.txt: carry the last piece (scripts/gpu-build.sh names them)" >&2
    exit 1
fi
cat "$H"/bundle.part-* > "$H/bundle"
if [ "$(stat -c %s "$H/bundle")" != $((model_bytes + tar_bytes)) ]; then
    echo "the pieces in $H add up to $(stat -c %s "$H/bundle") bytes, not $((model_bytes + tar_bytes)): carry every piece" >&2
    ls -l "$H" >&2
    exit 1
fi
head -c "$model_bytes" "$H/bundle" > "$m"
if ! tail -c "$tar_bytes" "$H/bundle" | tar -xJ -C "$G"; then
    echo "cannot unpack the binaries from the pieces in $H" >&2
    exit 1
fi
rm -f "$H/bundle"
if [ "$(sha256sum "$m" | cut -d' ' -f1)" != "$(cat "$G/smollm2.gguf.sha256")" ]; then
    echo "the reassembled model does not match its sha256: carry every piece again" >&2
    rm -f "$m"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
B="$G/bin/hromada"
LL="$G/llama"

declare -a SUMMARY
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# section NAME CAP: runs the function sec_NAME under min(CAP, what is left of the budget).
section() {
    local name=$1 cap=$2 t rc s0
    case " $ONLY " in *" $name "*) ;; *) return ;; esac
    t=$(left)
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 15 ]; then
        SUMMARY+=("$name: skipped (budget spent)")
        return
    fi
    echo "== $name (limit ${t}s)"
    s0=$(date +%s)
    timeout -k 5 "$t" bash -c "set -euo pipefail; $(declare -f "sec_$name"); $(declare -f start_server wait_ready sweep sec_tests); sec_$name" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    case $rc in
        0) s=ok ;;
        124|137) s="TIMED OUT after ${t}s" ;;
        *) s="FAILED (rc $rc)" ;;
    esac
    SUMMARY+=("$name: $s in $(( $(date +%s) - s0 ))s")
}
export B LL G OUT PY m

wait_ready() {  # URL PATH
    for _ in $(seq 240); do
        curl -sf "$1$2" >/dev/null && return 0
        sleep 0.5
    done
    echo "server at $1 not ready" >&2
    return 1
}
start_server() {  # PORT ARGS...
    local port=$1
    shift
    "$B" serve --device cuda --port "$port" --max-num-seqs 128 --max-num-batched-tokens 8192 --kv-cache-mib 16384 "$@" \
        > "$OUT/serve-$port.log" 2>&1 &
    echo $! > "/tmp/serve-$port.pid"
    wait_ready "http://127.0.0.1:$port" /ready
}
sweep() {  # URL TAG CONCURRENCY...: output tok/s at 512 in / 128 out, 2 requests per slot (8 at least)
    local url=$1 tag=$2 c
    shift 2
    for c in "$@"; do
        "$B" bench serve --endpoint "$url" --num-prompts $(( c < 8 ? 8 : 2 * c )) --max-concurrency "$c" \
            --input-len 512 --output-len 128 --json "$OUT/$tag-c$c.json"
    done
}

sec_tests() {
    # Each test in its own process: a CUDA fault is sticky for the process that hit it.
    local t failed=0
    for t in $("$G/bin/serve-gpu-tests" --list 2>/dev/null | sed -n 's/: test$//p'); do
        "$G/bin/serve-gpu-tests" --exact "$t" --nocapture || failed=$((failed + 1))
    done
    [ "$failed" = 0 ]
}

sec_generate() {
    local lb=()
    [ -x "$LL/llama-bench" ] && lb=(--llama-bench "$LL/llama-bench")
    "$B" bench generate --device cuda --reps 5 "${lb[@]}" --json "$OUT/generate-q4_1.json"
    "$B" bench generate --device cuda --dtype bf16 --reps 5 --json "$OUT/generate-bf16.json"
}

sec_serve() {
    local url=http://127.0.0.1:18091
    start_server 18091 --dtype bf16
    "$B" bench serve --endpoint $url --num-prompts 64 --max-concurrency 64 --input-len 128 --output-len 64 \
        --json "$OUT/stream-64.json"
    "$PY" - "$OUT/stream-64.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["completed"] == 64 and r["failed"] == 0, f"64 concurrent streams: {r['completed']} completed, {r['failed']} failed"
print("64 concurrent streaming requests: all completed")
PY
    sweep $url serve-bf16 1 8 32 64 128
    kill "$(cat /tmp/serve-18091.pid)"
    # The same GGUF kept quantized (what llama-server runs), at 1 and 64.
    start_server 18092 --dtype quantized
    sweep http://127.0.0.1:18092 serve-q4_1 1 64
    kill "$(cat /tmp/serve-18092.pid)"
}

sec_llama() {
    [ -x "$LL/llama-batched-bench" ] || { echo "no llama.cpp CUDA build carried"; return 3; }
    "$LL/llama-batched-bench" -m "$m" -ngl 99 -c 90112 -b 2048 -ub 512 -npp 512 -ntg 128 -npl 1,8,32,64,128 \
        2>&1 | grep -E '^\|' | tee "$OUT/llama-batched-bench.md"
    "$LL/llama-server" -m "$m" -ngl 99 --parallel 128 -c 90112 --port 18093 > "$OUT/llama-server.log" 2>&1 &
    local pid=$!
    wait_ready http://127.0.0.1:18093 /health
    sweep http://127.0.0.1:18093 llama-server 1 8 32 64 128
    kill $pid
}

sec_train() {
    "$B" bench train --device cuda --seq-len 512 --batch 8 --steps 10 --warmup 2 --json "$OUT/train-hromada.json"
}

sec_torch() {
    "$B" convert smollm2-135m --out /tmp/smol-hf --dtype f32 >/dev/null
    for mode in lora full; do
        "$PY" scripts/bench_train_torch.py /tmp/smol-hf "$G/shared/data/uk/brown-uk/data/good" --seq 512 --batch 8 \
            --steps 10 --warmup 2 --rank 16 --modes $mode | tee -a "$OUT/train-torch.jsonl"
    done
}

sec_events() {
    # cudarc's per-kernel event tracking on (HROMADA_CUDA_EVENT_TRACKING=1, the default)
    # against off (=0), one after the other in this run; then the GPU tests with it off.
    local ev port
    for ev in 1 0; do
        export HROMADA_CUDA_EVENT_TRACKING=$ev
        "$B" bench generate --device cuda --reps 5 --json "$OUT/events$ev-generate-q4_1.json"
        "$B" bench generate --device cuda --dtype bf16 --reps 5 --json "$OUT/events$ev-generate-bf16.json"
        port=$((18094 + ev))
        start_server $port --dtype bf16
        sweep "http://127.0.0.1:$port" "events$ev-serve-bf16" 1 64
        kill "$(cat "/tmp/serve-$port.pid")"
        "$B" bench train --device cuda --seq-len 512 --batch 8 --steps 6 --warmup 2 --json "$OUT/events$ev-train.json"
    done
    HROMADA_CUDA_EVENT_TRACKING=0 sec_tests
}

sec_eval() {
    "$B" eval run --model smollm2-135m --device cuda --dtype f32 --tasks zno_uk --output "$OUT/zno-smollm2"
    [ -d /tmp/smol-hf ] || "$B" convert smollm2-135m --out /tmp/smol-hf --dtype f32 >/dev/null
    "$PY" scripts/bench_zno_hf.py /tmp/smol-hf --task zno_uk
}

section tests 120
section generate 50
section serve 120
section llama 80
section train 80
section torch 70
section eval 100
section events 360

# One table of the figures.
"$PY" - "$OUT" <<'PY' | tee "$OUT/summary.md"
import glob, json, os, sys
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return None
rows = []
for tag, pat in [("hromada bf16", "serve-bf16-c{}.json"), ("hromada q4_1", "serve-q4_1-c{}.json"), ("llama-server", "llama-server-c{}.json")]:
    for c in (1, 8, 32, 64, 128):
        r = load(os.path.join(out, pat.format(c)))
        if r:
            rows.append(f"| {tag} | {c} | {r.get('output_throughput', 0):.0f} | {r['ttft']['median_ms']:.0f} | {r['tpot']['median_ms']:.2f} | {r.get('completed')}/{r.get('failed')} |")
if rows:
    print("| server | concurrency | output tok/s | median TTFT ms | median TPOT ms | done/failed |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
for p in ("generate-q4_1.json", "generate-bf16.json", "train-hromada.json") + tuple(
        f"events{e}-{k}.json" for e in (1, 0) for k in ("generate-q4_1", "generate-bf16", "serve-bf16-c1", "serve-bf16-c64", "train")):
    r = load(os.path.join(out, p))
    if r is not None:
        print(p, json.dumps(r)[:600])
PY
echo "== summary ($(( $(date +%s) - T0 ))s)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/sections.txt"
