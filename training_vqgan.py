"""Stage 1: train the VQGAN (encoder, codebook, decoder) with L1 + LPIPS, the codebook loss and a PatchGAN.

    python training_vqgan.py                              # the demo flowers, or edit DATASET_PATH below
    python training_vqgan.py --dataset-path /my/images
    torchrun --nproc_per_node 4 training_vqgan.py ...     # 4 GPUs
"""
import argparse
from contextlib import nullcontext
from dataclasses import fields

import torch

from data import ImageFolder
from discriminator import Discriminator
from lpips import LPIPS
from loss import LossConfig, Stage1, train_step
from runtime import fused_adam, keeps_signal_handlers, no_sync
from training_run import TrainingRun, run_script
from utils import HelpFormatter, add_run_flags, check_positive, save_plots
from vqgan import VQGAN, VQGANConfig

# ---- the one line to edit: your folder of images (sub-folders are searched too) ----
DATASET_PATH = "data/flowers"  # the default writes a small demo set of drawn flowers here on first use

BASE_LEARNING_RATE = 4.5e-6  # taming-transformers: lr = 4.5e-6 x global batch size


# ---- helpers ----

def from_flags(cls, args):
    """A config dataclass from the flags: every field has the flag of the same name (it validates itself)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def check_args(args):
    """Reject impossible values of the training flags up front, naming the flag (the configs check their own)."""
    check_positive(args, "batch_size", "epochs", "grad_accum", "save_every", "sample_every", "log_every",
                   "max_nonfinite_steps")
    if args.learning_rate is not None and not args.learning_rate > 0:  # also refuses nan
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}.")
    gan_starts = args.disc_factor > 0 and (args.max_steps is None or args.disc_start < args.max_steps)
    if gan_starts and args.image_size < 32:  # 3 stride-2 and 2 stride-1 4x4 convs: 16 pixels end at 0x0
        raise ValueError(f"--image-size {args.image_size} is too small for the PatchGAN discriminator (32 or more); "
                         f"pass a larger size or --disc-factor 0.")


def recompute_default(flag, device):
    """--recompute when given, else on where memory is scarce and time plentiful (the CPU), off on GPUs."""
    return device.type == "cpu" if flag is None else flag


def channels_last_default(flag, device):
    """--channels-last when given, else on for the CPU only, where it was measured (oneDNN: ~12% of a step).

    On CUDA, GroupNorm turns a channels_last input back into the standard layout (PyTorch issue 111824), twice per
    norm; bench.py --channels-last measures whether the faster convolutions win that back on a given GPU.
    """
    return device.type == "cpu" if flag is None else flag


def build_optimizers(vqgan, disc, lr, args):
    """taming's two Adams: one for the encoder, codebook and decoder, one for the discriminator."""
    fused = fused_adam(next(vqgan.parameters()).device)
    return (torch.optim.Adam(vqgan.parameters(), lr=lr, betas=(args.beta1, args.beta2), fused=fused),
            torch.optim.Adam(disc.parameters(), lr=lr, betas=(args.beta1, args.beta2), fused=fused))


def optimizer_step(opt, scaler):
    """Step and clear the gradients (a disabled scaler just steps; fp16's skips steps whose gradients overflowed)."""
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


# The panels of results/vqgan_losses.png: (title, logged values, log scale).
PLOTS = [("losses", ["loss", "l1", "lpips", "q_loss"], True), ("GAN", ["g_loss", "d_loss"], False),
         ("adaptive weight λ", ["lam"], False), ("codebook usage (last 100 steps)", ["usage"], False),
         ("code perplexity", ["perplexity"], False), ("learning rate", ["lr"], True)]


def show_progress(run, vqgan, ema, x):
    """Rank 0: inputs over their reconstructions (by the EMA weights if kept), code usage and the loss plots."""
    with torch.no_grad(), ema.applied(vqgan) if ema else nullcontext():
        vqgan.eval()
        recs = vqgan(x)[0]
        vqgan.train()
    run.save_grid(torch.cat([x, recs]).float(), "reconstructions", nrow=len(x))
    if run.tensorboard is not None:
        run.tensorboard.add_histogram("codebook hits per code (last 100 steps)", vqgan.quantize.window_counts.sum(0),
                                      run.step)
    save_plots(run.log.history, run.results / "vqgan_losses.png", PLOTS, title="stage 1")


# ---- main ----

@keeps_signal_handlers
def main(args):
    config, loss_config = from_flags(VQGANConfig, args), from_flags(LossConfig, args)  # they check their own flags
    check_args(args)
    run = TrainingRun(args, "vqgan")
    device = run.device
    paths = run.dataset_paths(args.dataset_path, DATASET_PATH)

    memory_format = torch.channels_last if channels_last_default(args.channels_last, device) else \
        torch.contiguous_format
    vqgan = VQGAN(config).set_recompute(recompute_default(args.recompute, device))
    vqgan, disc = vqgan.to(device, memory_format=memory_format), Discriminator().to(device, memory_format=memory_format)
    lpips = None
    if args.perceptual_loss_factor > 0:  # with factor 0 VGG is never built (no weights needed)
        lpips = LPIPS().to(device, memory_format=memory_format)
    lr = args.learning_rate or BASE_LEARNING_RATE * args.batch_size * run.d.world_size * args.grad_accum
    opt_vq, opt_disc = build_optimizers(vqgan, disc, lr, args)
    s = Stage1(vqgan, disc, lpips, loss_config, run.precision)

    ckpt = run.resume(config)
    if ckpt is not None:
        vqgan.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["discriminator"])
        opt_vq.load_state_dict(ckpt["opt_vq"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        for group in opt_vq.param_groups + opt_disc.param_groups:  # the flags' learning rate, not the saved one
            group["lr"] = lr
        for scaler, key in zip(s.scalers, ("scaler_vq", "scaler_disc")):
            if ckpt.get(key):
                scaler.load_state_dict(ckpt[key])
    s.vqgan_ddp, s.disc_ddp = run.wrap(vqgan), run.wrap(disc)
    ema = run.keep_ema(vqgan, ckpt)

    def state_dict():
        usage, perplexity = vqgan.quantize.usage()
        return dict(model=vqgan.state_dict(), discriminator=disc.state_dict(), opt_vq=opt_vq.state_dict(),
                    opt_disc=opt_disc.state_dict(), scaler_vq=s.scalers[0].state_dict(),
                    scaler_disc=s.scalers[1].state_dict(), codebook_usage=usage, codebook_perplexity=perplexity,
                    ema=ema.state_dict(vqgan) if ema else None)
    run.state_dict = state_dict

    loader = run.loader(ImageFolder(args.dataset_path, args.image_size, train=True, paths=paths), args.batch_size)
    fixed_batch = None
    vqgan.train()
    disc.train()
    for batches in run.steps(loader):
        for i, batch in enumerate(batches):  # --grad-accum micro-batches; gradients all-reduced on the last
            x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            fixed_batch = x[:8] if fixed_batch is None else fixed_batch
            with no_sync(s.vqgan_ddp, s.disc_ddp, sync=i == len(batches) - 1):
                metrics = train_step(s, x, run.step, args.grad_accum)
        if run.skip_update(metrics["loss"]):  # keep the last good weights
            opt_vq.zero_grad(set_to_none=True)
            opt_disc.zero_grad(set_to_none=True)
            continue
        optimizer_step(opt_vq, s.scalers[0])
        if ema:
            ema.update(vqgan)
        if loss_config.gan_active(run.step):
            optimizer_step(opt_disc, s.scalers[1])
        if run.is_main:  # only rank 0 logs; on the device, so no wait
            metrics["usage"], metrics["perplexity"] = vqgan.quantize.usage(as_tensors=True)
        run.end_step(metrics, bar_keys=("loss", "l1", "d_loss", "usage"), lr=lr)
        if run.is_main and run.due(args.sample_every):
            show_progress(run, vqgan, ema, fixed_batch)
    return run.finish()


# ---- command line ----

def build_parser():
    p = argparse.ArgumentParser(description="Stage 1 of VQGAN: train the VQ autoencoder.",
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--dataset-path", default=DATASET_PATH, help="folder of images, searched recursively")
    a("--image-size", type=int, default=256, help="training crop size (sides must divide by 2^(len(ch-mult)-1))")
    a("--batch-size", type=int, default=6, help="images per process per micro-step")
    a("--learning-rate", type=float, default=None, help="default: 4.5e-6 x global batch size (taming's scaling)")
    a("--beta1", type=float, default=0.5, help="Adam beta1")
    a("--beta2", type=float, default=0.9, help="Adam beta2")
    a("--ch", type=int, default=128, help="base channel count of encoder and decoder")
    a("--ch-mult", type=int, nargs="+", default=[1, 1, 2, 2, 4], help="channel multiplier per resolution level")
    a("--num-res-blocks", type=int, default=2, help="ResNet blocks per level (the decoder has one more)")
    a("--attn-resolutions", type=int, nargs="*", default=[16], help="feature-map widths that get self-attention")
    a("--z-channels", type=int, default=256, help="channels of the encoder output")
    a("--latent-dim", type=int, default=256, help="dimension of the codebook vectors")
    a("--num-codebook-vectors", type=int, default=None,
      help="codebook size; default: 1024 for vq and ema, the product of --fsq-levels or 2^--lfq-bits")
    a("--beta", type=float, default=0.25, help="weight of the commitment term ||z - sg[z_q]||^2")
    a("--codebook-dim", type=int, default=0, help="look codes up in this many dimensions (0: --latent-dim)")
    a("--codebook-l2-norm", action="store_true", help="cosine-similarity lookup with l2-normalised codes")
    a("--restart-dead-codes", action="store_true", help="re-seed unused codes from current encoder outputs")
    a("--restart-every", type=int, default=100, help="steps between dead-code checks")
    a("--quantizer", choices=["vq", "ema", "fsq", "lfq"], default="vq",
      help="vq: the paper's; ema: codes as moving averages; fsq: finite scalar; lfq: lookup-free (docs/quantizers.md)")
    a("--rotation-trick", action="store_true", help="vq/ema: gradients through the rotation onto the code")
    a("--kmeans-init", action="store_true", help="vq/ema: codes from k-means of the first batch's encoder outputs")
    a("--codebook-ema-decay", type=float, default=0.99, help="ema: decay of the codes' moving averages")
    a("--fsq-levels", type=int, nargs="+", default=None, help="fsq: values per dimension, e.g. 8 8 8 for 512 codes")
    a("--lfq-bits", type=int, default=None, help="lfq: dimensions quantized to their sign, 2^bits codes")
    a("--lfq-entropy-weight", type=float, default=0.1, help="lfq: weight of the entropy loss")
    a("--lfq-diversity-weight", type=float, default=1.0,
      help="lfq: weight of the codebook entropy inside the entropy loss")
    a("--disc-start", type=int, default=10000, help="step at which the GAN loss and discriminator start")
    a("--disc-factor", type=float, default=1.0, help="weight of the GAN losses once started")
    a("--disc-weight", type=float, default=0.8, help="multiplies the adaptive weight lambda")
    a("--rec-loss-factor", type=float, default=1.0, help="weight of the L1 reconstruction loss")
    a("--perceptual-loss-factor", type=float, default=1.0, help="weight of LPIPS (0: VGG is never built)")
    a("--recompute", action=argparse.BooleanOptionalAction, default=None,
      help="recompute GroupNorm + swish in the backward instead of keeping them: a third less activation memory "
           "for ~5%% more time; default: on the CPU, off on CUDA")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="channels_last memory format for the convolutions; default: on the CPU, off on CUDA (see bench.py)")
    add_run_flags(p, "vqgan")
    return p


if __name__ == "__main__":
    run_script(main, build_parser(), checkpoint_name="vqgan")
