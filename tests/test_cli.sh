# Description: golden-style checks of the kvstash CLI and of kvstashd flag/config parsing. Labels: unit
#
# Against a real kvstashd on ipc://<mktemp -d>/sock:
#   kvstash ping (one and -c 3), ping of a dead endpoint (error text, exit 1,
#   bounded by --timeout-ms), stats (table with slots_total etc.), store-test
#   --chunks 4 for every --layout x --dtype pair (verify ok, 4 of 4 cached,
#   exit 0), usage errors (exit 2).
# kvstashd itself: every option that `kvstashd --help` lists (parsed from the
# help text, so new options are covered) is given bad values (non-numeric,
# negative, out of range, bad enum, overlong string, missing value) and must
# exit 2 naming the flag; unknown flags and stray arguments exit 2; --help
# exits 0; --config FILE is honoured, a later or earlier flag overrides it,
# a bad line is refused as FILE:LINE; LMCache aliases are accepted.
# Every daemon this script starts is killed on every exit path (trap).
set -u

. "$(dirname "$0")/lib.sh"
t_setup cli

# run_cmd OUTFILE CMD...: run with a hard timeout, stdout+stderr to OUTFILE, sets RC.
run_cmd() {
	local out=$1
	shift
	timeout 20 "$@" >"$out" 2>&1
	RC=$?
}

# start_daemon NAME ARGS...: start kvstashd on ipc://$TMP/NAME.sock, wait for PING.
# Sets EP and DPID; the log is $TMP/NAME.log.
start_daemon() {
	local name=$1
	shift
	EP=ipc://$TMP/$name.sock
	"$KVSTASHD" --listen="$EP" --http-port=0 "$@" >"$TMP/$name.log" 2>&1 &
	DPID=$!
	PIDS+=("$DPID")
	for _ in $(seq 100); do
		if "$KVSTASH" ping -e "$EP" --timeout-ms=100 >/dev/null 2>&1; then
			return 0
		fi
		kill -0 "$DPID" 2>/dev/null || break
		sleep 0.1
	done
	echo "kvstashd $* did not start; log:"
	cat "$TMP/$name.log"
	return 1
}

stop_daemon() {
	local pid=$1 st
	kill -TERM "$pid" 2>/dev/null
	wait "$pid"
	st=$?
	[ "$st" -eq 0 ] || fail "kvstashd (pid $pid) exited with status $st after SIGTERM"
}

# stat EP NAME: one counter from `kvstash stats`.
srv_stat() {
	"$KVSTASH" stats -e "$1" --timeout-ms=2000 | awk -v n="$2" '$1 == n { print $2 }'
}

# ---- the kvstash CLI ----------------------------------------------------------

start_daemon main --pool-size=512M || exit 1
MAIN_EP=$EP
MAIN_PID=$DPID

run_cmd "$TMP/out" "$KVSTASH" ping -e "$MAIN_EP"
check "ping exits 0 (got $RC)" [ "$RC" -eq 0 ]
check "ping prints one pong line: $(cat "$TMP/out")" \
	grep -Eqx "pong from ${MAIN_EP//./\\.}: time=[0-9]+\.[0-9]{3} ms" "$TMP/out"
check "ping prints nothing else" [ "$(wc -l <"$TMP/out")" -eq 1 ]

run_cmd "$TMP/out" "$KVSTASH" ping -e "$MAIN_EP" -c 3 -i 10
check "ping -c 3 exits 0" [ "$RC" -eq 0 ]
check "ping -c 3 prints 3 pongs" [ "$(grep -Ec "^pong from ${MAIN_EP//./\\.}: time=[0-9.]+ ms$" "$TMP/out")" -eq 3 ]
check "ping -c 3 ends with a summary: $(tail -1 "$TMP/out")" \
	grep -Eq "^--- ${MAIN_EP//./\\.}: 3 sent, 3 received, rtt min/avg/p99/max = ([0-9.]+/){3}[0-9.]+ ms$" "$TMP/out"
run_cmd "$TMP/out" "$KVSTASH" ping -e "$MAIN_EP" -c 5 -i 0 -q
check "ping -q prints only the summary: $(cat "$TMP/out")" \
	bash -c "[ \$(wc -l <'$TMP/out') -eq 1 ] && grep -q '5 sent, 5 received' '$TMP/out'"
# SIGINT mid-run: the summary counts what was sent, exit 0.
"$KVSTASH" ping -e "$MAIN_EP" -c 100000 -i 20 -q >"$TMP/out" 2>&1 &
PING_PID=$!
sleep 0.5
kill -INT $PING_PID
wait $PING_PID
RC=$?
check "ping stopped by SIGINT exits 0 (got $RC)" [ "$RC" -eq 0 ]
check "ping stopped by SIGINT prints the summary: $(cat "$TMP/out")" \
	grep -Eq "^--- .*: [0-9]+ sent, [0-9]+ received, rtt" "$TMP/out"

# Global options before the command, as redis-cli, git and systemctl take them.
run_cmd "$TMP/out" "$KVSTASH" -e "$MAIN_EP" ping
check "kvstash -e EP ping exits 0 (got $RC): $(cat "$TMP/out")" [ "$RC" -eq 0 ]
check "kvstash -e EP ping pongs" grep -q "^pong from ${MAIN_EP//./\\.}:" "$TMP/out"
run_cmd "$TMP/out" "$KVSTASH" --endpoint="$MAIN_EP" --timeout-ms=2000 ping -c 2 -i 0
check "kvstash --endpoint=EP --timeout-ms=N ping -c 2 exits 0 (got $RC)" [ "$RC" -eq 0 ]
check "kvstash --endpoint=EP --timeout-ms=N ping -c 2 pongs twice" \
	[ "$(grep -c "^pong from" "$TMP/out")" -eq 2 ]
run_cmd "$TMP/out" "$KVSTASH" -e "$MAIN_EP" ping stats
check "two commands are refused with exit 2 (got $RC)" [ "$RC" -eq 2 ]
check "two commands: the stray one is named" grep -q "unexpected argument 'stats'" "$TMP/out"
run_cmd "$TMP/out" "$KVSTASH" -e "$MAIN_EP"
check "options without a command exit 2 (got $RC)" [ "$RC" -eq 2 ]

# KVSTASH_ENDPOINT is the default endpoint.
KVSTASH_ENDPOINT=$MAIN_EP run_cmd "$TMP/out" "$KVSTASH" ping
check "ping via \$KVSTASH_ENDPOINT exits 0" [ "$RC" -eq 0 ]
check "ping via \$KVSTASH_ENDPOINT names it" grep -q "^pong from ${MAIN_EP//./\\.}:" "$TMP/out"

DEAD=ipc://$TMP/nobody.sock
t0=$(date +%s%N)
run_cmd "$TMP/out" "$KVSTASH" ping -e "$DEAD" --timeout-ms=300
t1=$(date +%s%N)
check "ping of a dead endpoint exits 1 (got $RC)" [ "$RC" -eq 1 ]
check "ping of a dead endpoint says so: $(cat "$TMP/out")" \
	grep -q "ping ${DEAD}: .*no reply.*300 ms" "$TMP/out"
check "ping of a dead endpoint does not print pong" bash -c "! grep -q pong '$TMP/out'"
ms=$(((t1 - t0) / 1000000))
check "ping --timeout-ms=300 returns within 3 s (took $ms ms)" [ "$ms" -lt 3000 ]

run_cmd "$TMP/out" "$KVSTASH" stats -e "$MAIN_EP"
check "stats exits 0" [ "$RC" -eq 0 ]
check "stats header" grep -qx "kvstashd at ${MAIN_EP//./\\.}" "$TMP/out"
for n in slots_total slots_free pool_bytes objects pins read_locks frame_faults \
	semantic_errors requests_ping workers; do
	check "stats row $n" grep -Eq "^  $n +[0-9]+( +\([0-9.]+ MiB\))?$" "$TMP/out"
done
check "stats: pool_bytes is 512 MiB" grep -Eq "^  pool_bytes +536870912 +\(512\.0 MiB\)$" "$TMP/out"
run_cmd "$TMP/out" "$KVSTASH" stats -e "$DEAD" --timeout-ms=300
check "stats of a dead endpoint exits 1 (got $RC)" [ "$RC" -eq 1 ]

# The pool's slot size is fixed by the first registration (protocol.md §7
# objects of one size): run the largest object (flash_attn float32) first.
for dtype in float32 bfloat16 uint8; do
	for layout in flash_attn flashinfer mla; do
		run_cmd "$TMP/out" "$KVSTASH" store-test -e "$MAIN_EP" --chunks 4 --layout "$layout" \
			--dtype "$dtype"
		check "store-test $layout $dtype exits 0 (got $RC): $(tr '\n' '|' <"$TMP/out")" \
			[ "$RC" -eq 0 ]
		check "store-test $layout $dtype verify ok" \
			grep -Eqx "  verify    ok \(0 block\(s\) differ\)" "$TMP/out"
		check "store-test $layout $dtype all 4 chunks cached" \
			grep -Eqx "  LOOKUP +4 of 4 chunk\(s\) cached" "$TMP/out"
		check "store-test $layout $dtype header" \
			grep -Eq "^store-test: 4 chunk\(s\) of 256 tokens, 4 layers, $layout $dtype, " \
			"$TMP/out"
	done
done
check "store-test says its times follow a warm-up round" \
	grep -q "timed after 1 untimed warm-up round" "$TMP/out"
run_cmd "$TMP/out" "$KVSTASH" store-test -e "$MAIN_EP" --chunks 2 --warmup 0
check "store-test --warmup 0 exits 0 (got $RC)" [ "$RC" -eq 0 ]
check "store-test --warmup 0 says its times include first touches" \
	grep -q "no warm-up: the times include" "$TMP/out"
check "store-test left no instance registered" [ "$(srv_stat "$MAIN_EP" instances)" = 0 ]
check "store-test left no pins" [ "$(srv_stat "$MAIN_EP" pins)" = 0 ]

# Usage errors: exit 2, with a message, and nothing sent.
usage_err() {
	local what=$1
	shift
	run_cmd "$TMP/out" "$KVSTASH" "$@"
	check "$what exits 2 (got $RC): $(head -1 "$TMP/out")" [ "$RC" -eq 2 ]
	check "$what prints a message" [ -s "$TMP/out" ]
}
usage_err "no command"
usage_err "unknown command" frobnicate -e "$MAIN_EP"
check "unknown command named" grep -q "unknown command 'frobnicate'" "$TMP/out"
usage_err "--count=0" ping -e "$MAIN_EP" --count=0
check "--count=0 named" grep -q -- "--count" "$TMP/out"
usage_err "--count=abc" ping -e "$MAIN_EP" --count=abc
usage_err "-c -1" ping -e "$MAIN_EP" -c -1
usage_err "--timeout-ms=0" ping -e "$MAIN_EP" --timeout-ms=0
usage_err "--chunks=0" store-test -e "$MAIN_EP" --chunks=0
usage_err "--chunks=x" store-test -e "$MAIN_EP" --chunks=x
usage_err "--warmup=-1" store-test -e "$MAIN_EP" --warmup=-1
usage_err "unknown option" ping -e "$MAIN_EP" --no-such-option
usage_err "missing option value" ping -e "$MAIN_EP" --count
usage_err "stray argument" ping -e "$MAIN_EP" extra
usage_err "unknown --dtype" store-test -e "$MAIN_EP" --dtype=float64
usage_err "unknown --layout" store-test -e "$MAIN_EP" --layout=bogus
run_cmd "$TMP/out" "$KVSTASH" --help
check "kvstash --help exits 0" [ "$RC" -eq 0 ]
check "kvstash --help prints usage" grep -q "^Usage: kvstash \[OPTIONS\] COMMAND" "$TMP/out"
check "no usage error was sent to the server as a request" \
	[ "$(srv_stat "$MAIN_EP" semantic_errors)" = 0 ]

# ---- kvstashd flags ---------------------------------------------------------------

run_cmd "$TMP/help" "$KVSTASHD" --help
check "kvstashd --help exits 0" [ "$RC" -eq 0 ]
check "kvstashd --help prints usage" grep -q "^Usage: " "$TMP/help"
run_cmd "$TMP/out" "$KVSTASHD" --version
check "kvstashd --version exits 0" [ "$RC" -eq 0 ]

# "  --name=SPEC   help": SPEC is N, SIZE, STR, GIB, FILE or a|b|c.
mapfile -t OPTS < <(sed -nE 's/^  --([a-z0-9-]+)(=([^ ]+))? .*/\1 \3/p' "$TMP/help")
check "kvstashd --help lists at least 15 options (got ${#OPTS[@]})" [ "${#OPTS[@]}" -ge 15 ]

# Alias lines must name the alias ("  --alias=SPEC  alias of --name ..."), so
# that they are parsed (and tested) like any other option.
declare -A PRIMARY=()
while read -r alias primary; do
	PRIMARY[$alias]=$primary
done < <(sed -nE 's/^  --([a-z0-9-]+)(=[^ ]+)? +alias of --([a-z0-9-]+).*/\1 \3/p' "$TMP/help")
check "every 'alias of' line in kvstashd --help names its alias: $(grep -m1 '^ \{3,\}alias of' "$TMP/help")" \
	[ "$(grep -c 'alias of --' "$TMP/help")" -eq "${#PRIMARY[@]}" ]

LONG=$(printf 'x%.0s' $(seq 5000))
# bad_flag NAME ARG...: kvstashd must exit 2 at once, naming --NAME.
# A value wrongly accepted would start a server: it binds a private ipc
# endpoint, and timeout stops it.
bad_flag() {
	local name=$1
	shift
	timeout 5 "$KVSTASHD" --listen="ipc://$TMP/flagtest.sock" --http-port=0 --pool-size=64M "$@" \
		>"$TMP/out" 2>&1
	RC=$?
	check "kvstashd $(echo "$*" | cut -c1-60) exits 2 (got $RC)" [ "$RC" -eq 2 ]
	# An alias's error may name the option it stands for.
	check "kvstashd $(echo "$*" | cut -c1-60) names --$name: $(head -c 200 "$TMP/out")" \
		grep -Eq -- "--($name|${PRIMARY[$name]:-$name})\b" "$TMP/out"
}

ntested=0
for line in "${OPTS[@]}"; do
	read -r name spec <<<"$line"
	case "$name" in
	help|version|print-config|print-man) continue ;;
	esac
	ntested=$((ntested + 1))
	case "$spec" in
	N)
		for v in abc -5 1.5 "" 99999999999 99999999999999999999999 12abc " 7"; do
			bad_flag "$name" "--$name=$v"
		done
		;;
	SIZE)
		for v in abc -1 1X 1 99999T "" 64MM; do
			bad_flag "$name" "--$name=$v"
		done
		;;
	GIB)
		for v in abc -1 0 99999 "" 1GB; do
			bad_flag "$name" "--$name=$v"
		done
		;;
	STR)
		bad_flag "$name" "--$name=$LONG"
		;;
	FILE)
		bad_flag "$name" "--$name=$TMP/no-such-file.conf"
		bad_flag "$name" "--$name=$TMP"
		;;
	*\|*)
		bad_flag "$name" "--$name=bogus"
		bad_flag "$name" "--$name="
		;;
	*)
		fail "option --$name has a value spec '$spec' this test does not know"
		;;
	esac
	# A missing value: the flag last, without '='.
	bad_flag "$name" "--$name"
done
check "flag values tested for every listed option (got $ntested)" [ "$ntested" -ge 15 ]

for args in "--no-such-flag=1" "--no-such-flag" "stray" "-x"; do
	timeout 5 "$KVSTASHD" --listen="ipc://$TMP/flagtest.sock" --http-port=0 $args >"$TMP/out" 2>&1
	RC=$?
	check "kvstashd $args exits 2 (got $RC)" [ "$RC" -eq 2 ]
	shown=${args#--}
	shown=${shown%%=*}
	check "kvstashd $args names it: $(head -1 "$TMP/out")" grep -q -- "$shown" "$TMP/out"
done
bad_flag chunk-size --chunk-size=100	# in range but not a multiple of 8

# ---- --config FILE ------------------------------------------------------------------

CONF=$TMP/kvstashd.conf
cat >"$CONF" <<EOF
# a comment, then blank lines and odd spacing

chunk-size = 512
pool-size=128M
   workers   =   3
read_ttl_s = 7
log-level = debug
EOF
start_daemon conf1 --config "$CONF" || exit 1
check "--config: config line shows the file's values" \
	bash -c '# the server splits its config line: join the pieces
config_of() { grep -o "config:.*" "$1" | sed "s/^config://" | tr "\n" " " | sed "s/^/config: /"; }; config_of "$1" | grep -q "config: .* chunk-size=512 pool-size=134217728 workers=3 .*read-ttl-s=7 .*log-level=debug"' _ "$TMP/conf1.log"
check "--config: stats workers == 3" [ "$(srv_stat "$EP" workers)" = 3 ]
check "--config: stats pool_bytes == 128 MiB" [ "$(srv_stat "$EP" pool_bytes)" = 134217728 ]
stop_daemon "$DPID"

start_daemon conf2 --config "$CONF" --workers=5 --pool-size=96M || exit 1
check "--config then flags: flags override" \
	grep -q "config: .* chunk-size=512 pool-size=100663296 workers=5 " "$TMP/conf2.log"
check "--config then flags: stats workers == 5" [ "$(srv_stat "$EP" workers)" = 5 ]
stop_daemon "$DPID"

start_daemon conf3 --workers=4 --config="$CONF" || exit 1
check "flags then --config: flags still override" \
	grep -q "config: .* chunk-size=512 pool-size=134217728 workers=4 " "$TMP/conf3.log"
check "flags then --config: stats workers == 4" [ "$(srv_stat "$EP" workers)" = 4 ]
stop_daemon "$DPID"

# Bad lines: refused with FILE:LINE, exit 2.
bad_conf() {
	local what=$1 lineno=$2 content=$3
	printf '%b' "$content" >"$TMP/bad.conf"
	timeout 5 "$KVSTASHD" --listen="ipc://$TMP/flagtest.sock" --http-port=0 --config "$TMP/bad.conf" \
		>"$TMP/out" 2>&1
	RC=$?
	check "config $what exits 2 (got $RC)" [ "$RC" -eq 2 ]
	check "config $what names $TMP/bad.conf:$lineno: $(head -1 "$TMP/out")" \
		grep -q "$TMP/bad.conf:$lineno:" "$TMP/out"
}
bad_conf "line without =" 3 "# ok\nworkers = 2\nthis line is not valid\n"
bad_conf "unknown key" 2 "workers = 2\nno-such-key = 1\n"
bad_conf "bad value" 1 "port = abc\n"
bad_conf "out of range" 4 "\n\n\nworkers = 0\n"
bad_conf "bad enum" 2 "workers = 2\nlog-format = xml\n"

# ---- LMCache aliases --------------------------------------------------------------------

start_daemon alias --chunk-size=128 --max-workers=3 --l1-size-gb=0.25 || exit 1
check "aliases: config line" \
	grep -q "config: .* chunk-size=128 pool-size=268435456 workers=3 " "$TMP/alias.log"
check "aliases: stats workers == 3" [ "$(srv_stat "$EP" workers)" = 3 ]
check "aliases: stats pool_bytes == 256 MiB" [ "$(srv_stat "$EP" pool_bytes)" = 268435456 ]
run_cmd "$TMP/out" "$KVSTASH" store-test -e "$EP" --chunks 2
check "aliases: store-test uses 128-token chunks" \
	grep -q "^store-test: 2 chunk(s) of 128 tokens" "$TMP/out"
stop_daemon "$DPID"
start_daemon alias2 --chunk_size=64 --max_workers=2 || exit 1
check "aliases with underscores" grep -q "config: .* chunk-size=64 .*workers=2 " \
	"$TMP/alias2.log"
stop_daemon "$DPID"

# The main daemon served everything above and still answers.
run_cmd "$TMP/out" "$KVSTASH" ping -e "$MAIN_EP"
check "main daemon still answers" [ "$RC" -eq 0 ]
stop_daemon "$MAIN_PID"

echo "$CHECKS checks, $FAILS failed"
[ "$FAILS" -eq 0 ] && exit 0
exit 1
