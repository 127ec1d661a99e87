"""demo.py end to end with --tiny (data, stage 1, held-out evaluation, stage 2, sampling), and demo_flowers.py's
command line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import demo
from data import find_images
from demo_flowers import make_demo_flowers

ROOT = Path(__file__).resolve().parent.parent


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_tiny_demo_runs_every_step_and_measures_heldout_flowers(tmp_path):
    tiny = demo.TINY
    summary = demo.main(demo.build_parser().parse_args(["--tiny", "--out-dir", str(tmp_path), "--device", "cpu"]))

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
