"""demo.py end to end with --tiny (data, stage 1, held-out evaluation, stage 2, sampling), and demo_flowers.py's
command line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from data import find_images
from demo_flowers import make_demo_flowers

ROOT = Path(__file__).resolve().parent.parent


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One run of the tiny default demo, which the conditional demo then builds on."""
    out = tmp_path_factory.mktemp("demo")
    return out, demo.main(demo.build_parser().parse_args(["--tiny", "--out-dir", str(out), "--device", "cpu"]))


def test_tiny_demo_runs_every_step_and_measures_heldout_flowers(tiny_demo):
    tiny = demo.TINY
    tmp_path, summary = tiny_demo

    # The figures printed at the end are eval_vqgan.py's, written to results/eval_vqgan.json.
    metrics = json.loads((tmp_path / "results" / "eval_vqgan.json").read_text())
    assert summary["eval_json"] == tmp_path / "results" / "eval_vqgan.json"
    assert (summary["psnr"], summary["ssim"], summary["codebook_usage"]) == \
        (metrics["psnr"], metrics["ssim"], metrics["codebook_usage"])
    assert metrics["num_images"] == tiny.heldout_images and metrics["image_size"] == tiny.image_size
    assert math.isfinite(metrics["psnr"]) and 0 < metrics["codebook_usage"] <= 1

    # Held out means drawn from another seed: no evaluated image is a training image.
    train = [pixels(p) for p in find_images(tmp_path / "data" / f"train-{tiny.image_size}px-{tiny.train_images}")]
    heldout = [pixels(p) for p in find_images(metrics["dataset"])]
    assert len(train) == tiny.train_images and len(heldout) == tiny.heldout_images
    assert all(image.shape == (tiny.image_size, tiny.image_size, 3) for image in train + heldout)
    assert not any(np.array_equal(a, b) for a in heldout for b in train)

    # Both stages trained for their steps, stage 2 on the stage-1 model, validated on the held-out flowers' codes.
    vqgan = torch.load(tmp_path / "checkpoints" / "vqgan_last.pt", weights_only=True)
    gpt = torch.load(tmp_path / "checkpoints" / "transformer_last.pt", weights_only=True)
    assert vqgan["step"] == tiny.vqgan_lr[-1][0] and gpt["step"] == tiny.gpt_steps
    # The learning rate's step decay: the last phase resumed the first one with its own rate.
    assert [group["lr"] for group in vqgan["opt_vq"]["param_groups"]] == [tiny.vqgan_lr[-1][1]]
    steps = [json.loads(line)["step"] for line in (tmp_path / "results" / "vqgan_metrics.jsonl").open()]
    assert steps == [until_step for until_step, _ in tiny.vqgan_lr]  # one log line at the end of each phase
    assert Path(gpt["vqgan_checkpoint"]) == (tmp_path / "checkpoints" / "vqgan_last.pt").resolve()
    assert summary["val_bits_per_token"] is not None and 0 < summary["val_bits_per_token"] < 20

    # The samples, and the enlarged copies of both pictures.
    assert len(list((tmp_path / "samples").glob("sample_*.png"))) == tiny.num_samples
    for small, large in ((tmp_path / "results" / "reconstructions.png", summary["reconstructions"]),
                         (tmp_path / "samples" / "grid.png", summary["samples"])):
        a, b = pixels(small), pixels(large)
        assert b.shape == (tiny.enlarge * a.shape[0], tiny.enlarge * a.shape[1], 3)
        assert np.array_equal(b[::tiny.enlarge, ::tiny.enlarge], a)


def test_tiny_conditional_demo_builds_on_the_default_run(tiny_demo, capsys):
    tiny, c = demo.TINY, demo.COND_TINY
    out, _ = tiny_demo
    default_gpt = out / "checkpoints" / "transformer_last.pt"
    before = default_gpt.stat().st_mtime_ns
    summary = demo.main(demo.build_parser().parse_args(["--tiny", "--conditional", "--out-dir", str(out), "--device",
                                                        "cpu"]))
    assert "Reusing the default demo's flowers and models" in capsys.readouterr().out
    assert default_gpt.stat().st_mtime_ns == before  # the default demo's GPT is the unconditional baseline, kept

    train, heldout = demo.data_dirs(out, tiny)
    for folder in (train, heldout):  # a label map (classes of FLOWER_LABELS) beside every flower
        assert [p.name for p in find_images(demo.labels_dir(folder))] == [p.name for p in find_images(folder)]
    labels = torch.load(out / "labels" / "checkpoints" / "vqgan_last.pt", weights_only=True)
    assert (labels["config"]["image_kind"], labels["config"]["num_labels"]) == ("segmentation", 4)
    cond = torch.load(out / "conditional" / "checkpoints" / "transformer_last.pt", weights_only=True)
    plain = torch.load(default_gpt, weights_only=True)
    assert cond["cond_kind"] == "segmentation" and cond["step"] == plain["step"] == tiny.gpt_steps
    assert Path(cond["cond_checkpoint"]) == (out / "labels" / "checkpoints" / "vqgan_last.pt").resolve()
    same = ("n_layer", "n_head", "n_embd", "pkeep", "embd_pdrop")  # the same GPT, but for the block it reads
    assert [cond["config"][k] for k in same] == [plain["config"][k] for k in same]

    for name in ("conditional", "unconditional"):  # both GPTs measured on the held-out pairs
        saved = json.loads((out / "conditional" / "results" / f"eval_{name}.json").read_text())
        assert saved == summary["results"][name] and saved["protocol"]["pairs"]["num_pairs"] == tiny.heldout_images
        for key in ("val_bits_per_token", "psnr_to_reference", "sample_mean_iou"):
            assert math.isfinite(saved[key]), (name, key)
    assert 0 <= summary["segmenter"]["pixel_accuracy"] <= 1

    cell = tiny.image_size + 2  # make_grid's padding
    assert pixels(summary["pictures"][0]).shape == (tiny.enlarge * (c.layouts * cell + 2),
                                                    tiny.enlarge * ((c.samples_per_layout + 2) * cell + 2), 3)
    large = torch.load(out / "conditional" / "samples" / "large" / "indices.pt", weights_only=True)
    f = 2 ** (len(torch.load(out / "checkpoints" / "vqgan_last.pt", weights_only=True)["config"]["ch_mult"]) - 1)
    side = c.large_scale * tiny.image_size // f  # the large layout's canvas in image tokens
    assert large.shape == (c.samples_per_layout, side, side)


def run_cli(*flags):
    return subprocess.run([sys.executable, str(ROOT / "demo_flowers.py"), *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_demo_flowers_command_line_writes_the_library_images(tmp_path):
    done = run_cli("--out", str(tmp_path / "cli"), "--num-images", "3", "--size", "24", "--seed", "5")
    assert done.returncode == 0, done.stderr
    written = find_images(tmp_path / "cli")
    assert [p.name for p in written] == ["flower_0000.png", "flower_0001.png", "flower_0002.png"]
    same = find_images(make_demo_flowers(tmp_path / "lib", num_images=3, size=24, seed=5))
    other = find_images(make_demo_flowers(tmp_path / "seed0", num_images=3, size=24, seed=0))
    for cli, lib, seed0 in zip(written, same, other):
        assert pixels(cli).shape == (24, 24, 3)
        assert np.array_equal(pixels(cli), pixels(lib))
        assert not np.array_equal(pixels(cli), pixels(seed0))


def test_demo_flowers_command_line_refuses_bad_values_in_one_sentence(tmp_path):
    done = run_cli("--out", str(tmp_path), "--num-images", "0")
    assert done.returncode == 1
    assert done.stderr.startswith("error: --num-images") and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written
