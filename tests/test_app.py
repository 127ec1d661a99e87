"""app.py driven as a browser drives it, through gradio_client: every endpoint of one page launched on a tiny
class-conditional model with a null class (one launch for the module)."""
import gradio_client
import numpy as np
import pytest
import torch
from PIL import Image

import app
import sample_transformer
import transformer
from helpers import write_tiny_checkpoints
from utils import to_image_range

CLASSES = ["daisy", "rose"]
# number of images, top-k, temperature, seed, class, guidance scale: the sampling settings of both tabs
SETTINGS = [3, 10, 1.0, 0, "rose", 2.0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, client, folder): the page of a tiny model, served on 127.0.0.1 for the module's tests."""
    folder = tmp_path_factory.mktemp("app")
    model, _, path = write_tiny_checkpoints(folder, classes=CLASSES, class_dropout=0.1)
    threads = torch.get_num_threads()
    page = app.main(app.build_parser().parse_args(["--checkpoint-path", str(path), "--threads", "1"]), launch=False)
    app.serve(page, block=False)
    try:
        yield model, gradio_client.Client(page.local_url, verbose=False), folder
    finally:
        page.close()
        torch.set_num_threads(threads)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def gallery(result):
    return [pixels(item["image"]) for item in result]


def random_png(path, size):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return gradio_client.handle_file(str(path))


def test_sample_is_sample_transformer_with_the_page_settings(served, tmp_path):
    model, client, folder = served
    images, status = client.predict(*SETTINGS, 32, 48, api_name="/sample")
    images = gallery(images)
    assert len(images) == 3 and all(image.shape == (32, 48, 3) for image in images)
    assert status == "3 images of 32x48 pixels."
    # The same draws as the script with the same flags: the page's settings map onto them one to one.
    sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(folder / "checkpoints" / "transformer_last.pt"), "--num-samples", "3",
         "--batch-size", "3", "--top-k", "10", "--class-id", "1", "--cfg-scale", "2", "--size", "32", "48",
         "--seed", "0", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)]))
    for i, image in enumerate(images):
        assert np.abs(image - pixels(tmp_path / f"sample_{i:04d}.png")).max() <= 1  # 8-bit rounding only
    again = gallery(client.predict(*SETTINGS[:3], 1, *SETTINGS[4:], 32, 48, api_name="/sample")[0])
    assert any(np.abs(a - b).max() > 0 for a, b in zip(images, again))  # another seed, other images


def test_inpainting_keeps_every_unpainted_token(served, tmp_path, monkeypatch):
    model, client, _ = served
    K = model.num_codebook_vectors
    monkeypatch.setattr(transformer, "sample_next", lambda logits, *a, **k: torch.full((len(logits), 1), K - 1))
    image = random_png(tmp_path / "in.png", (40, 40))
    layer = np.zeros((40, 40, 4), dtype=np.uint8)
    layer[:10, :, 3] = 255  # painted: the top quarter, the top two token rows once cropped to 32 x 32
    Image.fromarray(layer).save(tmp_path / "layer.png")
    editor = dict(background=image, layers=[gradio_client.handle_file(str(tmp_path / "layer.png"))], composite=None)
    shown, images, status = client.predict(editor, "inpaint: the painted part", 0, 0, 0, 0, *SETTINGS,
                                           api_name="/complete")
    assert status == "16 of 64 tokens regenerated (8x8 tokens), 3 images."
    x = sample_transformer.cover(Image.open(tmp_path / "in.png"), (32, 32)).float()[None] / 127.5 - 1
    codes = model.encode_to_grid(x)
    regenerate = torch.zeros(8, 8, dtype=torch.bool)
    regenerate[:2] = True
    expected = (to_image_range(model.indices_to_image(torch.where(regenerate, K - 1, codes)))[0] * 255).round()
    for result in gallery(images):
        assert np.abs(result - expected.permute(1, 2, 0).numpy()).max() <= 1
    assert pixels(shown)[:8].std() == 0 and pixels(shown)[8:].std() > 0  # grey where regenerated

    _, images, status = client.predict(editor, "outpaint: the margins", 8, 0, 0, 4, *SETTINGS, api_name="/complete")
    assert all(result.shape == (36, 40, 3) for result in gallery(images))
    assert status == "26 of 90 tokens regenerated (9x10 tokens), 3 images."


def test_reconstruct_shows_the_crop_its_reconstruction_and_its_tokens(served, tmp_path):
    model, client, _ = served
    crop, reconstruction, tokens, status = client.predict(random_png(tmp_path / "in.png", (48, 40)),
                                                          api_name="/reconstruct")
    x = sample_transformer.cover(Image.open(tmp_path / "in.png"), (32, 32)).float()[None] / 127.5 - 1
    with torch.no_grad():
        x_rec, indices, _ = model.vqgan(x)
    assert np.array_equal(pixels(crop), (x[0] + 1).mul(127.5).round().permute(1, 2, 0).numpy())
    expected = (to_image_range(x_rec.clamp(-1, 1))[0] * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(pixels(reconstruction) - expected).max() <= 1
    assert pixels(tokens).shape == (32, 32, 3)
    assert status.startswith(f"8 x 8 tokens use {indices.unique().numel()} distinct codes of 64")


@pytest.mark.parametrize("endpoint, make_inputs, message", [
    ("/reconstruct", lambda p: [gradio_client.handle_file(str(p / "notes.png"))], "not an image this page can read"),
    ("/reconstruct", lambda p: [random_png(p / "small.png", (4, 6))], "is 6x4 pixels; it needs at least 8"),
    ("/complete", lambda p: [dict(background=random_png(p / "in.png", (32, 32)), layers=[], composite=None),
                             "inpaint: the painted part", 0, 0, 0, 0, *SETTINGS], "Paint over"),
    ("/complete", lambda p: [dict(background=random_png(p / "in.png", (32, 32)), layers=[], composite=None),
                             "outpaint: the margins", 6, 0, 0, 0, *SETTINGS], "multiples of 4 pixels"),
    ("/sample", lambda p: [*SETTINGS, 34, 32], "must be a multiple of the downsampling factor 4"),
    ("/sample", lambda p: [*SETTINGS, 28, 32], "less than minimum value 32"),  # Gradio checks the bounds itself
    ("/sample", lambda p: [*SETTINGS[:4], "tulip", 2.0, 32, 32], "tulip is not in the list of choices"),
])
def test_bad_uploads_and_settings_are_a_message_in_the_page(served, tmp_path, endpoint, make_inputs, message):
    _, client, _ = served
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(*make_inputs(tmp_path), api_name=endpoint)


def test_a_stage1_checkpoint_gives_the_reconstruct_page_only(served):
    _, _, folder = served
    page = app.main(app.build_parser().parse_args(["--checkpoint-path", str(folder / "checkpoints" / "vqgan_last.pt"),
                                                   "--threads", "1"]), launch=False)
    assert [fn.api_name for fn in page.fns.values() if fn.api_name] == ["reconstruct"]
