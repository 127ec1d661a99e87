"""The CUDA-only lines, on a GPU: run by `python gpu_check.py`; skipped (never failed) on a machine without CUDA."""
import pytest
import torch

from codebook import Codebook
from discriminator import Discriminator, DiscriminatorConfig
from helpers import TINY
from loss import LossConfig, Stage1, train_step
from mingpt import GPT, GPTConfig, sample_next
from runtime import autocast, pick_device
from vqgan import VQGAN, VQGANConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_pick_device_makes_the_device_current_and_tunes_cudnn():
    last = torch.cuda.device_count() - 1
    assert pick_device(f"cuda:{last}") == torch.device("cuda", last)
    assert torch.cuda.current_device() == last and torch.backends.cudnn.benchmark
    torch.cuda.set_device(0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_in_half_precision_matches_fp32(precision):
    """lam within 5% of fp32's, every gradient finite and in fp32, with fp16's scalers at a safe scale."""
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(**TINY)).cuda().to(memory_format=torch.channels_last)
    disc = Discriminator(DiscriminatorConfig(ndf=16, n_layers=2)).cuda()
    x = (torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    config = LossConfig(perceptual_loss_factor=0.0, disc_start=0)
    plain = train_step(Stage1(vqgan, disc, None, config, "fp32"), x, 0)
    vqgan.zero_grad(), disc.zero_grad()
    scalers = tuple(torch.amp.GradScaler("cuda", init_scale=2.0 ** 8, enabled=precision == "fp16") for _ in range(2))
    half = train_step(Stage1(vqgan, disc, None, config, precision, scalers), x, 0)
    torch.testing.assert_close(half["lam"], plain["lam"], rtol=0.05, atol=0)
    for p in list(vqgan.parameters()) + list(disc.parameters()):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_codebook_indices_ignore_autocast_on_cuda():
    torch.manual_seed(0)
    cb = Codebook(num_codebook_vectors=1024, latent_dim=64).cuda().eval()
    cb.embedding.weight.data.normal_()
    z = torch.randn(16, 64, 8, 8, device="cuda")
    expected = cb(z)[1]
    with autocast("bf16", z.device):
        assert torch.equal(cb(z)[1], expected)


def test_cached_greedy_generation_matches_the_full_prefix_on_cuda():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)).cuda().eval()
    start = torch.zeros(3, 1, dtype=torch.long, device="cuda")
    cached = gpt.generate(start, 40, top_k=1)
    idx = start
    with torch.no_grad():
        for _ in range(40):
            idx = torch.cat([idx, gpt(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, idx)


def test_device_sampling_draws_from_the_softmax_on_cuda():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0], device="cuda")
    n = 200000
    freq = torch.bincount(sample_next(logits.expand(n, -1)).flatten(), minlength=5).double() / n
    p = torch.softmax(logits.double(), 0)
    assert torch.all((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt())


def test_channels_last_gives_the_same_reconstruction():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY)).cuda().eval()
    x = torch.rand(2, 3, 32, 32, device="cuda") * 2 - 1
    with torch.no_grad():
        expected = model(x)[0]
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))[0]
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
