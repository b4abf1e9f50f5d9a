# Description: pip install --target of python/ (offline, apt's setuptools), then /usr/bin/python3 imports kvstash (kvstash.torch is installed) and PINGs a kvstashd through an installed libkvstash. Labels: unit
#
# libkvstash is installed (cmake --install --component lib) into a temporary
# prefix; python/ is installed with /usr/bin/python3 -m pip install
# --no-build-isolation --no-index --target into another. Then, with neither
# KVSTASH_LIB nor KVSTASH_BUILD_DIR set and the source tree out of the import
# path, the installed package is the one imported, it loads the prefix's
# libkvstash.so.0 (LD_LIBRARY_PATH, as ld.so.conf would for /usr/local) and
# PINGs a kvstashd; kvstash.torch is installed and compiles (it needs torch,
# which Debian does not ship, to import). With
# KVSTASH_LIB naming a library, that one is loaded.
set -u

. "$(dirname "$0")/lib.sh"
if grep -q '^KVSTASH_SANITIZE:STRING=.' "$BUILD/CMakeCache.txt" 2>/dev/null; then
	echo "sanitizer build: skipped"
	exit 77
fi
"$PY" -m pip --version >/dev/null 2>&1 || { echo "no pip for $PY (apt-get install python3-pip): skipped"; exit 77; }
t_setup pip
SRC=$(cd "$(dirname "$0")/.." && pwd)

PREFIX=$TMP/prefix
cmake --install "$BUILD" --prefix "$PREFIX" --component lib >"$TMP/install.log" 2>&1 ||
	{ cat "$TMP/install.log"; echo "FAIL: cmake --install --component lib"; exit 1; }
LIBDIR=$(dirname "$(find "$PREFIX" -name 'libkvstash.so.0' -print -quit)")

# pip builds in a copy: the source tree stays clean.
# Only tracked-style files: a stale python/build/ from a manual pip run would be reused.
mkdir -p "$TMP/src/kvstash"
cp "$SRC/python/pyproject.toml" "$SRC/python/README.md" "$TMP/src/"
cp "$SRC"/python/kvstash/*.py "$TMP/src/kvstash/"
if ! PIP_NO_INDEX=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
	--target "$TMP/site" "$TMP/src" >"$TMP/pip.log" 2>&1; then
	tail -20 "$TMP/pip.log"
	echo "FAIL: pip install --target"
	exit 1
fi
check "pip installed kvstash/__init__.py" [ -s "$TMP/site/kvstash/__init__.py" ]
check "pip installed kvstash/torch.py" [ -s "$TMP/site/kvstash/torch.py" ]
check "the installed kvstash/torch.py compiles" "$PY" -c "import py_compile, sys; py_compile.compile(sys.argv[1], cfile='$TMP/t.pyc', doraise=True)" "$TMP/site/kvstash/torch.py"
check "pip installed the dist-info" bash -c "ls -d '$TMP/site'/kvstash-*.dist-info >/dev/null"

EP=ipc://$TMP/kvstashd.sock
"$KVSTASHD" --listen="$EP" --http-port=0 --pool-size=64M >"$TMP/kvstashd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
	"$KVSTASH" -e "$EP" --timeout-ms=100 ping >/dev/null 2>&1 && break
	sleep 0.1
done

cat >"$TMP/ping.py" <<'PYEOF'
import os, sys
import kvstash
site = os.path.realpath(sys.argv[2])
assert os.path.realpath(kvstash.__file__).startswith(site + os.sep), kvstash.__file__
lib = kvstash.load_library()
print("lib", lib._name)
c = kvstash.Client(sys.argv[1], 2000)
rtt = c.ping()
c.close()
print("pong", rtt)
PYEOF
cd "$TMP" || exit 1
run_py() {
	env -u KVSTASH_LIB -u KVSTASH_BUILD_DIR PYTHONPATH="$TMP/site" PYTHONNOUSERSITE=1 "$@" \
		timeout 20 "$PY" "$TMP/ping.py" "$EP" "$TMP/site" >"$TMP/out" 2>&1
}
run_py LD_LIBRARY_PATH="$LIBDIR"
check "installed binding PINGs through the prefix's libkvstash: $(tr '\n' '|' <"$TMP/out")" \
	grep -q '^pong' "$TMP/out"
check "it loaded libkvstash.so.0 by name: $(grep '^lib' "$TMP/out")" grep -qx 'lib libkvstash.so.0' "$TMP/out"
run_py KVSTASH_LIB="$BUILD/libkvstash.so"
check "KVSTASH_LIB wins: $(tr '\n' '|' <"$TMP/out")" grep -qx "lib $BUILD/libkvstash.so" "$TMP/out"
check "KVSTASH_LIB's library PINGs" grep -q '^pong' "$TMP/out"

echo "pip_install: $CHECKS checks, $FAILS failed"
[ "$FAILS" -eq 0 ]
