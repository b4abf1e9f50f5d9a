"""kvstash._ffi: libkvstash through ctypes, shared by kvstash and kvstash.torch.

The C structures of include/kvstash.h, the layout table, finding and loading
the library, every function's signature (the CUDA ones included: libkvstash
exports them whether or not it was built with CUDA), and the error check.
Nothing here is public API; import kvstash instead.
"""

import ctypes
import ctypes.util
import errno as _errno
import glob
import os

LAYOUTS = {"flash_attn": 0, "flashinfer": 1, "mla": 2}
IPC_HANDLE_BYTES = 64	# cudaIpcMemHandle_t


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


class _CudaLayer(ctypes.Structure):
    _fields_ = [("mem_handle", ctypes.c_uint8 * IPC_HANDLE_BYTES),
                ("offset", ctypes.c_uint64),
                ("nbytes", ctypes.c_uint64)]


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
        "kvstash_register_cuda": (I, [P, ctypes.c_int64, ctypes.c_char_p, ctypes.c_uint32,
                                      ctypes.POINTER(_KvLayout), ctypes.c_char_p,
                                      ctypes.POINTER(_CudaLayer), ctypes.c_size_t]),
        "kvstash_store_event": (I, [P, ctypes.POINTER(_Key), ctypes.c_int64,
                                    ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                    ctypes.c_char_p, ctypes.c_char_p]),
        "kvstash_retrieve_event": (I, [P, ctypes.POINTER(_Key), ctypes.c_int64,
                                       ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                       ctypes.c_uint64, ctypes.c_char_p, ctypes.c_char_p]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args


def check(rc, call):
    """Raise KvstashError for a negative return code (message read in this thread)."""
    if rc < 0:
        msg = load_library().kvstash_last_error()
        raise KvstashError(-rc, msg.decode("utf-8", "replace") if msg else "", call)
    return rc


def as_bytes(s):
    return s.encode("utf-8") if isinstance(s, str) else s


def i64_array(values):
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values), len(values)
