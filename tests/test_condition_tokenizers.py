"""Condition tokenizers in stage 1 (--image-kind gray and segmentation): taming parity of the segmentation model, the
BCE loss, the training script, evaluation by pixel accuracy and mean IoU."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

import eval_vqgan
import training_vqgan
from checkpoint import load_checkpoint
from cli import config_from_flags, run_script
from data import ImageFolder
from demo_flowers import FLOWER_LABELS, make_demo_flowers
from discriminator import Discriminator
from helpers import TINY, TINY_FLAGS, script_error
from loss import LossConfig, Stage1, reconstruction_losses, train_step
from runtime import make_scaler
from utils import label_palette
from vqgan import VQGAN, VQGANConfig

COND_FIXTURES = Path(__file__).parent / "fixtures" / "taming_cond_tiny"
NUM_LABELS = len(FLOWER_LABELS)
_at = TINY_FLAGS.index("--perceptual-loss-factor")
KIND_FLAGS = TINY_FLAGS[:_at] + TINY_FLAGS[_at + 2:]  # that flag's default depends on --image-kind


# ---- taming's models ----

def test_segmentation_stage_matches_taming_reference():
    """The cond_stage_model of taming's Net2NetTransformer fixture (a VQSegmentationModel, 5 labels) loads as a
    segmentation VQGAN that gives taming's logits and tokens for the one-hot label maps."""
    model = VQGAN.from_taming(COND_FIXTURES / "last.ckpt", COND_FIXTURES / "model.yaml", stage="cond_stage")
    ref = torch.load(COND_FIXTURES / "reference_outputs.pt", weights_only=True)
    assert (model.config.image_kind, model.config.num_labels, model.config.in_channels) == ("segmentation", 5, 5)
    assert not model.training
    c = torch.nn.functional.one_hot(ref["labels"], 5).permute(0, 3, 1, 2).float()
    assert torch.equal(c, ref["c"])
    with torch.no_grad():
        logits, indices, _ = model(c)
    torch.testing.assert_close(logits, ref["cond_reconstruction"], atol=1e-5, rtol=0)
    assert torch.equal(indices.flatten(1), ref["c_indices"])  # (B, 16), row-major as taming's
    first = VQGAN.from_taming(COND_FIXTURES / "last.ckpt", COND_FIXTURES / "model.yaml", stage="first_stage")
    assert first.config.image_kind == "rgb"
    with torch.no_grad():
        assert torch.equal(first.encode(ref["x"])[1].flatten(1), ref["z_indices"])


def test_a_net2net_config_needs_the_stage_named():
    with pytest.raises(ValueError, match="first_stage or cond_stage"):
        VQGAN.from_taming(COND_FIXTURES / "last.ckpt", COND_FIXTURES / "model.yaml")


def test_a_one_channel_taming_vqmodel_loads_as_gray(tmp_path):
    """A VQModel with in_channels 1 (taming's depth stage), written in taming's layout, loads as gray, same weights."""
    torch.manual_seed(0)
    ours = VQGAN(VQGANConfig(**TINY, image_kind="gray")).eval()
    ddconfig = dict(double_z=False, z_channels=32, resolution=32, in_channels=1, out_ch=1, ch=32, ch_mult=[1, 2, 2],
                    num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    params = dict(embed_dim=16, n_embed=64, ddconfig=ddconfig)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                                   "params": params}}))
    torch.save({"state_dict": ours.state_dict()}, tmp_path / "last.ckpt")
    loaded = VQGAN.from_taming(tmp_path / "last.ckpt", tmp_path / "model.yaml")
    assert (loaded.config.image_kind, loaded.config.in_channels) == ("gray", 1)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], ours(x)[0])


# ---- the loss ----

def test_bce_loss_by_hand():
    """Two labels, two pixels: the mean over the four (label, pixel) terms of log(1 + exp(-z)) for a 1 and
    log(1 + exp(z)) for a 0, times --rec-loss-factor; no LPIPS term."""
    x = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # one-hot of the labels (0, 1): (1, 2, 1, 2)
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(-3))) / 4
    config = LossConfig(rec_loss_factor=2.0, perceptual_loss_factor=0.0, disc_factor=0.0, image_kind="segmentation")
    nll, p_loss = reconstruction_losses(x, logits, None, config)
    assert nll.item() == pytest.approx(2 * expected, rel=1e-6) and p_loss.item() == 0


def test_segmentation_step_is_bce_plus_the_codebook_loss():
    """train_step's gradients for label maps are those of BCE(logits, one-hot) + q_loss; the discriminator is idle."""
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(**TINY, image_kind="segmentation", num_labels=NUM_LABELS))
    disc = Discriminator()
    labels = torch.randint(0, NUM_LABELS, (2, 32, 32))
    x = torch.nn.functional.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()
    logits, _, q_loss = vqgan(x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, x) + q_loss
    expected = torch.autograd.grad(loss, list(vqgan.parameters()))
    config = LossConfig(perceptual_loss_factor=0.0, disc_factor=0.0, disc_start=0, image_kind="segmentation")
    metrics = train_step(Stage1(vqgan, disc, None, config, "fp32", scalers=(make_scaler("fp32", x.device),) * 2), x, step=5)
    for (name, p), grad in zip(vqgan.named_parameters(), expected):
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in disc.parameters())
    assert "l1" not in metrics and metrics["bce"].item() == pytest.approx(loss.item() - q_loss.item(), rel=1e-5)
    assert metrics["d_loss"] == 0 and metrics["lam"] == 0


@pytest.mark.parametrize("kind, flags, message", [
    ("gray", ["--perceptual-loss-factor", "1"], "--perceptual-loss-factor must be 0 for --image-kind gray"),
    ("segmentation", ["--num-labels", "4", "--perceptual-loss-factor", "0.5"],
     "--perceptual-loss-factor must be 0 for --image-kind segmentation"),
    ("segmentation", ["--num-labels", "4", "--disc-factor", "1"],
     "--disc-factor must be 0 for --image-kind segmentation, which trains without a GAN"),
    ("segmentation", ["--num-labels", "1"], "--num-labels must be given for --image-kind segmentation"),
    ("gray", ["--num-labels", "3"], "--num-labels only applies to --image-kind segmentation"),
])
def test_impossible_kind_flags_are_refused(tmp_path, capsys, kind, flags, message):
    """Through the entry point: one line, worded by the flags."""
    error = script_error(training_vqgan, KIND_FLAGS + ["--image-kind", kind, *flags, "--dataset-path", tmp_path,
                                                       "--out-dir", tmp_path], capsys)
    assert error.startswith(message), error


def test_loss_defaults_follow_the_image_kind():
    """The flags' None defaults become LossConfig's per-kind values; given values stay."""
    parse = training_vqgan.build_parser().parse_args
    for kind, lpips, gan in (("rgb", 1.0, 1.0), ("gray", 0.0, 1.0), ("segmentation", 0.0, 0.0)):
        config = config_from_flags(LossConfig, parse(["--image-kind", kind]))
        assert (config.perceptual_loss_factor, config.disc_factor) == (lpips, gan), kind
    config = config_from_flags(LossConfig, parse(["--perceptual-loss-factor", "0.5", "--disc-factor", "0"]))
    assert (config.perceptual_loss_factor, config.disc_factor) == (0.5, 0.0)


# ---- the training script and evaluation ----

@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Eight 40x40 demo flowers' label maps, and the same flowers' luminance as 16-bit gray maps."""
    root = tmp_path_factory.mktemp("maps")
    make_demo_flowers(root / "flowers", num_images=8, size=40, segmentation_dir=root / "labels")
    (root / "gray").mkdir()
    for path in sorted((root / "flowers").iterdir()):
        luma = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
        Image.fromarray(luma).save(root / "gray" / path.name)
    return root


@pytest.fixture(scope="module")
def runs(maps, tmp_path_factory):
    """A segmentation tokenizer (4 steps) and a gray one with its GAN on from step 1 (3 steps)."""
    out = tmp_path_factory.mktemp("runs")
    argv = KIND_FLAGS + ["--threads", "1"]
    parse = training_vqgan.build_parser().parse_args
    training_vqgan.main(parse(argv + ["--image-kind", "segmentation", "--num-labels", str(NUM_LABELS),
                                      "--dataset-path", str(maps / "labels"), "--out-dir", str(out / "segmentation"),
                                      "--max-steps", "4", "--sample-every", "4"]))
    training_vqgan.main(parse(argv + ["--image-kind", "gray", "--dataset-path", str(maps / "gray"), "--out-dir",
                                      str(out / "gray"), "--max-steps", "3", "--sample-every", "3",
                                      "--disc-start", "1"]))
    return out


def records(run):
    return [json.loads(line) for line in (run / "results" / "vqgan_metrics.jsonl").read_text().splitlines()]


def test_segmentation_training_writes_a_label_map_tokenizer(runs):
    ckpt = load_checkpoint(runs / "segmentation" / "checkpoints" / "vqgan_last.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["image_kind"] == "segmentation"
    assert ckpt["model"]["encoder.conv_in.weight"].shape[1] == NUM_LABELS  # one-hot in
    assert ckpt["model"]["decoder.conv_out.weight"].shape[0] == NUM_LABELS  # logits out
    assert ckpt["opt_disc"]["state"] == {}  # no GAN
    logged = records(runs / "segmentation")
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all("bce" in r and "l1" not in r for r in logged)
    assert all(r["loss"] == pytest.approx(r["bce"] + r["q_loss"], rel=1e-5) for r in logged)
    assert all(r["lpips"] == 0 and r["d_loss"] == 0 for r in logged)
    # The grid shows label colours only: inputs over the argmax of the logits.
    grid = np.asarray(Image.open(runs / "segmentation" / "results" / "reconstructions_0000004.png").convert("RGB"))
    assert {tuple(c) for c in grid.reshape(-1, 3)} <= {tuple(c) for c in label_palette(NUM_LABELS)}
    assert VQGAN.from_checkpoint(runs / "segmentation" / "checkpoints" / "vqgan_last.pt").config.num_labels == 4


def test_gray_training_has_one_channel_and_its_gan(runs):
    ckpt = load_checkpoint(runs / "gray" / "checkpoints" / "vqgan_last.pt")
    assert ckpt["config"]["image_kind"] == "gray" and ckpt["config"]["in_channels"] == 1
    assert ckpt["model"]["decoder.conv_out.weight"].shape[0] == 1
    assert ckpt["discriminator"]["main.0.weight"].shape[1] == 1  # taming's disc_in_channels 1
    logged = records(runs / "gray")
    assert all(r["lpips"] == 0 and "l1" in r for r in logged) and logged[-1]["d_loss"] > 0
    grid = np.asarray(Image.open(runs / "gray" / "results" / "reconstructions_0000003.png").convert("RGB"))
    assert np.array_equal(grid[..., 0], grid[..., 1]) and np.array_equal(grid[..., 0], grid[..., 2])  # grayscale


def run_eval(tmp_path, *flags):
    args = eval_vqgan.build_parser().parse_args([*flags, "--device", "cpu", "--num-workers", "0", "--batch-size",
                                                 "3", "--out-json", str(tmp_path / "m.json")])
    return eval_vqgan.main(args)


def test_eval_of_a_segmentation_tokenizer(runs, maps, tmp_path, capsys):
    """Pixel accuracy and IoU over the whole set, from the argmax of the logits, in the JSON and the table."""
    ckpt = runs / "segmentation" / "checkpoints" / "vqgan_last.pt"
    metrics = run_eval(tmp_path, "--checkpoint-path", str(ckpt), "--dataset-path", str(maps / "labels"))
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    model = VQGAN.from_checkpoint(ckpt)
    x = torch.stack([item["image"] for item in ImageFolder(maps / "labels", 32, train=False, kind="segmentation",
                                                           num_labels=NUM_LABELS)])
    with torch.no_grad():
        pred, target = model(x)[0].argmax(1), x.argmax(1)
    assert metrics["pixel_accuracy"] == pytest.approx((pred == target).double().mean().item())
    present = sorted(target.unique().tolist())
    ious = [((pred == c) & (target == c)).sum().item() / ((pred == c) | (target == c)).sum().item() for c in present]
    assert metrics["mean_iou"] == pytest.approx(sum(ious) / len(ious))
    assert metrics["psnr"] is None and metrics["lpips"] is None and metrics["rfid"] is None
    out = capsys.readouterr().out
    assert "pixel accuracy" in out and "mean IoU" in out and "classes present in the data" in out
    assert (tmp_path / "reconstructions.png").is_file()


def test_eval_of_a_gray_tokenizer(runs, maps, tmp_path, capsys):
    metrics = run_eval(tmp_path, "--checkpoint-path", str(runs / "gray" / "checkpoints" / "vqgan_last.pt"),
                       "--dataset-path", str(maps / "gray"))
    assert math.isfinite(metrics["psnr"]) and -1 <= metrics["ssim"] <= 1
    assert metrics["lpips"] is None and metrics["rfid"] is None and "pixel_accuracy" not in metrics
    assert "judge RGB images, not gray maps" in capsys.readouterr().out


class FixedPredictions(nn.Module):
    """A stand-in segmentation model whose logits say class 1 wherever the input says 2."""

    def __init__(self):
        super().__init__()
        self.config = VQGANConfig(image_size=16, ch_mult=(1, 1), attn_resolutions=(), image_kind="segmentation",
                                  num_labels=4, num_codebook_vectors=8)

    def forward(self, x):
        logits = x.clone()
        logits[:, 1] += logits[:, 2]
        logits[:, 2] = 0
        return logits, torch.zeros(len(x), 8, 8, dtype=torch.long), torch.zeros(())


def test_eval_accuracy_and_mean_iou_on_a_constructed_case(tmp_path, monkeypatch):
    """Two 16x16 maps: 256 pixels of class 0, 224 of class 1, 32 of class 2 (predicted 1), none of class 3.
    Accuracy (256 + 224) / 512; IoU 1 for class 0, 224 / 256 for class 1, 0 for class 2; class 3 is not averaged."""
    first, second = np.zeros((16, 16), np.uint8), np.ones((16, 16), np.uint8)
    second[:, 10:12] = 2
    maps = tmp_path / "maps"
    maps.mkdir()
    Image.fromarray(first).save(maps / "a.png")
    Image.fromarray(second).save(maps / "b.png")
    monkeypatch.setattr(eval_vqgan, "load_model", lambda args: FixedPredictions())
    metrics = run_eval(tmp_path, "--checkpoint-path", "unused.pt", "--dataset-path", str(maps))
    assert metrics["pixel_accuracy"] == pytest.approx((256 + 224) / 512)
    assert metrics["iou_per_class"] == pytest.approx({"0": 1.0, "1": 224 / 256, "2": 0.0})
    assert metrics["mean_iou"] == pytest.approx((1 + 224 / 256 + 0) / 3)
    assert "the 3 classes present in the data (0, 1, 2) of 4" in " ".join(metrics["notes"])


def test_a_label_out_of_range_stops_training_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "maps").mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32), 7 if i == 2 else 1, np.uint8)).save(tmp_path / "maps" / f"m{i}.png")
    argv = [*KIND_FLAGS, "--image-kind", "segmentation", "--num-labels", "4", "--dataset-path", str(tmp_path / "maps"),
            "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        run_script(training_vqgan.main, training_vqgan.build_parser(), argv)
    err = capsys.readouterr().err  # the progress bar, closed, then the error on its own line
    assert exit_.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: The label map '{tmp_path / 'maps' / 'm2.png'}' holds class 7, "
                                            f"outside 0 to 3 (--num-labels 4).")


def test_eval_of_taming_segmentation_stage(tmp_path):
    """--taming-stage cond_stage evaluates the fixture's VQSegmentationModel on its two label maps, written as PNGs:
    the accuracy is that of taming's own logits."""
    ref = torch.load(COND_FIXTURES / "reference_outputs.pt", weights_only=True)
    (tmp_path / "maps").mkdir()
    for i, labels in enumerate(ref["labels"]):
        Image.fromarray(labels.numpy().astype(np.uint8)).save(tmp_path / "maps" / f"{i}.png")
    metrics = run_eval(tmp_path, "--checkpoint-path", str(COND_FIXTURES / "last.ckpt"), "--taming-config",
                       str(COND_FIXTURES / "model.yaml"), "--taming-stage", "cond_stage", "--dataset-path",
                       str(tmp_path / "maps"))
    expected = (ref["cond_reconstruction"].argmax(1) == ref["labels"]).double().mean().item()
    assert metrics["image_kind"] == "segmentation" and metrics["pixel_accuracy"] == pytest.approx(expected)
