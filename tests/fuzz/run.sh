#!/usr/bin/env bash
# Build and run the protocol fuzzer for SECONDS (default 60):
#   tests/fuzz/run.sh [SECONDS]
# Needs clang with libFuzzer (libclang-rt-14-dev). New inputs libFuzzer finds
# go to build-fuzz/corpus, not into the committed seeds (tests/fuzz/corpus),
# and crash files to build-fuzz/; exit status is non-zero on any crash.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
CC=clang cmake -S . -B build-fuzz -DKVSTASH_FUZZ=ON -DKVSTASH_CUDA=OFF \
	-DKVSTASH_SANITIZE=address >/dev/null
cmake --build build-fuzz --target fuzz_protocol -j "$(nproc 2>/dev/null || echo 2)"
mkdir -p build-fuzz/corpus
exec ./build-fuzz/tests/fuzz/fuzz_protocol -max_total_time="$secs" \
	-dict=tests/fuzz/protocol.dict -artifact_prefix=build-fuzz/ \
	build-fuzz/corpus tests/fuzz/corpus
