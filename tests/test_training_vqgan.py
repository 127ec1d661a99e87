"""The stage-1 training step and script: same gradients as the plain formulation, isolation of the GAN step, resume."""
import functools
import json
import re
import signal

import pytest
import torch

import demo_flowers
import training_vqgan
from checkpoint import CheckpointError, load_checkpoint
from data import DataError, ImageFolder, find_images
from demo_flowers import make_demo_flowers
from discriminator import Discriminator, DiscriminatorConfig
from helpers import TINY, TINY_FLAGS, script_error
from loss import LossConfig, Stage1, hinge_d_loss, train_step
from lpips import LPIPS
from runtime import make_scaler, on_cpu_default
from vqgan import VQGAN, VQGANConfig


def plain_step_gradients(x, vqgan, disc, lpips, args):
    """taming's formulation, written out: lambda from autograd at the last layer, one loss, one backward each."""
    def nll_and_g():
        x_rec, _, q_loss = vqgan(x)
        nll = args.rec_loss_factor * (x - x_rec).abs().mean() + args.perceptual_loss_factor * lpips(x, x_rec).mean()
        return x_rec, nll, -disc(x_rec).mean(), q_loss

    last = vqgan.decoder.conv_out.weight
    nll_grad = torch.autograd.grad(nll_and_g()[1], last)[0]  # separate forwards instead of retain_graph
    g_grad = torch.autograd.grad(nll_and_g()[2], last)[0]
    lam = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach() * args.disc_weight
    x_rec, nll, g_loss, q_loss = nll_and_g()
    (nll + lam * args.disc_factor * g_loss + q_loss).backward()
    gen_grads = {n: p.grad.clone() for n, p in vqgan.named_parameters()}
    disc.zero_grad()
    d_loss = args.disc_factor * hinge_d_loss(disc(x), disc(x_rec.detach()))
    d_loss.backward()
    assert all(p.grad is not None for p in vqgan.parameters())  # unchanged by the discriminator's backward...
    assert all(torch.equal(p.grad, gen_grads[n]) for n, p in vqgan.named_parameters())  # ...bit for bit
    return gen_grads, {n: p.grad.clone() for n, p in disc.named_parameters()}, lam


def test_train_step_equals_the_plain_formulation():
    """One VGG backward and one reconstruction per step give taming's gradients for both networks."""
    torch.manual_seed(0)
    vqgan, disc = VQGAN(VQGANConfig(**TINY)), Discriminator(DiscriminatorConfig(ndf=16, n_layers=2))
    lpips = LPIPS(vgg_weights=None)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    args = LossConfig(rec_loss_factor=1.0, perceptual_loss_factor=1.0, disc_factor=1.0, disc_weight=0.8, disc_start=0)
    state_v, state_d = vqgan.state_dict(), disc.state_dict()
    gen_expected, disc_expected, lam_expected = plain_step_gradients(x, vqgan, disc, lpips, args)

    vqgan.load_state_dict(state_v), disc.load_state_dict(state_d)  # BatchNorm statistics as they were
    vqgan.zero_grad(), disc.zero_grad()
    scalers = (make_scaler("fp32", x.device), make_scaler("fp32", x.device))
    metrics = train_step(Stage1(vqgan, disc, lpips, args, "fp32", scalers), x, step=0)
    torch.testing.assert_close(metrics["lam"], lam_expected, rtol=1e-4, atol=1e-6)
    for n, p in vqgan.named_parameters():
        torch.testing.assert_close(p.grad, gen_expected[n], rtol=1e-4, atol=1e-5, msg=n)
    for n, p in disc.named_parameters():
        torch.testing.assert_close(p.grad, disc_expected[n], rtol=1e-4, atol=1e-5, msg=n)


def test_before_disc_start_there_is_no_gan_loss():
    torch.manual_seed(0)
    vqgan, disc = VQGAN(VQGANConfig(**TINY)), Discriminator(DiscriminatorConfig(ndf=16, n_layers=2))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    args = LossConfig(rec_loss_factor=1.0, perceptual_loss_factor=0.0, disc_factor=1.0, disc_weight=0.8, disc_start=100)
    scalers = (make_scaler("fp32", x.device), make_scaler("fp32", x.device))
    metrics = train_step(Stage1(vqgan, disc, None, args, "fp32", scalers), x, step=99)
    assert metrics["d_loss"] == 0 and metrics["lam"] == 0
    assert all(p.grad is None for p in disc.parameters())
    x_rec, _, q_loss = vqgan(x)
    expected = torch.autograd.grad((x - x_rec).abs().mean() + q_loss, vqgan.decoder.conv_out.weight)[0]
    torch.testing.assert_close(vqgan.decoder.conv_out.weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_end_to_end_run_then_resume(tmp_path):
    data = make_demo_flowers(tmp_path / "flowers", num_images=12, size=40)
    out = tmp_path / "run"
    flags = TINY_FLAGS + ["--dataset-path", str(data), "--out-dir", str(out), "--disc-start", "3",
                          "--save-every", "4", "--sample-every", "3"]
    parser = training_vqgan.build_parser()
    handler = signal.getsignal(signal.SIGINT)
    training_vqgan.main(parser.parse_args(flags + ["--max-steps", "5"]))
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C interrupts the caller again
    ckpt = load_checkpoint(out / "checkpoints" / "vqgan_last.pt")
    assert ckpt["step"] == 5 and set(ckpt) >= {"model", "discriminator", "opt_vq", "opt_disc", "step", "epoch",
                                                "config"}
    assert (out / "results" / "reconstructions_0000003.png").exists()
    assert (out / "results" / "vqgan_losses.png").exists()
    adam_steps = ckpt["opt_vq"]["state"][0]["step"]

    model = VQGAN.from_checkpoint(out / "checkpoints" / "vqgan_last.pt")
    assert model.config.latent_dim == 16 and not model.training

    training_vqgan.main(parser.parse_args(flags + ["--max-steps", "8", "--resume"]))
    ckpt = load_checkpoint(out / "checkpoints" / "vqgan_last.pt")
    assert ckpt["step"] == 8
    assert ckpt["opt_vq"]["state"][0]["step"] == adam_steps + 3  # the optimizer state went on, not restarted
    steps = [json.loads(line)["step"] for line in open(out / "results" / "vqgan_metrics.jsonl")]
    assert steps == list(range(1, 9))
    assert ckpt["opt_disc"]["state"][0]["step"] == 8 - 3  # the discriminator steps from --disc-start on

    with pytest.raises(CheckpointError, match="latent_dim"):
        training_vqgan.main(parser.parse_args([f if f != "16" else "8" for f in flags] + ["--max-steps", "9",
                                                                                          "--resume"]))


@pytest.mark.parametrize("flag, value, message", [
    ("--image-size", "30", "--image-size 30 must divide by the downsampling factor 4"),
    ("--attn-resolutions", "5", "--attn-resolutions \\[5\\] never occur"),
    ("--batch-size", "0", "--batch-size must be positive"),
    ("--image-size", "16", "--image-size 16 is too small for the PatchGAN discriminator"),
])
def test_impossible_flags_are_rejected(tmp_path, capsys, flag, value, message):
    flags = TINY_FLAGS + ["--dataset-path", str(tmp_path), "--out-dir", str(tmp_path)]
    i = flags.index(flag) if flag in flags else None
    if i is None:
        flags += [flag, value]
    else:
        flags[i + 1] = value
    assert re.search(message, script_error(training_vqgan, flags, capsys))


def test_the_default_data_path_gets_the_demo_set_in_the_script_not_in_a_loader(tmp_path, monkeypatch, capsys):
    """A new user's `python training_vqgan.py`: the demo flowers are drawn at data/flowers, saying so, once; loading
    a folder never writes one."""
    monkeypatch.chdir(tmp_path)
    small = functools.partial(make_demo_flowers, num_images=8, size=40)  # the default 300 of 256 px take seconds
    monkeypatch.setattr(demo_flowers, "make_demo_flowers", small)
    flags = TINY_FLAGS + ["--max-steps", "1", "--no-tensorboard"]  # and no --dataset-path
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(training_vqgan.DATASET_PATH, 32)
    assert not (tmp_path / "data").exists()
    training_vqgan.main(training_vqgan.build_parser().parse_args(flags))
    assert "Writing the demo data set of drawn flowers to data/flowers/" in capsys.readouterr().out
    assert len(find_images(tmp_path / "data" / "flowers")) == 8
    assert load_checkpoint(tmp_path / "checkpoints" / "vqgan_last.pt")["step"] == 1
    training_vqgan.main(training_vqgan.build_parser().parse_args(flags))
    assert "Writing the demo" not in capsys.readouterr().out  # drawn once


def test_recompute_is_on_for_the_cpu_only_unless_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert on_cpu_default(None, cpu) is True
    assert on_cpu_default(None, cuda) is False
    assert on_cpu_default(False, cpu) is False
    assert on_cpu_default(True, cuda) is True
    assert training_vqgan.build_parser().parse_args(["--no-recompute"]).recompute is False


def test_compiled_wrappers_are_kept():
    """--compile: Stage1 keeps torch.compile'd wrappers (truth-testing one raised TypeError, so --compile failed)."""
    vqgan, disc = VQGAN(VQGANConfig(**TINY)), Discriminator(DiscriminatorConfig(ndf=16, n_layers=2))
    compiled_vqgan, compiled_disc = torch.compile(vqgan), torch.compile(disc)  # lazy: nothing is compiled here
    stage1 = Stage1(vqgan, disc, None, LossConfig(), vqgan_wrapped=compiled_vqgan, disc_wrapped=compiled_disc)
    assert stage1.vqgan_wrapped is compiled_vqgan and stage1.disc_wrapped is compiled_disc
    assert Stage1(vqgan, disc, None, LossConfig()).vqgan_wrapped is vqgan
