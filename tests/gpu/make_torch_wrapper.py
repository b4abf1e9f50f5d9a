#!/usr/bin/env python3
"""Make real-PyTorch LMCache CudaIPCWrapper pickles and check how to open them.

Run on a machine with a GPU and PyTorch (not part of ctest):

    python3 tests/gpu/make_torch_wrapper.py OUTDIR

For vLLM-shaped KV caches (flash_attn [2, NB, BS, NH, HS] bf16 per layer,
flashinfer fp16, MLA bf16 and fp8, a tensor that is a view at a non-zero
offset inside a larger caching-allocator block, a small-pool tensor) it
wraps each tensor exactly as LMCache's CudaIPCWrapper does (the class is
replicated here under its real module name, lmcache.v1.multiprocess.
custom_types, so pickle records the real GLOBAL), pickles it with every
protocol 2..HIGHEST, and records what the C decoder must find: the
_share_cuda_() tuple, data_ptr, the allocation base and size from
cuMemGetAddressRange, the expected byte offset and nbytes, the device UUID.

Then a child process that does NOT use torch (ctypes over libcuda, as
kvstashd would) opens each memory handle with cuIpcOpenMemHandle, applies
  offset = storage_offset_bytes (handle[3]) + storage_offset * elem_size
and reads the first, a middle and the last element of every tensor: they
must equal the bytes the parent wrote. This proves the offset semantics on
real PyTorch rather than by reading its source.

Also: an expandable-segments allocation (child process) to capture an 'e'
handle or the error; RawCudaIPCWrapper-style state (cuIpcGetMemHandle on
data_ptr); kvstash.torch.cuda_ipc_layer() against the same numbers.

Writes OUTDIR/torch_wrappers.json (pickles as hex) and prints a summary.
"""

import ctypes
import ctypes.util
import json
import os
import pickle
import subprocess
import sys
import types

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


def libcuda():
    lib = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
    u64 = ctypes.c_uint64
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(ctypes.c_size_t),
                                            u64]
    lib.cuIpcGetMemHandle.argtypes = [ctypes.c_char_p, u64]
    return lib


def install_lmcache_stub():
    """lmcache.v1.multiprocess.custom_types.CudaIPCWrapper, replicated (pinned version)."""
    import torch

    names = ["lmcache", "lmcache.v1", "lmcache.v1.multiprocess",
             "lmcache.v1.multiprocess.custom_types"]
    mods = {}
    for n in names:
        mods[n] = sys.modules.get(n) or types.ModuleType(n)
        sys.modules[n] = mods[n]
    ct = mods["lmcache.v1.multiprocess.custom_types"]

    class CudaIPCWrapper:
        def __init__(self, tensor, old_style_shape=False):
            storage = tensor.untyped_storage()
            handle = storage._share_cuda_()
            self.handle = handle
            self.dtype = tensor.dtype
            # pinned LMCache: tuple(tensor.shape); older ones kept the torch.Size
            self.shape = tensor.shape if old_style_shape else tuple(tensor.shape)
            self.stride = tuple(tensor.stride())
            self.storage_offset = int(tensor.storage_offset())
            self.device_uuid = str(torch.cuda.get_device_properties(tensor.device.index).uuid)

        @staticmethod
        def Serialize(obj, protocol=None):
            return pickle.dumps(obj, protocol=protocol)

    class RawCudaIPCWrapper(CudaIPCWrapper):
        def __init__(self, tensor):
            h = ctypes.create_string_buffer(64)
            rc = libcuda().cuIpcGetMemHandle(h, tensor.data_ptr())
            if rc:
                raise RuntimeError("cuIpcGetMemHandle: %d" % rc)
            self._ipc_handle_reserved = h.raw
            self._nbytes = tensor.untyped_storage().nbytes()
            self.handle = None
            self.dtype = tensor.dtype
            self.shape = tuple(tensor.shape)
            self.stride = tuple(tensor.stride())
            self.storage_offset = int(tensor.storage_offset())
            self.device_uuid = str(torch.cuda.get_device_properties(tensor.device.index).uuid)

    for cls in (CudaIPCWrapper, RawCudaIPCWrapper):
        cls.__module__ = ct.__name__
        cls.__qualname__ = cls.__name__
        setattr(ct, cls.__name__, cls)
    return CudaIPCWrapper, RawCudaIPCWrapper


def fill(t):
    """A per-element pattern that differs between neighbours and between tensors."""
    import torch

    n = t.numel()
    vals = (torch.arange(n, device=t.device, dtype=torch.int64) * 7 + t.data_ptr() // 256) % 120
    if t.dtype.is_floating_point and t.element_size() >= 2:
        t.copy_(vals.to(torch.float32).reshape(t.shape) - 60)
    else:
        t.copy_(vals.to(torch.uint8).reshape(t.shape).view(t.dtype)
                if t.element_size() == 1 else vals.reshape(t.shape))


def elem_bytes(t, idx):
    import torch

    v = t[idx].reshape(1)
    return bytes(v.view(torch.uint8).cpu().tolist()).hex()


def probe_points(t):
    shape = tuple(t.shape)
    first = tuple(0 for _ in shape)
    last = tuple(s - 1 for s in shape)
    mid = tuple(s // 2 for s in shape)
    out = []
    for idx in (first, mid, last):
        off_el = sum(i * s for i, s in zip(idx, t.stride()))
        out.append({"index": list(idx), "elem_offset": off_el, "bytes": elem_bytes(t, idx)})
    return out


def case(name, t, W, cuda, protocols, **kw):
    import torch

    torch.cuda.synchronize()
    w = W(t, **kw)
    h = w.handle
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), t.data_ptr())
    if rc:
        raise RuntimeError("cuMemGetAddressRange: %d" % rc)
    base_h = ctypes.create_string_buffer(64)
    cuda.cuIpcGetMemHandle(base_h, base.value)
    es = t.element_size()
    rec = {
        "name": name,
        "wrapper": type(w).__name__,
        "dtype": str(t.dtype).replace("torch.", ""),
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "storage_offset": t.storage_offset(),
        "elem_size": es,
        "device_uuid": w.device_uuid,
        "data_ptr": t.data_ptr(),
        "storage_ptr": t.untyped_storage().data_ptr(),
        "alloc_base": base.value,
        "alloc_size": size.value,
        "cu_ipc_handle_of_base": base_h.raw.hex(),
        "expect_offset": t.data_ptr() - base.value,
        "probes": probe_points(t),
        "pickles": {},
    }
    if h is not None:
        rec["share_cuda"] = {
            "device": h[0], "handle": h[1].hex(), "handle_len": len(h[1]),
            "size_bytes": h[2], "offset_bytes": h[3], "ref_counter": h[4].decode("latin1"),
            "ref_counter_offset": h[5], "event_handle": h[6].hex(), "event_sync": h[7],
        }
        rec["expect_nbytes"] = h[3] + h[2]
        assert rec["expect_offset"] == h[3] + t.storage_offset() * es, rec
    else:
        rec["raw_handle"] = w._ipc_handle_reserved.hex()
        rec["raw_nbytes"] = w._nbytes
    for p in protocols:
        rec["pickles"][str(p)] = pickle.dumps(w, protocol=p).hex()
    rec["pickles"]["default"] = pickle.dumps(w).hex()
    return rec


def child_open(recs_path):
    """No torch here: open each handle like kvstashd would and read the probes."""
    cuda = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
    u64 = ctypes.c_uint64
    cuda.cuInit(0)
    recs = json.load(open(recs_path))["cases"]
    dev = ctypes.c_int()
    ctx = ctypes.c_void_p()
    results = {}
    opened = {}
    for r in recs:
        if "share_cuda" not in r:
            handle = bytes.fromhex(r["raw_handle"])
            off = r["storage_offset"] * r["elem_size"]  # LMCache's Raw semantics: ptr = data
            nbytes = r["raw_nbytes"]
        else:
            sc = r["share_cuda"]
            blob = bytes.fromhex(sc["handle"])
            if len(blob) == 64:
                handle = blob
            else:
                assert blob[1:2] == b"c", blob[:2]
                handle = blob[2:66]
            off = sc["offset_bytes"] + r["storage_offset"] * r["elem_size"]
            nbytes = sc["offset_bytes"] + sc["size_bytes"]
        ordinal = 0
        if not ctx.value:
            cuda.cuDeviceGet(ctypes.byref(dev), ordinal)
            cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
            cuda.cuCtxSetCurrent(ctx)
        if handle in opened:
            ptr = opened[handle]
            rc = 0
        else:
            p = u64()
            # CUipcMemHandle is passed BY VALUE (a 64-byte struct), not by pointer
            hval = IpcMemHandle()
            ctypes.memmove(ctypes.addressof(hval), handle, 64)
            cuda.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(u64), IpcMemHandle,
                                                   ctypes.c_uint]
            rc = cuda.cuIpcOpenMemHandle_v2(ctypes.byref(p), hval,
                                            CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
            ptr = p.value
            if rc == 0:
                opened[handle] = ptr
        res = {"open_rc": rc, "offset": off, "nbytes": nbytes, "probes_ok": []}
        if rc == 0:
            b, s = u64(), ctypes.c_size_t()
            cuda.cuMemGetAddressRange_v2(ctypes.byref(b), ctypes.byref(s), u64(ptr))
            res["mapped_base_is_ptr"] = b.value == ptr
            res["mapped_size"] = s.value
            for pr in r["probes"]:
                n = r["elem_size"]
                buf = ctypes.create_string_buffer(n)
                at = ptr + off + pr["elem_offset"] * n
                rc2 = cuda.cuMemcpyDtoH_v2(buf, u64(at), ctypes.c_size_t(n))
                res["probes_ok"].append(rc2 == 0 and buf.raw[:n].hex() == pr["bytes"])
        results[r["name"]] = res
    print(json.dumps(results))


def expandable_child():
    """Child with expandable segments: what does _share_cuda_ give?"""
    import torch

    out = {"alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    t = torch.zeros(2, 64, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    try:
        h = t.untyped_storage()._share_cuda_()
        out["handle"] = h[1].hex()
        out["handle_len"] = len(h[1])
        out["offset_bytes"] = h[3]
        out["size_bytes"] = h[2]
        CudaIPCWrapper, _ = install_lmcache_stub()
        out["pickle"] = pickle.dumps(CudaIPCWrapper(t)).hex()
    except Exception as e:  # noqa: BLE001 - we want to record any failure
        out["error"] = "%s: %s" % (type(e).__name__, e)
    print(json.dumps(out))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child-open":
        return child_open(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-expandable":
        return expandable_child()
    outdir = sys.argv[1] if len(sys.argv) > 1 else "."
    import torch

    cuda = libcuda()
    CudaIPCWrapper, RawCudaIPCWrapper = install_lmcache_stub()
    torch.cuda.init()
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version,
            "pickle_default_protocol": pickle.DEFAULT_PROTOCOL,
            "device": props.name, "uuid": str(props.uuid)}
    protocols = list(range(2, pickle.HIGHEST_PROTOCOL + 1))
    recs = []
    keep = []

    # RawCudaIPCWrapper (later LMCache): a raw handle of data_ptr's allocation;
    # LMCache maps it and uses the mapping's base as element 0, right only when
    # the tensor starts its allocation, so it is allocated first (16 MiB: a
    # dedicated cudaMalloc on a fresh cache).
    raw = torch.empty(2, 128, 16, 16, 128, dtype=torch.bfloat16, device="cuda")
    keep.append(raw)
    fill(raw)
    recs.append(case("raw_wrapper", raw, RawCudaIPCWrapper, cuda, [4]))

    # flash_attn, 3 layers of 4 MiB: the caching allocator rounds a 1..10 MB
    # request up to one 20 MB segment and splits it, so layers 1 and 2 sit at a
    # non-zero offset inside their segment (handle[3] != 0).
    NB, BS, NH, HS = 64, 16, 8, 128
    for layer in range(3):
        t = torch.empty(2, NB, BS, NH, HS, dtype=torch.bfloat16, device="cuda")
        fill(t)
        keep.append(t)
        recs.append(case("flash_attn_l%d" % layer, t, CudaIPCWrapper, cuda, protocols))
    # a view at a non-zero element offset inside a bigger tensor (storage_offset != 0)
    big = torch.empty(2 * NB * BS * NH * HS + 4096 + 333, dtype=torch.bfloat16, device="cuda")
    v = big[4096:4096 + 2 * NB * BS * NH * HS].view(2, NB, BS, NH, HS)
    fill(v)
    keep.append(big)
    recs.append(case("flash_attn_view", v, CudaIPCWrapper, cuda, protocols))
    # vLLM's NHD view over an HND allocation: non-contiguous strides
    hnd = torch.empty(2, NB, NH, BS, HS, dtype=torch.bfloat16, device="cuda")
    nhd = hnd.permute(0, 1, 3, 2, 4)
    fill(nhd)
    keep.append(hnd)
    recs.append(case("flash_attn_strided", nhd, CudaIPCWrapper, cuda, [4]))
    # flashinfer [NB, 2, BS, NH, HS] fp16
    fi = torch.empty(NB, 2, BS, NH, HS, dtype=torch.float16, device="cuda")
    fill(fi)
    keep.append(fi)
    recs.append(case("flashinfer", fi, CudaIPCWrapper, cuda, [4]))
    # MLA [NB, BS, 576] bf16, big enough for its own 20 MB segment
    mla = torch.empty(1024, 16, 576, dtype=torch.bfloat16, device="cuda")
    fill(mla)
    keep.append(mla)
    recs.append(case("mla", mla, CudaIPCWrapper, cuda, protocols))
    # MLA fp8 (the dtype global torch.float8_e4m3fn)
    mla8 = torch.empty(256, 16, 576, dtype=torch.uint8, device="cuda")
    fill(mla8)
    mla8 = mla8.view(torch.float8_e4m3fn)
    keep.append(mla8)
    recs.append(case("mla_fp8", mla8, CudaIPCWrapper, cuda, [4]))
    # a small-pool tensor (< 1 MB: 2 MB segments shared by many small blocks)
    pad = torch.empty(1000, dtype=torch.uint8, device="cuda")
    keep.append(pad)
    small = torch.empty(2, 4, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    fill(small)
    keep.append(small)
    recs.append(case("small_pool", small, CudaIPCWrapper, cuda, [4]))
    # older LMCache kept shape as torch.Size (pickled as torch.Size REDUCE)
    recs.append(case("torch_size_shape", keep[0], CudaIPCWrapper, cuda, [4],
                     old_style_shape=True))
    torch.cuda.synchronize()

    # kvstash.torch against the same numbers
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "python"))
    kt_res = {}
    try:
        import kvstash.torch as kt

        by_name = {r["name"]: r for r in recs}
        for r, t in ((by_name["flash_attn_l0"], keep[1]), (by_name["flash_attn_view"], v),
                     (by_name["flashinfer"], fi), (by_name["small_pool"], small)):
            h, off, nb = kt.cuda_ipc_layer(t)
            kt_res[r["name"]] = {"offset_ok": off == r["expect_offset"],
                                 "nbytes_ok": nb == r["alloc_size"],
                                 "handle_eq_cu_base": h.hex() == r["cu_ipc_handle_of_base"]}
    except Exception as e:  # noqa: BLE001
        kt_res["error"] = "%s: %s" % (type(e).__name__, e)

    path = os.path.join(outdir, "torch_wrappers.json")
    with open(path, "w") as f:
        json.dump({"info": info, "cases": recs}, f, indent=1)
    child = subprocess.run([sys.executable, __file__, "--child-open", path],
                           capture_output=True, text=True, timeout=120)
    opened = json.loads(child.stdout) if child.returncode == 0 else {"error": child.stderr}
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
               TORCH_CUDA_EXPANDABLE_SEGMENTS_IPC="1")
    ex = subprocess.run([sys.executable, __file__, "--child-expandable"], env=env,
                        capture_output=True, text=True, timeout=120)
    expandable = json.loads(ex.stdout) if ex.returncode == 0 else {"error": ex.stderr[-2000:]}
    with open(path, "w") as f:
        json.dump({"info": info, "cases": recs, "child_open": opened,
                   "expandable": expandable, "kvstash_torch": kt_res}, f, indent=1)

    print(json.dumps(info))
    ok = True
    for r in recs:
        o = opened.get(r["name"], {})
        sc = r.get("share_cuda", {})
        good = o.get("open_rc") == 0 and all(o.get("probes_ok", [False]))
        ok &= good
        print("%-20s len=%s off_bytes=%s size=%s so=%s expect_off=%d alloc=%d open=%s probes=%s"
              " handle[:2]=%s cu_eq=%s" % (
                  r["name"], sc.get("handle_len"), sc.get("offset_bytes"), sc.get("size_bytes"),
                  r["storage_offset"], r["expect_offset"], r["alloc_size"], o.get("open_rc"),
                  o.get("probes_ok"), sc.get("handle", "")[:4],
                  sc.get("handle", "")[4:132] == r["cu_ipc_handle_of_base"]))
    print("expandable:", {k: (v if k != "pickle" else len(v) // 2)
                          for k, v in expandable.items()})
    print("kvstash.torch:", kt_res)
    if "error" in opened:
        print(opened["error"][-3000:])
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
