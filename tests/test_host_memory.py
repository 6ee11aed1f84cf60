"""Host memory: with `keep_freed_memory` a large tensor comes from malloc's heap, and its memory stays there for
the next one, instead of pages mapped for it alone and unmapped when it is freed."""

import json
import platform
import subprocess
import sys

import pytest

# in a process of its own (the policy is process-wide): where 64 MiB tensors come from, in MiB
PROBE = """
import ctypes, json, sys
import torch
from adaptive_attn.host_memory import glibc_policy, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
took = {"keep": keep_freed_memory, "glibc": glibc_policy}[sys.argv[1]]()
before = mallinfo2()
x = torch.ones(16 << 20)  # 64 MiB
during = mallinfo2()
del x
after = mallinfo2()
mib = lambda n: n / 2**20
print(json.dumps({
    "took": took,
    "mapped_for_it": mib(during.hblkhd - before.hblkhd),
    "heap_kept": mib(after.arena - before.arena),
}))
"""


def probe(policy: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, policy], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_tensors_come_from_the_heap_and_stay_there():
    glibc, kept = probe("glibc"), probe("keep")
    assert glibc["took"] and kept["took"]
    # glibc maps a 64 MiB block on its own and unmaps it when freed
    assert glibc["mapped_for_it"] >= 64 and glibc["heap_kept"] < 1
    # kept: no block of its own; after the tensor is freed its memory is still the heap's
    assert kept["mapped_for_it"] < 1 and kept["heap_kept"] >= 64


@pytest.mark.skipif(platform.libc_ver()[0] == "glibc", reason="elsewhere than glibc")
def test_other_mallocs_are_left_alone():
    from adaptive_attn.host_memory import keep_freed_memory

    assert keep_freed_memory() is False
