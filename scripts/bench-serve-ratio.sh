#!/usr/bin/env bash
# Issue 3's serving benchmark, reproducible in one command: hromada serve and llama.cpp's
# llama-server (CPU build from scripts/build-llama-cpp.sh, --parallel 16) on the same
# GGUF, each measured by `hromada bench serve` (128 in / 64 out, random token prompts) at
# 1 and 16 concurrent requests, REPS times interleaved. Every run draws fresh prompts
# (its own --seed), so no run reuses another's prefix-cache entries. Prints one line per
# run and the medians and ratios. Needs a release build (cargo build --release).
#   scripts/bench-serve-ratio.sh [REPS=3] [NUM_PROMPTS_C16=32]
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-3}"
N16="${2:-32}"
CACHE="${HROMADA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hromada}"
GGUF="$CACHE/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA="${LLAMA_SERVER:-$CACHE/llama.cpp/build/bin/llama-server}"
BIN=target/release/hromada
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -f "$GGUF" ] || { echo "fetch the model first: scripts/setup.sh smollm2" >&2; exit 1; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_up() {
  for _ in $(seq 1 120); do
    curl -sf "$1/v1/models" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2
  return 1
}

# HROMADA_SERVE_EXTRA: more `hromada serve` flags (e.g. --kv-cache-dtype q8).
# shellcheck disable=SC2086
"$BIN" serve --model "$GGUF" --port 8021 ${HROMADA_SERVE_EXTRA:-} >/tmp/hromada-bench-serve.log 2>&1 &
pids+=($!)
servers=("hromada http://127.0.0.1:8021")
if [ -x "$LLAMA" ]; then
  # LLAMA_SERVER_EXTRA: more llama-server flags (on one Intel AMX VM its weight repacking
  # crashed at start; --no-repack ran).
  # shellcheck disable=SC2086
  "$LLAMA" -m "$GGUF" --port 8031 -t 2 --parallel 16 -c 4096 ${LLAMA_SERVER_EXTRA:-} >/tmp/llama-bench-serve.log 2>&1 &
  pids+=($!)
  servers+=("llama-server http://127.0.0.1:8031")
else
  echo "(no llama-server at $LLAMA: scripts/build-llama-cpp.sh builds it; measuring hromada alone)"
fi
for s in "${servers[@]}"; do wait_up "${s#* }"; done

results=$(mktemp)
seed=100
for rep in $(seq 1 "$REPS"); do
  for s in "${servers[@]}"; do
    name="${s%% *}" url="${s#* }"
    for c in 1 16; do
      n=$([ "$c" = 1 ] && echo 6 || echo "$N16")
      seed=$((seed + 1))
      out=$("$BIN" bench serve --endpoint "$url" --num-prompts "$n" --max-concurrency "$c" \
        --input-len 128 --output-len 64 --seed "$seed" 2>&1 | tail -1)
      tps=$(echo "$out" | sed -n 's/.*output \([0-9.]*\) tok\/s.*/\1/p')
      echo "rep $rep $name C=$c: $out"
      echo "$name $c $tps" >>"$results"
    done
  done
done
python3 - "$results" <<'EOF'
import statistics, sys, collections
r = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, c, tps = line.split()
    r[(name, int(c))].append(float(tps))
for name in dict.fromkeys(k[0] for k in r):
    c1, c16 = statistics.median(r[(name, 1)]), statistics.median(r[(name, 16)])
    print(f"{name}: median output tok/s C=1 {c1:.1f}, C=16 {c16:.1f}, ratio {c16 / c1:.2f}x  (runs: C=1 {r[(name, 1)]}, C=16 {r[(name, 16)]})")
EOF
rm -f "$results"
