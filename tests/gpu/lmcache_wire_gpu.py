#!/usr/bin/python3
"""A PyTorch engine speaking LMCache's own wire format to kvstashd on a GPU.

Run on a GPU machine with torch and python3-msgpack (no pyzmq needed: libzmq
is reached through ctypes):

    KVSTASH_BUILD_DIR=build python3 tests/gpu/lmcache_wire_gpu.py

It allocates vLLM-shaped KV caches (flash_attn [2, NB, BS, NH, HS] bf16 per
layer, as views into one larger caching-allocator block, and an MLA
[NB, BS, 576] case), wraps every layer exactly as LMCache's CudaIPCWrapper
does (a pickled storage._share_cuda_() tuple in msgpack ext type 1),
REGISTERs them over a DEALER socket with the pinned frame layout, STOREs
with an IPC event recorded after its writes, RETRIEVEs into other blocks
with skip_first_n_tokens, waits on the server's event, and compares on the
GPU. A second process (spawned, its own CUDA context) does the same at the
same time. Exit 0 pass, 1 fail, 77 skip (no torch / GPU / libzmq).
"""
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get("KVSTASH_BUILD_DIR", os.path.join(HERE, "..", "..", "build"))
C = 256

failures = 0


def check(what, cond):
    global failures
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures += 1


# ---- libzmq through ctypes (zmq_ctypes.py) ----------------------------------------

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zmq_ctypes import Zmq, torch_and_msgpack  # noqa: E402


# ---- LMCache's CudaIPCWrapper, under its real module path -----------------------

def install_wrapper(torch):
    names = ["lmcache", "lmcache.v1", "lmcache.v1.multiprocess",
             "lmcache.v1.multiprocess.custom_types"]
    for n in names:
        sys.modules.setdefault(n, types.ModuleType(n))
    mod = sys.modules["lmcache.v1.multiprocess.custom_types"]

    class CudaIPCWrapper:
        def __init__(self, tensor):
            assert tensor.storage_offset() >= 0
            storage = tensor.untyped_storage()
            self.handle = storage._share_cuda_()
            self.dtype = tensor.dtype
            self.shape = tensor.shape
            self.stride = tensor.stride()
            self.storage_offset = tensor.storage_offset()
            self.device_uuid = str(torch.cuda.get_device_properties(tensor.device).uuid)

    CudaIPCWrapper.__module__ = mod.__name__
    CudaIPCWrapper.__qualname__ = "CudaIPCWrapper"
    mod.CudaIPCWrapper = CudaIPCWrapper
    return CudaIPCWrapper


class Engine:
    def __init__(self, zmq, ep, torch, msgpack, wrapper, instance, layout, seed):
        self.z, self.torch, self.mp, self.W = zmq, torch, msgpack, wrapper
        self.s = zmq.dealer(ep)
        self.uid = 0
        self.instance = instance
        self.layout = layout
        self.rng = random.Random(seed)
        dev = torch.device("cuda:0")
        NL, self.NB = 4, 64
        if layout == "mla":
            self.BS, shape = 64, (self.NB, 64, 576)
        else:
            self.BS, shape = 16, (2, self.NB, 16, 8, 128)
        per = 1
        for d in shape:
            per *= d
        # One caching-allocator block, layers as views at offsets inside it.
        self.block = torch.empty(per * NL + 4096, dtype=torch.bfloat16, device=dev)
        self.layers = [self.block[4096 + l * per: 4096 + (l + 1) * per].view(shape)
                       for l in range(NL)]
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        for t in self.layers:
            t.copy_(torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(torch.bfloat16))

    def call(self, rtype, *args):
        self.uid += 1
        frames = [self.mp.packb(self.uid), self.mp.packb(rtype)] + [self.mp.packb(a, use_bin_type=True)
                                                                    for a in args]
        self.z.send(self.s, frames)
        r = self.z.recv(self.s)
        if r is None:
            return "TIMEOUT"
        assert self.mp.unpackb(r[0]) == self.uid
        return self.mp.unpackb(r[2], raw=False) if len(r) > 2 else None

    def register(self):
        kv = [self.mp.ExtType(1, pickle.dumps(self.W(t))) for t in self.layers]
        return self.call(1, self.instance, kv, "m-lmcache-" + self.layout, 1)

    def key(self, tokens, start, end, worker=0):
        return {"model_name": "m-lmcache-" + self.layout, "world_size": 1, "worker_id": worker,
                "token_ids": tokens, "start": start, "end": end, "request_id": "r%d" % self.instance}

    def event(self):
        ev = self.torch.cuda.Event(interprocess=True)
        ev.record()
        return ev, bytes(ev.ipc_handle())

    def rows(self, blocks, ntok):
        """Gather the rows of range tokens [0, ntok) for every layer (for comparing)."""
        out = []
        for t in self.layers:
            for tok in range(0, ntok, 7):	# a sample of tokens, every layer and plane
                b, o = blocks[tok // self.BS], tok % self.BS
                out.append(t[b, o].clone() if self.layout == "mla" else t[:, b, o].clone())
        return out

    def run(self, rounds=3):
        ok = self.register() is None
        check("%s: REGISTER with CudaIPCWrapper ext-1 pickles" % self.layout, ok)
        for r in range(rounds):
            ntok = 2 * C
            tokens = [self.rng.randrange(1 << 31) for _ in range(ntok + 37)]
            perm = list(range(self.NB))
            self.rng.shuffle(perm)
            nblk = ntok // self.BS
            src, dst = perm[:nblk], perm[nblk:2 * nblk]
            _, h = self.event()
            rep = self.call(3, self.key(tokens, 0, ntok), self.instance, src, h)
            check("%s round %d: STORE -> [64-byte event, True]" % (self.layout, r),
                  isinstance(rep, list) and rep[1] is True and len(rep[0]) == 64)
            want = self.rows(src, ntok)
            job = self.call(5, self.key(tokens, 0, ntok, None), 1)
            hits = self.call(6, job)
            check("%s round %d: LOOKUP finds 2 chunks" % (self.layout, r), hits == 2)
            skip = 300
            before = self.rows(dst, ntok)
            _, h = self.event()
            rep = self.call(4, self.key(tokens, 0, ntok), self.instance, dst, h, skip)
            ok = isinstance(rep, list) and rep[1] is True and len(rep[0]) == 64
            check("%s round %d: RETRIEVE -> [64-byte event, True]" % (self.layout, r), ok)
            if ok:
                sev = self.torch.cuda.Event.from_ipc_handle(self.torch.device("cuda:0"), rep[0])
                sev.wait()
                self.torch.cuda.synchronize()
            got = self.rows(dst, ntok)
            samples_per_layer = len(range(0, ntok, 7))
            bad = 0
            for i, (g, w, b) in enumerate(zip(got, want, before)):
                tok = (i % samples_per_layer) * 7
                expect = w if tok >= skip else b
                bad += int(not self.torch.equal(g, expect))
            check("%s round %d: retrieved rows byte-exact, first %d tokens untouched (%d bad)"
                  % (self.layout, r, skip, bad), bad == 0)
        check("%s: UNREGISTER" % self.layout, self.call(2, self.instance) is None)


def main():
    mods = torch_and_msgpack()
    if mods is None:
        return 77
    torch, msgpack = mods
    if len(sys.argv) == 4:	# child: python3 lmcache_wire_gpu.py child EP LAYOUT
        W = install_wrapper(torch)
        Engine(Zmq(), sys.argv[2], torch, msgpack, W, 77, sys.argv[3], 7).run()
        return 1 if failures else 0
    tmp = tempfile.mkdtemp(prefix="kvstash-lmc-")
    ep = "ipc://%s/sock" % tmp
    log = open(os.path.join(tmp, "kvstashd.log"), "w")
    d = subprocess.Popen([os.path.join(BUILD, "kvstashd"), "--listen=" + ep, "--pool-size=2G",
                          "--http-port=0", "--workers=2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        z = Zmq()
        s = z.dealer(ep, 500)
        for _ in range(100):
            z.send(s, [b"\x00", b"\x0c"])
            if z.recv(s):
                break
            time.sleep(0.1)
        W = install_wrapper(torch)
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "child", ep, "mla"])
        Engine(z, ep, torch, msgpack, W, 11, "flash_attn", 1).run()
        check("second engine process (mla) passed", child.wait(timeout=240) == 0)
    finally:
        d.terminate()
        rc = d.wait(timeout=20)
        check("kvstashd exit status 0", rc == 0)
        if failures:
            log.flush()
            print(open(os.path.join(tmp, "kvstashd.log")).read()[-3000:])
    print("%d failure(s)" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
