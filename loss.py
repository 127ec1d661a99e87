"""The stage-1 loss (taming-transformers' VQLPIPSWithDiscriminator) and the training step that minimises it.

The loss, written plainly (tests/test_training_vqgan.py computes exactly this with autograd and compares):

    nll    = rec_loss_factor * |x - x_rec|_1 + perceptual_loss_factor * LPIPS(x, x_rec)
    g_loss = -mean D(x_rec)
    lam    = disc_weight * ||d nll / d w|| / (||d g_loss / d w|| + 1e-4)     w: the decoder's last conv (Eq. 7)
    L_gen  = nll + disc_factor * lam * g_loss + q_loss                       q_loss: the quantizer's own loss
    L_disc = disc_factor * hinge(D(x), D(sg[x_rec]))

disc_factor is 0 before --disc-start (taming's adopt_weight). Label maps (--image-kind segmentation: one-hot in,
per-label logits out) follow taming's VQSegmentationModel with BCELossWithQuant: no LPIPS, no GAN, and

    nll    = rec_loss_factor * mean BCE-with-logits(x_rec, x)                over every label, pixel and image
    L_gen  = nll + q_loss                                                    (taming's codebook_weight is 1.0)

Where a new loss goes:
- a loss on the reconstruction: add it to `reconstruction_losses` (it then also enters lam's numerator, as
  taming's nll does);
- a loss on the latents or the codes: add it where `aux` is formed in `train_step`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError
from runtime import autocast, fused_adam, make_scaler

ADAM_BETAS = (0.5, 0.9)  # taming's betas of both optimizers


@dataclass
class LossConfig:
    """Weights of the stage-1 loss terms and the step at which the GAN starts (the paper's defaults)."""
    rec_loss_factor: float = 1.0
    perceptual_loss_factor: Optional[float] = None  # None: 1.0 for rgb, 0 for gray and segmentation
    disc_start: int = 10000
    disc_factor: Optional[float] = None  # None: 1.0, and 0 for segmentation
    disc_weight: float = 0.8
    image_kind: str = "rgb"  # segmentation: binary cross-entropy with logits instead of L1

    def __post_init__(self):
        """Defaults by image kind: LPIPS judges RGB images; label maps train without a GAN (taming's
        VQSegmentationModel). A value given against them is refused."""
        if self.perceptual_loss_factor is None:
            self.perceptual_loss_factor = 1.0 if self.image_kind == "rgb" else 0.0
        if self.disc_factor is None:
            self.disc_factor = 0.0 if self.image_kind == "segmentation" else 1.0
        if self.image_kind != "rgb" and self.perceptual_loss_factor > 0:
            raise ConfigError("perceptual_loss_factor", f"must be 0 for `image_kind` {self.image_kind}: LPIPS's VGG "
                                                        f"judges RGB images.")
        if self.image_kind == "segmentation" and self.disc_factor > 0:
            raise ConfigError("disc_factor", "must be 0 for `image_kind` segmentation, which trains without a GAN, as "
                                             "taming's VQSegmentationModel does (leave it out or pass 0).")

    def gan_active(self, step):
        """taming's adopt_weight: the GAN terms (and the discriminator's updates) from --disc-start on."""
        return self.disc_factor > 0 and step >= self.disc_start


def stage1_optimizers(vqgan, disc, lr, betas=ADAM_BETAS):
    """taming's two Adams: one for the encoder, codebook and decoder, one for the discriminator."""
    fused = fused_adam(next(vqgan.parameters()).device)
    return (torch.optim.Adam(vqgan.parameters(), lr=lr, betas=betas, fused=fused),
            torch.optim.Adam(disc.parameters(), lr=lr, betas=betas, fused=fused))


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_grad, g_grad, disc_weight=0.8):
    """lambda = ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4], detached, times disc_weight (Eq. 7)."""
    lam = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return torch.clamp(lam, 0.0, 1e4).detach() * disc_weight


def reconstruction_losses(x, x_rec, lpips, config: LossConfig):
    """nll: L1 (and LPIPS) between the input and the reconstruction, taming's `nll_loss`, or for label maps the
    binary cross-entropy of the logits x_rec against the one-hot x (BCELossWithQuant's); and the LPIPS term."""
    if config.image_kind == "segmentation":
        rec_loss = config.rec_loss_factor * F.binary_cross_entropy_with_logits(x_rec.float(), x.float())
    else:
        rec_loss = config.rec_loss_factor * (x - x_rec).abs().mean()
    if lpips is None:
        return rec_loss, torch.zeros((), device=x.device)
    p_loss = lpips(x, x_rec).mean()
    return rec_loss + config.perceptual_loss_factor * p_loss, p_loss


@dataclass
class Stage1:
    """What a stage-1 step runs: the plain VQGAN and discriminator (lam is read off them, and they are what a
    checkpoint saves), LPIPS (None: no perceptual loss), the loss config, precision, fp16's two scalers (default: new
    ones) and the wrappers that run forward and backward (DDP and/or torch.compile; default: the plain modules)."""
    vqgan: nn.Module
    disc: nn.Module
    lpips: Optional[nn.Module]
    config: LossConfig
    precision: str = "fp32"
    scalers: tuple = ()
    vqgan_wrapped: Optional[nn.Module] = None
    disc_wrapped: Optional[nn.Module] = None

    def __post_init__(self):
        device = next(self.vqgan.parameters()).device
        self.scalers = self.scalers or (make_scaler(self.precision, device), make_scaler(self.precision, device))
        # `is None`, not `or`: a torch.compile'd module raises on the len() that truth testing tries first
        self.vqgan_wrapped = self.vqgan if self.vqgan_wrapped is None else self.vqgan_wrapped
        self.disc_wrapped = self.disc if self.disc_wrapped is None else self.disc_wrapped


def train_step(stage1: Stage1, x, step, grad_accum=1):
    """The gradients of L_gen for the VQGAN and of L_disc for the discriminator, with one reconstruction and one
    decoder/VGG backward (taming needs three of each).

    How: the losses are taken w.r.t. a detached copy `rec` of the reconstruction. Their gradients w.r.t. `rec`
    give lam in closed form (through the decoder's last conv: VQGAN.last_layer_grad) and, as `grad_rec`, the
    one backward through the VQGAN: d/dx_rec of the surrogate sum(x_rec * grad_rec) is grad_rec. The
    discriminator learns from `rec` detached, so its loss never reaches the generator.
    """
    scaler_vq, scaler_disc = stage1.scalers
    device, cfg = x.device, stage1.config
    gan = cfg.gan_active(step)
    with autocast(stage1.precision, device):
        x_rec, features, _, q_loss = stage1.vqgan_wrapped(x, return_features=True)
    aux = q_loss  # the latents' losses: add a new one here
    rec = x_rec.detach().float().requires_grad_(True)
    # fp16's loss scale keeps the gradients w.r.t. rec from underflowing; a tensor, as reading it would wait for the GPU
    scale = scaler_vq.scale(torch.ones((), device=device)) if scaler_vq.is_enabled() else 1.0

    with autocast(stage1.precision, device):
        nll, p_loss = reconstruction_losses(x, rec, stage1.lpips, cfg)
    grad_rec = torch.autograd.grad(nll * scale, rec)[0] / scale
    g_loss, lam = torch.zeros((), device=device), torch.zeros((), device=device)
    if gan:
        with autocast(stage1.precision, device):
            g_loss = -stage1.disc(rec).mean()  # the plain module: only d g_loss / d rec is wanted here
        grad_g = torch.autograd.grad(g_loss * scale, rec)[0] / scale
        nll_last = stage1.vqgan.last_layer_grad(features, grad_rec)
        g_last = stage1.vqgan.last_layer_grad(features, grad_g)
        lam = adaptive_weight(nll_last, g_last, cfg.disc_weight)
        if scaler_vq.is_enabled():
            # fp16: at too high a scale a backward overflows and lam is NaN or huge. No divergence: the scaler finds
            # the non-finite gradients, skips the step and lowers its scale; lam 0 keeps the logged loss finite.
            lam = lam.masked_fill(~(torch.isfinite(nll_last).all() & torch.isfinite(g_last).all()), 0.0)
        grad_rec = grad_rec + lam * cfg.disc_factor * grad_g
    surrogate = (x_rec.float() * grad_rec).sum() + aux  # one backward: the gradient of L_gen for every parameter
    scaler_vq.scale(surrogate / grad_accum).backward()

    d_loss = torch.zeros((), device=device)
    if gan:
        with autocast(stage1.precision, device):
            logits_real, logits_fake = stage1.disc_wrapped(x), stage1.disc_wrapped(rec.detach())
            d_loss = cfg.disc_factor * hinge_d_loss(logits_real.float(), logits_fake.float())
        scaler_disc.scale(d_loss / grad_accum).backward()

    if cfg.image_kind == "segmentation":  # the unweighted reconstruction term, as logged by taming
        rec_metric = dict(bce=F.binary_cross_entropy_with_logits(x_rec.detach().float(), x.float()))
    else:
        rec_metric = dict(l1=(x - x_rec.detach()).abs().mean())
    total = nll.detach() + lam * cfg.disc_factor * g_loss.detach() + aux.detach()
    return dict(loss=total, **rec_metric, lpips=p_loss.detach(), q_loss=q_loss.detach(), g_loss=g_loss.detach(),
                lam=lam, d_loss=d_loss.detach())
