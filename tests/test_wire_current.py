#!/usr/bin/python3
# Description: kvstashd speaks LMCache's current (Sept 2026, frozen-id) MP wire next to the March one, latched per connection. Labels: unit
#
# A Python client written from LMCache's current code (lmcache/v1/multiprocess
# zmq_impl/mq.py, wire.py, transport/base.py; see docs/protocol.md for the
# March dialect): one DEALER socket, no identity, frames [uid, op, arg...],
# uid a msgpack int counting from 0, op the frozen table's msgpack int (or a
# msgpack str name for operations outside it), one msgpack document per
# argument, every argument always sent. Replies are decoded the way msgspec
# decodes the declared response type: bool is not int and int is not bool,
# tuple[bytes, bool] is an array of exactly 2 (bin, then bool), a reply with
# no response frame is None, and a c0 frame is only accepted where None is a
# legal value.
#
# KV caches are POSIX shm segments /dev/shm/lmcache_kv_<pid>_<n> registered
# as msgpack ext 1 pickles of CpuShmTensorWrapper
# (lmcache.v1.platform.devices.cpu.shm), pickled here exactly as LMCache
# pickles them (stand-in classes under the same module/class names; nothing
# is imported from LMCache or torch). Two layers share one segment at
# different storage offsets. STORE/RETRIEVE round trips are checked byte for
# byte (protocol.md §3 skip rule, §7 element mapping), also across two KV
# cache groups and with a layer that is in no group.
#
# A March client (test_wire_compat.py's framing, memfd "host_shm"
# descriptors) runs concurrently on the same endpoint; the dialect latching
# per connection, the ambiguous op ids, and --protocol=march|current are
# checked too.
#
# Standard library + python3-zmq + python3-msgpack (apt) only.
# Exit: 0 pass, 1 fail, 77 skip (python3-zmq or python3-msgpack missing).

import mmap
import os
import pickle
import random
import sys
import threading
import time
import traceback
import types
import uuid

try:
    import msgpack
    import zmq
except ImportError as exc:  # pragma: no cover
    print("SKIP: python3-zmq / python3-msgpack not available (%s)" % exc)
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wirelib import Server, hx, pk, slot_of, unpack_strict  # noqa: E402

# ---------------------------------------------------------------- constants

# LMCache's frozen wire ids (zmq_impl/wire.py LEGACY_OPERATION_IDS)
REGISTER_KV_CACHE = 1
UNREGISTER_KV_CACHE = 2
REGISTER_Q_CACHE = 3
UNREGISTER_Q_CACHE = 4
STORE_Q = 5
STORE = 6
RETRIEVE = 7
LOOKUP = 8
QUERY_PREFETCH_STATUS = 9
WAIT_PREFETCH_STATUS = 10
QUERY_PREFETCH_LOOKUP_HITS = 11
FREE_LOOKUP_LOCKS = 12
END_SESSION = 13
REGISTER_KV_CACHE_ENGINE_DRIVEN_CONTEXT = 14
UNREGISTER_KV_CACHE_ENGINE_DRIVEN_CONTEXT = 15
PREPARE_STORE = 16
COMMIT_STORE = 17
PREPARE_RETRIEVE = 18
COMMIT_RETRIEVE = 19
CLEAR = 20
GET_CHUNK_SIZE = 21
PING = 22
REPORT_BLOCK_ALLOCATION = 23
NOOP = 24
CB_REGISTER_ROPE = 25
CB_UNREGISTER_ROPE = 26
CB_RETRIEVE_PRE_COMPUTED = 27
CB_UNIFIED_LOOKUP = 28
P2P_LOOKUP_AND_LOCK = 29
P2P_QUERY_LOOKUP_RESULTS = 30
P2P_UNLOCK_OBJECTS = 31
GET_EXPERIMENTAL = 32
CB_PROTOCOL_HANDSHAKE = 33
POLL_KV_EVENTS = 34
KS_STATS = 201  # kvstash extension (protocol.md "kvstash extensions")


class MARCH(object):
    """The pinned March 2026 RequestType (protocol.md §3)."""
    REGISTER_KV_CACHE = 1
    UNREGISTER_KV_CACHE = 2
    STORE = 3
    RETRIEVE = 4
    LOOKUP = 5
    QUERY_PREFETCH_STATUS = 6
    QUERY_PREFETCH_LOOKUP_HITS = 7
    FREE_LOOKUP_LOCKS = 8
    END_SESSION = 9
    CLEAR = 10
    GET_CHUNK_SIZE = 11
    PING = 12
    NOOP = 13


C = 256  # default chunk size
ELEM = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "int8": 1}
RECV_TIMEOUT_MS = 5000
QUIET_MS = 200  # how long "no reply" is awaited for a dropped request
CPU_STUB_EVENT = b"stub_ipc_handle"  # what a CPU LMCache worker sends as its event

# ---------------------------------------------------------------- reporting

FAILS = []
NCHECKS = [0]
_REPORT_LOCK = threading.Lock()


def check(cond, what, detail=""):
    with _REPORT_LOCK:
        NCHECKS[0] += 1
        if cond:
            print("PASS: %s" % what)
        else:
            print("FAIL: %s%s" % (what, (" -- " + detail) if detail else ""))
            FAILS.append(what)
        sys.stdout.flush()
    return bool(cond)


def count_check():
    with _REPORT_LOCK:
        NCHECKS[0] += 1


def frames_hx(fr):
    return "[%s]" % ", ".join("[%s]" % hx(f) for f in fr) if fr is not None else "None"


# ---------------------------------------------------------------- msgspec-strict reply types

NONE = ("none",)
INT = ("int",)
BOOL = ("bool",)
STR = ("str",)
BYTES = ("bytes",)
ANY = ("any",)


def OPT(t):
    return ("opt", t)


def LIST(t):
    return ("list", t)


def TUPLE(*ts):
    return ("tuple",) + ts


def MAP(kt, vt):
    return ("map", kt, vt)


def STRUCT(*fields):
    """A msgspec Struct/dataclass: a map; fields (name, type, required)."""
    return ("struct", fields)


def conforms(v, t):
    """None when msgspec would decode v (a strictly unpacked msgpack value) as t, else why not."""
    k = t[0]
    if k == "any":
        return None
    if k == "none":
        return None if v is None else "expected nil, got %r" % (v,)
    if k == "opt":
        return None if v is None else conforms(v, t[1])
    simple = {"int": int, "bool": bool, "str": str, "bytes": bytes}
    if k in simple:
        return None if type(v) is simple[k] else "expected %s, got %s %r" % (k, type(v).__name__, v)
    if k == "list":
        if type(v) is not list:
            return "expected array, got %s %r" % (type(v).__name__, v)
        for i, x in enumerate(v):
            r = conforms(x, t[1])
            if r:
                return "[%d]: %s" % (i, r)
        return None
    if k == "tuple":
        if type(v) is not list or len(v) != len(t) - 1:
            return "expected an array of exactly %d, got %r" % (len(t) - 1, v)
        for i, x in enumerate(v):
            r = conforms(x, t[1 + i])
            if r:
                return "[%d]: %s" % (i, r)
        return None
    if k == "map":
        if type(v) is not dict:
            return "expected map, got %s %r" % (type(v).__name__, v)
        for kk, vv in v.items():
            r = conforms(kk, t[1]) or conforms(vv, t[2])
            if r:
                return "entry %r: %s" % (kk, r)
        return None
    if k == "struct":
        if type(v) is not dict:
            return "expected map (struct), got %s %r" % (type(v).__name__, v)
        if any(type(kk) is not str for kk in v):
            return "struct map with a non-str key: %r" % (v,)
        for name, ft, required in t[1]:
            if name in v:
                r = conforms(v[name], ft)
                if r:
                    return "field %s: %s" % (name, r)
            elif required:
                return "required field %s missing in %r" % (name, v)
        return None
    raise ValueError(t)


def same(a, b):
    """Equality that also compares types (True != 1, b'' != '')."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    return a == b


NOWANT = object()


def decode_reply(fr, t):
    """(ok, value, reason) as LMCache's process_inbound + msgspec_decode would see fr."""
    if fr is None or len(fr) < 2:
        return False, None, "no reply / fewer than 2 frames"
    if len(fr) == 2:
        if t[0] in ("none", "opt", "any"):
            return True, None, ""
        return False, None, "no response frame (None) where the type is not optional"
    try:
        v = unpack_strict(fr[2])
    except Exception as exc:
        return False, None, "response frame is not one msgpack document: %r" % exc
    r = conforms(v, t)
    if r:
        return False, v, r
    return True, v, ""


def expect_none(fr, what):
    """Reply None: LMCache's server sends [uid, op] and no response frame."""
    return check(fr is not None and len(fr) == 2, "%s -> None (no response frame)" % what,
                 "got %s" % frames_hx(fr))


def expect_c0(fr, what):
    """A nil response frame (March None, or an answer valid in both dialects)."""
    return check(fr is not None and len(fr) == 3 and fr[2] == b"\xc0", "%s -> nil (c0 frame)" % what,
                 "got %s" % frames_hx(fr))


def expect_value(fr, t, what, want=NOWANT, raw=None):
    """A response frame that msgspec decodes as t (and equal to want, types included)."""
    if not check(fr is not None and len(fr) == 3, "%s: reply has exactly one response frame" % what,
                 "got %s" % frames_hx(fr)):
        return None
    ok, v, why = decode_reply(fr, t)
    if not check(ok, "%s: response decodes strictly as the declared type" % what,
                 "%s (frame %s)" % (why, hx(fr[2]))):
        return None
    if want is not NOWANT:
        check(same(v, want), "%s == %r" % (what, want), "got %r (%s)" % (v, hx(fr[2])))
    if raw is not None:
        check(fr[2] == raw, "%s: response bytes %s" % (what, hx(raw)), "got %s" % hx(fr[2]))
    return v


def expect_xfer(fr, what, want_ok):
    """STORE/RETRIEVE: tuple[bytes, bool], exactly [b'', ok] on the host path."""
    want = b"\x92\xc4\x00" + (b"\xc3" if want_ok else b"\xc2")
    v = expect_value(fr, TUPLE(BYTES, BOOL), what)
    if v is None:
        return False
    return check(fr[2] == want, "%s -> %s (%s)" % (what, "[b'', True]" if want_ok else "[b'', False]", hx(want)),
                 "got %r (%s)" % (v, hx(fr[2])))


# ---------------------------------------------------------------- client


class Client(object):
    """One DEALER socket, no identity, LMCache's MessageQueueClient framing."""

    def __init__(self, ctx, endpoint):
        self.s = ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(endpoint)
        self.uid = 0
        self.stash = {}

    def close(self):
        self.s.close(0)

    def send(self, op, args=(), raw_uid=None, raw_op=None):
        if raw_uid is None:
            raw_uid = pk(self.uid)
            self.uid += 1
        if raw_op is None:
            raw_op = pk(op)
        self.s.send_multipart([raw_uid, raw_op] + [pk(a) for a in args])
        return raw_uid

    def recv_any(self, timeout_ms=RECV_TIMEOUT_MS):
        if self.s.poll(timeout_ms, zmq.POLLIN):
            return self.s.recv_multipart()
        return None

    def recv_for(self, raw_uid, timeout_ms=RECV_TIMEOUT_MS):
        if raw_uid in self.stash:
            return self.stash.pop(raw_uid)
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                raise TimeoutError("no reply for uid %s" % hx(raw_uid))
            fr = self.recv_any(left)
            if fr is None:
                raise TimeoutError("no reply for uid %s" % hx(raw_uid))
            if fr[0] == raw_uid:
                return fr
            self.stash[fr[0]] = fr

    def call(self, op, args=(), raw_uid=None, raw_op=None):
        """Send and wait for the reply with this uid; the op frame must be echoed
        byte for byte (counted as a check, printed only when it fails)."""
        want_op = raw_op if raw_op is not None else pk(op)
        u = self.send(op, args, raw_uid=raw_uid, raw_op=raw_op)
        try:
            fr = self.recv_for(u)
        except TimeoutError:
            check(False, "op %r uid %s answered within %d ms" % (op, hx(u), RECV_TIMEOUT_MS))
            return None
        if len(fr) < 2 or fr[1] != want_op:
            check(False, "reply to uid %s echoes op frame %s" % (hx(u), hx(want_op)), "got %s" % frames_hx(fr))
        else:
            count_check()
        return fr

    def quiet(self, ms=QUIET_MS):
        """Collect whatever arrives within ms (expected: nothing)."""
        got = []
        deadline = time.monotonic() + ms / 1000.0
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                break
            fr = self.recv_any(left)
            if fr is None:
                break
            got.append(fr)
        return got


def expect_dropped(cli, op, args, what):
    """The request gets no reply at all within QUIET_MS."""
    cli.send(op, args)
    stray = cli.quiet(QUIET_MS)
    return check(not stray, "%s: no reply within %d ms (dropped)" % (what, QUIET_MS),
                 "got %s" % [frames_hx(f) for f in stray])


# ---------------------------------------------------------------- keys


def ckey(model, ws, worker, tokens, start, end, req, salt="", readers=1, mask=None, configs=None):
    """IPCCacheServerKey as msgspec encodes it: a map of all 11 fields in declaration order."""
    return dict([("model_name", model), ("world_size", ws), ("worker_id", worker),
                 ("token_ids", list(tokens)), ("start", start), ("end", end), ("request_id", req),
                 ("cache_salt", salt), ("request_configs", configs), ("num_kv_readers", readers),
                 ("null_chunk_mask", mask)])


def mkey(model, ws, worker, tokens, start, end, req):
    """The March IPCCacheEngineKey: 7-entry map in declaration order."""
    return dict([("model_name", model), ("world_size", ws), ("worker_id", worker),
                 ("token_ids", list(tokens)), ("start", start), ("end", end), ("request_id", req)])


def new_instance_id():
    """What the vLLM adapter uses now: uuid4().int & (2**63-1) (goes out as cf uint64)."""
    while True:
        v = uuid.uuid4().int & (2 ** 63 - 1)
        if v >= 2 ** 32:
            return v


# ---------------------------------------------------------------- LMCache wrapper pickles
#
# CpuShmTensorWrapper as LMCache defines it (lmcache/v1/platform/devices/cpu/
# shm.py): a DeviceIPCWrapper subclass with no __reduce__/__getstate__, so
# pickle.dumps gives STACK_GLOBAL(module, class) EMPTY_TUPLE NEWOBJ {state}
# BUILD; torch dtypes pickle as the global torch.<name>. Stand-ins with the
# same module paths and __dict__ produce the same bytes; they are registered
# in sys.modules only so that pickle can name them (nothing is imported).

_SHM_MODULE = "lmcache.v1.platform.devices.cpu.shm"
_BASE_MODULE = "lmcache.v1.platform.base.ipc_wrapper"


class _TorchDtype(object):
    __module__ = "torch"

    def __init__(self, name):
        self._n = name

    def __reduce__(self):
        return self._n


class PlatformBase(object):
    pass


class DeviceIPCWrapper(PlatformBase):
    pass


class CpuShmTensorWrapper(DeviceIPCWrapper):
    SHM_NAME_PREFIX = "/lmcache_kv_"


def _install_standins():
    def mod(name):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
        return sys.modules[name]

    torch = mod("torch")
    for n in ELEM:
        setattr(torch, n, _TorchDtype(n))
    for n in ("lmcache", "lmcache.v1", "lmcache.v1.platform", "lmcache.v1.platform.base",
              "lmcache.v1.platform.devices", "lmcache.v1.platform.devices.cpu"):
        mod(n)
    for cls, m in ((PlatformBase, "lmcache.v1.platform.base._base"), (DeviceIPCWrapper, _BASE_MODULE),
                   (CpuShmTensorWrapper, _SHM_MODULE)):
        cls.__module__ = m
        setattr(mod(m), cls.__name__, cls)


_install_standins()


def cpu_shm_wrapper_ext(shm_name, nbytes, dtype, shape, stride, storage_offset):
    """msgpack ext 1 holding pickle.dumps(CpuShmTensorWrapper) (protocol 4, Python <= 3.13)."""
    w = CpuShmTensorWrapper.__new__(CpuShmTensorWrapper)
    # __dict__ in LMCache's __init__ order
    w.shm_name = shm_name
    w.nbytes = nbytes
    w.handle = None
    w.dtype = getattr(sys.modules["torch"], dtype)
    w.shape = tuple(shape)
    w.stride = tuple(stride)
    w.storage_offset = storage_offset
    w.device_uuid = "cpu"
    return msgpack.ExtType(1, pickle.dumps(w, protocol=4))


# ---------------------------------------------------------------- KV buffers

CREATED_SHM = []  # /dev/shm paths to unlink at the end
_SHM_SEQ = [0]


class KV(object):
    """NL paged KV layers of one layout. backing "lmcache": POSIX shm segments
    registered as CpuShmTensorWrapper ext-1 pickles (current dialect), per_seg
    layers per segment (sibling views at storage_offset = k * numel);
    backing "memfd": memfds registered with native host_shm descriptors
    (March dialect, protocol.md §5.2). groups: the KV cache groups (lists of
    layer indices), default one group of every layer."""

    def __init__(self, iid, model, ws, layout, dtype, NL, NB, BS, NH=1, HS=8, per_seg=2,
                 groups=None, backing="lmcache", tail_pad=0):
        self.iid, self.model, self.ws = iid, model, ws
        self.layout, self.dtype = layout, dtype
        self.NL, self.NB, self.BS, self.NH, self.HS = NL, NB, BS, NH, HS
        self.esz = ELEM[dtype]
        self.march = backing == "memfd"
        if layout == "flash_attn":
            shape = [2, NB, BS, NH, HS]
        elif layout == "flashinfer":
            shape = [NB, 2, BS, NH, HS]
        elif layout == "mla":
            shape = [NB, BS, HS]
        else:
            raise ValueError(layout)
        self.K = 1 if layout == "mla" else 2
        self.hidden = HS if layout == "mla" else NH * HS
        self.shape = shape
        stride = [0] * len(shape)
        acc = 1
        for i in range(len(shape) - 1, -1, -1):
            stride[i] = acc
            acc *= shape[i]
        self.stride = stride
        self.numel = acc
        self.layer_bytes = acc * self.esz
        self.segs = []  # [name or path, fd, mmap]
        self.loc = []  # per layer: (segment index, storage_offset in elements)
        for first in range(0, NL, per_seg):
            n = min(per_seg, NL - first)
            size = n * self.layer_bytes + tail_pad
            if self.march:
                fd = os.memfd_create("kvstash-wirecur-%d-%d" % (iid, first))
                name = "/proc/%d/fd/%d" % (os.getpid(), fd)
            else:
                _SHM_SEQ[0] += 1
                name = "/lmcache_kv_%d_%d" % (os.getpid(), _SHM_SEQ[0])
                path = "/dev/shm" + name
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                CREATED_SHM.append(path)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.segs.append([name, fd, mm])
            for j in range(n):
                self.loc.append((len(self.segs) - 1, j * self.numel))
        self.groups = [list(g) for g in groups] if groups is not None else [list(range(NL))]
        self.group_of = {}
        for g, ls in enumerate(self.groups):
            for l in ls:
                self.group_of[l] = g
        self.xfer_layers = sorted(self.group_of)
        self.randomize()

    # -- registration payloads

    def wrappers(self):
        out = []
        for l in range(self.NL):
            s, off = self.loc[l]
            name, _, mm = self.segs[s]
            out.append(cpu_shm_wrapper_ext(name, len(mm), self.dtype, self.shape, self.stride, off))
        return out

    def descriptors(self):
        out = []
        for l in range(self.NL):
            s, off = self.loc[l]
            path, _, mm = self.segs[s]
            out.append({"kind": "host_shm", "layout": self.layout, "shape": self.shape, "stride": self.stride,
                        "dtype": self.dtype, "offset": off * self.esz, "nbytes": len(mm), "path": path})
        return out

    def group_infos(self, extra_fields=False):
        out = []
        for g, ls in enumerate(self.groups):
            d = dict([("engine_group_id", g), ("layer_indices", list(ls)), ("tokens_per_block", self.BS),
                      ("sw_size_tokens", -1), ("extra_object_group_tag", 0), ("recurrent_state", False)])
            if extra_fields:  # the V4.1 fields newer clients also send (unknown keys are ignored)
                d.update([("tokens_per_state", 1), ("cache_role", "sparse"), ("state_content_bytes", 0),
                          ("block_stride_alignment", 0), ("is_index_group_leader", False),
                          ("prefix_cacheable", True), ("page_size_padded", 0), ("num_head_slots", 0)])
            out.append(d)
        return out

    def register_args(self, hints=None, extra_fields=False):
        return [self.iid, self.wrappers(), self.model, self.ws, "vllm", {} if hints is None else hints,
                self.group_infos(extra_fields)]

    def register(self, cli, hints=None, nil_hints=False, extra_fields=False, what=None):
        if self.march:
            fr = cli.call(MARCH.REGISTER_KV_CACHE, [self.iid, self.descriptors(), self.model, self.ws])
            return expect_c0(fr, what or "March REGISTER_KV_CACHE id=%d %s" % (self.iid, self.layout))
        args = self.register_args(hints, extra_fields)
        if nil_hints:
            args[5] = None
        fr = cli.call(REGISTER_KV_CACHE, args)
        return expect_none(fr, what or "REGISTER_KV_CACHE %s/%s NL=%d groups=%s id=%d (7 frames)" %
                           (self.layout, self.dtype, self.NL, self.groups, self.iid))

    # -- bytes

    def randomize(self):
        for seg in self.segs:
            seg[2][:] = os.urandom(len(seg[2]))

    def snapshot(self):
        return [bytearray(seg[2][:]) for seg in self.segs]

    def row_off(self, l, k, slot):
        """(segment, byte offset) of the hidden-sized row of (layer, k, slot) (§7)."""
        s, off = self.loc[l]
        b, t = slot // self.BS, slot % self.BS
        if self.layout == "flash_attn":
            idx = (k, b, t, 0, 0)
        elif self.layout == "flashinfer":
            idx = (b, k, t, 0, 0)
        else:
            idx = (b, t, 0)
        return s, (off + sum(i * st for i, st in zip(idx, self.stride))) * self.esz

    def read_row(self, l, k, slot, bufs=None):
        s, o = self.row_off(l, k, slot)
        buf = self.segs[s][2] if bufs is None else bufs[s]
        return bytes(buf[o:o + self.hidden * self.esz])

    def write_row(self, bufs, l, k, slot, data):
        s, o = self.row_off(l, k, slot)
        bufs[s][o:o + len(data)] = data

    def blocks_of(self, blocks, l):
        return blocks if self.march else blocks[self.group_of[l]]

    def close(self):
        for seg in self.segs:
            seg[2].close()
            os.close(seg[1])
        self.segs = []


def pick_blocks(rng, reg, ntokens):
    """Block ids covering ntokens: one list per group (current) or a flat list (March)."""
    n = ntokens // reg.BS
    if reg.march:
        return rng.sample(range(reg.NB), n)
    return [rng.sample(range(reg.NB), n) for _ in reg.groups]


def rand_tokens(rng, n):
    t = [rng.randrange(0, 2 ** 32) for _ in range(n)]
    if n > 3:
        t[1], t[2] = 2 ** 32 - 1, 0
    return t


# TRUTH[(model, world_size, worker, salt, tuple(tokens[:(i+1)*C]))] = {(layer, k, t_in_chunk): bytes}
TRUTH = {}
_TRUTH_LOCK = threading.Lock()


def do_store(cli, reg, tokens, start, end, worker, blocks, what, req="r-store", salt="", mask=None,
             event=b"", want_ok=True):
    """STORE [start,end) from reg's paged slots; record the first-writer bytes per chunk."""
    if reg.march:
        fr = cli.call(MARCH.STORE, [mkey(reg.model, reg.ws, worker, tokens, start, end, req), reg.iid, blocks, b""])
    else:
        key = ckey(reg.model, reg.ws, worker, tokens, start, end, req, salt=salt, mask=mask)
        fr = cli.call(STORE, [key, reg.iid, blocks, event])
    ok = expect_xfer(fr, what, want_ok)
    if ok and want_ok:
        for i in range(start // C, end // C):
            rel = i - start // C
            if mask is not None and any(m[rel] for m in mask if rel < len(m)):
                continue  # null chunk: not stored
            tk = (reg.model, reg.ws, worker, salt, tuple(tokens[:(i + 1) * C]))
            with _TRUTH_LOCK:
                if tk in TRUTH:
                    continue  # already present: the server keeps the first copy
            d = {}
            for tc in range(C):
                trel = rel * C + tc
                for l in reg.xfer_layers:
                    slot = slot_of(reg.blocks_of(blocks, l), reg.BS, trel)
                    for k in range(reg.K):
                        d[(l, k, tc)] = reg.read_row(l, k, slot)
            with _TRUTH_LOCK:
                TRUTH.setdefault(tk, d)
    return ok


def do_retrieve(cli, reg, tokens, start, end, worker, blocks, skip, what, want_ok=True, req="r-retr",
                salt="", event=b""):
    """RETRIEVE and verify every byte of reg's buffers (§3 skip rule, §7 mapping): the
    chunks' tokens land in the given blocks of every grouped layer; skipped tokens,
    layers in no group and every other byte stay untouched."""
    before = reg.snapshot()
    if reg.march:
        fr = cli.call(MARCH.RETRIEVE, [mkey(reg.model, reg.ws, worker, tokens, start, end, req), reg.iid,
                                       blocks, b"", skip])
    else:
        key = ckey(reg.model, reg.ws, worker, tokens, start, end, req, salt=salt)
        fr = cli.call(RETRIEVE, [key, reg.iid, blocks, event, skip])
    if not expect_xfer(fr, what, want_ok):
        return False
    expected = [bytearray(b) for b in before]
    written = 0
    if want_ok:
        for i in range((end - start) // C):
            if skip >= (i + 1) * C:
                continue
            sk = min(max(skip - i * C, 0), C - 1)
            tk = (reg.model, reg.ws, worker, salt, tuple(tokens[:(start // C + i + 1) * C]))
            with _TRUTH_LOCK:
                src = TRUTH[tk]
            for tc in range(sk, C):
                trel = i * C + tc
                for l in reg.xfer_layers:
                    slot = slot_of(reg.blocks_of(blocks, l), reg.BS, trel)
                    for k in range(reg.K):
                        reg.write_row(expected, l, k, slot, src[(l, k, tc)])
                written += 1
    after = reg.snapshot()
    same_bytes = all(a == e for a, e in zip(after, expected))
    detail = ""
    if not same_bytes:
        for s, (a, e) in enumerate(zip(after, expected)):
            if a != e:
                first = next(i for i in range(len(a)) if a[i] != e[i])
                detail = "segment %d first differs at byte %d (got %s want %s); %s" % (
                    s, first, hx(bytes(a[first:first + 8])), hx(bytes(e[first:first + 8])),
                    "untouched region was written" if e[first] == before[s][first]
                    else "slot not written / wrong data")
                break
    check(same_bytes, "%s: bytes == expected (%d tokens written; skipped, ungrouped, other bytes untouched)"
          % (what, written), detail)
    return same_bytes


# ---------------------------------------------------------------- server


def wait_ready(srv, ctx):
    """KS_STATS (neutral in both dialects) until answered."""
    cli = Client(ctx, srv.endpoint)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                return False
            u = cli.send(KS_STATS)
            fr = cli.recv_any(200)
            while fr is not None:
                if fr[0] == u:
                    return True
                fr = cli.recv_any(50)
        return False
    finally:
        cli.close()


STATS_T = MAP(STR, INT)


def stats(cli, what="KS_STATS"):
    fr = cli.call(KS_STATS)
    v = expect_value(fr, STATS_T, what)
    if v is None:
        return {}
    check(all(x >= 0 for x in v.values()), "%s: every counter is a uint" % what)
    return v


# ---------------------------------------------------------------- sections


def sec_init(cli):
    print("--- worker init as the vLLM adapter does it: get_chunk_size, get_experimental")
    s = cli.s
    s.send_multipart([b"\x00", b"\x15"])  # uid 0 (first of a MessageQueueClient), op 21
    fr = cli.recv_for(b"\x00")
    check(fr == [b"\x00", b"\x15", b"\xcd\x01\x00"], "GET_CHUNK_SIZE uid 0: [00][15] -> [00][15][cd 01 00]",
          frames_hx(fr))
    expect_value(fr, INT, "GET_CHUNK_SIZE", 256)
    cli.uid = 1
    expect_value(cli.call(GET_EXPERIMENTAL), LIST(STR), "GET_EXPERIMENTAL", [], raw=b"\x90")
    expect_value(cli.call(NOOP), STR, "NOOP", "OK", raw=b"\xa2OK")
    expect_value(cli.call(GET_CHUNK_SIZE), INT, "GET_CHUNK_SIZE (2nd)", 256)


def sec_ping(cli, iid):
    print("--- PING")
    fr = cli.call(PING, [iid])
    check(fr is not None and len(fr) == 3 and pk(iid)[0] == 0xcf, "PING instance_id sent as cf uint64",
          hx(pk(iid)))
    expect_value(fr, BOOL, "PING [instance_id]", True, raw=b"\xc3")
    expect_value(cli.call(PING, [None]), BOOL, "PING [nil] (scheduler)", True, raw=b"\xc3")


def lookup(cli, key, tp, what):
    return expect_none(cli.call(LOOKUP, [key, tp]), "%s: LOOKUP" % what)


def query(cli, rid, what, want):
    return expect_value(cli.call(QUERY_PREFETCH_STATUS, [rid]), OPT(INT), "%s: QUERY_PREFETCH_STATUS(%s)" % (what, rid),
                        want)


def lookup_chunks(cli, model, ws, tokens, end, rid, what, want, salt="", tp=1):
    """LOOKUP [0,end) then QUERY (exactly once), then FREE_LOOKUP_LOCKS."""
    key = ckey(model, ws, None, tokens, 0, end, rid, salt=salt)
    lookup(cli, key, tp, what)
    v = query(cli, rid, what, want)
    query(cli, rid, what + " again (consumed)", 0)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [key, tp]), "%s: FREE_LOOKUP_LOCKS" % what)
    return v


def sec_xfer(cli, rng, A, B, M1, M2):
    print("--- STORE/RETRIEVE: flash_attn (2 layers per segment) -> flashinfer, skip rule, stub event, mla")
    T = rand_tokens(rng, 512 + 37)  # trailing partial chunk is ignored
    do_store(cli, A, T, 0, 512, 0, pick_blocks(rng, A, 512), "STORE flash_attn/bf16 2 chunks, event b''")
    A.randomize()  # the object holds the data now
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE flashinfer/bf16 BS32 skip=0")
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 100, "RETRIEVE flashinfer skip=100")
    do_retrieve(cli, A, T, 0, 512, 0, pick_blocks(rng, A, 512), 300,
                "RETRIEVE flash_attn skip=300 (chunk 0 whole-skipped)")
    do_retrieve(cli, A, T, 0, 512, 0, pick_blocks(rng, A, 512), 512, "RETRIEVE flash_attn skip=512 (nothing written)")
    do_retrieve(cli, B, T, 256, 512, 0, pick_blocks(rng, B, 256), 0, "RETRIEVE range [256,512) only")
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 7, "RETRIEVE with the CPU stub event",
                event=CPU_STUB_EVENT)

    T2 = rand_tokens(rng, 768)
    do_store(cli, A, T2, 0, 768, 0, pick_blocks(rng, A, 768), "STORE 3 chunks with the CPU stub event (15 bytes)",
             event=CPU_STUB_EVENT)
    do_retrieve(cli, B, T2, 0, 768, 0, pick_blocks(rng, B, 768), 0, "RETRIEVE of the stub-event STORE")

    T3 = T[:256] + rand_tokens(rng, 256)
    do_retrieve(cli, B, T3, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE with chunk 1 missing", want_ok=False)

    TM = rand_tokens(rng, 512)
    do_store(cli, M1, TM, 0, 512, 0, pick_blocks(rng, M1, 512), "STORE mla/bf16")
    do_retrieve(cli, M2, TM, 0, 512, 0, pick_blocks(rng, M2, 512), 0, "RETRIEVE mla/bf16 BS32")
    do_retrieve(cli, M2, TM, 0, 512, 0, pick_blocks(rng, M2, 512), 270, "RETRIEVE mla skip=270")
    return T, T2


def sec_groups(cli, rng, G1, G2, X1, X2):
    print("--- KV cache groups: 2 groups (layers [0,2] / [1,3]), and a layer in no group")
    T = rand_tokens(rng, 512)
    b1 = pick_blocks(rng, G1, 512)
    check(b1[0] != b1[1], "2-group STORE uses different block ids per group (sanity)")
    do_store(cli, G1, T, 0, 512, 0, b1, "STORE 2 groups, block_ids [[g0], [g1]]")
    G1.randomize()
    do_retrieve(cli, G2, T, 0, 512, 0, pick_blocks(rng, G2, 512), 0, "RETRIEVE 2 groups into flashinfer instance")
    do_retrieve(cli, G2, T, 0, 512, 0, pick_blocks(rng, G2, 512), 300, "RETRIEVE 2 groups skip=300")
    do_retrieve(cli, G1, T, 0, 512, 0, pick_blocks(rng, G1, 512), 0, "RETRIEVE 2 groups into the storing instance")

    TX = rand_tokens(rng, 768)
    do_store(cli, X1, TX, 0, 768, 0, pick_blocks(rng, X1, 768), "STORE with layer 1 in no group")
    X1.randomize()
    do_retrieve(cli, X2, TX, 0, 768, 0, pick_blocks(rng, X2, 768), 0,
                "RETRIEVE with layer 1 in no group (its bytes untouched)")
    do_retrieve(cli, X1, TX, 0, 768, 0, pick_blocks(rng, X1, 768), 33,
                "RETRIEVE into the storing instance, layer 1 untouched, skip=33")


def sec_mask(cli, rng, A, B, G1, G2):
    print("--- null_chunk_mask: a chunk null in any group is not stored")
    T = rand_tokens(rng, 768)
    do_store(cli, A, T, 0, 768, 0, pick_blocks(rng, A, 768), "STORE 3 chunks, mask [[F,T,F]]",
             mask=[[False, True, False]], req="mask1")
    lookup_chunks(cli, A.model, A.ws, T, 768, "mask1-l", "masked chunk 1", 1)
    do_retrieve(cli, B, T, 0, 256, 0, pick_blocks(rng, B, 256), 0, "RETRIEVE [0,256) (chunk 0 stored)")
    do_retrieve(cli, B, T, 256, 512, 0, pick_blocks(rng, B, 256), 0, "RETRIEVE [256,512) (null chunk)",
                want_ok=False)
    do_retrieve(cli, B, T, 0, 768, 0, pick_blocks(rng, B, 768), 0, "RETRIEVE [0,768) (includes the null chunk)",
                want_ok=False)
    do_retrieve(cli, B, T, 512, 768, 0, pick_blocks(rng, B, 256), 0, "RETRIEVE [512,768) (chunk 2 stored)")

    T2 = rand_tokens(rng, 512)
    do_store(cli, G1, T2, 0, 512, 0, pick_blocks(rng, G1, 512), "STORE 2 groups, mask [[F,F],[F,T]]",
             mask=[[False, False], [False, True]], req="mask2")
    lookup_chunks(cli, G1.model, G1.ws, T2, 512, "mask2-l", "chunk 1 null in group 1 only", 1)
    do_retrieve(cli, G2, T2, 256, 512, 0, pick_blocks(rng, G2, 256), 0, "RETRIEVE the chunk null in group 1",
                want_ok=False)
    do_retrieve(cli, G2, T2, 0, 256, 0, pick_blocks(rng, G2, 256), 0, "RETRIEVE chunk 0 (not null)")
    T3 = rand_tokens(rng, 512)
    do_store(cli, A, T3, 0, 512, 0, pick_blocks(rng, A, 512), "STORE mask all false [[F,F]]",
             mask=[[False, False]], req="mask3")
    lookup_chunks(cli, A.model, A.ws, T3, 512, "mask3-l", "mask all false", 2)


def sec_salt(cli, rng, A, B):
    print("--- cache_salt is part of the cache identity")
    T = rand_tokens(rng, 512)
    do_store(cli, A, T, 0, 512, 0, pick_blocks(rng, A, 512), "STORE with cache_salt 'a'", salt="a")
    lookup_chunks(cli, A.model, A.ws, T, 512, "salt-b", "LOOKUP salt 'b'", 0, salt="b")
    lookup_chunks(cli, A.model, A.ws, T, 512, "salt-0", "LOOKUP salt ''", 0, salt="")
    lookup_chunks(cli, A.model, A.ws, T, 512, "salt-a", "LOOKUP salt 'a'", 2, salt="a")
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE salt 'b'", want_ok=False, salt="b")
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE salt ''", want_ok=False, salt="")
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE salt 'a'", salt="a")


def sec_lookup(cli, st, rng, A, B, T, T2):
    print("--- LOOKUP (None) / QUERY / WAIT / HITS / FREE_LOOKUP_LOCKS, num_kv_readers")
    M, WS = A.model, A.ws
    lookup_chunks(cli, M, WS, T2, 768, "lk1", "3 chunks stored", 3)
    lookup_chunks(cli, M, WS, T2, 512, "lk2", "3 stored, key.end 512", 2)
    lookup_chunks(cli, M, WS, T2 + [7, 8, 9], 768, "lk3", "trailing partial tokens", 3)
    div = T2[:300] + [T2[300] ^ 5] + T2[301:]
    lookup_chunks(cli, M, WS, div, 768, "lk4", "diverges in chunk 1", 1)
    lookup_chunks(cli, "no-such-model", 1, T2, 768, "lk5", "unregistered model", 0)
    query(cli, "never-looked-up", "unknown request id", 0)
    expect_value(cli.call(QUERY_PREFETCH_LOOKUP_HITS, ["never-looked-up"]), OPT(INT), "HITS unknown request id", 0)
    expect_value(cli.call(WAIT_PREFETCH_STATUS, ["never-looked-up", 0.2]), OPT(INT), "WAIT unknown request id", 0)

    k = ckey(M, WS, None, T2, 0, 768, "lk-hits")
    lookup(cli, k, 1, "HITS")
    expect_value(cli.call(QUERY_PREFETCH_LOOKUP_HITS, ["lk-hits"]), OPT(INT), "QUERY_PREFETCH_LOOKUP_HITS (1st)", 3)
    expect_value(cli.call(QUERY_PREFETCH_LOOKUP_HITS, ["lk-hits"]), OPT(INT), "QUERY_PREFETCH_LOOKUP_HITS (2nd)", 3)
    query(cli, "lk-hits", "after HITS (not consumed)", 3)
    query(cli, "lk-hits", "second QUERY", 0)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [k, 1]), "FREE_LOOKUP_LOCKS lk-hits")

    k = ckey(M, WS, None, T2, 0, 768, "lk-wait")
    lookup(cli, k, 1, "WAIT")
    expect_value(cli.call(WAIT_PREFETCH_STATUS, ["lk-wait", 1.0]), OPT(INT), "WAIT_PREFETCH_STATUS(lk-wait, 1.0)", 3)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [k, 1]), "FREE_LOOKUP_LOCKS lk-wait")

    # num_kv_readers N: N read locks per object; FREE releases them
    s0 = stats(st).get("read_locks")
    k3 = ckey(M, WS, None, T, 0, 512, "nkr3", readers=3)
    lookup(cli, k3, 1, "num_kv_readers 3")
    s1 = stats(st).get("read_locks")
    check(s0 is not None and s1 == s0 + 3 * 2, "LOOKUP num_kv_readers 3 over 2 chunks: read_locks +6",
          "before %r after %r" % (s0, s1))
    query(cli, "nkr3", "num_kv_readers 3", 2)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [k3, 1]), "FREE_LOOKUP_LOCKS num_kv_readers 3")
    s2 = stats(st).get("read_locks")
    check(s2 == s0, "FREE_LOOKUP_LOCKS releases the 3 locks per object", "before %r after %r" % (s0, s2))
    k2 = ckey(M, WS, None, T, 0, 512, "nkr2", readers=2)
    lookup(cli, k2, 1, "num_kv_readers 2")
    query(cli, "nkr2", "num_kv_readers 2", 2)
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE after LOOKUP num_kv_readers 2",
                req="nkr2")
    s3 = stats(st).get("read_locks")
    check(s3 == s0 + 2, "RETRIEVE consumed one of the 2 read locks per object", "before %r after %r" % (s0, s3))
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [ckey(M, WS, None, T, 0, 512, "nkr2", readers=1), 1]),
                "FREE_LOOKUP_LOCKS the rest (num_kv_readers 1)")
    s4 = stats(st).get("read_locks")
    check(s4 == s0, "read_locks back to where they were", "before %r after %r" % (s0, s4))

    # num_kv_readers 0 for a registered model with full chunks: refused like LMCache (no reply)
    expect_dropped(cli, LOOKUP, [ckey(M, WS, None, T, 0, 512, "nkr0", readers=0), 1],
                   "LOOKUP with num_kv_readers 0")
    expect_value(cli.call(PING, [None]), BOOL, "PING after the refused LOOKUP", True)
    query(cli, "nkr0", "refused LOOKUP registered no job", 0)
    s5 = stats(st).get("read_locks")
    check(s5 == s0, "refused LOOKUP took no locks", "before %r after %r" % (s0, s5))


def sec_small_ops(cli, A):
    print("--- END_SESSION, REPORT_BLOCK_ALLOCATION")
    expect_none(cli.call(END_SESSION, ["lk1"]), "END_SESSION [request_id] (lineage B)")
    expect_none(cli.call(END_SESSION, ["lk2", {"finish_reason": "stop", "stop_token_id": 2}]),
                "END_SESSION [request_id, end_info] (lineage A)")
    expect_none(cli.call(END_SESSION, ["no-such-session"]), "END_SESSION unknown request_id")
    recs = [{"req_id": "rb-1", "new_block_ids": [1, 2, 3], "new_token_ids": [10, 11, 12]},
            {"req_id": "rb-2", "new_block_ids": [], "new_token_ids": []}]
    expect_none(cli.call(REPORT_BLOCK_ALLOCATION, [os.getpid(), A.model, recs]), "REPORT_BLOCK_ALLOCATION")
    expect_none(cli.call(REPORT_BLOCK_ALLOCATION, [A.iid, A.model, []]), "REPORT_BLOCK_ALLOCATION (no records)")


def sec_unsupported(cli, st, A):
    print("--- operations kvstash does not implement: typed refusals / None")
    key = ckey(A.model, A.ws, 0, list(range(256)), 0, 256, "unsup")
    other = new_instance_id()
    ed_err = STRUCT(("shm_name", STR, False), ("pool_size", INT, False), ("scratch_offset", INT, False),
                    ("scratch_size", INT, False), ("error", OPT(STR), False))
    cb_lookup = OPT(STRUCT(("prefix_coverage_tokens", INT, True), ("non_prefix_segments", LIST(ANY), True),
                           ("segmented_prefix_segments", LIST(ANY), True)))
    ed_payload = {"instance_id": other, "model_name": A.model, "world_size": 1, "engine_type": "vllm",
                  "layout_hints": {}, "engine_group_infos": A.group_infos()}
    cases = [
        (REGISTER_Q_CACHE, A.register_args()[:1] + [A.wrappers(), A.model, 1, "vllm", {}, A.group_infos()],
         "register_q_cache", NONE, None),
        (UNREGISTER_Q_CACHE, [other], "unregister_q_cache", NONE, None),
        (STORE_Q, [key, A.iid, [list(range(16))], b""], "store_q", TUPLE(BYTES, BOOL), [b"", False]),
        (REGISTER_KV_CACHE_ENGINE_DRIVEN_CONTEXT, [ed_payload], "register_kv_cache_engine_driven_context", ed_err,
         "ed"),
        (UNREGISTER_KV_CACHE_ENGINE_DRIVEN_CONTEXT, [other], "unregister_kv_cache_engine_driven_context", NONE, None),
        (PREPARE_STORE, [key, A.iid], "prepare_store", STRUCT(("context", MAP(ANY, ANY), True)), {"context": {}}),
        (COMMIT_STORE, [key, A.iid, b"\x00" * 16], "commit_store", BOOL, False),
        (PREPARE_RETRIEVE, [key, A.iid], "prepare_retrieve",
         STRUCT(("success", BOOL, True), ("data", BYTES, False), ("context", MAP(ANY, ANY), True)),
         {"success": False, "data": b"", "context": {}}),
        (COMMIT_RETRIEVE, [key, A.iid], "commit_retrieve", BOOL, False),
        (CB_REGISTER_ROPE, [A.iid, [], 64, True, [0], [[0]], [64]], "cb_register_rope", NONE, None),
        (CB_UNREGISTER_ROPE, [A.iid], "cb_unregister_rope", NONE, None),
        (CB_RETRIEVE_PRE_COMPUTED, [key, [], [list(range(16))], A.iid, b""], "cb_retrieve_pre_computed",
         TUPLE(BYTES, BOOL), [b"", False]),
        (CB_UNIFIED_LOOKUP, [key, 1], "cb_unified_lookup (a result, not None = 'loading')", cb_lookup,
         {"prefix_coverage_tokens": 0, "non_prefix_segments": [], "segmented_prefix_segments": []}),
        (P2P_LOOKUP_AND_LOCK, [[], {}], "p2p_lookup_and_lock", INT, 0),
        (P2P_QUERY_LOOKUP_RESULTS, [7], "p2p_query_lookup_results", OPT(LIST(ANY)), []),
        (P2P_UNLOCK_OBJECTS, [[]], "p2p_unlock_objects", NONE, None),
        (CB_PROTOCOL_HANDSHAKE, [1], "cb_protocol_handshake", TUPLE(INT, BOOL), [0, False]),
        (POLL_KV_EVENTS, [A.model, 0, 16], "poll_kv_events", NONE, None),
        ("store_with_chunk_events", [key, A.iid, [list(range(16))], b""], "unknown str op store_with_chunk_events",
         NONE, None),
    ]
    u0 = stats(st).get("unsupported_ops")
    for op, args, name, t, want in cases:
        what = "op %r %s (%d frames)" % (op, name, len(args))
        fr = cli.call(op, args)
        if fr is None:
            continue
        if t is NONE:
            expect_none(fr, what)
        elif want == "ed":
            v = expect_value(fr, t, what)
            if v is not None:
                check(same(v.get("shm_name"), "") and same(v.get("pool_size"), 0) and
                      same(v.get("scratch_offset"), 0) and same(v.get("scratch_size"), 0),
                      "%s: shm_name '' and pool_size/scratch_offset/scratch_size 0" % what, repr(v))
                check(type(v.get("error")) is str and v.get("error") != "", "%s: error is a non-empty str" % what,
                      repr(v.get("error")))
        else:
            expect_value(fr, t, what, want)
    u1 = stats(st).get("unsupported_ops")
    check(u0 is not None and u1 == u0 + len(cases), "KS_STATS unsupported_ops counted %d requests" % len(cases),
          "before %r after %r" % (u0, u1))
    expect_value(cli.call(PING, [A.iid]), BOOL, "PING after the unsupported ops", True)


def sec_echo(cli):
    print("--- uid/op frames echoed byte for byte")
    cases = [
        (b"\xcc\x80", b"\x15", GET_CHUNK_SIZE, [], INT, 256, "uid cc 80"),
        (b"\xcd\x01\x00", b"\xcc\x15", GET_CHUNK_SIZE, [], INT, 256, "uid cd 0100, op cc 15"),
        (b"\xce\x00\x01\x00\x00", b"\xcd\x00\x18", NOOP, [], STR, "OK", "uid ce, op cd 00 18"),
        (b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00", b"\x16", PING, [None], BOOL, True, "uid cf"),
        (b"\x05", b"\xd0\x20", GET_EXPERIMENTAL, [], LIST(STR), [], "op d0 20 (int8)"),
    ]
    for ru, ro, op, args, t, want, what in cases:
        fr = cli.call(op, args, raw_uid=ru, raw_op=ro)
        if fr is None:
            continue
        check(fr[0] == ru and fr[1] == ro, "%s: uid/op echoed" % what, frames_hx(fr))
        expect_value(fr, t, what, want)
    ro = pk("store_with_chunk_events")
    fr = cli.call("store_with_chunk_events", [], raw_uid=b"\x06", raw_op=ro)
    if fr is not None:
        check(fr[:2] == [b"\x06", ro], "str op frame echoed byte for byte (%s)" % hx(ro), frames_hx(fr))
        expect_none(fr, "unknown str op with 0 frames")


def march_worker(ctx, endpoint, seed, out, barrier, iters):
    rng = random.Random(seed)
    mc = Client(ctx, endpoint)
    out["mc"] = mc
    R1 = KV(101, "wcur-march", 1, "flash_attn", "bfloat16", NL=2, NB=48, BS=16, NH=2, HS=8, per_seg=2,
            backing="memfd")
    R2 = KV(102, "wcur-march", 1, "flashinfer", "bfloat16", NL=2, NB=32, BS=32, NH=2, HS=8, per_seg=1,
            backing="memfd")
    out["regs"] = [R1, R2]
    try:
        barrier.wait(10)
        expect_value(mc.call(MARCH.GET_CHUNK_SIZE), INT, "[march] GET_CHUNK_SIZE (11, no args)", 256,
                     raw=b"\xcd\x01\x00")
        R1.register(mc)
        R2.register(mc)
        for it in range(iters):
            T = rand_tokens(rng, 512)
            do_store(mc, R1, T, 0, 512, 0, pick_blocks(rng, R1, 512), "[march] STORE #%d" % it, req="m%d" % it)
            do_retrieve(mc, R2, T, 0, 512, 0, pick_blocks(rng, R2, 512), (it * 97) % 512,
                        "[march] RETRIEVE #%d skip=%d" % (it, (it * 97) % 512), req="m%d" % it)
            k = mkey(R1.model, 1, None, T, 0, 0, "m%d" % it)
            job = expect_value(mc.call(MARCH.LOOKUP, [k, 1]), INT, "[march] LOOKUP #%d -> int job id" % it)
            if job is not None:
                expect_value(mc.call(MARCH.QUERY_PREFETCH_STATUS, [job]), OPT(INT),
                             "[march] QUERY_PREFETCH_STATUS #%d" % it, 2)
            expect_c0(mc.call(MARCH.FREE_LOOKUP_LOCKS, [mkey(R1.model, 1, None, T, 0, 512, "m%d" % it), 1]),
                      "[march] FREE_LOOKUP_LOCKS #%d" % it)
            expect_value(mc.call(MARCH.PING), BOOL, "[march] PING #%d" % it, True, raw=b"\xc3")
            expect_value(mc.call(MARCH.NOOP), STR, "[march] NOOP #%d" % it, "OK")
            expect_c0(mc.call(MARCH.END_SESSION, ["m%d" % it]), "[march] END_SESSION #%d" % it)
    except Exception:
        traceback.print_exc()
        check(False, "[march] client thread ran without exception")


def sec_concurrent(ctx, srv, cli, rng, A, B):
    print("--- a March client and the current client on one endpoint, concurrently")
    out = {}
    barrier = threading.Barrier(2)
    iters = 6
    th = threading.Thread(target=march_worker, args=(ctx, srv.endpoint, 4242, out, barrier, iters))
    th.start()
    try:
        barrier.wait(10)
        for it in range(iters):
            T = rand_tokens(rng, 512)
            do_store(cli, A, T, 0, 512, 0, pick_blocks(rng, A, 512), "[current] STORE #%d" % it, req="c%d" % it)
            do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), (it * 61) % 512,
                        "[current] RETRIEVE #%d skip=%d" % (it, (it * 61) % 512), req="c%d" % it)
            lookup_chunks(cli, A.model, A.ws, T, 512, "c%d" % it, "[current] #%d" % it, 2)
            expect_value(cli.call(PING, [A.iid]), BOOL, "[current] PING #%d" % it, True, raw=b"\xc3")
            expect_value(cli.call(GET_CHUNK_SIZE), INT, "[current] GET_CHUNK_SIZE #%d" % it, 256)
            expect_none(cli.call(END_SESSION, ["c%d" % it]), "[current] END_SESSION #%d" % it)
    finally:
        th.join(60)
    check(not th.is_alive(), "March client thread finished")
    return out


def sec_dialects(ctx, srv, cli, st, mc, rng, A):
    print("--- dialect latching: ambiguous ids, neutral requests, never switching")
    T = rand_tokens(rng, 512)
    do_store(cli, A, T, 0, 512, 0, pick_blocks(rng, A, 512), "STORE for the dialect checks", req="dl")
    # op 8 [key, tp]: March FREE_LOOKUP_LOCKS vs current LOOKUP
    expect_c0(mc.call(8, [mkey("wcur-march", 1, None, T, 0, 512, "amb"), 1]),
              "March connection: op 8 [key, tp] = FREE_LOOKUP_LOCKS")
    expect_c0(mc.call(8, [ckey("wcur-march", 1, None, T, 0, 512, "amb"), 1]),
              "March connection: op 8 with an 11-field key is still FREE_LOOKUP_LOCKS")
    expect_none(cli.call(8, [ckey(A.model, A.ws, None, T, 0, 512, "amb-c"), 1]),
                "current connection: op 8 [key, tp] = LOOKUP")
    # op 9 [str]: March END_SESSION vs current QUERY_PREFETCH_STATUS
    expect_c0(mc.call(9, ["amb-c"]), "March connection: op 9 [str] = END_SESSION")
    expect_value(cli.call(9, ["amb-c"]), OPT(INT), "current connection: op 9 [str] = QUERY_PREFETCH_STATUS", 2)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [ckey(A.model, A.ws, None, T, 0, 512, "amb-c"), 1]),
                "current: FREE_LOOKUP_LOCKS amb-c")
    # a March-latched connection never takes current ids
    expect_dropped(mc, GET_EXPERIMENTAL, [], "March connection: op 32")
    expect_dropped(mc, GET_CHUNK_SIZE, [], "March connection: op 21")
    expect_value(mc.call(MARCH.PING), BOOL, "March connection still answers PING (12)", True)

    s0 = stats(st, "KS_STATS before fresh connections")
    F0 = Client(ctx, srv.endpoint)
    F1 = Client(ctx, srv.endpoint)
    F2 = Client(ctx, srv.endpoint)
    F3 = Client(ctx, srv.endpoint)
    F4 = Client(ctx, srv.endpoint)
    F5 = Client(ctx, srv.endpoint)
    try:
        def delta(s, key):
            return s.get(key, -10 ** 9) - s0.get(key, 0)

        expect_c0(F0.call(9, ["amb-x"]), "fresh connection: op 9 [str] -> nil (valid in both)")
        s1 = stats(st)
        check(delta(s1, "connections_unlatched") == 1 and delta(s1, "connections_march") == 0 and
              delta(s1, "connections_current") == 0, "op 9 [str] left the fresh connection unlatched",
              "deltas unlatched %d march %d current %d" % (delta(s1, "connections_unlatched"),
                                                          delta(s1, "connections_march"),
                                                          delta(s1, "connections_current")))
        expect_value(F0.call(GET_CHUNK_SIZE), INT, "then op 21 -> 256 (latches current)", 256)
        s2 = stats(st)
        check(delta(s2, "connections_current") == 1 and delta(s2, "connections_unlatched") == 0,
              "KS_STATS: connection latched current",
              "deltas unlatched %d current %d" % (delta(s2, "connections_unlatched"), delta(s2, "connections_current")))

        expect_c0(F1.call(UNREGISTER_KV_CACHE, [new_instance_id()]), "fresh connection: op 2 unknown id -> nil")
        s3 = stats(st)
        check(delta(s3, "connections_unlatched") == 1, "op 2 does not latch",
              "unlatched delta %d" % delta(s3, "connections_unlatched"))
        expect_c0(F1.call(UNREGISTER_KV_CACHE, [new_instance_id()]), "neutral op 2 again -> nil")
        expect_value(F1.call(MARCH.GET_CHUNK_SIZE), INT, "then op 11 with 0 args -> 256 (latches March)", 256)
        s4 = stats(st)
        check(delta(s4, "connections_march") == 1 and delta(s4, "connections_unlatched") == 0,
              "KS_STATS: connection latched March",
              "deltas unlatched %d march %d" % (delta(s4, "connections_unlatched"), delta(s4, "connections_march")))
        expect_value(F1.call(MARCH.PING), BOOL, "March-latched: PING (12, no args)", True, raw=b"\xc3")
        expect_c0(F1.call(9, ["x"]), "March-latched: op 9 [str] = END_SESSION")

        expect_c0(F2.call(UNREGISTER_KV_CACHE, [new_instance_id()]), "fresh connection: op 2 -> nil")
        expect_value(F2.call(GET_EXPERIMENTAL), LIST(STR), "then op 32 -> [] (latches current)", [])
        s5 = stats(st)
        check(delta(s5, "connections_current") == 2 and delta(s5, "connections_march") == 1 and
              delta(s5, "connections_unlatched") == 0, "KS_STATS: the op-2 connection latched current",
              "deltas %r" % {k: delta(s5, k) for k in ("connections_march", "connections_current",
                                                        "connections_unlatched")})

        # latched current never switches to March
        expect_value(F3.call(GET_EXPERIMENTAL), LIST(STR), "fresh connection: op 32 -> [] (latches current)", [])
        expect_dropped(F3, MARCH.PING, [], "current-latched: op 12 with 0 args (March PING)")
        expect_dropped(F3, MARCH.GET_CHUNK_SIZE, [], "current-latched: op 11 with 0 args (March GET_CHUNK_SIZE)")
        expect_dropped(F3, MARCH.QUERY_PREFETCH_STATUS, [0], "current-latched: op 6 [int] (March QUERY)")
        expect_value(F3.call(GET_CHUNK_SIZE), INT, "current-latched still answers op 21", 256)
        expect_value(F3.call(9, ["amb-unknown"]), OPT(INT), "current-latched: op 9 [str] = QUERY -> 0", 0)

        # op 8 on a fresh connection: the key tells the dialect
        expect_c0(F4.call(8, [mkey("wcur-march", 1, None, T, 0, 512, "f4"), 1]),
                  "fresh connection: op 8 with a March key = FREE_LOOKUP_LOCKS")
        expect_value(F4.call(MARCH.GET_CHUNK_SIZE), INT, "... and it latched March (op 11, no args)", 256)
        expect_none(F5.call(8, [ckey(A.model, A.ws, None, T, 0, 512, "f5"), 1]),
                    "fresh connection: op 8 with an 11-field key = LOOKUP")
        expect_value(F5.call(9, ["f5"]), OPT(INT), "... and it latched current (op 9 = QUERY)", 2)
        expect_none(F5.call(FREE_LOOKUP_LOCKS, [ckey(A.model, A.ws, None, T, 0, 512, "f5"), 1]),
                    "FREE_LOOKUP_LOCKS f5")
        s6 = stats(st, "KS_STATS after fresh connections")
        check(delta(s6, "connections_current") == 4 and delta(s6, "connections_march") == 2 and
              delta(s6, "connections_unlatched") == 0, "KS_STATS: 4 current + 2 March new, none unlatched",
              "deltas %r" % {k: delta(s6, k) for k in ("connections_march", "connections_current",
                                                        "connections_unlatched")})
        check(s6.get("connections_march", 0) >= 3 and s6.get("connections_current", 0) >= 5 and
              s6.get("connections_unlatched", 0) >= 1, "KS_STATS connection gauges plausible", repr(s6))
    finally:
        for f in (F0, F1, F2, F3, F4, F5):
            f.close()


def sec_clear(cli, rng, A, B, T):
    print("--- CLEAR (0 frames, [false], [true])")
    lookup_chunks(cli, A.model, A.ws, T, 512, "clr0", "before CLEAR", 2)
    expect_none(cli.call(CLEAR), "CLEAR (0 frames)")
    lookup_chunks(cli, A.model, A.ws, T, 512, "clr1", "after CLEAR", 0)
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE after CLEAR", want_ok=False)
    with _TRUTH_LOCK:
        TRUTH.clear()
    T2 = rand_tokens(rng, 512)
    do_store(cli, A, T2, 0, 512, 0, pick_blocks(rng, A, 512), "STORE after CLEAR")
    expect_none(cli.call(CLEAR, [False]), "CLEAR [false]")
    lookup_chunks(cli, A.model, A.ws, T2, 512, "clr2", "after CLEAR [false]", 0)
    do_store(cli, A, T2, 0, 512, 0, pick_blocks(rng, A, 512), "STORE after CLEAR [false]")
    lookup_chunks(cli, A.model, A.ws, T2, 512, "clr3", "stored again", 2)
    expect_none(cli.call(CLEAR, [True]), "CLEAR [true]")
    lookup_chunks(cli, A.model, A.ws, T2, 512, "clr4", "after CLEAR [true]", 0)
    with _TRUTH_LOCK:
        TRUTH.clear()
    do_store(cli, A, T2, 0, 512, 0, pick_blocks(rng, A, 512), "STORE after CLEAR [true]")
    do_retrieve(cli, B, T2, 0, 512, 0, pick_blocks(rng, B, 512), 0, "RETRIEVE after CLEAR + STORE")
    return T2


def sec_unregister(cli, regs, rng, A, B, T):
    print("--- UNREGISTER_KV_CACHE")
    for r in regs:
        expect_none(cli.call(UNREGISTER_KV_CACHE, [r.iid]), "UNREGISTER_KV_CACHE id=%d" % r.iid)
    expect_none(cli.call(UNREGISTER_KV_CACHE, [A.iid]), "UNREGISTER_KV_CACHE again (unknown now)")
    k = ckey(A.model, A.ws, 0, T, 0, 512, "un")
    expect_xfer(cli.call(STORE, [k, A.iid, pick_blocks(rng, A, 512), b""]), "STORE after UNREGISTER", False)
    expect_xfer(cli.call(STORE, [k, A.iid, pick_blocks(rng, A, 512), CPU_STUB_EVENT]),
                "STORE (stub event) after UNREGISTER", False)
    expect_xfer(cli.call(RETRIEVE, [k, B.iid, pick_blocks(rng, B, 512), b"", 0]), "RETRIEVE after UNREGISTER",
                False)
    expect_value(cli.call(PING, [None]), BOOL, "PING at end", True)


def sec_pinned(ctx, srv_cur, srv_mar):
    print("--- --protocol=current and --protocol=march")
    c = Client(ctx, srv_cur.endpoint)
    try:
        expect_dropped(c, MARCH.GET_CHUNK_SIZE, [], "--protocol=current: op 11 with 0 args")
        expect_value(c.call(GET_CHUNK_SIZE), INT, "--protocol=current: op 21", 256)
        expect_dropped(c, MARCH.PING, [], "--protocol=current: op 12 with 0 args")
        expect_none(c.call(UNREGISTER_KV_CACHE, [new_instance_id()]),
                    "--protocol=current: op 2 unknown id (None, current form)")
        expect_value(c.call(9, ["x"]), OPT(INT), "--protocol=current: op 9 [str] = QUERY", 0)
        expect_value(c.call(PING, [None]), BOOL, "--protocol=current: PING [nil]", True)
    finally:
        c.close()
    m = Client(ctx, srv_mar.endpoint)
    try:
        expect_dropped(m, GET_EXPERIMENTAL, [], "--protocol=march: op 32")
        expect_value(m.call(MARCH.GET_CHUNK_SIZE), INT, "--protocol=march: op 11", 256)
        expect_dropped(m, GET_CHUNK_SIZE, [], "--protocol=march: op 21")
        expect_c0(m.call(UNREGISTER_KV_CACHE, [new_instance_id()]), "--protocol=march: op 2 unknown id")
        expect_c0(m.call(9, ["x"]), "--protocol=march: op 9 [str] = END_SESSION")
        expect_value(m.call(MARCH.PING), BOOL, "--protocol=march: PING (12)", True)
    finally:
        m.close()


# ---------------------------------------------------------------- main


def main():
    t0 = time.monotonic()
    rng = random.Random(20260905)
    servers = []
    ctx = zmq.Context()
    regs = []
    clients = []
    crashed = False
    try:
        srv = Server("kvstash-wirecur-", "s.sock", ["--workers=2"])
        srv_cur = Server("kvstash-wirecur-", "s.sock", ["--workers=2", "--protocol=current"])
        srv_mar = Server("kvstash-wirecur-", "s.sock", ["--workers=2", "--protocol=march"])
        servers = [srv, srv_cur, srv_mar]
        for s in servers:
            if not check(wait_ready(s, ctx), "kvstashd %s starts and answers KS_STATS on %s" %
                         (" ".join(s.args) or "(auto)", s.endpoint), "log:\n" + s.tail()):
                return 1
        cli = Client(ctx, srv.endpoint)
        st = Client(ctx, srv.endpoint)  # only KS_STATS: stays unlatched
        clients += [cli, st]
        sec_init(cli)

        print("--- REGISTER_KV_CACHE (7 frames, CpuShmTensorWrapper ext-1 pickles)")
        A = KV(new_instance_id(), "wcur-model", 1, "flash_attn", "bfloat16", NL=4, NB=64, BS=16, NH=2, HS=8, per_seg=2)
        B = KV(new_instance_id(), "wcur-model", 1, "flashinfer", "bfloat16", NL=4, NB=48, BS=32, NH=2, HS=8,
               per_seg=1, tail_pad=4096)
        M1 = KV(new_instance_id(), "wcur-mla", 1, "mla", "bfloat16", NL=2, NB=48, BS=16, HS=32, per_seg=2)
        M2 = KV(new_instance_id(), "wcur-mla", 1, "mla", "bfloat16", NL=2, NB=40, BS=32, HS=32, per_seg=1)
        G1 = KV(new_instance_id(), "wcur-g2", 1, "flash_attn", "bfloat16", NL=4, NB=64, BS=16, NH=1, HS=8,
                per_seg=2, groups=[[0, 2], [1, 3]])
        G2 = KV(new_instance_id(), "wcur-g2", 1, "flashinfer", "bfloat16", NL=4, NB=40, BS=32, NH=1, HS=8,
                per_seg=1, groups=[[0, 2], [1, 3]])
        X1 = KV(new_instance_id(), "wcur-x", 1, "flash_attn", "float32", NL=3, NB=64, BS=16, NH=1, HS=4,
                per_seg=2, groups=[[0, 2]])
        X2 = KV(new_instance_id(), "wcur-x", 1, "flash_attn", "float32", NL=3, NB=40, BS=32, NH=1, HS=4,
                per_seg=3, groups=[[0, 2]])
        regs = [A, B, M1, M2, G1, G2, X1, X2]
        ext = A.wrappers()[1]
        check(ext.code == 1 and ext.data[:2] == b"\x80\x04" and b"CpuShmTensorWrapper" in ext.data and
              pk(ext)[0] == 0xc7, "wrapper travels as ext8 type 1 holding a protocol-4 pickle (%d bytes)"
              % len(ext.data), hx(pk(ext)[:8]))
        A.register(cli)
        B.register(cli, nil_hints=True, extra_fields=True,
                   what="REGISTER_KV_CACHE flashinfer, layout_hints nil, V4.1 EngineGroupInfo fields")
        M1.register(cli, hints={"kv_layout": "NHD", "num_kv_heads": 1, "tokens_per_block": 16, "head_dim": 32})
        M2.register(cli)
        G1.register(cli)
        G2.register(cli)
        X1.register(cli)
        X2.register(cli)
        A.register(cli, what="REGISTER_KV_CACHE id=A again (replace)")
        sec_ping(cli, A.iid)

        T, T2 = sec_xfer(cli, rng, A, B, M1, M2)
        sec_groups(cli, rng, G1, G2, X1, X2)
        sec_mask(cli, rng, A, B, G1, G2)
        sec_salt(cli, rng, A, B)
        sec_lookup(cli, st, rng, A, B, T, T2)
        sec_small_ops(cli, A)
        sec_unsupported(cli, st, A)
        sec_echo(cli)
        out = sec_concurrent(ctx, srv, cli, rng, A, B)
        regs += out.get("regs", [])
        if out.get("mc") is not None:
            clients.append(out["mc"])
            sec_dialects(ctx, srv, cli, st, out["mc"], rng, A)
        T3 = sec_clear(cli, rng, A, B, T)
        sec_unregister(cli, [r for r in regs if not r.march], rng, A, B, T3)
        if out.get("mc") is not None:
            for r in out.get("regs", []):
                expect_c0(out["mc"].call(MARCH.UNREGISTER_KV_CACHE, [r.iid]), "[march] UNREGISTER id=%d" % r.iid)
        sec_pinned(ctx, srv_cur, srv_mar)
    except Exception:
        crashed = True
        traceback.print_exc()
        check(False, "test ran to completion without exception")
    finally:
        for c in clients:
            c.close()
        ctx.term()
        for s in servers:
            alive = s.proc.poll() is None
            check(alive, "kvstashd %s still running before SIGTERM" % (" ".join(s.args) or "(auto)"),
                  "exit status %r" % s.proc.returncode)
            rc = s.stop()
            check(rc == 0, "kvstashd %s exits 0 on SIGTERM" % (" ".join(s.args) or "(auto)"), "got %r" % (rc,))
            if FAILS or crashed:
                print("---- kvstashd %s log tail ----" % (" ".join(s.args) or "(auto)"))
                print(s.tail())
            s.cleanup()
        for r in regs:
            r.close()
        for p in CREATED_SHM:
            try:
                os.unlink(p)
            except OSError:
                pass
    dt = time.monotonic() - t0
    print("%d checks, %d passed, %d failed, %.1f s" % (NCHECKS[0], NCHECKS[0] - len(FAILS), len(FAILS), dt))
    if FAILS:
        print("FAILED:")
        for f in FAILS:
            print("  - " + f)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
