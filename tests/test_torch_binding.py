#!/usr/bin/python3
# Description: kvstash.torch on a GPU: torch CUDA KV caches registered with native cuda_ipc descriptors, STORE from one set and RETRIEVE into another with IPC events, bytes compared on the GPU. Labels: gpu
"""Exit 0 pass, 1 fail, 77 skip (no torch, no CUDA device, or a build without CUDA)."""

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("KVSTASH_SOURCE_DIR", os.path.dirname(HERE))
BUILD = os.environ.get("KVSTASH_BUILD_DIR", os.path.join(SRC, "build"))
KVSTASHD = os.path.join(BUILD, "kvstashd")

failures = 0


def check(what, cond):
    global failures
    if not cond:
        failures += 1
        print("FAIL:", what, flush=True)


def main():
    try:
        import torch
    except ImportError:
        print("skip: no torch")
        return 77
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return 77
    if not os.path.exists(KVSTASHD):
        print("no kvstashd in", BUILD)
        return 1
    cache = os.path.join(BUILD, "CMakeCache.txt")
    if os.path.exists(cache) and "KVSTASH_CUDA:STRING=OFF" in open(cache).read():
        print("skip: kvstashd built without CUDA")
        return 77
    sys.path.insert(0, os.path.join(SRC, "python"))
    os.environ.setdefault("KVSTASH_LIB", os.path.join(BUILD, "libkvstash.so"))
    import kvstash
    import kvstash.torch as kt

    tmp = tempfile.mkdtemp(prefix="kvstash-torch-")
    ep = "ipc://%s/d.sock" % tmp
    log = open(os.path.join(tmp, "kvstashd.log"), "w")
    d = subprocess.Popen([KVSTASHD, "--listen=" + ep, "--pool-size=256M", "--http-port=0"],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        with kvstash.Client(ep, 10000) as c:
            for _ in range(100):
                try:
                    c.ping()
                    break
                except kvstash.KvstashError:
                    time.sleep(0.1)
            C = c.chunk_size()
            NB, BS, NH, HS, NL = 4 * C // 16 + 8, 16, 2, 64, 4
            torch.manual_seed(1)
            src = [torch.randn(2, NB, BS, NH, HS, dtype=torch.bfloat16, device="cuda")
                   for _ in range(NL)]
            # the destination layers: views at a non-zero offset of one allocation
            big = torch.zeros(NL * 2 * NB * BS * NH * HS + 4096, dtype=torch.bfloat16,
                              device="cuda")
            n = 2 * NB * BS * NH * HS
            dst = [big[4096 + i * n:4096 + (i + 1) * n].view(2, NB, BS, NH, HS)
                   for i in range(NL)]
            a = kt.TorchKV(c, 101, "m", 1, src)
            b = kt.TorchKV(c, 102, "m", 1, dst)
            a.register()
            b.register()
            tokens = [random.randrange(1 << 31) for _ in range(2 * C)]
            key = kvstash.Key("m", tokens, request_id="r1", end=2 * C)
            nblk = 2 * C // BS
            src_blocks = random.sample(range(NB), nblk)
            dst_blocks = random.sample(range(NB), nblk)
            a.store(key, src_blocks)
            check("lookup finds both chunks", c.lookup(key) == 2)
            b.retrieve(key, dst_blocks)
            torch.cuda.synchronize()
            for l in range(NL):
                got = dst[l][:, dst_blocks]
                want = src[l][:, src_blocks]
                check("layer %d bytes" % l, torch.equal(got.view(torch.int16),
                                                        want.view(torch.int16)))
            untouched = [i for i in range(NB) if i not in dst_blocks]
            check("other blocks untouched",
                  all(int(dst[l][:, untouched].abs().sum()) == 0 for l in range(NL)))
            a.unregister()
            b.unregister()
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(10)
        except subprocess.TimeoutExpired:
            d.kill()
    if failures:
        print(open(os.path.join(tmp, "kvstashd.log")).read()[-4000:])
    print("torch_binding:", "ok" if not failures else "%d failure(s)" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
