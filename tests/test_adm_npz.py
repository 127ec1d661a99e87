"""eval_transformer.py and ADM's evaluator files: --save-npz writes the samples as arr_0 (and arr_1 labels), and an
.npz --reference counts by its mu/sigma (as given) or its arr_0 images, with the same FID as the images themselves.
The weight-free stand-in network replaces Inception (nothing is downloaded)."""
import numpy as np
import pytest
import torch
from PIL import Image

import eval_transformer
import eval_vqgan
from checkpoint import CheckpointError
from data import DataError
from helpers import write_tiny_checkpoints
from runtime import seed_everything

pytest.importorskip("torch_fidelity")


@pytest.fixture(autouse=True)
def no_inception_weights(monkeypatch, tmp_path):
    """Whatever is installed on this machine, the tests see no Inception weights (so nothing is fetched)."""
    monkeypatch.setattr(eval_vqgan, "inception_weights_path", lambda: str(tmp_path / "hub" / "weights-inception.pth"))


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    model, _, path = write_tiny_checkpoints(tmp_path_factory.mktemp("npz"), classes=["a", "b"])
    return model, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Six 32x32 reference images: as a folder of PNGs, and as one uint8 array (6, 32, 32, 3)."""
    folder = tmp_path_factory.mktemp("reference")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder, images


def run_eval(tmp_path, ckpt, reference, *flags):
    threads = torch.get_num_threads()
    try:
        return eval_transformer.main(eval_transformer.build_parser().parse_args(
            ["--checkpoint-path", str(ckpt), "--reference", str(reference), "--num-samples", "6", "--batch-size", "4",
             "--device", "cpu", "--num-workers", "0", "--threads", "1", "--features", "random-conv", "--val-batches",
             "0", "--out-json", str(tmp_path / "m.json"), "--cache-dir", str(tmp_path / "cache"), *flags]))
    finally:
        torch.set_num_threads(threads)


def test_save_npz_holds_the_samples_and_labels_as_adm_reads_them(tmp_path, model_and_checkpoint, reference):
    model, ckpt = model_and_checkpoint
    run_eval(tmp_path, ckpt, reference[0], "--save-npz", str(tmp_path / "samples.npz"), "--top-k", "8")
    with np.load(tmp_path / "samples.npz") as npz:  # what ADM's evaluator does with a sample batch
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]  # a conditional model samples every class in turn
    seed_everything(0)  # the same draws, batch by batch, as the script made them
    expected = [model.indices_to_image(model.sample_canvas(n, top_k=8, labels=torch.tensor([0, 1] * 2)[:n]))
                for n in (4, 2)]
    expected = eval_transformer.to_uint8(torch.cat(expected)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images, expected)


def test_save_npz_without_a_feature_network_still_writes_the_samples(tmp_path, model_and_checkpoint, reference):
    _, ckpt = model_and_checkpoint
    args = eval_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(ckpt), "--reference", str(reference[0]), "--num-samples", "4", "--device", "cpu",
         "--num-workers", "0", "--threads", "1", "--out-json", str(tmp_path / "m.json"), "--save-npz",
         str(tmp_path / "s.npz"), "--val-batches", "0"])
    result = eval_transformer.main(args)  # Inception's weights are missing: no metrics, but the samples
    assert result["fid"] is None and result["num_samples"] == 4
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["arr_0"].shape == (4, 32, 32, 3)


def test_fid_against_npz_statistics_equals_fid_against_their_images(tmp_path, model_and_checkpoint, reference):
    _, ckpt = model_and_checkpoint
    folder, images = reference
    features = eval_transformer.extract(eval_transformer.RandomConvFeatures(),
                                        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)[0].numpy()
    # ADM's evaluator computes a reference batch's statistics so: the mean and the (N - 1) covariance of the features.
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "images.npz", arr_0=images)
    np.savez(tmp_path / "both.npz", arr_0=images, mu=mu, sigma=sigma)  # like VIRTUAL_imagenet256_labeled.npz
    from_folder = run_eval(tmp_path, ckpt, folder)
    from_statistics = run_eval(tmp_path, ckpt, tmp_path / "stats.npz")
    from_images = run_eval(tmp_path, ckpt, tmp_path / "images.npz")
    from_both = run_eval(tmp_path, ckpt, tmp_path / "both.npz", "--npz-images")
    assert from_statistics["fid"] == pytest.approx(from_folder["fid"], rel=1e-6) and from_folder["fid"] > 0
    assert from_images["fid"] == from_both["fid"] == pytest.approx(from_folder["fid"], rel=1e-6)
    assert from_images["kid"] == pytest.approx(from_folder["kid"]) and from_statistics["kid"] is None
    assert any("gives statistics, not features" in note for note in from_statistics["notes"])
    assert from_statistics["protocol"]["resize"].startswith("reference: the mu/sigma of the .npz as given")
    assert from_images["protocol"]["reference_images"] == 6


def test_bad_npz_files_are_one_sentence(tmp_path, model_and_checkpoint):
    _, ckpt = model_and_checkpoint
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(DataError, match="are 2048-dimensional, the feature network's 64-dimensional; pass "
                                        "--npz-images"):
        run_eval(tmp_path, ckpt, tmp_path / "wide.npz")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match=r"holds arr_0 of float32 \(4, 8, 8, 3\); ADM's batches hold arr_0 as uint8"):
        run_eval(tmp_path, ckpt, tmp_path / "floats.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises((DataError, CheckpointError), match="Cannot read .*broken.npz as an .npz file"):
        run_eval(tmp_path, ckpt, tmp_path / "broken.npz")
