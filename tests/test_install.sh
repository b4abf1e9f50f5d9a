# Description: cmake --install into a temporary prefix; pkg-config and find_package(kvstash) clients PING a kvstashd; one option table for --help, config file and man page. Labels: unit
#
# From the build tree under test:
#   cmake --install --prefix $TMP/prefix puts kvstashd and kvstash in bin,
#   libkvstash.so.0 (SONAME libkvstash.so.0) and its dev symlink, kvstash.h,
#   kvstash.pc, the CMake package, the unit, the config file, sysusers.d and
#   both man pages where GNUInstallDirs says; ldd of the installed library
#   lists none of the daemon's libraries (hiredis, liburing, libmicrohttpd,
#   xxhash, CUDA).
#   The installed kvstashd starts with the installed config file; a C program
#   compiled only with `pkg-config --cflags --libs kvstash` and one built by a
#   CMake project using find_package(kvstash) each PING it.
#   The option names in `kvstashd --help`, the installed kvstashd.conf and
#   kvstashd(8) are the same set; every long option of `kvstash --help` is in
#   kvstash(1).
set -u

. "$(dirname "$0")/lib.sh"
# A sanitizer build's libkvstash needs its runtime loaded first: not a library to install.
if grep -q '^KVSTASH_SANITIZE:STRING=.' "$BUILD/CMakeCache.txt" 2>/dev/null; then
	echo "sanitizer build: skipped"
	exit 77
fi
t_setup install

PREFIX=$TMP/prefix
if ! cmake --install "$BUILD" --prefix "$PREFIX" >"$TMP/install.log" 2>&1; then
	cat "$TMP/install.log"
	echo "FAIL: cmake --install"
	exit 1
fi

# ---- the installed files ------------------------------------------------------
LIB=$(find "$PREFIX" -name libkvstash.so -print -quit)
check "libkvstash.so installed" [ -n "$LIB" ]
LIBDIR=$(dirname "${LIB:-$PREFIX/lib/x}")
for f in bin/kvstashd bin/kvstash include/kvstash.h etc/kvstash/kvstashd.conf \
	lib/systemd/system/kvstashd.service lib/sysusers.d/kvstash.conf \
	share/man/man8/kvstashd.8.gz share/man/man1/kvstash.1.gz; do
	check "$f installed" [ -s "$PREFIX/$f" ]
done
for f in libkvstash.so.0 pkgconfig/kvstash.pc cmake/kvstash/kvstashConfig.cmake \
	cmake/kvstash/kvstashConfigVersion.cmake cmake/kvstash/kvstashTargets.cmake; do
	check "$LIBDIR/$f installed" [ -e "$LIBDIR/$f" ]
done
check "libkvstash.so -> libkvstash.so.0" [ "$(readlink "$LIBDIR/libkvstash.so")" = libkvstash.so.0 ]
check "SONAME is libkvstash.so.0" \
	bash -c "readelf -d '$LIBDIR/libkvstash.so.0' | grep -q 'Library soname: \[libkvstash.so.0\]'"
check "the unit runs the installed kvstashd with the installed config" \
	grep -qx "ExecStart=$PREFIX/bin/kvstashd --config $PREFIX/etc/kvstash/kvstashd.conf" \
	"$PREFIX/lib/systemd/system/kvstashd.service"

ldd "$LIBDIR/libkvstash.so.0" >"$TMP/ldd" 2>&1
check "ldd libkvstash.so works: $(head -c 300 "$TMP/ldd")" grep -q libzmq "$TMP/ldd"
for bad in hiredis liburing libmicrohttpd libxxhash libcudart libcuda libblake3; do
	check "libkvstash.so does not need $bad: $(grep "$bad" "$TMP/ldd")" \
		bash -c "! grep -q '$bad' '$TMP/ldd'"
done
check "libkvstash.so exports no internal symbol (proto_*, ks_*, log_*)" \
	bash -c "! nm -D --defined-only '$LIBDIR/libkvstash.so.0' | awk '{print \$3}' | grep -Ev '^(kvstash_|KVSTASH_)' | grep -q ."

# ---- one option table ---------------------------------------------------------
"$PREFIX/bin/kvstashd" --help >"$TMP/help" 2>&1
sed -nE 's/^  --([a-z0-9-]+)=.* \(default: .*/\1/p' "$TMP/help" | sort >"$TMP/opts.help"
sed -nE 's/^#([a-z0-9-]+) =.*/\1/p' "$PREFIX/etc/kvstash/kvstashd.conf" | sort >"$TMP/opts.conf"
zcat "$PREFIX/share/man/man8/kvstashd.8.gz" |
	sed -nE '/^\.TP/{n;s/^\\fB((\\-|[a-z0-9])+)\\fR=.*/\1/p}' | sed 's/\\-/-/g; s/^--//' |
	grep -vx 'l1-size-gb\|config' | sort >"$TMP/opts.man"
n=$(wc -l <"$TMP/opts.help")
check "kvstashd --help lists at least 15 table options (got $n)" [ "$n" -ge 15 ]
check "kvstashd.conf lists the options of --help: $(diff "$TMP/opts.help" "$TMP/opts.conf" | tr '\n' ' ')" \
	cmp -s "$TMP/opts.help" "$TMP/opts.conf"
check "kvstashd(8) lists the options of --help: $(diff "$TMP/opts.help" "$TMP/opts.man" | tr '\n' ' ')" \
	cmp -s "$TMP/opts.help" "$TMP/opts.man"
# Each commented default in the config file is the default --help states.
while read -r name; do
	def=$(sed -nE "s/^  --$name=.* \(default: (.*)\)$/\1/p" "$TMP/help")
	[ "$def" = none ] && def=
	conf=$(sed -nE "s/^#$name =( (.*))?$/\2/p" "$PREFIX/etc/kvstash/kvstashd.conf")
	check "kvstashd.conf default of $name is '$def' (got '$conf')" [ "$def" = "$conf" ]
done <"$TMP/opts.help"
LD_LIBRARY_PATH=$LIBDIR "$PREFIX/bin/kvstash" --help >"$TMP/clihelp" 2>&1
zcat "$PREFIX/share/man/man1/kvstash.1.gz" | sed 's/\\-/-/g' >"$TMP/kvstash.1"
CLIOPTS=$(grep -oE '^ +(-[a-z], )?--[a-z-]+' "$TMP/clihelp" | grep -oE -- '--[a-z-]+')
check "kvstash --help lists at least 10 options (got $(echo $CLIOPTS | wc -w))" \
	[ "$(echo $CLIOPTS | wc -w)" -ge 10 ]
for o in $CLIOPTS; do
	check "kvstash(1) documents $o" grep -q -- "$o" "$TMP/kvstash.1"
done
check "kvstash(1) documents every command" \
	bash -c "for c in ping stats top store-test bench; do grep -q \"^  \$c \" '$TMP/kvstash.1' || exit 1; done"
if command -v man >/dev/null; then
	check "kvstashd(8) formats without warnings" \
		bash -c "! MANWIDTH=80 man --warnings -l '$PREFIX/share/man/man8/kvstashd.8.gz' 2>&1 >/dev/null | grep -q ."
	check "kvstash(1) formats without warnings" \
		bash -c "! MANWIDTH=80 man --warnings -l '$PREFIX/share/man/man1/kvstash.1.gz' 2>&1 >/dev/null | grep -q ."
fi

# ---- the installed daemon with the installed config ---------------------------
EP=ipc://$TMP/kvstashd.sock
"$PREFIX/bin/kvstashd" --config "$PREFIX/etc/kvstash/kvstashd.conf" --listen="$EP" \
	--http-port=0 --pool-size=64M >"$TMP/kvstashd.log" 2>&1 &
PIDS+=($!)
up=0
for _ in $(seq 100); do
	# A temporary prefix is not in ld.so's path (/usr and /usr/local are).
	if LD_LIBRARY_PATH=$LIBDIR "$PREFIX/bin/kvstash" -e "$EP" --timeout-ms=100 ping >/dev/null 2>&1; then
		up=1
		break
	fi
	sleep 0.1
done
check "installed kvstashd answers the installed kvstash's PING: $(tail -3 "$TMP/kvstashd.log")" \
	[ "$up" -eq 1 ]

cat >"$TMP/ping.c" <<'EOF'
#include <kvstash.h>
#include <stdio.h>

int main(int argc, char **argv)
{
	kvstash_client *c;
	double rtt;
	int rc;

	if (argc != 2 || kvstash_connect(argv[1], 2000, &c))
		return 2;
	rc = kvstash_ping(c, &rtt);
	kvstash_close(c);
	if (rc)
		return 1;
	printf("pong %.3f ms\n", rtt);
	return 0;
}
EOF

# pkg-config only: no -I/-L of the source or build tree.
export PKG_CONFIG_PATH=$LIBDIR/pkgconfig
FLAGS=$(pkg-config --cflags --libs kvstash 2>&1)
check "pkg-config --cflags --libs kvstash works: $FLAGS" pkg-config --exists kvstash
check "pkg-config --modversion is the project's: $(pkg-config --modversion kvstash)" \
	[ "$(pkg-config --modversion kvstash)" = "$("$PREFIX/bin/kvstashd" --version | awk '{print $2}')" ]
# shellcheck disable=SC2086
if cc -std=c11 -Wall -Werror -o "$TMP/ping_pc" "$TMP/ping.c" $FLAGS >"$TMP/cc.log" 2>&1; then
	run() { LD_LIBRARY_PATH=$LIBDIR timeout 10 "$@"; }
	run "$TMP/ping_pc" "$EP" >"$TMP/out" 2>&1
	check "the pkg-config client PINGs kvstashd (rc $?): $(cat "$TMP/out")" grep -q '^pong' "$TMP/out"
	check "the pkg-config client loads the installed libkvstash" \
		bash -c "LD_LIBRARY_PATH='$LIBDIR' ldd '$TMP/ping_pc' | grep -q '$LIBDIR/libkvstash.so.0'"
else
	fail "cc with \$(pkg-config --cflags --libs kvstash): $(cat "$TMP/cc.log")"
fi

# find_package(kvstash) -> kvstash::kvstash
mkdir -p "$TMP/proj"
cp "$TMP/ping.c" "$TMP/proj/"
cat >"$TMP/proj/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.16)
project(kvstash_ping C)
find_package(kvstash 0.1 REQUIRED)
add_executable(ping_cmake ping.c)
target_link_libraries(ping_cmake PRIVATE kvstash::kvstash)
EOF
if cmake -S "$TMP/proj" -B "$TMP/proj/build" -DCMAKE_PREFIX_PATH="$PREFIX" >"$TMP/proj.log" 2>&1 &&
	cmake --build "$TMP/proj/build" >>"$TMP/proj.log" 2>&1; then
	# CMake puts the imported library's directory in the build RUNPATH.
	timeout 10 "$TMP/proj/build/ping_cmake" "$EP" >"$TMP/out" 2>&1
	check "the find_package(kvstash) client PINGs kvstashd: $(cat "$TMP/out")" grep -q '^pong' "$TMP/out"
else
	fail "find_package(kvstash) project: $(tail -20 "$TMP/proj.log")"
fi

echo "install: $CHECKS checks, $FAILS failed"
[ "$FAILS" -eq 0 ]
