"""app.py's condition tab, driven through gradio_client on a tiny model that reads label maps: the draws of
sample_transformer.py --cond-image with the page's settings, a condition larger than the training size, and bad
conditions as a message in the page."""
import gradio_client
import numpy as np
import pytest
import torch
from PIL import Image

import app
import sample_transformer
from data import map_to_tensor, read_map
from helpers import write_tiny_checkpoints
from utils import for_display, to_image_range

# number of images, top-k, temperature, seed, class (none: no classes), guidance scale (a null condition was learned)
SETTINGS = [3, 10, 1.0, 0, None, 2.0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, folder, page): the page of a tiny model conditioned on label maps of 3 classes, on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("app_condition")
    _, _, path = write_tiny_checkpoints(folder, num_labels=3, cond_dropout=0.1)
    threads = torch.get_num_threads()
    page = app.main(app.build_parser().parse_args(["--checkpoint-path", str(path), "--threads", "1"]), launch=False)
    app.serve(page, block=False)
    try:
        yield gradio_client.Client(page.local_url, verbose=False), folder, page
    finally:
        page.close()
        torch.set_num_threads(threads)


def label_png(path, size, top=3):
    """A random label map PNG (pixel = class 0 .. top - 1) of size (H, W)."""
    Image.fromarray(np.random.default_rng(1).integers(0, top, size, dtype=np.uint8)).save(path)
    return gradio_client.handle_file(str(path))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_a_conditional_model_gets_the_condition_tab_instead_of_sampling(served):
    _, _, page = served
    assert [fn.api_name for fn in page.fns.values() if fn.api_name] == ["condition", "reconstruct"]


def test_condition_is_sample_transformer_with_the_page_settings(served, tmp_path):
    client, folder, _ = served
    shown, images, status = client.predict(label_png(tmp_path / "layout.png", (32, 32)), *SETTINGS,
                                           api_name="/condition")
    images = [pixels(item["image"]) for item in images]
    assert len(images) == 3 and status == "3 images of 32x32 pixels for the condition's 4x4 tokens."
    sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(folder / "checkpoints" / "transformer_last.pt"), "--cond-image",
         str(tmp_path / "layout.png"), "--num-samples", "3", "--batch-size", "3", "--top-k", "10", "--cfg-scale", "2",
         "--seed", "0", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path / "script")]))
    for i, image in enumerate(images):
        assert np.abs(image - pixels(tmp_path / "script" / f"sample_{i:04d}.png")).max() <= 1  # 8-bit rounding only
    layout = map_to_tensor(read_map(tmp_path / "layout.png", "segmentation", 3), "segmentation", 3)[None]
    expected = (to_image_range(for_display(layout, "segmentation"))[0] * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(pixels(shown) - expected).max() <= 1  # the map as read, in the classes' colours

    _, images, status = client.predict(label_png(tmp_path / "wide.png", (32, 64)), *SETTINGS, api_name="/condition")
    assert all(pixels(item["image"]).shape == (32, 64, 3) for item in images)  # the canvas is the condition's size
    assert status == "3 images of 32x64 pixels for the condition's 4x8 tokens."


@pytest.mark.parametrize("make_input, message", [
    (lambda p: None, "Upload a condition first: a label map, a PNG whose pixel values are classes 0 to 2"),
    (lambda p: label_png(p / "odd.png", (36, 32)), r"is 36x32 pixels; both sides must be multiples of 8"),
    (lambda p: label_png(p / "bad.png", (32, 32), top=5), "outside 0 to 2"),
    (lambda p: label_png(p / "tiny.png", (4, 4)), "is 4x4 pixels; it needs at least 8"),
])
def test_bad_conditions_are_a_message_in_the_page(served, tmp_path, make_input, message):
    client, _, _ = served
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(make_input(tmp_path), *SETTINGS, api_name="/condition")
