"""One command that proves the scripts on a GPU machine, in under 8 minutes, and prints one table.

    python gpu_check.py                       # on a machine with CUDA GPUs
    python gpu_check.py --device cpu --quick  # the same steps in their CPU form (tiny models, 2 gloo processes)

It runs, each as its own process, exactly as a user would: the CUDA-marked tests; stage 1 and stage 2 for a few
steps with the defaults (bf16 on CUDA), again with --compile, and under torchrun on every GPU; sampling; and
bench.py on the paper config. Then it prints whether each step passed and the figures of bench.py.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from cli import ScriptParser, run_script
from demo_flowers import make_demo_flowers

ROOT = Path(__file__).resolve().parent
# 256x256 demo flowers with the paper's models; no VGG16 download needed (LPIPS off), a few steps each.
FULL = dict(stage1=["--batch-size", "6", "--perceptual-loss-factor", "0", "--disc-start", "2"],
            stage2=["--batch-size", "8"], image_size=256, bench=["--config", "paper"])
# The CPU form: the tests' tiny models at 32x32.
QUICK = dict(stage1=["--image-size", "32", "--ch", "32", "--ch-mult", "1", "2", "2", "--num-res-blocks", "1",
                     "--attn-resolutions", "8", "--z-channels", "32", "--latent-dim", "16",
                     "--num-codebook-vectors", "64", "--batch-size", "2", "--perceptual-loss-factor", "0",
                     "--disc-start", "2"],
             stage2=["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--batch-size", "2"],
             image_size=32, bench=["--quick"])


def plan(args, work):
    """[(name, command)] of every step, in order."""
    size, device = (QUICK if args.quick else FULL), ["--device", args.device] if args.device else []
    python, data, gpus = sys.executable, str(work / "flowers"), args.nproc or max(1, torch.cuda.device_count())
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    common = ["--dataset-path", data, "--num-workers", "2", "--max-steps", str(args.steps), "--log-every", "1",
              "--sample-every", str(args.steps), *device]
    stage1 = [*size["stage1"], *common]
    vq_ckpt = str(work / "s1" / "checkpoints" / "vqgan_last.pt")
    stage2 = [*size["stage2"], *common, "--checkpoint-path", vq_ckpt]
    steps = []
    if not args.skip_tests:
        steps.append(("CUDA-marked tests",  # in one process (-n 0): one CUDA context for a few tests
                      [python, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", str(ROOT / "tests")]))
    steps += [
        ("stage 1, defaults", [python, str(ROOT / "training_vqgan.py"), *stage1, "--out-dir", str(work / "s1")]),
        ("stage 2, defaults", [python, str(ROOT / "training_transformer.py"), *stage2, "--out-dir", str(work / "s1")]),
        ("sampling", [python, str(ROOT / "sample_transformer.py"), "--checkpoint-path",
                      str(work / "s1" / "checkpoints" / "transformer_last.pt"), "--num-samples", "8",
                      "--out-dir", str(work / "samples"), *device]),
    ]
    if not args.skip_compile:
        steps += [("stage 1, --compile", [python, str(ROOT / "training_vqgan.py"), *stage1, "--compile",
                                          "--out-dir", str(work / "compiled")]),
                  ("stage 2, --compile", [python, str(ROOT / "training_transformer.py"), *stage2, "--compile",
                                          "--out-dir", str(work / "compiled")]),
                  ("sampling, --compile", [python, str(ROOT / "sample_transformer.py"), "--checkpoint-path",
                                           str(work / "compiled" / "checkpoints" / "transformer_last.pt"),
                                           "--num-samples", "8", "--compile", "--out-dir", str(work / "samples_c"),
                                           *device])]
    if not args.skip_bench and not args.skip_compile:
        steps.append(("bench.py sampling, --compile", [python, str(ROOT / "bench.py"), *size["bench"], *device,
                                                       "--compile", "--skip-stage1", "--skip-stage2",
                                                       "--out-json", str(work / "bench_compiled.json")]))
    steps += [
        (f"stage 1, torchrun x{gpus}", [*torchrun, str(ROOT / "training_vqgan.py"), *stage1,
                                        "--out-dir", str(work / "ddp")]),
        (f"stage 2, torchrun x{gpus}, token cache", [*torchrun, str(ROOT / "training_transformer.py"), *stage2,
                                                     "--precompute-tokens", "--out-dir", str(work / "ddp")]),
    ]
    if not args.skip_bench:
        steps.append(("bench.py", [python, str(ROOT / "bench.py"), *size["bench"], *device,
                                   "--out-json", str(work / "bench.json")]))
    return steps


def report(results, bench_path):
    """The table: each step's outcome and time, then bench.py's figures."""
    lines = ["| step | result | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'ok' if rc == 0 else f'FAILED (exit {rc})'} | {seconds:.0f} |"
              for name, rc, seconds in results]
    if bench_path.exists():
        b = json.loads(bench_path.read_text())
        lines += ["", f"device: {b.get('device_name', '?')}", "",
                  "| section | throughput | MFU | peak memory |", "| --- | --- | --- | --- |"]
        for name in ("stage1", "stage2", "sampling"):
            r = b.get(name)
            if r:
                speed = (f"{r['items_per_s']:.1f} {r['unit']}/s" if "items_per_s" in r else
                         f"{r['tokens_per_s']:.0f} tokens/s, {r['images_per_s']:.2f} samples/s")
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
                lines.append(f"| {name} | {speed} | {mfu} | {r['peak_memory_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main(args):
    work = Path(args.work_dir)
    make_demo_flowers(work / "flowers", num_images=64, size=(QUICK if args.quick else FULL)["image_size"] + 16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # two gloo processes share the cores
    results = []
    for name, command in plan(args, work):
        print(f"== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(command, cwd=work, env=env).returncode
        results.append((name, rc, time.perf_counter() - start))
    table = report(results, work / "bench.json")
    print(table)
    (work / "gpu_check.md").write_text(table + "\n")
    return results


def build_parser():
    p = ScriptParser("Run every GPU path of the scripts once and print one table.")
    a = p.add_argument
    a("--device", default=None, help="passed to every script (default: theirs, CUDA when available)")
    a("--quick", action="store_true", help="the tests' tiny models at 32x32: the CPU form")
    a("--steps", type=int, default=5, help="optimizer steps of each training run")
    a("--nproc", type=int, default=None, help="processes under torchrun (default: every GPU, at least 1)")
    a("--work-dir", default="runs/gpu_check", help="where data, runs and the table go")
    a("--skip-tests", action="store_true", help="do not run the CUDA-marked tests")
    a("--skip-compile", action="store_true", help="do not run the --compile steps")
    a("--skip-bench", action="store_true", help="do not run bench.py")
    return p


if __name__ == "__main__":
    outcome = run_script(main, build_parser())
    sys.exit(0 if all(rc == 0 for _, rc, _ in outcome) else 1)
