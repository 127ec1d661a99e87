"""Stage 1: train the VQGAN (encoder, codebook, decoder) with L1 + LPIPS, the codebook loss and a PatchGAN.

    python training_vqgan.py                              # the demo flowers, or edit DATASET_PATH below
    python training_vqgan.py --dataset-path /my/images
    torchrun --nproc_per_node 4 training_vqgan.py ...     # 4 GPUs
    python training_vqgan.py --image-kind segmentation --num-labels 182 --dataset-path /my/label_maps
    python training_vqgan.py --image-kind gray --dataset-path /my/depth_maps

Condition tokenizers (docs/conditional.md): gray maps train with L1 and the GAN, without LPIPS; label maps as taming's
VQSegmentationModel: one-hot in, logits out, binary cross-entropy and the codebook loss only.
"""
import argparse
from contextlib import nullcontext

import torch

from cli import ScriptParser, add_run_flags, config_from_flags, learning_rate, run_script
from data import ImageFolder
from discriminator import Discriminator, DiscriminatorConfig
from loss import ADAM_BETAS, LossConfig, Stage1, stage1_optimizers, train_step
from lpips import LPIPS
from runtime import keeps_signal_handlers, make_scaler, memory_format, no_sync, on_cpu_default, optimizer_step
from training_run import TrainingRun
from utils import for_display, save_plots
from vqgan import IMAGE_KINDS, QUANTIZERS, VQGAN, VQGANConfig

# ---- the one line to edit: your folder of images (sub-folders are searched too) ----
DATASET_PATH = "data/flowers"  # the scripts draw a small demo set of flowers here on first use

RUN_NAME = "vqgan"  # checkpoints/vqgan_last.pt, results/vqgan_metrics.jsonl
MUTABLE_FLAGS = {"recompute", "channels_last"}  # what a --resume may change besides the run flags


# ---- helpers ----

def check_args(args, loss_config):
    """What neither config nor the run checks: an image size the discriminator can judge while the GAN is on."""
    gan_starts = loss_config.disc_factor > 0 and (args.max_steps is None or args.disc_start < args.max_steps)
    if gan_starts and args.image_size < 32:  # 3 stride-2 and 2 stride-1 4x4 convs: 16 pixels end at 0x0
        raise ValueError(f"--image-size {args.image_size} is too small for the PatchGAN discriminator (32 or more); "
                         f"pass a larger size or --disc-factor 0.")


# The panels of results/vqgan_losses.png: (title, logged values, log scale).
PLOTS = [("losses", ["loss", "l1", "bce", "lpips", "q_loss"], True), ("GAN", ["g_loss", "d_loss"], False),
         ("adaptive weight λ", ["lam"], False), ("codebook usage (last 100 steps)", ["usage"], False),
         ("code perplexity", ["perplexity"], False), ("learning rate", ["lr"], True)]


def show_progress(run, vqgan, ema, x):
    """Rank 0: inputs over their reconstructions (by the EMA weights if kept; label maps in colour), code usage and
    the loss plots."""
    with torch.no_grad(), ema.applied(vqgan) if ema else nullcontext():
        vqgan.eval()
        recs = vqgan(x)[0]
        vqgan.train()
    kind = vqgan.config.image_kind
    run.save_grid(torch.cat([for_display(x, kind), for_display(recs, kind)]).float(), "reconstructions", nrow=len(x))
    if run.tensorboard is not None:
        run.tensorboard.add_histogram("codebook hits per code (last 100 steps)", vqgan.quantize.window_counts.sum(0),
                                      run.step)
    save_plots(run.log.history, run.results / "vqgan_losses.png", PLOTS, title="stage 1")


# ---- main ----

@keeps_signal_handlers
def main(args):
    config, loss_config = config_from_flags(VQGANConfig, args), config_from_flags(LossConfig, args)  # checked
    check_args(args, loss_config)
    run = TrainingRun(args, RUN_NAME)
    device = run.device
    paths = run.training_images(args.dataset_path, DATASET_PATH)

    fmt = memory_format(on_cpu_default(args.channels_last, device))
    vqgan = VQGAN(config).set_recompute(on_cpu_default(args.recompute, device))
    disc = Discriminator(DiscriminatorConfig(in_channels=config.in_channels))  # never trained for label maps
    vqgan, disc = vqgan.to(device, memory_format=fmt), disc.to(device, memory_format=fmt)
    lpips = None
    if loss_config.perceptual_loss_factor > 0:  # with factor 0 VGG is never built (no weights needed)
        lpips = LPIPS().to(device, memory_format=fmt)
    lr = learning_rate(args, run.dist.world_size)
    opt_vq, opt_disc = stage1_optimizers(vqgan, disc, lr, betas=(args.beta1, args.beta2))
    scaler_vq, scaler_disc = make_scaler(run.precision, device), make_scaler(run.precision, device)

    ckpt = run.resume(config)
    if ckpt is not None:
        vqgan.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["discriminator"])
        opt_vq.load_state_dict(ckpt["opt_vq"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        for group in opt_vq.param_groups + opt_disc.param_groups:  # the flags' learning rate, not the saved one
            group["lr"] = lr
        for scaler, key in ((scaler_vq, "scaler_vq"), (scaler_disc, "scaler_disc")):
            if ckpt.get(key):
                scaler.load_state_dict(ckpt[key])
    stage1 = Stage1(vqgan, disc, lpips, loss_config, run.precision, scalers=(scaler_vq, scaler_disc),
                    vqgan_wrapped=run.wrap(vqgan), disc_wrapped=run.wrap(disc))
    ema = run.keep_ema(vqgan, ckpt)
    run.guard(vqgan, disc)  # a skipped step leaves no trace in the codebook's statistics or BatchNorm's

    def checkpoint_state():
        usage, perplexity = vqgan.quantize.usage()
        return dict(model=vqgan.state_dict(), discriminator=disc.state_dict(), opt_vq=opt_vq.state_dict(),
                    opt_disc=opt_disc.state_dict(), scaler_vq=scaler_vq.state_dict(),
                    scaler_disc=scaler_disc.state_dict(), codebook_usage=usage, codebook_perplexity=perplexity,
                    ema=ema.state_dict(vqgan) if ema else None)

    dataset = ImageFolder(args.dataset_path, args.image_size, train=True, paths=paths, kind=config.image_kind,
                          num_labels=config.num_labels)
    loader = run.loader(dataset, args.batch_size)
    fixed_batch = None
    vqgan.train()
    disc.train()
    for batches in run.steps(loader, checkpoint_state):
        losses = []  # each micro-batch's generator and discriminator losses, for the non-finite guard
        for i, batch in enumerate(batches):  # --grad-accum micro-batches; gradients all-reduced on the last
            x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=fmt)
            fixed_batch = x[:8] if fixed_batch is None else fixed_batch
            with no_sync(stage1.vqgan_wrapped, stage1.disc_wrapped, sync=i == len(batches) - 1):
                metrics = train_step(stage1, x, run.step, args.grad_accum)
            losses += [metrics["loss"], metrics["d_loss"]]
        if run.skip_update(losses):  # keep the last good weights and codebook
            opt_vq.zero_grad(set_to_none=True)
            opt_disc.zero_grad(set_to_none=True)
            continue
        optimizer_step(opt_vq, scaler_vq)
        if ema:
            ema.update(vqgan)
        if loss_config.gan_active(run.step):
            optimizer_step(opt_disc, scaler_disc)
        if run.is_main:  # only rank 0 logs; on the device, so no wait
            metrics["usage"], metrics["perplexity"] = vqgan.quantize.usage(as_tensors=True)
        run.end_step(metrics, bar_keys=("loss", "l1", "bce", "d_loss", "usage"), lr=lr)
        if run.is_main and run.due(args.sample_every):
            show_progress(run, vqgan, ema, fixed_batch)
    return run.finish()


# ---- command line ----

def build_parser():
    p = ScriptParser("Stage 1 of VQGAN: train the VQ autoencoder.", RUN_NAME, MUTABLE_FLAGS)
    a = p.add_argument
    a("--dataset-path", default=DATASET_PATH,
      help="folder of images, searched recursively; the default one gets the demo flowers on first use")
    a("--image-kind", choices=IMAGE_KINDS, default="rgb",
      help="rgb: photos; gray: one-channel maps (depth, edges; 8- or 16-bit PNGs, each min-max scaled to [-1, 1]); "
           "segmentation: PNG label maps (pixel = class index), one-hot in, logits out (docs/conditional.md)")
    a("--num-labels", type=int, default=0, help="segmentation: the number of classes (a pixel value >= it is an "
                                                "error naming the file)")
    a("--image-size", type=int, default=256,
      help="training crop size; must divide by 2^(len(--ch-mult) - 1), and be 32 or more while the GAN runs")
    a("--batch-size", type=int, default=6, help="images per process per micro-step")
    a("--beta1", type=float, default=ADAM_BETAS[0], help="Adam beta1")
    a("--beta2", type=float, default=ADAM_BETAS[1], help="Adam beta2")
    a("--ch", type=int, default=128, help="base channel count of encoder and decoder")
    a("--ch-mult", type=int, nargs="+", default=[1, 1, 2, 2, 4],
      help="channel multiplier per resolution level; its length sets the downsampling factor 2^(length - 1)")
    a("--num-res-blocks", type=int, default=2, help="ResNet blocks per level (the decoder has one more)")
    a("--attn-resolutions", type=int, nargs="*", default=[16],
      help="feature-map widths that get self-attention (none: the flag with no value)")
    a("--z-channels", type=int, default=256, help="channels of the encoder output")
    a("--latent-dim", type=int, default=256, help="dimension of the codebook vectors")
    a("--num-codebook-vectors", type=int, default=None,
      help="codebook size; default: 1024 for vq and ema; fsq and lfq derive it (the product of --fsq-levels, "
           "2^--lfq-bits) and refuse another value")
    a("--beta", type=float, default=0.25, help="weight of the commitment term ||z - sg[z_q]||^2")
    a("--codebook-dim", type=int, default=0,
      help="look codes up in this many dimensions, through linear projections (0: in --latent-dim, the paper's)")
    a("--codebook-l2-norm", action="store_true",
      help="cosine-similarity lookup: codes and inputs l2-normalised")
    a("--restart-dead-codes", action="store_true",
      help="at each check, re-seed the dead codes (under 10%% of the uniform share of the hits since the last "
           "check) with encoder outputs drawn from the current batch; under torchrun the hits are summed over ranks")
    a("--restart-every", type=int, default=25, help="steps between dead-code checks")
    a("--quantizer", choices=QUANTIZERS, default="vq",
      help="vq: the paper's learned codebook; ema: each code the moving average of the encoder outputs it is "
           "picked for; fsq: finite scalar quantization (--fsq-levels); lfq: lookup-free, signs as bits (--lfq-bits); "
           "see docs/quantizers.md")
    a("--rotation-trick", action="store_true",
      help="vq/ema: the encoder's gradient goes through the rotation and rescaling onto its code, not a straight copy")
    a("--kmeans-init", action="store_true",
      help="vq/ema: at the first step the codes become k-means centres of the first batch's encoder outputs (all "
           "ranks' batches)")
    a("--codebook-ema-decay", type=float, default=0.99,
      help="ema: decay of the codes' moving averages (the weights' average is --ema-decay)")
    a("--fsq-levels", type=int, nargs="+", default=None,
      help="fsq (needs it): values per dimension, e.g. 8 8 8 for 512 codes")
    a("--lfq-bits", type=int, default=None,
      help="lfq (needs it): dimensions quantized to their sign, 2^bits codes (1 to 16)")
    a("--lfq-entropy-weight", type=float, default=0.1, help="lfq: weight of the entropy loss")
    a("--lfq-diversity-weight", type=float, default=1.0,
      help="lfq: weight of the codebook entropy inside the entropy loss")
    a("--disc-start", type=int, default=10000, help="step at which the GAN loss and the discriminator's updates start")
    a("--disc-factor", type=float, default=None,
      help="weight of the GAN losses once started; default: 1.0, and 0 for segmentation (no GAN, as taming)")
    a("--disc-weight", type=float, default=0.8, help="multiplies the adaptive weight lambda")
    a("--rec-loss-factor", type=float, default=1.0,
      help="weight of the reconstruction loss (L1; binary cross-entropy for segmentation)")
    a("--perceptual-loss-factor", type=float, default=None,
      help="weight of LPIPS (0: VGG16 is never built, so no ImageNet weights are needed); default: 1.0 for rgb, 0 for "
           "gray and segmentation (VGG judges RGB images; a positive value is refused for them)")
    a("--recompute", action=argparse.BooleanOptionalAction, default=None,
      help="recompute GroupNorm + swish in the backward instead of keeping them: a third less activation memory "
           "for ~5%% more time, where memory is scarce and time plentiful; default: on the CPU, off on CUDA")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="channels_last memory format for the convolutions: ~12%% of a CPU step (oneDNN). On CUDA, GroupNorm turns "
           "it back into the standard layout (PyTorch issue 111824), twice per norm, so it stays off there until "
           "bench.py --channels-last shows a gain on a GPU; default: on the CPU, off on CUDA")
    add_run_flags(p)
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
