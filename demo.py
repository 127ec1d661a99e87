"""The whole method on a CPU in under 15 minutes: demo flowers, stage 1, held-out evaluation, stage 2, samples.

    python demo.py                       # everything under runs/demo/
    python demo.py --out-dir runs/demo2
    python demo.py --tiny                # every step with tiny sizes, in seconds (what tests/test_demo.py runs)

It calls the scripts' own main() functions with the flags printed below, so each step can be re-run by hand. It writes
<out-dir>/data/ (training and held-out flowers), checkpoints/, results/ (both stages' logs, eval_vqgan.json and
reconstructions.png), samples/ (grid.png) and, enlarged for viewing, demo_reconstructions.png and demo_samples.png.
"""
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import eval_vqgan
import sample_transformer
import training_transformer
import training_vqgan
from cli import ScriptParser, run_script
from demo_flowers import make_demo_flowers
from presets import TINY_GPT, TINY_VQGAN, as_flags

HELDOUT_SEED = 1  # the held-out flowers are drawn from another seed than the training flowers (seed 0)


# ---- the settings: chosen on this project's 2-core CPU (docs/demo.md, "Why these settings") ----

@dataclass
class DemoSettings:
    image_size: int        # the flowers are drawn at this size, so the crop is the whole flower
    train_images: int      # both stages train on these
    heldout_images: int    # stage-1 evaluation and stage-2 validation
    vqgan_flags: list      # training_vqgan.py's model and optimiser flags
    vqgan_lr: list         # (train until this step, at this learning rate), ...: a step decay, one run per phase
    gpt_flags: list        # training_transformer.py's model and optimiser flags
    gpt_steps: int
    num_samples: int
    top_k: int
    evals: int             # reconstruction grids (stage 1), validations and sample grids (stage 2) per stage
    enlarge: int           # the pictures are also written this many times larger (nearest neighbour) for viewing


DEMO = DemoSettings(
    image_size=32, train_images=2000, heldout_images=100,
    vqgan_flags=["--ch", "32", "--ch-mult", "1", "2", "2", "--num-res-blocks", "1", "--attn-resolutions", "8",
                 "--latent-dim", "32", "--num-codebook-vectors", "512", "--codebook-dim", "8", "--codebook-l2-norm",
                 "--restart-dead-codes", "--batch-size", "16", "--disc-start", "100000"],
    vqgan_lr=[(1200, 6e-4), (1500, 2e-4)],
    gpt_flags=["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "32",
               "--learning-rate", "1e-3", "--dropout", "0.1"],
    gpt_steps=1500, num_samples=32, top_k=30, evals=5, enlarge=3)

TINY = DemoSettings(  # the tiny models of presets.py
    image_size=TINY_VQGAN["image_size"], train_images=16, heldout_images=4,
    vqgan_flags=[*as_flags(TINY_VQGAN, leave_out=["image_size"]), "--batch-size", "4", "--disc-start", "100"],
    vqgan_lr=[(4, 1e-3), (6, 3e-4)],
    gpt_flags=[*as_flags(TINY_GPT), "--batch-size", "4", "--learning-rate", "1e-3"],
    gpt_steps=4, num_samples=4, top_k=8, evals=1, enlarge=2)


# ---- helpers ----

def run_step(script, flags):
    """Print the equivalent command line, then run the script with those flags as that command line would."""
    print(f"\n$ python {script.__name__}.py {shlex.join(flags)}", flush=True)
    return run_script(script.main, script.build_parser(), flags)


def last_value(metrics_path, key):
    """The last logged value of `key` in a metrics .jsonl file, or None."""
    values = [record[key] for record in map(json.loads, Path(metrics_path).read_text().splitlines()) if key in record]
    return values[-1] if values else None


def enlarge(src, dst, factor):
    """A copy of the PNG at src, `factor` times larger with square pixels (the demo's images are small)."""
    with Image.open(src) as image:
        image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(dst)
    return dst


# ---- main ----

def main(args):
    s = TINY if args.tiny else DEMO
    out = Path(args.out_dir)
    device = ["--device", args.device] if args.device else []
    run_flags = ["--out-dir", str(out), "--num-workers", "0", *device]  # data loading in the process: small images
    start = time.perf_counter()

    # 1. Data: flowers drawn at the training size, and held-out flowers drawn from another seed. The folder names
    # carry the settings, so a later run with other sizes never mixes in these files (existing files are kept).
    size = s.image_size
    train_dir = out / "data" / f"train-{size}px-{s.train_images}"
    heldout_dir = out / "data" / f"heldout-{size}px-{s.heldout_images}-seed{HELDOUT_SEED}"
    print(f"Drawing {s.train_images} training and {s.heldout_images} held-out flowers of {size}x{size} ...")
    make_demo_flowers(train_dir, num_images=s.train_images, size=size, seed=0)
    make_demo_flowers(heldout_dir, num_images=s.heldout_images, size=size, seed=HELDOUT_SEED)
    times = {"data": time.perf_counter() - start}

    # 2. Stage 1: the VQGAN on the training flowers (no LPIPS: no VGG16 weights are needed). training_vqgan.py keeps
    # the learning rate constant, so a lower one for the last steps is a --resume with another --learning-rate: the
    # run continues from the exact step, with the same optimizer state and data order.
    vqgan_steps = s.vqgan_lr[-1][0]
    for phase, (until_step, lr) in enumerate(s.vqgan_lr):
        vqgan_ckpt = run_step(training_vqgan, [
            "--dataset-path", str(train_dir), "--image-size", str(size), *s.vqgan_flags,
            "--perceptual-loss-factor", "0", "--learning-rate", str(lr), "--max-steps", str(until_step),
            "--sample-every", str(vqgan_steps // s.evals), "--save-every", str(vqgan_steps), *run_flags,
            *(["--resume"] if phase > 0 else [])])
    times["stage 1"] = time.perf_counter() - start - sum(times.values())

    # 3. Held-out reconstructions, measured by eval_vqgan.py: results/eval_vqgan.json and results/reconstructions.png.
    eval_json = out / "results" / "eval_vqgan.json"
    metrics = run_step(eval_vqgan, [
        "--checkpoint-path", str(vqgan_ckpt), "--dataset-path", str(heldout_dir), "--out-json", str(eval_json),
        "--num-grid", "12", "--num-workers", "0", *device])
    times["eval"] = time.perf_counter() - start - sum(times.values())

    # 4. Stage 2: a GPT on the codes of the training flowers (encoded once, with their flips), validated on the
    # held-out flowers' codes.
    gpt_ckpt = run_step(training_transformer, [
        "--dataset-path", str(train_dir), "--val-path", str(heldout_dir), "--checkpoint-path", str(vqgan_ckpt),
        "--precompute-tokens", *s.gpt_flags,
        "--max-steps", str(s.gpt_steps), "--sample-every", str(s.gpt_steps // s.evals),
        "--save-every", str(s.gpt_steps), *run_flags])
    times["stage 2"] = time.perf_counter() - start - sum(times.values())

    # 5. New flowers: sample codes from the GPT and decode them.
    samples_dir = out / "samples"
    run_step(sample_transformer, [
        "--checkpoint-path", str(gpt_ckpt), "--num-samples", str(s.num_samples), "--top-k", str(s.top_k),
        "--out-dir", str(samples_dir), *device])
    times["sampling"] = time.perf_counter() - start - sum(times.values())

    pictures = (enlarge(eval_json.parent / "reconstructions.png", out / "demo_reconstructions.png", s.enlarge),
                enlarge(samples_dir / "grid.png", out / "demo_samples.png", s.enlarge))
    bits = last_value(out / "results" / "transformer_metrics.jsonl", "val_bits_per_token")
    total = time.perf_counter() - start
    print(f"\nDemo done in {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ").")
    print(f"Held-out reconstructions ({metrics['num_images']} flowers of seed {HELDOUT_SEED}): "
          f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
          f"{100 * metrics['codebook_usage']:.1f}% of the {metrics['num_codes']} codes used ({eval_json}).")
    if bits is not None:
        print(f"Stage-2 validation loss on the held-out flowers' codes: {bits:.2f} bits per token.")
    print(f"Pictures: {pictures[0]} (originals above their reconstructions) and {pictures[1]} (new flowers).")
    return dict(psnr=metrics["psnr"], ssim=metrics["ssim"], codebook_usage=metrics["codebook_usage"],
                val_bits_per_token=bits, seconds=total, times=times, eval_json=eval_json,
                reconstructions=pictures[0], samples=pictures[1])


# ---- command line ----

def build_parser():
    p = ScriptParser("Run the whole method on demo flowers: data, stage 1, evaluation, stage 2 and sampling (about "
                     "15 minutes on 2 CPU cores).")
    p.add_argument("--out-dir", default="runs/demo", help="where the data, checkpoints, results and pictures go")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a few steps: checks every step in seconds")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA when available)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
