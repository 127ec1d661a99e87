"""Stage 2: train a GPT on the codebook indices of a trained stage-1 VQGAN.

    python training_transformer.py                                   # demo flowers + ./checkpoints/vqgan_last.pt
    python training_transformer.py --dataset-path /my/images --checkpoint-path run/checkpoints/vqgan_last.pt
    python training_transformer.py ... --cond-path /my/label_maps --cond-checkpoint labels/checkpoints/vqgan_last.pt
    torchrun --nproc_per_node 4 training_transformer.py ...          # 4 GPUs
"""
import math
from contextlib import nullcontext
from pathlib import Path

import torch

import maskgit
from checkpoint import CheckpointError, checkpoint_path
from cli import ScriptParser, add_run_flags, config_from_flags, learning_rate, run_script
from config import check_positive
from data import (ImageFolder, PairedFolder, build_loader, cached_tokens, collate_images, find_images, split_paths,
                  token_cache_path)
from runtime import autocast, keeps_signal_handlers, make_scaler, no_sync, optimizer_step
from training_run import TrainingRun
from transformer import OBJECTIVES, TransformerConfig, VQGANTransformer
from utils import save_plots
from vqgan import VQGAN

# ---- the one line to edit: your folder of images (sub-folders are classes with --conditional) ----
DATASET_PATH = "data/flowers"  # the scripts draw a small demo set of flowers here on first use

RUN_NAME = "transformer"  # checkpoints/transformer_last.pt, results/transformer_metrics.jsonl
MUTABLE_FLAGS = {"val_batches", "sample_top_k"}  # what a --resume may change besides the run flags


# ---- data: images, or token rows encoded once ----

def image_dataset(paths, args, transformer, train, root, cond_path):
    """The images at paths (under root), paired with their conditions under cond_path when the model has an image
    condition."""
    if transformer.cond_vqgan is None:
        return ImageFolder(root, transformer.image_size, train=train, with_labels=args.conditional, paths=paths)
    return PairedFolder(root, cond_path, transformer.image_size, train=train, with_labels=args.conditional,
                        paths=paths, cond_kind=transformer.cond_kind,
                        num_labels=transformer.cond_vqgan.config.num_labels)


def make_dataset(paths, args, transformer, train, root, cond_path, split, run):
    """image_dataset, or with --precompute-tokens a token dataset read from (or written to) the cache.

    With the cache, every rank must call this (each encodes its share of a missing cache); only rank 0 gets the
    validation rows (it alone evaluates), the other ranks None.
    """
    images = image_dataset(paths, args, transformer, train and not args.precompute_tokens, root, cond_path)
    if getattr(images, "missing", None) and run.is_main:
        print(f"Skipped {len(images.missing)} {split} image(s) without a condition file under {cond_path} (the "
              f"first: {images.missing[0]}).")
    if not args.precompute_tokens:
        return images
    cond = None if transformer.cond_vqgan is None else (cond_checkpoint(args), images.cond_paths, args.cond_downsample)
    cache = token_cache_path(args.checkpoint_path, transformer.image_size, images.paths, split, cond)
    return cached_tokens(cache, images, lambda view: encode_batch(view, transformer, run), args.batch_size,
                         args.num_workers, every_rank=train)


def encode_batch(batch, transformer, run):
    """The codes of a batch's images (B, h*w), and of its conditions (B, hc*wc) when it has them."""
    with autocast(run.precision, run.device):
        codes = {"indices": transformer.encode_to_indices(batch["image"].to(run.device, non_blocking=True))}
        if "cond" in batch:
            codes["cond_indices"] = transformer.encode_condition(batch["cond"].to(run.device)).flatten(1)
    return codes


def batch_codes(batch, transformer, run):
    """(indices (B, h*w), condition codes (B, hc*wc) or None) of a batch: from the cache, or encoded."""
    if "indices" not in batch:
        batch = encode_batch(batch, transformer, run)
    cond = batch.get("cond_indices")
    cond = None if cond is None else cond.to(run.device, non_blocking=True)
    return batch["indices"].to(run.device, non_blocking=True), cond


def cond_checkpoint(args):
    """The stage-1 checkpoint that tokenizes the conditions: --cond-checkpoint, else the image's own."""
    return args.cond_checkpoint or args.checkpoint_path


def batch_labels(batch, run):
    """(B,) class labels of a batch on the device, or None; from the loader's pinned memory without a wait."""
    return batch["label"].to(run.device, non_blocking=True) if "label" in batch else None


# ---- checks and evaluation ----

def check_args(args):
    """What neither the config nor the run checks: the validation batches, the stage-1 checkpoints, the condition
    flags."""
    check_positive(args, "val_batches")
    if not Path(args.checkpoint_path).exists():  # a file, or a model folder of export.py
        raise CheckpointError(f"No stage-1 checkpoint at {args.checkpoint_path}: train one with "
                              f"`python training_vqgan.py` or pass --checkpoint-path.")
    conditioned = [flag for flag in ("cond_checkpoint", "val_cond_path") if getattr(args, flag)]
    if conditioned and not args.cond_path:
        raise ValueError(f"--{conditioned[0].replace('_', '-')} goes with --cond-path, the folder of conditions.")
    if args.cond_path and args.val_path and not args.val_cond_path:
        raise ValueError("--val-path with --cond-path needs --val-cond-path, the conditions of the held-out images.")
    if args.cond_checkpoint and not Path(args.cond_checkpoint).exists():  # a file, or a model folder
        raise CheckpointError(f"No condition tokenizer at --cond-checkpoint {args.cond_checkpoint}: train one with "
                              f"`python training_vqgan.py --image-kind ...`.")


@torch.no_grad()
def evaluate(transformer, loader, run, max_batches):
    """Mean validation losses over up to max_batches batches ({} without val data): ar's cross-entropy (val_loss, nats
    per token) and bits per token; maskgit's cross-entropy on the masked tokens at each of maskgit.VALIDATION_RATIOS,
    the same positions in every evaluation."""
    transformer.eval()
    generator = torch.Generator().manual_seed(0)  # maskgit: the masked positions of each batch, the same every time
    losses = {}
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        if batch is None:
            continue
        indices, cond = batch_codes(batch, transformer, run)
        with autocast(run.precision, run.device):
            batch_losses = transformer.validation_losses(indices, batch_labels(batch, run), generator, cond)
        for key, loss in batch_losses.items():
            losses.setdefault(key, []).append(loss.float())
    transformer.train()
    means = {key: torch.stack(values).mean().item() for key, values in losses.items()}
    if "val_loss" in means:
        means["val_bits_per_token"] = means["val_loss"] / math.log(2)
    return means


# The panels of results/transformer_losses.png for each objective: (title, logged values, log scale).
PLOTS = {"ar": [("cross-entropy (nats per token)", ["loss", "val_loss"], False),
                ("bits per token", ["bits_per_token", "val_bits_per_token"], False), ("learning rate", ["lr"], True)],
         "maskgit": [("masked-token cross-entropy (nats)",
                      ["loss", *map(maskgit.validation_key, maskgit.VALIDATION_RATIOS)], False),
                     ("learning rate", ["lr"], True)]}


def show_progress(run, transformer, ema, images, top_k):
    """Rank 0: rows of fixed images, their reconstructions, completions of their top half and free samples (by the EMA
    weights if kept); plots."""
    with ema.applied(transformer.gpt) if ema else nullcontext():
        show_samples(run, transformer, images, top_k)
    save_plots(run.log.history, run.results / "transformer_losses.png", PLOTS[transformer.config.objective],
               title="stage 2")


def show_samples(run, transformer, images, top_k):
    """The grid of show_progress, in results/ and TensorBoard."""
    if images is not None:  # None: none of the first training images was readable
        x = images["image"].to(run.device)
        cond = images["cond"].to(run.device) if "cond" in images else None
        with autocast(run.precision, run.device):
            logs = transformer.log_images(x, labels=batch_labels(images, run), top_k=top_k, cond=cond)
        run.save_grid(torch.cat(list(logs.values())).float(), "transformer_samples", nrow=len(x),
                      row_labels=[name.replace("_", " ") for name in logs])


# ---- main ----

@keeps_signal_handlers
def main(args):
    check_args(args)
    vqgan = VQGAN.from_checkpoint(args.checkpoint_path, trust=args.trust_checkpoint,
                                  user="training_transformer.py --checkpoint-path")  # the wrong kind fails here
    cond_vqgan = None  # the image's own tokenizer reads the conditions unless --cond-checkpoint names another
    if args.cond_path:
        cond_vqgan = VQGAN.from_checkpoint(args.cond_checkpoint, trust=args.trust_checkpoint,
                                           user="training_transformer.py --cond-checkpoint") \
            if args.cond_checkpoint else vqgan
    run = TrainingRun(args, RUN_NAME)
    device = run.device
    paths = run.training_images(args.dataset_path, DATASET_PATH)
    if args.val_path:
        train_paths, val_paths = paths, find_images(args.val_path)
    else:
        train_paths, val_paths = split_paths(paths, args.val_fraction, seed=args.seed)
    classes = ImageFolder(args.dataset_path, 8, with_labels=True, paths=paths).classes if args.conditional else None
    config = config_from_flags(TransformerConfig, args, image_size=args.image_size or vqgan.config.image_size,
                               num_classes=len(classes) if classes else 0)
    transformer = VQGANTransformer(vqgan, config, cond_vqgan).to(device)
    gpt = transformer.gpt  # the plain module: its state dict is what we save
    lr = learning_rate(args, run.dist.world_size)
    optimizer = gpt.configure_optimizers(lr, weight_decay=args.weight_decay)
    scaler = make_scaler(run.precision, device)

    ckpt = run.resume(config)
    if ckpt is not None:
        gpt.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the flags' learning rate, not the saved one
            group["lr"] = lr
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    model, ema = run.wrap(transformer), run.keep_ema(gpt, ckpt)

    def checkpoint_state():
        return dict(model=gpt.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    classes=classes, ema=ema.state_dict(gpt) if ema else None,
                    vqgan_checkpoint=str(Path(args.checkpoint_path).resolve()),
                    cond_checkpoint=str(Path(cond_checkpoint(args)).resolve()) if args.cond_path else None,
                    cond_kind=transformer.cond_kind)

    loader = run.loader(make_dataset(train_paths, args, transformer, True, args.dataset_path, args.cond_path, "train",
                                     run), args.batch_size)
    val_set = make_dataset(val_paths, args, transformer, False, args.val_path or args.dataset_path,
                           args.val_cond_path or args.cond_path, "val", run) if val_paths else None  # all ranks
    val_loader = build_loader(val_set, args.batch_size, train=False, num_workers=args.num_workers) \
        if val_set is not None and run.is_main else None  # rank 0 evaluates; workers decode while the GPU encodes
    shown = None
    if run.is_main:  # the first training images, also with a cache
        fixed = image_dataset(train_paths[:8], args, transformer, False, args.dataset_path, args.cond_path)
        shown = collate_images([fixed[i] for i in range(min(4, len(fixed)))])
    transformer.train()
    for batches in run.steps(loader, checkpoint_state):
        losses = []  # each micro-batch's, for the non-finite guard
        for i, batch in enumerate(batches):  # --grad-accum micro-batches; gradients all-reduced on the last
            indices, cond = batch_codes(batch, transformer, run)
            with no_sync(model, sync=i == len(batches) - 1):
                with autocast(run.precision, device):
                    _, loss = model(indices, batch_labels(batch, run), cond)
                scaler.scale(loss / args.grad_accum).backward()
            losses.append(loss)
        if run.skip_update(losses):  # keep the last good weights
            optimizer.zero_grad(set_to_none=True)
            continue
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), args.grad_clip)
        optimizer_step(optimizer, scaler)
        if ema:
            ema.update(gpt)
        loss = loss.detach().float()
        # maskgit's loss is on masked tokens, a bound on no likelihood: no bits per token
        run.end_step(dict(loss=loss) if config.objective == "maskgit" else
                     dict(loss=loss, bits_per_token=loss / math.log(2)), bar_keys=("loss",), lr=lr)
        if run.is_main and run.due(args.sample_every):
            val = evaluate(transformer, val_loader, run, args.val_batches) if val_loader is not None else {}
            if val:  # the bar keeps showing them until the next evaluation
                run.record([key for key in val if key != "val_bits_per_token"], **val)
            show_progress(run, transformer, ema, shown, args.sample_top_k)
    return run.finish()


# ---- command line ----

def build_parser():
    p = ScriptParser("Stage 2 of VQGAN: train a GPT on the stage-1 codebook indices.", RUN_NAME, MUTABLE_FLAGS)
    a = p.add_argument
    a("--dataset-path", default=DATASET_PATH, help="folder of images (sub-folders are classes with --conditional); "
      "the default one gets the demo flowers on first use")
    a("--checkpoint-path", default=str(checkpoint_path(".", "vqgan")),
      help="the stage-1 checkpoint, or a stage-1 model folder of export.py")
    a("--val-path", default=None, help="folder of held-out images (default: a --val-fraction split)")
    a("--val-fraction", type=float, default=0.05, help="share of the images held out when --val-path is not given")
    a("--val-batches", type=int, default=50, help="batches of validation data per evaluation")
    a("--image-size", type=int, default=None, help="default: the stage-1 model's training size")
    a("--batch-size", type=int, default=8, help="sequences per process per micro-step")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the Linear weights")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this value")
    a("--pkeep", type=float, default=1.0,
      help="probability of keeping each input index, else a random code replaces it (the targets stay clean)")
    a("--objective", choices=OBJECTIVES, default="ar",
      help="ar: predict each token from those before it (taming's GPT, sampled token by token); maskgit: the same "
           "blocks without the causal mask predict masked tokens (a cosine-schedule share of each grid), sampled in "
           "a few passes (docs/maskgit.md)")
    a("--label-smoothing", type=float, default=None,
      help="maskgit: label smoothing of the cross-entropy on the masked tokens (default: 0.1, MaskGIT's; ar: none)")
    a("--n-layer", type=int, default=24, help="transformer blocks")
    a("--n-head", type=int, default=16, help="attention heads")
    a("--n-embd", type=int, default=1024, help="embedding width")
    a("--block-size", type=int, default=256,
      help="longest sequence; at least the h*w tokens of the latent grid (h*w + 1 for a --conditional maskgit model; "
           "with --cond-path: 1 + the condition's tokens + h*w - 1)")
    a("--dropout", type=float, default=0.0, help="embedding, residual and attention dropout")
    a("--conditional", action="store_true", help="one start token per class (the sub-folders of the data set)")
    a("--class-dropout", type=float, default=None, help="with --conditional: how often a learned null class "
      "replaces the class token, for sample_transformer.py --cfg-scale (default: 0.1 with --conditional, else 0; 0: "
      "no null class, the vocabulary of older checkpoints)")
    a("--cond-path", default=None, help="folder of image conditions (label maps, depth, low-resolution copies ...): "
      "each image is paired with the file of the same relative path and stem here (any image extension; images "
      "without one are skipped and counted); the GPT reads [condition tokens, image tokens] (default: none)")
    a("--val-cond-path", default=None, help="with --val-path and --cond-path: the held-out images' conditions "
      "(default: none; with a --val-fraction split they come from --cond-path)")
    a("--cond-checkpoint", default=None, help="the stage-1 checkpoint that tokenizes the conditions (training_vqgan.py "
      "--image-kind rgb, gray or segmentation; its kind says how the files are read) (default: --checkpoint-path, "
      "the image's own tokenizer, for RGB conditions)")
    a("--cond-downsample", type=int, default=1, help="resize each condition to 1/S (nearest neighbour) before "
      "tokenizing it: taming's downsample_cond_size, for super-resolution")
    a("--cond-dropout", type=float, default=0.0, help="how often the null condition (every condition token a learned "
      "null token) replaces the condition in training, for sample_transformer.py --cfg-scale")
    a("--cond-embedding", choices=["shared", "separate"], default="shared", help="shared: condition code k and image "
      "code k share one embedding row (taming's one table); separate: condition codes get rows of their own")
    a("--precompute-tokens", action="store_true",
      help="encode the data set once (each image and its flip) into a cache beside the stage-1 checkpoint, and train "
           "from that")
    a("--sample-top-k", type=int, default=None, help="top-k of the samples drawn during training (default: all codes)")
    add_run_flags(p)
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
