"""runtime.py: big CPU tensors stop page-faulting in afresh at every step (reuse_freed_memory), the scripts' main()
gives back the signal handlers it replaced (keeps_signal_handlers), and the ranks and GPU of a process started by
torchrun or SLURM."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import StopSignal, keeps_signal_handlers, launched_ranks, local_gpu, reuse_freed_memory

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


LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "MASTER_ADDR",
                    "MASTER_PORT")


@pytest.mark.parametrize("variables, ranks", [
    ({}, None),  # python script.py
    (dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4"), (3, 1, 4)),  # torchrun
    (dict(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8", MASTER_ADDR="n1", MASTER_PORT="29500"), (5, 1, 8)),
    (dict(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1"), None),  # one SLURM task: a single process
    (dict(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1"),
     (1, 0, 2)),  # torchrun inside a SLURM job: torchrun's variables win
])
def test_ranks_come_from_torchrun_or_slurm(monkeypatch, variables, ranks):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert launched_ranks() == ranks


def test_slurm_tasks_without_a_master_address_are_one_sentence(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NTASKS="2").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="SLURM started 2 tasks, but MASTER_ADDR and MASTER_PORT are not set"):
        launched_ranks()


@pytest.mark.parametrize("visible, local_rank, index", [(8, 3, 3), (1, 3, 0), (2, 1, 1), (2, 5, 0)])
def test_the_gpu_is_the_local_rank_only_where_the_process_sees_it(monkeypatch, visible, local_rank, index):
    """torchrun on a node of 8 GPUs: cuda:3; srun with GPU binding (each task sees its own GPU alone): cuda:0."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert local_gpu(local_rank) == torch.device("cuda", index)
