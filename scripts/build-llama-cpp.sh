#!/usr/bin/env bash
# Build llama.cpp (CPU) from the source vendored in the PyPI sdist of llama-cpp-python,
# outside the repository, for same-run benchmark comparisons (llama-bench, llama-server,
# llama-batched-bench). Nothing of it is committed.
#   scripts/build-llama-cpp.sh            -> $LLAMA_CPP_DIR (default: $HROMADA_CACHE/llama.cpp)
#   scripts/build-llama-cpp.sh --cuda     -> the CUDA build (default: $HROMADA_CACHE/llama.cpp-cuda)
#     with the pip CUDA toolchain (scripts/cuda-toolchain.sh), sm_90, statically linked
#     except for the CUDA runtime libraries the GPU machine has; carry build/bin/llama-bench,
#     llama-server and llama-batched-bench to it.
set -euo pipefail
CACHE="${HROMADA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hromada}"
CUDA=0
if [ "${1:-}" = --cuda ]; then
  CUDA=1
  here="$(cd "$(dirname "$0")" && pwd)"
  "$here/cuda-toolchain.sh" >/dev/null
  # shellcheck disable=SC1090
  source <("$here/cuda-toolchain.sh" env)
  CU="$CUDA_ROOT"
  CMAKE_EXTRA="${CMAKE_EXTRA:-} -DGGML_CUDA=ON -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=${CUDA_COMPUTE_CAP}"
  CMAKE_EXTRA="$CMAKE_EXTRA -DCMAKE_CUDA_COMPILER=$CU/bin/nvcc -DCUDAToolkit_ROOT=$CU -DCMAKE_LIBRARY_PATH=$LIBRARY_PATH"
fi
DIR="${LLAMA_CPP_DIR:-$CACHE/llama.cpp$([ $CUDA = 1 ] && echo -cuda || true)}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$DIR"
if [ -x "$DIR/build/bin/llama-bench" ] && [ -x "$DIR/build/bin/llama-server" ]; then
  echo "llama.cpp already built in $DIR/build/bin"; exit 0
fi
cd "$DIR"
if ! command -v cmake >/dev/null; then
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/pip" install --quiet cmake ninja
  export PATH="$DIR/venv/bin:$PATH"
fi
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$DIR/sdist"
rm -rf "$DIR/src" && mkdir -p "$DIR/src"
tar xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/src" --strip-components=1
cmake -S "$DIR/src/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF ${CMAKE_EXTRA:-}
cmake --build "$DIR/build" -j"$(nproc)" --target llama-bench llama-server llama-batched-bench
echo "built: $DIR/build/bin"
