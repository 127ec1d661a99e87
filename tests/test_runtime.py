"""runtime.py: big CPU tensors stop page-faulting in afresh at every step (reuse_freed_memory), and the scripts'
main() gives back the signal handlers it replaced (keeps_signal_handlers)."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import StopSignal, keeps_signal_handlers, reuse_freed_memory

FAULTS = """
import resource, sys, torch
from runtime import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory(torch.device("cpu"))
def step():
    # like a training step: activations of a few sizes (MiB) made in the forward, freed in the backward
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.ones(n * 2**18) for n in (64, 16, 64, 32, 64)]
    del kept
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[step() for _ in range(8)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parents[1])
        return [int(v) for v in out.stdout.split()]

    system, reuse = faults("system"), faults("reuse")
    # each step touches 240 MiB of fresh memory: 61k pages of 4 KiB
    assert min(system[-3:]) > 30000, system  # glibc maps and unmaps the big blocks every time
    assert min(reuse[-3:]) < 1000, reuse  # after a few steps the heap holds blocks for all of them


def test_only_the_cpu_is_touched():
    assert reuse_freed_memory(torch.device("meta")) is False


def test_main_gives_the_signal_handlers_back_on_return_and_on_error():
    def callers_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, callers_handler)
    term = signal.getsignal(signal.SIGTERM)
    try:
        @keeps_signal_handlers
        def main(fail):
            stop = StopSignal()
            assert signal.getsignal(signal.SIGINT) == stop._handle == signal.getsignal(signal.SIGTERM)
            if fail:
                raise ValueError("bad flag")
            return stop

        assert main(False).received is None
        assert signal.getsignal(signal.SIGINT) is callers_handler and signal.getsignal(signal.SIGTERM) is term
        with pytest.raises(ValueError, match="bad flag"):
            main(True)
        assert signal.getsignal(signal.SIGINT) is callers_handler and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, previous)
