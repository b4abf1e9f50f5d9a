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
CFLAGS="-std=c11 -O2 -g -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
        -Wno-missing-field-initializers -D_GNU_SOURCE -DKVSTASH_HAVE_CUDA=1
        -Isrc -Itests -isystem $CUDA_HOME/include"
NVFLAGS="-O2 -std=c++17 $GENCODE -lineinfo -DKVSTASH_HAVE_CUDA=1 -D_GNU_SOURCE -Isrc
         -Xcompiler=-Wall,-Wextra,-Werror,-Wno-unused-parameter,-Wno-missing-field-initializers
         --Werror=all-warnings"
mkdir -p "$OUT/obj"

# The few test helpers the GPU test uses (tests/helpers.c also holds the
# kvstashd/ZMQ helpers, which need libzmq): same semantics.
cat > "$OUT/obj/helpers_min.c" <<'SHIM'
#include "helpers.h"
#include <string.h>
int t_failures;
int t_result(const char *test_name)
{
	if (t_failures) {
		fprintf(stderr, "%s: %d check(s) failed\n", test_name, t_failures);
		return T_EXIT_FAIL;
	}
	fprintf(stderr, "%s: ok\n", test_name);
	return T_EXIT_PASS;
}
static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}
void t_fill(void *buf, size_t n, uint64_t seed)
{
	uint8_t *p = buf;
	for (size_t i = 0; i < n; i += 8) {
		uint64_t v = splitmix64(seed ^ (i * 0x100000001b3ull));
		memcpy(p + i, &v, n - i < 8 ? n - i : 8);
	}
}
size_t t_verify(const void *buf, size_t n, uint64_t seed)
{
	const uint8_t *p = buf;
	for (size_t i = 0; i < n; i++) {
		uint64_t v = splitmix64(seed ^ ((i & ~(size_t)7) * 0x100000001b3ull));
		if (p[i] != ((const uint8_t *)&v)[i & 7])
			return i;
	}
	return (size_t)-1;
}
SHIM

pids=()
# Others' files: their warnings are not this script's to fail on.
for f in src/layout.c src/log.c src/lock.c; do
	gcc ${CFLAGS/-Werror/} -w -c "$f" -o "$OUT/obj/$(basename "$f" .c).o" & pids+=($!)
done
gcc $CFLAGS -c "$OUT/obj/helpers_min.c" -o "$OUT/obj/helpers_min.o" & pids+=($!)
gcc $CFLAGS -c tests/test_cuda_transfer.c -o "$OUT/obj/test_cuda_transfer.o" & pids+=($!)
"$NVCC" $NVFLAGS -c src/transfer_cuda.cu -o "$OUT/obj/transfer_cuda.o" & pids+=($!)
"$NVCC" $NVFLAGS -c bench/gpu_bench.cu -o "$OUT/obj/gpu_bench.o" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done

CORE="$OUT/obj/transfer_cuda.o $OUT/obj/layout.o $OUT/obj/log.o $OUT/obj/lock.o"
"$NVCC" $GENCODE -o "$OUT/test_cuda_transfer" "$OUT/obj/test_cuda_transfer.o" \
	"$OUT/obj/helpers_min.o" $CORE -lpthread -lm
"$NVCC" $GENCODE -o "$OUT/gpu_bench" "$OUT/obj/gpu_bench.o" $CORE -lpthread -lm
echo "gpu_build: $OUT/test_cuda_transfer $OUT/gpu_bench"
