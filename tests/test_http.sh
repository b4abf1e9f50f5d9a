# Description: kvstashd's HTTP endpoint (/metrics, /healthz, /stats) against real load. Labels: unit
#
# A real kvstashd on ipc://<tmp>/sock with --http-port on a free port:
#   /metrics is Prometheus text (content type, HELP/TYPE for every family, no
#   "{}"), its counters move by exactly what `kvstash store-test` and
#   `kvstash ping` did (STOREs, RETRIEVEs, LOOKUPs, PINGs, chunks, bytes,
#   objects, latency histogram counts), and never go backwards while scraped
#   under load; /stats is JSON with the same values; /healthz is 200 "ok";
#   unknown paths 404, POST 405.
# A daemon with KVSTASH_FAULTS=probe.stall_ms=5000 (every data-path probe
# stalls 5 s) answers /healthz 503 naming the device probe within 4 s
# (skipped, saying so, in a build without fault injection).
# An http port already in use: kvstashd exits 1 saying so. --http-port=0:
# no endpoint. Every daemon is killed on every exit path (trap).
set -u

. "$(dirname "$0")/lib.sh"
command -v curl >/dev/null || { echo "SKIP: no curl"; exit 77; }
[ -x "$PY" ] || { echo "SKIP: no $PY"; exit 77; }
t_setup http

# A TCP port nobody listens on now (the kernel's pick; it may be taken again
# before we bind it, so start_daemon retries).
free_port() {
	"$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_daemon NAME [ARGS...]: kvstashd on ipc://$TMP/NAME.sock with an HTTP
# port; waits until both PING and /healthz answer (or, with a stalled probe,
# until the http line is logged). Sets EP, DPID, HTTP (base URL).
start_daemon() {
	local name=$1 port try
	shift
	EP=ipc://$TMP/$name.sock
	for try in 1 2 3 4 5; do
		port=$(free_port)
		"$KVSTASHD" --listen="$EP" --pool-size=256M --http-port="$port" "$@" \
			>"$TMP/$name.log" 2>&1 &
		DPID=$!
		PIDS+=("$DPID")
		HTTP=http://127.0.0.1:$port
		for _ in $(seq 100); do
			if grep -q "http: serving $HTTP/metrics" "$TMP/$name.log" &&
				"$KVSTASH" ping -e "$EP" --timeout-ms=200 >/dev/null 2>&1; then
				return 0
			fi
			kill -0 "$DPID" 2>/dev/null || break
			sleep 0.1
		done
		wait "$DPID" 2>/dev/null
		grep -q "Address already in use" "$TMP/$name.log" || break
	done
	echo "kvstashd $* did not start; log:"
	cat "$TMP/$name.log"
	return 1
}

# stop_daemon PID NAME: SIGTERM must end it with status 0 (sanitizer reports make it non-zero).
stop_daemon() {
	local st
	kill -TERM "$1" 2>/dev/null
	wait "$1"
	st=$?
	check "kvstashd $2 exits 0 after SIGTERM (got $st): $(grep -m3 -E 'ERROR|Sanitizer|runtime error' "$TMP/$2.log")" \
		[ "$st" -eq 0 ]
}

# metric NAME [FILE]: the value of one unlabelled (or fully labelled) sample.
metric() {
	awk -v n="$1" '$1 == n { print $2; found = 1 } END { if (!found) print "missing" }' \
		"${2:-$TMP/metrics}"
}

scrape() {
	curl -sS --max-time 5 -o "${2:-$TMP/metrics}" -w '%{http_code}' "$HTTP$1"
}

start_daemon main || exit 1
MAIN_EP=$EP
MAIN_PID=$DPID
MAIN_HTTP=$HTTP
check "startup log names the http URL" grep -q "http: serving $MAIN_HTTP/metrics, /healthz, /stats" \
	"$TMP/main.log"

# ---- /metrics format -------------------------------------------------------------

CT=$(curl -sS --max-time 5 -o "$TMP/m0" -w '%{http_code} %{content_type}' "$MAIN_HTTP/metrics")
check "/metrics 200 with Prometheus 0.0.4 content type (got $CT)" \
	[ "$CT" = "200 text/plain; version=0.0.4; charset=utf-8" ]
for n in lmcache_mp_sm_read_requests_total lmcache_mp_sm_write_requests_total \
	lmcache_mp_l1_evicted_keys_total kvstash_store_chunks_total kvstash_l1_objects \
	kvstash_healthy kvstash_ping_requests_total 'kvstash_request_duration_seconds_count{request="store"}' \
	'kvstash_device_queue_depth{device="host"}' 'kvstash_device_probe_wait_seconds{device="host"}'; do
	check "/metrics has sample $n" grep -Eq "^${n//[\{\}\"]/.} [0-9.e+-]+$" "$TMP/m0"
done
check "/metrics: kvstash_healthy 1 at rest" [ "$(metric kvstash_healthy "$TMP/m0")" = 1 ]
check "/metrics has no empty label braces" bash -c "! grep -q '{}' '$TMP/m0'"
# Every sample line belongs to a family with a TYPE line (histograms: _bucket/_sum/_count).
"$PY" - "$TMP/m0" >"$TMP/fmt" 2>&1 <<'PYEOF'
import re, sys
types, bad, n = {}, [], 0
for line in open(sys.argv[1]):
    line = line.rstrip("\n")
    if line.startswith("# TYPE "):
        _, _, name, kind = line.split(" ")
        types[name] = kind
        continue
    if line.startswith("#") or not line:
        continue
    m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\S+)', line)
    if not m:
        bad.append("unparsable: " + line); continue
    n += 1
    name = m.group(1)
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    if name not in types and types.get(base) != "histogram":
        bad.append("no TYPE: " + line)
    float(m.group(4))
print("samples", n)
for b in bad:
    print(b)
sys.exit(1 if bad or n < 40 else 0)
PYEOF
check "/metrics parses as Prometheus text: $(tr '\n' '|' <"$TMP/fmt" | head -c 400)" [ $? -eq 0 ]

# ---- counters move by exactly what was done ----------------------------------------

scrape /metrics "$TMP/before" >/dev/null
RUNS=3
CHUNKS=4
for i in $(seq $RUNS); do
	"$KVSTASH" store-test -e "$MAIN_EP" --chunks $CHUNKS --warmup 0 >"$TMP/st$i" 2>&1 ||
		fail "store-test run $i failed: $(tr '\n' '|' <"$TMP/st$i")"
done
"$KVSTASH" ping -e "$MAIN_EP" -c 5 -i 0 >/dev/null 2>&1 || fail "ping -c 5 failed"
scrape /metrics "$TMP/after" >/dev/null

delta() {
	local a b
	a=$(metric "$1" "$TMP/before")
	b=$(metric "$1" "$TMP/after")
	case "$a$b" in *missing*) echo "missing"; return ;; esac
	"$PY" -c "import sys; d = float(sys.argv[2]) - float(sys.argv[1]); print(int(d) if d == int(d) else d)" "$a" "$b"
}
# check_delta NAME WANT
check_delta() {
	local got
	got=$(delta "$1")
	check "$1 moved by $2 (got $got)" [ "$got" = "$2" ]
}
# Each store-test (--warmup 0): REGISTER, 1 STORE, 1 LOOKUP, 1 RETRIEVE of CHUNKS chunks of
# 256 tokens x 4 layers x K,V x 8 heads x 128 x bf16 = 4 MiB each.
CHUNK_BYTES=$((2 * 4 * 256 * 8 * 128 * 2))
check_delta lmcache_mp_sm_write_requests_total $RUNS
check_delta lmcache_mp_sm_read_requests_total $RUNS
check_delta kvstash_lookup_requests_total $RUNS
check_delta kvstash_ping_requests_total 5
check_delta kvstash_store_chunks_total $((RUNS * CHUNKS))
check_delta kvstash_store_chunks_skipped_total 0
check_delta kvstash_retrieve_ok_total $RUNS
check_delta kvstash_retrieve_miss_total 0
check_delta kvstash_store_bytes_total $((RUNS * CHUNKS * CHUNK_BYTES))
check_delta kvstash_retrieve_bytes_total $((RUNS * CHUNKS * CHUNK_BYTES))
check_delta kvstash_lookup_hit_chunks_total $((RUNS * CHUNKS))
check_delta kvstash_l1_objects $((RUNS * CHUNKS))
check_delta kvstash_l1_used_bytes $((RUNS * CHUNKS * CHUNK_BYTES))
check_delta lmcache_mp_l1_evicted_keys_total 0
check_delta kvstash_semantic_errors_total 0
check_delta 'kvstash_request_duration_seconds_count{request="store"}' $RUNS
check_delta 'kvstash_request_duration_seconds_count{request="retrieve"}' $RUNS
check_delta 'kvstash_request_duration_seconds_bucket{request="store",le="+Inf"}' $RUNS
check "store latency sum grew" "$PY" -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" \
	"$(delta 'kvstash_request_duration_seconds_sum{request="store"}')"
# Phases: each successful STORE/RETRIEVE adds to every phase; the copy of 4 MiB
# chunks takes time, and the phases of one request add up to at most its latency.
"$PY" - "$TMP/before" "$TMP/after" >"$TMP/phases" 2>&1 <<'PYEOF'
import re, sys
def parse(p):
    d = {}
    for line in open(p):
        m = re.match(r'(kvstash_transfer_phase_seconds_total|kvstash_request_duration_seconds_sum|kvstash_io_loop_turn_seconds_count)(\{[^}]*\})? (\S+)$', line)
        if m:
            d[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return d
a, b = parse(sys.argv[1]), parse(sys.argv[2])
bad = []
for op in ("store", "retrieve"):
    tot = 0.0
    for ph in ("accept", "queue", "prepare", "copy", "finish", "reply"):
        k = 'kvstash_transfer_phase_seconds_total{request="%s",phase="%s"}' % (op, ph)
        if k not in b:
            bad.append("missing " + k); continue
        d = b[k] - a.get(k, 0.0)
        if d < 0:
            bad.append("%s went backwards" % k)
        tot += d
    k = 'kvstash_transfer_phase_seconds_total{request="%s",phase="copy"}' % op
    if b.get(k, 0) - a.get(k, 0) <= 0:
        bad.append(op + " copy phase did not grow")
    lat = b['kvstash_request_duration_seconds_sum{request="%s"}' % op] - \
          a['kvstash_request_duration_seconds_sum{request="%s"}' % op]
    if not 0 < tot <= lat * 1.01 + 1e-4:
        bad.append("%s phases sum %.6f s, latency sum %.6f s" % (op, tot, lat))
if b.get("kvstash_io_loop_turn_seconds_count", 0) <= a.get("kvstash_io_loop_turn_seconds_count", 0):
    bad.append("io loop turn histogram did not grow")
print("; ".join(bad))
sys.exit(1 if bad else 0)
PYEOF
check "phase counters grew and add up to the latency: $(cat "$TMP/phases")" [ $? -eq 0 ]
check "kvstash_l1_pins back to 0" [ "$(metric kvstash_l1_pins "$TMP/after")" = 0 ]
check "kvstash_instances back to 0" [ "$(metric kvstash_instances "$TMP/after")" = 0 ]

# ---- scraping during load: counters never go backwards ---------------------------

scrape /metrics "$TMP/before" >/dev/null
(
	for i in $(seq 6); do
		"$KVSTASH" store-test -e "$MAIN_EP" --chunks 2 --warmup 0 >/dev/null 2>&1 || exit 1
	done
) &
LOAD=$!
PREV=$(metric lmcache_mp_sm_write_requests_total "$TMP/before")
NSCRAPES=0
BACKWARDS=0
while kill -0 "$LOAD" 2>/dev/null; do
	code=$(scrape /metrics "$TMP/during")
	[ "$code" = 200 ] || { fail "/metrics under load answered $code"; break; }
	NSCRAPES=$((NSCRAPES + 1))
	cur=$(metric lmcache_mp_sm_write_requests_total "$TMP/during")
	[ "$cur" -ge "$PREV" ] || BACKWARDS=$((BACKWARDS + 1))
	PREV=$cur
done
wait "$LOAD"
check "store-test load succeeded" [ $? -eq 0 ]
check "scraped during the load ($NSCRAPES times)" [ "$NSCRAPES" -ge 1 ]
check "write counter never went backwards under load" [ "$BACKWARDS" -eq 0 ]
scrape /metrics "$TMP/after" >/dev/null
check_delta lmcache_mp_sm_write_requests_total 6
check_delta kvstash_store_chunks_total 12

# ---- /stats, /healthz, errors ---------------------------------------------------------

CT=$(curl -sS --max-time 5 -o "$TMP/stats.json" -w '%{http_code} %{content_type}' "$MAIN_HTTP/stats")
check "/stats 200 application/json (got $CT)" [ "$CT" = "200 application/json" ]
"$PY" -c '
import json, sys
s = json.load(open(sys.argv[1]))
want = {"healthy": True, "requests_store": 9, "requests_retrieve": 9, "store_chunks_stored": 24,
        "endpoint": sys.argv[2], "pins": 0}
bad = {k: (s.get(k), v) for k, v in want.items() if s.get(k) != v}
if bad:
    sys.exit("mismatch (got, want): %r" % bad)
if not isinstance(s.get("store_p50_ms"), float) or s["store_p50_ms"] <= 0:
    sys.exit("store_p50_ms: %r" % s.get("store_p50_ms"))
if s.get("store_timed") != 9 or s.get("retrieve_timed") != 9 or not s.get("store_copy_us"):
    sys.exit("phase sums: timed %r/%r, store_copy_us %r"
             % (s.get("store_timed"), s.get("retrieve_timed"), s.get("store_copy_us")))
if not 0 < s.get("io_turn_max_us", 0) < 60e6:
    sys.exit("io_turn_max_us: %r" % s.get("io_turn_max_us"))
' "$TMP/stats.json" "$MAIN_EP" >"$TMP/out" 2>&1
check "/stats is JSON with the counters: $(tr '\n' '|' <"$TMP/out")" [ $? -eq 0 ]

code=$(scrape /healthz "$TMP/health")
check "/healthz 200 (got $code)" [ "$code" = 200 ]
check "/healthz says ok: $(cat "$TMP/health")" [ "$(cat "$TMP/health")" = ok ]
code=$(scrape /nope "$TMP/out")
check "unknown path 404 (got $code)" [ "$code" = 404 ]
code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -X POST -d x=1 "$MAIN_HTTP/metrics")
check "POST 405 (got $code)" [ "$code" = 405 ]
code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -I "$MAIN_HTTP/healthz")
check "HEAD /healthz 200 (got $code)" [ "$code" = 200 ]

# ---- the http port already in use --------------------------------------------------------

MAIN_PORT=${MAIN_HTTP##*:}
timeout 10 "$KVSTASHD" --listen="ipc://$TMP/dup.sock" --pool-size=64M --http-port="$MAIN_PORT" \
	>"$TMP/dup.log" 2>&1
RC=$?
check "kvstashd with a busy http port exits 1 (got $RC)" [ "$RC" -eq 1 ]
check "busy http port is named in the error: $(grep ERROR "$TMP/dup.log")" \
	grep -q "startup failed: http endpoint 127.0.0.1:$MAIN_PORT: Address already in use" \
	"$TMP/dup.log"
code=$(scrape /healthz "$TMP/health")
check "the first daemon still serves /healthz (got $code)" [ "$code" = 200 ]

# --http-port=0: no endpoint, no log line.
"$KVSTASHD" --listen="ipc://$TMP/nohttp.sock" --pool-size=64M --http-port=0 >"$TMP/nohttp.log" 2>&1 &
NOHTTP=$!
PIDS+=("$NOHTTP")
for _ in $(seq 100); do
	"$KVSTASH" ping -e "ipc://$TMP/nohttp.sock" --timeout-ms=200 >/dev/null 2>&1 && break
	sleep 0.1
done
check "--http-port=0 starts without an endpoint" bash -c "! grep -q 'http: serving' '$TMP/nohttp.log'"
check "--http-port=0 logs http-port=0 in its config line" grep -q "http-port=0" "$TMP/nohttp.log"

# ---- a stalled device probe turns /healthz unhealthy ----------------------------------------

stalled_probe() {
	T0=$(date +%s%N)
	KVSTASH_FAULTS=probe.stall_ms=5000 start_daemon stalled || return 1
	STALLED_HTTP=$HTTP
	code=000
	while :; do
		code=$(scrape /healthz "$TMP/health")
		[ "$code" = 503 ] && break
		[ $(( ($(date +%s%N) - T0) / 1000000 )) -gt 6000 ] && break
		sleep 0.1
	done
	MS=$(( ($(date +%s%N) - T0) / 1000000 ))
	check "stalled probe: /healthz 503 (got $code after $MS ms)" [ "$code" = 503 ]
	check "stalled probe: 503 within ~4 s of start (took $MS ms)" [ "$MS" -le 4500 ]
	check "stalled probe: reason names the device probe: $(cat "$TMP/health")" \
		grep -Eq "^unhealthy: device host: data-path probe waiting [0-9]+ ms" "$TMP/health"
	# The probe stays stuck until ~5 s after start: /metrics and /stats agree meanwhile.
	scrape /metrics >/dev/null
	check "stalled probe: kvstash_healthy 0" [ "$(metric kvstash_healthy)" = 0 ]
	check "stalled probe: the host device's probe wait is over 1 s" \
		awk '$1 == "kvstash_device_probe_wait_seconds{device=\"host\"}" && $2 > 1 { ok = 1 } END { exit !ok }' \
		"$TMP/metrics"
	scrape /stats "$TMP/stats.json" >/dev/null
	check "stalled probe: /stats healthy false" grep -q '"healthy":false' "$TMP/stats.json"
	# The stalled worker blocks only the probe: PING still answers at once.
	check "stalled probe: PING still answers" "$KVSTASH" ping -e "$EP" --timeout-ms=1000 -c 1 >/dev/null
}
STALLED_PID=
if stalled_probe; then
	STALLED_PID=$DPID
else
	grep -q "no fault injection" "$TMP/stalled.log" || exit 1
	echo "SKIP: stalled probe checks: this build has no fault injection"
fi
# The main daemon is unaffected.
code=$(HTTP=$MAIN_HTTP scrape /healthz "$TMP/health")
check "main daemon still healthy (got $code)" [ "$code" = 200 ]
[ -n "$STALLED_PID" ] && stop_daemon "$STALLED_PID" stalled

stop_daemon "$MAIN_PID" main

echo "$CHECKS checks, $FAILS failed"
[ "$FAILS" -eq 0 ] && exit 0
exit 1
