#!/usr/bin/python3
# Description: the Python binding (python/kvstash, ctypes) against a real kvstashd: round trip with byte checks through memoryview, errors carry the server's message, pip install works offline. Labels: unit
"""Exit 0 pass, 1 fail, 77 skip."""

import array
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("KVSTASH_SOURCE_DIR", os.path.dirname(HERE))
BUILD = os.environ.get("KVSTASH_BUILD_DIR", os.path.join(SRC, "build"))
KVSTASHD = os.path.join(BUILD, "kvstashd")
LIB = os.path.join(BUILD, "libkvstash.so")

failures = 0
checks = 0


def check(what, cond):
    global failures, checks
    checks += 1
    if not cond:
        failures += 1
        print("FAIL:", what, flush=True)


def start_daemon(tmp, name, *args):
    ep = "ipc://%s/%s.sock" % (tmp, name)
    log = open(os.path.join(tmp, name + ".log"), "w")
    p = subprocess.Popen([KVSTASHD, "--listen=" + ep, "--pool-size=128M", "--http-port=0"]
                         + list(args), stdout=log, stderr=subprocess.STDOUT, env=daemon_env())
    return p, ep


def stop_daemon(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def asan_runtime(lib):
    """Path of the ASan runtime @lib links against (sanitizer builds), or None."""
    try:
        out = subprocess.run(["ldd", lib], stdout=subprocess.PIPE, text=True).stdout
    except OSError:
        return None
    for line in out.splitlines():
        w = line.split()
        if w and w[0].startswith("libasan") and len(w) >= 3 and w[1] == "=>":
            return w[2]
    return None


def daemon_env():
    """kvstashd gets the environment ctest gave us, not our ASan preload."""
    env = dict(os.environ)
    if "KVSTASH_TEST_ORIG_LD_PRELOAD" in env:
        env["LD_PRELOAD"] = env.pop("KVSTASH_TEST_ORIG_LD_PRELOAD")
        env["ASAN_OPTIONS"] = env.pop("KVSTASH_TEST_ORIG_ASAN_OPTIONS")
    return env


def main():
    if not (os.path.exists(KVSTASHD) and os.path.exists(LIB)):
        print("no kvstashd/libkvstash.so in", BUILD)
        return 1
    # An ASan-built libkvstash can only be loaded into python with the ASan
    # runtime preloaded; python's own allocations are not ours to leak-check.
    asan = asan_runtime(LIB)
    if asan and "KVSTASH_TEST_ORIG_LD_PRELOAD" not in os.environ:
        env = dict(os.environ)
        env["KVSTASH_TEST_ORIG_LD_PRELOAD"] = env.get("LD_PRELOAD", "")
        env["KVSTASH_TEST_ORIG_ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "")
        env["LD_PRELOAD"] = asan
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":detect_leaks=0"
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    os.environ["KVSTASH_LIB"] = LIB
    sys.path.insert(0, os.path.join(SRC, "python"))
    import kvstash

    tmp = tempfile.mkdtemp(prefix="kvstash-py-")
    procs = []
    try:
        p, ep = start_daemon(tmp, "main")
        procs.append(p)
        run_tests(kvstash, ep)
        check_pip_install(tmp, ep)
        check("kvstashd exits 0 on SIGTERM", stop_daemon(p) == 0)
    finally:
        for p in procs:
            stop_daemon(p)
        if failures:
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".log"):
                    print("---", f)
                    print(open(os.path.join(tmp, f)).read()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d checks, %d failed" % (checks, failures))
    return 1 if failures else 0


def wait_ready(kvstash, ep):
    deadline = time.monotonic() + 10
    while True:
        try:
            with kvstash.Client(ep, timeout_ms=200) as c:
                return c.ping()
        except kvstash.KvstashError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Layout of the test KV cache: flash_attn [2, NB, BS, NH, HS] bfloat16 per layer.
LAYERS, BS, NH, HS, ELEM = 2, 16, 2, 64, 2
CHUNKS = 2


def run_tests(kvstash, ep):
    wait_ready(kvstash, ep)
    c = kvstash.Client(ep, timeout_ms=5000)
    rtt = c.ping()
    check("ping returns a round trip in ms (%r)" % rtt, isinstance(rtt, float) and 0 < rtt < 1000)
    C = c.chunk_size()
    check("chunk_size is 256 (%r)" % C, C == 256)

    ntok = CHUNKS * C
    nblocks = 2 * ntok // BS          # stored blocks, then as many to retrieve into
    half = nblocks // 2
    block_bytes = BS * NH * HS * ELEM
    layer_bytes = 2 * nblocks * block_bytes
    buf = kvstash.HostBuffer(LAYERS * layer_bytes)
    check("HostBuffer size", buf.nbytes == LAYERS * layer_bytes and len(buf.view) == buf.nbytes)
    check("HostBuffer path is a /proc fd path (%s)" % buf.path, buf.path.startswith("/proc/"))
    rng = random.Random(1234)
    buf.view[:] = rng.randbytes(buf.nbytes)

    def off(layer, plane, block):
        return layer * layer_bytes + (plane * nblocks + block) * block_bytes

    src = list(range(half - 1, -1, -1))          # descending, not contiguous order
    dst = list(range(half, nblocks))[::-1]
    for l in range(LAYERS):
        for k in range(2):
            for b in dst:
                buf.view[off(l, k, b):off(l, k, b) + block_bytes] = bytes(block_bytes)

    inst = 4242
    c.register_host(inst, "py-model", 1, "flash_attn", "bfloat16",
                    shape=(2, nblocks, BS, NH, HS),
                    layers=[(buf.path, l * layer_bytes, buf.nbytes) for l in range(LAYERS)])
    tokens = array.array("I", (rng.getrandbits(32) for _ in range(ntok)))
    key = kvstash.Key("py-model", tokens, request_id="py-req-1")

    before = c.stats()
    c.store(key, inst, src)
    hits = c.lookup(key)
    check("lookup after store: %d of %d chunks" % (hits, CHUNKS), hits == CHUNKS)
    c.retrieve(key, inst, dst)

    def differing(skip_blocks=0):
        bad = 0
        for l in range(LAYERS):
            for k in range(2):
                for i, (s, d) in enumerate(zip(src, dst)):
                    a = buf.view[off(l, k, s):off(l, k, s) + block_bytes]
                    b = buf.view[off(l, k, d):off(l, k, d) + block_bytes]
                    if i < skip_blocks:
                        bad += b != bytes(block_bytes)   # must be untouched (zero)
                    else:
                        bad += a != b
        return bad

    check("retrieve wrote back every byte (%d blocks differ)" % differing(), differing() == 0)

    after = c.stats()
    chunk_bytes = 2 * LAYERS * C * NH * HS * ELEM
    for name, want in (("requests_store", 1), ("requests_retrieve", 1), ("requests_lookup", 1),
                       ("store_chunks_stored", CHUNKS), ("bytes_stored", CHUNKS * chunk_bytes),
                       ("bytes_retrieved", CHUNKS * chunk_bytes), ("retrieve_ok", 1)):
        got = after.get(name, -1) - before.get(name, 0)
        check("stats %s moved by %d (got %d)" % (name, want, got), got == want)
    check("stats: objects == %d (%r)" % (CHUNKS, after.get("objects")),
          after.get("objects") == CHUNKS)

    # skip: the first chunk's tokens are left untouched.
    for l in range(LAYERS):
        for k in range(2):
            for b in dst:
                buf.view[off(l, k, b):off(l, k, b) + block_bytes] = bytes(block_bytes)
    c.lookup(key)
    c.retrieve(key, inst, dst, skip=C)
    bad = differing(skip_blocks=C // BS)
    check("retrieve skip=%d left the first chunk alone and filled the rest (%d bad)" % (C, bad),
          bad == 0)

    # A prefix that was never stored: no hits; RETRIEVE of it fails with the server's reason.
    other = kvstash.Key("py-model", [t ^ 1 for t in tokens], request_id="py-req-2")
    check("lookup of unknown tokens: 0", c.lookup(other) == 0)
    try:
        c.retrieve(other, inst, dst)
        check("retrieve of missing chunks raises", False)
    except kvstash.KvstashError as e:
        check("retrieve of missing chunks: ENOENT (%s)" % e, e.errno == errno.ENOENT)
        check("retrieve of missing chunks: message (%r)" % e.message, len(e.message) > 0)

    c.free_lookup_locks(key)
    c.end_session("py-req-1")
    c.end_session("py-req-2")

    # The server's reason comes back in the exception.
    try:
        c.store(key, 999999, src)
        check("store for an unregistered instance raises", False)
    except kvstash.KvstashError as e:
        check("store for an unregistered instance: message names it (%r)" % e.message,
              "999999" in e.message or "instance" in e.message)
        check("KvstashError is an OSError with errno (%r)" % e.errno,
              isinstance(e, OSError) and e.errno > 0)
    try:
        c.register_host(inst + 1, "py-model", 1, "flash_attn", "bfloat16",
                        shape=(2, nblocks, BS, NH, HS),
                        layers=[("/nonexistent/kv-file", 0, buf.nbytes)] * LAYERS)
        check("register of a missing file raises", False)
    except kvstash.KvstashError as e:
        check("register of a missing file: EINVAL (%s)" % e, e.errno == errno.EINVAL)
        check("register of a missing file: server's message names the path (%r)" % e.message,
              "/nonexistent/kv-file" in e.message)

    c.unregister(inst)
    st = c.stats()
    check("no instances left (%r)" % st.get("instances"), st.get("instances") == 0)
    check("no pins left (%r)" % st.get("pins"), st.get("pins") == 0)
    c.clear()
    check("clear: objects == 0", c.stats().get("objects") == 0)
    buf.close()
    c.close()
    try:
        c.ping()
        check("closed client raises", False)
    except kvstash.KvstashError as e:
        check("closed client: EBADF", e.errno == errno.EBADF)

    # A dead endpoint: bounded by the timeout, ETIMEDOUT.
    with kvstash.Client("ipc:///nonexistent-kvstash/sock", timeout_ms=200) as dead:
        t0 = time.monotonic()
        try:
            dead.ping()
            check("ping of a dead endpoint raises", False)
        except kvstash.KvstashError as e:
            check("ping of a dead endpoint: ETIMEDOUT (%s)" % e, e.errno == errno.ETIMEDOUT)
        check("ping of a dead endpoint bounded", time.monotonic() - t0 < 3)


def check_pip_install(tmp, ep):
    """pip install of a copy of python/ works offline; the installed package talks to kvstashd."""
    try:
        import setuptools  # noqa: F401
        import pip  # noqa: F401
    except ImportError:
        print("note: pip/setuptools missing; pip install not checked")
        return
    src = os.path.join(tmp, "pysrc")
    shutil.copytree(os.path.join(SRC, "python"), src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*.so*"))
    target = os.path.join(tmp, "site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index",
                        "--no-build-isolation", "--no-cache-dir", "--disable-pip-version-check",
                        "-q", "--target", target, src],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    check("pip install ./python exits 0: %s" % r.stdout[-1000:], r.returncode == 0)
    if r.returncode:
        return
    code = ("import kvstash, sys; assert kvstash.__file__.startswith(sys.argv[1]), kvstash.__file__;"
            "c = kvstash.Client(sys.argv[2], 2000); print(c.chunk_size())")
    r = subprocess.run([sys.executable, "-c", code, target, ep], env=dict(os.environ, PYTHONPATH=target),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
    check("installed package works: %s" % r.stdout.strip(), r.returncode == 0 and r.stdout.strip() == "256")


if __name__ == "__main__":
    sys.exit(main())
