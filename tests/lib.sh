# tests/lib.sh - shared set-up of the shell tests: sourced as
#   . "$(dirname "$0")/lib.sh"; t_setup TAG
# Defines BUILD, KVSTASHD, KVSTASH, PY; t_setup makes $TMP, the PIDS array
# (daemons killed on every exit path), and the FAILS/CHECKS counters used
# by fail and check.

BUILD=${KVSTASH_BUILD_DIR:-$(cd "$(dirname "$0")/.." && pwd)/build}
KVSTASHD=$BUILD/kvstashd
KVSTASH=$BUILD/kvstash
PY=/usr/bin/python3
[ -x "$KVSTASHD" ] && [ -x "$KVSTASH" ] || { echo "no kvstashd/kvstash in $BUILD"; exit 1; }

cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		kill -TERM "$p" 2>/dev/null
	done
	for p in "${PIDS[@]}"; do
		for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	rm -rf "$TMP"
}

# t_setup TAG: a private temporary directory and the exit traps.
t_setup() {
	TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvstash-$1-XXXXXX")
	PIDS=()
	FAILS=0
	CHECKS=0
	trap cleanup EXIT
	trap 'exit 1' INT TERM HUP
}

fail() {
	echo "FAIL: $*"
	FAILS=$((FAILS + 1))
}

# check NAME CONDITION-COMMAND...: count one check.
check() {
	local what=$1
	shift
	CHECKS=$((CHECKS + 1))
	"$@" || fail "$what"
}
