"""Speed and memory: stage-1 training images/s, stage-2 training tokens/s, sampling tokens/s and images/s,
sliding-window sampling per token on canvases of 1x1, 2x2 and 4x4 training sizes, and sampling by the ar and the
maskgit objective side by side.

    python bench.py                                          # the paper's config on the default device
    python bench.py --quick                                  # the tiny models of presets.py: seconds on a CPU
    python bench.py --device cpu --batch-size 2 --steps 3 --warmup 1 --threads 2
    python bench.py --config medium --skip-stage1 --skip-stage2 --skip-sampling --skip-window  # ar against maskgit

Each section runs in a fresh process, so that its peak memory (the CUDA allocator's peak, or the process's peak RSS
on the CPU) is its own. Warm-up steps are never timed; the first one counts the FLOPs of a step (matmuls,
convolutions and attention, forward and backward) with torch's FLOP formulas, from which come the achieved
TFLOP/s and, on a GPU of known bf16 peak, the model-FLOPs utilisation (MFU). On a shared CPU, read the timings
with the load columns beside them.
"""
import argparse
import copy
import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

import maskgit
from cli import BASE_LEARNING_RATE, ScriptParser, run_script
from config import check_positive
from discriminator import Discriminator
from loss import LossConfig, Stage1, stage1_optimizers, train_step
from lpips import LPIPS
from measure import (LoadProbe, bf16_peak_flops, count_flops, count_flops_of_shapes, peak_memory, synchronize,
                     throughput, time_steps)
from mingpt import GPT, GPTConfig
from presets import TINY_GPT, TINY_VQGAN
from runtime import (PRECISIONS, autocast, make_scaler, memory_format, on_cpu_default, optimizer_step, pick_device,
                     resolve_precision, reuse_freed_memory, use_device)
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN, VQGANConfig

CONFIGS = {
    # the paper's: 256x256 images, f=16 (a 16x16 grid of 256 tokens), 1024 codes; taming's 24-layer ImageNet GPT
    "paper": dict(vqgan=dict(), gpt=dict(n_layer=24, n_head=16, n_embd=1024)),
    # for a quick look, the tiny models of presets.py: 32x32 images, f=4 (8x8 = 64 tokens), 64 codes, a 2-layer GPT
    "quick": dict(vqgan=TINY_VQGAN, gpt=TINY_GPT),
    # the paper's tokenizer with an 8-layer, 512-wide GPT: the ar against maskgit comparison of docs/maskgit.md
    "medium": dict(vqgan=dict(), gpt=dict(n_layer=8, n_head=8, n_embd=512)),
}
# Estimates by hand for the paper config, beside the counted FLOPs: one training step per 256x256 image (encoder 138 G
# and decoder 253 G forward, VGG16 40 G, PatchGAN 6 G, x ~3 with the backward) and per token of the 24-layer GPT.
ESTIMATED_FLOPS = {"paper": {"stage1": 1.34e12, "stage2": 1.9e9}}
DEFAULT_SIZES = {  # batch sizes and timed sampling runs when not given
    "cuda": dict(batch_size=16, gpt_batch_size=32, sample_batch_size=64, sample_runs=3, maskgit_batch_sizes=[1, 64]),
    "cpu": dict(batch_size=2, gpt_batch_size=2, sample_batch_size=1, sample_runs=1, maskgit_batch_sizes=[1]),
}
MASKGIT_STEPS = [maskgit.DEFAULT_STEPS, 12]  # the ar against maskgit section: MaskGIT's 8, and 12
SAMPLING_TOP_K = 100  # taming's sampling default; filtering costs next to nothing
SECTIONS = ("stage1", "stage2", "sampling", "window", "maskgit")

# ---- the three sections ----

def models_config(args):
    config = VQGANConfig(**CONFIGS[args.config]["vqgan"])
    grid = config.image_size // config.downsample_factor
    return config, grid


def build_gpt(config, grid, args, device):
    """The stage-2 GPT: codes plus one start token, a block of one image's tokens (start token + all but the last)."""
    gpt = GPT(GPTConfig(**{**CONFIGS[args.config]["gpt"], "block_size": grid * grid},
                        vocab_size=config.num_codebook_vectors + 1))
    return gpt.to(device)


def bench_stage1(args, device, precision):
    """One step of training_vqgan: train_step (generator + discriminator, GAN on) and the two optimizer steps."""
    config, _ = models_config(args)
    fmt = memory_format(on_cpu_default(args.channels_last, device))
    vqgan = VQGAN(config).set_recompute(on_cpu_default(args.recompute, device)).to(device, memory_format=fmt)
    disc = Discriminator().to(device, memory_format=fmt)
    lpips = LPIPS(vgg_weights=None).to(device, memory_format=fmt)  # random VGG16 weights: the same FLOPs, no download
    opt_vq, opt_disc = stage1_optimizers(vqgan, disc, BASE_LEARNING_RATE * args.batch_size)
    eager = Stage1(vqgan, disc, lpips, LossConfig(disc_start=0), precision)  # the paper's loss, GAN on
    # The timed steps run the compiled models (with --compile); FLOPs are counted on the eager ones.
    timed = replace(eager, vqgan_wrapped=torch.compile(vqgan), disc_wrapped=torch.compile(disc)) if args.compile \
        else eager
    x = torch.rand(args.batch_size, 3, config.image_size, config.image_size, device=device) * 2 - 1
    x = x.contiguous(memory_format=fmt)

    def step(i, stage1=timed):
        metrics = train_step(stage1, x, i)
        if not math.isfinite(metrics["loss"].item()):  # the training loop's check (and its one sync per step)
            raise FloatingPointError(f"stage 1: non-finite loss at step {i}")
        optimizer_step(opt_vq, stage1.scalers[0])
        optimizer_step(opt_disc, stage1.scalers[1])

    times, cpu_times, flops = time_steps(step, lambda i: step(i, eager), args.warmup, args.steps, device,
                                         args.compile)
    return {"batch_size": args.batch_size, "unit": "images",
            **throughput(times, cpu_times, args.batch_size, flops, device)}


def bench_stage2(args, device, precision):
    """One step of stage-2 training on random tokens: GPT forward and backward, clipping, AdamW (no VQGAN encode)."""
    config, grid = models_config(args)
    gpt = build_gpt(config, grid, args, device)
    opt = gpt.configure_optimizers(BASE_LEARNING_RATE * args.gpt_batch_size)
    scaler = make_scaler(precision, device)
    model = torch.compile(gpt) if args.compile else gpt
    start_token = config.num_codebook_vectors
    indices = torch.randint(config.num_codebook_vectors, (args.gpt_batch_size, grid * grid), device=device)
    tokens = torch.cat([torch.full_like(indices[:, :1], start_token), indices[:, :-1]], dim=1)  # (B, h*w)

    def step(i, model=model):
        with autocast(precision, device):
            _, loss = model(tokens, indices)
        scaler.scale(loss).backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"stage 2: non-finite loss at step {i}")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)  # training_transformer's default --grad-clip
        optimizer_step(opt, scaler)

    times, cpu_times, flops = time_steps(step, lambda i: step(i, gpt), args.warmup, args.steps, device, args.compile)
    tokens_per_step = args.gpt_batch_size * grid * grid
    return {"batch_size": args.gpt_batch_size, "unit": "tokens",
            **throughput(times, cpu_times, tokens_per_step, flops, device)}


def bench_sampling(args, device, precision):
    """Sampling a batch: GPT.generate with the KV cache from the start token, then VQGAN.decode_indices."""
    config, grid = models_config(args)
    gpt, vqgan = build_gpt(config, grid, args, device).eval(), VQGAN(config).to(device).eval()
    if args.quantize == "int8":
        gpt.quantize_int8()
    if args.compile:
        gpt.compile_decode(PRECISIONS[precision])  # as sample_transformer.py --compile: CUDA graphs on CUDA
    n = args.sample_batch_size
    start = torch.full((n, 1), config.num_codebook_vectors, dtype=torch.long, device=device)

    @torch.no_grad()
    def run(num_tokens):
        """Seconds to generate num_tokens tokens, to decode a full grid, and CPU seconds of the generation."""
        synchronize(device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        with autocast(precision, device):
            out = gpt.generate(start, num_tokens, top_k=SAMPLING_TOP_K, vocab_limit=config.num_codebook_vectors)
        synchronize(device)
        t1, cpu1 = time.perf_counter(), time.process_time()
        indices = out[:, 1:] if num_tokens == grid * grid else torch.randint_like(start.expand(n, grid * grid),
                                                                                  config.num_codebook_vectors)
        with autocast(precision, device):
            images = vqgan.decode_indices(indices.reshape(n, grid, grid))
        synchronize(device)
        assert images.shape == (n, 3, config.image_size, config.image_size)
        return t1 - t0, time.perf_counter() - t1, cpu1 - cpu0

    if args.warmup:
        run(min(8, grid * grid))  # a short generation touches every code path; the decode is a full one
    runs = [dict(zip(("generate_s", "decode_s", "generate_cpu_s"), run(grid * grid))) for _ in range(args.sample_runs)]
    generate_s = sum(r["generate_s"] for r in runs) / len(runs)
    decode_s = sum(r["decode_s"] for r in runs) / len(runs)
    return {"batch_size": n, "tokens": grid * grid, "quantize": args.quantize, "generate_s": generate_s,
            "decode_s": decode_s, "step_s": generate_s + decode_s, "runs": runs,
            "tokens_per_s": n * grid * grid / generate_s, "images_per_s": n / (generate_s + decode_s)}


def bench_window(args, device, precision):
    """VQGANTransformer.sample_canvas on canvases of --window-scales x the training grid: seconds per token.

    A token costs one cached step while its window stays where the previous token's was, else one forward over its
    window's prefix, so the cost per token is bounded by one window, whatever the canvas.
    """
    config, grid = models_config(args)
    gpt = {**CONFIGS[args.config]["gpt"], "block_size": grid * grid}
    model = VQGANTransformer(VQGAN(config), TransformerConfig(**gpt))
    model = model.to(device).eval()
    if args.quantize == "int8":
        model.gpt.quantize_int8()
    n = args.sample_batch_size

    def run(canvas_hw, regenerate=None):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(precision, device):
            model.sample_canvas(n, canvas_hw, top_k=SAMPLING_TOP_K, regenerate=regenerate)
        synchronize(device)
        return time.perf_counter() - t0

    if args.warmup:  # a few tokens of a moving window: every code path once
        first = torch.zeros(2 * grid, 2 * grid, dtype=torch.bool)
        first[0, :grid + 2] = True
        run((2 * grid, 2 * grid), first)
    canvases = {}
    for scale in args.window_scales:
        tokens = (grid * scale) ** 2
        seconds = run((grid * scale, grid * scale))
        canvases[f"{scale}x{scale}"] = {"tokens": tokens, "generate_s": seconds, "s_per_token": seconds / tokens,
                                       "tokens_per_s": n * tokens / seconds}
    return {"batch_size": n, "window_tokens": grid * grid, "canvases": canvases,
            "step_s": sum(c["generate_s"] for c in canvases.values())}


def bench_maskgit(args, device, precision):
    """Sampling one grid per image by both objectives, the same GPT size, canvas and batch: ar with its KV cache (a
    pass per token; on the CPU also with int8 weights) and maskgit's iterative decoding at each of --maskgit-steps
    (a pass over every token per step). The GPT alone: the VQGAN decode is the same for both (the sampling section).
    Both run eager (--compile does not reach this section).

    The first run of each sampler is untimed; the timed runs are interleaved, so that a change of the machine's load
    reaches every sampler alike, and each sampler's median is compared with ar's. FLOPs per image are counted on one
    forward over the grid (torch's counter sees nothing under inference_mode): ar's cached passes add up to one such
    forward (its attention to half of it), maskgit's steps to one each.
    """
    config, grid = models_config(args)
    tokens, codes = grid * grid, config.num_codebook_vectors
    ar = build_gpt(config, grid, args, device).eval()
    # the unconditional maskgit model of VQGANTransformer: codes, an unused start token, then [MASK]
    bidirectional = GPT(GPTConfig(**{**CONFIGS[args.config]["gpt"], "block_size": tokens}, vocab_size=codes + 2,
                                  causal=False)).to(device).eval()

    def generate(n, gpt=ar):
        """ar: a pass per token with the KV cache, from the start token."""
        start = torch.full((n, 1), codes, dtype=torch.long, device=device)
        return gpt.generate(start, tokens, top_k=SAMPLING_TOP_K, vocab_limit=codes)

    def decode(n, steps):
        """maskgit: the whole grid in `steps` passes (sample_canvas at the training size)."""
        blank = torch.zeros(n, tokens, dtype=torch.long, device=device)  # every token is drawn
        return maskgit.decode(bidirectional, blank, torch.ones(tokens, dtype=torch.bool), steps, codes + 1, codes,
                              top_k=SAMPLING_TOP_K)

    samplers = {("ar", "fp32", None): generate}
    if device.type == "cpu":  # sample_transformer.py --quantize int8
        samplers["ar", "int8", None] = partial(generate, gpt=copy.deepcopy(ar).quantize_int8())
    for steps in args.maskgit_steps:
        samplers["maskgit", "fp32", steps] = partial(decode, steps=steps)

    def seconds(sampler, n):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(precision, device):
            sampler(n)
        synchronize(device)
        return time.perf_counter() - t0

    grid_tokens = torch.zeros(1, tokens, dtype=torch.long, device=device)
    with torch.no_grad(), autocast(precision, device):
        forward_flops = {"ar": count_flops(lambda: ar(grid_tokens)),
                         "maskgit": count_flops(lambda: bidirectional(grid_tokens))}
    rows = []
    for n in args.maskgit_batch_sizes:
        for sampler in samplers.values():  # untimed: a full run each
            seconds(sampler, n)
        runs = {key: [] for key in samplers}
        for _ in range(args.sample_runs):
            for key, sampler in samplers.items():
                runs[key].append(seconds(sampler, n))
        ar_s = statistics.median(runs["ar", "fp32", None])
        for (objective, weights, steps), times in runs.items():
            median = statistics.median(times)
            passes = len(maskgit.masked_after(tokens, steps)) if steps else tokens
            forwards = passes if steps else 1  # over the whole grid
            rows.append({"objective": objective, "weights": weights, "steps": steps, "batch_size": n,
                         "passes": passes, "tokens": tokens, "runs_s": times, "median_s": median,
                         "s_per_image": median / n, "tokens_per_s": n * tokens / median,
                         "flops_per_image": forwards * forward_flops[objective], "speedup_vs_ar": ar_s / median})
    return {"rows": rows, "step_s": sum(sum(r["runs_s"]) for r in rows)}


# ---- FLOPs of a config without running it (gpu_check.py's estimates) ----

def config_flops(vqgan_config, gpt, perceptual=True):
    """FLOPs per item, counted with the sections' formulas on fake tensors (nothing computed, seconds for the paper
    config): a stage-1 training step per image (GAN on; LPIPS unless perceptual=False), the encode and the decode of
    an image, a stage-2 training step per token and a forward per token (a sampled token with the cache costs about
    that) of the GPT of `gpt` sizes over the config's grid."""
    size, grid = vqgan_config.image_size, vqgan_config.image_size // vqgan_config.downsample_factor
    gpt_config = GPTConfig(**{**gpt, "block_size": grid * grid}, vocab_size=vqgan_config.num_codebook_vectors + 1)
    tokens = grid * grid

    def stage1():
        lpips = LPIPS(vgg_weights=None) if perceptual else None
        train_step(Stage1(VQGAN(vqgan_config), Discriminator(), lpips, LossConfig(disc_start=0)),
                   torch.zeros(1, 3, size, size), 0)

    @torch.no_grad()
    def encode():
        VQGAN(vqgan_config).encode(torch.zeros(1, 3, size, size))

    @torch.no_grad()
    def decode():
        VQGAN(vqgan_config).decode_indices(torch.zeros(1, grid, grid, dtype=torch.long))

    def stage2():
        x = torch.zeros(1, tokens, dtype=torch.long)
        GPT(gpt_config)(x, x)[1].backward()

    @torch.no_grad()
    def forward():
        GPT(gpt_config)(torch.zeros(1, tokens, dtype=torch.long))

    return {"stage1_per_image": count_flops_of_shapes(stage1), "encode_per_image": count_flops_of_shapes(encode),
            "decode_per_image": count_flops_of_shapes(decode), "stage2_per_token": count_flops_of_shapes(stage2) / tokens,
            "forward_per_token": count_flops_of_shapes(forward) / tokens}


BENCHES = {"stage1": bench_stage1, "stage2": bench_stage2, "sampling": bench_sampling, "window": bench_window,
           "maskgit": bench_maskgit}


def run_section(name, args):
    """Run one section in this process and add its peak memory and the machine's load to its result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = use_device(torch.device(args.device))  # on CUDA with cudnn.benchmark, as in training
    if not args.system_malloc:
        reuse_freed_memory(device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    probe = LoadProbe()
    result = BENCHES[name](args, device, precision)
    memory, kind = peak_memory(device)
    return {**result, "peak_memory_bytes": memory, "memory_kind": kind, **probe.result()}


def run_section_in_fresh_process(name, args):
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_section, name, args).result()


# ---- report ----

def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def rate(value):
    """1,234 or 0.0578: whole numbers from 100 on, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def markdown_table(results):
    """One markdown table of every section that ran."""
    rows = ["| section | batch | s per step | throughput | GFLOP per item (counted) | achieved TFLOP/s | MFU | "
            "peak memory | load before, after | other processes (cores) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    titles = {"stage1": "stage-1 training", "stage2": "stage-2 GPT training", "sampling": "sampling",
              "window": "sliding-window sampling", "maskgit": "sampling"}
    for name in SECTIONS:
        r = results.get(name)
        if r is None:
            continue
        memory = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB {'RSS' if 'RSS' in r['memory_kind'] else 'CUDA'}"
        load = (f"{fmt(r['loadavg_1min_before'], '.2f')}, {fmt(r['loadavg_1min_after'], '.2f')} | "
                f"{fmt(r.get('other_processes_cores'), '.2f')}")
        if name == "sampling":
            step = f"{r['generate_s']:.2f} + {r['decode_s']:.2f} decode"
            speed = f"{rate(r['tokens_per_s'])} tokens/s, {rate(r['images_per_s'])} images/s"
            weights = ", int8 weights" if r.get("quantize") == "int8" else ""
            rows.append(f"| {titles[name]} ({r['tokens']} tokens{weights}) | {r['batch_size']} | {step} | {speed} "
                        f"| - | - | - | {memory} | {load} |")
            continue
        if name == "maskgit":
            for row in r["rows"]:
                how = (f"maskgit, {row['steps']} steps" if row["objective"] == "maskgit" else
                       f"ar, KV cache{', int8 weights' if row['weights'] == 'int8' else ''}")
                rows.append(f"| {titles[name]} ({how}, {row['tokens']} tokens) | {row['batch_size']} | "
                            f"{row['median_s']:.3f} | {row['s_per_image']:.3f} s per image, "
                            f"{rate(row['tokens_per_s'])} tokens/s, {row['passes']} passes, "
                            f"{row['speedup_vs_ar']:.2f}x ar | {row['flops_per_image'] / 1e9:.4g} | - | - | {memory} "
                            f"| {load} |")
            continue
        if name == "window":
            for canvas, c in r["canvases"].items():
                rows.append(f"| {titles[name]} ({canvas} canvas, {c['tokens']} tokens) | {r['batch_size']} | "
                            f"{c['generate_s']:.2f} | {1e3 * c['s_per_token']:.2f} ms per token, "
                            f"{rate(c['tokens_per_s'])} tokens/s | - | - | - | {memory} | {load} |")
            continue
        gflop = fmt(r["flops_per_item"] and r["flops_per_item"] / 1e9, ".4g")
        mfu = fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else "")
        rows.append(f"| {titles[name]} | {r['batch_size']} | {r['step_s']:.3f} | {rate(r['items_per_s'])} "
                    f"{r['unit']}/s | {gflop} | {fmt(r['tflops'], '.3f')} | {mfu} | {memory} | {load} |")
    return "\n".join(rows)


# ---- main ----

def main(args):
    device = pick_device(args.device)
    args.device = str(device)  # the sections' processes use the same one without another notice
    precision = resolve_precision(args.precision, device)
    for key, value in DEFAULT_SIZES["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_positive(args, "batch_size", "gpt_batch_size", "sample_batch_size", "steps", "sample_runs")
    for name in ("window_scales", "maskgit_steps", "maskgit_batch_sizes"):
        if min(getattr(args, name)) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.quantize == "int8" and device.type != "cpu" and not args.skip_sampling:
        raise ValueError("--quantize int8 is a CPU sampling path (torch's int8 kernel); on CUDA use --precision bf16.")
    if args.compile and args.warmup < 2:
        raise ValueError("--compile needs --warmup 2 or more: the first compiled call compiles and the second "
                         "recompiles what turned out to vary (the codebook's step counter); neither may be timed.")
    sections = [name for name in SECTIONS if not getattr(args, f"skip_{name}")]

    _, device_name = bf16_peak_flops(device)
    results = {"config": args.config, "vqgan": CONFIGS[args.config]["vqgan"] or "VQGANConfig() defaults",
               "gpt": CONFIGS[args.config]["gpt"], "device": str(device), "device_name": device_name,
               "precision": precision, "compile": args.compile,
               "recompute": on_cpu_default(args.recompute, device),
               "channels_last": on_cpu_default(args.channels_last, device),
               "system_malloc": args.system_malloc, "torch": torch.__version__,
               "threads": args.threads or torch.get_num_threads(), "warmup": args.warmup, "steps": args.steps,
               "estimated_flops": ESTIMATED_FLOPS.get(args.config),
               "notes": ["Stage 1 uses LPIPS with random VGG16 weights: the same FLOPs as the ImageNet ones.",
                         "Stage 1 and 2 train on one fixed random batch: data loading is not measured.",
                         "Stage 2 trains on random tokens, as with --precompute-tokens (no VQGAN encode per step).",
                         f"Sampling uses top_k={SAMPLING_TOP_K}; images/s includes VQGAN.decode_indices.",
                         "Sliding-window sampling: the GPT alone (no decode), every token of each canvas.",
                         "ar against maskgit: the GPT alone (no decode), median seconds of the interleaved runs; "
                         "GFLOP per image: full forwards over the grid, counted (ar's cached passes make one).",
                         "FLOPs are counted with torch's FLOP formulas (matmuls, convolutions, attention, "
                         "forward and backward); MFU is against the device's dense bf16 peak."]}
    for name in sections:
        print(f"bench: {name} ...", flush=True)
        run = run_section if args.in_process else run_section_in_fresh_process
        results[name] = run(name, args)

    print(f"\nconfig {args.config}, {device_name} ({device}), {precision}{', compiled' if args.compile else ''}"
          f"{', recompute' if results['recompute'] else ''}{', system malloc' if args.system_malloc else ''}, "
          f"torch {torch.__version__}, {results['threads']} threads, {args.warmup} warm-up + {args.steps} timed steps")
    print(markdown_table(results))
    print("load: the 1-minute load average before and after (this run included); other processes: the CPU cores "
          "the rest of the machine kept busy meanwhile.")
    if args.out_json:
        path = Path(args.out_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"Wrote {path}.")
    return results


# ---- command line ----

def build_parser():
    p = ScriptParser("Benchmark stage-1 and stage-2 training and sampling.")
    a = p.add_argument
    a("--config", choices=sorted(CONFIGS), default="paper", help="model sizes to measure")
    a("--quick", action="store_const", dest="config", const="quick",
      help="the tiny models of presets.py (same as --config quick)")
    a("--device", default=None, help="cuda, cuda:1, cpu ...; default: CUDA when available")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--compile", action="store_true", help="wrap the models in torch.compile (needs --warmup 2 or more)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="stage 1 in the channels_last memory format; default: on the CPU, off on CUDA (as training)")
    a("--recompute", action=argparse.BooleanOptionalAction, default=None,
      help="stage 1 recomputes GroupNorm + swish in the backward; default: on the CPU, off on CUDA (as training)")
    a("--system-malloc", action="store_true",
      help="leave glibc's allocator as it is (the training scripts make it reuse freed memory on the CPU)")
    a("--quantize", choices=["none", "int8"], default="none",
      help="sampling with the GPT's weights in int8 (CPU only), as sample_transformer.py --quantize int8")
    a("--batch-size", type=int, default=None, help="stage-1 images per step; default: 16 on CUDA, 2 on the CPU")
    a("--gpt-batch-size", type=int, default=None, help="stage-2 sequences per step; default: 32 on CUDA, 2 on the CPU")
    a("--sample-batch-size", type=int, default=None, help="images sampled at once; default: 64 on CUDA, 1 on the CPU")
    a("--steps", type=int, default=5, help="timed training steps per stage")
    a("--warmup", type=int, default=2, help="untimed steps first (sampling: one short generation)")
    a("--sample-runs", type=int, default=None, help="timed sampling runs; default: 3 on CUDA, 1 on the CPU")
    a("--maskgit-steps", type=int, nargs="+", default=MASKGIT_STEPS,
      help="the ar against maskgit section: maskgit's decoding passes to measure")
    a("--maskgit-batch-sizes", type=int, nargs="+", default=None,
      help="the ar against maskgit section: images sampled at once, each batch size in turn (default: 1 and 64 on "
           "CUDA, 1 on the CPU)")
    a("--window-scales", type=int, nargs="+", default=[1, 2, 4],
      help="sliding-window sampling on canvases of these multiples of the training grid (each way)")
    a("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's choice")
    for name in SECTIONS:
        a(f"--skip-{name}", action="store_true", help=f"do not measure {name}")
    a("--in-process", action="store_true", help="run every section in this process (peak memory is then shared)")
    a("--out-json", default="results/bench.json", help="where to write the results ('' for nowhere)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
