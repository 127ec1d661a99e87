"""eval_transformer.py: the metrics on generated images through a small stand-in feature network, the reference
cache, and the script end to end on a tiny checkpoint (no Inception weights are needed or fetched)."""
import json
import math
import shutil
from dataclasses import asdict

import pytest
import torch

import eval_transformer
import eval_vqgan
from checkpoint import save_checkpoint
from cli import run_script
from data import ImageFolder
from demo_flowers import make_demo_flowers
from helpers import TINY, TINY_GPT
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN, VQGANConfig

pytest.importorskip("torch_fidelity")


@pytest.fixture(autouse=True)
def no_inception_weights(monkeypatch, tmp_path):
    """Whatever is installed on this machine, the tests see no Inception weights (so nothing is fetched)."""
    monkeypatch.setattr(eval_vqgan, "inception_weights_path", lambda: str(tmp_path / "hub" / "weights-inception.pth"))


@pytest.fixture(autouse=True)
def one_thread():
    """The script runs with --threads 1 (on two busy cores, OpenMP threads waiting for each other make the tiny
    model's steps many times slower); the other tests get torch's thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class CountingFeatures(eval_transformer.RandomConvFeatures):
    """The stand-in network, counting the images it sees."""

    def __init__(self):
        super().__init__(width=16)
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += len(images)
        return super().forward(images)


def blobs(n, seed, shift=0.0):
    """n smooth random 16x16 images in [-1, 1]: upsampled 4x4 noise, brightened by `shift`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 1.6 - 0.8, size=16, mode="bilinear")
    return (x + shift).clamp(-1, 1)


# ---- the metrics ----

def test_identical_sets_match_and_shifted_sets_do_not():
    net = eval_transformer.RandomConvFeatures(width=16)
    real, real_logits = eval_transformer.extract(net, blobs(60, seed=0))
    same = eval_transformer.fidelity_metrics(real, real, real_logits)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["isc"] >= 1.0

    fresh = eval_transformer.fidelity_metrics(*eval_transformer.extract(net, blobs(60, seed=1))[:1], real,
                                              real_logits)  # another draw of the same distribution
    shifted_features, shifted_logits = eval_transformer.extract(net, blobs(60, seed=1, shift=0.5))
    shifted = eval_transformer.fidelity_metrics(shifted_features, real, shifted_logits)
    assert 0 < fresh["fid"] < shifted["fid"] / 5
    # KID is unbiased: about 0 for one distribution, slightly negative for identical sets.
    assert abs(same["kid"]) < shifted["kid"] / 100 and fresh["kid"] < shifted["kid"] / 5
    assert shifted["precision"] < fresh["precision"]


def test_precision_is_of_the_samples_and_recall_of_the_reference():
    """Half the samples far from every reference point: precision 1/2; the rest cover the reference: recall 1."""
    ref = torch.stack([torch.arange(10.0), torch.zeros(10)], dim=1)  # points 0 .. 9 on a line
    gen = torch.cat([ref[::2], ref[::2] + 1000])  # 0, 2, .. 8 and five points far away
    metrics = eval_transformer.fidelity_metrics(gen.double(), ref.double(), torch.zeros(10, 4))
    assert metrics["precision"] == 0.5 and metrics["recall"] == 1.0
    assert metrics["isc"] == pytest.approx(1.0)  # identical logits: no information


def test_the_stand_in_is_the_same_network_in_every_process():
    x = eval_transformer.to_uint8(blobs(2, seed=0))
    a, b = eval_transformer.RandomConvFeatures(), eval_transformer.RandomConvFeatures()
    torch.testing.assert_close(a(x), b(x))
    assert not torch.equal(eval_transformer.RandomConvFeatures(seed=1)(x)[0], a(x)[0])


# ---- the reference cache ----

def test_reference_cache_is_reused_and_rebuilt_when_the_folder_changes(tmp_path):
    folder = make_demo_flowers(tmp_path / "ref", num_images=5, size=20)
    net = CountingFeatures()

    def features():
        return eval_transformer.reference_features(folder, 16, net, "cpu", tmp_path / "cache", 4, 0)

    first, saved, cache, reused = features()
    assert not reused and cache.is_file() and first.shape == (5, 16) and net.images_seen == 5
    again, _, cache_again, reused = features()
    assert reused and cache_again == cache and net.images_seen == 5  # not one image read again
    torch.testing.assert_close(again, first)

    files = sorted(folder.rglob("*.png"))
    shutil.copy(files[0], folder / "added.png")  # a new file
    grown, _, cache_grown, reused = features()
    assert not reused and cache_grown != cache and len(grown) == 6 and net.images_seen == 11
    make_demo_flowers(tmp_path / "other", num_images=1, size=20, seed=7)
    shutil.copy(next((tmp_path / "other").rglob("*.png")), files[1])  # a file changed in place
    changed, _, cache_changed, reused = features()
    assert not reused and cache_changed not in (cache, cache_grown) and net.images_seen == 17
    assert not torch.equal(changed, grown)
    _, _, cache_32, reused = eval_transformer.reference_features(folder, 32, net, "cpu", tmp_path / "cache", 4, 0)
    assert not reused and cache_32 != cache_changed  # another crop size is another reference


# ---- the script ----

def tiny_checkpoint(tmp_path, ema=False):
    """A tiny stage-2 model's checkpoints; with ema, an `ema` entry whose weights differ from the trained ones."""
    torch.manual_seed(0)
    model = VQGANTransformer(VQGAN(VQGANConfig(**TINY)), TransformerConfig(**TINY_GPT)).eval()
    vq_path, path = tmp_path / "vqgan.pt", tmp_path / "transformer.pt"
    save_checkpoint(dict(model=model.vqgan.state_dict(), config=asdict(model.vqgan.config), step=0), vq_path)
    averaged = {k: v * 0.5 for k, v in model.gpt.state_dict().items()} if ema else None
    save_checkpoint(dict(model=model.gpt.state_dict(), config=asdict(model.config), step=0,
                         vqgan_checkpoint=str(vq_path), classes=None, ema=averaged), path)
    return model, path


def run_eval(tmp_path, ckpt, reference, *flags, features=None, name="m.json"):
    args = eval_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(ckpt), "--reference", str(reference), "--num-samples", "6", "--batch-size", "4",
         "--device", "cpu", "--num-workers", "0", "--threads", "1", "--out-json", str(tmp_path / name), *flags])
    return eval_transformer.main(args, feature_extractor=features)


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return make_demo_flowers(tmp_path_factory.mktemp("flowers"), num_images=6, size=40)


def test_eval_end_to_end_on_a_tiny_checkpoint(tmp_path, flowers):
    model, ckpt = tiny_checkpoint(tmp_path)
    net = CountingFeatures()
    result = run_eval(tmp_path, ckpt, flowers, "--top-k", "8", features=net)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved == result
    for key in ("fid", "isc", "kid", "precision", "recall", "val_bits_per_token"):
        assert isinstance(saved[key], float) and math.isfinite(saved[key]), key
    assert saved["num_samples"] == 6 and saved["fid"] > 0 and 0 <= saved["precision"] <= 1
    assert saved["protocol"]["reference_images"] == 6 and saved["protocol"]["image_size"] == 32
    assert saved["protocol"]["feature_extractor"] == net.name and saved["sampling"]["top_k"] == 8
    assert (tmp_path / "m_samples.png").is_file() and net.images_seen == 6 + 6

    # The validation loss by hand: the GPT's cross-entropy on the codes of the six centre crops, in bits.
    x = torch.stack([item["image"] for item in ImageFolder(flowers, 32, train=False)])
    with torch.no_grad():
        _, loss = model(model.encode_to_indices(x))
    assert saved["val_bits_per_token"] == pytest.approx(loss.item() / math.log(2), rel=1e-4)

    # A second setting: the reference features come from the cache, only the samples are new; the same seed and
    # settings give the same numbers.
    again = run_eval(tmp_path, ckpt, flowers, "--top-k", "8", features=net, name="again.json")
    assert net.images_seen == 12 + 6 and again["reference_cache"] == result["reference_cache"]
    assert again["fid"] == result["fid"]
    from_file = run_eval(tmp_path, ckpt, result["reference_cache"], "--top-k", "8", features=net, name="f.json")
    assert from_file["fid"] == result["fid"] and from_file["val_bits_per_token"] is None
    assert from_file["protocol"]["reference"] == result["protocol"]["reference"] == str(flowers.resolve())


def test_ema_weights_are_used_unless_no_ema(tmp_path, flowers):
    _, ckpt = tiny_checkpoint(tmp_path, ema=True)
    net = CountingFeatures()
    ema = run_eval(tmp_path, ckpt, flowers, "--num-grid", "0", features=net, name="ema.json")
    raw = run_eval(tmp_path, ckpt, flowers, "--no-ema", features=net, name="raw.json")
    assert not (tmp_path / "ema_samples.png").exists() and (tmp_path / "raw_samples.png").is_file()
    assert ema["sampling"]["ema"] is True and raw["sampling"]["ema"] is False
    assert ema["val_bits_per_token"] != pytest.approx(raw["val_bits_per_token"])


def test_features_random_conv_measures_without_any_weights(tmp_path, flowers):
    """--features random-conv: the seeded stand-in network, so the metrics are numbers with no Inception weights."""
    _, ckpt = tiny_checkpoint(tmp_path)
    result = run_eval(tmp_path, ckpt, flowers, "--features", "random-conv", "--num-grid", "0")
    assert all(isinstance(result[key], float) for key in ("fid", "kid", "precision", "recall"))
    assert result["protocol"]["feature_extractor"] == eval_transformer.RandomConvFeatures().name
    assert result["num_samples"] == 6 and not result["notes"]


def test_without_inception_weights_the_metrics_are_null_with_the_file_named(tmp_path, flowers):
    _, ckpt = tiny_checkpoint(tmp_path)
    result = run_eval(tmp_path, ckpt, flowers)
    assert all(result[key] is None for key in ("fid", "isc", "kid", "precision", "recall"))
    assert result["num_samples"] == 0 and isinstance(result["val_bits_per_token"], float)
    assert any(str(tmp_path / "hub") in note and "weights-inception" in note for note in result["notes"])


def test_bad_flags_are_one_sentence(tmp_path, flowers, capsys, monkeypatch):
    _, ckpt = tiny_checkpoint(tmp_path)
    base = ["eval_transformer.py", "--checkpoint-path", str(ckpt), "--reference", str(flowers), "--device", "cpu",
            "--threads", "1", "--out-json", str(tmp_path / "m.json")]
    for flags, message in [(["--class-id", "2"], "--class-id needs a model trained with --conditional"),
                           (["--cfg-scale", "3"], "without a null class"),
                           (["--num-samples", "3"], "at least 4"),
                           (["--reference", str(tmp_path / "nowhere")], "does not exist")]:
        monkeypatch.setattr("sys.argv", base + flags)
        with pytest.raises(SystemExit) as stop:
            run_script(eval_transformer.main, eval_transformer.build_parser())
        err = capsys.readouterr().err
        assert stop.value.code == 1 and err.count("\n") == 1 and message in err, err
