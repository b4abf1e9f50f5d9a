#!/usr/bin/env bash
# hang_guard.sh TIMEOUT_S COMMAND [ARGS...]
#
# ctest runs every test through this. It runs COMMAND and passes its result
# through unchanged: the same exit status (0 pass, 1 fail, 77 skip, ...), or
# the same signal re-raised on itself when COMMAND died of one, so ctest
# reports exactly what it would without the guard.
#
# TIMEOUT_S is the test's ctest TIMEOUT. ctest kills a timed-out test with
# SIGKILL and leaves nothing behind, so the guard acts first: a margin
# before it (a fifth of the timeout, at most 30 s) it writes the stack of
# every thread of COMMAND and of every process below it (the kvstashd
# daemons a test starts, helper children) with gdb, plus each thread's
# state and kernel wait channel from /proc (kept where gdb may not attach),
# to stderr and to a file; kills that process tree; and then waits for
# ctest's own timeout, which still decides and reports "Timeout".
# Run outside ctest, it exits 124 once the timeout has passed.
#
#   KVSTASH_HANG_DIR   where the stack file goes (default: the build's
#                      Testing/Temporary, else $TMPDIR or /tmp)
set -u

if [ $# -lt 2 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
	echo "usage: hang_guard.sh TIMEOUT_S COMMAND [ARGS...]" >&2
	exit 2
fi
timeout_s=$1
shift
# The test's name, for the stack file: the program, or the script a
# bash/python interpreter runs.
name=$(basename -- "$1")
case $name in bash | sh | python3 | python) [ $# -ge 2 ] && name=$(basename -- "$2") ;; esac
margin=$((timeout_s / 5))
[ "$margin" -gt 30 ] && margin=30
[ "$margin" -lt 1 ] && margin=1
guard_s=$((timeout_s - margin))

# Every process below $1 (children first found, then theirs), from /proc.
descendants() {
	local -a queue=("$1")
	local p c
	while [ ${#queue[@]} -gt 0 ]; do
		p=${queue[0]}
		queue=("${queue[@]:1}")
		for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do
			echo "$c"
			queue+=("$c")
		done
	done
}

dump_one() {
	local pid=$1 t
	echo "==== pid $pid: $(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null)"
	for t in /proc/"$pid"/task/*; do
		[ -d "$t" ] || continue
		printf '  tid %s %-16s state %s wchan %s\n' "${t##*/}" "$(cat "$t"/comm 2>/dev/null)" \
			"$(awk '{ print $3 }' "$t"/stat 2>/dev/null)" "$(cat "$t"/wchan 2>/dev/null)"
	done
	if command -v gdb >/dev/null; then
		timeout 60 gdb -batch -nx -p "$pid" -ex "set pagination off" \
			-ex "thread apply all bt" 2>&1 |
			grep -vE '^\[New LWP|^\[Thread debugging|^Using host libthread_db|^warning: (Could not load|Unable to find libthread_db)'
	else
		echo "  (no gdb: thread states only)"
	fi
}

dump_and_kill() {
	local child=$1 dir file pids p
	dir=${KVSTASH_HANG_DIR:-}
	if [ -z "$dir" ] && [ -n "${KVSTASH_BUILD_DIR:-}" ]; then
		dir=$KVSTASH_BUILD_DIR/Testing/Temporary
	fi
	[ -n "$dir" ] && mkdir -p "$dir" 2>/dev/null
	[ -n "$dir" ] && [ -w "$dir" ] || dir=${TMPDIR:-/tmp}
	file=$dir/hang-$name-$(date +%Y%m%dT%H%M%S)-$$.txt
	pids="$child $(descendants "$child")"
	{
		echo "hang_guard: '$CMD' still running ${guard_s} s after start" \
			"(ctest timeout ${timeout_s} s); thread stacks of $(echo $pids | wc -w) process(es):"
		for p in $pids; do
			[ -d /proc/"$p" ] && dump_one "$p"
		done
		echo "hang_guard: end of stacks"
	} >"$file" 2>&1
	cat "$file" >&2
	echo "hang_guard: stacks saved in $file; killing the test's processes" >&2
	# Stop them all first, so none restarts another, then kill.
	for p in $pids; do kill -STOP "$p" 2>/dev/null; done
	for p in $pids; do kill -KILL "$p" 2>/dev/null; done
}

CMD="$*"
sleep "$guard_s" &
sleeper=$!
"$@" &
child=$!

# Forward a TERM/INT sent to the guard (ctest --stop-time, a user's ^C).
trap 'kill -TERM $child 2>/dev/null' TERM INT

done_pid=
while :; do
	wait -n -p done_pid "$child" "$sleeper"
	rc=$?
	[ -n "$done_pid" ] && break
	# Interrupted by a trapped signal: wait again.
done

if [ "$done_pid" = "$child" ]; then
	kill "$sleeper" 2>/dev/null
	wait "$sleeper" 2>/dev/null
	if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then
		# Died of a signal: die of the same one, so ctest reports it as such.
		sig=$((rc - 128))
		trap - TERM INT
		trap - "$sig" 2>/dev/null
		ulimit -c 0
		kill -s "$sig" $$
	fi
	exit "$rc"
fi

dump_and_kill "$child"
wait "$child" 2>/dev/null
# ctest's timeout is the verdict: wait for it (margin + a little).
sleep $((margin + 5))
echo "hang_guard: no ctest timeout came; exiting 124" >&2
exit 124
