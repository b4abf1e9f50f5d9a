#!/usr/bin/env bash
# scripts/gpu_build.sh - build the CUDA transfer engine's GPU test and benchmark
# with nvcc and gcc alone: no libzmq, msgpack or BLAKE3 (a bare GPU machine).
# CMake (cmake/cuda.cmake) builds the same programs where the full toolchain is.
#
#   scripts/gpu_build.sh [OUTDIR]      default OUTDIR: build-gpu
#   -> OUTDIR/test_cuda_transfer, OUTDIR/gpu_bench
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build-gpu}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CUDA_HOME=${CUDA_HOME:-$(cd "$(dirname "$NVCC")/.." && pwd)}
# Hopper machine code plus PTX (as cmake/cuda.cmake: 90-real;90-virtual).
GENCODE=${GENCODE:-"-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90"}
# The warnings of CMakeLists.txt (gcc): log and error lines truncate on purpose.
CFLAGS="-std=c11 -O2 -g -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
        -Wno-missing-field-initializers -Wno-format-truncation -D_GNU_SOURCE -DKVSTASH_HAVE_CUDA=1
        -Isrc -Itests -isystem $CUDA_HOME/include"
NVFLAGS="-O2 -std=c++17 $GENCODE -lineinfo -DKVSTASH_HAVE_CUDA=1 -D_GNU_SOURCE -Isrc
         -Xcompiler=-Wall,-Wextra,-Werror,-Wno-unused-parameter,-Wno-missing-field-initializers
         --Werror=all-warnings"
mkdir -p "$OUT/obj"

pids=()
# The project's own C files, with the same warnings as errors as everything else.
for f in src/layout.c src/log.c src/lock.c tests/helpers_pure.c; do
	gcc $CFLAGS -c "$f" -o "$OUT/obj/$(basename "$f" .c).o" & pids+=($!)
done
gcc $CFLAGS -c tests/test_cuda_transfer.c -o "$OUT/obj/test_cuda_transfer.o" & pids+=($!)
"$NVCC" $NVFLAGS -c src/transfer_cuda.cu -o "$OUT/obj/transfer_cuda.o" & pids+=($!)
"$NVCC" $NVFLAGS -c bench/gpu_bench.cu -o "$OUT/obj/gpu_bench.o" & pids+=($!)
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ $fail -eq 0 ] || { echo "gpu_build: a compile failed (above)" >&2; exit 1; }

CORE="$OUT/obj/transfer_cuda.o $OUT/obj/layout.o $OUT/obj/log.o $OUT/obj/lock.o"
"$NVCC" $GENCODE -o "$OUT/test_cuda_transfer" "$OUT/obj/test_cuda_transfer.o" \
	"$OUT/obj/helpers_pure.o" $CORE -lpthread -lm
"$NVCC" $GENCODE -o "$OUT/gpu_bench" "$OUT/obj/gpu_bench.o" $CORE -lpthread -lm
echo "gpu_build: $OUT/test_cuda_transfer $OUT/gpu_bench"
