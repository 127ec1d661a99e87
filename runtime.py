"""Run-time plumbing shared by the scripts: device, distributed set-up, precision, the CPU allocator, signals."""
import ctypes
import datetime
import functools
import inspect
import math
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


# ---- distributed (torchrun or SLURM) ----

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


def launched_ranks():
    """(rank, local rank, world size) of a process started by torchrun (RANK, LOCAL_RANK, WORLD_SIZE) or, without
    torchrun's variables, by SLURM's srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; the batch script exports
    MASTER_ADDR and MASTER_PORT); None for a single process (a plain `python script.py`, or one SLURM task)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    if not all(k in env for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")) or int(env["SLURM_NTASKS"]) < 2:
        return None
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise ValueError(f"SLURM started {env['SLURM_NTASKS']} tasks, but MASTER_ADDR and MASTER_PORT are not set: "
                         f"export them in the batch script (docs/distributed.md has an example).")
    return int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"])


def local_gpu(local_rank):
    """The GPU of a process: cuda:LOCAL_RANK when this process sees that many GPUs, else cuda:0 (a launcher such as
    srun with GPU binding gives each task its own CUDA_VISIBLE_DEVICES, in which its GPU is the first)."""
    return torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)


def setup_distributed(device_name=None, timeout_minutes=30):
    """Join the process group when torchrun or SLURM started several processes (launched_ranks); a plain
    `python script.py` needs no variables and runs as a single process.

    A collective that waits longer than `timeout_minutes` ends the job with an error instead of hanging.
    """
    ranks = launched_ranks()
    if ranks is None:
        return Dist(device=pick_device(device_name))
    rank, local_rank, world_size = ranks
    if "RANK" not in os.environ and rank == 0:  # python run in the batch script itself, not by srun, waits here
        print(f"Joining {world_size} SLURM tasks at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (srun "
              f"starts one per task).", flush=True)
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    device = use_device(local_gpu(local_rank)) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- rows of data between ranks: the token caches' encoded shares ----

CHUNK_BYTES = 64 << 20  # rows travel in pieces of at most this much per rank, so that no rank holds N copies at once


def collective_device():
    """Where the tensors of a collective live: the current GPU under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def row_chunks(length, dtype, row_shape):
    """(start, stop) pieces of `length` rows of this dtype and row shape, each of at most CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(1, dtype.itemsize * math.prod(row_shape)))
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def gather_rows(rows):
    """Rank 0 gets the rows of every rank, concatenated in rank order; the other ranks get None; every rank gets {}
    when no rank has a row. Call on every rank.

    rows: this rank's {key: tensor of n rows} (n may differ between ranks), or None for none; keys, dtypes and row
    shapes agree between the ranks that have rows. Shares of unequal length travel padded to the longest.
    """
    rows = rows or {}
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (len(next(iter(rows.values()))) if rows else 0,
                                    {key: (value.dtype, tuple(value.shape[1:])) for key, value in rows.items()}))
    specs = [spec for n, spec in counts if n > 0]
    if not specs:
        return {}
    device, longest, rank = collective_device(), max(n for n, _ in counts), dist.get_rank()
    gathered = {}
    for key, (dtype, row_shape) in specs[0].items():
        parts = [[] for _ in counts]  # per rank
        for start, stop in row_chunks(longest, dtype, row_shape):
            piece = torch.zeros((stop - start, *row_shape), dtype=dtype, device=device)
            mine = rows[key][start:stop] if key in rows else piece[:0]
            piece[:len(mine)] = mine
            received = [torch.empty_like(piece) for _ in counts] if rank == 0 else None
            dist.gather(piece, received, dst=0)
            if rank == 0:
                for r, ((n, _), got) in enumerate(zip(counts, received)):
                    parts[r].append(got[:max(0, min(stop, n) - start)].cpu())
        if rank == 0:
            gathered[key] = torch.cat([part for rank_parts in parts for part in rank_parts])
    return gathered if rank == 0 else None


def broadcast_rows(rows):
    """Every rank gets rank 0's `rows` ({key: tensor of n rows}); call on every rank (the others pass None)."""
    spec = [{key: (value.dtype, tuple(value.shape)) for key, value in rows.items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(spec, src=0)
    device, received = collective_device(), {}
    for key, (dtype, shape) in spec[0].items():
        pieces = []
        for start, stop in row_chunks(shape[0], dtype, shape[1:]):
            piece = rows[key][start:stop].to(device) if dist.get_rank() == 0 else \
                torch.empty((stop - start, *shape[1:]), dtype=dtype, device=device)
            dist.broadcast(piece, src=0)
            pieces.append(piece.cpu())
        received[key] = torch.cat(pieces) if pieces else torch.empty(shape, dtype=dtype)
    return received


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
        module = DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None, **no_broadcast)
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
