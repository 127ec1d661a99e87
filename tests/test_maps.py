"""data.py's maps: gray (8- and 16-bit) and segmentation label maps read, checked, resized by nearest neighbour only
and never changed in value; DataError lines from loader workers; the demo flowers' label maps."""
import numpy as np
import pytest
import torch
from PIL import Image

import demo_flowers
from data import DataError, ImageFolder, build_loader, build_transform, map_to_tensor, read_map
from demo_flowers import FLOWER_LABELS, make_demo_flowers


def write_labels(path, labels, mode="L"):
    """Save an integer array as a one-channel PNG (8-bit L or P, or 16-bit I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    image = Image.fromarray(np.asarray(labels, dtype=dtype))
    if mode == "P":
        image = image.convert("P")  # L -> P keeps the values as palette indices (a grey palette)
    image.save(path)
    return path


def two_class_map(size=40, seed=0, classes=(0, 3)):
    """A random map of two classes in blobs of 4x4 pixels: any interpolation would create the values between."""
    coarse = np.random.default_rng(seed).integers(0, 2, (size // 4, size // 4))
    return np.asarray(classes)[np.kron(coarse, np.ones((4, 4), dtype=np.int64))]


def test_read_map_segmentation_keeps_the_class_indices_of_l_p_and_16_bit_pngs(tmp_path):
    labels = two_class_map(classes=(1, 4))
    for mode in ("L", "P", "I;16"):
        path = write_labels(tmp_path / f"{mode.replace(';', '')}.png", labels, mode)
        read = read_map(path, "segmentation", num_labels=5)
        assert read.dtype == np.int64 and read.shape == labels.shape and np.array_equal(read, labels), mode


def test_a_label_out_of_range_names_the_file(tmp_path):
    path = write_labels(tmp_path / "maps" / "bad.png", two_class_map(classes=(0, 5)))
    with pytest.raises(DataError, match=r"'.*bad\.png' holds class 5, outside 0 to 4 \(--num-labels 5\)"):
        read_map(path, "segmentation", num_labels=5)
    read_map(path, "segmentation", num_labels=6)  # in range now


def test_label_maps_must_be_one_channel_and_lossless(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8), (1, 1, 1)).save(rgb)
    with pytest.raises(DataError, match="'.*rgb.png' is a RGB image; a label map has one channel"):
        read_map(rgb, "segmentation", num_labels=4)
    jpeg = tmp_path / "map.jpg"
    Image.new("L", (8, 8), 1).save(jpeg)
    with pytest.raises(DataError, match="'.*map.jpg' is a JPEG"):
        read_map(jpeg, "segmentation", num_labels=4)


def test_gray_maps_are_min_max_scaled_with_all_16_bits(tmp_path):
    """Each map spans [-1, 1]; 16-bit values one apart stay apart (keeping only the high byte would merge them)."""
    deep = np.array([[1000, 1001], [1002, 1003]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    read = read_map(tmp_path / "deep.png", "gray")
    assert read.dtype == np.float32 and read.shape == (2, 2, 1)
    np.testing.assert_allclose(read[..., 0], [[-1, -1 / 3], [1 / 3, 1]], atol=1e-6)
    Image.fromarray(np.array([[50, 100], [150, 250]], dtype=np.uint8)).save(tmp_path / "eight.png")
    np.testing.assert_allclose(read_map(tmp_path / "eight.png", "gray")[..., 0], [[-1, -0.5], [0, 1]], atol=1e-6)
    Image.new("L", (3, 3), 77).save(tmp_path / "flat.png")
    assert np.array_equal(read_map(tmp_path / "flat.png", "gray"), -np.ones((3, 3, 1), np.float32))


def test_map_to_tensor_for_each_kind():
    rgb = map_to_tensor(np.array([[[0, 255, 51]]], dtype=np.uint8), "rgb")
    torch.testing.assert_close(rgb, torch.tensor([-1.0, 1.0, -0.6]).reshape(3, 1, 1))
    gray = map_to_tensor(np.array([[-1.0, 0.5]], dtype=np.float32)[..., None], "gray")
    assert gray.shape == (1, 1, 2) and gray.tolist() == [[[-1.0, 0.5]]]
    onehot = map_to_tensor(np.array([[2, 0]]), "segmentation", num_labels=3)
    assert onehot.dtype == torch.float32 and onehot.tolist() == [[[0, 1]], [[0, 0]], [[1, 0]]]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [40, 20])  # shrunk and enlarged to 32
def test_label_maps_are_resized_by_nearest_neighbour_only(tmp_path, train, size):
    """A map of classes 0 and 3 resized to the crop holds only 0 and 3: a bilinear resize makes 1s and 2s."""
    labels = two_class_map(size)
    path = write_labels(tmp_path / "map.png", labels)
    item = ImageFolder(tmp_path, 32, train=train, kind="segmentation", num_labels=4)[0]["image"]
    assert item.shape == (4, 32, 32) and torch.equal(item.sum(0), torch.ones(32, 32))  # one-hot
    assert item[[1, 2]].sum() == 0 and item[0].sum() > 0 and item[3].sum() > 0
    resize = build_transform(32, train, "rgb").transforms[0]  # the resize of photos, for contrast
    blurred = resize(image=np.asarray(Image.open(path)))["image"]
    assert set(np.unique(blurred)) - {0, 3}


def test_label_maps_are_only_cropped_and_flipped(tmp_path):
    """A 32x32 map: every training item is the map or its mirror image, value for value (no colour change)."""
    labels = np.random.default_rng(1).integers(0, 6, (32, 32))
    write_labels(tmp_path / "map.png", labels)
    dataset = ImageFolder(tmp_path, 32, train=True, kind="segmentation", num_labels=6)
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        got = dataset[0]["image"].argmax(0).numpy()
        flipped = np.array_equal(got, labels[:, ::-1])
        assert flipped or np.array_equal(got, labels)
        seen.add(flipped)
    assert seen == {True, False}


def test_gray_image_folder_gives_one_channel(tmp_path):
    Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).save(tmp_path / "depth.png")
    item = ImageFolder(tmp_path, 32, train=False, kind="gray")[0]["image"]
    assert item.shape == (1, 32, 32) and item.dtype == torch.float32
    assert -1 <= item.min() < -0.8 and 0.8 < item.max() <= 1  # the centre crop of a map spanning [-1, 1]


def test_a_label_error_in_a_loader_worker_is_one_line(tmp_path):
    """DataLoader re-raises a worker's DataError with the worker's traceback as its message; one sentence remains."""
    write_labels(tmp_path / "bad.png", two_class_map(classes=(0, 9)))
    loader = build_loader(ImageFolder(tmp_path, 32, kind="segmentation", num_labels=4), 1, num_workers=1)
    with pytest.raises(DataError) as error:
        next(iter(loader))
    assert str(error.value) == f"The label map '{tmp_path / 'bad.png'}' holds class 9, outside 0 to 3 (--num-labels 4)."


# ---- the demo flowers' label maps ----

def explained_variance(image, labels):
    """The share of the image's colour variance that the label map's classes explain (R^2 of per-class means)."""
    pixels, labels = image.reshape(-1, 3).astype(float), labels.reshape(-1)
    within = sum(((pixels[labels == c] - pixels[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))
    return 1 - within / ((pixels - pixels.mean(0)) ** 2).sum()


def test_demo_label_maps_are_aligned_with_their_flowers(tmp_path):
    """The flowers are the same with or without label maps; each map's classes explain the flower's colours better
    than the same map moved by one pixel in any direction or mirrored, so every part sits where it is drawn."""
    make_demo_flowers(tmp_path / "plain", num_images=6, size=40)
    make_demo_flowers(tmp_path / "flowers", num_images=6, size=40, segmentation_dir=tmp_path / "labels")
    for path in sorted((tmp_path / "flowers").iterdir()):
        image, labels = np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "labels" / path.name))
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / "plain" / path.name)))
        assert labels.shape == (40, 40) and labels.dtype == np.uint8 and labels.max() < len(FLOWER_LABELS)
        assert {0, 1, 2} <= set(np.unique(labels))  # background, petals and a centre in every flower
        aligned = explained_variance(image, labels)
        moved = [np.roll(labels, shift, axis) for axis in (0, 1) for shift in (-1, 1)] + [labels[:, ::-1]]
        assert all(aligned > explained_variance(image, other) for other in moved), path.name


def test_demo_flowers_command_line_writes_label_maps_beside(tmp_path):
    out = tmp_path / "data" / "x"
    demo_flowers.main(demo_flowers.build_parser().parse_args(["--out", str(out), "--num-images", "3", "--size", "16",
                                                              "--with-segmentation"]))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["flower_0000.png", "flower_0001.png", "flower_0002.png"]
    assert sorted(p.name for p in (tmp_path / "data" / "x_labels").iterdir()) == names
    labels = ImageFolder(tmp_path / "data" / "x_labels", 16, train=False, kind="segmentation",
                         num_labels=len(FLOWER_LABELS))
    assert labels[0]["image"].shape == (len(FLOWER_LABELS), 16, 16)
