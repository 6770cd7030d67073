"""Process-level speed settings: glibc keeps freed memory for reuse (keep_freed_memory)."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (the setting is process-wide): the page faults of a step's worth of allocations, 16 tensors of
# 4 MiB alive together (as a forward pass's activations are) and then freed, after two such steps.
PROBE = """
import resource, sys, torch
from src.performance import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle():
    tensors = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(16)]
    del tensors
cycle(); cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_keep_freed_memory_reuses_memory_instead_of_faulting_it_in_again():
    pages = (64 << 20) // 4096
    assert page_faults("default") > pages // 2  # glibc's default: memory returned on free and faulted in anew
    assert page_faults("keep") < pages // 16
