# Description: systemd-analyze verify accepts the installed kvstashd.service, with no warning (skips 77 without systemd-analyze). Labels: unit
#
# The unit is installed (cmake --install --component daemon) into a temporary
# prefix, so that ExecStart names an existing kvstashd; MANPATH points at the
# prefix, so that its Documentation= man pages are checked too. Unknown keys
# and bad values are only warnings for systemd (exit 0): any output fails.
set -u

. "$(dirname "$0")/lib.sh"
command -v systemd-analyze >/dev/null || { echo "no systemd-analyze: skipped"; exit 77; }
t_setup unit

PREFIX=$TMP/prefix
if ! cmake --install "$BUILD" --prefix "$PREFIX" --component daemon >"$TMP/install.log" 2>&1; then
	cat "$TMP/install.log"
	echo "FAIL: cmake --install --component daemon"
	exit 1
fi
UNIT=$PREFIX/lib/systemd/system/kvstashd.service
check "kvstashd.service installed" [ -s "$UNIT" ]
MANPATH=$PREFIX/share/man systemd-analyze verify "$UNIT" >"$TMP/verify" 2>&1
RC=$?
check "systemd-analyze verify exits 0 (got $RC)" [ "$RC" -eq 0 ]
check "systemd-analyze verify prints nothing: $(head -c 500 "$TMP/verify")" [ ! -s "$TMP/verify" ]
# The hardening kept off for CUDA IPC and shm stays off.
for key in PrivateDevices DevicePolicy DeviceAllow ProtectClock PrivateIPC ProtectProc RemoveIPC \
	MemoryDenyWriteExecute SystemCallFilter; do
	check "kvstashd.service does not set $key (it breaks /dev/nvidia* or /dev/shm)" \
		bash -c "! grep -q '^$key=' '$UNIT'"
done
echo "systemd_unit: $CHECKS checks, $FAILS failed"
[ "$FAILS" -eq 0 ]
