"""The whole method on a CPU in under 15 minutes: demo flowers, stage 1, held-out evaluation, stage 2, samples.

    python demo.py                       # everything under runs/demo/
    python demo.py --out-dir runs/demo2
    python demo.py --tiny                # every step with tiny sizes, in seconds (what tests/test_demo.py runs)
    python demo.py --conditional         # then flowers drawn for label maps (docs/conditional.md)

It calls the scripts' own main() functions with the flags printed below, so each step can be re-run by hand. It writes
<out-dir>/data/ (training and held-out flowers), checkpoints/, results/ (both stages' logs, eval_vqgan.json and
reconstructions.png), samples/ (grid.png) and, enlarged for viewing, demo_reconstructions.png and demo_samples.png.

--conditional reuses that run when it is in <out-dir> (or makes it first) and adds the label maps of the flowers
(data/*_labels/), their tokenizer (labels/), a GPT that reads [layout tokens, image tokens] and the per-pixel
classifier that measures its samples (conditional/), and demo_conditional.png and demo_conditional_2x.png. Each
finished model of a previous run in <out-dir> is reused, so an interrupted run picks up where it stopped.
"""
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import eval_transformer
import eval_vqgan
import sample_transformer
import segmenter
import training_transformer
import training_vqgan
from checkpoint import load_checkpoint
from cli import ScriptParser, run_script
from data import map_to_tensor, read_map
from demo_flowers import FLOWER_LABELS, make_demo_flowers
from presets import TINY_GPT, TINY_VQGAN, as_flags
from utils import for_display, save_image_grid

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


@dataclass
class ConditionalSettings:
    labels_flags: list     # training_vqgan.py --image-kind segmentation: the tokenizer of the label maps
    labels_steps: int
    block_size: int        # the default demo's GPT, reading the start token and the layout's tokens before the image's
    segmenter_steps: int   # segmenter.py: the per-pixel classifier that measures the samples
    layouts: int           # held-out layouts in demo_conditional.png, each with its samples and its flower
    samples_per_layout: int
    large_scale: int       # the large layout is this many times the training size


COND = ConditionalSettings(
    labels_flags=["--ch", "32", "--ch-mult", "1", "2", "2", "--num-res-blocks", "1", "--attn-resolutions", "8",
                  "--latent-dim", "32", "--num-codebook-vectors", "128", "--codebook-dim", "8", "--codebook-l2-norm",
                  "--restart-dead-codes", "--batch-size", "16", "--learning-rate", "6e-4"],  # docs/conditional.md
    labels_steps=600, block_size=128, segmenter_steps=600, layouts=4, samples_per_layout=4, large_scale=2)

COND_TINY = ConditionalSettings(  # f = 8: 4x4 layout tokens
    labels_flags=["--ch", "32", "--ch-mult", "1", "1", "1", "1", "--num-res-blocks", "1", "--attn-resolutions",
                  "--z-channels", "8", "--latent-dim", "8", "--num-codebook-vectors", "16", "--batch-size", "4"],
    labels_steps=3, block_size=80, segmenter_steps=3, layouts=2, samples_per_layout=2, large_scale=2)


# ---- helpers ----

def run_step(script, flags):
    """Print the equivalent command line, then run the script with those flags as that command line would."""
    print(f"\n$ python {script.__name__}.py {shlex.join(flags)}", flush=True)
    return run_script(script.main, script.build_parser(), flags)


def last_value(metrics_path, key):
    """The last logged value of `key` in a metrics .jsonl file, or None."""
    values = [record[key] for record in map(json.loads, Path(metrics_path).read_text().splitlines()) if key in record]
    return values[-1] if values else None


def data_dirs(out, s):
    """The training and held-out flowers' folders. Their names carry the settings, so a later run with other sizes
    never mixes in these files."""
    return (out / "data" / f"train-{s.image_size}px-{s.train_images}",
            out / "data" / f"heldout-{s.image_size}px-{s.heldout_images}-seed{HELDOUT_SEED}")


def labels_dir(images):
    """Where demo_flowers writes the label maps of the flowers in `images` (a sibling folder)."""
    return images.with_name(images.name + "_labels")


def finished(ckpt, steps, dataset):
    """Whether ckpt is a finished run of `steps` steps on `dataset` (a run of the default demo to build on). The
    folder's name carries the data's settings, so a run copied or moved elsewhere with its folders counts too."""
    if not ckpt.is_file():
        return False
    saved = load_checkpoint(ckpt, mmap=True)
    return saved["step"] == steps and Path(saved["args"]["dataset_path"]).name == dataset.name


def read_pictures(paths, kind="rgb", num_labels=0):
    """PNG files -> (N, 3, H, W) in [-1, 1] to draw: images as they are, label maps in their classes' colours."""
    return torch.cat([for_display(map_to_tensor(read_map(path, kind, num_labels), kind, num_labels)[None], kind)
                      for path in paths])


def with_flag(flags, name, value):
    """The flag list with `name` set to `value` (in its place when present, else at the end)."""
    if name not in flags:
        return [*flags, name, str(value)]
    i = flags.index(name)
    return [*flags[:i + 1], str(value), *flags[i + 2:]]


def enlarge(src, dst, factor):
    """A copy of the PNG at src, `factor` times larger with square pixels (the demo's images are small)."""
    with Image.open(src) as image:
        image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(dst)
    return dst


# ---- main ----

def main(args):
    return conditional_demo(args) if args.conditional else default_demo(args)


def default_demo(args):
    """Data, stage 1, held-out reconstructions, stage 2 and samples."""
    s = TINY if args.tiny else DEMO
    out = Path(args.out_dir)
    device = ["--device", args.device] if args.device else []
    run_flags = ["--out-dir", str(out), "--num-workers", "0", *device]  # data loading in the process: small images
    start = time.perf_counter()

    # 1. Data: flowers drawn at the training size, and held-out flowers drawn from another seed (existing files are
    # kept).
    size = s.image_size
    train_dir, heldout_dir = data_dirs(out, s)
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


def conditional_demo(args):
    """The default demo (reused when it is in --out-dir), then flowers drawn for held-out label maps: the maps'
    tokenizer, a conditional GPT of the default demo's size and steps, and its measurement against the default GPT."""
    s, c = (TINY, COND_TINY) if args.tiny else (DEMO, COND)
    out = Path(args.out_dir)
    device = ["--device", args.device] if args.device else []
    start = time.perf_counter()
    train_dir, heldout_dir = data_dirs(out, s)
    vqgan_ckpt, gpt_ckpt = out / "checkpoints" / "vqgan_last.pt", out / "checkpoints" / "transformer_last.pt"
    if finished(vqgan_ckpt, s.vqgan_lr[-1][0], train_dir) and finished(gpt_ckpt, s.gpt_steps, train_dir):
        print(f"Reusing the default demo's flowers and models in {out}/.")
    else:
        default_demo(args)
    times = {"default demo": time.perf_counter() - start}

    # 1. Label maps of the flowers (background, petal, centre, stem and leaf), drawn with the same shapes; and a large
    # held-out flower: the first held-out flower drawn at large_scale x the size.
    size, num_labels = s.image_size, len(FLOWER_LABELS)
    for folder, count, seed in ((train_dir, s.train_images, 0), (heldout_dir, s.heldout_images, HELDOUT_SEED)):
        make_demo_flowers(folder, num_images=count, size=size, seed=seed, segmentation_dir=labels_dir(folder))
    large_dir = out / "data" / f"heldout-{c.large_scale * size}px-1-seed{HELDOUT_SEED}"
    make_demo_flowers(large_dir, num_images=1, size=c.large_scale * size, seed=HELDOUT_SEED,
                      segmentation_dir=labels_dir(large_dir))
    times["label maps"] = time.perf_counter() - start - sum(times.values())

    # 2. The label maps' tokenizer (one-hot in, logits out, binary cross-entropy: taming's VQSegmentationModel),
    # measured on the held-out maps.
    labels_out = out / "labels"
    labels_ckpt = labels_out / "checkpoints" / "vqgan_last.pt"
    if finished(labels_ckpt, c.labels_steps, labels_dir(train_dir)):
        print(f"Reusing the layout tokenizer {labels_ckpt}.")
    else:
        run_step(training_vqgan, [
            "--image-kind", "segmentation", "--num-labels", str(num_labels), "--dataset-path",
            str(labels_dir(train_dir)), "--image-size", str(size), *c.labels_flags, "--max-steps", str(c.labels_steps),
            "--sample-every", str(c.labels_steps), "--save-every", str(c.labels_steps), "--out-dir", str(labels_out),
            "--num-workers", "0", *device])
    labels_eval = run_step(eval_vqgan, [
        "--checkpoint-path", str(labels_ckpt), "--dataset-path", str(labels_dir(heldout_dir)), "--out-json",
        str(labels_out / "results" / "eval_vqgan.json"), "--num-grid", "12", "--num-workers", "0", *device])
    times["layout tokenizer"] = time.perf_counter() - start - sum(times.values())

    # 3. The conditional GPT: the default demo's GPT flags and steps, reading [start, layout tokens, image tokens].
    cond_out = out / "conditional"
    cond_ckpt = cond_out / "checkpoints" / "transformer_last.pt"
    if finished(cond_ckpt, s.gpt_steps, train_dir):
        print(f"Reusing the conditional GPT {cond_ckpt}.")
    else:
        run_step(training_transformer, [
            "--dataset-path", str(train_dir), "--cond-path", str(labels_dir(train_dir)), "--val-path",
            str(heldout_dir), "--val-cond-path", str(labels_dir(heldout_dir)), "--checkpoint-path", str(vqgan_ckpt),
            "--cond-checkpoint", str(labels_ckpt), "--precompute-tokens",
            *with_flag(s.gpt_flags, "--block-size", c.block_size), "--max-steps", str(s.gpt_steps),
            "--sample-every", str(s.gpt_steps // s.evals), "--save-every", str(s.gpt_steps), "--out-dir",
            str(cond_out), "--num-workers", "0", *device])
    times["conditional stage 2"] = time.perf_counter() - start - sum(times.values())

    # 4. The ruler: a per-pixel classifier of (flower, label map) pairs, with its own held-out accuracy.
    segmenter_ckpt = cond_out / "checkpoints" / "segmenter.pt"
    _, segmenter_scores = run_step(segmenter, [
        "--images", str(train_dir), "--labels", str(labels_dir(train_dir)), "--num-labels", str(num_labels),
        "--val-images", str(heldout_dir), "--val-labels", str(labels_dir(heldout_dir)), "--image-size", str(size),
        "--steps", str(c.segmenter_steps), "--out", str(segmenter_ckpt), *device])
    times["segmenter"] = time.perf_counter() - start - sum(times.values())

    # 5. Both GPTs on the held-out pairs: bits per token, and one sample per layout compared with its flower (PSNR)
    # and its layout (the mean IoU of its segmentation); for the default GPT, which reads no layout, chance levels.
    results = {}
    for name, ckpt in (("conditional", cond_ckpt), ("unconditional", gpt_ckpt)):
        results[name] = run_step(eval_transformer, [
            "--checkpoint-path", str(ckpt), "--reference", str(heldout_dir), "--cond-path",
            str(labels_dir(heldout_dir)), "--segmenter", str(segmenter_ckpt), "--features", "random-conv",
            "--num-samples", str(s.heldout_images),
            "--top-k", str(s.top_k), "--num-grid", "0", "--out-json", str(cond_out / "results" / f"eval_{name}.json"),
            "--num-workers", "0", *device])
    times["measurements"] = time.perf_counter() - start - sum(times.values())

    # 6. Pictures: held-out layouts, their samples and their flowers; the large layout, drawn by the sliding window.
    rows = []
    for i in range(c.layouts):
        name, samples_dir = f"flower_{i:04d}.png", cond_out / "samples" / f"layout_{i}"
        run_step(sample_transformer, [
            "--checkpoint-path", str(cond_ckpt), "--cond-image", str(labels_dir(heldout_dir) / name), "--target-image",
            str(heldout_dir / name), "--num-samples", str(c.samples_per_layout), "--top-k", str(s.top_k), "--seed",
            str(i), "--out-dir", str(samples_dir), *device])
        rows += [read_pictures([labels_dir(heldout_dir) / name], "segmentation", num_labels),
                 read_pictures(sorted(samples_dir.glob("sample_*.png"))), read_pictures([heldout_dir / name])]
    large_samples = cond_out / "samples" / "large"
    run_step(sample_transformer, [
        "--checkpoint-path", str(cond_ckpt), "--cond-image", str(labels_dir(large_dir) / "flower_0000.png"),
        "--target-image", str(large_dir / "flower_0000.png"), "--num-samples", str(c.samples_per_layout), "--top-k",
        str(s.top_k), "--out-dir", str(large_samples), *device])
    save_image_grid(torch.cat(rows), cond_out / "layouts.png", nrow=c.samples_per_layout + 2)
    pictures = (enlarge(cond_out / "layouts.png", out / "demo_conditional.png", s.enlarge),
                enlarge(large_samples / "grid.png", out / "demo_conditional_2x.png", s.enlarge))
    times["pictures"] = time.perf_counter() - start - sum(times.values())

    total = time.perf_counter() - start
    print(f"\nConditional demo done in {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + ").")
    print(f"Layout tokenizer on the held-out maps: pixel accuracy {labels_eval['pixel_accuracy']:.4f}, mean IoU "
          f"{labels_eval['mean_iou']:.4f}. Segmenter on the held-out flowers: pixel accuracy "
          f"{segmenter_scores['pixel_accuracy']:.4f}, mean IoU {segmenter_scores['mean_iou']:.4f}.")
    for name, r in results.items():
        print(f"{name:>13} GPT on the held-out pairs: {r['val_bits_per_token']:.3f} bits per token; a sample per "
              f"layout: PSNR to its flower {r['psnr_to_reference']:.2f} dB, mean IoU to its layout "
              f"{r['sample_mean_iou']:.4f}.")
    print(f"Pictures: {pictures[0]} (each row: layout, samples, the held-out flower) and {pictures[1]} (a layout "
          f"{c.large_scale}x the training size).")
    return dict(results=results, labels_eval=labels_eval, segmenter=segmenter_scores, seconds=total, times=times,
                pictures=pictures)


# ---- command line ----

def build_parser():
    p = ScriptParser("Run the whole method on demo flowers: data, stage 1, evaluation, stage 2 and sampling (about "
                     "15 minutes on 2 CPU cores).")
    p.add_argument("--out-dir", default="runs/demo", help="where the data, checkpoints, results and pictures go")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a few steps: checks every step in seconds")
    p.add_argument("--conditional", action="store_true", help="then draw flowers for held-out label maps: a layout "
                   "tokenizer and a conditional GPT, measured against the default GPT (about 15 minutes more)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA when available)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
