# Description: cpack -G DEB builds kvstash, libkvstash0 and libkvstash-dev; dpkg-deb -c lists their files; the extracted kvstashd starts with the packaged config and answers PING. Labels: long
#
# cpack runs on the build tree under test (into $TMP). Checked: the three
# packages exist; each lists what it must (binaries, unit, config, sysusers,
# man pages / libkvstash.so.0 / header, .so link, .pc, CMake package) and the
# daemon's files only in kvstash; /etc/kvstash/kvstashd.conf is a conffile;
# Depends were computed (libzmq5 for the library; the library's Depends has
# none of the daemon's libraries). kvstash and libkvstash0 are extracted
# (dpkg-deb -x) into $TMP; kvstashd runs with --config <root>/etc/kvstash/
# kvstashd.conf (only the endpoint and pool size given as flags) and the
# extracted kvstash PINGs it.
set -u

. "$(dirname "$0")/lib.sh"
if grep -q '^KVSTASH_SANITIZE:STRING=.' "$BUILD/CMakeCache.txt" 2>/dev/null; then
	echo "sanitizer build: skipped"
	exit 77
fi
command -v dpkg-deb >/dev/null || { echo "no dpkg-deb: skipped"; exit 77; }
t_setup deb

if ! (cd "$TMP" && cpack -G DEB --config "$BUILD/CPackConfig.cmake" -B "$TMP/out") \
	>"$TMP/cpack.log" 2>&1; then
	tail -30 "$TMP/cpack.log"
	echo "FAIL: cpack -G DEB"
	exit 1
fi
deb() { find "$TMP/out" -maxdepth 1 -name "$1_*.deb" -print -quit; }
DAEMON=$(deb kvstash)
LIB=$(deb libkvstash0)
DEV=$(deb libkvstash-dev)
for p in DAEMON LIB DEV; do
	check "package $p built" [ -n "${!p}" ]
done
[ "$FAILS" -eq 0 ] || exit 1

contents() { dpkg-deb -c "$1" | awk '{print $6}' | sed 's|^\./|/|'; }
contents "$DAEMON" >"$TMP/daemon.list"
contents "$LIB" >"$TMP/lib.list"
contents "$DEV" >"$TMP/dev.list"
for f in /usr/bin/kvstashd /usr/bin/kvstash /lib/systemd/system/kvstashd.service \
	/etc/kvstash/kvstashd.conf /usr/lib/sysusers.d/kvstash.conf \
	/usr/share/man/man8/kvstashd.8.gz /usr/share/man/man1/kvstash.1.gz \
	/usr/share/doc/kvstash/copyright; do
	check "kvstash has $f" grep -qx "$f" "$TMP/daemon.list"
done
check "libkvstash0 has libkvstash.so.0" grep -Eq '^/usr/lib/([a-z0-9_-]+/)?libkvstash\.so\.0$' "$TMP/lib.list"
check "libkvstash0 has libkvstash.so.0.*" grep -Eq '/libkvstash\.so\.0\.[0-9]+\.[0-9]+$' "$TMP/lib.list"
check "libkvstash0 has no dev link or header" bash -c "! grep -Eq 'libkvstash\.so$|\.h$' '$TMP/lib.list'"
for re in '^/usr/include/kvstash\.h$' '/libkvstash\.so$' '/pkgconfig/kvstash\.pc$' \
	'/cmake/kvstash/kvstashConfig\.cmake$' '/cmake/kvstash/kvstashTargets\.cmake$'; do
	check "libkvstash-dev has $re" grep -Eq "$re" "$TMP/dev.list"
done
check "the daemon's files are only in kvstash" \
	bash -c "! grep -Eq 'kvstashd|systemd' '$TMP/lib.list' '$TMP/dev.list'"
check "kvstashd.conf is a conffile" \
	bash -c "dpkg-deb --info '$DAEMON' conffiles | grep -qx /etc/kvstash/kvstashd.conf"
LIBDEPS=$(dpkg-deb -f "$LIB" Depends)
check "libkvstash0 Depends computed (libzmq5): $LIBDEPS" grep -q 'libzmq5' <<<"$LIBDEPS"
check "libkvstash0 Depends has no daemon library: $LIBDEPS" \
	bash -c "! grep -Eq 'hiredis|liburing|libmicrohttpd|libxxhash' <<<'$LIBDEPS'"
DDEPS=$(dpkg-deb -f "$DAEMON" Depends)
check "kvstash Depends computed (libc6, libkvstash0): $DDEPS" \
	bash -c "grep -q 'libc6' <<<'$DDEPS' && grep -q 'libkvstash0' <<<'$DDEPS'"
check "libkvstash-dev depends on libkvstash0 of its version" \
	grep -q "libkvstash0 (= $(dpkg-deb -f "$LIB" Version))" <<<"$(dpkg-deb -f "$DEV" Depends)"

# ---- the extracted package runs -----------------------------------------------
ROOT=$TMP/root
dpkg-deb -x "$DAEMON" "$ROOT"
dpkg-deb -x "$LIB" "$ROOT"
LIBDIR=$(dirname "$(find "$ROOT" -name 'libkvstash.so.0' -print -quit)")
EP=ipc://$TMP/kvstashd.sock
"$ROOT/usr/bin/kvstashd" --config "$ROOT/etc/kvstash/kvstashd.conf" --listen="$EP" --http-port=0 \
	--pool-size=64M >"$TMP/kvstashd.log" 2>&1 &
PIDS+=($!)
up=0
for _ in $(seq 100); do
	if LD_LIBRARY_PATH=$LIBDIR timeout 5 "$ROOT/usr/bin/kvstash" -e "$EP" --timeout-ms=100 ping \
		>"$TMP/ping" 2>&1; then
		up=1
		break
	fi
	sleep 0.1
done
check "the packaged kvstashd answers the packaged kvstash's PING: $(cat "$TMP/ping"; tail -3 "$TMP/kvstashd.log")" \
	[ "$up" -eq 1 ]
check "the packaged kvstash loads the packaged libkvstash" \
	bash -c "LD_LIBRARY_PATH='$LIBDIR' ldd '$ROOT/usr/bin/kvstash' | grep -q '$LIBDIR/libkvstash.so.0'"
check "kvstashd read the packaged config (its startup line)" grep -q 'config:.*chunk-size=256' "$TMP/kvstashd.log"

echo "deb: $CHECKS checks, $FAILS failed"
[ "$FAILS" -eq 0 ]
