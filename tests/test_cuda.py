"""The CUDA-only lines, on a GPU: run by `python gpu_check.py`; skipped (never failed) on a machine without CUDA.

Tolerances are those a correct run meets on any GPU, with cudnn.benchmark on (pick_device sets it, and cuDNN then
picks kernels whose summation order differs from run to run) and cuDNN's default TF32 convolutions. The one rule
behind them: no check depends on an argmin or argmax that a rounding difference can flip.
- fp32 references run with TF32 off (the `exact_fp32` fixture): TF32 keeps 10 mantissa bits, so a "fp32" reference
  of TF32 convolutions would itself be off by about 1e-3.
- lambda under autocast (a ratio of two gradient norms at the decoder's last layer, after a backward through every
  decoder layer): the CPU's bf16 emulation of this test's step, over seeds 0-19, was off from fp32 by 2.0% on
  average and 4.7% at most; fp16, by 0.7% and 1.5%. The bounds, 15% for bf16 and 5% for fp16, are about 6 times
  the average error (3 and 3.3 times the largest seen), and still far below what a real mistake costs: a loss scale
  left in one of the two gradients changes lambda 256-fold, a gradient taken at the wrong layer several-fold.
- Codes are compared only where the computation is the same (the codebook with and without autocast); across two
  conv layouts, the latents before the argmin and the decoder on the same codes are compared instead, since a code
  at a near-tie may flip with the kernels.
- Greedy decoding with the cache is checked token by token against the full-prefix logits, each token within 1e-4 of
  the best logit, instead of as one equal sequence: one near-tie flipped by the cache's other kernels would change
  every later token.
"""
import pytest
import torch

import bench
from codebook import Codebook
from data import TokenRows, build_loader
from discriminator import Discriminator, DiscriminatorConfig
from helpers import TINY
from loss import LossConfig, Stage1, train_step
from mingpt import GPT, GPTConfig, sample_next
from runtime import autocast, pick_device
from vqgan import VQGAN, VQGANConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LAMBDA_RTOL = {"bf16": 0.15, "fp16": 0.05}  # see the module's docstring


@pytest.fixture
def exact_fp32():
    """fp32 matmuls and convolutions without TF32, for this test only."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_pick_device_makes_the_device_current_and_tunes_cudnn():
    last = torch.cuda.device_count() - 1
    assert pick_device(f"cuda:{last}") == torch.device("cuda", last)
    assert torch.cuda.current_device() == last and torch.backends.cudnn.benchmark
    torch.cuda.set_device(0)


def test_bench_sections_tune_cudnn_as_training():
    torch.backends.cudnn.benchmark = False
    args = bench.build_parser().parse_args(["--quick", "--device", "cuda", "--steps", "1", "--warmup", "1",
                                            "--gpt-batch-size", "1"])
    assert bench.run_section("stage2", args)["items_per_s"] > 0
    assert torch.backends.cudnn.benchmark


def test_loader_pins_labels_for_copies_without_waiting():
    rows = TokenRows(torch.zeros(8, 4, dtype=torch.int32), torch.arange(8))
    batch = next(iter(build_loader(rows, 4, train=False)))
    assert batch["label"].is_pinned() and batch["indices"].is_pinned()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_in_half_precision_matches_fp32(precision, exact_fp32):
    """lam within LAMBDA_RTOL of fp32's, every gradient finite and in fp32, with fp16's scalers at a safe scale."""
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(**TINY)).cuda().to(memory_format=torch.channels_last)
    disc = Discriminator(DiscriminatorConfig(ndf=16, n_layers=2)).cuda()
    x = (torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    config = LossConfig(perceptual_loss_factor=0.0, disc_start=0)
    plain = train_step(Stage1(vqgan, disc, None, config, "fp32"), x, 0)
    vqgan.zero_grad(), disc.zero_grad()
    scalers = tuple(torch.amp.GradScaler("cuda", init_scale=2.0 ** 8, enabled=precision == "fp16") for _ in range(2))
    half = train_step(Stage1(vqgan, disc, None, config, precision, scalers), x, 0)
    torch.testing.assert_close(half["lam"], plain["lam"], rtol=LAMBDA_RTOL[precision], atol=0)
    for p in list(vqgan.parameters()) + list(disc.parameters()):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_codebook_indices_ignore_autocast_on_cuda(exact_fp32):
    torch.manual_seed(0)
    cb = Codebook(num_codebook_vectors=1024, latent_dim=64).cuda().eval()
    cb.embedding.weight.data.normal_()
    z = torch.randn(16, 64, 8, 8, device="cuda")
    expected = cb(z)[1]
    with autocast("bf16", z.device):
        assert torch.equal(cb(z)[1], expected)


def test_cached_greedy_generation_follows_the_full_prefix_on_cuda(exact_fp32):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)).cuda().eval()
    start = torch.arange(3, device="cuda").view(3, 1)
    cached = gpt.generate(start, 40, top_k=1)  # (3, 41)
    with torch.no_grad():
        logits = gpt(cached[:, :-1])[0]  # (3, 40, V): every token's full-prefix prediction
    chosen = logits.gather(-1, cached[:, 1:, None])[..., 0]
    assert (chosen >= logits.max(-1).values - 1e-4).all()
    assert len(cached[:, 1:].unique()) > 3  # not a constant sequence, which any cache would reproduce


def test_device_sampling_draws_from_the_softmax_on_cuda():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0], device="cuda")
    n = 200000
    freq = torch.bincount(sample_next(logits.expand(n, -1)).flatten(), minlength=5).double() / n
    p = torch.softmax(logits.double(), 0)
    assert torch.all((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt())


def test_channels_last_computes_the_same_functions(exact_fp32):
    """The encoder's latents and the decoder on the same codes agree in both memory formats (the codes themselves
    may differ at a near-tie, so they are not compared)."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY)).cuda().eval()
    x = torch.rand(2, 3, 32, 32, device="cuda") * 2 - 1
    codes = torch.randint(TINY["num_codebook_vectors"], (2, 8, 8), device="cuda")
    with torch.no_grad():
        latents, images = model.quant_conv(model.encoder(x)), model.decode_indices(codes)
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model.quant_conv(model.encoder(x)), latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.decode_indices(codes), images, rtol=1e-4, atol=1e-4)
