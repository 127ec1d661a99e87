"""Mixed precision: what must stay in fp32 stays there under autocast (the codebook's distances, the LPIPS
normalisation, lambda), and fp16's gradient scaling gives back the fp32 gradients.

fp16 is a CUDA option in the scripts; torch's CPU autocast and GradScaler do the same arithmetic, so these run here.
"""
import pytest
import torch

import training_run
import training_vqgan
from checkpoint import load_checkpoint
from codebook import Codebook
from demo_flowers import make_demo_flowers
from discriminator import Discriminator, DiscriminatorConfig
from helpers import TINY, TINY_FLAGS
from loss import LossConfig, Stage1, stage1_optimizers, train_step
from lpips import LPIPS
from runtime import optimizer_step
from vqgan import VQGAN, VQGANConfig


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_codebook_distances_ignore_autocast(dtype):
    torch.manual_seed(0)
    codebook = Codebook(num_codebook_vectors=1024, latent_dim=64).eval()
    z = torch.randn(16, 64, 8, 8)  # 1024 vectors; distances in bf16 would pick another code for ~1.5% of them
    _, indices, loss = codebook(z)
    with torch.autocast("cpu", dtype=dtype):
        _, indices_autocast, loss_autocast = codebook(z)
    assert torch.equal(indices_autocast, indices)
    assert loss_autocast.dtype == torch.float32 and loss_autocast == loss


def test_lpips_normalisation_survives_fp16():
    torch.manual_seed(0)
    lpips = LPIPS(vgg_weights=None)
    first = next(m for m in lpips.slices.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():  # features as large as a trained VGG's: their squares summed over channels pass 65504
        first.weight *= 100
        first.bias *= 100
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = lpips(x, y)
        with torch.autocast("cpu", dtype=torch.float16):
            distance = lpips(x, y)
    assert distance.dtype == torch.float32
    torch.testing.assert_close(distance, expected, rtol=1e-2, atol=0)


def tiny_models():
    torch.manual_seed(0)
    vqgan, disc = VQGAN(VQGANConfig(**TINY)), Discriminator(DiscriminatorConfig(ndf=16, n_layers=2))
    args = LossConfig(rec_loss_factor=1.0, perceptual_loss_factor=1.0, disc_factor=1.0, disc_weight=0.8, disc_start=0)
    return vqgan, disc, LPIPS(vgg_weights=None), torch.rand(4, 3, 32, 32) * 2 - 1, args


def step_gradients(vqgan, disc, lpips, x, args, precision, scalers):
    """train_step from the models' current weights: its metrics and both models' gradients, unscaled."""
    vqgan.zero_grad(), disc.zero_grad()
    metrics = train_step(Stage1(vqgan, disc, lpips, args, precision, scalers), x, step=0)
    grads = [{n: p.grad / scaler.get_scale() if scaler.is_enabled() else p.grad.clone()
              for n, p in model.named_parameters()} for model, scaler in ((vqgan, scalers[0]), (disc, scalers[1]))]
    return metrics, grads


def scalers(enabled, init_scale=2.0 ** 16):
    return tuple(torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=enabled) for _ in range(2))


def test_loss_scaling_is_undone_exactly():
    """fp32 arithmetic with both scalers on: lambda's gradients and the backward are scaled by 2^16, then unscaled."""
    vqgan, disc, lpips, x, args = tiny_models()
    plain, plain_grads = step_gradients(vqgan, disc, lpips, x, args, "fp32", scalers(False))
    scaled, scaled_grads = step_gradients(vqgan, disc, lpips, x, args, "fp32", scalers(True))
    assert plain["lam"] > 0
    torch.testing.assert_close(scaled["lam"], plain["lam"], rtol=1e-6, atol=0)
    for expected, got in zip(plain_grads, scaled_grads):
        for n in expected:  # a power of two scales and unscales without rounding
            torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-12, msg=n)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_step_keeps_lambda_in_fp32(precision):
    vqgan, disc, lpips, x, args = tiny_models()
    x = x[:2]  # fp16 convolutions are slow on the CPU
    plain, _ = step_gradients(vqgan, disc, lpips, x, args, "fp32", scalers(False))
    # 2^8: a scale at which nothing overflows here (the next test starts at 2^16)
    metrics, grads = step_gradients(vqgan, disc, lpips, x, args, precision, scalers(precision == "fp16", 2.0 ** 8))
    assert metrics["lam"].dtype == torch.float32
    torch.testing.assert_close(metrics["lam"], plain["lam"], rtol=0.05, atol=0)  # measured: 2.1% fp16, 1.5% bf16
    for model_grads in grads:
        for n, g in model_grads.items():
            assert g.dtype == torch.float32 and torch.isfinite(g).all(), n


def test_fp16_overflow_lowers_the_scale_instead_of_counting_as_divergence():
    """At torch's initial scale of 2^16 the discriminator's fp16 backward overflows. The step must report a finite
    loss (the guard would count a NaN as divergence and never let the scaler adapt), be skipped by the scaler,
    and the scale must come down until steps go through."""
    vqgan, disc, _, x, args = tiny_models()
    x = x[:1]  # one image overflows as well, in a third of the time
    lpips, args.perceptual_loss_factor = None, 0.0  # the overflow is the discriminator's; VGG in fp16 is slow here
    opts = stage1_optimizers(vqgan, disc, 1e-4)
    scaler_vq, scaler_disc = scalers(True)
    updated = []
    while not any(updated) and len(updated) < 8:
        before = vqgan.decoder.conv_out.weight.detach().clone()
        metrics = train_step(Stage1(vqgan, disc, lpips, args, "fp16", (scaler_vq, scaler_disc)), x, step=0)
        assert all(torch.isfinite(v) for v in metrics.values()), metrics
        optimizer_step(opts[0], scaler_vq)
        optimizer_step(opts[1], scaler_disc)
        updated.append(not torch.equal(vqgan.decoder.conv_out.weight, before))
    assert updated[0] is False  # overflowed at 2^16: skipped
    assert updated[-1] is True and scaler_vq.get_scale() == 2.0 ** (17 - len(updated))  # halved at each skip


def test_fp16_with_the_gan_off_never_steps_the_discriminator(tmp_path, monkeypatch):
    """--precision fp16 --disc-factor 0: the discriminator never gets a loss, so its scaler never scaled one, and
    stepping through it would fail ("Attempted step but _scale is None"). CPU autocast and GradScaler("cpu") run the
    same code as CUDA's; only the scripts' CPU refusal of fp16 is lifted here."""
    monkeypatch.setattr(training_run, "resolve_precision", lambda name, device: name)
    data = make_demo_flowers(tmp_path / "flowers", num_images=4, size=32)
    out = tmp_path / "run"
    training_vqgan.main(training_vqgan.build_parser().parse_args(
        TINY_FLAGS + ["--dataset-path", str(data), "--out-dir", str(out), "--precision", "fp16", "--disc-factor", "0",
                      "--disc-start", "0", "--max-steps", "1", "--batch-size", "2"]))
    ckpt = load_checkpoint(out / "checkpoints" / "vqgan_last.pt")
    assert ckpt["step"] == 1 and ckpt["opt_disc"]["state"] == {}  # never stepped
    assert ckpt["scaler_vq"]["scale"] > 0 and ckpt["opt_vq"]["state"]  # the VQGAN did train, through its scaler
