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
import errno as _errno

from ._ffi import (LAYOUTS, KvstashError, _HostBuffer, _HostLayer, _Key, _KvLayout, _STATS_FN,
                   load_library)
from ._ffi import as_bytes as _bytes
from ._ffi import check as _check
from ._ffi import i64_array as _i64_array
from ._ffi import load_library as _lib

__all__ = ["Client", "HostBuffer", "Key", "KvstashError", "LAYOUTS", "load_library"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT_MS = 10000


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
        _check(_lib().kvstash_host_buffer_create(ctypes.byref(self._hb), nbytes, _bytes(name)),
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
            _lib().kvstash_host_buffer_destroy(ctypes.byref(self._hb))
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
        _check(_lib().kvstash_connect(_bytes(endpoint), timeout_ms, ctypes.byref(self._c)),
               "kvstash_connect")

    def _h(self):
        if not self._c:
            raise KvstashError(_errno.EBADF, "client is closed", "kvstash")
        return self._c

    def close(self):
        if self._c:
            _lib().kvstash_close(self._c)
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
        _check(_lib().kvstash_ping(self._h(), ctypes.byref(rtt)), "ping")
        return rtt.value

    def chunk_size(self):
        """Tokens per chunk (GET_CHUNK_SIZE)."""
        v = ctypes.c_uint32()
        _check(_lib().kvstash_get_chunk_size(self._h(), ctypes.byref(v)), "chunk_size")
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
        _check(_lib().kvstash_register_host(self._h(), instance_id, _bytes(model), world_size,
                                          ctypes.byref(lay), arr, len(layers)),
               "register_host")

    def unregister(self, instance_id):
        _check(_lib().kvstash_unregister(self._h(), instance_id), "unregister")

    def store(self, key, instance_id, block_ids):
        """STORE key's [start, end) from the paged blocks @block_ids."""
        ck = key._c()
        ids, n = _i64_array(block_ids)
        _check(_lib().kvstash_store(self._h(), ctypes.byref(ck), instance_id, ids, n), "store")

    def retrieve(self, key, instance_id, block_ids, skip=0):
        """RETRIEVE into @block_ids, leaving the first @skip tokens of the range untouched.

        Raises KvstashError(ENOENT) when a chunk is missing.
        """
        ck = key._c()
        ids, n = _i64_array(block_ids)
        _check(_lib().kvstash_retrieve(self._h(), ctypes.byref(ck), instance_id, ids, n, skip),
               "retrieve")

    def lookup(self, key, tp_size=1):
        """LOOKUP (all ranks) then QUERY_PREFETCH_STATUS: leading chunks cached, now read-locked."""
        ck = key._c(all_ranks=True)
        out = ctypes.c_int64()
        _check(_lib().kvstash_lookup_chunks(self._h(), ctypes.byref(ck), tp_size,
                                          ctypes.byref(out)), "lookup")
        return out.value

    def free_lookup_locks(self, key, tp_size=1):
        ck = key._c()
        _check(_lib().kvstash_free_lookup_locks(self._h(), ctypes.byref(ck), tp_size),
               "free_lookup_locks")

    def end_session(self, request_id):
        _check(_lib().kvstash_end_session(self._h(), _bytes(request_id)), "end_session")

    def clear(self):
        _check(_lib().kvstash_clear(self._h()), "clear")

    def stats(self):
        """The server's counters as {name: int}."""
        out = {}

        def cb(name, value, arg):
            out[name.decode()] = value
            return 0

        fn = _STATS_FN(cb)
        _check(_lib().kvstash_stats(self._h(), fn, None), "stats")
        return out
