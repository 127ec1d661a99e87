"""Run-time plumbing shared by the scripts: distributed set-up, precision, resumable sampling, signals, help."""
import argparse
import ctypes
import functools
import math
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import CheckpointError, pick_device


# ---- distributed (torchrun) ----

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def setup_distributed(device_name=None):
    """Read torchrun's RANK/WORLD_SIZE; a plain `python script.py` runs as a single process with no variables."""
    if "RANK" not in os.environ:
        return Dist(device=pick_device(device_name))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_agree(flag, d: Dist):
    """True on every rank if `flag` is true on any rank (so all ranks skip, stop or save together)."""
    if not d.enabled:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---- the CPU's memory allocator and optimizers ----

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory(device):
    """On the CPU under glibc: serve big tensors from the heap and keep freed memory there for the next step.

    glibc gives every allocation over 32 MiB its own mmap and unmaps it on free, so each step's large activations
    are page-faulted in afresh, the kernel zeroing every 4 KiB page: about a fifth of a paper-config CPU step.
    With mmap off and the heap trimmed only above 2 GiB of free memory, freed blocks are reused instead once the
    heap has grown to a step's needs (a few steps), for some resident memory lost to fragmentation (README, Speed).
    Process-wide; does nothing off the CPU or off glibc. Returns whether it applied.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def fused_adam(device):
    """torch's fused Adam/AdamW kernels exist for CPU and CUDA tensors: one pass per tensor, 3x faster on the CPU."""
    return device.type in ("cpu", "cuda")


# ---- precision ----

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name, device):
    """The compute dtype: bf16 by default on CUDA devices that support it, fp32 otherwise."""
    if name is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16 else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU.")
    return name


def autocast(precision, device):
    """The autocast context for a forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def make_scaler(precision, device):
    """A gradient scaler, active only for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ---- resumable, shardable shuffling ----

class ResumableSampler(torch.utils.data.Sampler):
    """Shuffles with a seed per epoch, shards across ranks, and can start mid-epoch so a resume repeats no batch."""

    def __init__(self, num_items, batch_size, shuffle=True, seed=0, rank=0, world_size=1):
        self.num_items, self.batch_size, self.shuffle = num_items, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.per_rank = num_items // world_size  # equal shards keep the ranks in step (DDP needs that)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        return order[self.rank:self.per_rank * self.world_size:self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.start_batch * self.batch_size:])

    def __len__(self):
        return max(0, self.per_rank - self.start_batch * self.batch_size)


# ---- stopping cleanly on Ctrl-C / SIGTERM ----

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """Turns SIGINT and SIGTERM into a flag that the training loop checks, so it can save before exiting."""

    def __init__(self):
        self.received = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


def keeps_signal_handlers(main):
    """Decorator of the scripts' main(): the SIGINT/SIGTERM handlers of its caller are back on every way out.

    Without it, a notebook that ran main() would find Ctrl-C setting the flag of a finished run instead of
    interrupting.
    """
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            return main(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                if handler is not None:  # None: installed outside Python, which cannot be put back from here
                    signal.signal(sig, handler)
    return wrapper


# ---- small helpers of the training loops ----

def no_sync(module, sync):
    """DDP's no_sync() on micro-steps that only accumulate gradients; a no-op otherwise."""
    module = getattr(module, "_orig_mod", module)  # the DDP module inside torch.compile's wrapper
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def check_same_config(saved, current, ckpt_path):
    """Refuse to resume a checkpoint whose config differs from the flags, naming every differing field."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v  # a saved tuple comes back as a list
    mismatched = [k for k, v in current.items() if k in saved and norm(saved[k]) != norm(v)]
    if mismatched:
        raise CheckpointError(f"The checkpoint {ckpt_path} was trained with other values of "
                              f"{', '.join(mismatched)}; pass the same flags or another --out-dir.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None and the help text says what happens instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class NonFiniteGuard:
    """Skips the update of a step whose loss is not finite, and stops the run after `limit` such steps in a row."""

    def __init__(self, limit, ckpt_path):
        self.limit, self.ckpt_path, self.in_a_row = limit, ckpt_path, 0

    def skip(self, loss_value, step, d: Dist):
        """True when this step's update must be skipped (decided alike on every rank)."""
        if not all_ranks_agree(not math.isfinite(loss_value), d):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if d.is_main:
            print(f"Step {step}: non-finite loss, update skipped ({self.in_a_row} in a row).", flush=True)
        if self.in_a_row >= self.limit:
            kept = f"The last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists() else "Nothing was saved"
            raise FloatingPointError(f"{self.in_a_row} non-finite losses in a row: stopping. {kept}; try a lower "
                                     f"--learning-rate.")
        return True
