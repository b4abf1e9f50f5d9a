# Description: `kvstash bench`: the host sweep's table, progress, --plot, --endpoint, --gpu, bad flags. Labels: unit
#
#   bench --seconds 0.2 --sizes 1,2,4 (a kvstashd of its own, started and stopped)
#     prints the fixed header and one row per size (chunks, MiB = 32 x chunks,
#     STORE / RETRIEVE / memcpy GB/s > 0, both ratio columns = GB/s / memcpy),
#     one progress line per step on a non-tty stderr and no ANSI escapes, and
#     leaves neither its kvstashd nor its ipc:// directory behind;
#   --plot FILE.png writes a PNG (signature, size) and FILE.dat equal to the
#     table when gnuplot is installed, and without gnuplot on PATH says so and
#     exits 1 before measuring anything;
#   --endpoint EP uses a running kvstashd (its counters move, it keeps running);
#   SIGINT stops a sweep with exit 130 and cleans up;
#   --gpu without a GPU/CUDA says so and exits 0; bad flags exit 2.
set -u

. "$(dirname "$0")/lib.sh"
t_setup clibench

gone() {	# PID: given, and no such process
	[ -n "$1" ] && ! kill -0 "$1" 2>/dev/null
}

no_escapes() {
	! grep -q $'\e' "$@"
}

# check_table OUT SIZES STATE: the sweep's stdout has the golden layout, one row per size.
check_table() {
	"$PY" - "$1" "$2" "$3" <<'PYEOF'
import re, sys
path, sizes, state = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
text = open(path).read()
if "\x1b" in text:
    sys.exit("ANSI escape on stdout")
lines = text.rstrip("\n").split("\n")
F = r"[0-9]+\.[0-9]{2}"
head = [
    r"kvstash bench: kvstashd at ipc://\S+ \(%s, [0-9]+ transfer worker\(s\)\)" % state,
    r"Llama-3-8B-like layout: 32 layers, flash_attn \[2, NB, 16, 8, 128\] bf16, "
    r"256-token chunks of 32 MiB",
    r"one request at a time, [0-9.]+ s per figure; memcpy: one thread, same sizes, same run; "
    r"1 GB = 1e9 B",
    r"",
    r"chunks +MiB +STORE GB/s +RETRIEVE GB/s +memcpy GB/s +STORE/memcpy +RETRIEVE/memcpy",
]
tail = [r"", r"every size's RETRIEVE was checked byte for byte against the blocks it was "
        r"stored from"]
want = len(head) + len(sizes) + len(tail)
body = [l for l in lines if not l.startswith("plot: ")]
if len(body) != want:
    sys.exit("%d lines, want %d:\n%s" % (len(body), want, text))
for i, pat in enumerate(head):
    if not re.fullmatch(pat, body[i]):
        sys.exit("line %d: %r does not match %r" % (i + 1, body[i], pat))
for i, pat in enumerate(tail):
    line = body[len(head) + len(sizes) + i]
    if not re.fullmatch(pat, line):
        sys.exit("tail: %r does not match %r" % (line, pat))
for n, line in zip(sizes, body[len(head):len(head) + len(sizes)]):
    if not re.fullmatch(r" *[0-9]+ +[0-9]+( +%s){5}" % F, line):
        sys.exit("row %r is not 2 integers and 5 numbers" % line)
    w = line.split()
    chunks, mib = int(w[0]), int(w[1])
    store, retrieve, mc, rs, rr = map(float, w[2:])
    if chunks != n or mib != 32 * n:
        sys.exit("row %r: want %d chunk(s), %d MiB" % (line, n, 32 * n))
    if min(store, retrieve, mc, rs, rr) <= 0:
        sys.exit("row %r: a figure is not > 0" % line)
    for r, g in ((rs, store), (rr, retrieve)):
        if abs(r - g / mc) > 0.01 + 0.01 * g / mc:
            sys.exit("row %r: ratio %.2f is not %.2f / %.2f" % (line, r, g, mc))
PYEOF
}

# ---- the sweep, with its own kvstashd --------------------------------------------------

HAVE_GNUPLOT=0
command -v gnuplot >/dev/null 2>&1 && HAVE_GNUPLOT=1
PLOT=()
[ "$HAVE_GNUPLOT" -eq 1 ] && PLOT=(--plot "$TMP/sweep.png")
T0=$(date +%s)
timeout 60 "$KVSTASH" bench --seconds 0.2 --sizes 1,2,4 "${PLOT[@]}" >"$TMP/out" 2>"$TMP/err"
RC=$?
check "bench exits 0 (got $RC): $(cat "$TMP/err")" [ "$RC" -eq 0 ]
check_table "$TMP/out" 1,2,4 "started for this run" >"$TMP/t" 2>&1
RC=$?
check "bench prints the golden table: $(cat "$TMP/t")" [ "$RC" -eq 0 ]
DIR=$(sed -n 's|^kvstash bench: kvstashd at ipc://\(.*\)/sock (started for this run.*|\1|p' "$TMP/out")
check "bench's own kvstashd directory ($DIR) is gone" [ -n "$DIR" -a ! -e "$DIR" ]
check "bench's own kvstashd is not running" [ -z "$(pgrep -f -- "--listen=ipc://$DIR/" || true)" ]
check "non-tty stdout and stderr: no ANSI escapes" no_escapes "$TMP/out" "$TMP/err"
# warm-up, then memcpy / STORE / RETRIEVE per size: 10 steps.
STEPS=$(grep -cE '^kvstash bench: \[ ?[0-9]+/10\] ' "$TMP/err")
check "non-tty stderr: one line per step, 10 steps (got $STEPS): $(cat "$TMP/err")" [ "$STEPS" -eq 10 ]
check "non-tty stderr: only step lines: $(cat "$TMP/err")" \
	[ "$(grep -cvE '^kvstash bench: \[ ?[0-9]+/10\] ' "$TMP/err")" -eq 0 ]

if [ "$HAVE_GNUPLOT" -eq 1 ]; then
	check "--plot writes a PNG: $(od -An -tx1 -N8 "$TMP/sweep.png" 2>&1)" \
		[ "$(od -An -tx1 -N8 "$TMP/sweep.png" | tr -d ' \n')" = 89504e470d0a1a0a ]
	SIZE=$(stat -c %s "$TMP/sweep.png" 2>/dev/null || echo 0)
	check "--plot PNG is a real picture (size $SIZE)" [ "$SIZE" -gt 10000 ]
	"$PY" - "$TMP/sweep.dat" "$TMP/out" >"$TMP/d" 2>&1 <<'PYEOF'
import sys
dat = [l.split() for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")]
rows = [l.split() for l in open(sys.argv[2]) if l[:6].strip().isdigit()]
if len(dat) != 3 or [d[0] for d in dat] != [r[0] for r in rows]:
    sys.exit("dat %r vs table %r" % (dat, rows))
for d, r in zip(dat, rows):
    if any(abs(float(d[i]) - float(r[i])) > 0.006 for i in range(1, 5)):
        sys.exit("dat %r vs table %r" % (d, r))
PYEOF
	RC=$?
	check "--plot's data file equals the table: $(cat "$TMP/d")" [ "$RC" -eq 0 ]
	check "--plot prints where the files are" grep -q "^plot: $TMP/sweep.png (data $TMP/sweep.dat" "$TMP/out"
	check "--plot leaves a gnuplot script" grep -q "^set output '$TMP/sweep.png'" "$TMP/sweep.gp"
else
	echo "note: gnuplot not installed; --plot checked only for its missing-tool message"
fi

# Without gnuplot: a clear message and exit 1, before any measuring (no kvstashd, seconds).
START=$(date +%s%N)
timeout 20 env PATH=/nonexistent "$KVSTASH" bench --plot "$TMP/none.png" >"$TMP/out" 2>&1
RC=$?
MS=$((($(date +%s%N) - START) / 1000000))
check "--plot without gnuplot exits 1 (got $RC)" [ "$RC" -eq 1 ]
check "--plot without gnuplot says so: $(cat "$TMP/out")" \
	grep -q "needs gnuplot, which is not installed (Debian: apt-get install gnuplot-nox)" "$TMP/out"
check "--plot without gnuplot fails fast (${MS} ms)" [ "$MS" -lt 3000 ]
check "--plot without gnuplot writes no PNG" [ ! -e "$TMP/none.png" ]
timeout 20 "$KVSTASH" bench --plot "$TMP/no/such/dir/x.png" --sizes 1 >"$TMP/out" 2>&1
RC=$?
check "--plot into a missing directory exits 1 (got $RC): $(cat "$TMP/out")" [ "$RC" -eq 1 ]

# ---- --endpoint: a running kvstashd ------------------------------------------------------

EP=ipc://$TMP/sock
"$KVSTASHD" --listen="$EP" --pool-size=256M --http-port=0 --log-level=warn >"$TMP/kvstashd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
	"$KVSTASH" ping -e "$EP" --timeout-ms=100 >/dev/null 2>&1 && break
	sleep 0.1
done
timeout 60 "$KVSTASH" bench -e "$EP" --seconds 0.1 --sizes 1 >"$TMP/out" 2>"$TMP/err"
RC=$?
check "bench -e exits 0 (got $RC): $(cat "$TMP/err")" [ "$RC" -eq 0 ]
check_table "$TMP/out" 1 "already running" >"$TMP/t" 2>&1
RC=$?
check "bench -e prints the golden table: $(cat "$TMP/t")" [ "$RC" -eq 0 ]
check "bench -e names the given endpoint" grep -q "^kvstash bench: kvstashd at $EP (already" "$TMP/out"
check "bench -e leaves the server running" kill -0 "${PIDS[0]}"
STORED=$("$KVSTASH" stats -e "$EP" --json | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print(j["bytes_stored"], j["bytes_retrieved"])')
check "bench -e moved the server's counters (stored, retrieved: $STORED)" \
	"$PY" -c 'import sys; s, r = map(int, sys.argv[1:]); sys.exit(0 if s >= 32 << 20 and r >= 32 << 20 else 1)' $STORED
timeout 20 "$KVSTASH" bench -e "ipc://$TMP/nobody" --timeout-ms 200 --sizes 1 >"$TMP/out" 2>&1
RC=$?
check "bench of a dead endpoint exits 1 (got $RC): $(cat "$TMP/out")" [ "$RC" -eq 1 ]

# ---- SIGINT: stop, clean up, 130 -------------------------------------------------------

"$KVSTASH" bench --seconds 30 --sizes 1 >"$TMP/out" 2>"$TMP/err" &
BP=$!
for _ in $(seq 100); do grep -q "warm-up" "$TMP/err" && break; sleep 0.1; done
sleep 0.5
DPID=$(pgrep -P "$BP" kvstashd | head -1)
IDIR=$(tr '\0' '\n' <"/proc/${DPID:-0}/cmdline" 2>/dev/null | sed -n 's|^--listen=ipc://\(.*\)/sock$|\1|p')
kill -INT "$BP"
RC=124
for _ in $(seq 100); do
	kill -0 "$BP" 2>/dev/null || { wait "$BP"; RC=$?; break; }
	sleep 0.1
done
[ "$RC" -eq 124 ] && kill -KILL "$BP" 2>/dev/null
check "SIGINT stops bench with 130 within 10 s (got $RC): $(cat "$TMP/err")" [ "$RC" -eq 130 ]
check "SIGINT: bench says it was interrupted" grep -q "^kvstash bench: interrupted" "$TMP/err"
check "SIGINT: no table" [ ! -s "$TMP/out" ]
check "SIGINT: bench had started a kvstashd (pid ${DPID:-none}, ${IDIR:-no dir})" [ -n "$IDIR" ]
check "SIGINT: bench's kvstashd is stopped" gone "$DPID"
check "SIGINT: bench's ipc:// directory is gone" [ -n "$IDIR" -a ! -e "$IDIR" ]

# ---- --gpu, --tiers and bad flags --------------------------------------------------------

if [ -x "$BUILD/bench/gpu_bench" ] && nvidia-smi -L >/dev/null 2>&1; then
	echo "note: a GPU and a CUDA build: --gpu would run the GPU benchmarks; not run here"
else
	timeout 60 "$KVSTASH" bench --gpu >"$TMP/out" 2>&1
	RC=$?
	check "--gpu without GPU/CUDA exits 0 (got $RC)" [ "$RC" -eq 0 ]
	check "--gpu without GPU/CUDA says so: $(cat "$TMP/out")" \
		grep -q "^kvstash bench --gpu: no GPU on this machine or no CUDA in this build" "$TMP/out"
fi

bad() {
	timeout 10 "$KVSTASH" bench "$@" >"$TMP/out" 2>&1
	local rc=$?
	check "bench $* exits 2 (got $rc): $(cat "$TMP/out")" [ "$rc" -eq 2 ]
	check "bench $* says why" [ -s "$TMP/out" ]
}
bad --seconds 0
bad --seconds -1
bad --seconds abc
bad --seconds 1e9
bad --sizes 0
bad --sizes 1,,2
bad --sizes 1,x
bad --sizes 65
bad --sizes 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17
bad --plot=
bad --gpu --plot "$TMP/x.png"
bad --tiers --sizes 1
bad --gpu -e "$EP"
bad --no-such-flag
bad extra-argument
check "bad flags wrote no plot" [ ! -e "$TMP/x.png" ]

timeout 5 "$KVSTASH" --help >"$TMP/out" 2>&1
check "usage lists bench" grep -Eq "^  bench +STORE / RETRIEVE GB/s" "$TMP/out"
for f in --seconds --sizes --plot --gpu --tiers; do
	check "usage lists $f" grep -Eq "^ +$f(=| )" "$TMP/out"
done

T1=$(date +%s)
echo "$CHECKS checks, $FAILS failed, $((T1 - T0)) s"
[ "$FAILS" -eq 0 ] && exit 0
exit 1
