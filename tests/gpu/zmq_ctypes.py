"""libzmq through ctypes, for the GPU scripts: the GPU host has python3 and
torch but no pyzmq, so a DEALER is driven straight from the libzmq carried
with the build (KVSTASH_LIBZMQ names it if the loader does not find it).
Also the scripts' common skip check (torch_and_msgpack)."""
import ctypes
import ctypes.util
import os


class Zmq:
    ZMQ_DEALER, ZMQ_RCVMORE, ZMQ_SNDMORE, ZMQ_LINGER, ZMQ_RCVTIMEO = 5, 13, 2, 17, 27

    def __init__(self):
        name = os.environ.get("KVSTASH_LIBZMQ") or ctypes.util.find_library("zmq") or "libzmq.so.5"
        self.lib = ctypes.CDLL(name)
        L = self.lib
        L.zmq_ctx_new.restype = ctypes.c_void_p
        L.zmq_socket.restype = ctypes.c_void_p
        L.zmq_socket.argtypes = [ctypes.c_void_p, ctypes.c_int]
        L.zmq_connect.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        L.zmq_send.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        L.zmq_recv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        L.zmq_setsockopt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        L.zmq_getsockopt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_size_t)]
        L.zmq_close.argtypes = [ctypes.c_void_p]
        self.ctx = L.zmq_ctx_new()

    def dealer(self, ep, timeout_ms=20000):
        s = self.lib.zmq_socket(self.ctx, self.ZMQ_DEALER)
        v = ctypes.c_int(0)
        self.lib.zmq_setsockopt(s, self.ZMQ_LINGER, ctypes.byref(v), 4)
        v = ctypes.c_int(timeout_ms)
        self.lib.zmq_setsockopt(s, self.ZMQ_RCVTIMEO, ctypes.byref(v), 4)
        assert self.lib.zmq_connect(s, ep.encode()) == 0
        return s

    def send(self, s, frames):
        for i, f in enumerate(frames):
            buf = ctypes.create_string_buffer(f, len(f))
            flags = self.ZMQ_SNDMORE if i + 1 < len(frames) else 0
            assert self.lib.zmq_send(s, buf, len(f), flags) == len(f)

    def recv(self, s):
        frames, more = [], 1
        buf = ctypes.create_string_buffer(1 << 16)
        while more:
            n = self.lib.zmq_recv(s, buf, len(buf), 0)
            if n < 0:
                return None
            frames.append(buf.raw[:n])
            m = ctypes.c_int(0)
            sz = ctypes.c_size_t(4)
            self.lib.zmq_getsockopt(s, self.ZMQ_RCVMORE, ctypes.byref(m), ctypes.byref(sz))
            more = m.value
        return frames

    def close(self, s):
        self.lib.zmq_close(s)


def torch_and_msgpack():
    """(torch, msgpack) for a GPU script, or None after printing why it skips
    (exit 77): either module missing or no CUDA device."""
    try:
        import torch
        import msgpack
    except ImportError as e:
        print("skip:", e)
        return None
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return None
    return torch, msgpack
