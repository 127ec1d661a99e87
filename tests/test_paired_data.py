"""Paired data for stage 2 with an image condition: pairing by relative path and stem, one crop and flip for both,
label maps resized by nearest neighbour only, skipped pairs, and the token cache's key."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, PairedFolder, Unreadable, build_loader, token_cache_path


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_pairs_share_one_random_crop_and_flip(tmp_path):
    """A label map computed from its image stays that function of the image's pixels under every crop and flip."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # wider than the crop: crops move sideways
    write(tmp_path / "images" / "a.png", image)
    write(tmp_path / "labels" / "a.png", (image[..., 0] // 64).astype(np.uint8))  # classes 0..3
    data = PairedFolder(tmp_path / "images", tmp_path / "labels", 32, train=True, cond_kind="segmentation",
                        num_labels=4)
    crops = set()
    torch.manual_seed(0)
    for _ in range(40):
        item = data[0]
        red = torch.round((item["image"][0] + 1) * 127.5)  # (32, 32) back to 0..255
        assert item["cond"].shape == (4, 32, 32) and torch.equal(item["cond"].argmax(0), (red // 64).long())
        crops.add(tuple(red[0, :3].tolist()))
    assert len(crops) > 10  # the crops and flips did vary


def test_label_maps_are_resized_by_nearest_neighbour_only(tmp_path):
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    labels = np.where(np.indices((64, 64)).sum(0) % 2, 4, 0).astype(np.uint8)  # a checkerboard of classes 0 and 4
    write(tmp_path / "images" / "a.png", image)
    write(tmp_path / "labels" / "a.png", labels)
    for train in (True, False):
        item = PairedFolder(tmp_path / "images", tmp_path / "labels", 24, train=train, cond_kind="segmentation",
                            num_labels=5)[0]
        assert item["cond"].sum(0).eq(1).all()  # one-hot everywhere
        assert set(item["cond"].argmax(0).unique().tolist()) <= {0, 4}  # never an interpolated 1, 2 or 3


def test_partners_by_relative_path_and_stem_and_the_missing_counted(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "sub/c.png", "sub/d.png", "e.png"):
        write(tmp_path / "images" / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for name in ("a.bmp", "b.png", "sub/c.png", "d.png"):  # d is in the wrong folder: no partner of sub/d
        write(tmp_path / "conds" / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    data = PairedFolder(tmp_path / "images", tmp_path / "conds", 16, train=False)
    assert [p.relative_to(tmp_path / "images").as_posix() for p in data.paths] == ["a.png", "b.jpg", "sub/c.png"]
    assert [p.relative_to(tmp_path / "conds").as_posix() for p in data.cond_paths] == ["a.bmp", "b.png", "sub/c.png"]
    assert [p.relative_to(tmp_path / "images").as_posix() for p in data.missing] == ["e.png", "sub/d.png"]
    assert len(data) == 3 and data[1]["cond"].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"--cond-path .*conds holds a condition for none of the 2 images of .*"
                                        r"\(the condition of e.png would be .*conds/e.png, or the same stem"):
        PairedFolder(tmp_path / "images", tmp_path / "conds", 16, paths=[tmp_path / "images" / "e.png",
                                                                          tmp_path / "images" / "sub" / "d.png"])


def test_bad_pairs_are_unreadable_items_named_by_the_loader_and_bad_labels_are_an_error(tmp_path, capfd):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write(images / "a.png", np.zeros((16, 16, 3), dtype=np.uint8))
    write(labels / "a.png", np.zeros((16, 20), dtype=np.uint8))  # of another size than its image
    write(images / "b.png", np.zeros((16, 16, 3), dtype=np.uint8))
    (labels / "b.png").write_bytes(b"not a png")  # an unreadable condition
    write(images / "c.png", np.zeros((16, 16, 3), dtype=np.uint8))
    write(labels / "c.png", np.ones((16, 16), dtype=np.uint8))
    data = PairedFolder(images, labels, 16, cond_kind="segmentation", num_labels=3)
    assert data[0] == Unreadable(str(images / "a.png"), f"it is 16x16 pixels, its condition '{labels / 'a.png'}' 20x16")
    assert data[1] == Unreadable(str(labels / "b.png"), "cannot identify image file")
    loader = build_loader(data, 3, train=False)
    batches = list(loader) + list(loader)  # two passes: each bad pair named once
    assert [batch["skipped"] for batch in batches] == [2, 2] and batches[0]["cond"].argmax(1).eq(1).all()
    assert loader.unreadable == {str(images / "a.png"): data[0].reason, str(labels / "b.png"): data[1].reason}
    named = [line for line in capfd.readouterr().err.splitlines() if line.startswith("Skipping")]
    assert named == [f"Skipping unreadable image '{path}': {reason}." for path, reason in loader.unreadable.items()]
    write(labels / "a.png", np.full((16, 16), 7, dtype=np.uint8))
    with pytest.raises(DataError, match="holds class 7, outside 0 to 2"):
        PairedFolder(tmp_path / "images", tmp_path / "labels", 16, cond_kind="segmentation", num_labels=3)[0]


def test_token_cache_key_holds_the_condition_tokenizer_and_pairing(tmp_path):
    for name, content in (("vqgan.pt", b"image"), ("labels.pt", b"labels"), ("other.pt", b"other")):
        (tmp_path / name).write_bytes(content)
    base = (tmp_path / "vqgan.pt", 32, ["x/a.png"], "train")
    plain = token_cache_path(*base)
    paired = token_cache_path(*base, (tmp_path / "labels.pt", ["y/a.png"], 1))
    assert len({plain, paired, token_cache_path(*base, (tmp_path / "other.pt", ["y/a.png"], 1)),
                token_cache_path(*base, (tmp_path / "labels.pt", ["z/a.png"], 1)),
                token_cache_path(*base, (tmp_path / "labels.pt", ["y/a.png"], 2))}) == 5
    (tmp_path / "labels.pt").write_bytes(b"retrained")  # a new condition tokenizer at the same path
    assert token_cache_path(*base, (tmp_path / "labels.pt", ["y/a.png"], 1)) != paired
