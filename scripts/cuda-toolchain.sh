#!/usr/bin/env bash
# The CUDA 13.0 toolchain from PyPI (no system CUDA needed), for building hromada with
# `--features cuda` on a machine without a GPU and carrying the binary to one.
#
#   scripts/cuda-toolchain.sh            # install into $HROMADA_CUDA_VENV (once)
#   source <(scripts/cuda-toolchain.sh env)   # PATH, CUDA_ROOT, CUDA_COMPUTE_CAP, link paths
#   cargo check --features cuda          # or: cargo build --release --features cuda
#                                        # (into target/cuda; candle's kernels take ~15 min)
#
# What it sets up: nvcc, the runtime, cuBLAS, cuRAND, NVRTC and CCCL headers in a venv
# ($HROMADA_CUDA_VENV, default ~/.cache/hromada/cuda-venv); a folder of unversioned .so
# links to them for the linker; and a stub libcuda.so (soname libcuda.so.1) exporting
# every cu* driver symbol cudarc binds, so a binary links here and loads the real
# driver on the GPU machine. Run there with
#   LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib ./hromada ...
set -euo pipefail
VENV="${HROMADA_CUDA_VENV:-$HOME/.cache/hromada/cuda-venv}"
CAP="${CUDA_COMPUTE_CAP:-90}"
CU="$VENV/lib/python3.11/site-packages/nvidia/cu13"
LINK="$VENV/link"

print_env() {
    echo "export PATH=\"$CU/bin:\$PATH\""
    echo "export CUDA_ROOT=\"$CU\""
    echo "export CUDA_PATH=\"$CU\""
    echo "export CUDA_COMPUTE_CAP=$CAP"
    echo "export LIBRARY_PATH=\"$LINK\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
    echo "export RUSTFLAGS=\"\${RUSTFLAGS:-} -L $LINK\""
    # Its own target dir: other flags and features would rebuild the CPU build's cache.
    echo "export CARGO_TARGET_DIR=\"\${HROMADA_CUDA_TARGET:-$(cd "$(dirname "$0")/.." && pwd)/target/cuda}\""
}

if [ "${1:-}" = env ]; then
    print_env
    exit 0
fi

if [ ! -x "$CU/bin/nvcc" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
        'nvidia-cuda-cccl==13.0.*' nvidia-nvvm==13.0.88 'nvidia-cublas==13.0.*' \
        'nvidia-curand==10.4.0.*' 'nvidia-cuda-nvrtc==13.0.*'
fi
mkdir -p "$LINK"
# nvcc links from $CU/lib64 (its nvcc.profile); the wheels put the libraries in lib.
[ -e "$CU/lib64" ] || ln -s lib "$CU/lib64"
# Unversioned links (libcublas.so -> libcublas.so.13, ...) for `-lcublas`.
for f in "$CU"/lib/lib*.so.*; do
    [ -e "$f" ] || continue
    base=$(basename "$f")
    name="${base%%.so.*}.so"
    [ -e "$LINK/$name" ] || ln -sf "$f" "$LINK/$name"
done

# The stub driver: every cu* symbol that cudarc's driver bindings name.
if [ ! -e "$LINK/libcuda.so" ]; then
    (cd "$(dirname "$0")/.." && cargo fetch -q)
    src=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys 2>/dev/null | sort | tail -1 || true)
    if [ -z "$src" ]; then
        echo "cudarc sources not found: run 'cargo fetch' first" >&2
        exit 1
    fi
    grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*\b' "$src" | sort -u \
        | awk '{print "void " $1 "(void) {}"}' > "$LINK/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
    ln -sf libcuda.so "$LINK/libcuda.so.1"
fi
echo "CUDA toolchain ready in $VENV; load it with: source <($0 env)"
