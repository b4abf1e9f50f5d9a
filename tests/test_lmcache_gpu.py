#!/usr/bin/python3
# Description: PyTorch engines speaking LMCache's exact wire format against kvstashd on a GPU: tests/gpu/lmcache_wire_gpu.py (March wire: pickled CudaIPCWrapper, IPC events), tests/gpu/lmcache_torch_e2e.py, then tests/gpu/lmcache_current_gpu.py (today's frozen-id wire: current RawCudaIPCWrapper with isolated-IPC 81-byte semaphore events, and CudaIPCWrapper at its new module path), then tests/gpu/warm_restart_gpu.py (a CUDA IPC registration and its chunks survive a kvstashd restart with --state-dir). Exits 77 without torch or a GPU. Labels: gpu
"""Runs the four GPU scripts in order; 0 pass, 1 fail, 77 skip."""
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
    for script in ("lmcache_wire_gpu.py", "lmcache_torch_e2e.py", "lmcache_current_gpu.py",
                   "warm_restart_gpu.py"):
        r = subprocess.call([sys.executable, os.path.join(HERE, "gpu", script)])
        print("%s: exit %d" % (script, r), flush=True)
        if r == 77:
            return 77
        rc |= r != 0
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
