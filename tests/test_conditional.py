"""Stage 2 with an image condition: the token layout, the loss on image tokens only, the null condition, both windows
sliding together on a canvas (against an uncached re-implementation), and our checkpoints' condition tokenizer."""
from dataclasses import asdict
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import transformer
from checkpoint import CheckpointError, save_checkpoint
from transformer import TransformerConfig, VQGANTransformer, cond_window_origin
from vqgan import VQGAN, VQGANConfig

# 16x16 images, f = 4 (a 4x4 token window, 32 codes); label maps of 3 classes tokenized with 24 codes
IMAGE_VQGAN = VQGANConfig(image_size=16, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(4,),
                          z_channels=16, latent_dim=8, num_codebook_vectors=32)
K, KC = 32, 24


def label_vqgan(f=4):
    """A segmentation tokenizer with downsampling factor f (2 or 4)."""
    return VQGAN(VQGANConfig(image_kind="segmentation", num_labels=3, image_size=16, ch=32,
                             ch_mult=(1,) * f.bit_length(), num_res_blocks=1, attn_resolutions=(),
                             z_channels=16, latent_dim=8, num_codebook_vectors=KC))


def cond_model(f=4, block_size=40, **config):
    """A tiny conditional model whose random weights are large enough that every logit depends on its context."""
    torch.manual_seed(0)
    model = VQGANTransformer(VQGAN(IMAGE_VQGAN), TransformerConfig(n_layer=2, n_head=2, n_embd=32,
                                                                   block_size=block_size, **config), label_vqgan(f))
    for p in model.gpt.parameters():
        p.data.normal_(0.0, 0.3)
    return model.eval()


def random_labels(n, size, seed=0):
    """One-hot label maps (n, 3, H, W) as data.map_to_tensor makes them."""
    labels = torch.randint(0, 3, (n, *size), generator=torch.Generator().manual_seed(seed))
    return F.one_hot(labels, 3).permute(0, 3, 1, 2).float()


# ---- the token layout and the loss ----

def test_vocabulary_layout_shared_and_separate():
    shared = cond_model(num_classes=2, class_dropout=0.1, cond_dropout=0.1)
    # codes 0..31 (condition codes 0..23 share their rows), 2 classes, the null class, the null condition
    assert (shared.cond_offset, shared.start_token, shared.null_token, shared.null_cond_token) == (0, K, K + 2, K + 3)
    assert shared.gpt.config.vocab_size == K + 4 and shared.prefix_length == 1 + 16
    separate = cond_model(cond_embedding="separate")
    assert (separate.cond_offset, separate.start_token, separate.gpt.config.vocab_size) == (K, K + KC, K + KC + 1)
    cond = torch.randint(0, KC, (2, 4, 4))
    assert torch.equal(separate.prefix(separate.start_tokens(2), cond),
                       torch.cat([torch.full((2, 1), K + KC), cond.flatten(1) + K], dim=1))


def test_loss_is_on_the_image_tokens_only():
    model = cond_model(cond_embedding="separate")
    indices, cond = torch.randint(0, K, (3, 16)), torch.randint(0, KC, (3, 4, 4))
    logits, loss = model(indices, cond=cond)
    tokens = torch.cat([torch.full((3, 1), K + KC), cond.flatten(1) + K, indices[:, :-1]], dim=1)  # (3, 32)
    full, _ = model.gpt(tokens)
    assert logits.shape == (3, 16, model.gpt.config.vocab_size)
    torch.testing.assert_close(logits, full[:, 16:])  # the last condition position predicts the first image token
    torch.testing.assert_close(loss, F.cross_entropy(full[:, 16:].flatten(0, 1), indices.flatten()))
    with pytest.raises(ValueError, match="conditioned on an image"):
        model(indices)


def test_pkeep_noises_image_tokens_and_never_the_condition(monkeypatch):
    model = cond_model(pkeep=0.5).train()
    seen = []
    monkeypatch.setattr(model.gpt, "forward", lambda tokens, targets=None: seen.append(tokens) or
                        (torch.zeros(*tokens.shape, model.gpt.config.vocab_size), None))
    indices, cond = torch.randint(0, K, (64, 16)), torch.randint(0, KC, (64, 4, 4))
    model(indices, cond=cond)
    assert torch.equal(seen[0][:, 1:17], cond.flatten(1))
    assert (seen[0][:, 17:] != indices[:, :-1]).float().mean() > 0.3


def test_null_condition_at_the_cond_dropout_rate(monkeypatch):
    model = cond_model(cond_dropout=0.25)
    seen = []
    monkeypatch.setattr(model.gpt, "forward", lambda tokens, targets=None: seen.append(tokens) or
                        (torch.zeros(*tokens.shape, model.gpt.config.vocab_size), None))
    cond = torch.randint(0, KC, (4000, 4, 4))
    model.train()(torch.zeros(4000, 16, dtype=torch.long), cond=cond)
    window = seen[0][:, 1:17]
    null = (window == model.null_cond_token).all(dim=1)
    assert null.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(window[~null], cond.flatten(1)[~null]) and (window[null] == K + 1).all()  # the whole window
    model.eval()(torch.zeros(4000, 16, dtype=torch.long), cond=cond)
    assert torch.equal(seen[1][:, 1:17], cond.flatten(1))  # never at evaluation
    with pytest.raises(ValueError, match=r"cond_dropout needs an image condition \(cond_path\)"):
        VQGANTransformer(VQGAN(IMAGE_VQGAN), TransformerConfig(n_layer=1, n_head=1, n_embd=8, block_size=16,
                                                               cond_dropout=0.1))


def test_guidance_drops_the_condition_in_one_forward(monkeypatch):
    model = cond_model(cond_dropout=0.1)
    cond, drawn, batches = torch.randint(0, KC, (2, 4, 4)), [], []
    monkeypatch.setattr(transformer, "sample_next", lambda logits, *a, **k: drawn.append(logits) or
                        logits.argmax(-1, keepdim=True))
    run = model.gpt._run
    monkeypatch.setattr(model.gpt, "_run", lambda idx, kv=None, pos=0: batches.append(len(idx)) or run(idx, kv, pos))
    model.sample_canvas(2, cond=cond, cfg_scale=2.5)
    assert batches == [4] * 16
    with_cond = model.gpt(torch.cat([torch.full((2, 1), K), cond.flatten(1)], dim=1))[0][:, -1, :K]
    null = model.gpt(torch.tensor([[K] + [K + 1] * 16] * 2))[0][:, -1, :K]
    torch.testing.assert_close(drawn[0], null + 2.5 * (with_cond - null))
    with pytest.raises(ValueError, match="without a null class or a null condition"):
        cond_model().sample_canvas(1, cond=cond[:1], cfg_scale=2.0)


def test_block_size_counts_the_condition():
    with pytest.raises(ValueError, match=r"block_size 30 is smaller than the 32 tokens the GPT reads: the start "
                                         r"token, the 16 condition tokens \(4x4\) and all 16 image indices"):
        cond_model(block_size=30)

    with pytest.raises(ValueError, match=r"objective maskgit takes no image condition \(cond_path\)"):
        cond_model(objective="maskgit")  # the condition is read by the ar objective only


# ---- the sliding windows ----

def round_half_up(x):
    return int(x + Fraction(1, 2))


def uncached_reference(model, cond, canvas_hw, f_cond, downsample):
    """Greedy sampling on a canvas written out as taming's loop, the whole window through the GPT and no cache; the
    condition window starts at the condition pixel of the image window's top-left pixel, to the nearest token."""
    (H, W), (h, w), (hc, wc), f = canvas_hw, model.latent_hw, model.cond_hw, 4
    grid = torch.zeros(len(cond), H, W, dtype=torch.long)
    for i in range(H):
        local_i = i if i <= h // 2 else h - (H - i) if H - i < h // 2 else h // 2
        for j in range(W):
            local_j = j if j <= w // 2 else w - (W - j) if W - j < w // 2 else w // 2
            top, left = i - local_i, j - local_j
            ctop = round_half_up(Fraction(top * f, downsample * f_cond))  # pixels -> condition tokens
            cleft = round_half_up(Fraction(left * f, downsample * f_cond))
            cpatch = cond[:, ctop:ctop + hc, cleft:cleft + wc].flatten(1)
            patch = grid[:, top:top + h, left:left + w].flatten(1)
            tokens = torch.cat([model.start_tokens(len(cond)), cpatch + model.cond_offset, patch[:, :-1]], dim=1)
            logits, _ = model.gpt(tokens)
            grid[:, i, j] = logits[:, 1 + hc * wc - 1 + local_i * w + local_j, :K].argmax(-1)
    return grid


@pytest.mark.parametrize("f_cond, downsample, block_size", [
    (4, 1, 40),  # taming's case: the condition grid is the image grid, both windows at the same coordinates
    (4, 2, 24),  # --cond-downsample 2: a 2x2 condition window, half as fine as the image's
    (2, 1, 80),  # a finer condition tokenizer: an 8x8 condition window
])
def test_both_windows_slide_together_as_the_uncached_rule(monkeypatch, f_cond, downsample, block_size):
    model = cond_model(f_cond, block_size, cond_downsample=downsample, cond_embedding="separate")
    canvas = (10, 10)  # image tokens: 40x40 pixels
    hw = model.encode_condition(random_labels(2, (40, 40))).shape[1:]
    assert tuple(hw) == model.cond_canvas_hw(canvas) == (40 // f_cond // downsample,) * 2
    cond = torch.randint(0, KC, (2, *hw), generator=torch.Generator().manual_seed(1))  # every window different
    reference = uncached_reference(model, cond, canvas, f_cond, downsample)
    calls, run = [], model.gpt._run
    monkeypatch.setattr(model.gpt, "_run", lambda idx, kv, pos: calls.append((idx.shape[1], pos)) or run(idx, kv, pos))
    grid = model.sample_canvas(2, canvas, top_k=1, cond=cond)
    assert torch.equal(grid, reference)
    # The cache as without a condition: the prefix (start, condition window, tokens so far) runs once per window
    # move, 7 times per row of 10 tokens (column origins 0 0 0 1 2 3 4 5 6 6); the 3 others are single cached steps.
    assert sum(pos == 0 for _, pos in calls) == 70 and [T for T, pos in calls if pos > 0] == [1] * 30
    assert {T for T, pos in calls if pos == 0} >= {model.prefix_length}  # a window's first token: the prefix alone


def test_condition_window_origin_rounds_to_the_nearest_condition_token():
    assert [cond_window_origin(t, 0, (8, 8), (8, 8))[0] for t in range(5)] == [0, 1, 2, 3, 4]  # taming's
    assert [cond_window_origin(t, 0, (8, 8), (4, 4))[0] for t in range(5)] == [0, 1, 1, 2, 2]  # 1.5 rounds up
    assert [cond_window_origin(0, t, (8, 8), (16, 16))[1] for t in range(3)] == [0, 2, 4]


def test_a_condition_that_does_not_cover_the_canvas_is_refused():
    model = cond_model(4, 24, cond_downsample=2)
    with pytest.raises(ValueError, match="A canvas of 5x4 image tokens has no whole condition grid"):
        model.sample_canvas(1, (5, 4), cond=torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"The condition's 2x2 tokens do not cover a canvas of 6x4 image tokens"):
        model.sample_canvas(1, (6, 4), cond=torch.zeros(1, 2, 2, dtype=torch.long))


def test_training_size_canvas_is_sample_indices_token_for_token():
    model = cond_model(num_classes=2)
    cond, labels = torch.randint(0, KC, (2, 4, 4)), torch.tensor([1, 0])
    torch.manual_seed(4)
    plain = model.sample_indices(2, temperature=1.2, labels=labels, cond=cond)
    torch.manual_seed(4)
    assert torch.equal(model.sample_canvas(2, temperature=1.2, labels=labels, cond=cond).flatten(1), plain)


# ---- our checkpoints ----

def write_conditional_checkpoints(tmp_path, kind_on_record="segmentation"):
    model = cond_model(cond_dropout=0.1)
    paths = {name: tmp_path / f"{name}.pt" for name in ("vqgan", "labels", "transformer")}
    save_checkpoint(dict(model=model.vqgan.state_dict(), config=asdict(model.vqgan.config), step=0), paths["vqgan"])
    save_checkpoint(dict(model=model.cond_vqgan.state_dict(), config=asdict(model.cond_vqgan.config), step=0),
                    paths["labels"])
    save_checkpoint(dict(model=model.gpt.state_dict(), config=asdict(model.config), step=0,
                         vqgan_checkpoint=str(paths["vqgan"]), cond_checkpoint=str(paths["labels"]),
                         cond_kind=kind_on_record), paths["transformer"])
    return model, paths


def test_checkpoint_brings_back_its_condition_tokenizer(tmp_path):
    model, paths = write_conditional_checkpoints(tmp_path)
    loaded = VQGANTransformer.from_checkpoint(paths["transformer"])
    assert loaded.cond_kind == "segmentation" and loaded.cond_hw == (4, 4)
    c = random_labels(2, (16, 16))
    assert torch.equal(loaded.encode_condition(c), model.encode_condition(c))
    indices = torch.randint(0, K, (2, 16))
    torch.testing.assert_close(loaded(indices, cond=loaded.encode_condition(c))[0],
                               model(indices, cond=model.encode_condition(c))[0])

    with pytest.raises(CheckpointError, match=r"The condition tokenizer .*vqgan.pt reads rgb images, but the stage-2 "
                                              r"model .*transformer.pt was trained on segmentation conditions"):
        VQGANTransformer.from_checkpoint(paths["transformer"], cond_path=paths["vqgan"])
    with pytest.raises(CheckpointError, match=r"transformer.pt is a stage-2 \(transformer\) checkpoint, which .*; "
                                              r"--cond-checkpoint needs a stage-1 checkpoint from training_vqgan.py"):
        VQGANTransformer.from_checkpoint(paths["transformer"], cond_path=paths["transformer"])
    paths["labels"].rename(tmp_path / "moved.pt")
    with pytest.raises(CheckpointError, match=r"The condition tokenizer .*labels.pt that .* was trained with is "
                                              r"missing; pass its new place with --cond-checkpoint"):
        VQGANTransformer.from_checkpoint(paths["transformer"])
    assert VQGANTransformer.from_checkpoint(paths["transformer"], cond_path=tmp_path / "moved.pt").cond_kind \
        == "segmentation"
