"""eval_vqgan.py: the PSNR and SSIM helpers on known pairs, the script on a tiny checkpoint of ours and a taming one."""
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import eval_vqgan
from checkpoint import CheckpointError, save_checkpoint
from codebook import codebook_usage
from data import ImageFolder
from demo_flowers import make_demo_flowers
from helpers import TINY
from vqgan import VQGAN, VQGANConfig

FIXTURES = Path(__file__).parent / "fixtures" / "taming_tiny"
KEYS = {"psnr": float, "ssim": float, "codebook_usage": float, "perplexity": float, "num_images": int}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return make_demo_flowers(tmp_path_factory.mktemp("flowers"), num_images=6, size=40)


@pytest.fixture(autouse=True)
def no_downloadable_weights(monkeypatch, tmp_path):
    """Whatever is installed on this machine, the tests see no LPIPS or Inception weights (so nothing is fetched)."""
    monkeypatch.setattr(eval_vqgan, "lpips_available", lambda: False)
    monkeypatch.setattr(eval_vqgan, "inception_weights_path", lambda: str(tmp_path / "hub" / "weights-inception.pth"))


def run_eval(tmp_path, *flags):
    args = eval_vqgan.build_parser().parse_args(
        [*flags, "--device", "cpu", "--num-workers", "0", "--batch-size", "4", "--out-json", str(tmp_path / "m.json")])
    return eval_vqgan.main(args)


def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY))
    path = tmp_path / "vqgan_last.pt"
    save_checkpoint(dict(model=model.state_dict(), config=asdict(model.config), step=0), path)
    return path, model.eval()


# ---- the metrics ----

def test_psnr_on_known_pairs():
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :4] += 0.2  # half the pixels off by 0.2: MSE 0.02 -> 10 log10(50)
    torch.testing.assert_close(eval_vqgan.psnr(x, y), torch.tensor([20.0, 10 * math.log10(50)]))
    assert eval_vqgan.psnr(x, x).tolist() == [eval_vqgan.PSNR_CAP] * 2  # identical: capped, not inf


def test_ssim_on_known_pairs():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(eval_vqgan.ssim(x, x), torch.ones(2))
    # Constant images a and b: means only, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.6, 0.01 ** 2
    flat = eval_vqgan.ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    torch.testing.assert_close(flat, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)]))
    assert (eval_vqgan.ssim(x, 1 - x) < 0).all()  # an inverted image is anti-correlated
    with pytest.raises(ValueError, match="at least 11x11"):
        eval_vqgan.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_gaussian_window():
    w = eval_vqgan.gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max() and w[5, 4].item() == pytest.approx(w[5, 5].item() * math.exp(-1 / (2 * 1.5 ** 2)))


# ---- the script ----

def test_eval_on_our_checkpoint(tmp_path, flowers):
    ckpt, model = tiny_checkpoint(tmp_path)
    metrics = run_eval(tmp_path, "--checkpoint-path", str(ckpt), "--dataset-path", str(flowers), "--num-grid", "4")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved == metrics
    for key, kind in KEYS.items():
        assert isinstance(saved[key], kind), key
    assert saved["lpips"] is None and saved["rfid"] is None and saved["num_images"] == 6
    assert any("VGG16" in note for note in saved["notes"])
    assert any("weights-inception" in note for note in saved["notes"])
    assert (tmp_path / "reconstructions.png").is_file()

    # The same numbers by hand: center crops, one forward, per-image PSNR averaged, usage over all indices.
    x = torch.stack([item["image"] for item in ImageFolder(flowers, 32, train=False)])
    with torch.no_grad():  # in the script's batches of 4 and 2 (the same shapes run faster the second time)
        (rec_a, indices_a, _), (rec_b, indices_b, _) = model(x[:4]), model(x[4:])
    x_rec, indices = torch.cat([rec_a, rec_b]), torch.cat([indices_a, indices_b])
    real, rec = (x + 1) / 2, ((x_rec.clamp(-1, 1) + 1) / 2)
    mse = (real - rec).pow(2).flatten(1).mean(1)
    assert saved["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-4)
    usage, perplexity = codebook_usage(indices, 64)
    assert saved["codebook_usage"] == pytest.approx(usage) and saved["perplexity"] == pytest.approx(perplexity)


def test_eval_on_a_taming_checkpoint(tmp_path, flowers):
    metrics = run_eval(tmp_path, "--checkpoint-path", str(FIXTURES / "last.ckpt"),
                       "--taming-config", str(FIXTURES / "model.yaml"), "--dataset-path", str(flowers))
    assert metrics["image_size"] == 16 and metrics["num_images"] == 6  # the taming config's resolution
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 64


def test_a_taming_checkpoint_without_its_config_is_named(tmp_path, flowers):
    with pytest.raises(CheckpointError, match="--taming-config"):
        run_eval(tmp_path, "--checkpoint-path", str(FIXTURES / "last.ckpt"), "--dataset-path", str(flowers))


def test_rfid_with_a_stand_in_feature_network(tmp_path, flowers, monkeypatch):
    """The rFID path end to end, with a small fixed network standing in for Inception (no weights here)."""
    pytest.importorskip("torch_fidelity")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1))
    monkeypatch.setattr(eval_vqgan, "load_inception", lambda device: (lambda x: [net(x.float() / 255)], None))
    ckpt, _ = tiny_checkpoint(tmp_path)
    metrics = run_eval(tmp_path, "--checkpoint-path", str(ckpt), "--dataset-path", str(flowers))
    assert isinstance(metrics["rfid"], float) and metrics["rfid"] > 0
    features = torch.randn(50, 4, dtype=torch.float64)
    assert eval_vqgan.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert eval_vqgan.frechet_distance(features, features + 1) == pytest.approx(4.0, abs=1e-6)  # ||mu_a - mu_b||^2
    # One varying feature (sample means 1 and 4, variances 2 and 18) and one constant one:
    # (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2).
    a = torch.tensor([[0.0, 5.0], [2.0, 5.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 5.0], [7.0, 5.0]], dtype=torch.float64)
    assert eval_vqgan.frechet_distance(a, b) == pytest.approx((1 - 4) ** 2 + 2 + 18 - 2 * 6)


def test_rfid_note_names_the_missing_weights_file(tmp_path, flowers):
    pytest.importorskip("torch_fidelity")
    ckpt, _ = tiny_checkpoint(tmp_path)
    metrics = run_eval(tmp_path, "--checkpoint-path", str(ckpt), "--dataset-path", str(flowers), "--num-grid", "0")
    assert metrics["rfid"] is None
    assert any(str(tmp_path / "hub") in note for note in metrics["notes"])
    assert not (tmp_path / "reconstructions.png").exists()
