"""Stage 2: train a GPT on the codebook indices of a trained stage-1 VQGAN.

    python training_transformer.py                                   # demo flowers + ./checkpoints/vqgan_last.pt
    python training_transformer.py --dataset-path /my/images --checkpoint-path run/checkpoints/vqgan_last.pt
    torchrun --nproc_per_node 4 training_transformer.py ...          # 4 GPUs
"""
import argparse
import hashlib
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from demo_flowers import resolve_dataset
from runtime import (HelpFormatter, NonFiniteGuard, ResumableSampler, StopSignal, all_ranks_agree, autocast,
                     check_same_config, cleanup_distributed, keeps_signal_handlers, make_scaler, no_sync,
                     resolve_precision, reuse_freed_memory, setup_distributed)
from transformer import TransformerConfig, VQGANTransformer
from utils import (CheckpointError, DataError, ImageFolder, MetricsLog, build_loader, check_writable, find_images,
                   load_checkpoint, save_checkpoint, save_image_grid, save_loss_plot, seed_everything, split_paths)
from vqgan import VQGAN

# ---- the one line to edit: your folder of images (sub-folders are classes with --conditional) ----
DATASET_PATH = "data/flowers"  # the default writes a small demo set of drawn flowers here on first use

BASE_LEARNING_RATE = 4.5e-6  # taming-transformers: lr = 4.5e-6 x global batch size


# ---- data: images, or token rows encoded once ----

class TokenRows(torch.utils.data.Dataset):
    """Pre-computed index rows (N, h*w) and labels, as dicts like those of ImageFolder."""

    def __init__(self, indices, labels):
        self.indices, self.labels = indices, labels

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        item = {"indices": self.indices[i].long()}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


def token_cache_path(stage1_path, image_size, paths, split):
    """Cache file next to the stage-1 checkpoint, keyed by its bytes, the image size and the image list."""
    h = hashlib.sha256()
    with open(stage1_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    h.update(f"{image_size}|".encode() + "\n".join(map(str, paths)).encode())
    return Path(stage1_path).parent / f"tokens_{split}_{image_size}px_{h.hexdigest()[:16]}.pt"


@torch.no_grad()
def precompute_tokens(transformer, dataset, batch_size, num_workers, device, precision):
    """Encode every image and its horizontal flip once (centre crops): rows (2N, h*w) as int32, labels or None."""
    rows, labels = [], []
    loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers)
    for batch in tqdm(loader, desc="encoding tokens"):
        if batch is None:
            continue
        x = batch["image"].to(device)
        with autocast(precision, device):
            for view in (x, x.flip(-1)):
                rows.append(transformer.encode_to_indices(view).int().cpu())
        if "label" in batch:
            labels += [batch["label"], batch["label"]]
    return torch.cat(rows), (torch.cat(labels) if labels else None)


def make_dataset(paths, args, transformer, train, ckpt_dir_key, device, precision, is_main):
    """An image dataset, or with --precompute-tokens a token dataset read from (or written to) the cache."""
    images = ImageFolder(args.dataset_path, transformer.image_size, train=train and not args.precompute_tokens,
                         with_labels=args.conditional, paths=paths)
    if not args.precompute_tokens:
        return images
    cache = token_cache_path(args.checkpoint_path, transformer.image_size, paths, ckpt_dir_key)
    if not cache.exists() and is_main:
        rows, labels = precompute_tokens(transformer, images, args.batch_size, args.num_workers, device, precision)
        save_checkpoint({"indices": rows, "labels": labels}, cache)
        print(f"Wrote the token cache {cache}.")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other ranks wait for rank 0's cache
    data = load_checkpoint(cache)
    return TokenRows(data["indices"], data["labels"])


def batch_indices(batch, transformer, device, precision):
    """(B, h*w) indices of a batch: from the cache, or by encoding its images with the frozen VQGAN."""
    if "indices" in batch:
        return batch["indices"].to(device, non_blocking=True)
    with autocast(precision, device):
        return transformer.encode_to_indices(batch["image"].to(device, non_blocking=True))


# ---- checks and evaluation ----

def check_args(args):
    """Reject impossible flag values up front, naming the flag."""
    for flag in ("batch_size", "epochs", "n_layer", "n_head", "n_embd", "block_size", "grad_accum", "save_every",
                 "sample_every"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.image_size is not None and args.image_size <= 0:
        raise ValueError(f"--image-size must be positive, got {args.image_size}.")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n-embd {args.n_embd} must divide by --n-head {args.n_head}.")
    if not 0.0 < args.pkeep <= 1.0:
        raise ValueError(f"--pkeep must be in (0, 1], got {args.pkeep}.")


@torch.no_grad()
def evaluate(model, loader, transformer, device, precision, max_batches):
    """Mean validation cross-entropy (nats per token) over up to max_batches batches; None without val data."""
    model.eval()
    losses = []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        if batch is None:
            continue
        with autocast(precision, device):
            _, loss = model(batch_indices(batch, transformer, device, precision), batch.get("label"))
        losses.append(loss.float().item())
    model.train()
    return sum(losses) / len(losses) if losses else None


def sample_grid(transformer, batch, device, precision, path, top_k):
    """Rows: input, reconstruction, completion of the top half, free sample."""
    x = batch["image"][:4].to(device) if "image" in batch else transformer.indices_to_image(
        batch["indices"][:4].to(device))
    labels = batch["label"][:4].to(device) if "label" in batch else None
    with autocast(precision, device):
        logs = transformer.log_images(x, labels=labels, top_k=top_k)
    save_image_grid(torch.cat(list(logs.values())).float(), path, nrow=len(x))


# ---- main ----

@keeps_signal_handlers
def main(args):
    check_args(args)
    d = setup_distributed(args.device)
    device = d.device
    reuse_freed_memory(device)
    precision = resolve_precision(args.precision, device)
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "checkpoints" / "transformer_last.pt"
    if d.is_main:
        check_writable(out_dir)
    if not Path(args.checkpoint_path).is_file():
        raise CheckpointError(f"No stage-1 checkpoint at {args.checkpoint_path}: train one with "
                              f"`python training_vqgan.py` or pass --checkpoint-path.")
    seed_everything(args.seed + d.rank)

    resume = load_checkpoint(ckpt_path, trust=args.trust_checkpoint) if args.resume and ckpt_path.exists() else None
    vqgan = VQGAN.from_checkpoint(args.checkpoint_path, trust=args.trust_checkpoint)
    paths = resolve_dataset(args.dataset_path, DATASET_PATH) if d.is_main else None
    if d.enabled:
        torch.distributed.barrier()
        paths = find_images(args.dataset_path) if paths is None else paths
    if args.val_path:
        train_paths, val_paths = paths, find_images(args.val_path)
    else:
        train_paths, val_paths = split_paths(paths, args.val_fraction, seed=args.seed)
    classes = ImageFolder(args.dataset_path, 8, with_labels=True, paths=paths).classes if args.conditional else None
    num_classes = len(classes) if classes else 0
    config = TransformerConfig(image_size=args.image_size or vqgan.config.image_size, n_layer=args.n_layer,
                               n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size, pkeep=args.pkeep,
                               num_classes=num_classes, embd_pdrop=args.dropout, resid_pdrop=args.dropout,
                               attn_pdrop=args.dropout,
                               class_dropout=(0.1 if args.conditional else 0.0) if args.class_dropout is None
                               else args.class_dropout)
    if resume is not None:
        check_same_config(resume["config"], asdict(config), ckpt_path)
    transformer = VQGANTransformer(vqgan, config).to(device)
    gpt = transformer.gpt  # the plain module: its state dict is what we save

    global_batch = args.batch_size * d.world_size * args.grad_accum
    lr = args.learning_rate if args.learning_rate is not None else BASE_LEARNING_RATE * global_batch
    optimizer = gpt.configure_optimizers(lr, weight_decay=args.weight_decay)
    scaler = make_scaler(precision, device)
    step, epoch, start_batch = 0, 0, 0
    if resume is not None:
        gpt.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        for group in optimizer.param_groups:  # the flags' learning rate, not the saved one
            group["lr"] = lr
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step, epoch, start_batch = resume["step"], resume["epoch"], resume.get("batch_in_epoch", 0)
        if d.is_main:
            print(f"Resumed from {ckpt_path} at step {step}.")

    model = transformer
    if d.enabled:
        # The GPT has no buffers and the frozen VQGAN is the same on every rank: nothing to broadcast per step.
        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    if args.compile:  # around DDP, as in stage 1
        model = torch.compile(model)

    train_set = make_dataset(train_paths, args, transformer, True, "train", device, precision, d.is_main)
    sampler = ResumableSampler(len(train_set), args.batch_size, shuffle=True, seed=args.seed, rank=d.rank,
                               world_size=d.world_size)
    loader = build_loader(train_set, args.batch_size, train=True, num_workers=args.num_workers, sampler=sampler)
    val_loader = None
    if val_paths and d.is_main:
        val_set = make_dataset(val_paths, args, transformer, False, "val", device, precision, d.is_main)
        val_loader = build_loader(val_set, args.batch_size, train=False, num_workers=0)
    batches_per_epoch = len(train_set) // d.world_size // args.batch_size
    if batches_per_epoch < args.grad_accum:
        raise DataError(f"{len(train_set)} training items make fewer than one step of --batch-size "
                        f"{args.batch_size} x --grad-accum {args.grad_accum} per process.")
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * (batches_per_epoch // args.grad_accum)

    log = MetricsLog(out_dir / "results" / "transformer_metrics.jsonl", resume=step > 0) if d.is_main else None
    if log is not None:
        log.truncate_after(step)
    stop = StopSignal()
    guard = NonFiniteGuard(args.max_nonfinite_steps, ckpt_path)
    skipped_files, micro, fixed_batch = 0, 0, None

    def save(reason=""):
        if not d.is_main:
            return
        save_checkpoint(dict(model=gpt.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                             step=step, epoch=epoch, batch_in_epoch=start_batch, config=asdict(config),
                             vqgan_checkpoint=str(Path(args.checkpoint_path).resolve()),
                             classes=classes, args=vars(args)), ckpt_path)
        if reason:
            tqdm.write(f"Saved {ckpt_path} at step {step} ({reason}).")

    bar = tqdm(total=max_steps, initial=step, desc="stage 2", disable=not d.is_main, dynamic_ncols=True)
    transformer.train()
    while step < max_steps:
        sampler.set_epoch(epoch, start_batch)
        step_at_epoch_start, whole_epoch, skipped_in_epoch = step, start_batch == 0, 0
        for batch in loader:
            start_batch += 1
            skipped_in_epoch += args.batch_size if batch is None else batch["skipped"]  # drop_last: full batches
            skipped_files = max(skipped_files, skipped_in_epoch)  # each pass meets the same bad files: count one
            if batch is None:
                continue
            if fixed_batch is None:
                fixed_batch = batch
            indices = batch_indices(batch, transformer, device, precision)
            labels = batch["label"].to(device) if "label" in batch else None
            micro += 1
            sync = micro % args.grad_accum == 0
            with no_sync(model, sync), autocast(precision, device):
                _, loss = model(indices, labels)
            with no_sync(model, sync):
                scaler.scale(loss / args.grad_accum).backward()
            if not sync:
                continue
            loss_value = loss.item()  # the step's one device sync
            if guard.skip(loss_value, step, d):  # keep the last good weights
                optimizer.zero_grad(set_to_none=True)
                continue
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if d.is_main:
                values = {"loss": loss_value, "bits_per_token": loss_value / math.log(2)}
                sampling = step % args.sample_every == 0 or step == max_steps
                if sampling:
                    val = evaluate(model, val_loader, transformer, device, precision, args.val_batches) \
                        if val_loader is not None else None
                    if val is not None:
                        values.update(val_loss=val, val_bits_per_token=val / math.log(2))
                    sample_grid(transformer, fixed_batch, device, precision,
                                out_dir / "results" / f"transformer_samples_{step:07d}.png", args.sample_top_k)
                log.log(step, **values)
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k in ("loss", "val_loss")})
                if sampling:
                    save_loss_plot(log.history, out_dir / "results" / "transformer_losses.png", title="stage 2")
            if step % args.save_every == 0:
                save()
            if all_ranks_agree(stop.received, d):
                save(f"received {stop.received or 'a stop signal'}")
                bar.close()
                cleanup_distributed()
                return ckpt_path
            if step >= max_steps:
                break
        else:
            if step == step_at_epoch_start and whole_epoch:
                raise DataError(f"A whole epoch gave no usable batch: are the images in {args.dataset_path} readable?")
            epoch, start_batch = epoch + 1, 0
    bar.close()
    save("end of training")
    if d.is_main and skipped_files:
        print(f"Skipped {skipped_files} unreadable image file(s) during training (named in the warnings above).")
    cleanup_distributed()
    return ckpt_path


# ---- command line ----

def build_parser():
    p = argparse.ArgumentParser(description="Stage 2 of VQGAN: train a GPT on the stage-1 codebook indices.",
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--dataset-path", default=DATASET_PATH, help="folder of images (sub-folders are classes with --conditional)")
    a("--checkpoint-path", default="checkpoints/vqgan_last.pt", help="the stage-1 checkpoint")
    a("--val-path", default=None, help="folder of held-out images (default: a --val-fraction split)")
    a("--val-fraction", type=float, default=0.05, help="share of the images held out when --val-path is not given")
    a("--val-batches", type=int, default=50, help="batches of validation data per evaluation")
    a("--image-size", type=int, default=None, help="default: the stage-1 model's training size")
    a("--batch-size", type=int, default=8, help="sequences per process per micro-step")
    a("--epochs", type=int, default=100, help="passes over the data set (unless --max-steps is given)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps, counted across resumes")
    a("--learning-rate", type=float, default=None, help="default: 4.5e-6 x global batch size (taming's scaling)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the Linear weights")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this value")
    a("--pkeep", type=float, default=1.0, help="probability of keeping each input index (else a random code)")
    a("--n-layer", type=int, default=24, help="transformer blocks")
    a("--n-head", type=int, default=16, help="attention heads")
    a("--n-embd", type=int, default=1024, help="embedding width")
    a("--block-size", type=int, default=256, help="longest sequence; at least the h*w tokens of the latent grid")
    a("--dropout", type=float, default=0.0, help="embedding, residual and attention dropout")
    a("--conditional", action="store_true", help="one start token per class (the sub-folders of the data set)")
    a("--class-dropout", type=float, default=None, help="with --conditional: how often a learned null class "
      "replaces the class token, for sample_transformer.py --cfg-scale (default 0.1; 0: no null class)")
    a("--precompute-tokens", action="store_true", help="encode the data set once (and its flips) and train from that")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--compile", action="store_true", help="wrap the model in torch.compile")
    a("--device", default=None, help="cuda, cuda:1, cpu ... (default: CUDA when available)")
    a("--out-dir", default=".", help="where results/ and checkpoints/ go")
    a("--resume", action="store_true", help="continue from <out-dir>/checkpoints/transformer_last.pt")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    a("--seed", type=int, default=0, help="random seed (offset by rank)")
    a("--num-workers", type=int, default=4, help="data-loading worker processes per GPU")
    a("--save-every", type=int, default=1000, help="steps between checkpoints")
    a("--sample-every", type=int, default=500, help="steps between sample grids and validation")
    a("--sample-top-k", type=int, default=None, help="top-k of the samples drawn during training")
    a("--max-nonfinite-steps", type=int, default=20, help="stop after this many non-finite losses in a row")
    return p


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (DataError, CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
