#!/usr/bin/env bash
# Grep src/ for calls that are allowed only in one place (memcached t/whitespace.t style):
# raw mutex/cond waits only in lock.c, exit() only in main() files, printf only in the CLI (cli.c, cli_bench.c).
set -u
cd "$(dirname "$0")/.."
fail=0
ban() {	# pattern, allowed-files-regex, why
	local hits
	hits=$(grep -nE "$1" src/*.c src/*.h src/*.cu 2>/dev/null | grep -vE "^($2):" || true)
	if [ -n "$hits" ]; then
		echo "banned.sh: $3:"
		echo "$hits"
		fail=1
	fi
}
ban 'pthread_mutex_(timed|clock)?lock\(|pthread_cond_(timed)?wait\(' 'src/lock.c' \
	'mutex/cond waits only in lock.c (every wait needs a deadline)'
ban '(^|[^_a-z])exit\(' 'src/kvstashd.c|src/cli.c' 'exit() only in main() programs'
ban '(^|[^a-z_])printf\(' 'src/cli.c|src/cli_bench.c' 'printf only in the CLI (log_* elsewhere)'
[ $fail -eq 0 ] && echo "banned.sh: clean"
exit $fail
