#!/usr/bin/env bash
# Build and run a libFuzzer target for SECONDS (default 60):
#   tests/fuzz/run.sh [SECONDS] [TARGET]
# TARGET: protocol (the default: the wire codec), pickle (the restricted
# pickle reader and LMCache's CudaIPCWrapper decoder), or all (each in turn,
# SECONDS apiece). Needs clang with libFuzzer (libclang-rt-14-dev). New inputs
# libFuzzer finds go to build-fuzz/corpus[_pickle], not into the committed
# seeds (tests/fuzz/corpus, tests/fuzz/corpus_pickle), and crash files to
# build-fuzz/; exit status is non-zero on any crash.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
target=${2:-protocol}
case "$target" in
protocol | pickle) targets=("$target") ;;
all) targets=(protocol pickle) ;;
*)
	echo "usage: $0 [SECONDS] [protocol|pickle|all]" >&2
	exit 2
	;;
esac
CC=clang cmake -S . -B build-fuzz -DKVSTASH_FUZZ=ON -DKVSTASH_CUDA=OFF \
	-DKVSTASH_SANITIZE=address >/dev/null
for t in "${targets[@]}"; do
	cmake --build build-fuzz --target "fuzz_$t" -j "$(nproc 2>/dev/null || echo 2)"
done
for t in "${targets[@]}"; do
	if [ "$t" = protocol ]; then
		seeds=tests/fuzz/corpus work=build-fuzz/corpus
	else
		seeds=tests/fuzz/corpus_$t work=build-fuzz/corpus_$t
	fi
	mkdir -p "$work"
	echo "== fuzz_$t for ${secs} s"
	./build-fuzz/tests/fuzz/fuzz_"$t" -max_total_time="$secs" \
		-dict=tests/fuzz/"$t".dict -artifact_prefix=build-fuzz/ "$work" "$seeds"
done
