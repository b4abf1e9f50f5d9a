#!/usr/bin/env bash
# scripts/gpu_carry.sh - gather what the GPU machine needs to run kvstashd, its
# CUDA tests and benchmarks from a CMake build (CUDA on) into one folder: the
# GPU machine has CUDA and python3 but none of kvstash's other libraries
# (libzmq, msgpack-c, libmicrohttpd, hiredis, liburing, ...), so those are
# copied from this machine next to the binaries.
#
#   scripts/gpu_carry.sh [BUILD] [OUT]     defaults: build, .carry
#
# Then, on the GPU machine (repository root):
#   export LD_LIBRARY_PATH=$PWD/.carry/lib KVSTASH_BUILD_DIR=$PWD/.carry \
#          KVSTASH_SOURCE_DIR=$PWD KVSTASH_LIB=$PWD/.carry/lib/libkvstash.so \
#          KVSTASH_LIBZMQ=$PWD/.carry/lib/libzmq.so.5
#   .carry/tests/test_cuda_server; python3 tests/test_lmcache_gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
OUT=${2:-.carry}

[ -x "$BUILD/kvstashd" ] || { echo "gpu_carry: $BUILD/kvstashd missing: build first" >&2; exit 2; }
[ -x "$BUILD/tests/test_cuda_server" ] ||
	{ echo "gpu_carry: $BUILD was built without CUDA" >&2; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT/lib" "$OUT/tests" "$OUT/bench"
cp "$BUILD/kvstashd" "$BUILD/kvstash" "$OUT/"
cp -P "$BUILD"/libkvstash.so* "$OUT/lib/"
for t in test_cuda_server test_cuda_transfer; do
	[ -x "$BUILD/tests/$t" ] && cp "$BUILD/tests/$t" "$OUT/tests/"
done
for b in gpu_bench gpu_server_bench server_bench host_bench; do
	[ -x "$BUILD/bench/$b" ] && cp "$BUILD/bench/$b" "$OUT/bench/"
done

# Every shared library the programs load that glibc does not provide. The
# GPU machine's glibc (Ubuntu 24.04) is newer than Debian 12's, so the C
# library itself, the dynamic loader and libresolv stay the machine's own.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl|librt|libresolv|libgcc_s|libstdc\+\+)'
for bin in "$OUT"/kvstashd "$OUT"/kvstash "$OUT"/lib/libkvstash.so.*.* "$OUT"/tests/* "$OUT"/bench/*; do
	ldd "$bin" | awk '$3 ~ /^\// { print $1, $3 }'
done | sort -u | while read -r name path; do
	[[ $name =~ $skip ]] && continue
	[[ $name == libkvstash* ]] && continue
	cp -L "$path" "$OUT/lib/$name"
done
echo "gpu_carry: $(du -sh "$OUT" | cut -f1) in $OUT ($(ls "$OUT/lib" | wc -l) libraries)"
