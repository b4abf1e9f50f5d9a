#!/usr/bin/python3
# Description: kvstashd wire compatibility with LMCache's pinned MP client, written from protocol.md alone. Labels: unit
#
# Starts its own kvstashd ($KVSTASH_BUILD_DIR/kvstashd, default ./build) on an
# ipc:// endpoint and talks to it exactly like LMCache's pinned Python client:
# one DEALER socket, no identity, no empty delimiter, frames
# [uid, type, arg0, ...], each argument one msgpack document, keys as 7-entry
# maps in declaration order (plus the older 8-entry form with chunk_hash: nil
# and the array form). Replies are decoded strictly against the type the
# pinned client expects (PING -> True, STORE/RETRIEVE -> [bytes, bool], ints
# that are not bools, None present as a c0 frame).
#
# Host-memory KV caches are memfds registered with the native "host_shm"
# descriptor (protocol.md §5.2); the bytes moved by STORE/RETRIEVE are checked
# slot by slot against protocol.md §7, computed here in Python.
#
# Standard library + python3-zmq + python3-msgpack (apt) only.
# Exit: 0 pass, 1 fail, 77 skip (python3-zmq or python3-msgpack missing).

import mmap
import os
import random
import struct
import sys
import time
import traceback

try:
    import msgpack  # noqa: F401 (wirelib packs with it)
    import zmq
except ImportError as exc:  # pragma: no cover
    print("SKIP: python3-zmq / python3-msgpack not available (%s)" % exc)
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wirelib import Raw, Server, hx, pk, slot_of, unpack_strict  # noqa: E402

# ---------------------------------------------------------------- constants

# RequestType, pinned enum (protocol.md §3)
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
ELEM = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1,
        "float8_e5m2": 1, "uint8": 1, "int8": 1}
RECV_TIMEOUT_MS = 5000
QUIET_MS = 150  # how long "no reply" is awaited for a dropped request

# ---------------------------------------------------------------- reporting

FAILS = []
NCHECKS = [0]


def check(cond, what, detail=""):
    NCHECKS[0] += 1
    if cond:
        print("PASS: %s" % what)
    else:
        print("FAIL: %s%s" % (what, (" -- " + detail) if detail else ""))
        FAILS.append(what)
    sys.stdout.flush()
    return cond


# ---------------------------------------------------------------- keys


def key_map(model, ws, worker, tokens, start, end, req, chunk_hash=False,
            extra=None, reorder=False):
    """IPCCacheEngineKey as msgspec encodes it: a map in declaration order."""
    fields = [("model_name", model), ("world_size", ws), ("worker_id", worker),
              ("token_ids", list(tokens)), ("start", start), ("end", end),
              ("request_id", req)]
    if chunk_hash:
        fields.append(("chunk_hash", None))
    if extra:
        fields.extend(extra)
    if reorder:
        fields = list(reversed(fields))
    return dict(fields)


def key_array(model, ws, worker, tokens, start, end, req):
    return [model, ws, worker, list(tokens), start, end, req]


# ---------------------------------------------------------------- client


class Client(object):
    """One DEALER socket, no identity, the pinned client's framing."""

    def __init__(self, ctx, endpoint):
        self.s = ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(endpoint)
        self.uid = 0
        self.stash = {}  # uid frame bytes -> reply frames (out-of-order arrivals)

    def close(self):
        self.s.close(0)

    def next_uid(self):
        u = self.uid
        self.uid += 1
        return u

    def send(self, rtype, args=(), uid=None, raw_uid=None, raw_type=None):
        if raw_uid is None:
            raw_uid = pk(self.next_uid() if uid is None else uid)
        if raw_type is None:
            raw_type = pk(rtype)
        self.s.send_multipart([raw_uid, raw_type] + [pk(a) for a in args])
        return raw_uid

    def send_frames(self, frames):
        self.s.send_multipart(frames)

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

    def call(self, rtype, args=(), **kw):
        """Send, wait for the reply with this uid; the type frame must be echoed
        byte-for-byte (counted as a check, printed only when it fails)."""
        u = self.send(rtype, args, **kw)
        fr = self.recv_for(u)
        want_type = kw.get("raw_type") or pk(rtype)
        if len(fr) < 2 or fr[1] != want_type:
            check(False, "reply to uid %s echoes type frame %s" % (hx(u), hx(want_type)),
                  "got %s" % [hx(f) for f in fr])
        else:
            NCHECKS[0] += 1
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


# ---- strict reply decoding (what the pinned client's typed decode accepts)


def reply_payload(fr, what):
    """Reply [uid, type, response]; kvstash MUST send the response frame."""
    if not check(len(fr) == 3, "%s: reply has exactly 3 frames (response frame present)" % what,
                 "got %d frames %s" % (len(fr), [hx(f) for f in fr])):
        return None, False
    try:
        return unpack_strict(fr[2]), True
    except Exception as exc:
        check(False, "%s: response decodes as one msgpack document" % what, repr(exc))
        return None, False


def expect_none(fr, what):
    v, ok = reply_payload(fr, what)
    if ok:
        check(fr[2] == b"\xc0", "%s -> None (c0)" % what, "got %s" % hx(fr[2]))


def expect_int(fr, what, want=None):
    v, ok = reply_payload(fr, what)
    if not ok:
        return None
    if not check(type(v) is int, "%s -> int (not bool)" % what, "got %r (%s)" % (v, hx(fr[2]))):
        return None
    if want is not None:
        check(v == want, "%s == %r" % (what, want), "got %r" % v)
    return v


def expect_int_or_none(fr, what, want):
    """QUERY_* replies: int chunks or nil; want None means nil."""
    v, ok = reply_payload(fr, what)
    if not ok:
        return None
    if want is None:
        check(fr[2] == b"\xc0", "%s -> nil" % what, "got %r (%s)" % (v, hx(fr[2])))
    else:
        check(type(v) is int and v == want, "%s -> int %d" % (what, want),
              "got %r (%s)" % (v, hx(fr[2])))
    return v


def expect_ping(fr, what):
    v, ok = reply_payload(fr, what)
    if ok:
        check(v is True and fr[2] == b"\xc3", "%s -> True (c3)" % what, "got %s" % hx(fr[2]))


def expect_xfer(fr, what, want_ok):
    """STORE/RETRIEVE: exactly a 2-element array [bin, bool]; host event empty."""
    v, ok = reply_payload(fr, what)
    if not ok:
        return False
    good = (type(v) is list and len(v) == 2 and type(v[0]) is bytes and type(v[1]) is bool)
    if not check(good, "%s -> [bytes, bool]" % what, "got %r (%s)" % (v, hx(fr[2]))):
        return False
    want = b"\x92\xc4\x00" + (b"\xc3" if want_ok else b"\xc2")
    return check(fr[2] == want, "%s -> %s (%s)" % (what, "[b'', True]" if want_ok else "[b'', False]", hx(want)),
                 "got %s" % hx(fr[2]))


def expect_echo(fr, raw_uid, raw_type, what):
    check(fr[0] == raw_uid and fr[1] == raw_type,
          "%s: uid/type echoed byte-for-byte" % what,
          "sent [%s] [%s], got [%s] [%s]" % (hx(raw_uid), hx(raw_type), hx(fr[0]), hx(fr[1])))


# ---------------------------------------------------------------- KV buffers


class Reg(object):
    """A host_shm KV cache of NL layers in memfds (protocol.md §5.2)."""

    def __init__(self, iid, model, ws, layout, dtype, NL, NB, BS, NH=1, HS=8,
                 pad=0, per_layer_fd=False, omit_layout=False, base_off=512):
        self.iid, self.model, self.ws = iid, model, ws
        self.layout, self.dtype = layout, dtype
        self.NL, self.NB, self.BS, self.NH, self.HS = NL, NB, BS, NH, HS
        self.esz = ELEM[dtype]
        self.omit_layout = omit_layout
        if layout == "flash_attn":
            shape, bdim = [2, NB, BS, NH, HS], 1
        elif layout == "flashinfer":
            shape, bdim = [NB, 2, BS, NH, HS], 0
        elif layout == "mla":
            shape, bdim = [NB, BS, HS], 0
        else:
            raise ValueError(layout)
        self.K = 1 if layout == "mla" else 2
        self.shape = shape
        stride = [0] * len(shape)
        acc = 1
        for i in range(len(shape) - 1, -1, -1):
            stride[i] = acc
            acc = acc * shape[i] + (pad if i == bdim else 0)  # pad the block stride
        self.stride = stride
        extent = sum((shape[i] - 1) * stride[i] for i in range(len(shape))) + 1
        self.layer_bytes = extent * self.esz
        step = (self.layer_bytes + 4095) // 4096 * 4096
        self.fds, self.mms, self.paths, self.layer_loc = [], [], [], []
        nfd = NL if per_layer_fd else 1
        for f in range(nfd):
            size = base_off + (step if per_layer_fd else step * NL) + 4096
            fd = os.memfd_create("kvstash-wire-%d-%d" % (iid, f))
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.fds.append(fd)
            self.mms.append(mm)
            self.paths.append("/proc/%d/fd/%d" % (os.getpid(), fd))
        for l in range(NL):
            if per_layer_fd:
                self.layer_loc.append((l, base_off))
            else:
                self.layer_loc.append((0, base_off + l * step))
        self.randomize()

    def descriptors(self):
        out = []
        for l in range(self.NL):
            f, off = self.layer_loc[l]
            d = {"kind": "host_shm"}
            if not self.omit_layout:
                d["layout"] = self.layout
            d.update({"shape": self.shape, "stride": self.stride, "dtype": self.dtype,
                      "offset": off, "nbytes": len(self.mms[f]), "path": self.paths[f]})
            out.append(d)
        return out

    def randomize(self):
        for mm in self.mms:
            mm[:] = os.urandom(len(mm))

    def snapshot(self):
        return [bytearray(mm[:]) for mm in self.mms]

    def row_offsets(self, l, k, slot):
        """(fd index, byte offset) of each HS-element row of (layer, k, slot) (§7)."""
        f, off = self.layer_loc[l]
        b, s = slot // self.BS, slot % self.BS
        res = []
        for h in range(self.NH if self.layout != "mla" else 1):
            if self.layout == "flash_attn":
                idx = (k, b, s, h, 0)
            elif self.layout == "flashinfer":
                idx = (b, k, s, h, 0)
            else:
                idx = (b, s, 0)
            e = sum(i * st for i, st in zip(idx, self.stride))
            res.append((f, off + e * self.esz))
        return res

    def row_len(self):
        return self.HS * self.esz

    def read_token(self, l, k, slot, bufs=None):
        bufs = self.mms if bufs is None else bufs
        n = self.row_len()
        return b"".join(bytes(bufs[f][o:o + n]) for f, o in self.row_offsets(l, k, slot))

    def write_token(self, bufs, l, k, slot, data):
        n = self.row_len()
        for i, (f, o) in enumerate(self.row_offsets(l, k, slot)):
            bufs[f][o:o + n] = data[i * n:(i + 1) * n]

    def register(self, cli, hints=None, what=None):
        args = [self.iid, self.descriptors(), self.model, self.ws]
        if hints is not None:
            args.append(hints)
        fr = cli.call(REGISTER_KV_CACHE, args)
        expect_none(fr, what or "REGISTER_KV_CACHE %s/%s id=%d (%d frames)" %
                    (self.layout, self.dtype, self.iid, 2 + len(args)))

    def close(self):
        for mm in self.mms:
            mm.close()
        for fd in self.fds:
            os.close(fd)


# TRUTH[(model, worker, tuple(tokens[:(i+1)*C]))] = {(l, k, t_in_chunk): bytes}
TRUTH = {}


def do_store(cli, reg, tokens, start, end, worker, block_ids, what, req="r-store", key_fn=None):
    """STORE [start,end) from reg's paged slots; record the first-writer bytes."""
    key = (key_fn or key_map)(reg.model, reg.ws, worker, tokens, start, end, req)
    fr = cli.call(STORE, [key, reg.iid, block_ids, b""])
    ok = expect_xfer(fr, what, True)
    if ok:
        for i in range(start // C, end // C):
            tk = (reg.model, worker, tuple(tokens[:(i + 1) * C]))
            if tk in TRUTH:
                continue  # already present: the server skips it
            d = {}
            for tc in range(C):
                trel = i * C + tc - start
                slot = slot_of(block_ids, reg.BS, trel)
                for l in range(reg.NL):
                    for k in range(reg.K):
                        d[(l, k, tc)] = reg.read_token(l, k, slot)
            TRUTH[tk] = d
    return ok


def do_retrieve(cli, reg, tokens, start, end, worker, block_ids, skip, what,
                want_ok=True, req="r-retr"):
    """RETRIEVE and verify every byte of reg's memfds (§3 skip rule, §7 mapping)."""
    before = reg.snapshot()
    key = key_map(reg.model, reg.ws, worker, tokens, start, end, req)
    fr = cli.call(RETRIEVE, [key, reg.iid, block_ids, b"", skip])
    if not expect_xfer(fr, what, want_ok):
        return False
    expected = [bytearray(b) for b in before]
    written = 0
    if want_ok:
        for i in range((end - start) // C):
            if skip >= (i + 1) * C:
                continue
            sk = min(max(skip - i * C, 0), C - 1)
            tk = (reg.model, worker, tuple(tokens[:(start // C + i + 1) * C]))
            src = TRUTH[tk]
            for tc in range(sk, C):
                trel = i * C + tc
                slot = slot_of(block_ids, reg.BS, trel)
                for l in range(reg.NL):
                    for k in range(reg.K):
                        reg.write_token(expected, l, k, slot, src[(l, k, tc)])
                written += 1
    after = reg.snapshot()
    same = all(a == e for a, e in zip(after, expected))
    detail = ""
    if not same:
        for f, (a, e) in enumerate(zip(after, expected)):
            if a != e:
                first = next(i for i in range(len(a)) if a[i] != e[i])
                detail = "memfd %d first differs at byte %d (got %s want %s); %s" % (
                    f, first, hx(bytes(a[first:first + 8])), hx(bytes(e[first:first + 8])),
                    "untouched region was written" if e[first] == before[f][first]
                    else "slot not written / wrong data")
                break
    check(same, "%s: memfd bytes == expected (%d tokens written, skipped/other bytes untouched)"
          % (what, written), detail)
    return same


def rand_tokens(rng, n):
    # full uint32 range, including the extremes
    t = [rng.randrange(0, 2 ** 32) for _ in range(n)]
    if n > 3:
        t[1], t[2] = 2 ** 32 - 1, 0
    return t


def pick_blocks(rng, NB, n):
    return rng.sample(range(NB), n)


# ---------------------------------------------------------------- server


def wait_ready(srv, ctx):
    cli = Client(ctx, srv.endpoint)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                return False
            u = cli.send(PING, uid=900000)
            fr = cli.recv_any(200)
            if fr is not None and fr[0] == u:
                return True
        return False
    finally:
        cli.close()


# ---------------------------------------------------------------- sections

JOB = [0]  # next expected LOOKUP job id (sequential from 0, per server)


def lookup(cli, key, tp, what):
    fr = cli.call(LOOKUP, [key, tp])
    j = expect_int(fr, "%s: LOOKUP -> job id %d" % (what, JOB[0]), JOB[0])
    JOB[0] += 1
    return j


def lookup_chunks(cli, key, tp, what, want):
    """LOOKUP, then QUERY_PREFETCH_STATUS (consumes); returns the chunk count."""
    j = lookup(cli, key, tp, what)
    if j is None:
        return None
    fr = cli.call(QUERY_PREFETCH_STATUS, [j])
    v = expect_int_or_none(fr, "%s: QUERY_PREFETCH_STATUS(job %d)" % (what, j), want)
    fr = cli.call(FREE_LOOKUP_LOCKS, [key, tp])
    expect_none(fr, "%s: FREE_LOOKUP_LOCKS" % what)
    return v


def sec_worked_examples(cli):
    print("--- protocol.md §8 worked examples (byte-for-byte)")
    s = cli.s
    s.send_multipart([b"\x07", b"\x0c"])
    fr = cli.recv_for(b"\x07")
    check(fr == [b"\x07", b"\x0c", b"\xc3"], "PING uid 7: [07][0c] -> [07][0c][c3]", str([hx(f) for f in fr]))

    s.send_multipart([b"\x00", b"\x0b"])
    fr = cli.recv_for(b"\x00")
    check(fr == [b"\x00", b"\x0b", b"\xcd\x01\x00"], "GET_CHUNK_SIZE uid 0 -> [00][0b][cd 01 00]",
          str([hx(f) for f in fr]))
    expect_int(fr, "GET_CHUNK_SIZE", 256)

    s.send_multipart([b"\x01", b"\x0d"])
    fr = cli.recv_for(b"\x01")
    check(fr == [b"\x01", b"\x0d", b"\xa2\x4f\x4b"], "NOOP uid 1 -> [01][0d][a2 4f 4b]", str([hx(f) for f in fr]))
    v, ok = reply_payload(fr, "NOOP")
    check(ok and type(v) is str and v == "OK", "NOOP -> str 'OK'", repr(v))

    key_hex = ("87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
               " a9776f726b65725f6964 c0 a9746f6b656e5f696473 94 01 02 03 04"
               " a57374617274 00 a3656e64 04 aa726571756573745f6964 a172")
    kb = bytes.fromhex(key_hex.replace(" ", ""))
    mine = pk(key_map("m", 1, None, [1, 2, 3, 4], 0, 4, "r"))
    check(len(kb) == 77 and mine == kb, "test's key encoder == §8 77-byte LOOKUP key", hx(mine))
    s.send_multipart([b"\x02", b"\x05", kb, b"\x01"])
    fr = cli.recv_for(b"\x02")
    check(fr == [b"\x02", b"\x05", b"\x00"], "LOOKUP uid 2 (first LOOKUP of the server) -> [02][05][00] job 0",
          str([hx(f) for f in fr]))
    JOB[0] = 1
    s.send_multipart([b"\x03", b"\x06", b"\x00"])
    fr = cli.recv_for(b"\x03")
    check(fr == [b"\x03", b"\x06", b"\x00"], "QUERY_PREFETCH_STATUS uid 3 job 0 -> [03][06][00]",
          str([hx(f) for f in fr]))
    s.send_multipart([b"\x04", b"\x06", b"\x00"])
    fr = cli.recv_for(b"\x04")
    check(fr == [b"\x04", b"\x06", b"\xc0"], "QUERY_PREFETCH_STATUS again (uid 4) -> [04][06][c0]",
          str([hx(f) for f in fr]))

    s.send_multipart([b"\x05", b"\x02", b"\xcd\x30\x39"])
    fr = cli.recv_for(b"\x05")
    check(fr == [b"\x05", b"\x02", b"\xc0"], "UNREGISTER unknown id 12345 uid 5 -> [05][02][c0]",
          str([hx(f) for f in fr]))

    print("--- uid/type echo with non-minimal and unusual int encodings")
    cases = [
        (b"\xcd\x00\x07", b"\x0c", "uid cd 00 07"),
        (b"\xcc\x08", b"\xcc\x0c", "uid cc 08, type cc 0c"),
        (b"\xce\x00\x00\x00\x09", b"\xd0\x0c", "uid ce 00000009, type d0 0c"),
        (b"\xcf\x7f\xff\xff\xff\xff\xff\xff\xfe", b"\xcd\x00\x0c", "uid cf 7ffffffffffffffe, type cd 00 0c"),
        (b"\xd1\x00\x0a", b"\xd3\x00\x00\x00\x00\x00\x00\x00\x0c", "uid d1 00 0a, type d3 ..0c"),
    ]
    for ru, rt, what in cases:
        s.send_multipart([ru, rt])
        fr = cli.recv_for(ru)
        expect_echo(fr, ru, rt, "PING " + what)
        expect_ping(fr, "PING " + what)
    ru = b"\xcd\x00\x0b"
    s.send_multipart([ru, b"\xcc\x0b"])
    fr = cli.recv_for(ru)
    expect_echo(fr, ru, b"\xcc\x0b", "GET_CHUNK_SIZE uid cd 00 0b type cc 0b")
    expect_int(fr, "GET_CHUNK_SIZE (non-minimal type)", 256)


def sec_small(cli):
    print("--- small requests and PING forms")
    expect_ping(cli.call(PING), "PING (0 payload frames)")
    expect_ping(cli.call(PING, [42]), "PING with instance_id frame 42")
    expect_ping(cli.call(PING, [None]), "PING with nil frame")
    expect_ping(cli.call(PING, [2 ** 62 + 3]), "PING with 63-bit instance_id frame (cf)")
    expect_int(cli.call(GET_CHUNK_SIZE), "GET_CHUNK_SIZE", 256)
    fr = cli.call(NOOP)
    v, ok = reply_payload(fr, "NOOP")
    check(ok and v == "OK" and type(v) is str and fr[2] == b"\xa2OK", "NOOP -> 'OK'", hx(fr[2]))
    expect_none(cli.call(END_SESSION, ["no-such-session"]), "END_SESSION unknown request_id")
    expect_none(cli.call(UNREGISTER_KV_CACHE, [987654]), "UNREGISTER_KV_CACHE unknown id")
    expect_int_or_none(cli.call(QUERY_PREFETCH_STATUS, [99999]), "QUERY_PREFETCH_STATUS unknown job", None)
    expect_int_or_none(cli.call(QUERY_PREFETCH_LOOKUP_HITS, [99999]), "QUERY_PREFETCH_LOOKUP_HITS unknown job", None)


def sec_semantic_failures(cli, rng):
    print("--- semantic failures get well-formed replies")
    toks = rand_tokens(rng, 256)
    key = key_map("wc-model", 1, 0, toks, 0, 256, "r-x")
    expect_xfer(cli.call(STORE, [key, 777, list(range(16)), b""]), "STORE to unregistered instance 777", False)
    expect_xfer(cli.call(RETRIEVE, [key, 777, list(range(16)), b"", 0]), "RETRIEVE on unregistered instance 777", False)
    expect_ping(cli.call(PING), "PING after semantic failures")


def sec_bad_xfers(cli, rng, A, T):
    """Invalid STORE/RETRIEVE arguments. protocol.md does not say whether each
    of these is a frame-level fault (dropped) or a semantic failure
    ([b'', False]); either is accepted, but the reply (if any) must be
    well-formed, nothing may be written to the memfd, and the server keeps going."""
    print("--- invalid STORE/RETRIEVE arguments: dropped or [b'', False], memfd untouched")
    good = pick_blocks(rng, A.NB, 32)
    cases = [
        ("STORE worker_id nil", STORE, key_map(A.model, A.ws, None, T, 0, 512, "bx"), good),
        ("RETRIEVE worker_id nil", RETRIEVE, key_map(A.model, A.ws, None, T, 0, 512, "bx"), good),
        ("STORE start not chunk-aligned", STORE, key_map(A.model, A.ws, 0, T, 16, 512, "bx"), good),
        ("RETRIEVE end not chunk-aligned", RETRIEVE, key_map(A.model, A.ws, 0, T, 0, 300, "bx"), good),
        ("STORE end beyond token_ids", STORE, key_map(A.model, A.ws, 0, T[:300], 0, 512, "bx"), good),
        ("STORE too few block ids", STORE, key_map(A.model, A.ws, 0, T, 0, 512, "bx"), good[:31]),
        ("RETRIEVE too few block ids", RETRIEVE, key_map(A.model, A.ws, 0, T, 0, 512, "bx"), good[:20]),
        ("RETRIEVE block id == NB", RETRIEVE, key_map(A.model, A.ws, 0, T, 0, 512, "bx"), good[:31] + [A.NB]),
        ("RETRIEVE block id -1", RETRIEVE, key_map(A.model, A.ws, 0, T, 0, 512, "bx"), [-1] + good[1:]),
        ("RETRIEVE block id 2^40", RETRIEVE, key_map(A.model, A.ws, 0, T, 0, 512, "bx"), good[:31] + [2 ** 40]),
        ("STORE worker_id >= world_size", STORE, key_map(A.model, A.ws, 3, T, 0, 512, "bx"), good),
    ]
    for what, t, key, blocks in cases:
        before = A.snapshot()
        args = [key, A.iid, blocks, b""] + ([0] if t == RETRIEVE else [])
        u = cli.send(t, args)
        try:
            fr = cli.recv_for(u, 1000)
        except TimeoutError:
            fr = None
        if fr is None:
            check(True, "%s: dropped (no reply)" % what)
        else:
            check(len(fr) == 3 and fr[1] == pk(t) and fr[2] == b"\x92\xc4\x00\xc2",
                  "%s: reply is [b'', False]" % what, str([hx(f) for f in fr]))
        check(A.snapshot() == before, "%s: memfd untouched" % what)
        expect_ping(cli.call(PING), "PING after '%s'" % what)
    # nothing got stored by the rejected STOREs (T itself is stored; use fresh tokens)
    Tn = rand_tokens(rng, 512)
    k = key_map(A.model, A.ws, 0, Tn, 0, 512, "bx")
    cli.call(STORE, [dict(k, worker_id=None), A.iid, good, b""])
    cli.call(STORE, [k, A.iid, good[:5], b""])
    lookup_chunks(cli, key_map(A.model, A.ws, None, Tn, 0, 0, "bx"), 1, "rejected STOREs stored nothing", 0)


def sec_layouts(cli, rng, regs):
    print("--- STORE/RETRIEVE byte placement: flash_attn / flashinfer / mla, bfloat16 / uint8 / float32")
    A, B, M1, M2, U1, U2, F1 = regs
    # bf16 flash_attn (BS 16) -> flashinfer (BS 32, padded strides, one memfd per layer)
    T = rand_tokens(rng, 512 + 37)  # trailing partial chunk is ignored
    bA = pick_blocks(rng, A.NB, 512 // A.BS)
    do_store(cli, A, T, 0, 512, 0, bA, "STORE flash_attn/bf16 2 chunks (permuted blocks)")
    A.randomize()  # STORE data must already be in the object; source may change now
    bB = pick_blocks(rng, B.NB, 512 // B.BS)
    do_retrieve(cli, B, T, 0, 512, 0, bB, 0, "RETRIEVE flashinfer/bf16 BS32 padded skip=0")
    B.randomize()
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B.NB, 16), 100, "RETRIEVE flashinfer skip=100")
    do_retrieve(cli, A, T, 0, 512, 0, pick_blocks(rng, A.NB, 32), 300,
                "RETRIEVE flash_attn skip=300 (chunk 0 whole-skipped, 44 of chunk 1)")
    do_retrieve(cli, A, T, 0, 512, 0, pick_blocks(rng, A.NB, 32), 255, "RETRIEVE flash_attn skip=255")
    do_retrieve(cli, A, T, 0, 512, 0, pick_blocks(rng, A.NB, 32), 256, "RETRIEVE flash_attn skip=256")
    do_retrieve(cli, A, T, 0, 512, 0, pick_blocks(rng, A.NB, 32), 512, "RETRIEVE flash_attn skip=512 (nothing written)")
    do_retrieve(cli, B, T, 256, 512, 0, pick_blocks(rng, B.NB, 8), 0,
                "RETRIEVE range [256,512) only, block ids cover the range")

    # re-STORE of present keys: ok true, original data kept
    A.randomize()
    do_store(cli, A, T, 0, 512, 0, pick_blocks(rng, A.NB, 32), "STORE again (keys present) -> still ok")
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B.NB, 16), 0, "RETRIEVE after re-STORE returns first data")

    # STORE of a range not starting at 0: block ids cover only [512,768)
    T2 = T[:512] + rand_tokens(rng, 256)
    bA2 = pick_blocks(rng, A.NB, 256 // A.BS)
    do_store(cli, A, T2, 512, 768, 0, bA2, "STORE range [512,768) (block ids cover the range only)")
    do_retrieve(cli, B, T2, 0, 768, 0, pick_blocks(rng, B.NB, 24), 0,
                "RETRIEVE [0,768): chunks of two STOREs sharing a prefix")

    # missing key -> [b'', False], nothing written
    T3 = T[:256] + rand_tokens(rng, 256)
    do_retrieve(cli, B, T3, 0, 512, 0, pick_blocks(rng, B.NB, 16), 0,
                "RETRIEVE with chunk 1 missing", want_ok=False)

    # hash chain: same chunk-1 tokens under a different chunk 0 must not hit
    T4 = rand_tokens(rng, 256) + T[256:512]
    do_retrieve(cli, B, T4, 256, 512, 0, pick_blocks(rng, B.NB, 8), 0,
                "RETRIEVE chunk with equal tokens but different prefix (rolling hash)", want_ok=False)

    # MLA bf16; the retriever omits "layout" (inferred from 3 dims)
    TM = rand_tokens(rng, 512)
    do_store(cli, M1, TM, 0, 512, 0, pick_blocks(rng, M1.NB, 32), "STORE mla/bf16")
    do_retrieve(cli, M2, TM, 0, 512, 0, pick_blocks(rng, M2.NB, 16), 0,
                "RETRIEVE mla/bf16 (layout inferred, BS 32)")
    do_retrieve(cli, M2, TM, 0, 512, 0, pick_blocks(rng, M2.NB, 16), 270, "RETRIEVE mla skip=270")

    # uint8 (fp8 KV): flashinfer -> flash_attn, keys in array form and 8-entry map form
    TU = rand_tokens(rng, 256 * 3)
    do_store(cli, U1, TU, 0, 768, 0, pick_blocks(rng, U1.NB, 48), "STORE flashinfer/uint8 (key as array)",
             key_fn=key_array)
    do_retrieve(cli, U2, TU, 0, 768, 0, pick_blocks(rng, U2.NB, 48), 0, "RETRIEVE flash_attn/uint8")
    do_retrieve(cli, U2, TU, 0, 768, 0, pick_blocks(rng, U2.NB, 48), 513, "RETRIEVE flash_attn/uint8 skip=513")

    # float32, flash_attn, store then retrieve into the same registration
    TF = rand_tokens(rng, 256)
    do_store(cli, F1, TF, 0, 256, 0, pick_blocks(rng, F1.NB, 16), "STORE flash_attn/float32",
             key_fn=lambda *a: key_map(*a, chunk_hash=True))
    F1.randomize()
    do_retrieve(cli, F1, TF, 0, 256, 0, pick_blocks(rng, F1.NB, 16), 7, "RETRIEVE flash_attn/float32 skip=7")
    return T, T2


def sec_lookup(cli, rng, T, T2):
    print("--- LOOKUP / QUERY_PREFETCH_* / FREE_LOOKUP_LOCKS / END_SESSION, key forms, hash chain")
    M, WS = "wc-model", 1
    # T2 has 3 chunks stored (chunks 0,1 from T, chunk 2 from the range STORE)
    k = key_map(M, WS, None, T2, 0, 0, "sess-1")
    j = lookup(cli, k, 1, "T2 3 chunks")
    expect_int_or_none(cli.call(QUERY_PREFETCH_LOOKUP_HITS, [j]), "QUERY_PREFETCH_LOOKUP_HITS (1st)", 3)
    expect_int_or_none(cli.call(QUERY_PREFETCH_LOOKUP_HITS, [j]), "QUERY_PREFETCH_LOOKUP_HITS (2nd, not consumed)", 3)
    expect_int_or_none(cli.call(QUERY_PREFETCH_STATUS, [j]), "QUERY_PREFETCH_STATUS (consumes)", 3)
    expect_int_or_none(cli.call(QUERY_PREFETCH_STATUS, [j]), "QUERY_PREFETCH_STATUS again -> nil (exactly once)", None)
    expect_int_or_none(cli.call(QUERY_PREFETCH_LOOKUP_HITS, [j]), "QUERY_PREFETCH_LOOKUP_HITS after consume -> nil", None)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [key_map(M, WS, None, T2, 0, 768, "sess-1"), 1]),
                "FREE_LOOKUP_LOCKS [0,768)")

    # the same request_id with different tokens must not reuse cached hashes
    div2 = T2[:512] + [(x + 1) % 2 ** 32 for x in T2[512:768]]
    lookup_chunks(cli, key_map(M, WS, None, div2, 0, 0, "sess-1"), 1,
                  "diverges in chunk 2 (same request_id)", 2)
    div0 = [(T2[0] + 1) % 2 ** 32] + T2[1:768]
    lookup_chunks(cli, key_map(M, WS, None, div0, 0, 0, "sess-1"), 1, "diverges in chunk 0", 0)
    div1 = T2[:300] + [(T2[300] ^ 5)] + T2[301:768]
    lookup_chunks(cli, key_map(M, WS, None, div1, 0, 0, "sess-1"), 1, "diverges in chunk 1 (token 300)", 1)
    lookup_chunks(cli, key_map(M, WS, None, T2 + [1, 2, 3], 0, 5, "sess-1"), 1,
                  "trailing partial chunk ignored, start/end ignored", 3)
    lookup_chunks(cli, key_map(M, WS, None, T2[:767], 0, 0, "sess-2"), 1, "767 tokens -> 2 full chunks", 2)
    expect_none(cli.call(END_SESSION, ["sess-1"]), "END_SESSION sess-1")
    lookup_chunks(cli, key_map(M, WS, None, T2, 0, 0, "sess-1"), 1, "after END_SESSION", 3)

    # key forms
    lookup_chunks(cli, key_map(M, WS, None, T2, 0, 0, "f8", chunk_hash=True), 1,
                  "8-entry key map with chunk_hash nil", 3)
    lookup_chunks(cli, key_array(M, WS, None, T2, 0, 0, "fa"), 1, "key in array form", 3)
    lookup_chunks(cli, key_map(M, WS, None, T2, 0, 0, "fr", reorder=True), 1, "key map in reversed order", 3)
    lookup_chunks(cli, key_map(M, WS, None, T2, 0, 0, "fx", extra=[("cache_salt", ""), ("zz_unknown", [1])]), 1,
                  "key map with unknown extra keys", 3)
    # non-minimal int encodings inside payloads
    kraw = pk(key_map(M, WS, None, T2, 0, 0, "fw"))
    fr = cli.call(LOOKUP, [Raw(kraw), Raw(b"\xcd\x00\x01")])
    j = expect_int(fr, "LOOKUP with tp_size cd 00 01 -> job %d" % JOB[0], JOB[0])
    JOB[0] += 1
    expect_int_or_none(cli.call(QUERY_PREFETCH_STATUS, [Raw(b"\xce" + struct.pack(">I", j))]),
                       "QUERY_PREFETCH_STATUS with job id as ce uint32", 3)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [key_map(M, WS, None, T2, 0, 768, "fw"), 1]), "FREE_LOOKUP_LOCKS")
    # unregistered (model, world_size) -> 0 hits
    lookup_chunks(cli, key_map("no-such-model", 1, None, T2, 0, 0, "nm"), 1, "unregistered model", 0)
    lookup_chunks(cli, key_map(M, 4, None, T2, 0, 0, "nw"), 1, "registered model, other world_size", 0)


def sec_world2(cli, rng, R0, R1):
    print("--- world_size 2: ranks 0 and 1, LOOKUP worker_id nil")
    T = rand_tokens(rng, 512)
    do_store(cli, R0, T, 0, 512, 0, pick_blocks(rng, R0.NB, 32), "STORE rank 0 (ws 2)")
    do_store(cli, R1, T, 0, 512, 1, pick_blocks(rng, R1.NB, 32), "STORE rank 1 (ws 2)")
    lookup_chunks(cli, key_map("wc-tp2", 2, None, T, 0, 0, "w2a"), 2, "ws2 both ranks stored", 2)
    lookup_chunks(cli, key_map("wc-tp2", 2, None, T, 0, 0, "w2a"), 1, "ws2 both ranks, tp_size 1", 2)
    # each rank gets its own object back
    R0.randomize()
    R1.randomize()
    do_retrieve(cli, R1, T, 0, 512, 1, pick_blocks(rng, R1.NB, 32), 0, "RETRIEVE rank 1 gets rank-1 data")
    do_retrieve(cli, R0, T, 0, 512, 0, pick_blocks(rng, R0.NB, 32), 0, "RETRIEVE rank 0 gets rank-0 data")
    d0 = TRUTH[("wc-tp2", 0, tuple(T[:256]))][(0, 0, 0)]
    d1 = TRUTH[("wc-tp2", 1, tuple(T[:256]))][(0, 0, 0)]
    check(d0 != d1, "ranks stored distinct data (sanity)")

    Tb = rand_tokens(rng, 512)
    do_store(cli, R0, Tb, 0, 512, 0, pick_blocks(rng, R0.NB, 32), "STORE rank 0 only")
    lookup_chunks(cli, key_map("wc-tp2", 2, None, Tb, 0, 0, "w2b"), 2, "ws2 only rank 0 stored", 0)
    do_retrieve(cli, R1, Tb, 0, 512, 1, pick_blocks(rng, R1.NB, 32), 0, "RETRIEVE rank 1 (not stored)",
                want_ok=False)
    do_store(cli, R1, Tb, 0, 256, 1, pick_blocks(rng, R1.NB, 16), "STORE rank 1 chunk 0 only")
    lookup_chunks(cli, key_map("wc-tp2", 2, None, Tb, 0, 0, "w2b"), 2,
                  "ws2 rank0 2 chunks + rank1 1 chunk -> 3 keys // 2", 1)


def sec_multiplex(cli, ctx, endpoint, rng, A, T):
    print("--- multiplexed / out-of-order requests matched by uid")
    reqs = []
    bl = pick_blocks(rng, A.NB, 32)
    kk = key_map(A.model, A.ws, 0, T, 0, 512, "mx")
    reqs.append((cli.send(RETRIEVE, [kk, A.iid, bl, b"", 0], uid=500), RETRIEVE, "xfer_ok"))
    reqs.append((cli.send(PING, uid=501), PING, "ping"))
    reqs.append((cli.send(GET_CHUNK_SIZE, uid=502), GET_CHUNK_SIZE, "cs"))
    reqs.append((cli.send(LOOKUP, [key_map(A.model, A.ws, None, T, 0, 0, "mx"), 1], uid=503), LOOKUP, "job"))
    reqs.append((cli.send(NOOP, uid=504), NOOP, "noop"))
    reqs.append((cli.send(UNREGISTER_KV_CACHE, [31337], uid=505), UNREGISTER_KV_CACHE, "none"))
    reqs.append((cli.send(STORE, [kk, A.iid, bl, b""], uid=506), STORE, "xfer_ok"))
    reqs.append((cli.send(STORE, [kk, 4242, bl, b""], uid=507), STORE, "xfer_fail"))
    got = {}
    order = []
    try:
        while len(got) < len(reqs):
            fr = cli.recv_any(RECV_TIMEOUT_MS)
            if fr is None:
                break
            got[fr[0]] = fr
            order.append(fr[0])
    except Exception:
        pass
    check(len(got) == len(reqs), "all %d pipelined requests answered" % len(reqs),
          "got uids %s" % [hx(u) for u in order])
    print("      reply order by uid: %s" % [unpack_strict(u) for u in order])
    job = JOB[0]
    JOB[0] += 1
    for u, t, kind in reqs:
        fr = got.get(u)
        if fr is None:
            continue
        what = "pipelined uid %d type %d" % (unpack_strict(u), t)
        check(fr[1] == pk(t), "%s: type echoed" % what, hx(fr[1]))
        if kind == "xfer_ok":
            expect_xfer(fr, what, True)
        elif kind == "xfer_fail":
            expect_xfer(fr, what, False)
        elif kind == "ping":
            expect_ping(fr, what)
        elif kind == "cs":
            expect_int(fr, what, 256)
        elif kind == "job":
            expect_int(fr, what + " -> job %d" % job, job)
        elif kind == "noop":
            check(fr[2:] == [b"\xa2OK"], what + " -> 'OK'", str([hx(f) for f in fr]))
        elif kind == "none":
            expect_none(fr, what)
    expect_int_or_none(cli.call(QUERY_PREFETCH_STATUS, [job]), "pipelined LOOKUP job status", 2)
    expect_none(cli.call(FREE_LOOKUP_LOCKS, [key_map(A.model, A.ws, None, T, 0, 512, "mx"), 1]),
                "FREE_LOOKUP_LOCKS (pipelined lookup)")

    # two DEALERs using the same uid concurrently: state keyed on (identity, uid)
    c2 = Client(ctx, endpoint)
    try:
        u1 = cli.send(GET_CHUNK_SIZE, uid=4242)
        u2 = c2.send(NOOP, uid=4242)
        u3 = c2.send(PING, uid=4243)
        f1 = cli.recv_for(u1)
        f2 = c2.recv_for(u2)
        f3 = c2.recv_for(u3)
        expect_int(f1, "socket 1 uid 4242 GET_CHUNK_SIZE", 256)
        check(f2[1:] == [b"\x0d", b"\xa2OK"], "socket 2 uid 4242 NOOP -> 'OK' (same uid, other identity)",
              str([hx(f) for f in f2]))
        expect_ping(f3, "socket 2 PING")
        check(not cli.quiet(100) and not c2.quiet(50), "no stray replies on either socket")
    finally:
        c2.close()


def sec_faults(cli, A, rng):
    print("--- frame-level faults: no reply, server keeps serving")
    T = rand_tokens(rng, 256)
    key_ok = key_map(A.model, A.ws, 0, T, 0, 256, "flt")
    blocks = list(range(16))

    def U(n):
        return pk(10000 + n)

    big = T[:]
    big[5] = 2 ** 32
    neg = T[:]
    neg[9] = -1
    no_req = key_map(A.model, A.ws, None, T, 0, 0, "x")
    del no_req["request_id"]
    faults = [
        ("1 frame (uid only)", [U(1)]),
        ("1 empty frame", [b""]),
        ("unknown type 99", [U(3), pk(99)]),
        ("unknown type 99 with payload", [U(4), pk(99), pk(1)]),
        ("type 0", [U(5), pk(0)]),
        ("type as str", [U(6), pk("PING")]),
        ("type frame undecodable (c1)", [U(7), b"\xc1"]),
        ("GET_CHUNK_SIZE with 1 payload frame", [U(8), pk(GET_CHUNK_SIZE), pk(1)]),
        ("PING with 2 payload frames", [U(9), pk(PING), b"\xc0", b"\xc0"]),
        ("NOOP with 1 payload frame", [U(10), pk(NOOP), b"\xc0"]),
        ("REGISTER with 3 payload frames", [U(11), pk(REGISTER_KV_CACHE), pk(A.iid), pk(A.descriptors()), pk(A.model)]),
        ("REGISTER with 6 payload frames", [U(12), pk(REGISTER_KV_CACHE), pk(A.iid), pk(A.descriptors()),
                                            pk(A.model), pk(1), pk(None), pk(None)]),
        ("STORE with 3 payload frames", [U(13), pk(STORE), pk(key_ok), pk(A.iid), pk(blocks)]),
        ("STORE with 5 payload frames", [U(14), pk(STORE), pk(key_ok), pk(A.iid), pk(blocks), pk(b""), pk(0)]),
        ("RETRIEVE with 4 payload frames", [U(15), pk(RETRIEVE), pk(key_ok), pk(A.iid), pk(blocks), pk(b"")]),
        ("UNREGISTER with 0 payload frames", [U(16), pk(UNREGISTER_KV_CACHE)]),
        ("LOOKUP with undecodable key (c1)", [U(17), pk(LOOKUP), b"\xc1", pk(1)]),
        ("QUERY_PREFETCH_STATUS truncated int (cd 01)", [U(18), pk(QUERY_PREFETCH_STATUS), b"\xcd\x01"]),
        ("UNREGISTER with trailing bytes (01 02)", [U(19), pk(UNREGISTER_KV_CACHE), b"\x01\x02"]),
        ("LOOKUP key as str (type error)", [U(20), pk(LOOKUP), pk("notakey"), pk(1)]),
        ("LOOKUP key missing request_id", [U(21), pk(LOOKUP), pk(no_req), pk(1)]),
        ("LOOKUP token 2^32", [U(22), pk(LOOKUP), pk(key_map(A.model, A.ws, None, big, 0, 0, "x")), pk(1)]),
        ("LOOKUP token -1", [U(23), pk(LOOKUP), pk(key_map(A.model, A.ws, None, neg, 0, 0, "x")), pk(1)]),
        ("STORE token 2^32", [U(24), pk(STORE), pk(key_map(A.model, A.ws, 0, big, 0, 256, "x")), pk(A.iid),
                              pk(blocks), pk(b"")]),
        ("host STORE with 64-byte event handle", [U(25), pk(STORE), pk(key_ok), pk(A.iid), pk(blocks),
                                                   pk(b"\x01" * 64)]),
        ("host RETRIEVE with 64-byte event handle", [U(26), pk(RETRIEVE), pk(key_ok), pk(A.iid), pk(blocks),
                                                      pk(b"\x01" * 64), pk(0)]),
        ("END_SESSION with int request_id", [U(27), pk(END_SESSION), pk(5)]),
        ("STORE instance_id as str", [U(28), pk(STORE), pk(key_ok), pk("1"), pk(blocks), pk(b"")]),
        ("STORE gpu_block_ids not an array", [U(29), pk(STORE), pk(key_ok), pk(A.iid), pk(3), pk(b"")]),
    ]
    for what, frames in faults:
        cli.send_frames(frames)
        stray = cli.quiet(QUIET_MS)
        check(not stray, "fault '%s': no reply" % what, "got %s" % [[hx(f) for f in fr] for fr in stray])
        try:
            fr = cli.call(PING)
            expect_ping(fr, "PING after fault '%s'" % what)
        except TimeoutError:
            check(False, "PING after fault '%s'" % what, "timed out")
            return
    # nothing was stored by the faulting STOREs, nothing leaked from them
    lookup_chunks(cli, key_map(A.model, A.ws, None, T, 0, 0, "flt"), 1,
                  "after faulting STOREs, key not stored", 0)
    check(not cli.quiet(300), "no late replies to any faulting request")


def sec_clear(cli, rng, A, B, T):
    print("--- CLEAR")
    # take a lookup lock first: CLEAR voids it
    k = key_map(A.model, A.ws, None, T, 0, 0, "clr")
    j = lookup(cli, k, 1, "before CLEAR")
    expect_none(cli.call(CLEAR), "CLEAR")
    expect_int_or_none(cli.call(QUERY_PREFETCH_LOOKUP_HITS, [j]), "hits of pre-CLEAR job (job still known)", 2)
    expect_int_or_none(cli.call(QUERY_PREFETCH_STATUS, [j]), "status of pre-CLEAR job", 2)
    lookup_chunks(cli, k, 1, "after CLEAR", 0)
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B.NB, 16), 0, "RETRIEVE after CLEAR -> [b'', False]",
                want_ok=False)
    # the server still works after CLEAR
    TRUTH.clear()
    A.randomize()
    do_store(cli, A, T, 0, 512, 0, pick_blocks(rng, A.NB, 32), "STORE after CLEAR")
    do_retrieve(cli, B, T, 0, 512, 0, pick_blocks(rng, B.NB, 16), 0, "RETRIEVE after CLEAR + STORE")


def sec_unregister(cli, regs, rng, A, T):
    print("--- UNREGISTER_KV_CACHE")
    for r in regs:
        expect_none(cli.call(UNREGISTER_KV_CACHE, [r.iid]), "UNREGISTER_KV_CACHE id=%d" % r.iid)
    expect_none(cli.call(UNREGISTER_KV_CACHE, [A.iid]), "UNREGISTER_KV_CACHE id=%d again (unknown now)" % A.iid)
    k = key_map(A.model, A.ws, 0, T, 0, 512, "un")
    expect_xfer(cli.call(STORE, [k, A.iid, pick_blocks(rng, A.NB, 32), b""]), "STORE after UNREGISTER", False)
    expect_xfer(cli.call(RETRIEVE, [k, A.iid, pick_blocks(rng, A.NB, 32), b"", 0]), "RETRIEVE after UNREGISTER",
                False)
    expect_ping(cli.call(PING), "PING at end")


# ---------------------------------------------------------------- main


def main():
    t0 = time.monotonic()
    rng = random.Random(20260323)
    srv = Server()
    ctx = zmq.Context()
    regs = []
    cli = None
    crashed = False
    try:
        if not check(wait_ready(srv, ctx), "kvstashd starts and answers PING on %s" % srv.endpoint,
                     "log:\n" + srv.tail()):
            return 1
        cli = Client(ctx, srv.endpoint)
        sec_worked_examples(cli)
        sec_small(cli)

        print("--- REGISTER_KV_CACHE (4 frames and with layout_hints)")
        A = Reg(1, "wc-model", 1, "flash_attn", "bfloat16", NL=3, NB=96, BS=16, NH=2, HS=8)
        B = Reg(2, "wc-model", 1, "flashinfer", "bfloat16", NL=3, NB=64, BS=32, NH=2, HS=8,
                pad=40, per_layer_fd=True, base_off=1024)
        M1 = Reg(2 ** 62 + 3, "wc-mla", 1, "mla", "bfloat16", NL=2, NB=64, BS=16, HS=32)
        M2 = Reg(6, "wc-mla", 1, "mla", "bfloat16", NL=2, NB=40, BS=32, HS=32, omit_layout=True)
        U1 = Reg(7, "wc-u8", 1, "flashinfer", "uint8", NL=2, NB=64, BS=16, NH=1, HS=16)
        U2 = Reg(8, "wc-u8", 1, "flash_attn", "uint8", NL=2, NB=64, BS=16, NH=1, HS=16, per_layer_fd=True)
        F1 = Reg(9, "wc-f32", 1, "flash_attn", "float32", NL=1, NB=40, BS=16, NH=2, HS=4)
        R0 = Reg(20, "wc-tp2", 2, "flash_attn", "bfloat16", NL=2, NB=48, BS=16, NH=1, HS=8)
        R1 = Reg(21, "wc-tp2", 2, "flash_attn", "bfloat16", NL=2, NB=48, BS=16, NH=1, HS=8)
        regs = [A, B, M1, M2, U1, U2, F1, R0, R1]
        A.register(cli)
        B.register(cli, hints={"kv_layout": "HND", "block_size": 32})
        M1.register(cli, hints=None, what="REGISTER_KV_CACHE mla id=2^62+3 (cf instance_id)")
        M2.register(cli, hints=None, what="REGISTER_KV_CACHE mla without 'layout' (inferred)")
        U1.register(cli, hints=["anything", 1, None])
        U2.register(cli)
        F1.register(cli, hints=None)
        R0.register(cli)
        R1.register(cli)
        # re-register (replace) with the same descriptors
        A.register(cli, hints=None, what="REGISTER_KV_CACHE id=1 again (replace)")

        sec_semantic_failures(cli, rng)
        T, T2 = sec_layouts(cli, rng, [A, B, M1, M2, U1, U2, F1])
        sec_lookup(cli, rng, T, T2)
        sec_bad_xfers(cli, rng, A, T)
        sec_world2(cli, rng, R0, R1)
        sec_multiplex(cli, ctx, srv.endpoint, rng, A, T)
        sec_faults(cli, A, rng)
        sec_clear(cli, rng, A, B, T)
        sec_unregister(cli, regs, rng, A, T)
    except Exception:
        crashed = True
        traceback.print_exc()
        check(False, "test ran to completion without exception")
    finally:
        if cli is not None:
            cli.close()
        ctx.term()
        alive = srv.proc.poll() is None
        check(alive, "kvstashd still running before SIGTERM", "exit status %r" % srv.proc.returncode)
        rc = srv.stop()
        check(rc == 0, "kvstashd exits 0 on SIGTERM", "got %r" % (rc,))
        if FAILS or crashed:
            print("---- kvstashd log tail ----")
            print(srv.tail())
        srv.cleanup()
        for r in regs:
            r.close()
    dt = time.monotonic() - t0
    print("%d checks, %d failed, %.1f s" % (NCHECKS[0], len(FAILS), dt))
    if FAILS:
        print("FAILED:")
        for f in FAILS:
            print("  - " + f)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
