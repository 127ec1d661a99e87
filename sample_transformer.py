"""Sample new images from a trained stage-2 model: one PNG per sample plus a grid.

    python sample_transformer.py --checkpoint-path checkpoints/transformer_last.pt --num-samples 16
"""
import argparse
import sys
import time

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from runtime import HelpFormatter, autocast, resolve_precision
from transformer import VQGANTransformer
from utils import CheckpointError, DataError, check_writable, pick_device, save_image_grid, seed_everything, \
    to_image_range


def check_args(args, model):
    for flag in ("num_samples", "batch_size"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if model.num_classes and args.class_id is None:
        raise ValueError(f"This model is class-conditional: pass --class-id between 0 and {model.num_classes - 1}"
                         f" ({', '.join(model.classes or [])}).")
    if args.class_id is not None and not 0 <= args.class_id < max(model.num_classes, 1):
        raise ValueError(f"--class-id {args.class_id} is not a class of this model "
                         f"({model.num_classes} classes)." if model.num_classes else
                         "--class-id needs a model trained with --conditional.")


def main(args):
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    model = VQGANTransformer.from_checkpoint(args.checkpoint_path, args.vqgan_checkpoint,
                                             trust=args.trust_checkpoint).to(device)
    check_args(args, model)
    if args.quantize == "int8":
        model.gpt.quantize_int8()
    out_dir = check_writable(args.out_dir)
    seed_everything(args.seed)

    images, start = [], time.perf_counter()
    with tqdm(total=args.num_samples, desc="sampling") as bar:
        while len(images) < args.num_samples:
            n = min(args.batch_size, args.num_samples - len(images))
            labels = torch.full((n,), args.class_id, device=device) if args.class_id is not None else None
            with autocast(precision, device):
                batch = model.sample(n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     labels=labels)
            images += list(batch.float().cpu())
            bar.update(n)
    elapsed = time.perf_counter() - start
    for i, image in enumerate(images):
        save_image(to_image_range(image), out_dir / f"sample_{i:04d}.png")
    save_image_grid(torch.stack(images), out_dir / "grid.png", nrow=min(8, len(images)))
    rate = len(images) / elapsed
    print(f"{len(images)} samples in {elapsed:.1f} s ({rate:.2f} samples/s, "
          f"{rate * model.num_tokens:.0f} tokens/s) written to {out_dir}/")
    return images


def build_parser():
    p = argparse.ArgumentParser(description="Sample images from a trained VQGAN transformer.",
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--checkpoint-path", default="checkpoints/transformer_last.pt", help="a stage-2 checkpoint")
    a("--vqgan-checkpoint", default=None, help="the stage-1 checkpoint, if it moved since stage-2 training")
    a("--num-samples", type=int, default=16, help="images to generate")
    a("--batch-size", type=int, default=16, help="images sampled in parallel")
    a("--temperature", type=float, default=1.0, help="softmax temperature (lower: safer, less varied)")
    a("--top-k", type=int, default=None, help="sample among the k most likely codes only (1: greedy)")
    a("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of codes with this mass")
    a("--class-id", type=int, default=None, help="the class to sample, for a model trained with --conditional")
    a("--seed", type=int, default=0, help="random seed")
    a("--out-dir", default="samples", help="where the PNGs go")
    a("--device", default=None, help="cuda, cpu ... (default: CUDA when available)")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--quantize", choices=["none", "int8"], default="none",
      help="int8: the GPT's weights in int8 with a scale per row, for about 1.7x faster batch-1 sampling (CPU only)")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    return p


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
