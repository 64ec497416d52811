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
# Native flags, except on CPUs with AMX: this version's AMX matmul (picked by -march=native there)
# segfaults in every model (seen on a 2-core Sapphire Rapids VM), so those CPUs get their other
# instruction sets named one by one and llama.cpp's next-best kernels (AVX-512 VNNI, repacking).
ISA=(-DGGML_NATIVE=ON)
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
  ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
       -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
       -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)")
fi
if [ "$missing" = 1 ]; then
  cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release "${ISA[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF >&2
  cmake --build "$DIR/build" -j "$(nproc)" --target "${TARGETS[@]}" >&2
fi
echo "$BIN"
