"""The quantizers behind --quantizer, checked by hand on tiny tensors: FSQ's rounding, LFQ's signs, bits and entropy,
EMA's update, the rotation trick, k-means initialisation; the shared contract; parity with vector-quantize-pytorch;
EMA under two gloo ranks; the flag combinations refused; each quantizer through eval_vqgan.py and stage 2."""
import math
from dataclasses import asdict

import pytest
import torch

import eval_vqgan
import training_vqgan
from checkpoint import save_checkpoint
from cli import config_from_flags
from codebook import Codebook, EMACodebook, rotate_onto
from config import config_from_dict
from helpers import script_error
from scalar_quantizers import FSQ, LFQ
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN, VQGANConfig, build_quantizer


def as_map(rows):
    """(N, C) vectors -> a (1, C, 1, N) latent map, so that the quantizer's flattening gives back `rows` in order."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0])


def as_rows(z_map):
    """(1, C, 1, N) -> (N, C), the inverse of as_map."""
    return z_map.reshape(z_map.shape[1], -1).t()


def identity_projections(q):
    with torch.no_grad():
        for proj in (q.proj_in, q.proj_out):
            proj.weight.copy_(torch.eye(*proj.weight.shape))
            proj.bias.zero_()
    return q


# ---- FSQ ----

def test_fsq_rounds_even_and_odd_levels():
    fsq = identity_projections(FSQ(levels=[4, 3], latent_dim=2))
    assert fsq.num_codebook_vectors == 12
    # Level 4 (even): bound = tanh(z + atanh(0.5 / 1.5015)) * 1.5015 - 0.5, rounded to -2..1, divided by 2.
    #   z = 0 -> 0; 10 -> 1.0015 -> 1; -10 -> -2.0015 -> -2; -0.5 -> tanh(-0.1539) * 1.5015 - 0.5 = -0.729 -> -1.
    # Level 3 (odd): bound = tanh(z) * 1.001, rounded to -1..1, divided by 1.
    #   z = 0 -> 0; 1 -> 0.762 -> 1; -0.4 -> -0.380 -> 0; -2 -> -0.965 -> -1.
    z = torch.tensor([[0.0, 0.0], [10.0, 1.0], [-10.0, -0.4], [-0.5, -2.0]])
    z_q, indices, loss = fsq(as_map(z))
    codes = torch.tensor([[0.0, 0.0], [0.5, 1.0], [-1.0, 0.0], [-0.5, -1.0]])
    torch.testing.assert_close(as_rows(z_q), codes)
    # digits (value + L // 2): (2, 1), (3, 2), (0, 1), (1, 0); index = d0 + 4 d1
    assert indices.flatten().tolist() == [6, 11, 4, 1]
    torch.testing.assert_close(as_rows(fsq.lookup(indices)), codes)
    assert loss.item() == 0.0


def test_fsq_reaches_exactly_its_levels():
    fsq = identity_projections(FSQ(levels=[8, 5, 2], latent_dim=3))
    z = torch.linspace(-20, 20, 4001)[:, None].expand(-1, 3)
    codes, indices = fsq.quantize(z)
    for i, level in enumerate([8, 5, 2]):
        values = codes[:, i].unique()
        assert len(values) == level and values.min() == -1  # L = 2 too: the paper's (1 - eps) would make it NaN
    assert indices.min() == 0 and indices.max() == 8 * 5 * 2 - 1
    torch.testing.assert_close(fsq.codes_of(indices), codes)


def test_fsq_rounding_passes_gradients_straight_through():
    fsq = identity_projections(FSQ(levels=[3], latent_dim=1))
    z = torch.tensor([[0.3]], requires_grad=True)
    codes, _ = fsq.quantize(z)
    codes.sum().backward()
    # d/dz tanh(z) * 1.001 / 1 at z = 0.3, the rounding skipped
    torch.testing.assert_close(z.grad, torch.tensor([[1.001 * (1 - math.tanh(0.3) ** 2)]]))


# ---- LFQ ----

def test_lfq_signs_and_index_bits():
    lfq = identity_projections(LFQ(bits=3, latent_dim=3, beta=0.25, entropy_weight=0.0))
    assert lfq.num_codebook_vectors == 8
    z = torch.tensor([[0.5, -1.0, 2.0], [-0.1, -0.2, -0.3], [1.0, 1.0, 1.0], [0.0, 0.2, -3.0]])
    z_q, indices, loss = lfq(as_map(z))
    signs = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])  # 0 -> -1
    torch.testing.assert_close(as_rows(z_q), signs)
    assert indices.flatten().tolist() == [0b101, 0b000, 0b111, 0b010]  # first dimension most significant
    torch.testing.assert_close(as_rows(lfq.lookup(indices)), signs)
    # commitment: squared errors 1.25 + 1.94 + 0 + 5.64 over 12 entries, times beta
    torch.testing.assert_close(loss, torch.tensor(0.25 * 8.83 / 12))


def test_lfq_entropy_loss_by_hand():
    lfq = identity_projections(LFQ(bits=1, latent_dim=1, beta=0.0, entropy_weight=1.0, diversity_weight=1.0))
    z = torch.tensor([[0.0], [50.0]], requires_grad=True)  # p(code | z): (1/2, 1/2) and (0, 1), saturated
    _, _, loss = lfq(as_map(z))
    per_sample = math.log(2) / 2
    codebook = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # of the mean distribution (1/4, 3/4)
    torch.testing.assert_close(loss, torch.tensor(per_sample - codebook))
    loss.backward()
    assert torch.isfinite(z.grad).all()  # an underflowed probability gives no NaN


# ---- EMA ----

def ema_codebook(**kwargs):
    cb = EMACodebook(num_codebook_vectors=3, latent_dim=2, beta=0.25, decay=0.5, **kwargs).train()
    cb.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    assert not cb.cluster_size.any() and not cb.embed_avg.any()  # no history yet
    return cb


def test_ema_updates_the_assigned_codes_only():
    cb = ema_codebook(eps=0.1)
    assert not cb.embedding.weight.requires_grad
    z = torch.tensor([[1.0, 0.0], [0.0, -1.0], [9.0, 1.0]])  # codes 0, 0, 1; code 2 gets nothing
    z_q, indices, loss = cb(as_map(z))
    assert indices.flatten().tolist() == [0, 0, 1]
    torch.testing.assert_close(as_rows(z_q), torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]]))  # the old codes
    torch.testing.assert_close(loss, torch.tensor(0.25 * 4 / 6))  # commitment only
    # from zero: N = 0.5 * (2, 1, 0) = (1, 0.5, 0); m = 0.5 * sums ((1, -1), (9, 1), 0)
    torch.testing.assert_close(cb.cluster_size, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(cb.embed_avg, torch.tensor([[0.5, -0.5], [4.5, 0.5], [0.0, 0.0]]))
    # Laplace: (N + 0.1) / (1.5 + 0.3) * 1.5 = (11/12, 1/2, 1/12): code 1 is its vector's mean (9, 1), code 0 that
    # of its two, (0.5, -0.5), times 12/11 from the smoothing; code 2 would become (0, 0) but keeps (0, 10)
    torch.testing.assert_close(cb.embedding.weight, torch.tensor([[6 / 11, -6 / 11], [9.0, 1.0], [0.0, 10.0]]))
    before = cb.embedding.weight.clone()
    cb.eval()
    cb(as_map(z))
    assert torch.equal(cb.embedding.weight, before)


def test_ema_restart_resets_the_statistics_of_the_restarted_codes():
    cb = ema_codebook(restart_dead_codes=True, restart_every=1)
    cb.hits_since_check.copy_(torch.tensor([5.0, 5.0, 0.0]))  # code 2 dead
    cb.train_steps = 1
    z = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-5.0, -5.0]])
    cb(as_map(z))
    reseeded = cb.embedding.weight[2]
    # one of the batch's vectors, then its own average: exact if no vector picked it in this step, else up to the
    # Laplace smoothing of a total count of 2 (eps 1e-5)
    assert any(torch.allclose(reseeded, row, rtol=1e-4, atol=0) for row in z)
    torch.testing.assert_close(cb.embed_avg[2] / cb.cluster_size[2], reseeded, rtol=1e-4, atol=0)


# ---- the rotation trick and k-means initialisation ----

def test_rotation_trick_forward_is_the_code_and_its_gradient_the_rotation():
    cb = Codebook(num_codebook_vectors=1, latent_dim=2, rotation_trick=True)
    cb.embedding.weight.data = torch.tensor([[0.0, 2.0]])
    z = as_map(torch.tensor([[1.0, 0.0]])).requires_grad_(True)
    z_q, _, _ = cb(z)
    torch.testing.assert_close(as_rows(z_q), torch.tensor([[0.0, 2.0]]))
    (as_rows(z_q) * torch.tensor([[1.0, 0.0]])).sum().backward()
    # e = (1, 0) onto q = (0, 2): R turns by +90 degrees, lambda = 2; lambda R^T (1, 0) = (0, -2), not (1, 0)
    torch.testing.assert_close(as_rows(z.grad), torch.tensor([[0.0, -2.0]]))


def test_rotation_trick_matches_the_matrix_formula_and_straight_through_forward():
    torch.manual_seed(0)
    e, q, g = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), torch.randn(3, 4)
    out = rotate_onto(e, q)
    assert torch.equal(out, q)
    torch.testing.assert_close(out, e + (q - e).detach())  # the straight-through value
    (out * g).sum().backward()
    for i in range(3):
        e_hat, q_hat = e[i].detach() / e[i].norm(), q[i] / q[i].norm()
        r = (e_hat + q_hat) / (e_hat + q_hat).norm()
        R = torch.eye(4) - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)
        torch.testing.assert_close(R @ e[i].detach(), e[i].norm() * q_hat)
        torch.testing.assert_close(e.grad[i], q[i].norm() / e[i].norm() * R.t() @ g[i])


def test_kmeans_init_centres_the_codes_on_the_first_batch_once():
    torch.manual_seed(0)
    cb = Codebook(num_codebook_vectors=2, latent_dim=1, kmeans_init=True).train()
    cb(as_map(torch.tensor([[0.0], [0.1], [10.0], [10.2]])))
    torch.testing.assert_close(cb.embedding.weight.flatten().sort().values, torch.tensor([0.05, 10.1]))
    assert cb.kmeans_done.item()
    resumed = Codebook(num_codebook_vectors=2, latent_dim=1, kmeans_init=True).train()
    resumed.load_state_dict(cb.state_dict())
    resumed(as_map(torch.tensor([[3.0], [4.0]])))  # step 0 of a resumed run: no second initialisation
    assert torch.equal(resumed.embedding.weight, cb.embedding.weight)


# ---- the contract, for every quantizer ----

QUANTIZERS = {"vq": dict(), "ema": dict(quantizer="ema"), "fsq": dict(quantizer="fsq", fsq_levels=(4, 3, 2)),
              "lfq": dict(quantizer="lfq", lfq_bits=5)}


def tiny_config(name, **kwargs):
    return VQGANConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                       z_channels=32, latent_dim=8, **QUANTIZERS[name], **kwargs)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_contract(name):
    torch.manual_seed(0)
    q = build_quantizer(tiny_config(name, num_codebook_vectors=24 if name == "fsq" else None))
    K = {"vq": 1024, "ema": 1024, "fsq": 24, "lfq": 32}[name]
    assert q.num_codebook_vectors == K
    z = torch.randn(2, 8, 3, 4, requires_grad=True)
    z_q, indices, loss = q.train()(z)
    assert z_q.shape == z.shape and indices.shape == (2, 3, 4) and indices.dtype == torch.int64
    assert 0 <= indices.min() and indices.max() < K and loss.shape == ()
    (z_q.sum() + loss).backward()
    assert z.grad.abs().sum() > 0
    assert q.train_steps == 1 and q.window_counts.sum() == 24
    usage, perplexity = q.usage()
    assert usage == pytest.approx(len(indices.unique()) / K) and 1 <= perplexity <= 24
    q.eval()
    z_q, indices, _ = q(z)
    torch.testing.assert_close(q.lookup(indices), z_q)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the quantizer computes in fp32 all the same
        z_q_bf16, indices_bf16, _ = q(z)
    assert torch.equal(indices_bf16, indices) and torch.equal(z_q_bf16, z_q)


def test_the_default_is_the_papers_codebook():
    config = VQGANConfig()
    assert config.quantizer == "vq" and config.num_codebook_vectors == 1024
    model = VQGAN(tiny_config("vq", num_codebook_vectors=64))
    assert type(model.quantize) is Codebook and not model.quantize.rotation_trick
    assert [k for k in model.state_dict() if k.startswith("quantize.")] == ["quantize.embedding.weight"]


def test_old_configs_load():
    old = asdict(tiny_config("vq", num_codebook_vectors=64))
    for key in ("quantizer", "rotation_trick", "kmeans_init", "codebook_ema_decay", "fsq_levels", "lfq_bits",
                "lfq_entropy_weight", "lfq_diversity_weight"):
        del old[key]
    config = config_from_dict(VQGANConfig, old)
    assert config.quantizer == "vq" and config.num_codebook_vectors == 64


@pytest.mark.parametrize("fields, words", [
    (dict(quantizer="fsq", fsq_levels=(8, 8, 8), codebook_l2_norm=True), "codebook_l2_norm"),
    (dict(quantizer="lfq", lfq_bits=9, rotation_trick=True), "rotation_trick"),
    (dict(quantizer="fsq", fsq_levels=(8, 8, 8), num_codebook_vectors=1024), "num_codebook_vectors 1024"),
    (dict(quantizer="lfq", lfq_bits=9, num_codebook_vectors=1000), "lfq_bits 9"),
    (dict(quantizer="fsq"), "fsq_levels"),
    (dict(quantizer="fsq", fsq_levels=(8, 1)), "fsq_levels"),
    (dict(quantizer="lfq", lfq_bits=20), "lfq_bits"),
    (dict(quantizer="vq", fsq_levels=(8, 8)), "fsq_levels"),
    (dict(quantizer="ema", lfq_bits=4), "lfq_bits"),
    (dict(quantizer="ema", codebook_ema_decay=1.0), "codebook_ema_decay"),
    (dict(quantizer="pq"), "quantizer"),
])
def test_field_combinations_that_make_no_sense_are_one_sentence_naming_the_fields(fields, words):
    with pytest.raises(ValueError) as err:
        VQGANConfig(**fields)
    message = str(err.value)
    assert words in message and message.endswith(".") and ". " not in message.replace("e.g. ", "")


def test_the_quantizer_flags_make_the_config_and_its_errors_are_worded_by_flag(capsys):
    """training_vqgan.py's flags become the config's fields by name, and a ConfigError reaches the command line
    naming the flags, those in the middle of the sentence too."""
    flags = ["--quantizer", "fsq", "--fsq-levels", "8", "5", "5", "5"]
    config = config_from_flags(VQGANConfig, training_vqgan.build_parser().parse_args(flags))
    assert (config.quantizer, config.fsq_levels, config.num_codebook_vectors) == ("fsq", (8, 5, 5, 5), 1000)
    flags = ["--quantizer", "fsq", "--fsq-levels", 8, 8, 8, "--num-codebook-vectors", 1024]
    error = script_error(training_vqgan, flags, capsys)
    assert error == "--num-codebook-vectors 1024 does not match --fsq-levels 8 8 8, which make 512 codes; leave it out."


def test_fsq_and_lfq_sizes_are_derived_and_an_explicit_match_is_accepted():
    assert VQGANConfig(quantizer="fsq", fsq_levels=[8, 5, 5, 5]).num_codebook_vectors == 1000
    assert VQGANConfig(quantizer="lfq", lfq_bits=10, num_codebook_vectors=1024).num_codebook_vectors == 1024


# ---- parity with vector-quantize-pytorch (a test-only dependency) ----

def test_indices_match_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    z = torch.randn(1, 500, 4) * 2
    theirs = vqp.FSQ(levels=[8, 5, 5, 3], dim=4)
    ours = FSQ(levels=[8, 5, 5, 3], latent_dim=4)
    _, their_indices = theirs(z)
    torch.testing.assert_close(ours.quantize(z[0])[1], their_indices[0].long())
    z = torch.randn(1, 500, 6)
    theirs = vqp.LFQ(dim=6, codebook_size=64)
    ours = identity_projections(LFQ(bits=6, latent_dim=6))
    their_indices = theirs(z)[1]
    torch.testing.assert_close(ours(as_map(z[0]))[1].flatten(), their_indices.flatten().long())


# ---- every quantizer through eval_vqgan.py and stage 2 ----

@pytest.mark.parametrize("name", QUANTIZERS)
def test_each_quantizer_through_eval_and_stage_2(name, tmp_path, flowers, monkeypatch):
    monkeypatch.setattr(eval_vqgan, "lpips_available", lambda: False)
    monkeypatch.setattr(eval_vqgan, "inception_weights_path", lambda: str(tmp_path / "none.pth"))
    torch.manual_seed(0)
    model = VQGAN(tiny_config(name, num_codebook_vectors=64 if name in ("vq", "ema") else None))
    model.train()(torch.rand(2, 3, 32, 32) * 2 - 1)  # a training step, so that EMA's statistics move
    path = tmp_path / "vqgan_last.pt"
    save_checkpoint(dict(model=model.state_dict(), config=asdict(model.config), step=1), path)
    metrics = eval_vqgan.main(eval_vqgan.build_parser().parse_args(
        ["--checkpoint-path", str(path), "--dataset-path", str(flowers), "--device", "cpu", "--num-workers", "0",
         "--batch-size", "12", "--num-grid", "0", "--out-json", str(tmp_path / "m.json")]))
    assert 0 < metrics["codebook_usage"] <= 1 and math.isfinite(metrics["psnr"])
    # stage 2 on the reloaded checkpoint: tokens in [0, K), a loss, samples that decode
    stage2 = VQGANTransformer(VQGAN.from_checkpoint(path), TransformerConfig(n_layer=1, n_head=1, n_embd=16,
                                                                              block_size=64))
    K = stage2.num_codebook_vectors
    indices = stage2.encode_to_indices(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert indices.shape == (2, 64) and 0 <= indices.min() and indices.max() < K
    _, loss = stage2.train()(indices)
    loss.backward()
    assert math.isfinite(loss.item())
    samples = stage2.eval().sample_indices(1, top_k=8)
    assert samples.max() < K and stage2.indices_to_image(samples).shape == (1, 3, 32, 32)
