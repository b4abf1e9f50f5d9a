#!/usr/bin/python3
"""Write the seed corpus of fuzz_protocol (tests/fuzz/corpus/).

Each seed is one request as the server sees it after the ROUTER identity and
uid, in the harness's input format (see fuzz_protocol.c):
    byte 0: frame count - 1; then per frame: u16 little-endian length, bytes.
Frames are the real wire bytes of protocol.md (the §8 examples among them),
produced by the small msgpack encoder below, which writes the smallest forms
like msgspec. Standard library only.  Usage: make_corpus.py [OUT_DIR]
"""
import os
import struct
import sys


class Ext:
    def __init__(self, code, data):
        self.code, self.data = code, data


def pack(o):
    if o is None:
        return b"\xc0"
    if o is True:
        return b"\xc3"
    if o is False:
        return b"\xc2"
    if isinstance(o, int):
        if 0 <= o < 0x80:
            return bytes([o])
        if -32 <= o < 0:
            return struct.pack("b", o)
        if o >= 0:
            for code, fmt in ((0xCC, ">B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q")):
                if o < 1 << (8 * struct.calcsize(fmt)):
                    return bytes([code]) + struct.pack(fmt, o)
        for code, fmt in ((0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")):
            if o >= -(1 << (8 * struct.calcsize(fmt) - 1)):
                return bytes([code]) + struct.pack(fmt, o)
        raise ValueError(o)
    if isinstance(o, str):
        b = o.encode()
        if len(b) < 32:
            return bytes([0xA0 | len(b)]) + b
        if len(b) < 256:
            return b"\xd9" + bytes([len(b)]) + b
        return b"\xda" + struct.pack(">H", len(b)) + b
    if isinstance(o, bytes):
        if len(o) < 256:
            return b"\xc4" + bytes([len(o)]) + o
        return b"\xc5" + struct.pack(">H", len(o)) + o
    if isinstance(o, (list, tuple)):
        head = bytes([0x90 | len(o)]) if len(o) < 16 else b"\xdc" + struct.pack(">H", len(o))
        return head + b"".join(pack(x) for x in o)
    if isinstance(o, float):
        return b"\xcb" + struct.pack(">d", o)
    if isinstance(o, dict):
        head = bytes([0x80 | len(o)]) if len(o) < 16 else b"\xde" + struct.pack(">H", len(o))
        return head + b"".join(pack(k) + pack(v) for k, v in o.items())
    if isinstance(o, Ext):
        return b"\xc7" + bytes([len(o.data)]) + struct.pack("b", o.code) + o.data
    raise TypeError(type(o))


DIALECT = {"march": 0, "auto": 1, "current": 2}


def seed(type_no, *args, raw=None, dialect="march"):
    """type_no: an int op id, or a str op name (current dialect)."""
    frames = [pack(type_no)] + [pack(a) for a in args] + (raw or [])
    assert 1 <= len(frames) <= 8
    out = bytes([(len(frames) - 1) | DIALECT[dialect] << 3])
    for f in frames:
        out += struct.pack("<H", len(f)) + f
    return out


CUR = {"cache_salt": "", "request_configs": None, "num_kv_readers": 1, "null_chunk_mask": None}
CUR_NM = {"cache_salt": "s1", "request_configs": {"lmcache.skip_l2": True},
          "num_kv_readers": 2}


def key(worker=None, tokens=(1, 2, 3, 4), start=0, end=4, **extra):
    k = {"model_name": "m", "world_size": 1, "worker_id": worker, "token_ids": list(tokens),
         "start": start, "end": end, "request_id": "r"}
    k.update(extra)
    return k


def raw_key(token_bytes, count, dup=False):
    """A map key frame whose token_ids array is @count elements given as raw
    msgpack bytes (every int form, bools, out-of-range values); @dup repeats
    the field, as a Python dict decoder would keep the last."""
    k = key()
    fields = [pack(n) + (b"\xdc" + struct.pack(">H", count) + token_bytes if n == "token_ids"
                         else pack(v)) for n, v in k.items()]
    if dup:
        fields.append(pack("token_ids") + pack([9, 9]))
    return bytes([0x80 | len(fields)]) + b"".join(fields)


def desc(kind="host_shm", layout="flash_attn", shape=(2, 4, 16, 2, 8),
         stride=(1024, 256, 16, 8, 1), dtype="bfloat16", offset=0, nbytes=4096):
    d = {"kind": kind, "layout": layout, "shape": list(shape), "stride": list(stride),
         "dtype": dtype, "offset": offset, "nbytes": nbytes}
    if layout is None:
        del d["layout"]
    if kind == "cuda_ipc":
        d["mem_handle"] = bytes(range(64))
        d["device_uuid"] = "GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    else:
        d["path"] = "/kvstash-fuzz"
    return d


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    os.makedirs(out, exist_ok=True)
    ev = bytes(range(64))
    seeds = {
        "ping": seed(12),
        "ping_instance": seed(12, 0x7FFFFFFFFFFF0001),
        "get_chunk_size": seed(11),
        "noop": seed(13),
        "clear": seed(10),
        "ks_stats": seed(201),
        "lookup_s8": seed(5, key(), 1),
        "lookup_chunk_hash": seed(5, key(chunk_hash=None), 1),
        "lookup_array_key": seed(5, ["m", 1, None, [1, 2, 3, 4], 0, 4, "r"], 1),
        # token ids as the server reads them from the bytes: every int form
        "lookup_token_forms": seed(5, raw=[raw_key(
            b"\x05\xcc\xff\xcd\x01\x00\xce\x00\x01\x00\x00\xcf" + bytes(7) + b"\x07"
            b"\xd0\x05\xd1\x01\x00\xd2\x00\x00\x01\x00\xd3" + bytes(7) + b"\x09\xc3\xc2",
            11), pack(1)]),
        "lookup_token_negative": seed(5, raw=[raw_key(b"\x01\xd0\xff", 2), pack(1)]),
        "lookup_token_2p32": seed(5, raw=[raw_key(b"\xcf\x00\x00\x00\x01" + bytes(4), 1),
                                          pack(1)]),
        "lookup_token_float": seed(5, raw=[raw_key(b"\x01\xcb" + bytes(8), 2), pack(1)]),
        "lookup_token_dup": seed(5, raw=[raw_key(b"\x01\x02", 2, dup=True), pack(1)]),
        "free_lookup_locks": seed(8, key(tokens=range(0, 512, 3), start=0, end=256), 2),
        "store_host": seed(3, key(worker=0, tokens=range(8), end=8), 7, [0, 1], b""),
        "retrieve_gpu": seed(4, key(worker=1, tokens=range(300, 316), end=16), 12345,
                             [5, 70000], ev, 3),
        "register_host": seed(1, 7, [desc(), desc(offset=4096, nbytes=8192)], "m", 2),
        "register_cuda_hints": seed(1, 7, [desc("cuda_ipc", None, (4, 2, 16, 2, 8),
                                                (512, 256, 16, 8, 1))], "m", 1,
                                    {"engine": "vllm", "v": [1, None, True]}),
        "register_mla": seed(1, 3, [desc(layout=None, shape=(4, 16, 64), stride=(1024, 64, 1),
                                         dtype="uint8")], "deepseek", 1),
        "register_pickle": seed(1, 7, [Ext(1, b"\x80\x04\x95\x00\x00\x00.")], "m", 1),
        "unregister_s8": seed(2, 12345),
        "query_status": seed(6, 0),
        "query_hits": seed(7, 2**40),
        "end_session": seed(9, "cmpl-42"),
        # the current dialect (protocol.md §11): frozen ids, string ops, the new key
        "cur_lookup": seed(8, key(**CUR), 1, dialect="auto"),
        "cur_store_groups": seed(6, key(worker=0, tokens=range(8), end=8, **CUR), 7,
                                 [[0, 1], [2, 3]], b"stub_ipc_handle", dialect="current"),
        "cur_retrieve_sem": seed(7, key(worker=0, tokens=range(8), end=8,
                                        null_chunk_mask=[[False, True], [True]], **CUR_NM),
                                 7, [[0]], b"\x01" + bytes(80), 3, dialect="current"),
        "cur_register": seed(1, 7, [desc()], "m", 2, "vllm", {"kv_layout": "NHD"},
                             [{"engine_group_id": 0, "layer_indices": [0],
                               "tokens_per_block": 16, "sw_size_tokens": -1}],
                             dialect="auto"),
        "cur_query": seed(9, "cmpl-42", dialect="current"),
        "cur_wait": seed(10, "cmpl-42", 0.5, dialect="current"),
        "cur_end_info": seed(13, "r", {"finish_reason": "stop", "stop_token_id": 2},
                             dialect="current"),
        "cur_clear_force": seed(20, True, dialect="current"),
        "cur_ping": seed(22, None, dialect="auto"),
        "cur_experimental": seed(32, dialect="current"),
        "cur_report": seed(23, 7, "m", [{"req_id": "r", "new_block_ids": [1],
                                         "new_token_ids": [5]}], dialect="current"),
        "cur_unsupported": seed(14, {"instance_id": 7}, dialect="current"),
        "cur_str_op": seed("store_with_chunk_events", key(**CUR), 7, [[0]], b"",
                           dialect="current"),
        "ambiguous_9": seed(9, "r", dialect="auto"),
        # reply documents, as the client sees them (the harness decodes every
        # frame as a reply too)
        "replies": seed(13, raw=[b"\x92\xc4\x00\xc3", b"\x92\xc4\x40" + ev + b"\xc2",
                                 b"\xcd\x01\x00", b"\xa2OK", b"\xc0",
                                 pack({"requests_total": 5, "frames_dropped_total": 0})]),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    # protocol.md §8 LOOKUP key, byte for byte: the encoder above must agree
    s8 = bytes.fromhex("87aa6d6f64656c5f6e616d65a16daa776f726c645f73697a6501a9776f726b65725f6964"
                       "c0a9746f6b656e5f69647394010203 04a57374617274 00a3656e6404"
                       "aa726571756573745f6964a172".replace(" ", ""))
    assert pack(key()) == s8 and len(s8) == 77
    print(f"{len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
