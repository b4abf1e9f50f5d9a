#!/usr/bin/python3
"""Regenerate the golden pickles that tests/test_pickle.c decodes.

    /usr/bin/python3 tests/data/make_pickles.py

Standard library only. Two sources:

1. Synthetic: LMCache's CudaIPCWrapper (lmcache.v1.multiprocess.custom_types)
   with the real _share_cuda_() tuple layout, pickled with protocols 2-5.
   Stub modules named torch and lmcache... are put in sys.modules so pickle
   records the real GLOBAL names (torch.bfloat16 pickles as the global
   torch.bfloat16 because torch.dtype.__reduce__ returns its name; torch.Size
   as REDUCE of torch.Size with a tuple).
2. Real PyTorch: tests/data/torch211_h100.json, written on an H100 with
   PyTorch 2.11 by tests/gpu/make_torch_wrapper.py; each case holds the
   pickles and, measured independently of the pickle, the tensor's offset
   from its allocation base (cuMemGetAddressRange) and the
   cuIpcGetMemHandle of that base.

Writes tests/data/pickle_*.pkl (copied to tests/fuzz/corpus_pickle as fuzzer
seeds) and tests/data/pickles.txt, one line per file:
  ok  FILE KIND DTYPE SHAPE STRIDE STORAGE_OFFSET OFFSET_BYTES SIZE_BYTES DEVICE
      VERSION MEM_HANDLE_HEX EVENT_SYNC UUID LAYOUT DESC_OFFSET DESC_NBYTES
  err FILE PK_ERRNO PROTO_ERRNO WORD
(SHAPE/STRIDE comma-separated; KIND 0 CudaIPCWrapper, 1 RawCudaIPCWrapper;
DESC_* are the proto_kv_desc offset/nbytes that REGISTER must produce; WORD
must appear in the error message.) Hand-made hostile pickles (os.system,
builtins.eval, subprocess.Popen) are written as bytes, never loaded.
"""

import json
import os
import pickle
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
UUID = "eb785ce3-3af4-d132-2354-ac04ef099e7a"
H64 = bytes(range(0x40, 0x80))          # a recognisable cudaIpcMemHandle_t
EV64 = bytes(range(0xc0, 0x100))
REF = b"/torch_4242_1234567_0"


# ---- stubs with the real names ------------------------------------------------------

class Dtype:
    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return self.name          # as torch.dtype: pickled as the global torch.<name>


class Size(tuple):
    def __reduce__(self):
        return (Size, (tuple(self),))


def install_stubs():
    torch = types.ModuleType("torch")
    for n in ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "uint8",
              "int8", "float64"):
        setattr(torch, n, Dtype(n))
    Dtype.__module__ = "torch"
    Size.__module__ = "torch"
    Size.__qualname__ = "Size"
    torch.Size = Size
    sys.modules["torch"] = torch
    names = ["lmcache", "lmcache.v1", "lmcache.v1.multiprocess",
             "lmcache.v1.multiprocess.custom_types"]
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    ct = sys.modules[names[-1]]

    class CudaIPCWrapper:
        pass

    class RawCudaIPCWrapper(CudaIPCWrapper):
        pass

    for cls in (CudaIPCWrapper, RawCudaIPCWrapper):
        cls.__module__ = ct.__name__
        cls.__qualname__ = cls.__name__
        setattr(ct, cls.__name__, cls)
    return torch, CudaIPCWrapper, RawCudaIPCWrapper


def dense(shape):
    st, s = [], 1
    for n in reversed(shape):
        st.append(s)
        s *= n
    return tuple(reversed(st))


ESIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1,
         "uint8": 1, "int8": 1}


def layout_of(shape):
    if len(shape) == 3:
        return "mla"
    return "flash_attn" if shape[0] == 2 else "flashinfer"


def wrapper(cls, state):
    w = cls.__new__(cls)
    w.__dict__.update(state)      # declaration order of the pinned __init__
    return w


class Out:
    def __init__(self):
        self.lines = []
        self.files = []

    def write(self, name, data):
        path = os.path.join(HERE, "pickle_%s.pkl" % name)
        with open(path, "wb") as f:
            f.write(data)
        self.files.append(os.path.basename(path))
        return os.path.basename(path)

    def ok(self, name, data, kind, dtype, shape, stride, so, off_b, size_b, device, version,
           handle, sync, uuid, desc_off, desc_nbytes):
        f = self.write(name, data)
        self.lines.append(" ".join(str(x) for x in (
            "ok", f, kind, dtype, ",".join(map(str, shape)), ",".join(map(str, stride)), so,
            off_b, size_b, device, version, handle.hex(), int(bool(sync)), uuid,
            layout_of(shape), desc_off, desc_nbytes)))

    def err(self, name, data, pk_errno, proto_errno, word):
        f = self.write(name, data)
        self.lines.append("err %s %s %s %s" % (f, pk_errno, proto_errno, word))


def synthetic(out, torch, W, Raw):
    def cuda_case(name, protocols, dtype, shape, so=0, off_b=8388608, size_b=None, blob=None,
                  sync=True, uuid=UUID, stride=True, torch_size=False, extra=None):
        size_b = size_b if size_b is not None else \
            (so + (sum((n - 1) * s for n, s in zip(shape, dense(shape))) + 1)) * ESIZE[dtype]
        blob = blob if blob is not None else b"\x02c" + H64
        handle = (0, blob, size_b, off_b, REF, 3, EV64 if sync else bytes(64), sync)
        state = {"handle": handle, "dtype": getattr(torch, dtype),
                 "shape": Size(shape) if torch_size else tuple(shape)}
        if stride:
            state["stride"] = dense(shape)
            state["storage_offset"] = so
        state["device_uuid"] = uuid
        state.update(extra or {})
        version = 0 if len(blob) == 64 else blob[0]
        for p in protocols:
            out.ok("%s_p%d" % (name, p), pickle.dumps(wrapper(W, state), protocol=p), 0, dtype,
                   shape, dense(shape), so if stride else 0, off_b, size_b, 0, version, H64,
                   sync, uuid, off_b + (so if stride else 0) * ESIZE[dtype], off_b + size_b)

    cuda_case("syn_flash", [2, 3, 4, 5], "bfloat16", (2, 64, 16, 8, 128))
    cuda_case("syn_legacy64", [4], "float8_e4m3fn", (128, 16, 576), so=4096, off_b=0,
              blob=H64, sync=False)
    cuda_case("syn_size_shape", [2, 4], "float16", (64, 2, 16, 8, 128), torch_size=True,
              uuid="GPU-" + UUID)
    cuda_case("syn_nostride", [4], "bfloat16", (2, 8, 16, 4, 64), stride=False)
    # sizes past 2**31 take LONG1; an unknown extra field is ignored
    cuda_case("syn_big", [2, 4], "bfloat16", (2, 4096, 16, 8, 128), off_b=3 << 32,
              size_b=5 << 30, extra={"_later_field": [1, {"a": None}]})
    cuda_case("syn_version1", [4], "uint8", (2, 8, 16, 4, 64), blob=b"\x01c" + H64)
    cuda_case("syn_version3", [4], "int8", (2, 8, 16, 4, 64), blob=b"\x03c" + H64)

    raw = {"_ipc_handle_reserved": H64, "_nbytes": 2 * 8 * 16 * 4 * 64 * 2, "handle": None,
           "dtype": torch.bfloat16, "shape": (2, 8, 16, 4, 64), "stride": dense((2, 8, 16, 4, 64)),
           "storage_offset": 0, "device_uuid": UUID}
    out.ok("syn_raw_p4", pickle.dumps(wrapper(Raw, raw), protocol=4), 1, "bfloat16",
           raw["shape"], raw["stride"], 0, 0, raw["_nbytes"], -1, 0, H64, 0, UUID, 0,
           raw["_nbytes"])
    raw2 = dict(raw, storage_offset=64)
    out.err("syn_raw_offset", pickle.dumps(wrapper(Raw, raw2), protocol=4), "0", "EPROTO",
            "storage_offset")

    def bad(name, pk_errno, proto_errno, word, protocol=4, **over):
        shape = (2, 8, 16, 4, 64)
        handle = list((0, b"\x02c" + H64, 2 * 8 * 16 * 4 * 64 * 2, 0, REF, 0, EV64, True))
        as_list = over.pop("handle_as_list", False)
        for k, v in over.pop("handle", {}).items():
            handle[k] = v
        state = {"handle": handle if as_list else tuple(handle), "dtype": torch.bfloat16, "shape": shape,
                 "stride": dense(shape), "storage_offset": 0, "device_uuid": UUID}
        state.update(over)
        for k in [k for k, v in state.items() if v is KeyError]:
            del state[k]
        out.err(name, pickle.dumps(wrapper(W, state), protocol=protocol), pk_errno,
                proto_errno, word)

    bad("bad_version9", "EOPNOTSUPP", "EPROTO", "version", handle={1: b"\x09c" + H64})
    bad("bad_type_x", "EPROTO", "EPROTO", "type", handle={1: b"\x02x" + H64})
    bad("bad_blob65", "EPROTO", "EPROTO", "65", handle={1: b"\x02c" + H64[:63]})
    bad("bad_empty_storage", "EOPNOTSUPP", "EPROTO", "empty", handle={1: None})
    bad("bad_event63", "EPROTO", "EPROTO", "event", handle={6: EV64[:63]})
    bad("bad_sync_int", "EPROTO", "EPROTO", "bool", handle={7: 1})
    bad("bad_neg_offset", "EPROTO", "EPROTO", "offset", handle={3: -1})
    bad("bad_float64", "EPERM", "EPROTO", "torch.float64", dtype=torch.float64)
    bad("bad_no_uuid", "EPROTO", "EPROTO", "device_uuid", device_uuid=KeyError)
    bad("bad_uuid_text", "0", "EPROTO", "device_uuid", device_uuid="not-a-uuid")
    bad("bad_dims4", "0", "EPROTO", "dims", shape=(2, 8, 16, 256), stride=dense((2, 8, 16, 256)))
    bad("bad_stride_len", "EPROTO", "EPROTO", "stride", stride=(1, 1))
    bad("bad_extent", "0", "EPROTO", "exceeds", handle={2: 1024})
    bad("bad_handle_list", "EPROTO", "EPROTO", "handle", handle_as_list=True)
    bad("bad_layout", "0", "EPROTO", "layout", shape=(4, 8, 16, 4, 64),
        stride=dense((4, 8, 16, 4, 64)), handle={2: 1 << 24})

    # hostile pickles, hand-made: never unpickled here
    out.err("evil_os_system", b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02R"
            b"q\x03.", "EPERM", "EPROTO", "os.system")
    out.err("evil_builtins_eval", b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x031+1\x85R.",
            "EPERM", "EPROTO", "builtins.eval")
    out.err("evil_subprocess_popen", b"\x80\x03csubprocess\nPopen\n]q\x00X\x04\x00\x00\x00true"
            b"q\x01a\x85R.", "EPERM", "EPROTO", "subprocess.Popen")
    # os.system hidden in a valid wrapper: device_uuid's str swapped for a REDUCE
    good = pickle.dumps(wrapper(W, {
        "handle": (0, b"\x02c" + H64, 4096, 0, REF, 0, EV64, True), "dtype": torch.bfloat16,
        "shape": (2, 1, 16, 1, 64), "stride": dense((2, 1, 16, 1, 64)), "storage_offset": 0,
        "device_uuid": "@@EVIL@@"}), protocol=2)
    marker = b"X\x08\x00\x00\x00@@EVIL@@"
    assert good.count(marker) == 1
    evil = good.replace(marker, b"cos\nsystem\nX\x04\x00\x00\x00true\x85R")
    out.err("evil_nested_os_system", evil, "EPERM", "EPROTO", "os.system")
    # allowed names used the wrong way
    out.err("evil_reduce_wrapper", b"\x80\x04\x8c$lmcache.v1.multiprocess.custom_types\x8c\x0e"
            b"CudaIPCWrapper\x93)R.", "EPERM", "EPROTO", "REDUCE")
    out.err("evil_newobj_size", b"\x80\x04\x8c\x05torch\x8c\x04Size\x93)\x81.", "EPERM",
            "EPROTO", "NEWOBJ")
    out.err("evil_codecs_rot13", b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00"
            b"\x00rot13\x86R.", "EPERM", "EPROTO", "latin1")
    out.err("not_a_wrapper", pickle.dumps({"handle": None}, protocol=4), "EPROTO", "EPROTO",
            "dict")


def real(out):
    path = os.path.join(HERE, "torch211_h100.json")
    d = json.load(open(path))
    for c in d["cases"]:
        sc = c.get("share_cuda")
        protos = ["2", "3", "4", "5"] if c["name"] in ("flash_attn_l1", "mla") else ["4"]
        for p in protos:
            data = bytes.fromhex(c["pickles"][p])
            name = "torch211_%s_p%s" % (c["name"], p)
            if sc is None:   # RawCudaIPCWrapper: element 0 is the mapping's base
                assert c["expect_offset"] == 0
                out.ok(name, data, 1, c["dtype"], c["shape"], c["stride"], c["storage_offset"],
                       0, c["raw_nbytes"], -1, 0, bytes.fromhex(c["raw_handle"]), 0,
                       c["device_uuid"], 0, c["raw_nbytes"])
                continue
            blob = bytes.fromhex(sc["handle"])
            # the handle inside the blob is the one the driver gives for the base
            assert blob[2:].hex() == c["cu_ipc_handle_of_base"]
            out.ok(name, data, 0, c["dtype"], c["shape"], c["stride"], c["storage_offset"],
                   sc["offset_bytes"], sc["size_bytes"], sc["device"], blob[0],
                   bytes.fromhex(c["cu_ipc_handle_of_base"]), sc["event_sync"],
                   c["device_uuid"], c["expect_offset"], sc["offset_bytes"] + sc["size_bytes"])
    ex = d["expandable"]
    out.err("torch211_expandable_p4", bytes.fromhex(ex["pickle"]), "EOPNOTSUPP", "EPROTO",
            "expandable")


def main():
    for f in os.listdir(HERE):
        if f.startswith("pickle_") and f.endswith(".pkl"):
            os.remove(os.path.join(HERE, f))
    torch, W, Raw = install_stubs()
    out = Out()
    synthetic(out, torch, W, Raw)
    real(out)
    with open(os.path.join(HERE, "pickles.txt"), "w") as f:
        f.write("# generated by make_pickles.py; format in its docstring\n")
        f.write("\n".join(out.lines) + "\n")
    # the same files seed the fuzzer (tests/fuzz/run.sh 60 pickle)
    corpus = os.path.join(HERE, "..", "fuzz", "corpus_pickle")
    os.makedirs(corpus, exist_ok=True)
    for f in os.listdir(corpus):
        os.remove(os.path.join(corpus, f))
    for f in out.files:
        with open(os.path.join(HERE, f), "rb") as src, \
                open(os.path.join(corpus, f[len("pickle_"):-len(".pkl")]), "wb") as dst:
            dst.write(src.read())
    print("%d pickles" % len(out.files))


if __name__ == "__main__":
    main()
