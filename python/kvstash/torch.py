"""kvstash.torch: register PyTorch CUDA KV caches with kvstashd, natively.

Uses kvstash's own ``cuda_ipc`` descriptor (docs/protocol.md §5.2), not
LMCache's pickled CudaIPCWrapper: each layer travels as the
``cudaIpcMemHandle_t`` of the CUDA allocation that holds it, the byte offset
of element 0 inside that allocation and the allocation's size, all read from
the CUDA driver (``cuMemGetAddressRange``, ``cuIpcGetMemHandle``) through
ctypes. STORE and RETRIEVE carry CUDA IPC events (§5.3): the client records
an interprocess event after its KV writes (STORE) or before the server may
overwrite blocks (RETRIEVE); the server's copy waits on it, and the event the
server returns is made the client stream's next dependency.

It reaches kvstashd through libkvstash (ctypes, see ``kvstash``), so it needs
no Python ZMQ module; it needs torch, and imports it only here.

    import torch, kvstash, kvstash.torch as kt
    caches = [torch.zeros(2, nb, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
              for _ in range(nlayers)]
    with kvstash.Client("tcp://127.0.0.1:5555") as c:
        kv = kt.TorchKV(c, instance_id=os.getpid(), model="m", world_size=1,
                        kv_caches=caches)
        kv.register()
        kv.store(kvstash.Key("m", tokens, request_id="r"), block_ids)
        kv.retrieve(key, other_block_ids)     # raises KvstashError(ENOENT) on a miss

Limits: tensors must be ordinary cudaMalloc-backed memory (PyTorch's caching
allocator with expandable_segments off); the CUDA VMM API's memory (expandable
segments, vLLM sleep mode's CuMemAllocator) has no cudaIpcMemHandle_t and is
refused with a clear error. All layers must live on one device.
"""

import ctypes
import ctypes.util
import errno as _errno

import torch

from kvstash import KvstashError, _ffi

__all__ = ["TorchKV", "cuda_ipc_layer", "register_cuda", "store", "retrieve"]

_IPC_HANDLE_BYTES = _ffi.IPC_HANDLE_BYTES
_CUDA_SUCCESS = 0


# ---- libcuda (the driver API: present wherever a GPU works) ----------------------

_cuda = None


def _libcuda():
    global _cuda
    if _cuda is not None:
        return _cuda
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    lib = ctypes.CDLL(name)
    u64 = ctypes.c_uint64
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(ctypes.c_size_t),
                                            u64]
    lib.cuMemGetAddressRange_v2.restype = ctypes.c_int
    lib.cuIpcGetMemHandle.argtypes = [ctypes.c_char_p, u64]
    lib.cuIpcGetMemHandle.restype = ctypes.c_int
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuGetErrorName.restype = ctypes.c_int
    _cuda = lib
    return lib


def _cu_check(rc, call):
    if rc != _CUDA_SUCCESS:
        name = ctypes.c_char_p()
        _libcuda().cuGetErrorName(rc, ctypes.byref(name))
        what = name.value.decode() if name.value else "CUDA error %d" % rc
        raise KvstashError(_errno.EINVAL, "%s: %s" % (call, what), "kvstash.torch")


def allocation_range(ptr):
    """(base, size) of the CUDA allocation holding device pointer @ptr."""
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    _cu_check(_libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr),
              "cuMemGetAddressRange")
    return base.value, size.value


def cuda_ipc_layer(t):
    """(mem_handle: bytes[64], offset, nbytes) of tensor @t for the cuda_ipc descriptor.

    offset = t.data_ptr() - allocation base; nbytes = the allocation's size.
    """
    if not t.is_cuda:
        raise KvstashError(_errno.EINVAL, "tensor is not on a CUDA device", "kvstash.torch")
    torch.cuda.init()
    with torch.cuda.device(t.device):
        base, size = allocation_range(t.data_ptr())
        h = ctypes.create_string_buffer(_IPC_HANDLE_BYTES)
        rc = _libcuda().cuIpcGetMemHandle(h, base)
        if rc != _CUDA_SUCCESS:
            try:
                _cu_check(rc, "cuIpcGetMemHandle")
            except KvstashError as e:
                raise KvstashError(_errno.EINVAL, e.message + " (memory from the CUDA VMM API, "
                                   "e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
                                   "cannot be shared by cudaIpc handles)",
                                   "kvstash.torch") from None
    return h.raw, t.data_ptr() - base, size


def _infer_layout(shape):
    """protocol.md §5.2: 3 dims -> mla; shape[0] == 2 -> flash_attn; shape[1] == 2 -> flashinfer."""
    if len(shape) == 3:
        return "mla"
    if len(shape) == 5 and shape[0] == 2:
        return "flash_attn"
    if len(shape) == 5 and shape[1] == 2:
        return "flashinfer"
    raise KvstashError(_errno.EINVAL, "cannot infer a layout from shape %s; pass layout="
                       % (tuple(shape),), "kvstash.torch")


def register_cuda(client, instance_id, model, world_size, kv_caches, layout=None):
    """REGISTER_KV_CACHE with one torch CUDA tensor per layer (native cuda_ipc descriptor).

    All tensors must share device, dtype, shape and stride. @layout: "flash_attn",
    "flashinfer", "mla", or None to infer it from the shape. Raises KvstashError
    (EINVAL with the server's reason) if the server refused the registration.
    """
    kv_caches = list(kv_caches)
    if not kv_caches:
        raise KvstashError(_errno.EINVAL, "no layers", "register_cuda")
    t0 = kv_caches[0]
    for i, t in enumerate(kv_caches):
        if (t.device != t0.device or t.dtype != t0.dtype or tuple(t.shape) != tuple(t0.shape)
                or t.stride() != t0.stride()):
            raise KvstashError(_errno.EINVAL, "layer %d differs from layer 0 in device, dtype, "
                               "shape or stride" % i, "register_cuda")
    shape = tuple(t0.shape)
    if len(shape) > 5:
        raise KvstashError(_errno.EINVAL, "shape %s has more than 5 dims" % (shape,),
                           "register_cuda")
    lay = _ffi._KvLayout()
    name = layout or _infer_layout(shape)
    lay.layout = _ffi.LAYOUTS[name] if isinstance(name, str) else int(name)
    lay.dtype = str(t0.dtype).replace("torch.", "").encode()
    lay.ndim = len(shape)
    for i, (n, s) in enumerate(zip(shape, t0.stride())):
        lay.shape[i] = n
        lay.stride[i] = s
    arr = (_ffi._CudaLayer * len(kv_caches))()
    for i, t in enumerate(kv_caches):
        h, off, nbytes = cuda_ipc_layer(t)
        ctypes.memmove(arr[i].mem_handle, h, _IPC_HANDLE_BYTES)
        arr[i].offset = off
        arr[i].nbytes = nbytes
    uuid = str(torch.cuda.get_device_properties(t0.device).uuid)
    _ffi.check(_ffi.load_library().kvstash_register_cuda(client._h(), instance_id,
                                                model.encode() if isinstance(model, str)
                                                else model, world_size, ctypes.byref(lay),
                                                uuid.encode(), arr, len(kv_caches)),
                   "register_cuda")


class _Events:
    """Interprocess events kept alive a while after their handle was sent.

    The server opens the handle when its copy is queued; how long the handle
    stays valid after the exporter destroys the event is not specified by CUDA
    (protocol.md §10), so the last few are kept.
    """

    KEEP = 16

    def __init__(self):
        self._ring = []

    def new(self, stream):
        ev = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
        ev.record(stream)
        self._ring.append(ev)
        del self._ring[:-self.KEEP]
        return bytes(ev.ipc_handle())


def _wait_done(device, done, stream):
    """Make @stream wait on the server's event (all-zero or empty: nothing to wait for)."""
    raw = bytes(done.raw)
    if not any(raw):
        return
    ev = torch.cuda.Event.from_ipc_handle(device, raw)
    stream.wait_event(ev)


def _xfer(client, events, device, key, instance_id, block_ids, stream, skip, retrieve):
    lib = _ffi.load_library()
    stream = stream or torch.cuda.current_stream(device)
    ck = key._c()
    ids, n = _ffi.i64_array(block_ids)
    wait = events.new(stream)
    done = ctypes.create_string_buffer(_IPC_HANDLE_BYTES)
    if retrieve:
        rc = lib.kvstash_retrieve_event(client._h(), ctypes.byref(ck), instance_id, ids, n, skip,
                                        wait, done)
        call = "retrieve"
    else:
        rc = lib.kvstash_store_event(client._h(), ctypes.byref(ck), instance_id, ids, n, wait,
                                     done)
        call = "store"
    _ffi.check(rc, call)
    _wait_done(device, done, stream)


def store(client, key, instance_id, block_ids, device, stream=None, _events=None):
    """STORE key's [start, end) from @block_ids, ordered after @stream's work so far."""
    _xfer(client, _events or _Events(), device, key, instance_id, block_ids, stream, 0, False)


def retrieve(client, key, instance_id, block_ids, device, skip=0, stream=None, _events=None):
    """RETRIEVE into @block_ids; @stream's later work waits for the server's copies."""
    _xfer(client, _events or _Events(), device, key, instance_id, block_ids, stream, skip, True)


class TorchKV:
    """One engine worker's KV caches registered with kvstashd."""

    def __init__(self, client, instance_id, model, world_size, kv_caches, layout=None):
        self.client = client
        self.instance_id = instance_id
        self.model = model
        self.world_size = world_size
        self.kv_caches = list(kv_caches)
        self.layout = layout
        self.device = self.kv_caches[0].device if self.kv_caches else None
        self._events = _Events()

    def register(self):
        register_cuda(self.client, self.instance_id, self.model, self.world_size,
                      self.kv_caches, self.layout)

    def unregister(self):
        self.client.unregister(self.instance_id)

    def store(self, key, block_ids, stream=None):
        store(self.client, key, self.instance_id, block_ids, self.device, stream, self._events)

    def retrieve(self, key, block_ids, skip=0, stream=None):
        retrieve(self.client, key, self.instance_id, block_ids, self.device, skip, stream,
                 self._events)

