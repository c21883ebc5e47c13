"""`devices.retain_freed_cpu_memory`: freed CPU tensors are reused without page faults (each case in a fresh
process: the policy is process-wide and the test process keeps glibc's default)."""

import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

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

CLI = """
import sys
from dyndepth import cli
from dyndepth.devices import cpu_memory_policy
sys.argv = ["dyndepth", "--help"]
try:
    cli.main()
except SystemExit:
    pass
print(cpu_memory_policy())
"""


def _python(code: str, policy: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}  # torch's huge pages: fewer faults
    env.update(DYNDEPTH_CPU_MEMORY=policy, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _probe(out: subprocess.CompletedProcess) -> tuple[str, str, int]:
    assert out.returncode == 0, out.stderr
    retained, policy, faults = out.stdout.split()
    return retained, policy, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    with ThreadPoolExecutor(3) as pool:  # the 3 processes at once: their start-up (imports) takes the time
        retain, system, cli = pool.map(_python, (PROBE, PROBE, CLI), ("retain", "system", "auto"))
    retained, policy, faults = _probe(retain)
    assert (retained, policy) == ("True", "retained")
    assert faults < 100  # once the heap has grown, a 64 MiB tensor reuses freed pages
    retained, policy, system_faults = _probe(system)  # opted out: glibc maps and unmaps every large tensor
    assert (retained, policy) == ("False", "system")
    assert system_faults > max(16, 10 * faults)  # 16,384 pages per 64 MiB (32 with transparent huge pages)
    expected = "system" if torch.cuda.is_available() else "retained"  # auto: CPU-only hosts
    assert cli.stdout.split()[-1] == expected  # every dyndepth command applies the policy


def test_an_unknown_policy_is_a_clear_error():
    out = _python("from dyndepth.cli import main; main()", "retian")
    assert out.returncode == 2 and "DYNDEPTH_CPU_MEMORY='retian' is not one of auto, retain, system" in out.stderr
