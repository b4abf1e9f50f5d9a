#!/usr/bin/python3
"""A PyTorch engine of TODAY's LMCache (the frozen-id wire, September 2026 on)
against kvstashd on a GPU.

Run on a GPU machine with torch and python3-msgpack (no pyzmq needed: libzmq
is reached through ctypes, KVSTASH_LIBZMQ names it if it is not found):

    KVSTASH_BUILD_DIR=build python3 tests/gpu/lmcache_current_gpu.py

kvstashd runs with its default --protocol=auto. Two engines, each on its own
DEALER socket, do what LMCache's vLLM MP connector does today:
get_chunk_size (21), get_experimental (32), register_kv_cache (1, 7 frames),
store (6), lookup (8, no reply frame), query_prefetch_status (9), retrieve
(7), ping (22), end_session (13, with end_info), unregister (2). The key is
the 11-field IPCCacheServerKey map and block_ids are [[int]] (one list per
KV group).

  raw:  4 flash_attn layers [2, NB, BS, NH, HS] bf16, views into ONE torch
        allocation, each wrapped as the current RawCudaIPCWrapper
        (lmcache.v1.platform.devices.cuda.ipc_wrapper; cudaIpcMemHandle of the
        allocation base plus _alloc_offset), with isolated-IPC events both
        ways: 81-byte "!B64sQQ" timeline-semaphore handles
        (cuStreamWriteValue64 / cuStreamWaitValue64 through ctypes on
        libcuda). Each STORE/RETRIEVE enqueues a ~50 ms GPU spin before the
        client's own writes and its semaphore write, so a server that copied
        without waiting would store stale data (STORE) or have its copy
        overwritten by the client's poison (RETRIEVE); the comparison is
        byte-exact.
  ipc:  4 flashinfer layers [NB, 2, BS, NH, HS] bf16, wrapped as the default
        CudaIPCWrapper at the same new module path, with 64-byte CUDA IPC
        events (the same spin-then-write ordering).

Exit 0 pass, 1 fail, 77 skip (no torch / msgpack / CUDA device / libzmq /
libcuda).
"""
import ctypes
import ctypes.util
import os
import pickle
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get("KVSTASH_BUILD_DIR", os.path.join(HERE, "..", "..", "build"))
C = 256			# kvstashd's default chunk size (checked with get_chunk_size)
NCHUNKS = 2		# chunks per STORE
NL, NB, BS, NH, HS = 4, 96, 16, 8, 128
SPIN_MS = 50		# GPU spin before the client's writes
WAIT_S = 5.0		# bound on waiting for the server's completion handle
RPC_TIMEOUT_MS = 20000
WATCHDOG_S = 120
WRAPPER_MODULE = "lmcache.v1.platform.devices.cuda.ipc_wrapper"

# Current wire ids (LMCache zmq_impl/wire.py LEGACY_OPERATION_IDS)
OP_REGISTER, OP_UNREGISTER, OP_STORE, OP_RETRIEVE, OP_LOOKUP = 1, 2, 6, 7, 8
OP_QUERY, OP_END_SESSION, OP_GET_CHUNK_SIZE, OP_PING, OP_GET_EXPERIMENTAL = 9, 13, 21, 22, 32
OP_KS_LAST_ERROR = 200	# kvstash extension: last error of this connection (diagnostics)

failures = 0


def check(what, cond, detail=""):
    global failures
    line = ("PASS " if cond else "FAIL ") + what
    if detail and not cond:
        line += ": " + detail
    print(line, flush=True)
    if not cond:
        failures += 1
    return cond


# ---- libzmq through ctypes (zmq_ctypes.py) ----------------------------------------

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zmq_ctypes import Zmq, torch_and_msgpack  # noqa: E402


# ---- the CUDA driver API through ctypes ------------------------------------------------

class IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


class Cu:
    """The few libcuda entry points an isolated-IPC LMCache client uses."""
    CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
    CU_STREAM_WAIT_VALUE_GEQ = 0
    CU_STREAM_WRITE_VALUE_DEFAULT = 0

    def __init__(self):
        L = ctypes.CDLL("libcuda.so.1")
        self.lib = L
        u64, i32, u32, vp, sz = (ctypes.c_uint64, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p,
                                 ctypes.c_size_t)
        P = ctypes.POINTER
        sigs = {
            "cuInit": [u32],
            "cuDeviceGet": [P(i32), i32],
            "cuDevicePrimaryCtxRetain": [P(vp), i32],
            "cuCtxSetCurrent": [vp],
            "cuCtxSynchronize": [],
            "cuMemAlloc_v2": [P(u64), sz],
            "cuMemsetD8_v2": [u64, ctypes.c_ubyte, sz],
            "cuMemGetAddressRange_v2": [P(u64), P(sz), u64],
            "cuIpcGetMemHandle": [P(IpcMemHandle), u64],
            "cuIpcOpenMemHandle_v2": [P(u64), IpcMemHandle, u32],
            "cuIpcCloseMemHandle": [u64],
            "cuMemcpyDtoH_v2": [vp, u64, sz],
            # CUresult (CUstream, CUdeviceptr, cuuint64_t value, unsigned int flags)
            "cuStreamWriteValue64_v2": [vp, u64, u64, u32],
            "cuStreamWaitValue64_v2": [vp, u64, u64, u32],
            "cuGetErrorName": [i32, P(ctypes.c_char_p)],
        }
        for name, args in sigs.items():
            fn = getattr(L, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int

    def ok(self, rc, what):
        if rc != 0:
            s = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(s))
            raise RuntimeError("%s failed: %d %s" % (what, rc, (s.value or b"?").decode()))

    def bind_primary(self, ordinal):
        """Make the device's primary context (torch's) current on this thread."""
        self.ok(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self.ok(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        self.ok(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value),
                "cuDevicePrimaryCtxRetain")
        self.ok(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def addr_range(self, ptr):
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self.ok(self.lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr),
                "cuMemGetAddressRange")
        return base.value, size.value

    def ipc_handle(self, base):
        h = IpcMemHandle()
        self.ok(self.lib.cuIpcGetMemHandle(ctypes.byref(h), base), "cuIpcGetMemHandle")
        return ctypes.string_at(ctypes.addressof(h), 64)

    def ipc_open(self, handle):
        p = ctypes.c_uint64()
        self.ok(self.lib.cuIpcOpenMemHandle_v2(ctypes.byref(p), IpcMemHandle.from_buffer_copy(handle),
                                               self.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                "cuIpcOpenMemHandle")
        return p.value

    def ipc_close(self, ptr):
        self.ok(self.lib.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")

    def alloc_zeroed(self, nbytes):
        p = ctypes.c_uint64()
        self.ok(self.lib.cuMemAlloc_v2(ctypes.byref(p), nbytes), "cuMemAlloc")
        self.ok(self.lib.cuMemsetD8_v2(p.value, 0, nbytes), "cuMemsetD8")
        self.ok(self.lib.cuCtxSynchronize(), "cuCtxSynchronize")
        return p.value

    def read_u64(self, addr):
        v = ctypes.c_uint64()
        self.ok(self.lib.cuMemcpyDtoH_v2(ctypes.addressof(v), addr, 8), "cuMemcpyDtoH")
        return v.value

    def write_value(self, stream, addr, value):
        self.ok(self.lib.cuStreamWriteValue64_v2(stream, addr, value,
                                                 self.CU_STREAM_WRITE_VALUE_DEFAULT),
                "cuStreamWriteValue64")

    def wait_value(self, stream, addr, value):
        self.ok(self.lib.cuStreamWaitValue64_v2(stream, addr, value, self.CU_STREAM_WAIT_VALUE_GEQ),
                "cuStreamWaitValue64")


# ---- today's LMCache wrappers, under their real module path ---------------------------

def install_wrappers(torch, cu):
    names = ["lmcache", "lmcache.v1", "lmcache.v1.platform", "lmcache.v1.platform.devices",
             "lmcache.v1.platform.devices.cuda", WRAPPER_MODULE]
    for n in names:
        sys.modules.setdefault(n, types.ModuleType(n))
    mod = sys.modules[WRAPPER_MODULE]

    def uuid_of(t):
        return str(torch.cuda.get_device_properties(t.device).uuid)

    class CudaIPCWrapper:
        """devices/cuda/ipc_wrapper.py: the default wrapper (content as in March)."""

        def __init__(self, tensor):
            assert tensor.is_contiguous()
            self.handle = tensor.untyped_storage()._share_cuda_()
            self.dtype = tensor.dtype
            self.shape = tuple(tensor.shape)
            self.stride = tuple(tensor.stride())
            self.storage_offset = int(tensor.storage_offset())
            self.device_uuid = uuid_of(tensor)

    class RawCudaIPCWrapper:
        """devices/cuda/ipc_wrapper.py: isolated IPC, the allocation-base form."""

        def __init__(self, tensor):
            assert tensor.is_contiguous()
            base, size = cu.addr_range(tensor.data_ptr())
            # the state keys, in LMCache's order
            self._ipc_handle_reserved = cu.ipc_handle(base)
            self._alloc_offset = tensor.data_ptr() - base
            self._nbytes = tensor.numel() * tensor.element_size()
            self.handle = None
            self.dtype = tensor.dtype
            self.shape = tuple(tensor.shape)
            self.stride = tuple(tensor.stride())
            self.storage_offset = 0
            self._opens = 0
            self.device_uuid = uuid_of(tensor)
            assert self._alloc_offset + self._nbytes <= size

    for cls in (CudaIPCWrapper, RawCudaIPCWrapper):
        cls.__module__ = WRAPPER_MODULE
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    return CudaIPCWrapper, RawCudaIPCWrapper


class RpcError(Exception):
    pass


class Reply:
    def __init__(self, frames):
        self.frames = frames
        self.has_frame = len(frames) > 2
        self.raw = frames[2] if self.has_frame else None
        self.value = None

    def __repr__(self):
        if not self.has_frame:
            return "<no response frame>"
        return "%r (frame %s)" % (self.value, self.raw[:24].hex())


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class Engine:
    """One LMCache worker (one instance_id) on its own DEALER socket."""

    def __init__(self, z, ep, torch, msgpack, cu, kind, layout, seed, W, cycles):
        self.z, self.torch, self.mp, self.cu = z, torch, msgpack, cu
        self.kind, self.layout, self.W, self.cycles = kind, layout, W, cycles
        self.name = "%s/%s" % (kind, layout)
        self.s = z.dealer(ep)
        self.uid = 0
        self.rng = random.Random(seed)
        self.seed = seed
        self.iid = uuid.UUID(int=self.rng.getrandbits(128)).int & (2 ** 63 - 1)
        self.model = "m-current-" + kind
        self.dev = torch.device("cuda:0")
        if layout == "flash_attn":
            self.shape, self.bdim = (2, NB, BS, NH, HS), 1
        else:
            self.shape, self.bdim = (NB, 2, BS, NH, HS), 0
        per = 1
        for d in self.shape:
            per *= d
        pad = 1 << 19	# 1 MiB of bf16 before layer 0: every layer at a non-zero offset
        # ONE torch (caching-allocator) allocation; the layers are views into it.
        self.block = torch.empty(pad + per * NL, dtype=torch.bfloat16, device=self.dev)
        self.layers = [self.block[pad + l * per: pad + (l + 1) * per].view(self.shape)
                       for l in range(NL)]
        self.i16 = [t.view(torch.int16) for t in self.layers]
        self.stream = torch.cuda.Stream(device=self.dev)
        # isolated IPC: our semaphore buffer (its own cuMemAlloc: handle = allocation base)
        self.sem_base = None
        self.sem_handle = None
        self.sem_seq = 0
        self.server_sems = {}	# 64-byte server handle -> mapped base
        self.server_seq = {}	# 64-byte server handle -> last seq seen
        self.seq_compared = 0	# replies whose seq was compared with an earlier one

    # -- wire ----------------------------------------------------------------------------
    def call(self, op, *args):
        uidb = self.mp.packb(self.uid)
        self.uid += 1
        opb = self.mp.packb(op)
        frames = [uidb, opb] + [self.mp.packb(a, use_bin_type=True) for a in args]
        self.z.send(self.s, frames)
        for _ in range(8):
            r = self.z.recv(self.s)
            if r is None:
                raise RpcError("%s: op %d: no reply in %d ms" % (self.name, op, RPC_TIMEOUT_MS))
            if len(r) >= 2 and r[0] == uidb:
                break
            print("  (%s: stray reply %r dropped)" % (self.name, [f[:16] for f in r]), flush=True)
        else:
            raise RpcError("%s: op %d: only stray replies" % (self.name, op))
        if r[1] != opb:
            raise RpcError("%s: op %d: reply echoes op frame %s, sent %s"
                           % (self.name, op, r[1].hex(), opb.hex()))
        rep = Reply(r)
        if rep.has_frame:
            rep.value = self.mp.unpackb(rep.raw, raw=False)
        return rep

    def last_error(self):
        try:
            r = self.call(OP_KS_LAST_ERROR)
            return r.value if r.has_frame else "<no frame>"
        except RpcError as e:
            return "<%s>" % e

    def key(self, tokens, end, rid, worker=0):
        return {"model_name": self.model, "world_size": 1, "worker_id": worker,
                "token_ids": tokens, "start": 0, "end": end, "request_id": rid,
                "cache_salt": "", "request_configs": None, "num_kv_readers": 1,
                "null_chunk_mask": None}

    def group_infos(self):
        g = {"engine_group_id": 0, "layer_indices": list(range(NL)), "tokens_per_block": BS,
             "sw_size_tokens": -1, "extra_object_group_tag": 0, "recurrent_state": False}
        if self.kind == "ipc":
            # the newest EngineGroupInfo's further fields: a server must ignore them
            g.update({"tokens_per_state": 1, "cache_role": "sparse", "state_content_bytes": 0,
                      "block_stride_alignment": 0, "is_index_group_leader": False,
                      "prefix_cacheable": True, "page_size_padded": 0, "num_head_slots": 0})
        return [g]

    # -- KV data -------------------------------------------------------------------------
    def pattern(self, nblk, salt):
        """Deterministic int16 bits for nblk blocks of one layer (any bf16 bits, NaNs too)."""
        torch = self.torch
        shp = list(self.shape)
        shp[self.bdim] = nblk
        n = 1
        for d in shp:
            n *= d
        x = torch.arange(n, device=self.dev, dtype=torch.int64)
        x = x * 40503 + salt * 9973 + 12345
        x = ((x ^ (x >> 7)) & 0xFFFF) - 32768
        return x.to(torch.int16).reshape(shp)

    def put(self, l, idx, values):
        self.i16[l].index_copy_(self.bdim, idx, values)

    def get(self, l, idx):
        return self.i16[l].index_select(self.bdim, idx)

    def fill_const(self, idx, v):
        shp = list(self.shape)
        shp[self.bdim] = idx.numel()
        c = self.torch.full(shp, v, dtype=self.torch.int16, device=self.dev)
        for l in range(NL):
            self.put(l, idx, c)

    # -- completion handles --------------------------------------------------------------
    def record(self):
        """The client's event, recorded on self.stream after what is queued there."""
        torch = self.torch
        if self.kind == "raw":
            self.sem_seq += 1
            self.cu.write_value(self.stream.cuda_stream, self.sem_base + 8, self.sem_seq)
            return None, struct.pack("!B64sQQ", 1, self.sem_handle, 8, self.sem_seq)
        ev = torch.cuda.Event(interprocess=True)
        ev.record(self.stream)
        return ev, bytes(ev.ipc_handle())

    def check_xfer_reply(self, what, rep, allow_empty=False):
        v = rep.value
        want_len = 81 if self.kind == "raw" else 64
        shape_ok = (rep.has_frame and isinstance(v, list) and len(v) == 2
                    and isinstance(v[0], bytes) and v[1] is True)
        ok = check("%s: %s -> [%d-byte handle, True]" % (self.name, what, want_len),
                   shape_ok and (len(v[0]) == want_len or (allow_empty and len(v[0]) == 0)),
                   repr(rep))
        if ok and rep.raw[:2] == b"\x92\xc4":
            check("%s: %s reply is a 2-array of msgpack bin + c3" % (self.name, what),
                  rep.raw[-1:] == b"\xc3" and rep.raw[2] == len(v[0]), rep.raw[:4].hex())
        elif ok:
            check("%s: %s reply is a 2-array of msgpack bin" % (self.name, what), False,
                  rep.raw[:4].hex())
        return ok

    def wait_server(self, what, handle):
        """Wait for the server's completion handle; then order self.stream after it."""
        torch = self.torch
        if len(handle) == 0:
            return True	# "no device work pending"
        if self.kind != "raw":
            sev = torch.cuda.Event.from_ipc_handle(self.dev, handle)
            deadline = time.monotonic() + WAIT_S
            while not sev.query():
                if time.monotonic() > deadline:
                    return check("%s: %s: server event completes within %.0f s"
                                 % (self.name, what, WAIT_S), False)
                time.sleep(0.0005)
            sev.wait(self.stream)
            return True
        ver, mh, off, seq = struct.unpack("!B64sQQ", handle)
        ok = check("%s: %s: 81-byte handle is version 1, the server's own buffer, slot "
                   "8-aligned in 8..32760, seq >= 1" % (self.name, what),
                   ver == 1 and mh != self.sem_handle and off % 8 == 0 and 8 <= off < 32768
                   and seq >= 1, "version %d, own=%s, offset %d, seq %d"
                   % (ver, mh == self.sem_handle, off, seq))
        if not ok:
            return False
        last = self.server_seq.get(mh)
        if last is not None:
            self.seq_compared += 1
            check("%s: %s: server seq grows on its buffer (%d -> %d)" % (self.name, what, last, seq),
                  seq > last)
        self.server_seq[mh] = seq
        if mh not in self.server_sems:	# one mapping per server buffer, kept
            self.server_sems[mh] = self.cu.ipc_open(mh)
            print("  %s: opened server semaphore buffer #%d" % (self.name, len(self.server_sems)),
                  flush=True)
        addr = self.server_sems[mh] + off
        deadline = time.monotonic() + WAIT_S
        val = self.cu.read_u64(addr)
        while val < seq:
            if time.monotonic() > deadline:
                return check("%s: %s: server slot reaches seq %d within %.0f s"
                             % (self.name, what, seq, WAIT_S), False, "slot holds %d" % val)
            time.sleep(0.0005)
            val = self.cu.read_u64(addr)
        # as LMCache's wait_event does: the stream waits GEQ (already met here)
        self.cu.wait_value(self.stream.cuda_stream, addr, seq)
        return True

    # -- the engine ----------------------------------------------------------------------
    def setup(self):
        torch = self.torch
        g = torch.Generator(device=self.dev)
        g.manual_seed(self.seed)
        for t in self.i16:
            t.copy_(torch.randint(-32768, 32767, self.shape, generator=g, device=self.dev,
                                  dtype=torch.int16))
        if self.kind == "raw":
            self.sem_base = self.cu.alloc_zeroed(4096 * 8)
            base, _ = self.cu.addr_range(self.sem_base)
            assert base == self.sem_base
            self.sem_handle = self.cu.ipc_handle(self.sem_base)
        torch.cuda.synchronize()

    def init_worker(self, W):
        r = self.call(OP_GET_CHUNK_SIZE)
        check("%s: get_chunk_size -> %d" % (self.name, C), is_int(r.value) and r.value == C, repr(r))
        r = self.call(OP_GET_EXPERIMENTAL)
        check("%s: get_experimental -> [] (0x90)" % self.name, r.has_frame and r.raw == b"\x90",
              repr(r))
        wrappers = [W(t) for t in self.layers]
        if self.kind == "raw":
            offs = [w._alloc_offset for w in wrappers]
            check("%s: RawCudaIPCWrapper: one allocation base, non-zero _alloc_offset per layer"
                  % self.name, len({w._ipc_handle_reserved for w in wrappers}) == 1
                  and all(o > 0 for o in offs) and offs == sorted(set(offs)), str(offs))
            check("%s: RawCudaIPCWrapper state keys in LMCache's order" % self.name,
                  list(vars(wrappers[0])) == ["_ipc_handle_reserved", "_alloc_offset", "_nbytes",
                                              "handle", "dtype", "shape", "stride",
                                              "storage_offset", "_opens", "device_uuid"],
                  str(list(vars(wrappers[0]))))
        bodies = [pickle.dumps(w) for w in wrappers]
        cls = W.__name__.encode()
        check("%s: pickles name %s.%s" % (self.name, WRAPPER_MODULE, W.__name__),
              all(WRAPPER_MODULE.encode() in b and cls in b for b in bodies))
        kv = [self.mp.ExtType(1, b) for b in bodies]
        r = self.call(OP_REGISTER, self.iid, kv, self.model, 1, "vllm", {}, self.group_infos())
        ok = check("%s: register_kv_cache (7 frames, %d-byte pickles) -> None (no frame)"
                   % (self.name, len(bodies[0])), not r.has_frame, repr(r))
        err = self.last_error()
        check("%s: registration accepted (KS_LAST_ERROR empty)" % self.name, err == "", repr(err))
        return ok and err == ""

    def round(self, rnd):
        torch = self.torch
        ntok = NCHUNKS * C
        nblk = ntok // BS
        tokens = [self.rng.randrange(1 << 31) for _ in range(ntok + 37)]
        perm = list(range(NB))
        self.rng.shuffle(perm)
        src = torch.tensor(perm[:nblk], device=self.dev, dtype=torch.int64)
        dst = torch.tensor(perm[nblk:2 * nblk], device=self.dev, dtype=torch.int64)
        rid = "req-%x-%d" % (self.iid, rnd)
        tag = "%s round %d" % (self.name, rnd)
        STALE, POISON = 0x1234, 0x0777
        salt = self.seed * 100 + rnd * 10

        # STORE: the source blocks hold stale bits; the stream spins, writes the real
        # data, then records: a server that did not wait would store the stale bits.
        self.fill_const(src, STALE)
        torch.cuda.synchronize()
        want = [self.pattern(nblk, salt + l) for l in range(NL)]
        torch.cuda.synchronize()
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(self.cycles)
            for l in range(NL):
                self.put(l, src, want[l])
            ev, h = self.record()
        t0 = time.monotonic()
        rep = self.call(OP_STORE, self.key(tokens, ntok, rid), self.iid, [perm[:nblk]], h)
        dt = (time.monotonic() - t0) * 1e3
        print("  %s: STORE replied after %.1f ms (client spin ~%d ms)" % (tag, dt, SPIN_MS),
              flush=True)
        if not self.check_xfer_reply("%s: store" % tag, rep):
            print("  last error: %r" % self.last_error())
            return
        if not self.wait_server("%s store" % tag, rep.value[0]):
            return
        self.stream.synchronize()
        del ev

        if rnd == 0:
            # the same chunks again: nothing new to store; b"" (no device work) or a handle
            with torch.cuda.stream(self.stream):
                ev, h = self.record()	# ev: kept alive until the reply
            rep = self.call(OP_STORE, self.key(tokens, ntok, rid), self.iid, [perm[:nblk]], h)
            if self.check_xfer_reply("%s: repeated store" % tag, rep, allow_empty=True):
                self.wait_server("%s repeated store" % tag, rep.value[0])
            self.stream.synchronize()
            del ev

        # LOOKUP (scheduler key: worker_id nil) -> None; QUERY -> chunks, then 0
        rep = self.call(OP_LOOKUP, self.key(tokens, ntok, rid, worker=None), 1)
        check("%s: lookup -> None (no response frame)" % tag, not rep.has_frame, repr(rep))
        deadline = time.monotonic() + WAIT_S
        rep = self.call(OP_QUERY, rid)
        while not rep.has_frame and time.monotonic() < deadline:	# None: still loading
            time.sleep(0.01)
            rep = self.call(OP_QUERY, rid)
        check("%s: query_prefetch_status -> %d chunks" % (tag, NCHUNKS),
              is_int(rep.value) and rep.value == NCHUNKS, repr(rep))
        rep = self.call(OP_QUERY, rid)
        check("%s: query_prefetch_status again -> 0 (consumed)" % tag,
              is_int(rep.value) and rep.value == 0, repr(rep))

        # RETRIEVE into other blocks: the stream spins, then poisons the target blocks,
        # then records: a server that did not wait would have its copy overwritten.
        self.fill_const(dst, 0)
        torch.cuda.synchronize()
        before = [t.clone() for t in self.i16]
        torch.cuda.synchronize()	# the clones are done before the stream poisons
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(self.cycles)
            self.fill_const(dst, POISON)
            ev, h = self.record()
        rep = self.call(OP_RETRIEVE, self.key(tokens, ntok, rid), self.iid, [perm[nblk:2 * nblk]],
                        h, 0)
        if not self.check_xfer_reply("%s: retrieve" % tag, rep):
            print("  last error: %r" % self.last_error())
            return
        if not self.wait_server("%s retrieve" % tag, rep.value[0]):
            return
        with torch.cuda.stream(self.stream):
            bad, why = 0, []
            for l in range(NL):
                got = self.get(l, dst)
                if not torch.equal(got, want[l]):
                    bad += 1
                    if bool((got == POISON).all()):
                        why.append("layer %d still poison (server did not wait for the client)" % l)
                    elif bool((got == STALE).all()):
                        why.append("layer %d stale (STORE copied before the client's data)" % l)
                    else:
                        why.append("layer %d differs in %d elements"
                                   % (l, int((got != want[l]).sum())))
            check("%s: retrieved blocks byte-exact in all %d layers" % (tag, NL), bad == 0,
                  "; ".join(why))
            keep = torch.ones(NB, dtype=torch.bool, device=self.dev)
            keep[dst] = False
            other = keep.nonzero().flatten()
            untouched = all(torch.equal(self.i16[l].index_select(self.bdim, other),
                                        before[l].index_select(self.bdim, other))
                            for l in range(NL))
            check("%s: no block outside the retrieve's changed" % tag, untouched)
        self.stream.synchronize()
        del ev, before

        rep = self.call(OP_PING, self.iid)
        check("%s: ping(instance_id) -> True (c3)" % tag, rep.has_frame and rep.raw == b"\xc3",
              repr(rep))
        rep = self.call(OP_END_SESSION, rid, {"finish_reason": "stop", "stop_token_id": 2})
        check("%s: end_session(request_id, end_info) -> None (no frame)" % tag, not rep.has_frame,
              repr(rep))

    def run(self, rounds):
        self.setup()
        if not self.init_worker(self.W):
            return
        for rnd in range(rounds):
            self.round(rnd)
        if self.kind == "raw":
            check("%s: client semaphore seq advanced to %d" % (self.name, self.sem_seq),
                  self.sem_seq == 2 * rounds + 1)
            check("%s: a server semaphore buffer answered more than once (seq compared %d "
                  "time(s), %d buffer(s))" % (self.name, self.seq_compared, len(self.server_seq)),
                  self.seq_compared >= 1)
        rep = self.call(OP_PING, None)
        check("%s: ping(None) -> True" % self.name, rep.has_frame and rep.raw == b"\xc3", repr(rep))
        self.torch.cuda.synchronize()
        for base in self.server_sems.values():
            self.cu.ipc_close(base)
        self.server_sems.clear()
        rep = self.call(OP_UNREGISTER, self.iid)
        check("%s: unregister_kv_cache -> None (no frame)" % self.name, not rep.has_frame, repr(rep))


def spin_cycles(torch, ms):
    """torch.cuda._sleep cycles for about @ms milliseconds on this GPU."""
    n = 1 << 21
    for _ in range(2):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(n)
        b.record()
        b.synchronize()
        el = a.elapsed_time(b)
    per_ms = n / max(el, 1e-3)
    return int(min(max(per_ms * ms, 1 << 20), 1 << 33))


def pdeathsig():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)	# PR_SET_PDEATHSIG, SIGKILL
    except Exception:
        pass


def main():
    # Expandable (VMM) segments have no cudaIpcMemHandle: LMCache's CUDA IPC wrappers
    # (and kvstash) need the caching allocator's plain cudaMalloc segments.
    conf = [c for c in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",")
            if c.strip() and not c.strip().startswith("expandable_segments")]
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(conf + ["expandable_segments:False"])
    mods = torch_and_msgpack()
    if mods is None:
        return 77
    torch, msgpack = mods
    try:
        z = Zmq()
    except OSError as e:
        print("skip: no libzmq (%s); set KVSTASH_LIBZMQ" % e)
        return 77
    try:
        cu = Cu()
    except (OSError, AttributeError) as e:
        print("skip: no usable libcuda.so.1 (%s)" % e)
        return 77
    exe = os.path.join(BUILD, "kvstashd")
    if not os.access(exe, os.X_OK):
        check("kvstashd found at %s (KVSTASH_BUILD_DIR)" % exe, False)
        return 1

    tmp = tempfile.mkdtemp(prefix="kvstash-lmcur-")
    ep = "ipc://%s/sock" % tmp
    logpath = os.path.join(tmp, "kvstashd.log")
    log = open(logpath, "w")
    d = subprocess.Popen([exe, "--listen=" + ep, "--pool-size=2G", "--http-port=0",
                          "--workers=2"], stdout=log, stderr=subprocess.STDOUT,
                         preexec_fn=pdeathsig)

    def watchdog():
        print("FAIL watchdog: still running after %d s; killing kvstashd" % WATCHDOG_S, flush=True)
        try:
            d.kill()
            log.flush()
            print(open(logpath).read()[-3000:], flush=True)
        finally:
            os._exit(1)

    wd = threading.Timer(WATCHDOG_S, watchdog)
    wd.daemon = True
    wd.start()
    t_start = time.monotonic()
    try:
        # ready: a current-dialect get_chunk_size on a probe socket
        s = z.dealer(ep, 500)
        ready = False
        for i in range(100):
            z.send(s, [msgpack.packb(i), msgpack.packb(OP_GET_CHUNK_SIZE)])
            if z.recv(s):
                ready = True
                break
            if d.poll() is not None:
                break
            time.sleep(0.1)
        z.close(s)
        if not check("kvstashd answers get_chunk_size (op 21)", ready):
            return 1
        torch.cuda.init()
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda:0")
        cu.bind_primary(torch.cuda.current_device())
        Wipc, Wraw = install_wrappers(torch, cu)
        cycles = spin_cycles(torch, SPIN_MS)
        print("  spin: %d cycles for ~%d ms" % (cycles, SPIN_MS), flush=True)
        # both engines' KV caches first, each its own allocation
        raw = Engine(z, ep, torch, msgpack, cu, "raw", "flash_attn", 1, Wraw, cycles)
        ipc = Engine(z, ep, torch, msgpack, cu, "ipc", "flashinfer", 2, Wipc, cycles)
        for e in (raw, ipc):
            try:
                e.run(rounds=2)
            except (RpcError, RuntimeError, AssertionError) as ex:
                traceback.print_exc()
                check("%s: ran to the end" % e.name, False, str(ex))
                try:
                    print("  last error: %r" % e.last_error())
                except Exception:
                    pass
        torch.cuda.synchronize()
    except Exception as ex:
        traceback.print_exc()
        check("no exception", False, repr(ex))
    finally:
        d.terminate()
        try:
            rc = d.wait(timeout=20)
        except subprocess.TimeoutExpired:
            d.kill()
            rc = d.wait(timeout=10)
        wd.cancel()
        check("kvstashd exit status 0", rc == 0, "rc %s" % rc)
        log.close()
        if failures:
            print(open(logpath).read()[-4000:])
    print("%d failure(s) in %.1f s" % (failures, time.monotonic() - t_start))
    print("PASS" if not failures else "FAIL")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
