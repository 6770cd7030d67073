"""Process-level speed settings: glibc keeps freed memory for reuse (keep_freed_memory)."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (the setting is process-wide), two figures: the bytes glibc holds in mappings of their own
# while a 24 MiB tensor is alive, and the page faults of a step's worth of allocations (16 tensors of 4 MiB alive
# together, as a forward pass's activations are, then freed) after two such steps.
PROBE = """
import ctypes, resource, sys, torch
from codeq.training.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
tensor = torch.ones(24 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd
del tensor
def step():
    tensors = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(16)]
    del tensors
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def mapped_bytes_and_page_faults(mode: str) -> tuple[int, int]:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    mapped, faults = result.stdout.split()
    return int(mapped), int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_keep_freed_memory_serves_tensors_from_the_reused_heap():
    mapped, _ = mapped_bytes_and_page_faults("default")
    assert mapped >= 24 << 20  # glibc's default: a mapping of its own, returned to the system on free
    mapped, faults = mapped_bytes_and_page_faults("keep")
    assert mapped < 24 << 20
    # Freed memory is faulted in once and then reused. (By default glibc usually trims the freed top of the heap
    # and the next step faults all 16,384 pages in again, but not always, so that is not asserted.) A stray
    # allocation elsewhere may cost one tensor's worth.
    assert faults <= 1024
