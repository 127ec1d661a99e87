"""Sampling beyond one image: the sliding-window canvas, completion (mask and pad), classifier-free guidance."""
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import sample_transformer
import transformer
from checkpoint import save_checkpoint
from config import config_from_dict
from data import DataError
from transformer import TransformerConfig, VQGANTransformer, window_origin
from vqgan import VQGAN, VQGANConfig

# 16x16 images, f = 4: a 4x4 token window, so a 10x9-token canvas has border, edge and interior tokens
TINY_VQGAN = VQGANConfig(image_size=16, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(4,),
                         z_channels=16, latent_dim=8, num_codebook_vectors=32)
TINY_GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)
K = 32


def tiny_model(**config):
    """A tiny stage-2 model whose random weights are large enough that every logit depends on its context."""
    torch.manual_seed(0)
    model = VQGANTransformer(VQGAN(TINY_VQGAN), TransformerConfig(**TINY_GPT, **config)).eval()
    for p in model.gpt.parameters():
        p.data.normal_(0.0, 0.3)  # pos_emb starts at zero: positions would not matter
    return model


def write_checkpoints(tmp_path, **config):
    """The tiny model's stage-1 and stage-2 checkpoints, as the training scripts write them."""
    model = tiny_model(**config)
    vq_path, path = tmp_path / "vqgan.pt", tmp_path / "transformer.pt"
    save_checkpoint(dict(model=model.vqgan.state_dict(), config=asdict(TINY_VQGAN), step=0), vq_path)
    classes = [f"class{c}" for c in range(model.num_classes)] or None
    save_checkpoint(dict(model=model.gpt.state_dict(), config=asdict(model.config), step=0,
                         vqgan_checkpoint=str(vq_path), classes=classes), path)
    return model, path


def run_script(path, out, *flags):
    args = sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(path), "--out-dir", str(out), "--device", "cpu", "--num-samples", "2", *flags])
    sample_transformer.main(args)
    return torch.load(out / "indices.pt", weights_only=True)


def constant_draw(monkeypatch, code=K - 1):
    """Every sampled token becomes `code`, so that kept and resampled tokens can be told apart exactly."""
    monkeypatch.setattr(transformer, "sample_next", lambda logits, *a, **k: torch.full((len(logits), 1), code))


# ---- the sliding window ----

@pytest.mark.parametrize("token, origin", [
    ((0, 0), (0, 0)), ((2, 2), (0, 0)),  # top-left corner: the window stays put, the token moves inside it
    ((3, 3), (1, 1)), ((5, 4), (3, 2)),  # interior: the token sits at the window's centre (2, 2)
    ((1, 8), (0, 5)), ((9, 0), (6, 0)),  # top edge at the right end, bottom edge at the left end
    ((8, 7), (6, 5)), ((9, 8), (6, 5)),  # bottom-right corner
])
def test_window_origin_follows_taming(token, origin):
    assert window_origin(*token, (10, 9), (4, 4)) == origin
    assert window_origin(*token[::-1], (9, 10), (4, 4)) == origin[::-1]  # the same rule for columns


def test_training_size_is_ordinary_sampling_token_for_token():
    model = tiny_model(num_classes=3)
    labels = torch.tensor([0, 2, 1])
    torch.manual_seed(1)
    plain = model.sample_indices(3, temperature=1.3, top_p=0.95, labels=labels)
    torch.manual_seed(1)
    canvas = model.sample_canvas(3, temperature=1.3, top_p=0.95, labels=labels)
    assert canvas.shape == (3, 4, 4) and canvas.dtype == torch.int64
    assert torch.equal(canvas.flatten(1), plain)


def taming_reference(model, canvas_hw, n):
    """Greedy sliding-window sampling written as taming's loop: the whole window through the GPT, no cache."""
    (H, W), (h, w) = canvas_hw, model.latent_hw
    grid = torch.zeros(n, H, W, dtype=torch.long)
    for i in range(H):
        local_i = i if i <= h // 2 else h - (H - i) if H - i < h // 2 else h // 2
        for j in range(W):
            local_j = j if j <= w // 2 else w - (W - j) if W - j < w // 2 else w // 2
            patch = grid[:, i - local_i:i - local_i + h, j - local_j:j - local_j + w].flatten(1)
            tokens = torch.cat([model.start_tokens(n), patch[:, :-1]], dim=1)
            logits, _ = model.gpt(tokens)
            grid[:, i, j] = logits[:, local_i * w + local_j, :K].argmax(-1)
    return grid


def test_every_token_sees_the_window_of_the_rule(monkeypatch):
    model = tiny_model()
    reference = taming_reference(model, (10, 9), 2)
    seen, calls = {}, []
    next_logits = transformer.WindowCache.next_logits

    def spy(cache, tokens, origin):
        seen[len(seen)] = (origin, tokens.clone())
        return next_logits(cache, tokens, origin)
    monkeypatch.setattr(transformer.WindowCache, "next_logits", spy)
    run = model.gpt._run
    monkeypatch.setattr(model.gpt, "_run", lambda idx, kv, pos: calls.append((idx.shape[1], pos)) or run(idx, kv, pos))
    grid = model.sample_canvas(2, (10, 9), top_k=1)

    assert torch.equal(grid, reference)
    by_token = {divmod(t, 9): v for t, v in seen.items()}  # raster order
    for (i, j), origin in {(0, 0): (0, 0), (1, 8): (0, 5), (9, 0): (6, 0), (5, 4): (3, 2), (9, 8): (6, 5)}.items():
        seen_origin, tokens = by_token[(i, j)]
        p = (i - origin[0]) * 4 + j - origin[1]
        assert seen_origin == origin and tokens.shape == (2, 1 + p)
        assert torch.equal(tokens[:, 1:], grid[:, origin[0]:origin[0] + 4, origin[1]:origin[1] + 4].flatten(1)[:, :p])
    # The window's column origins along a row are 0 0 0 1 2 3 4 5 5: it moves 6 times per row (once at the row's
    # start), so 6 prefixes run from position 0 and the 3 other tokens are single cached steps.
    assert sum(pos == 0 for _, pos in calls) == 60
    assert [T for T, pos in calls if pos > 0] == [1] * 30


# ---- completion: mask and pad ----

def input_png(tmp_path, size):
    """A random RGB PNG of size (H, W) and the same image as (1, 3, H, W) in [-1, 1]."""
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "input.png")
    return tmp_path / "input.png", torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_mask_keeps_every_unmasked_token(tmp_path, monkeypatch):
    model, path = write_checkpoints(tmp_path)
    image, x = input_png(tmp_path, (24, 20))
    mask = np.zeros((24, 20), dtype=np.uint8)
    mask[:4] = 255  # the whole top token row
    mask[10, 5] = 200  # one light pixel: token (2, 1)
    mask[20:, 16:] = 100  # dark grey: not white, kept
    Image.fromarray(mask).save(tmp_path / "mask.png")
    constant_draw(monkeypatch)
    grid = run_script(path, tmp_path / "out", "--size", "24", "20", "--input-image", str(image),
                      "--mask", str(tmp_path / "mask.png"))
    regenerate = torch.zeros(6, 5, dtype=torch.bool)
    regenerate[0], regenerate[2, 1] = True, True
    codes = model.encode_to_grid(x)
    assert grid.shape == (2, 6, 5) and grid.dtype == torch.int64
    assert torch.equal(grid, torch.where(regenerate, K - 1, codes).expand(2, -1, -1))
    assert (codes[0][regenerate] != K - 1).any()  # the regenerated tokens did change
    assert (tmp_path / "out" / "masked_input.png").exists()


def test_pad_outpaints_around_the_input_with_a_class(tmp_path, monkeypatch):
    model, path = write_checkpoints(tmp_path, num_classes=2)
    image, x = input_png(tmp_path, (16, 16))
    constant_draw(monkeypatch)
    grid = run_script(path, tmp_path / "out", "--input-image", str(image), "--pad", "4", "0", "8", "4",
                      "--class-id", "1")
    expected = torch.full((2, 5, 7), K - 1)
    expected[:, :4, 1:5] = model.encode_to_grid(x)  # left 1 token, top 0, right 2, bottom 1
    assert torch.equal(grid, expected)


def test_input_image_is_resized_to_cover_and_centre_cropped(tmp_path):
    red_sides = np.zeros((20, 80, 3), dtype=np.uint8)
    red_sides[:, :, 2] = 255
    red_sides[:, :20], red_sides[:, 60:] = (255, 0, 0), (255, 0, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(red_sides).save(path)
    x = sample_transformer.load_input_image(path, (8, 12))  # 20x80 -> 8x32, then the middle 12 columns
    assert x.shape == (1, 3, 8, 12)
    assert (x[0, 2] > 0.95).all() and (x[0, 0] < -0.95).all()  # all blue: the red sides are cropped away


# ---- classifier-free guidance and the null class ----

def test_cfg_scale_1_is_plain_conditional_sampling(monkeypatch):
    model = tiny_model(num_classes=3, class_dropout=0.1)
    labels, batches = torch.tensor([2, 0]), []
    for canvas in (None, (6, 5)):
        torch.manual_seed(3)
        plain = model.sample_canvas(2, canvas, labels=labels)
        torch.manual_seed(3)
        run = model.gpt._run
        monkeypatch.setattr(model.gpt, "_run", lambda idx, kv, pos: batches.append(len(idx)) or run(idx, kv, pos))
        guided = model.sample_canvas(2, canvas, labels=labels, cfg_scale=1.0)
        monkeypatch.undo()
        assert torch.equal(guided, plain)
    assert set(batches) == {2}  # scale 1 never runs the null rows: the conditional logits, bit for bit


def test_guidance_mixes_conditional_and_null_logits_in_one_forward(monkeypatch):
    model = tiny_model(num_classes=3, class_dropout=0.1)
    drawn, batches = [], []
    monkeypatch.setattr(transformer, "sample_next", lambda logits, *a, **k: drawn.append(logits) or
                        logits.argmax(-1, keepdim=True))
    run = model.gpt._run
    monkeypatch.setattr(model.gpt, "_run", lambda idx, kv=None, pos=0: batches.append(len(idx)) or run(idx, kv, pos))
    model.sample_canvas(2, labels=torch.tensor([1, 2]), cfg_scale=3.0)
    assert batches == [4] * 16  # one forward per token, conditional and null rows together
    cond = model.gpt(torch.tensor([[K + 1], [K + 2]]))[0][:, -1, :K]
    uncond = model.gpt(torch.tensor([[K + 3], [K + 3]]))[0][:, -1, :K]  # the null class is K + num_classes
    torch.testing.assert_close(drawn[0], uncond + 3.0 * (cond - uncond))


def test_null_class_is_used_at_the_class_dropout_rate(monkeypatch):
    model = tiny_model(num_classes=3, class_dropout=0.25)
    assert model.gpt.config.vocab_size == K + 3 + 1 and model.null_token == K + 3
    assert tiny_model(num_classes=3).gpt.config.vocab_size == K + 3  # no null class: the old vocabulary
    old = {k: v for k, v in asdict(model.config).items() if k != "class_dropout"}
    assert config_from_dict(TransformerConfig, old).class_dropout == 0.0  # old checkpoints load as they were
    starts = []
    monkeypatch.setattr(model.gpt, "forward", lambda tokens, targets=None: starts.append(tokens[:, 0]) or
                        (torch.zeros(*tokens.shape, model.gpt.config.vocab_size), None))
    labels = torch.randint(0, 3, (4000,))
    model.train()(torch.zeros(4000, 16, dtype=torch.long), labels)
    null = starts[0] == K + 3
    assert null.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(starts[0][~null], K + labels[~null])  # every other row keeps its class
    model.eval()(torch.zeros(4000, 16, dtype=torch.long), labels)
    assert torch.equal(starts[1], K + labels)  # never at evaluation


def test_class_dropout_needs_classes():
    with pytest.raises(ValueError, match="class_dropout needs a class-conditional model"):
        TransformerConfig(**TINY_GPT, class_dropout=0.1)


# ---- one-sentence errors ----

def test_bad_inputs_are_one_sentence(tmp_path):
    _, path = write_checkpoints(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--size 18 16 must be a multiple of the downsampling factor 4"):
        run_script(path, out, "--size", "18", "16")
    with pytest.raises(ValueError, match="without a null class or a null condition, so it cannot use --cfg-scale"):
        run_script(path, out, "--cfg-scale", "2")
    image, _ = input_png(tmp_path, (16, 16))
    Image.new("L", (16, 20)).save(tmp_path / "mask.png")
    with pytest.raises(ValueError, match=r"The mask .*mask.png is 20x16 pixels; it must be the canvas size, 16x16"):
        run_script(path, out, "--input-image", str(image), "--mask", str(tmp_path / "mask.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"Cannot read the input image .*broken.png \(not an image"):
        run_script(path, out, "--input-image", str(tmp_path / "broken.png"), "--pad", "4", "4", "4", "4")
    with pytest.raises(DataError, match=r"Cannot read the input image .*missing.png \(No such file"):
        run_script(path, out, "--input-image", str(tmp_path / "missing.png"), "--pad", "4", "4", "4", "4")
