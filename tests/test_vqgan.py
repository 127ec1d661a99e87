"""Stage-1 modules: shapes, the codebook's gradients and loss, the adaptive weight, the GAN step's isolation."""
import pytest
import torch
import torch.nn.functional as F

from codebook import Codebook, codebook_usage
from decoder import Decoder
from discriminator import Discriminator, DiscriminatorConfig
from encoder import Encoder
from helpers import TINY
from loss import adaptive_weight, hinge_d_loss
from vqgan import VQGAN, VQGANConfig


@pytest.mark.parametrize("ch_mult, attn, size, hw", [
    ((1, 2), (8,), 16, (16, 16)),
    ((1, 2, 2), (8,), 32, (32, 32)),
    ((1, 2, 2), (8,), 32, (32, 48)),   # non-square
    ((1, 1, 2, 2), (), 32, (24, 40)),  # non-square, no attention in the levels
])
def test_encoder_decoder_shapes(ch_mult, attn, size, hw):
    f = 2 ** (len(ch_mult) - 1)
    enc = Encoder(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, z_channels=32, resolution=size)
    dec = Decoder(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, z_channels=32, resolution=size)
    x = torch.randn(2, 3, *hw)
    z = enc(x)
    assert z.shape == (2, 32, hw[0] // f, hw[1] // f)
    assert dec(z).shape == x.shape
    assert len(dec.up[0].block) == 2  # num_res_blocks + 1 in the decoder


def test_attention_sits_at_the_configured_resolution():
    enc = Encoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=32, resolution=32)
    assert [len(level.attn) for level in enc.down] == [0, 0, 2]  # widths 32, 16, 8
    dec = Decoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=32, resolution=32)
    assert [len(level.attn) for level in dec.up] == [0, 0, 3]


def test_paper_config_at_256():
    config = VQGANConfig()  # ch 128, ch_mult 1 1 2 2 4, attention at 16, 1024 codes of 256 dims
    model = VQGAN(config).eval()
    with torch.no_grad():
        x_rec, indices, q_loss = model(torch.randn(1, 3, 256, 256))
    assert x_rec.shape == (1, 3, 256, 256) and indices.shape == (1, 16, 16) and q_loss.ndim == 0
    assert indices.max() < 1024
    names = dict(model.named_parameters())
    for key in ("encoder.down.4.attn.1.proj_out.weight", "encoder.down.0.downsample.conv.weight",
                "decoder.up.4.attn.2.q.weight", "decoder.up.1.upsample.conv.weight", "decoder.mid.attn_1.k.weight",
                "encoder.down.2.block.0.nin_shortcut.weight", "quantize.embedding.weight"):
        assert key in names, key


def test_vqgan_interfaces_and_bad_size():
    model = VQGAN(VQGANConfig(**TINY))
    x = torch.randn(2, 3, 32, 32)
    z_q, indices, q_loss = model.encode(x)
    assert z_q.shape == (2, 16, 8, 8) and indices.shape == (2, 8, 8) and indices.dtype == torch.long
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.decode_indices(indices), model.decode(z_q))
    with pytest.raises(ValueError, match="divide by the downsampling factor 4"):
        model.encode(torch.randn(1, 3, 30, 32))


def test_nearest_code_and_straight_through():
    cb = Codebook(num_codebook_vectors=3, latent_dim=2)
    cb.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[0.9, 0.1], [0.1, 1.5], [0.2, -0.1], [0.6, 0.0]]).reshape(1, 2, 2, 2).permute(0, 3, 1, 2)
    z = z.clone().requires_grad_(True)
    z_q, indices, _ = cb(z)
    assert indices.tolist() == [[[1, 2], [0, 1]]]
    chosen = cb.embedding.weight[indices.flatten()].reshape(1, 2, 2, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q.detach(), chosen)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # straight-through: identity gradient


def test_beta_multiplies_the_commitment_term():
    beta = 0.25
    cb = Codebook(num_codebook_vectors=8, latent_dim=4, beta=beta)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, indices, loss = cb(z)
    e = cb.embedding.weight[indices.flatten()].detach()  # (N, 4)
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    n = z_flat.numel()
    torch.testing.assert_close(loss, (1 + beta) * F.mse_loss(z_flat, e))
    loss.backward()
    # encoder side: beta * ||z - sg[e]||^2 -> 2 beta (z - e) / n
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 4), 2 * beta * (z_flat - e) / n)
    # codebook side: ||sg[z] - e||^2 -> 2 (e - z) / n, summed per code
    expected = torch.zeros_like(cb.embedding.weight).index_add_(0, indices.flatten(), 2 * (e - z_flat) / n)
    torch.testing.assert_close(cb.embedding.weight.grad, expected)


def test_gradients_reach_the_encoder():
    model = VQGAN(VQGANConfig(**TINY))
    x_rec, _, q_loss = model(torch.randn(2, 3, 32, 32))
    ((x_rec ** 2).mean() + q_loss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight", "decoder.conv_out.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_usage_and_perplexity_on_known_indices():
    usage, perplexity = codebook_usage(torch.tensor([0, 1, 2, 3] * 5), 8)
    assert usage == 0.5 and perplexity == pytest.approx(4.0)
    usage, perplexity = codebook_usage(torch.tensor([5, 5, 5]), 8)
    assert usage == 1 / 8 and perplexity == pytest.approx(1.0)


def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    disc = Discriminator()
    assert disc(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # 70x70 patches
    convs = [m for m in disc.main if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in disc.main if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1] and len(bns) == 3
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert [c.bias is None for c in convs] == [False, True, True, True, False]
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    bn_w = torch.cat([b.weight for b in bns])
    assert abs(bn_w.mean().item() - 1.0) < 0.005 and torch.all(torch.cat([b.bias for b in bns]) == 0)


def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25 ; relu(1 + fake) = [0, 1] -> 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))


def test_adaptive_weight_equals_hand_computed_value():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY))
    disc = Discriminator(DiscriminatorConfig(ndf=16, n_layers=2))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    last = model.decoder.conv_out.weight

    # The plain formulation, one forward per gradient: d nll / dW and d g / dW at the last layer.
    nll_grad = torch.autograd.grad((x - model(x)[0]).abs().mean(), last)[0]
    g_grad = torch.autograd.grad(-disc(model(x)[0]).mean(), last)[0]
    expected = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0, 1e4) * 0.8

    # Ours: the same gradients from d loss / d x_rec through the last conv in closed form.
    x_rec, features, _, _ = model(x, return_features=True)
    rec = x_rec.detach().requires_grad_(True)
    grad_nll = torch.autograd.grad((x - rec).abs().mean(), rec)[0]
    grad_g = torch.autograd.grad(-disc(rec).mean(), rec)[0]
    torch.testing.assert_close(model.last_layer_grad(features, grad_nll), nll_grad, atol=1e-6, rtol=1e-4)
    lam = adaptive_weight(model.last_layer_grad(features, grad_nll), model.last_layer_grad(features, grad_g))
    torch.testing.assert_close(lam, expected, atol=1e-6, rtol=1e-4)
    assert not lam.requires_grad
    # Clamping: a vanishing GAN gradient gives the upper bound, times disc_weight.
    assert adaptive_weight(torch.ones(3) * 1e6, torch.zeros(3), 0.8).item() == pytest.approx(1e4 * 0.8)


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators that run inside it (after autograd: what actually executes)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def saved_bytes_and_grads(model, x, recompute):
    """Bytes the forward keeps for the backward, then the gradients, with a fixed seed (dropout is on)."""
    model.set_recompute(recompute)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_rec, _, q_loss = model(x)
    model.zero_grad()
    (x_rec.square().mean() + q_loss).backward()
    return sum(saved.values()), x_rec.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recomputing_norm_and_swish_changes_nothing_but_memory():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY, dropout=0.2)).train()  # dropout: the recomputation must redraw the same mask
    x = torch.randn(2, 3, 32, 32)
    kept_plain, rec_plain, grads_plain = saved_bytes_and_grads(model, x, recompute=False)
    kept, rec, grads = saved_bytes_and_grads(model, x, recompute=True)
    torch.testing.assert_close(rec, rec_plain, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_plain[name], rtol=1e-6, atol=1e-7, msg=name)
    assert kept < 0.75 * kept_plain, (kept, kept_plain)


def test_the_backward_recomputes_norms_but_never_a_conv():
    model = VQGAN(VQGANConfig(**TINY)).train().set_recompute(True)
    x = torch.randn(2, 3, 32, 32)
    with CountOps() as forward:
        x_rec, _, q_loss = model(x)
    with CountOps() as backward:
        (x_rec.square().mean() + q_loss).backward()
    aten = torch.ops.aten
    assert forward.counts[aten.convolution.default] > 20
    assert aten.convolution.default not in backward.counts  # early stop: the convs' inputs were all it needed
    # every ResnetBlock's two norms and the encoder's and decoder's norm_out ran again
    blocks = sum(1 for m in model.modules() if type(m).__name__ == "ResnetBlock")
    assert backward.counts[aten.native_group_norm.default] == 2 * blocks + 2
