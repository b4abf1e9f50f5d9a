"""Helpers shared by the wire tests (test_wire_compat.py, test_wire_current.py):
msgpack packing with strict decoding, hex dumps, the slot of a token, and a
kvstashd started for one test (SIGTERMed if the test dies)."""
import os
import signal
import subprocess
import tempfile

import msgpack


def hx(b):
    return b.hex(" ") if b is not None else "None"


class Raw(object):
    """An argument frame sent verbatim (already msgpack, or deliberately not)."""

    def __init__(self, data):
        self.data = data


def pk(v):
    """msgpack as LMCache's clients pack it: bin for bytes, str for str."""
    if isinstance(v, Raw):
        return v.data
    return msgpack.packb(v, use_bin_type=True)


def unpack_strict(b):
    # raw=False: str stays str, bin stays bytes (msgspec semantics);
    # unpackb raises on trailing data.
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def slot_of(block_ids, BS, t):
    return block_ids[t // BS] * BS + t % BS


def die_with_parent():
    """In the child: SIGTERM it if this test is killed (no orphan kvstashd)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Server(object):
    """kvstashd from $KVSTASH_BUILD_DIR on an ipc:// socket in its own temporary folder."""

    def __init__(self, prefix="kvstash-wire-", sock="sock", args=()):
        build = os.environ.get("KVSTASH_BUILD_DIR", "./build")
        self.binary = os.path.join(build, "kvstashd")
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.endpoint = "ipc://%s/%s" % (self.dir, sock)
        self.logpath = os.path.join(self.dir, "kvstashd.log")
        self.log = open(self.logpath, "wb")
        self.args = list(args)
        self.proc = subprocess.Popen([self.binary, "--listen=" + self.endpoint, "--pool-size=256M",
                                      "--http-port=0"] + self.args,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)

    def tail(self, n=40):
        try:
            with open(self.logpath, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "timeout (killed)"

    def cleanup(self):
        self.log.close()
        for name in os.listdir(self.dir):
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
