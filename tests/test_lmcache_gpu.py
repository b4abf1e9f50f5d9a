#!/usr/bin/python3
# Description: PyTorch engines speaking LMCache's exact wire format (pickled CudaIPCWrapper, IPC events) against kvstashd on a GPU: tests/gpu/lmcache_wire_gpu.py then tests/gpu/lmcache_torch_e2e.py. Exits 77 without torch or a GPU. Labels: gpu
"""Runs the two GPU scripts in order; 0 pass, 1 fail, 77 skip."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    try:
        import torch
    except ImportError:
        print("skip: no torch")
        return 77
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return 77
    rc = 0
    for script in ("lmcache_wire_gpu.py", "lmcache_torch_e2e.py"):
        r = subprocess.call([sys.executable, os.path.join(HERE, "gpu", script)])
        print("%s: exit %d" % (script, r), flush=True)
        if r == 77:
            return 77
        rc |= r != 0
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
