"""Measuring a step: its wall and CPU time, its FLOPs (torch's formulas), the peak memory and the machine's load.

bench.py times its sections with these; the MFU needs the device's dense bf16 peak, listed here for known GPUs.
"""
import os
import platform
import resource
import sys
import time
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched in order against the CUDA device's name.
# Dense bf16 peaks (no sparsity) by device name; the most specific name first: an "H100 NVL" is not an H100 SXM.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("A100", 312.0))

# torch's FLOP formulas know the CUDA attention kernels but not the CPU one: count it with the same formulas.
_aten = torch.ops.aten
if _aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_attention_flop(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FlopCounter(TorchDispatchMode):
    """Sums torch's FLOP formulas (those of FlopCounterMode) over the operators that run inside it.

    FlopCounterMode itself also tracks modules, with hooks that break the autograd.grad calls of train_step.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn):
    """Run fn() once and return the FLOPs of its matmuls, convolutions and attention (forward and backward)."""
    with FlopCounter() as counter:
        fn()
    return counter.flops


def count_flops_of_shapes(fn):
    """count_flops(fn) on fake tensors: fn builds its models and inputs inside, and nothing is computed or allocated,
    so that a paper-size step is counted in seconds on any machine (gpu_check.py's estimates)."""
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")  # loading real weights (LPIPS's heads) into fake parameters
        return count_flops(fn)


def time_steps(step, eager_step, warmup, steps, device, compiled):
    """(wall and CPU seconds of each of `steps` timed steps, FLOPs of one step), after `warmup` untimed steps.

    The FLOPs are counted on `eager_step` (the model without torch.compile: the same FLOPs) in the first warm-up
    step; when compiling, that step comes on top, so that every warm-up step (compilation, the recompilations of
    the first calls) runs the compiled model.
    """
    flops = count_flops(lambda: eager_step(0)) if warmup else None
    for i in range(0 if compiled else 1, warmup):
        step(i)
    times, cpu_times = [], []
    for i in range(warmup, warmup + steps):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step(i)
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, flops


def busy_cpu_seconds():
    """Seconds of CPU time the whole machine has spent busy since boot (from /proc/stat), or None without it."""
    try:
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    return (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user nice system idle iowait irq softirq steal


def load_average():
    """The 1-minute load average (runnable processes, this one included), or None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class LoadProbe:
    """How busy the machine was with other work while a section ran: timings on a shared CPU need this beside them."""

    def __init__(self):
        self.wall, self.own, self.busy = time.perf_counter(), time.process_time(), busy_cpu_seconds()
        self.load_before = load_average()

    def result(self):
        wall = time.perf_counter() - self.wall
        out = {"wall_s": wall, "loadavg_1min_before": self.load_before, "loadavg_1min_after": load_average()}
        busy = busy_cpu_seconds()
        if busy is not None and self.busy is not None:  # CPU seconds per second used by every other process
            out["other_processes_cores"] = max(0.0, (busy - self.busy) - (time.process_time() - self.own)) / wall
        return out


def peak_memory(device):
    """(bytes, what was measured): the CUDA allocator's peak, or this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"  # macOS reports bytes, Linux KiB


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bf16_peak_flops(device):
    """(peak FLOP/s or None, device name)."""
    if device.type != "cuda":
        return None, cpu_name()
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops_of(name)
    return (tflops * 1e12 if tflops else None), name


def peak_tflops_of(device_name):
    """The dense bf16 peak in TFLOP/s of a CUDA device name such as "NVIDIA H100 NVL", or None if unknown."""
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in device_name), None)


def throughput(times, cpu_times, items_per_step, flops, device):
    """Mean step time, items/s, and from the counted FLOPs the TFLOP/s achieved and the MFU where the peak is known.

    The CPU seconds of this process per step go along: on a shared CPU they change less with the load than the wall
    time does.
    """
    step_s = sum(times) / len(times)
    out = {"step_s": step_s, "step_s_each": times, "cpu_s_each": cpu_times, "items_per_s": items_per_step / step_s,
           "flops_per_item": flops / items_per_step if flops else None, "tflops": None, "mfu": None}
    if flops:
        out["tflops"] = flops / step_s / 1e12
        peak, _ = bf16_peak_flops(device)
        out["mfu"] = flops / step_s / peak if peak else None
    return out
