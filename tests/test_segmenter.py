"""segmenter.py: the per-pixel classifier that measures how well conditional samples follow their label maps."""
import numpy as np
import pytest
import torch
from PIL import Image

import segmenter
from checkpoint import CheckpointError, save_checkpoint
from data import PairedFolder
from segmenter import PixelClassifier


def write_pairs(root, count, seed):
    """Images of coloured rectangles on grey noise; the label map says which colour (0 background, 1 red, 2 green)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        image = rng.integers(90, 160, (16, 16, 3)).astype(np.uint8)
        labels = np.zeros((16, 16), dtype=np.uint8)
        for label, colour in ((1, (230, 30, 30)), (2, (30, 220, 40))):
            top, left = rng.integers(0, 10, 2)
            h, w = rng.integers(3, 7, 2)
            image[top:top + h, left:left + w], labels[top:top + h, left:left + w] = colour, label
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(labels).save(root / "labels" / f"{i}.png")
    return root / "images", root / "labels"


def test_the_classifier_learns_colours_and_reports_its_held_out_accuracy(tmp_path):
    images, labels = write_pairs(tmp_path / "train", 24, seed=0)
    val_images, val_labels = write_pairs(tmp_path / "val", 8, seed=1)
    model, scores = segmenter.main(segmenter.build_parser().parse_args([
        "--images", str(images), "--labels", str(labels), "--num-labels", "3", "--val-images", str(val_images),
        "--val-labels", str(val_labels), "--image-size", "16", "--steps", "60", "--batch-size", "8",
        "--out", str(tmp_path / "seg.pt"), "--device", "cpu"]))
    assert scores["pixel_accuracy"] > 0.95 and scores["mean_iou"] > 0.8
    loaded = PixelClassifier.from_checkpoint(tmp_path / "seg.pt")
    pairs = PairedFolder(val_images, val_labels, 16, train=False, cond_kind="segmentation", num_labels=3)
    x = torch.stack([pairs[i]["image"] for i in range(len(pairs))])
    assert torch.equal(loaded.segment(x), model.segment(x))
    assert segmenter.evaluate(loaded, pairs, torch.device("cpu"))[:2] == (scores["pixel_accuracy"],
                                                                         scores["mean_iou"])
    assert torch.load(tmp_path / "seg.pt", weights_only=True)["held_out"]["mean_iou"] == scores["mean_iou"]


def test_bad_inputs_are_one_sentence(tmp_path):
    save_checkpoint(dict(model={}, config=dict(n_layer=2)), tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="gpt.pt is not a segmenter checkpoint"):
        PixelClassifier.from_checkpoint(tmp_path / "gpt.pt")
    with pytest.raises(ValueError, match="--val-images and --val-labels go together"):
        segmenter.main(segmenter.build_parser().parse_args(["--images", "a", "--labels", "b", "--num-labels", "3",
                                                            "--val-images", "c"]))
