#!/usr/bin/env bash
# Build llama.cpp's own benchmark tools (llama-bench, llama-batched-bench, llama-perplexity, llama-completion,
# llama-server) from the sources vendored in the llama-cpp-python source package, for the peer
# comparisons in benchmarks/. The build lives outside the repository and is reused when present;
# it is never part of the test suite (about 10-15 minutes on 2 cores the first time).
#
#   bash benchmarks/build_llamacpp.sh            # prints the bin directory on its last line
#   LLAMACPP_DIR=/some/cache bash benchmarks/build_llamacpp.sh
set -euo pipefail
VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
DIR="${LLAMACPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lmserve-llamacpp}"
TARGETS=(llama-bench llama-batched-bench llama-perplexity llama-server llama-completion)
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
SRC="$DIR/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR" >&2
  tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
BIN="$DIR/build/bin"
missing=0
for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
  cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF >&2
  cmake --build "$DIR/build" -j "$(nproc)" --target "${TARGETS[@]}" >&2
fi
echo "$BIN"
