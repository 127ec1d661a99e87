"""Run-time plumbing shared by the scripts: device, distributed set-up, precision, the CPU allocator, signals."""
import ctypes
import datetime
import functools
import inspect
import os
import random
import signal
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


# ---- device and reproducibility ----

def pick_device(name=None):
    """The named device, else CUDA when available, else the CPU with a notice."""
    if name is not None:
        try:
            torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device '{name}' is not a device name torch knows (cpu, cuda, cuda:1, ...).") from None
        if torch.device(name).type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f"Device '{name}' was requested, but CUDA is not available on this machine.")
        return use_device(torch.device(name))
    if torch.cuda.is_available():
        return use_device(torch.device('cuda'))
    print('No CUDA device found: running on the CPU (slow).')
    return torch.device('cpu')


def use_device(device):
    """Make a CUDA device current (pinned memory, new tensors and cuDNN follow it, not GPU 0) and let cuDNN pick
    its fastest kernels for the fixed shapes of a training run."""
    if device.type == 'cuda':
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device


def seed_everything(seed):
    """Seed Python, NumPy and torch (torch.manual_seed covers every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def setup_distributed(device_name=None, timeout_minutes=30):
    """Read torchrun's RANK/WORLD_SIZE; a plain `python script.py` runs as a single process with no variables.

    A collective that waits longer than `timeout_minutes` ends the job with an error instead of hanging.
    """
    if "RANK" not in os.environ:
        return Dist(device=pick_device(device_name))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    device = use_device(torch.device("cuda", local_rank)) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


DDP_PARAMETERS = inspect.signature(DDP).parameters


def wrap_model(module, d: Dist, compile=False):
    """DDP (when distributed), then torch.compile around it, so that the compiler splits the graph at DDP's buckets.

    broadcast_buffers=False: DDP would otherwise copy rank 0's buffers into every rank before each forward. That is
    wasted work for the VQGAN's usage counters, and for the discriminator, run on real then fake images before one
    backward, it overwrites the BatchNorm statistics that the first forward saved for the backward (torch >= 2.6
    then fails the backward with "modified by an inplace operation"). Running statistics stay per rank; they are
    used only in eval mode, and rank 0's are saved.
    """
    if d.enabled:
        no_broadcast = {"forward_sync_buffers": False} if "forward_sync_buffers" in DDP_PARAMETERS else \
            {"broadcast_buffers": False}  # the name since torch 2.14; it still syncs buffers once, at wrapping
        module = DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, **no_broadcast)
    return torch.compile(module) if compile else module


def no_sync(*modules, sync):
    """DDP's no_sync() on micro-steps that only accumulate gradients; a no-op otherwise."""
    stack = ExitStack()
    for module in modules:
        module = getattr(module, "_orig_mod", module)  # the DDP module inside torch.compile's wrapper
        if not sync and isinstance(module, DDP):
            stack.enter_context(module.no_sync())
    return stack


# ---- the CPU's memory allocator and optimizers ----

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory(device):
    """On the CPU under glibc: serve big tensors from the heap and keep freed memory there for the next step.

    glibc gives every allocation over 32 MiB its own mmap and unmaps it on free, so each step's large activations
    are page-faulted in afresh, the kernel zeroing every 4 KiB page: about a fifth of a paper-config CPU step.
    With mmap off and the heap trimmed only above 2 GiB of free memory, freed blocks are reused instead once the
    heap has grown to a step's needs (a few steps), for some resident memory lost to fragmentation (docs/speed.md).
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


# ---- switches measured on the CPU: --recompute and --channels-last ----

def on_cpu_default(flag, device):
    """A switch's value: the flag when given, else on for the CPU (where it was measured to help), off on CUDA."""
    return device.type == "cpu" if flag is None else flag


def memory_format(channels_last):
    """The memory format of the stage-1 models and images: channels_last (NHWC) or the standard layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


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


def optimizer_step(opt, scaler):
    """Step and clear the gradients (a disabled scaler just steps; fp16's skips steps whose gradients overflowed)."""
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


# ---- stopping cleanly on Ctrl-C / SIGTERM ----

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM, after its checkpoint was saved."""

    def __init__(self, signal_name):
        super().__init__(f"stopped by {signal_name} after saving")
        self.signal_name = signal_name
        self.exit_code = 128 + signal.Signals[signal_name].value  # the shell's convention: 130, 143


class StopSignal:
    """Turns SIGINT and SIGTERM into a flag that the training loop checks, so it can save before exiting; with
    `announce`, says so at once (a step can take seconds, and a silent Ctrl-C gets pressed again)."""

    def __init__(self, announce=True):
        self.received, self.announce = None, announce
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name} came before the save; nothing was saved")
        self.received = signal.Signals(signum).name
        if self.announce:
            who = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else self.received
            say(f"{who} received: saving and stopping after the current step. Press Ctrl-C again to stop at once, "
                f"without saving.")


def say(message):
    """Print a line on stderr above any progress bar, also from a signal handler."""
    try:
        tqdm.write(message, file=sys.stderr)
    except RuntimeError:  # the signal came inside a write to stderr, whose lock it holds: write around the lock
        os.write(2, f"\n{message}\n".encode())


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


def usable_cores():
    """The cores this process may run on (its affinity where the OS tells it, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads):
    """--threads: torch's CPU threads (another job on the machine makes too many threads wait for each other)."""
    if threads:
        torch.set_num_threads(threads)
