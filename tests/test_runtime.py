"""runtime.reuse_freed_memory: big CPU tensors stop page-faulting in afresh on every allocation."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import reuse_freed_memory

FAULTS = """
import resource, sys, torch
from runtime import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory(torch.device("cpu"))
def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, written once and freed: like one activation of a training step
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_allocation()
print(min(faults_of_one_allocation() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parents[1])
        return int(out.stdout)

    assert faults("system") > 8000  # glibc maps and unmaps 64 MiB each time: ~16k fresh 4 KiB pages
    assert faults("reuse") < 100


def test_only_the_cpu_is_touched():
    assert reuse_freed_memory(torch.device("meta")) is False
