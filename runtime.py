"""Run-time plumbing shared by the scripts: device, distributed set-up, precision, signals, and TrainingRun, the
part of the two training loops that is not the algorithm (resume, atomic saves, stop signals, the non-finite guard,
epochs and skipped files, the metrics log and progress bar)."""
import ctypes
import datetime
import functools
import os
import random
import signal
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import check_same_config, load_checkpoint, save_checkpoint
from data import DataError, ResumableSampler, build_loader, find_images, resolve_dataset
from utils import MetricsLog, check_writable


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


def wrap_model(module, d: Dist, compile=False):
    """DDP (when distributed), then torch.compile around it, so that the compiler splits the graph at DDP's buckets.

    broadcast_buffers=False: DDP would otherwise copy rank 0's buffers into every rank before each forward. That is
    wasted work for the VQGAN's usage counters, and for the discriminator, run on real then fake images before one
    backward, it overwrites the BatchNorm statistics that the first forward saved for the backward (torch >= 2.6
    then fails the backward with "modified by an inplace operation"). Running statistics stay per rank; they are
    used only in eval mode, and rank 0's are saved.
    """
    if d.enabled:
        module = DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False)
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


# ---- TrainingRun: what both training loops share ----

class TrainingRun:
    """Everything of a training run that is not the algorithm: the script builds its models, then loops

        for batches in run.steps(loader):      # the micro-batches of one optimizer step
            ...forward, backward...
            if run.skip_update(loss): ...      # non-finite on any rank: keep the last good weights
            ...optimizer step...
            run.end_step(metrics)              # count, log every --log-every steps, save every --save-every

    and run.finish() saves the last checkpoint. `run.state_dict` (set by the script) returns the models' and
    optimizers' states; the run adds its position (step, epoch, batch in epoch), the config and the flags.
    """

    def __init__(self, args, name):
        self.args, self.name = args, name
        self.d = setup_distributed(args.device, args.dist_timeout)
        self.device, self.is_main = self.d.device, self.d.is_main
        reuse_freed_memory(self.device)
        self.precision = resolve_precision(args.precision, self.device)
        self.out_dir = Path(args.out_dir)
        self.results = self.out_dir / "results"
        self.ckpt_path = self.out_dir / "checkpoints" / f"{name}_last.pt"
        if self.is_main:
            check_writable(self.out_dir)
        seed_everything(args.seed + self.d.rank)  # different noise per rank, the same model init after DDP's broadcast
        self.step = self.epoch = self.batch_in_epoch = 0
        self.config, self.state_dict, self.log, self.bar = None, None, None, None
        self.stop = StopSignal()
        self.stopped, self.nonfinite_in_a_row, self.skipped_files = False, 0, 0
        self.flags = torch.zeros(2, device=self.device)  # (non-finite loss, stop requested): one collective a step
        self.sums, self.count = None, 0

    def dataset_paths(self, path, default_path):
        """The data set's image files; rank 0 writes the demo set first if the default path is still empty."""
        paths = resolve_dataset(path, default_path) if self.is_main else None
        barrier()
        return paths if paths is not None else find_images(path)

    def resume(self, config):
        """With --resume and a checkpoint: check its config against `config` (a dict), take its position, return it."""
        self.config = config
        if not self.args.resume:
            return None
        if not self.ckpt_path.exists():
            if self.is_main:
                print(f"No checkpoint at {self.ckpt_path} yet: starting from scratch.")
            return None
        ckpt = load_checkpoint(self.ckpt_path, trust=self.args.trust_checkpoint)
        check_same_config(ckpt["config"], config, self.ckpt_path)
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt.get("batch_in_epoch", 0)
        if self.is_main:
            print(f"Resumed from {self.ckpt_path} at step {self.step}.")
        return ckpt

    def wrap(self, module):
        return wrap_model(module, self.d, self.args.compile)

    def loader(self, dataset, batch_size):
        """A loader of this rank's shard, resumable mid-epoch; sets the number of steps of the run."""
        args, d = self.args, self.d
        self.sampler = ResumableSampler(len(dataset), batch_size, shuffle=True, seed=args.seed, rank=d.rank,
                                        world_size=d.world_size)
        batches_per_epoch = len(dataset) // d.world_size // batch_size
        if batches_per_epoch < args.grad_accum:
            raise DataError(f"{len(dataset)} training items make fewer than one step of --batch-size {batch_size} "
                            f"x --grad-accum {args.grad_accum} per process; add images or lower the batch size.")
        self.max_steps = args.max_steps if args.max_steps is not None else \
            args.epochs * (batches_per_epoch // args.grad_accum)
        self.batch_size = batch_size
        return build_loader(dataset, batch_size, train=True, num_workers=args.num_workers, sampler=self.sampler)

    def steps(self, loader):
        """Yield the micro-batches of each optimizer step until --max-steps (or the epochs) or a stop signal."""
        if self.is_main:
            self.log = MetricsLog(self.results / f"{self.name}_metrics.jsonl", resume=self.step > 0)
            self.log.truncate_after(self.step)
        self.bar = tqdm(total=self.max_steps, initial=self.step, desc=self.name, disable=not self.is_main,
                        dynamic_ncols=True)
        group = []  # a step's micro-batches may span an epoch's end
        while self.step < self.max_steps:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            step_at_epoch_start, whole_epoch, skipped_in_epoch = self.step, self.batch_in_epoch == 0, 0
            for batch in loader:
                self.batch_in_epoch += 1
                skipped_in_epoch += self.batch_size if batch is None else batch["skipped"]  # drop_last: full batches
                self.skipped_files = max(self.skipped_files, skipped_in_epoch)  # every pass meets the same bad files
                if batch is None:  # every file of this batch was unreadable (each one was named in a warning)
                    continue
                group.append(batch)
                if len(group) < self.args.grad_accum:
                    continue
                yield group
                group = []
                if self.stopped:
                    self.save(f"received {self.stop.received or 'a stop signal'}")
                    return
                if self.step >= self.max_steps:
                    return
            if self.step == step_at_epoch_start and whole_epoch:
                raise DataError(f"A whole epoch gave no usable batch: are the images in "
                                f"{self.args.dataset_path} readable?")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def skip_update(self, loss):
        """True (on every rank alike) when the step's loss is not finite on some rank: skip its update.

        The step's one collective and one read: the non-finite flag and the stop flag travel together.
        """
        self.flags[0] = (~torch.isfinite(loss.detach())).any()
        self.flags[1].fill_(float(self.stop.received is not None))
        if self.d.enabled:
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = self.flags.tolist()
        self.stopped = self.stopped or stop > 0
        if not nonfinite:
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_in_a_row += 1
        if self.is_main:
            print(f"Step {self.step}: non-finite loss, update skipped ({self.nonfinite_in_a_row} in a row).",
                  flush=True)
        if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            kept = f"The last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists() else "Nothing was saved"
            raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite losses in a row: stopping. {kept}; try a "
                                     f"lower --learning-rate.")
        return True

    def end_step(self, metrics, bar_keys=("loss",)):
        """Count the step; every --log-every steps (and at the end) log the means of `metrics` (0-d tensors) since
        the last log, read from the device at once; every --save-every steps save."""
        self.step += 1
        self.bar.update(1)
        if self.is_main:
            values = torch.stack([v.detach().float() for v in metrics.values()])  # on the device: no wait
            self.sums, self.count = values if self.sums is None else self.sums + values, self.count + 1
            if self.step % self.args.log_every == 0 or self.step == self.max_steps or self.stopped:
                means = dict(zip(metrics, (self.sums / self.count).tolist()))
                self.sums, self.count = None, 0
                self.log.log(self.step, **means)
                self.bar.set_postfix({k: f"{means[k]:.3f}" for k in bar_keys if k in means})
        if self.step % self.args.save_every == 0:
            self.save()

    def due(self, every):
        """True after a step that is a multiple of `every`, and after the last step."""
        return self.step % every == 0 or self.step == self.max_steps

    def save(self, reason=""):
        """Rank 0 writes the checkpoint atomically: the script's states, the run's position, config and flags."""
        if not self.is_main:
            return
        save_checkpoint(dict(**self.state_dict(), step=self.step, epoch=self.epoch,
                             batch_in_epoch=self.batch_in_epoch, config=self.config, args=vars(self.args)),
                        self.ckpt_path)
        if reason:
            tqdm.write(f"Saved {self.ckpt_path} at step {self.step} ({reason}).")

    def finish(self):
        """Save the last checkpoint (unless a stop signal already did), report skipped files, leave torchrun."""
        self.bar.close()
        if not self.stopped:
            self.save("end of training")
        if self.is_main and self.skipped_files:
            print(f"Skipped {self.skipped_files} unreadable image file(s) during training (named in the warnings "
                  f"above).")
        cleanup_distributed()
        return self.ckpt_path
