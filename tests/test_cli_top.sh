# Description: golden-style checks of `kvstash top --count 2` and `kvstash stats --json`. Labels: unit
#
# Against a real kvstashd on ipc://<mktemp -d>/sock:
#   top --count 2 prints exactly two frames of the fixed layout (header,
#   row labels, column names, numeric rows), no ANSI escapes when stdout is
#   not a terminal, exits 0; on an idle server every rate is 0 except ping,
#   which is top's own one PING per interval; with a store-test load running
#   the stored GB/s, chunks/s and STORE copy phase are > 0 together in some
#   frame and the STORE rate in some frame; top against a dead
#   endpoint exits 1 with the error; --interval-ms below 10 exits 2.
#   stats --json is one JSON object equal to the `stats` table.
set -u

. "$(dirname "$0")/lib.sh"
t_setup top

EP=ipc://$TMP/sock
"$KVSTASHD" --listen="$EP" --pool-size=256M --http-port=0 >"$TMP/kvstashd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
	"$KVSTASH" ping -e "$EP" --timeout-ms=100 >/dev/null 2>&1 && break
	sleep 0.1
done

# ---- the layout of one frame ------------------------------------------------------------

N='[0-9]+\.[0-9]'
# golden_frames FILE NFRAMES: every frame has exactly this shape.
golden_frames() {
	"$PY" - "$1" "$2" "$EP" <<'PYEOF'
import re, sys
path, nframes, ep = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(path).read()
if "\x1b" in text:
    sys.exit("ANSI escape in non-tty output")
frames = text.split("\n\n")
if len(frames) != nframes:
    sys.exit("%d frames, want %d" % (len(frames), nframes))
F = r"-?[0-9]+\.[0-9]+"
I = r"[0-9]+"
golden = [
    r"kvstash top: %s  interval %s s  refresh {n}" % (re.escape(ep), F),
    r"requests/s +store +retrieve +lookup +ping +total",
    r" {12}( +%s){5}" % F,
    r"GB/s +stored +retrieved",
    r" {12}( +%s){2}" % F,
    r"chunks/s +stored +skipped +no-space +evicted",
    r" {12}( +%s){4}" % F,
    r"latency ms +store +retrieve +lookup +ping +rtt",
    r" {12}( +(%s|-)){4} +%s" % (F, F),
    r"pool +used MiB +total MiB +used % +objects +pins",
    r" {12}( +%s){3}( +%s){2}" % (F, I),
    r"transfers +queued +running +workers +rejected/s +errors/s",
    r" {12}( +%s){3}( +%s){2}" % (I, F),
    r"phase ms +accept +queue +prepare +copy +finish +reply",
    r"store( +(%s|-)){6}" % F,
    r"retrieve( +(%s|-)){6}" % F,
]
for n, fr in enumerate(frames, 1):
    lines = fr.rstrip("\n").split("\n")
    if len(lines) != len(golden):
        sys.exit("frame %d: %d lines, want %d:\n%s" % (n, len(lines), len(golden), fr))
    for i, (line, pat) in enumerate(zip(lines, golden)):
        if not re.fullmatch(pat.replace("{n}", str(n)), line):
            sys.exit("frame %d line %d: %r does not match %r" % (n, i + 1, line, pat))
PYEOF
}

# row FILE FRAME LABEL-LINE-NUMBER FIELD: field N (1-based, after the label) of a value row.
row() {
	awk -v RS= -v f="$2" -v l="$3" -v k="$4" 'NR == f { split($0, L, "\n"); split(L[l], w, " "); print w[k] }' "$1"
}

# Idle server: exact zeros except top's own PING.
timeout 20 "$KVSTASH" top -e "$EP" --count 2 --interval-ms 300 >"$TMP/idle" 2>"$TMP/idle.err"
RC=$?
check "top --count 2 exits 0 (got $RC): $(cat "$TMP/idle.err")" [ "$RC" -eq 0 ]
golden_frames "$TMP/idle" 2 >"$TMP/g" 2>&1
RC=$?	# saved first: the $(cat) below would reset $?
check "top --count 2 output has the golden layout: $(cat "$TMP/g")" [ "$RC" -eq 0 ]
check "idle top: no STORE or RETRIEVE phases (all '-')" \
	[ "$(grep -cE '^(store|retrieve)( +-){6}$' "$TMP/idle")" -eq 4 ]
check "top prints nothing on stderr" [ ! -s "$TMP/idle.err" ]
for f in 1 2; do
	check "idle frame $f: store/retrieve/lookup rates 0: $(row "$TMP/idle" $f 3 1) $(row "$TMP/idle" $f 3 2) $(row "$TMP/idle" $f 3 3)" \
		[ "$(row "$TMP/idle" $f 3 1)/$(row "$TMP/idle" $f 3 2)/$(row "$TMP/idle" $f 3 3)" = "0.0/0.0/0.0" ]
	check "idle frame $f: GB/s 0" [ "$(row "$TMP/idle" $f 5 1)/$(row "$TMP/idle" $f 5 2)" = "0.000/0.000" ]
	# One PING per ~0.3 s interval: 1/interval, i.e. between 1 and 3.4 per second.
	ping=$(row "$TMP/idle" $f 3 4)
	check "idle frame $f: ping rate is top's own (~3.3/s, got $ping)" \
		"$PY" -c "import sys; sys.exit(0 if 1.0 <= float(sys.argv[1]) <= 3.4 else 1)" "$ping"
	check "idle frame $f: total == ping" [ "$(row "$TMP/idle" $f 3 5)" = "$ping" ]
	check "idle frame $f: pool total 256 MiB" [ "$(row "$TMP/idle" $f 11 2)" = "256.0" ]
	check "idle frame $f: 2 workers" [ "$(row "$TMP/idle" $f 13 3)" = 2 ]
done

# Under load: STOREs and GB/s show up.
(
	for i in $(seq 20); do
		"$KVSTASH" store-test -e "$EP" --chunks 4 >/dev/null 2>&1 || exit 1
	done
) &
LOAD=$!
# Five frames: on a loaded 2-core machine (sanitizer builds) one STORE can take
# longer than an interval, so its completion may land a frame or two later.
BUSY_FRAMES=5
timeout 30 "$KVSTASH" top -e "$EP" --count $BUSY_FRAMES --interval-ms 400 >"$TMP/busy" 2>&1
RC=$?
kill "$LOAD" 2>/dev/null
wait "$LOAD" 2>/dev/null
check "top under load exits 0 (got $RC)" [ "$RC" -eq 0 ]
golden_frames "$TMP/busy" $BUSY_FRAMES >"$TMP/g" 2>&1
RC=$?
check "top under load has the golden layout: $(cat "$TMP/g")" [ "$RC" -eq 0 ]
# A STORE counts in the request rate when it arrives and in GB/s, chunks/s and the
# phase rows when it completes: with slow copies those can fall in different frames.
# So: some frame shows the completion side (GB/s, chunks/s, the copy phase in ms)
# together, and some frame shows STORE requests arriving.
done_frame=0
arrived=0
for f in $(seq $BUSY_FRAMES); do
	s=$(row "$TMP/busy" $f 3 1)
	g=$(row "$TMP/busy" $f 5 1)
	c=$(row "$TMP/busy" $f 7 1)
	v=$(awk -v RS= -v f=$f 'NR == f { split($0, L, "\n"); split(L[15], w, " "); print w[5] }' "$TMP/busy")
	"$PY" -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 and float(sys.argv[2]) > 0 and float(sys.argv[3]) > 0 else 1)" "$g" "$c" "${v/-/0}" && done_frame=1
	"$PY" -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "$s" && arrived=1
done
check "top under load: some frame shows stored GB/s, chunks/s and the STORE copy phase > 0: $(tr '\n' '|' <"$TMP/busy")" [ "$done_frame" -eq 1 ]
check "top under load: some frame shows STORE requests/s > 0" [ "$arrived" -eq 1 ]

# Errors.
timeout 20 "$KVSTASH" top -e "ipc://$TMP/nobody" --count 1 --interval-ms 10 --timeout-ms 200 >"$TMP/out" 2>&1
RC=$?
check "top of a dead endpoint exits 1 (got $RC)" [ "$RC" -eq 1 ]
check "top of a dead endpoint says why: $(cat "$TMP/out")" grep -q "^kvstash top: .*no reply" "$TMP/out"
timeout 5 "$KVSTASH" top -e "$EP" --interval-ms 5 --count 1 >"$TMP/out" 2>&1
RC=$?
check "top --interval-ms 5 exits 2 (got $RC)" [ "$RC" -eq 2 ]
check "top --interval-ms 5 names the flag" grep -q -- "--interval-ms" "$TMP/out"
timeout 5 "$KVSTASH" --help >"$TMP/out" 2>&1
check "usage lists top" grep -Eq "^  top +refreshing view" "$TMP/out"
check "usage lists --json" grep -Eq "^ +--json +stats:" "$TMP/out"

# ---- stats --json equals the table ----------------------------------------------------

timeout 10 "$KVSTASH" stats -e "$EP" --json >"$TMP/json" 2>&1
RC=$?
check "stats --json exits 0 (got $RC)" [ "$RC" -eq 0 ]
timeout 10 "$KVSTASH" stats -e "$EP" >"$TMP/table" 2>&1
"$PY" - "$TMP/json" "$TMP/table" >"$TMP/out" 2>&1 <<'PYEOF'
import json, sys
j = json.load(open(sys.argv[1]))
table = {}
for line in open(sys.argv[2]).read().splitlines()[1:]:
    w = line.split()
    table[w[0]] = int(w[1])
# requests_* and a few gauges may move between the two calls; compare the stable ones.
stable = ["pool_bytes", "slots_total", "workers", "store_chunks_stored", "bytes_stored",
          "instances", "frame_faults"]
bad = [k for k in stable if j.get(k) != table.get(k)]
if set(j) != set(table) or bad or not all(isinstance(v, int) for v in j.values()):
    sys.exit("json vs table differ: keys %s, values %s" % (set(j) ^ set(table), bad))
if j["store_chunks_stored"] < 4 or j["pool_bytes"] != 256 << 20:
    sys.exit("unexpected values: %r" % {k: j[k] for k in stable})
PYEOF
RC=$?
check "stats --json is a JSON object equal to the table: $(cat "$TMP/out")" [ "$RC" -eq 0 ]
timeout 10 "$KVSTASH" stats -e "ipc://$TMP/nobody" --json --timeout-ms 200 >"$TMP/out" 2>"$TMP/err"
RC=$?
check "stats --json of a dead endpoint exits 1 with nothing on stdout" [ "$RC" -eq 1 ] && [ ! -s "$TMP/out" ]

echo "$CHECKS checks, $FAILS failed"
[ "$FAILS" -eq 0 ] && exit 0
exit 1
