#!/usr/bin/python3
"""A PyTorch engine registered by CUDA IPC survives a kvstashd restart (--state-dir).

Run on a GPU machine with torch and python3-msgpack (libzmq through ctypes):

    KVSTASH_BUILD_DIR=build python3 tests/gpu/warm_restart_gpu.py [--pool-size 4G] [--fill-gb N]

One engine process (lmcache_wire_gpu.py's Engine: flash_attn bf16 KV caches,
LMCache's CudaIPCWrapper pickles, March wire, IPC events) REGISTERs once,
STOREs a 2-chunk prompt (and, with --fill-gb, enough other prompts to put N
GiB in the pool), then kvstashd is stopped with SIGTERM and started again on
the same --state-dir. From the same DEALER socket, without REGISTER: PING,
LOOKUP finds both chunks, RETRIEVE is byte-exact on the GPU (compared with
torch.equal), a new STORE and its RETRIEVE work. Printed: the restart time
(SIGTERM sent to the first PING answered on a fresh socket), the checksum
pass and pool pinning from kvstashd's log, the hit rate right after the
restart over every prompt stored. --owner-check stays on (the default): the
reconnected socket (a new ROUTER identity) takes the resumed instance over as
a connection of the same process (ipc://).

Exit 0 pass, 1 fail, 77 skip (no torch / GPU / libzmq).
"""
import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
BUILD = os.environ.get("KVSTASH_BUILD_DIR", os.path.join(HERE, "..", "..", "build"))
C = 256

failures = 0


def check(what, cond):
    global failures
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures += 1


def ping(z, ep, timeout_ms):
    s = z.dealer(ep, timeout_ms)
    try:
        z.send(s, [b"\x00", b"\x0c"])
        r = z.recv(s)
        return bool(r) and len(r) >= 3 and r[2] == b"\xc3"
    finally:
        z.close(s)


def start(z, ep, args, log_path):
    log = open(log_path, "w")
    d = subprocess.Popen([os.path.join(BUILD, "kvstashd"), "--listen=" + ep, "--http-port=0"] + args, stdout=log, stderr=subprocess.STDOUT)
    return d


def wait_ping(z, ep, d, limit_s=300):
    t_end = time.monotonic() + limit_s
    while time.monotonic() < t_end:
        if d.poll() is not None:
            return False
        if ping(z, ep, 50):
            return True
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool-size", default="4G", help="kvstashd --pool-size (default 4G)")
    ap.add_argument("--fill-gb", type=float, default=0.0,
                    help="GiB of other chunks to store before the restart (default 0)")
    ap.add_argument("--state-dir", default="",
                    help="default: a fresh directory under /dev/shm, removed at the end")
    a = ap.parse_args()
    try:
        import torch
        import msgpack
    except ImportError as e:
        print("skip:", e)
        return 77
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return 77
    try:
        from zmq_ctypes import Zmq
        from lmcache_wire_gpu import Engine, install_wrapper
        z = Zmq()
    except OSError as e:
        print("skip: libzmq:", e)
        return 77

    tmp = tempfile.mkdtemp(prefix="kvstash-warm-gpu-")
    state = a.state_dir or "/dev/shm/kvstash-warm-gpu-%d" % os.getpid()
    ep = "ipc://%s/sock" % tmp
    args = ["--pool-size=" + a.pool_size, "--state-dir=" + state, "--workers=2"]
    logs = [os.path.join(tmp, "kvstashd.1.log"), os.path.join(tmp, "kvstashd.2.log")]
    d = start(z, ep, args, logs[0])
    try:
        if not wait_ping(z, ep, d):
            check("kvstashd answers PING", False)
            return 1
        W = install_wrapper(torch)
        eng = Engine(z, ep, torch, msgpack, W, 11, "flash_attn", 1)
        check("REGISTER by CUDA IPC", eng.register() is None)
        rng = random.Random(5)
        ntok = 2 * C
        nblk = ntok // eng.BS
        perm = list(range(eng.NB))
        rng.shuffle(perm)
        src, dst = perm[:nblk], perm[nblk:2 * nblk]
        tokens = [rng.randrange(1 << 31) for _ in range(ntok)]
        _, h = eng.event()
        rep = eng.call(3, eng.key(tokens, 0, ntok), eng.instance, src, h)
        check("STORE of the prompt", isinstance(rep, list) and rep[1] is True)
        want = eng.rows(src, ntok)
        prompts = [tokens]
        # --fill-gb: more prompts of 4 chunks (the whole KV cache's 64 blocks)
        obj = 2 * len(eng.layers) * C * 8 * 128 * 2
        nfill = int(a.fill_gb * (1 << 30) / (4 * obj))
        all_blocks = list(range(eng.NB))
        t0 = time.monotonic()
        for i in range(nfill):
            ft = [rng.randrange(1 << 31) for _ in range(4 * C)]
            rep = eng.call(3, eng.key(ft, 0, 4 * C), eng.instance, all_blocks, b"")
            if not (isinstance(rep, list) and rep[1] is True):
                check("fill STORE %d" % i, False)
                break
            prompts.append(ft)
        if nfill:
            print("filled %.1f GiB in %.1f s" % (nfill * 4 * obj / (1 << 30), time.monotonic() - t0))
        job = eng.call(5, eng.key(tokens, 0, ntok, None), 1)
        check("LOOKUP before the restart finds 2 chunks", eng.call(6, job) == 2)

        # ---- restart ----
        t_term = time.monotonic()
        d.send_signal(signal.SIGTERM)
        rc = d.wait(timeout=120)
        t_exit = time.monotonic()
        check("kvstashd exit status 0 after SIGTERM", rc == 0)
        d = start(z, ep, args, logs[1])
        ok = wait_ping(z, ep, d)
        t_ping = time.monotonic()
        check("restarted kvstashd answers PING", ok)
        text = open(logs[1]).read()
        m = re.search(r"warm restart from .*", text)
        print("log: " + (m.group(0) if m else "(no warm restart line)"))
        check("the log reports a warm restart after a clean shutdown",
              bool(m) and "clean shutdown" in m.group(0))
        check("the CUDA registration was resumed", bool(m) and "1 registration(s) resumed" in m.group(0))
        print("RESTART pool %s, %.2f GiB stored: SIGTERM -> exit %.3f s, exit -> first PING "
              "%.3f s, total %.3f s" % (a.pool_size, (2 + 4 * nfill) * obj / (1 << 30),
                                        t_exit - t_term, t_ping - t_exit, t_ping - t_term), flush=True)

        # ---- the same socket, no REGISTER ----
        r = eng.call(12)  # PING on the engine's own socket (reconnected by libzmq)
        check("PING on the engine's own socket after the restart", r is True)
        hits = total = 0
        for i, p in enumerate(prompts):
            job = eng.call(5, eng.key(p, 0, len(p), None), 1)
            n = eng.call(6, job)
            hits += n if isinstance(n, int) else 0
            total += len(p) // C
            eng.call(8, eng.key(p, 0, len(p), None), 1)  # FREE_LOOKUP_LOCKS
        print("HIT RATE after the restart: %d of %d chunks (%.1f%%)" % (hits, total, 100.0 * hits / total))
        check("hit rate 100% of what was READY", hits == total)
        _, h = eng.event()
        rep = eng.call(4, eng.key(tokens, 0, ntok), eng.instance, dst, h, 0)
        ok = isinstance(rep, list) and rep[1] is True and len(rep[0]) == 64
        check("RETRIEVE without re-REGISTER", ok)
        if ok:
            torch.cuda.Event.from_ipc_handle(torch.device("cuda:0"), rep[0]).wait()
            torch.cuda.synchronize()
        got = eng.rows(dst, ntok)
        bad = sum(int(not torch.equal(g, w)) for g, w in zip(got, want))
        check("retrieved rows byte-exact on the GPU (%d bad)" % bad, bad == 0)
        t2 = [rng.randrange(1 << 31) for _ in range(ntok)]
        # new keys from the source blocks, into the target blocks (the cache has 2 * nblk)
        src2, dst2 = perm[:nblk], perm[nblk:2 * nblk]
        _, h = eng.event()
        rep = eng.call(3, eng.key(t2, 0, ntok), eng.instance, src2, h)
        check("a new STORE after the restart", isinstance(rep, list) and rep[1] is True)
        want2 = eng.rows(src2, ntok)
        _, h = eng.event()
        rep = eng.call(4, eng.key(t2, 0, ntok), eng.instance, dst2, h, 0)
        ok = isinstance(rep, list) and rep[1] is True
        if ok:
            torch.cuda.Event.from_ipc_handle(torch.device("cuda:0"), rep[0]).wait()
            torch.cuda.synchronize()
        check("its RETRIEVE byte-exact", ok and all(torch.equal(g, w)
                                                     for g, w in zip(eng.rows(dst2, ntok), want2)))
    finally:
        if d.poll() is None:
            d.terminate()
            d.wait(timeout=60)
        if failures:
            for lp in logs:
                if os.path.exists(lp):
                    print("---- %s (tail)" % lp)
                    print(open(lp).read()[-3000:])
        if not a.state_dir:
            shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d failure(s)" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
