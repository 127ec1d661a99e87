"""The maskgit objective (maskgit.py): bidirectional attention, the cosine masking schedule, the loss on masked tokens,
iterative decoding (its schedule, kept tokens, the greedy order, guidance), and the scripts on a maskgit checkpoint."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_transformer
import maskgit
import sample_transformer
import training_transformer
from checkpoint import load_checkpoint
from demo_flowers import make_demo_flowers
from helpers import STAGE2_FLAGS, script_error, write_tiny_checkpoints
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN, VQGANConfig

# 16x16 images, f = 4: a 4x4 grid of 16 tokens, 32 codes
SMALL_VQGAN = VQGANConfig(image_size=16, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(4,),
                          z_channels=16, latent_dim=8, num_codebook_vectors=32)
SMALL_GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=17)
K = 32


def small_model(objective="maskgit", **config):
    """A small stage-2 model whose random weights make the most likely code depend on the position and the other
    tokens (larger weights throughout would predict one code everywhere)."""
    torch.manual_seed(0)
    model = VQGANTransformer(VQGAN(SMALL_VQGAN), TransformerConfig(**SMALL_GPT, objective=objective, **config)).eval()
    for p in model.gpt.blocks.parameters():
        if p.dim() > 1:
            p.data.normal_(0.0, 0.15)
    model.gpt.pos_emb.data.normal_(0.0, 1.0)  # it starts at zero: positions would not matter
    model.gpt.tok_emb.weight.data.normal_(0.0, 1.0)
    model.gpt.head.weight.data.normal_(0.0, 0.3)
    return model


def record_inputs(monkeypatch, model):
    """The token batches the GPT reads, in order."""
    seen, forward = [], model.gpt.forward
    monkeypatch.setattr(model.gpt, "forward",
                        lambda idx, targets=None: seen.append(idx.clone()) or forward(idx, targets))
    return seen


# ---- the model ----

def test_maskgit_attention_is_bidirectional_and_ar_attention_is_not():
    for objective, later_changes_earlier in (("maskgit", True), ("ar", False)):
        model = small_model(objective)
        tokens = torch.randint(0, K, (2, 16))
        changed = tokens.clone()
        changed[:, -1] = (tokens[:, -1] + 1) % K  # only the last token
        earlier, earlier_changed = model.gpt(tokens)[0][:, :-1], model.gpt(changed)[0][:, :-1]
        assert model.gpt.config.causal is not later_changes_earlier
        assert (not torch.allclose(earlier, earlier_changed)) is later_changes_earlier, objective


def test_vocabulary_ends_with_the_mask_token_and_only_a_class_token_takes_a_place():
    model = small_model()
    assert model.mask_token == K + 1 and model.gpt.config.vocab_size == K + 2  # codes, start token, [MASK]
    cond = small_model(num_classes=3, class_dropout=0.1)
    assert cond.null_token == K + 3 and cond.mask_token == K + 4 and cond.gpt.config.vocab_size == K + 5
    assert small_model("ar").mask_token is None and small_model("ar").gpt.config.vocab_size == K + 1
    with pytest.raises(ValueError, match="block_size 16 is smaller than the 16 tokens of a 4x4 latent grid .*class "
                                         "token"):
        VQGANTransformer(VQGAN(SMALL_VQGAN), TransformerConfig(**{**SMALL_GPT, "block_size": 16}, objective="maskgit",
                                                               num_classes=2))
    VQGANTransformer(VQGAN(SMALL_VQGAN), TransformerConfig(**{**SMALL_GPT, "block_size": 16}, objective="maskgit"))
    with pytest.raises(ValueError, match="label_smoothing is a setting of the maskgit objective"):
        TransformerConfig(label_smoothing=0.1)


def test_mask_ratio_follows_the_cosine_schedule(monkeypatch):
    """Over many sequences, the share of [MASK] inputs has the distribution of cos(pi/2 r), r ~ U(0, 1): its quantile
    q is cos(pi/2 (1 - q)) (a uniform ratio would put the median at 0.5, not 0.71)."""
    model = small_model().train()
    seen = []
    monkeypatch.setattr(model.gpt, "forward", lambda idx, targets=None: seen.append(idx) or  # no compute: logits 0
                        (torch.zeros(*idx.shape, K + 2), None))
    torch.manual_seed(1)
    model(torch.randint(0, K, (20000, 16)))
    shares = (seen[0] == model.mask_token).float().mean(dim=1)  # ceil(ratio x 16) / 16: at most 1/16 above the ratio
    assert shares.min() >= 1 / 16  # at least one masked token per sequence
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert shares.quantile(q).item() == pytest.approx(math.cos(math.pi / 2 * (1 - q)), abs=1 / 16 + 0.01), q
    assert shares.mean().item() == pytest.approx(2 / math.pi + 1 / 32, abs=0.01)  # E cos(pi/2 r) = 2/pi


def test_the_loss_counts_masked_positions_only():
    model = small_model()
    targets = torch.randint(0, K, (3, 16))
    masked = torch.rand(3, 16) < 0.4
    masked[:, 0] = True
    logits, loss = maskgit.masked_token_loss(model.gpt, None, targets, targets, masked, model.mask_token, K,
                                             label_smoothing=0.1)
    expected = F.cross_entropy(logits[masked], targets[masked], label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    other = torch.where(masked, targets, (targets + 1) % K)  # other tokens where nothing is masked: same input ...
    same_input = maskgit.masked_token_loss(model.gpt, None, targets, other, masked, model.mask_token, K, 0.1)[1]
    torch.testing.assert_close(same_input, loss)  # ... and only those targets changed: the same loss
    flipped = targets.clone()
    flipped[0, 0] = (targets[0, 0] + 1) % K  # a masked target
    assert maskgit.masked_token_loss(model.gpt, None, targets, flipped, masked, model.mask_token, K, 0.1)[1] != loss


def test_validation_masks_fixed_ratios_at_the_same_positions():
    model = small_model()
    indices = torch.randint(0, K, (4, 16))
    first = model.validation_losses(indices, generator=torch.Generator().manual_seed(0))
    again = model.validation_losses(indices, generator=torch.Generator().manual_seed(0))
    assert list(first) == ["val_loss_mask50", "val_loss_mask90"] and first == again
    masked = maskgit.random_mask(torch.full((4,), 0.9), 16, torch.Generator().manual_seed(0))
    assert masked.sum(dim=1).tolist() == [15] * 4  # ceil(0.9 x 16)


# ---- decoding ----

def test_schedule_is_maskgit_cosine_with_one_token_per_pass_at_least():
    assert maskgit.masked_after(256, 8) == [math.floor(256 * math.cos(math.pi / 2 * t / 8)) for t in range(1, 9)]
    assert maskgit.masked_after(256, 8) == [251, 236, 212, 181, 142, 97, 49, 0]
    assert maskgit.masked_after(16, 16) == list(range(15, -1, -1))  # one token per pass
    assert maskgit.masked_after(3, 8) == [2, 1, 0]  # never a pass that fixes nothing


def test_decoding_fixes_the_scheduled_number_and_never_changes_a_known_or_fixed_token(monkeypatch):
    model = small_model()
    seen = record_inputs(monkeypatch, model)
    codes = torch.randint(0, K, (3, 4, 4))
    regenerate = torch.rand(4, 4) < 0.8
    regenerate[0, 0], regenerate[3, 3] = True, False
    n = int(regenerate.sum())
    torch.manual_seed(2)
    grid = maskgit.sample_canvas(model, 3, codes=codes, regenerate=regenerate, steps=5, top_k=8)
    counts = maskgit.masked_after(n, 5)
    assert len(seen) == len(counts)  # one forward per pass
    passes = [x.view(3, 4, 4) for x in seen] + [grid]
    for t, tokens in enumerate(passes):
        masked = tokens == model.mask_token
        assert masked.sum(dim=(1, 2)).tolist() == [([n] + counts)[t]] * 3  # exactly the schedule's count is left
        assert not masked[:, ~regenerate].any() and torch.equal(tokens[:, ~regenerate], codes[:, ~regenerate])
        for later in passes[t + 1:]:
            assert torch.equal(later[~masked], tokens[~masked])  # a token once fixed stays as it is
    assert grid.max() < K


def test_as_many_steps_as_tokens_with_greedy_choice_is_a_fixed_order():
    """Each pass fixes the one unknown token whose most likely code is the most probable, as this loop does."""
    model = small_model(num_classes=2)
    labels = torch.tensor([1, 0])
    tokens, first_guess = torch.full((2, 16), model.mask_token), None
    for _ in range(16):
        logits = model.gpt(torch.cat([model.start_tokens(2, labels), tokens], dim=1))[0][:, 1:, :K]
        best_p, best_code = logits.softmax(dim=-1).max(dim=-1)  # (2, 16)
        first_guess = best_code if first_guess is None else first_guess
        best_p[tokens != model.mask_token] = -1
        where = best_p.argmax(dim=1)
        tokens[torch.arange(2), where] = best_code[torch.arange(2), where]
    assert (tokens != first_guess).sum() > 8  # the codes depend on those fixed before: the order matters
    grid = maskgit.sample_canvas(model, 2, steps=16, top_k=1, choice_temperature=0.0, labels=labels)
    assert torch.equal(grid.flatten(1), tokens)


def test_cfg_scale_1_is_plain_conditional_sampling(monkeypatch):
    model = small_model(num_classes=3, class_dropout=0.1)
    labels = torch.tensor([2, 0])
    torch.manual_seed(3)
    plain = maskgit.sample_canvas(model, 2, labels=labels, top_k=5)
    seen = record_inputs(monkeypatch, model)
    torch.manual_seed(3)
    guided = maskgit.sample_canvas(model, 2, labels=labels, top_k=5, cfg_scale=1.0)
    assert torch.equal(guided, plain)
    assert {len(x) for x in seen} == {2}  # scale 1 never runs the null rows: the conditional logits, bit for bit


def test_guidance_mixes_conditional_and_null_logits_in_one_forward(monkeypatch):
    model = small_model(num_classes=3, class_dropout=0.1)
    seen, drawn = record_inputs(monkeypatch, model), []
    sample_next = maskgit.sample_next
    monkeypatch.setattr(maskgit, "sample_next", lambda logits, *a: drawn.append(logits) or sample_next(logits, *a))
    maskgit.sample_canvas(model, 2, labels=torch.tensor([1, 2]), cfg_scale=3.0, steps=4)
    assert [len(x) for x in seen] == [4] * 4  # one forward per pass, conditional and null rows together
    everything_masked = torch.full((2, 16), model.mask_token)
    cond = model.gpt(torch.cat([torch.tensor([[K + 1], [K + 2]]), everything_masked], dim=1))[0][:, 1:, :K]
    uncond = model.gpt(torch.cat([torch.full((2, 1), K + 3), everything_masked], dim=1))[0][:, 1:, :K]
    torch.testing.assert_close(drawn[0].view(2, 16, K), uncond + 3.0 * (cond - uncond))


def test_a_larger_canvas_is_filled_window_by_window(monkeypatch):
    """A 6x9-token canvas of 4x4 windows: rows start at 0 and 2, columns at 0, 2, 4 and 5 (the last flush with the
    edge); a window reads what earlier windows drew, and one with nothing left to draw is skipped."""
    assert maskgit.window_origins(6, 4) == [0, 2] and maskgit.window_origins(9, 4) == [0, 2, 4, 5]
    assert maskgit.window_origins(4, 4) == [0]
    model = small_model()
    seen = record_inputs(monkeypatch, model)
    grid = maskgit.sample_canvas(model, 2, (6, 9), steps=3)
    assert grid.shape == (2, 6, 9) and grid.max() < K
    masked_first = [int((x[0] == model.mask_token).sum()) for x in seen[::3]]  # each window's first pass
    assert masked_first == [16, 8, 8, 4, 8, 4, 4, 2]  # 8 windows: all 16, then what the earlier ones left


# ---- the scripts ----

def sample(path, out, *flags):
    args = sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(path), "--out-dir", str(out), "--device", "cpu", "--num-samples", "2",
         *map(str, flags)])
    sample_transformer.main(args)
    return torch.load(out / "indices.pt", weights_only=True)


def test_inpainting_and_outpainting_keep_every_input_token(tmp_path):
    model, _, path = write_tiny_checkpoints(tmp_path, objective="maskgit")  # an 8x8 grid of 64 codes
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "input.png")
    codes = model.encode_to_grid(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:8] = 255  # the second token row
    mask[20, 9] = 255  # token (5, 2)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    grid = sample(path, tmp_path / "in", "--input-image", tmp_path / "input.png", "--mask", tmp_path / "mask.png",
                  "--steps", "2")
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[1], keep[5, 2] = False, False
    assert torch.equal(grid[:, keep], codes[:, keep].expand(2, -1))
    grid = sample(path, tmp_path / "out", "--input-image", tmp_path / "input.png", "--pad", "4", "0", "8", "4",
                  "--choice-temperature", "2")
    assert grid.shape == (2, 9, 11) and torch.equal(grid[:, :8, 1:9], codes.expand(2, -1, -1))


def test_sampling_flags_are_one_sentence(tmp_path, capsys):
    _, _, ar = write_tiny_checkpoints(tmp_path / "ar")
    _, _, mg = write_tiny_checkpoints(tmp_path / "mg", objective="maskgit")
    out = ["--out-dir", tmp_path / "s", "--device", "cpu", "--num-samples", "1"]
    for path, flags, message in [
            (ar, ["--steps", "8"], "--steps set the iterative decoding of maskgit checkpoints; this one is "
                                   "autoregressive"),
            (mg, ["--steps", "0"], "--steps must be between 1 and the 64 tokens of the model's grid, got 0."),
            (mg, ["--steps", "65"], "--steps must be between 1 and the 64 tokens"),
            (mg, ["--compile"], "--compile compiles the one-token step of autoregressive sampling")]:
        assert message in script_error(sample_transformer, ["--checkpoint-path", path, *out, *flags], capsys)


@pytest.fixture(scope="module")
def maskgit_run(tmp_path_factory):
    """training_transformer.py --objective maskgit for 2 steps on the tiny VQGAN (validated, samples drawn), then
    resumed to 3: (its folder, the flags, the stage-1 checkpoint, the data)."""
    tmp_path = tmp_path_factory.mktemp("maskgit_run")
    data = make_demo_flowers(tmp_path / "flowers", num_images=12, size=32)
    _, stage1, _ = write_tiny_checkpoints(tmp_path / "tiny")
    out = tmp_path / "run"
    flags = [*STAGE2_FLAGS, "--dataset-path", str(data), "--checkpoint-path", str(stage1), "--out-dir", str(out),
             "--objective", "maskgit", "--val-fraction", "0.2", "--sample-every", "2", "--threads", "1"]
    parser = training_transformer.build_parser()
    training_transformer.main(parser.parse_args([*flags, "--max-steps", "2"]))
    training_transformer.main(parser.parse_args([*flags, "--max-steps", "3", "--resume"]))
    return out, flags, stage1, data


@pytest.mark.xdist_group("maskgit_run")
def test_training_records_the_objective_and_validates_at_fixed_ratios(maskgit_run):
    out, _, _, _ = maskgit_run
    ckpt = load_checkpoint(out / "checkpoints" / "transformer_last.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["objective"] == "maskgit"
    assert ckpt["config"]["label_smoothing"] == maskgit.DEFAULT_LABEL_SMOOTHING
    assert ckpt["model"]["tok_emb.weight"].shape[0] == 64 + 2  # codes, the start token and [MASK]
    records = [json.loads(line) for line in (out / "results" / "transformer_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"val_loss_mask50", "val_loss_mask90"} <= set(records[1]) and "bits_per_token" not in records[0]
    assert (out / "results" / "transformer_samples_0000002.png").is_file()


@pytest.mark.xdist_group("maskgit_run")
def test_the_objective_cannot_change_on_resume(maskgit_run, capsys):
    out, flags, _, _ = maskgit_run
    message = script_error(training_transformer, [*flags, "--objective", "ar", "--resume", "--max-steps", "4"], capsys)
    assert message == (f"--resume continues the run of {out / 'checkpoints' / 'transformer_last.pt'} with its own "
                       f"--objective; start a new run with another --out-dir to change them.")


@pytest.mark.xdist_group("maskgit_run")
def test_label_smoothing_is_refused_without_maskgit(maskgit_run, capsys, tmp_path):
    _, flags, _, _ = maskgit_run
    message = script_error(training_transformer, [*flags, "--objective", "ar", "--label-smoothing", "0.1",
                                                  "--out-dir", tmp_path], capsys)
    assert message == "--label-smoothing is a setting of the maskgit objective (--objective maskgit)."


@pytest.mark.xdist_group("maskgit_run")
def test_eval_reports_the_masked_token_losses_in_place_of_bits(maskgit_run, tmp_path):
    pytest.importorskip("torch_fidelity")
    out, _, _, data = maskgit_run
    ckpt = out / "checkpoints" / "transformer_last.pt"
    args = eval_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(ckpt), "--reference", str(data), "--num-samples", "4", "--batch-size", "8",
         "--device", "cpu", "--num-workers", "0", "--threads", "1", "--features", "random-conv", "--num-grid", "0",
         "--steps", "3", "--out-json", str(tmp_path / "m.json")])
    result = eval_transformer.main(args)
    assert result["val_bits_per_token"] is None and result["val_loss"] is None
    assert result["sampling"]["steps"] == 3 and result["sampling"]["choice_temperature"] == 4.5
    assert isinstance(result["fid"], float)
    # by hand: the 12 reference crops in two batches (8 + 4), masks from a generator seeded 0, no label smoothing
    model = VQGANTransformer.from_checkpoint(ckpt)
    x = torch.stack([item["image"] for item in eval_transformer.ImageFolder(data, 32, train=False)])
    generator, totals = torch.Generator().manual_seed(0), {}
    for batch in (x[:8], x[8:]):
        for name, loss in model.validation_losses(model.encode_to_indices(batch), generator=generator).items():
            totals[name] = totals.get(name, 0.0) + loss.item() * len(batch)
    for name in ("val_loss_mask50", "val_loss_mask90"):
        assert result[name] == pytest.approx(totals[name] / 12, rel=1e-5)
