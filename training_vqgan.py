"""Stage 1: train the VQGAN (encoder, codebook, decoder) with L1 + LPIPS, the codebook loss and a PatchGAN.

    python training_vqgan.py                              # the demo flowers, or edit DATASET_PATH below
    python training_vqgan.py --dataset-path /my/images
    torchrun --nproc_per_node 4 training_vqgan.py ...     # 4 GPUs
"""
import argparse
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from demo_flowers import resolve_dataset
from discriminator import Discriminator, hinge_d_loss
from runtime import (HelpFormatter, NonFiniteGuard, ResumableSampler, StopSignal, all_ranks_agree, autocast,
                     check_same_config, cleanup_distributed, fused_adam, keeps_signal_handlers, make_scaler, no_sync,
                     resolve_precision, reuse_freed_memory, setup_distributed)
from utils import (CheckpointError, DataError, ImageFolder, MetricsLog, build_loader, check_writable, find_images,
                   load_checkpoint, save_checkpoint, save_image_grid, save_loss_plot,
                   seed_everything)
from vqgan import VQGAN, VQGANConfig

# ---- the one line to edit: your folder of images (sub-folders are searched too) ----
DATASET_PATH = "data/flowers"  # the default writes a small demo set of drawn flowers here on first use

BASE_LEARNING_RATE = 4.5e-6  # taming-transformers: lr = 4.5e-6 x global batch size


# ---- helpers ----

def config_from_args(args):
    """The VQGAN config from the flags: every config field has the flag of the same name."""
    return VQGANConfig(**{f.name: getattr(args, f.name) for f in fields(VQGANConfig) if hasattr(args, f.name)})


def check_args(args):
    """Reject impossible flag values up front, naming the flag."""
    for flag in ("image_size", "batch_size", "epochs", "ch", "num_res_blocks", "latent_dim", "num_codebook_vectors",
                 "z_channels", "grad_accum", "save_every", "sample_every", "restart_every", "max_nonfinite_steps"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.codebook_dim < 0:
        raise ValueError(f"--codebook-dim must be 0 (use --latent-dim) or positive, got {args.codebook_dim}.")
    if args.learning_rate is not None and not args.learning_rate > 0:  # also refuses nan
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}.")
    if any(m <= 0 for m in args.ch_mult):
        raise ValueError(f"--ch-mult values must be positive, got {args.ch_mult}.")
    f = 2 ** (len(args.ch_mult) - 1)
    if args.image_size % f:
        raise ValueError(f"--image-size {args.image_size} must divide by the downsampling factor {f} "
                         f"(2 ** (len(--ch-mult) - 1)).")
    resolutions = {args.image_size // 2 ** i for i in range(len(args.ch_mult))}
    missing = sorted(set(args.attn_resolutions) - resolutions)
    if missing:
        raise ValueError(f"--attn-resolutions {missing} never occur; the feature maps are {sorted(resolutions)} wide.")
    if any(args.ch * m % 32 for m in args.ch_mult):
        raise ValueError("--ch times every --ch-mult value must divide by 32 (GroupNorm uses 32 groups).")
    if args.z_channels % 32:
        raise ValueError("--z-channels must divide by 32 (GroupNorm uses 32 groups).")


def recompute_default(flag, device):
    """--recompute when given, else on where memory is scarce and time plentiful (the CPU), off on GPUs."""
    return device.type == "cpu" if flag is None else flag


def reconstruction_losses(x, x_rec, lpips, args):
    """L1 (and LPIPS) between the input and the reconstruction: taming's `nll_loss`."""
    rec_loss = args.rec_loss_factor * (x - x_rec).abs().mean()
    if lpips is None:
        return rec_loss, torch.zeros((), device=x.device)
    p_loss = lpips(x, x_rec).mean()
    return rec_loss + args.perceptual_loss_factor * p_loss, p_loss


# ---- one training step ----

def train_step(x, vqgan, model, disc, disc_ddp, lpips, scalers, step, args, precision):
    """Generator update then discriminator update; one decoder/VGG backward and one reconstruction per step.

    The losses are taken w.r.t. a detached copy `rec` of the reconstruction. Their gradients w.r.t. `rec` give both
    the adaptive weight (through the decoder's last conv, in closed form) and the one backward through the VQGAN.
    The discriminator then learns from `rec` detached, so its loss never reaches the generator's parameters.
    """
    scaler_vq, scaler_disc = scalers
    device = x.device
    disc_factor = args.disc_factor if step >= args.disc_start else 0.0  # taming's adopt_weight
    with autocast(precision, device):
        x_rec, features, _, q_loss = model(x, return_features=True)
    rec = x_rec.detach().float().requires_grad_(True)
    # fp16's loss scale keeps the gradients w.r.t. rec from underflowing; a tensor, as reading it would wait for the GPU
    scale = scaler_vq.scale(torch.ones((), device=device)) if scaler_vq.is_enabled() else 1.0

    with autocast(precision, device):
        nll, p_loss = reconstruction_losses(x, rec, lpips, args)
    grad_rec = torch.autograd.grad(nll * scale, rec)[0] / scale
    g_loss, lam = torch.zeros((), device=device), torch.zeros((), device=device)
    if disc_factor > 0:
        with autocast(precision, device):
            g_loss = -disc(rec).mean()  # the plain module: only d g_loss / d rec is wanted here
        grad_g = torch.autograd.grad(g_loss * scale, rec)[0] / scale
        nll_last, g_last = vqgan.last_layer_grad(features, grad_rec), vqgan.last_layer_grad(features, grad_g)
        lam = vqgan.adaptive_weight(nll_last, g_last, args.disc_weight)
        if scaler_vq.is_enabled():
            # fp16: at too high a scale a backward overflows and lam is NaN or huge. No divergence: the scaler finds
            # the non-finite gradients, skips the step and lowers its scale; lam 0 keeps the logged loss finite.
            lam = lam.masked_fill(~(torch.isfinite(nll_last).all() & torch.isfinite(g_last).all()), 0.0)
        grad_rec = grad_rec + lam * disc_factor * grad_g
    # d/dx_rec of this surrogate is grad_rec, so one backward gives the gradient of
    # nll + lam * disc_factor * g_loss + q_loss for every VQGAN parameter.
    surrogate = (x_rec.float() * grad_rec).sum() + q_loss
    scaler_vq.scale(surrogate / args.grad_accum).backward()

    d_loss = torch.zeros((), device=device)
    if disc_factor > 0:
        with autocast(precision, device):
            logits_real, logits_fake = disc_ddp(x), disc_ddp(rec.detach())
            d_loss = disc_factor * hinge_d_loss(logits_real.float(), logits_fake.float())
        scaler_disc.scale(d_loss / args.grad_accum).backward()

    l1 = (x - x_rec.detach()).abs().mean()
    total = nll.detach() + lam * disc_factor * g_loss.detach() + q_loss.detach()
    return dict(loss=total, l1=l1, lpips=p_loss.detach(), q_loss=q_loss.detach(), g_loss=g_loss.detach(),
                lam=lam, d_loss=d_loss.detach())


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


# ---- main ----

@keeps_signal_handlers
def main(args):
    check_args(args)
    d = setup_distributed(args.device)
    device = d.device
    reuse_freed_memory(device)
    precision = resolve_precision(args.precision, device)
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "checkpoints" / "vqgan_last.pt"
    if d.is_main:
        check_writable(out_dir)
    paths = resolve_dataset(args.dataset_path, DATASET_PATH) if d.is_main else None
    if d.enabled:  # rank 0 may have just written the demo set
        torch.distributed.barrier()
        paths = find_images(args.dataset_path) if paths is None else paths
    seed_everything(args.seed + d.rank)  # different noise per rank, same model init after DDP's broadcast

    config = config_from_args(args)
    vqgan = VQGAN(config).to(device).set_recompute(recompute_default(args.recompute, device))
    disc = Discriminator().to(device)
    lpips = None
    if args.perceptual_loss_factor > 0:  # with factor 0 VGG is never built (no weights needed)
        from lpips import LPIPS
        lpips = LPIPS().to(device, memory_format=torch.channels_last)
    # channels_last: faster convolutions with cuDNN and with oneDNN on the CPU (about 12% of a CPU step)
    vqgan, disc = vqgan.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)

    global_batch = args.batch_size * d.world_size * args.grad_accum
    lr = args.learning_rate if args.learning_rate is not None else BASE_LEARNING_RATE * global_batch
    opt_vq, opt_disc = build_optimizers(vqgan, disc, lr, args)
    scalers = (make_scaler(precision, device), make_scaler(precision, device))

    step, epoch, start_batch = 0, 0, 0
    if args.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, trust=args.trust_checkpoint)
        check_same_config(ckpt["config"], asdict(config), ckpt_path)
        vqgan.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["discriminator"])
        opt_vq.load_state_dict(ckpt["opt_vq"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        for group in opt_vq.param_groups + opt_disc.param_groups:  # the flags' learning rate, not the saved one
            group["lr"] = lr
        for scaler, key in zip(scalers, ("scaler_vq", "scaler_disc")):
            if ckpt.get(key):
                scaler.load_state_dict(ckpt[key])
        step, epoch, start_batch = ckpt["step"], ckpt["epoch"], ckpt.get("batch_in_epoch", 0)
        if d.is_main:
            print(f"Resumed from {ckpt_path} at step {step}.")
    elif args.resume and d.is_main:
        print(f"No checkpoint at {ckpt_path} yet: starting from scratch.")

    model, disc_ddp = vqgan, disc
    if d.enabled:
        ids = [d.local_rank] if device.type == "cuda" else None
        model, disc_ddp = DDP(model, device_ids=ids), DDP(disc_ddp, device_ids=ids)
    if args.compile:  # around DDP, so that the compiler splits the graph at DDP's buckets and overlaps all-reduces
        model, disc_ddp = torch.compile(model), torch.compile(disc_ddp)

    dataset = ImageFolder(args.dataset_path, args.image_size, train=True, paths=paths)
    sampler = ResumableSampler(len(dataset), args.batch_size, shuffle=True, seed=args.seed,
                               rank=d.rank, world_size=d.world_size)
    loader = build_loader(dataset, args.batch_size, train=True, num_workers=args.num_workers, sampler=sampler)
    batches_per_epoch = len(dataset) // d.world_size // args.batch_size
    if batches_per_epoch < args.grad_accum:
        raise DataError(f"{len(dataset)} images make fewer than one step of --batch-size {args.batch_size} "
                        f"x --grad-accum {args.grad_accum} per process; add images or lower the batch size.")
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * (batches_per_epoch // args.grad_accum)

    log = MetricsLog(out_dir / "results" / "vqgan_metrics.jsonl", resume=step > 0) if d.is_main else None
    if log is not None:
        log.truncate_after(step)
    stop = StopSignal()
    guard = NonFiniteGuard(args.max_nonfinite_steps, ckpt_path)
    skipped_files, micro = 0, 0
    fixed_batch = None

    def save(reason=""):
        if not d.is_main:
            return
        usage, perplexity = vqgan.quantize.usage()
        save_checkpoint(dict(model=vqgan.state_dict(), discriminator=disc.state_dict(),
                             opt_vq=opt_vq.state_dict(), opt_disc=opt_disc.state_dict(),
                             scaler_vq=scalers[0].state_dict(), scaler_disc=scalers[1].state_dict(),
                             step=step, epoch=epoch, batch_in_epoch=start_batch, config=asdict(config),
                             codebook_usage=usage, codebook_perplexity=perplexity, args=vars(args)), ckpt_path)
        if reason:
            tqdm.write(f"Saved {ckpt_path} at step {step} ({reason}).")

    bar = tqdm(total=max_steps, initial=step, desc="stage 1", disable=not d.is_main, dynamic_ncols=True)
    vqgan.train()
    disc.train()
    while step < max_steps:
        sampler.set_epoch(epoch, start_batch)
        step_at_epoch_start, whole_epoch = step, start_batch == 0
        skipped_in_epoch = 0  # every pass meets the same unreadable files: report one pass's count, not their sum
        for batch in loader:
            start_batch += 1
            skipped_in_epoch += args.batch_size if batch is None else batch["skipped"]  # drop_last: full batches
            skipped_files = max(skipped_files, skipped_in_epoch)
            if batch is None:  # every file of this batch was unreadable (each one was named in a warning)
                continue
            x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if fixed_batch is None:
                fixed_batch = x[:8]
            micro += 1
            sync = micro % args.grad_accum == 0
            with no_sync(model, sync), no_sync(disc_ddp, sync):  # all-reduce gradients only on the last micro-step
                metrics = train_step(x, vqgan, model, disc, disc_ddp, lpips, scalers, step, args, precision)
            if not sync:
                continue
            if d.is_main:  # for the bar and the log: computed on the device, read in the same sync
                metrics["usage"], metrics["perplexity"] = vqgan.quantize.usage(as_tensors=True)
            values = dict(zip(metrics, torch.stack([v.float() for v in metrics.values()]).tolist()))  # one sync
            if guard.skip(values["loss"], step, d):  # keep the last good weights
                opt_vq.zero_grad(set_to_none=True)
                opt_disc.zero_grad(set_to_none=True)
                continue
            optimizer_step(opt_vq, scalers[0])
            if step >= args.disc_start:
                optimizer_step(opt_disc, scalers[1])
            else:
                opt_disc.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if d.is_main:
                log.log(step, **values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", l1=f"{values['l1']:.3f}",
                                d=f"{values['d_loss']:.3f}", usage=f"{values['usage']:.2f}")
                if step % args.sample_every == 0 or step == max_steps:
                    with torch.no_grad():
                        vqgan.eval()
                        recs = vqgan(fixed_batch)[0]
                        vqgan.train()
                    save_image_grid(torch.cat([fixed_batch, recs]).float(),
                                    out_dir / "results" / f"reconstructions_{step:07d}.png", nrow=len(fixed_batch))
                    save_loss_plot(log.history, out_dir / "results" / "vqgan_losses.png", title="stage 1")
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
    if d.is_main:
        save_loss_plot(log.history, out_dir / "results" / "vqgan_losses.png", title="stage 1")
        if skipped_files:
            print(f"Skipped {skipped_files} unreadable image file(s) during training (named in the warnings above).")
    cleanup_distributed()
    return ckpt_path


# ---- command line ----

def build_parser():
    p = argparse.ArgumentParser(description="Stage 1 of VQGAN: train the VQ autoencoder.",
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--dataset-path", default=DATASET_PATH, help="folder of images, searched recursively")
    a("--image-size", type=int, default=256, help="training crop size (sides must divide by 2^(len(ch-mult)-1))")
    a("--batch-size", type=int, default=6, help="images per process per micro-step")
    a("--epochs", type=int, default=100, help="passes over the data set (unless --max-steps is given)")
    a("--max-steps", type=int, default=None,
      help="stop after this many optimizer steps, counted across resumes (overrides --epochs)")
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
      help="vq: the paper's; ema: codes as moving averages; fsq: finite scalar; lfq: lookup-free (README)")
    a("--rotation-trick", action="store_true", help="vq/ema: gradients through the rotation onto the code")
    a("--kmeans-init", action="store_true", help="vq/ema: codes from k-means of the first batch's encoder outputs")
    a("--ema-decay", type=float, default=0.99, help="ema: decay of the codes' moving averages")
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
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--compile", action="store_true", help="wrap the models in torch.compile")
    a("--recompute", action=argparse.BooleanOptionalAction, default=None,
      help="recompute GroupNorm + swish in the backward instead of keeping them: a third less activation memory "
           "for ~5%% more time; default: on the CPU, off on CUDA")
    a("--device", default=None, help="cuda, cuda:1, cpu ... (default: CUDA when available)")
    a("--out-dir", default=".", help="where results/ and checkpoints/ go")
    a("--resume", action="store_true", help="continue from <out-dir>/checkpoints/vqgan_last.pt")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    a("--seed", type=int, default=0, help="random seed (offset by rank)")
    a("--num-workers", type=int, default=4, help="data-loading worker processes per GPU")
    a("--save-every", type=int, default=1000, help="steps between checkpoints")
    a("--sample-every", type=int, default=500, help="steps between reconstruction grids")
    a("--max-nonfinite-steps", type=int, default=20, help="stop after this many non-finite losses in a row")
    return p


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (DataError, CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
