"""`devices.retain_freed_cpu_memory`: freed CPU tensors are reused without page faults (each case in a fresh
process: the policy is process-wide and the test process keeps glibc's default)."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from dyndepth.devices import cpu_memory_policy, retain_freed_cpu_memory
retained = retain_freed_cpu_memory()
faults = []
for _ in range(8):  # 64 MiB: above glibc's largest mmap threshold, so by default a fresh mapping every time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(retained, cpu_memory_policy(), max(faults[4:]))  # the heap settles within a few rounds
"""


def _probe(policy: str) -> tuple[str, str, int]:
    env = {**os.environ, "DYNDEPTH_CPU_MEMORY": policy, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    retained, policy, faults = out.stdout.split()
    return retained, policy, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    retained, policy, faults = _probe("retain")
    assert (retained, policy) == ("True", "retained")
    assert faults < 100  # once the heap has grown, a 64 MiB tensor reuses freed pages
    retained, policy, faults = _probe("system")  # opted out: glibc maps and unmaps every large tensor
    assert (retained, policy) == ("False", "system")
    assert faults > 10_000  # 16,384 pages per 64 MiB
