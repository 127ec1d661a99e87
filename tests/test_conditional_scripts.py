"""The scripts with an image condition: training_transformer.py --cond-path (pairing, the token cache's condition
rows, the checkpoint's record), sample_transformer.py --cond-image on a canvas 2x the training size, completion with
a condition, and the one-sentence errors."""
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import eval_transformer
import sample_transformer
import training_transformer
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from data import DataError, PairedFolder, find_images
from demo_flowers import make_demo_flowers
from eval_transformer import RandomConvFeatures
from eval_vqgan import psnr
from helpers import STAGE2_FLAGS, TINY
from segmenter import PixelClassifier
from transformer import TransformerConfig, VQGANTransformer
from utils import to_image_range
from vqgan import VQGAN, VQGANConfig

LABELS = VQGANConfig(image_kind="segmentation", num_labels=3, image_size=32, ch=32, ch_mult=(1, 1, 1, 1),
                     num_res_blocks=1, attn_resolutions=(), z_channels=16, latent_dim=8, num_codebook_vectors=24)
COND_FLAGS = STAGE2_FLAGS + ["--block-size", "80"]  # the start token, 4x4 condition tokens, 8x8 image tokens


def label_map(image):
    """3 classes by brightness: a label map that depends on the image."""
    return (np.asarray(image.convert("L")) // 86).astype(np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Paired data (12 flowers, one without a label map), random tokenizers, and 3 steps of stage 2 with
    --cond-path, --precompute-tokens and --cond-dropout."""
    root = tmp_path_factory.mktemp("cond")
    images = make_demo_flowers(root / "flowers", num_images=12, size=32)
    for path in find_images(images)[:-1]:
        with Image.open(path) as image:
            (root / "labels").mkdir(exist_ok=True)
            Image.fromarray(label_map(image)).save(root / "labels" / path.name)
    torch.manual_seed(0)
    for name, config in (("vqgan", VQGANConfig(**TINY)), ("labels", LABELS)):
        save_checkpoint(dict(model=VQGAN(config).state_dict(), config=asdict(config), step=0), root / f"{name}.pt")
    out = root / "stage2"
    training_transformer.main(training_transformer.build_parser().parse_args(COND_FLAGS + [
        "--dataset-path", str(images), "--cond-path", str(root / "labels"), "--checkpoint-path",
        str(root / "vqgan.pt"), "--cond-checkpoint", str(root / "labels.pt"), "--precompute-tokens",
        "--cond-dropout", "0.2", "--val-fraction", "0.1", "--max-steps", "3", "--sample-every", "3",
        "--out-dir", str(out)]))
    return root, out / "checkpoints" / "transformer_last.pt"


def sample(ckpt, out, *flags):
    sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(ckpt), "--out-dir", str(out), "--device", "cpu", "--num-samples", "2", *flags]))
    return torch.load(out / "indices.pt", weights_only=True)


def test_training_records_the_condition_and_caches_its_tokens(run):
    root, ckpt = run
    saved = load_checkpoint(ckpt)
    assert saved["cond_kind"] == "segmentation" and saved["cond_checkpoint"] == str((root / "labels.pt").resolve())
    assert saved["config"]["cond_dropout"] == 0.2 and saved["step"] == 3
    caches = {path.name.split("_")[1]: load_checkpoint(path) for path in root.glob("tokens_*.pt")}
    assert set(caches) == {"train", "val"}
    train = caches["train"]
    assert train["indices"].shape == (2 * 10, 64) and train["cond_indices"].shape == (2 * 10, 16)  # with flips
    # The rows are the centre crops' codes, each pair followed by its mirror image.
    model = VQGANTransformer.from_checkpoint(ckpt)
    pairs = PairedFolder(root / "flowers", root / "labels", 32, train=False, cond_kind="segmentation", num_labels=3)
    assert pairs.missing == [find_images(root / "flowers")[-1]]  # the flower without a label map
    item = pairs[0]  # flower_0000, the first training pair
    for row, flip in ((0, False), (1, True)):
        cond, image = (x.flip(-1) if flip else x for x in (item["cond"][None], item["image"][None]))
        assert torch.equal(train["cond_indices"][row].long(), model.encode_condition(cond).flatten(1)[0])
        assert torch.equal(train["indices"][row].long(), model.encode_to_indices(image)[0])
    assert (root / "stage2" / "results" / "transformer_samples_0000003.png").exists()


def test_sampling_a_condition_twice_the_training_size(run, tmp_path):
    root, ckpt = run
    with Image.open(find_images(root / "flowers")[0]) as image:
        big = image.resize((64, 64), Image.NEAREST)
        big.save(tmp_path / "target.png")
        Image.fromarray(label_map(big)).save(tmp_path / "layout.png")
    grid = sample(ckpt, tmp_path / "out", "--cond-image", str(tmp_path / "layout.png"), "--target-image",
                  str(tmp_path / "target.png"), "--top-k", "4")
    assert grid.shape == (2, 16, 16) and grid.max() < 64
    with Image.open(tmp_path / "out" / "grid.png") as picture:  # rows: condition, samples, ground truth
        assert picture.height == 3 * (64 + 2) + 2 and picture.width > 2 * (64 + 2)
    guided = sample(ckpt, tmp_path / "guided", "--cond-image", str(tmp_path / "layout.png"), "--cfg-scale", "2")
    assert guided.shape == (2, 16, 16)


def test_completion_with_a_condition_keeps_the_unmasked_codes(run, tmp_path):
    root, ckpt = run
    path = find_images(root / "flowers")[1]
    with Image.open(path) as image:
        Image.fromarray(label_map(image)).save(tmp_path / "layout.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[16:] = 255  # the bottom half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    grid = sample(ckpt, tmp_path / "out", "--cond-image", str(tmp_path / "layout.png"), "--input-image", str(path),
                  "--mask", str(tmp_path / "mask.png"))
    model = VQGANTransformer.from_checkpoint(ckpt)
    codes = model.encode_to_grid(sample_transformer.load_input_image(path, (32, 32)))
    assert torch.equal(grid[:, :4], codes[:, :4].expand(2, -1, -1))


def test_condition_errors_are_one_sentence(run, tmp_path):
    root, ckpt = run
    Image.fromarray(np.zeros((36, 32), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match=r"The condition image .*odd.png is 36x32 pixels; both sides must be "
                                         r"multiples of 8 \(the downsampling factor f = 4 and --cond-downsample 1 x "
                                         r"the condition tokenizer's 8\)"):
        sample(ckpt, tmp_path / "out", "--cond-image", str(tmp_path / "odd.png"))
    Image.fromarray(np.full((32, 32), 5, dtype=np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match="holds class 5, outside 0 to 2"):
        sample(ckpt, tmp_path / "out", "--cond-image", str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match=r"draws images for a condition \(segmentation\): pass one with --cond-image"):
        sample(ckpt, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"vqgan.pt reads rgb images, but the stage-2 model .*transformer_last.pt "
                                              r"was trained on segmentation conditions"):
        sample(ckpt, tmp_path / "out", "--cond-image", str(tmp_path / "odd.png"), "--cond-checkpoint",
               str(root / "vqgan.pt"))
    plain, config = tmp_path / "plain.pt", TransformerConfig(n_layer=1, n_head=1, n_embd=8, block_size=64)
    gpt = VQGANTransformer(VQGAN(VQGANConfig(**TINY)), config).gpt
    save_checkpoint(dict(model=gpt.state_dict(), config=asdict(config), step=0,
                         vqgan_checkpoint=str(root / "vqgan.pt")), plain)
    with pytest.raises(ValueError, match=r"--cond-image needs a model trained with an image condition"):
        sample(plain, tmp_path / "out", "--cond-image", str(tmp_path / "odd.png"))


def test_super_resolution_with_the_images_own_tokenizer(run, tmp_path):
    """RGB conditions tokenized by the image's own stage-1 model (no --cond-checkpoint), shrunk to 1/2 first
    (--cond-downsample 2): low-resolution copies, enlarged 2x by nearest neighbour, come back exactly."""
    root, _ = run
    (tmp_path / "low").mkdir()
    for path in find_images(root / "flowers"):
        with Image.open(path) as image:
            image.resize((16, 16), Image.BICUBIC).resize((32, 32), Image.NEAREST).save(tmp_path / "low" / path.name)
    out = tmp_path / "stage2"
    training_transformer.main(training_transformer.build_parser().parse_args(STAGE2_FLAGS + [
        "--block-size", "80", "--dataset-path", str(root / "flowers"), "--cond-path", str(tmp_path / "low"),
        "--checkpoint-path", str(root / "vqgan.pt"), "--cond-downsample", "2", "--cond-embedding", "separate",
        "--max-steps", "2", "--sample-every", "2", "--out-dir", str(out)]))
    ckpt = out / "checkpoints" / "transformer_last.pt"
    saved = load_checkpoint(ckpt)
    assert saved["cond_kind"] == "rgb" and saved["cond_checkpoint"] == str((root / "vqgan.pt").resolve())
    model = VQGANTransformer.from_checkpoint(ckpt)
    assert model.cond_vqgan is model.vqgan and model.cond_hw == (4, 4) and model.cond_offset == 64
    low = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(model.encode_condition(low.repeat_interleave(2, 2).repeat_interleave(2, 3)),
                       model.encode_to_grid(low))  # nearest up, then nearest down: the same pixels
    with Image.open(tmp_path / "low" / "flower_0000.png") as image:
        image.resize((64, 64), Image.NEAREST).save(tmp_path / "large.png")
    assert sample(ckpt, tmp_path / "out", "--cond-image", str(tmp_path / "large.png")).shape == (2, 16, 16)


def test_eval_pairs_samples_with_conditions_and_ground_truth(run, tmp_path, monkeypatch):
    """eval_transformer.py --cond-path --segmenter: sample i is drawn for pair i's condition and compared with pair i;
    the validation loss reads each held-out image with its condition."""
    root, ckpt = run
    model = VQGANTransformer.from_checkpoint(ckpt)
    pairs = PairedFolder(root / "flowers", root / "labels", 32, train=False, cond_kind="segmentation", num_labels=3)
    torch.manual_seed(0)
    save_checkpoint(PixelClassifier(3).checkpoint(), tmp_path / "segmenter.pt")
    seen = []

    def reconstruct(self, n, canvas_hw=None, cond=None, **kwargs):
        """The next n pairs' own codes (--batch-size 2): the samples are their reconstructions."""
        first = 2 * len(seen)
        seen.append(cond)
        return self.encode_to_grid(torch.stack([pairs[first + k]["image"] for k in range(n)]))
    monkeypatch.setattr(VQGANTransformer, "sample_canvas", reconstruct)
    result = eval_transformer.main(eval_transformer.build_parser().parse_args([
        "--checkpoint-path", str(ckpt), "--reference", str(root / "flowers"), "--cond-path", str(root / "labels"),
        "--segmenter", str(tmp_path / "segmenter.pt"), "--num-samples", "4", "--batch-size", "2", "--device", "cpu",
        "--out-json", str(tmp_path / "m.json"), "--num-workers", "0"]), feature_extractor=RandomConvFeatures())
    assert result["protocol"]["pairs"]["num_pairs"] == 11
    for batch, cond in enumerate(seen):  # pairs 0, 1, then 2, 3
        expected = torch.stack([pairs[2 * batch + k]["cond"] for k in range(2)])
        assert torch.equal(cond, model.encode_condition(expected))
    x = torch.stack([pairs[i]["image"] for i in range(4)])
    expected_psnr = psnr(to_image_range(model.indices_to_image(model.encode_to_grid(x))), to_image_range(x)).mean()
    assert result["psnr_to_reference"] == pytest.approx(expected_psnr.item(), rel=1e-5)
    assert 0 <= result["sample_mean_iou"] <= 1 and 0 <= result["sample_pixel_accuracy"] <= 1
    # The validation loss by hand: every one of the 11 pairs with its condition, in bits.
    x, c = (torch.stack([pairs[i][key] for i in range(len(pairs))]) for key in ("image", "cond"))
    with torch.no_grad():
        _, loss = model(model.encode_to_indices(x), cond=model.encode_condition(c))
    assert result["val_bits_per_token"] == pytest.approx(loss.item() / math.log(2), rel=1e-4)


@pytest.mark.parametrize("flags, error, message", [
    (["--cond-checkpoint", "{stage2}"], CheckpointError, r"transformer_last.pt is a stage-2 \(transformer\) "
     r"checkpoint, which .*; training_transformer.py --cond-checkpoint needs a stage-1 checkpoint"),
    (["--cond-path", "{empty}"], DataError, r"--cond-path: No image files"),
    (["--cond-path", "{elsewhere}"], DataError, r"holds a condition for none of the 11 images"),
    (["--cond-path", None], ValueError, r"--cond-checkpoint goes with --cond-path"),
])
def test_training_errors_are_one_sentence(run, tmp_path, flags, error, message):
    root, ckpt = run
    (tmp_path / "empty").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.new("L", (32, 32)).save(tmp_path / "elsewhere" / "other.png")
    values = dict(stage2=str(ckpt), empty=str(tmp_path / "empty"), elsewhere=str(tmp_path / "elsewhere"))
    args = dict(zip(["--cond-path", "--cond-checkpoint"], [str(root / "labels"), str(root / "labels.pt")]))
    for flag, value in zip(flags[::2], flags[1::2]):
        args[flag] = value.format(**values) if value else None
    given = [item for flag, value in args.items() if value for item in (flag, value)]
    with pytest.raises(error, match=message):
        training_transformer.main(training_transformer.build_parser().parse_args(COND_FLAGS + [
            "--dataset-path", str(root / "flowers"), "--checkpoint-path", str(root / "vqgan.pt"), "--max-steps", "1",
            "--out-dir", str(tmp_path / "out"), *given]))
