"""kvstash: Python binding of libkvstash, the client library of kvstashd.

ctypes over libkvstash.so; standard library only, numpy-free. KV buffers are
HostBuffer objects (a memfd the server maps), read and written through a
memoryview.

    import kvstash
    with kvstash.Client("tcp://127.0.0.1:5555") as c:
        c.ping()
        buf = kvstash.HostBuffer(layer_bytes * nlayers)
        c.register_host(7, "my-model", 1, "flash_attn", "bfloat16",
                        shape=(2, nblocks, 16, 8, 128),
                        layers=[(buf.path, l * layer_bytes, buf.nbytes) for l in range(nlayers)])
        key = kvstash.Key("my-model", tokens, request_id="req-1")
        c.store(key, 7, block_ids)
        hits = c.lookup(key)          # leading chunks cached (read-locked)
        c.retrieve(key, 7, other_block_ids)

Every failure raises KvstashError (an OSError): .errno is the positive
errno, .message the library's message (the server's reason where it sent one).

The library is found through $KVSTASH_LIB (a path to libkvstash.so), then
next to this package, then $KVSTASH_BUILD_DIR and the repository's build
directories, then libkvstash.so.0 on the dynamic linker's path (an installed
libkvstash0, LD_LIBRARY_PATH), then ldconfig's cache.
"""

import ctypes
import ctypes.util
import errno as _errno
import glob
import os

__all__ = ["Client", "HostBuffer", "Key", "KvstashError", "LAYOUTS", "load_library"]

LAYOUTS = {"flash_attn": 0, "flashinfer": 1, "mla": 2}

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT_MS = 10000


class KvstashError(OSError):
    """A libkvstash call failed: .errno (positive), .message, .call."""

    def __init__(self, err, message, call=""):
        super().__init__(err, message)
        self.message = message
        self.call = call

    def __str__(self):
        name = _errno.errorcode.get(self.errno, str(self.errno))
        where = "%s: " % self.call if self.call else ""
        return "%s%s (%s)" % (where, self.message or os.strerror(self.errno), name)


# ---- C structures (include/kvstash.h) ------------------------------------------

class _KvLayout(ctypes.Structure):
    _fields_ = [("layout", ctypes.c_int),
                ("dtype", ctypes.c_char_p),
                ("ndim", ctypes.c_uint32),
                ("shape", ctypes.c_int64 * 5),
                ("stride", ctypes.c_int64 * 5)]


class _HostLayer(ctypes.Structure):
    _fields_ = [("path", ctypes.c_char_p),
                ("offset", ctypes.c_uint64),
                ("nbytes", ctypes.c_uint64)]


class _HostBuffer(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p),
                ("bytes", ctypes.c_size_t),
                ("fd", ctypes.c_int),
                ("path", ctypes.c_char * 64)]


class _Key(ctypes.Structure):
    _fields_ = [("model", ctypes.c_char_p),
                ("world_size", ctypes.c_uint32),
                ("worker_id", ctypes.c_int32),
                ("tokens", ctypes.POINTER(ctypes.c_uint32)),
                ("ntokens", ctypes.c_size_t),
                ("start", ctypes.c_uint64),
                ("end", ctypes.c_uint64),
                ("request_id", ctypes.c_char_p)]


_STATS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_void_p)


# ---- loading the library ---------------------------------------------------------

def _candidates():
    env = os.environ.get("KVSTASH_LIB")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    for pattern in ("libkvstash.so", "libkvstash.so.*"):
        yield from sorted(glob.glob(os.path.join(here, pattern)))
    build = os.environ.get("KVSTASH_BUILD_DIR")
    if build:
        yield os.path.join(build, "libkvstash.so")
    repo = os.path.dirname(os.path.dirname(here))
    yield os.path.join(repo, "build", "libkvstash.so")
    yield from sorted(glob.glob(os.path.join(repo, "build*", "libkvstash.so")))
    # Installed (libkvstash0, cmake --install): the dynamic linker's path,
    # LD_LIBRARY_PATH included, then ldconfig's cache.
    yield "libkvstash.so.0"
    found = ctypes.util.find_library("kvstash")
    if found:
        yield found


_lib = None


def load_library():
    """Load libkvstash once and declare its functions; returns the CDLL."""
    global _lib
    if _lib is not None:
        return _lib
    tried = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            tried.append(path)
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append("%s (%s)" % (path, e))
            continue
        _declare(lib)
        _lib = lib
        return lib
    raise KvstashError(_errno.ENOENT, "libkvstash.so not found; set KVSTASH_LIB. Tried: " +
                       ", ".join(tried), "load_library")


def _declare(lib):
    P = ctypes.c_void_p
    I = ctypes.c_int
    sigs = {
        "kvstash_connect": (I, [ctypes.c_char_p, I, ctypes.POINTER(P)]),
        "kvstash_close": (None, [P]),
        "kvstash_ping": (I, [P, ctypes.POINTER(ctypes.c_double)]),
        "kvstash_get_chunk_size": (I, [P, ctypes.POINTER(ctypes.c_uint32)]),
        "kvstash_register_host": (I, [P, ctypes.c_int64, ctypes.c_char_p, ctypes.c_uint32,
                                      ctypes.POINTER(_KvLayout), ctypes.POINTER(_HostLayer),
                                      ctypes.c_size_t]),
        "kvstash_unregister": (I, [P, ctypes.c_int64]),
        "kvstash_host_buffer_create": (I, [ctypes.POINTER(_HostBuffer), ctypes.c_size_t,
                                           ctypes.c_char_p]),
        "kvstash_host_buffer_destroy": (None, [ctypes.POINTER(_HostBuffer)]),
        "kvstash_store": (I, [P, ctypes.POINTER(_Key), ctypes.c_int64,
                              ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t]),
        "kvstash_retrieve": (I, [P, ctypes.POINTER(_Key), ctypes.c_int64,
                                 ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                 ctypes.c_uint64]),
        "kvstash_lookup_chunks": (I, [P, ctypes.POINTER(_Key), ctypes.c_uint32,
                                      ctypes.POINTER(ctypes.c_int64)]),
        "kvstash_free_lookup_locks": (I, [P, ctypes.POINTER(_Key), ctypes.c_uint32]),
        "kvstash_end_session": (I, [P, ctypes.c_char_p]),
        "kvstash_clear": (I, [P]),
        "kvstash_stats": (I, [P, _STATS_FN, P]),
        "kvstash_last_error": (ctypes.c_char_p, []),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args


def _check(rc, call):
    """Raise KvstashError for a negative return code (message read in this thread)."""
    if rc < 0:
        msg = _lib.kvstash_last_error()
        raise KvstashError(-rc, msg.decode("utf-8", "replace") if msg else "", call)
    return rc


def _bytes(s):
    return s.encode("utf-8") if isinstance(s, str) else s


def _i64_array(values):
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values), len(values)


# ---- public classes ------------------------------------------------------------------

class Key:
    """An IPCCacheEngineKey (docs/protocol.md §4.1): tokens [start, end) of a request.

    tokens: any sequence of ints < 2**32 (an array.array('I') is used without copying).
    worker_id: this rank, or None for LOOKUP across all ranks.
    """

    def __init__(self, model, tokens, world_size=1, worker_id=0, start=0, end=None,
                 request_id=None):
        self.model = model
        self.world_size = world_size
        self.worker_id = worker_id
        self.start = start
        self.end = end
        self.request_id = request_id
        self.tokens = tokens

    @property
    def tokens(self):
        return self._tokens

    @tokens.setter
    def tokens(self, tokens):
        n = len(tokens)
        arr_t = ctypes.c_uint32 * n
        try:
            self._tok = arr_t.from_buffer(tokens)  # array('I'), bytearray views: no copy
            if ctypes.sizeof(self._tok) != memoryview(tokens).nbytes:
                raise TypeError
        except (TypeError, ValueError):
            self._tok = arr_t(*tokens)
        self._tokens = tokens

    def _c(self, all_ranks=False):
        wid = None if all_ranks else self.worker_id
        n = len(self._tok)
        return _Key(model=_bytes(self.model), world_size=self.world_size,
                    worker_id=-1 if wid is None else wid,
                    tokens=ctypes.cast(self._tok, ctypes.POINTER(ctypes.c_uint32)),
                    ntokens=n, start=self.start, end=n if self.end is None else self.end,
                    request_id=_bytes(self.request_id) if self.request_id is not None else None)


class HostBuffer:
    """A shareable host buffer (memfd) for register_host(): .path, .nbytes, .view.

    .view is a writable memoryview (format 'B') over the whole buffer. Do not
    use it, or slices of it, after close(): the mapping is gone then.
    """

    def __init__(self, nbytes, name="kvstash-py"):
        load_library()
        self._hb = _HostBuffer()
        self._hb.fd = -1
        _check(_lib.kvstash_host_buffer_create(ctypes.byref(self._hb), nbytes, _bytes(name)),
               "kvstash_host_buffer_create")
        self._arr = (ctypes.c_ubyte * nbytes).from_address(self._hb.ptr)
        self.view = memoryview(self._arr).cast("B")

    @property
    def path(self):
        return self._hb.path.decode()

    @property
    def nbytes(self):
        return self._hb.bytes

    @property
    def fd(self):
        return self._hb.fd

    def close(self):
        if self._hb is not None and self._hb.ptr:
            self.view.release()
            self._arr = None
            _lib.kvstash_host_buffer_destroy(ctypes.byref(self._hb))
        self._hb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Client:
    """A connection to kvstashd; thread-safe (calls from several threads run in parallel)."""

    def __init__(self, endpoint=DEFAULT_ENDPOINT, timeout_ms=DEFAULT_TIMEOUT_MS):
        load_library()
        self._c = ctypes.c_void_p()
        self.endpoint = endpoint
        _check(_lib.kvstash_connect(_bytes(endpoint), timeout_ms, ctypes.byref(self._c)),
               "kvstash_connect")

    def _h(self):
        if not self._c:
            raise KvstashError(_errno.EBADF, "client is closed", "kvstash")
        return self._c

    def close(self):
        if self._c:
            _lib.kvstash_close(self._c)
            self._c = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def ping(self):
        """PING; returns the round trip in milliseconds."""
        rtt = ctypes.c_double()
        _check(_lib.kvstash_ping(self._h(), ctypes.byref(rtt)), "ping")
        return rtt.value

    def chunk_size(self):
        """Tokens per chunk (GET_CHUNK_SIZE)."""
        v = ctypes.c_uint32()
        _check(_lib.kvstash_get_chunk_size(self._h(), ctypes.byref(v)), "chunk_size")
        return v.value

    def register_host(self, instance_id, model, world_size, layout, dtype, shape, layers,
                      stride=None):
        """REGISTER_KV_CACHE with host layers.

        layout: "flash_attn" [2,NB,BS,NH,HS], "flashinfer" [NB,2,BS,NH,HS] or "mla" [NB,BS,HS]
        (or its number); shape: the per-layer shape; stride: elements, None = dense;
        layers: [(path, offset, nbytes)], one per layer (HostBuffer.path works as path).
        """
        lay = _KvLayout()
        lay.layout = LAYOUTS[layout] if isinstance(layout, str) else int(layout)
        lay.dtype = _bytes(dtype)
        shape = list(shape)
        if not 1 <= len(shape) <= 5:
            raise KvstashError(_errno.EINVAL, "shape needs 1 to 5 dimensions", "register_host")
        lay.ndim = len(shape)
        for i, v in enumerate(shape):
            lay.shape[i] = v
        for i, v in enumerate(stride or ()):
            lay.stride[i] = v
        layers = list(layers)
        arr = (_HostLayer * len(layers))()
        for i, (path, offset, nbytes) in enumerate(layers):
            arr[i].path = _bytes(path)
            arr[i].offset = offset
            arr[i].nbytes = nbytes
        _check(_lib.kvstash_register_host(self._h(), instance_id, _bytes(model), world_size,
                                          ctypes.byref(lay), arr, len(layers)),
               "register_host")

    def unregister(self, instance_id):
        _check(_lib.kvstash_unregister(self._h(), instance_id), "unregister")

    def store(self, key, instance_id, block_ids):
        """STORE key's [start, end) from the paged blocks @block_ids."""
        ck = key._c()
        ids, n = _i64_array(block_ids)
        _check(_lib.kvstash_store(self._h(), ctypes.byref(ck), instance_id, ids, n), "store")

    def retrieve(self, key, instance_id, block_ids, skip=0):
        """RETRIEVE into @block_ids, leaving the first @skip tokens of the range untouched.

        Raises KvstashError(ENOENT) when a chunk is missing.
        """
        ck = key._c()
        ids, n = _i64_array(block_ids)
        _check(_lib.kvstash_retrieve(self._h(), ctypes.byref(ck), instance_id, ids, n, skip),
               "retrieve")

    def lookup(self, key, tp_size=1):
        """LOOKUP (all ranks) then QUERY_PREFETCH_STATUS: leading chunks cached, now read-locked."""
        ck = key._c(all_ranks=True)
        out = ctypes.c_int64()
        _check(_lib.kvstash_lookup_chunks(self._h(), ctypes.byref(ck), tp_size,
                                          ctypes.byref(out)), "lookup")
        return out.value

    def free_lookup_locks(self, key, tp_size=1):
        ck = key._c()
        _check(_lib.kvstash_free_lookup_locks(self._h(), ctypes.byref(ck), tp_size),
               "free_lookup_locks")

    def end_session(self, request_id):
        _check(_lib.kvstash_end_session(self._h(), _bytes(request_id)), "end_session")

    def clear(self):
        _check(_lib.kvstash_clear(self._h()), "clear")

    def stats(self):
        """The server's counters as {name: int}."""
        out = {}

        def cb(name, value, arg):
            out[name.decode()] = value
            return 0

        fn = _STATS_FN(cb)
        _check(_lib.kvstash_stats(self._h(), fn, None), "stats")
        return out
