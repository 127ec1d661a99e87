"""demo.py end to end with --tiny (data, stage 1, held-out evaluation, stage 2, sampling), stopped in stage 1 and run
again, and demo_flowers.py's command line."""
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import demo
import training_vqgan
from checkpoint import load_checkpoint
from cli import run_script
from data import find_images
from demo_flowers import make_demo_flowers
from presets import TINY_GPT, TINY_VQGAN

ROOT = Path(__file__).resolve().parent.parent


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The tiny demo, stopped by a SIGTERM during stage 1's third step, then run again to the end.

    Returns the out dir, the second run's summary, both runs' printed output and the steps each run trained."""
    out = tmp_path_factory.mktemp("demo")
    argv = ["--tiny", "--out-dir", str(out), "--device", "cpu"]
    real_train_step, trained = training_vqgan.train_step, []

    def train_step(stage1, x, step, *args, **kwargs):
        trained.append(step + 1)
        if len(trained) == 3 and not printed:  # in the first run
            os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it; the step goes on, then the run saves
        return real_train_step(stage1, x, step, *args, **kwargs)

    printed = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_vqgan, "train_step", train_step)
        for attempt in range(2):
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    summary = run_script(demo.main, demo.build_parser(), argv)
                except SystemExit as stop:
                    summary = stop.code
            printed.append((stdout.getvalue(), stderr.getvalue(), list(trained)))
            trained.clear()
    return out, summary, printed


@pytest.mark.xdist_group("tiny_demo")
def test_tiny_demo_runs_every_step_and_measures_heldout_flowers(tiny_demo):
    tmp_path, summary, _ = tiny_demo
    tiny = demo.TINY
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"

    # The figures printed at the end are eval_vqgan.py's, written to stage1/results/eval_vqgan.json.
    metrics = json.loads((stage1 / "results" / "eval_vqgan.json").read_text())
    assert summary["eval_json"] == stage1 / "results" / "eval_vqgan.json"
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
    vqgan = torch.load(stage1 / "checkpoints" / "vqgan_last.pt", weights_only=True)
    gpt = torch.load(stage2 / "checkpoints" / "transformer_last.pt", weights_only=True)
    assert vqgan["step"] == tiny.vqgan_steps and gpt["step"] == tiny.gpt_steps
    # The learning rates' step decay: the last phase resumed the first one with its own rate.
    assert [group["lr"] for group in vqgan["opt_vq"]["param_groups"]] == [tiny.vqgan_lr[-1][1]]
    assert {group["lr"] for group in gpt["optimizer"]["param_groups"]} == {tiny.gpt_lr[-1][1]}
    assert gpt["optimizer"]["state"][0]["step"] == tiny.gpt_steps  # one optimizer state throughout
    assert Path(gpt["vqgan_checkpoint"]) == (stage1 / "checkpoints" / "vqgan_last.pt").resolve()
    assert summary["val_bits_per_token"] is not None and 0 < summary["val_bits_per_token"] < 20

    # The samples, and the enlarged copies of both pictures.
    assert len(list((stage2 / "samples").glob("sample_*.png"))) == tiny.num_samples
    for small, large in ((stage1 / "results" / "reconstructions.png", summary["reconstructions"]),
                         (stage2 / "samples" / "grid.png", summary["samples"])):
        a, b = pixels(small), pixels(large)
        assert b.shape == (tiny.enlarge * a.shape[0], tiny.enlarge * a.shape[1], 3)
        assert np.array_equal(b[::tiny.enlarge, ::tiny.enlarge], a)


@pytest.mark.xdist_group("tiny_demo")
def test_the_demo_stopped_in_stage1_says_what_it_saved_and_continues_where_it_stopped(tiny_demo):
    tmp_path, summary, ((out1, err1, trained1), (out2, err2, trained2)) = tiny_demo
    ckpt = tmp_path / "stage1" / "checkpoints" / "vqgan_last.pt"
    assert isinstance(summary, dict)  # the second run finished
    # The first run: SIGTERM in step 3 of phase 1 (steps 1-4), said at once, saved after the step, exit 143.
    assert trained1 == [1, 2, 3]
    assert "SIGTERM received: saving and stopping after the current step." in err1
    assert f"Saved {ckpt} at step 3 (received SIGTERM)." in out1
    again = f"`python demo.py --tiny --out-dir {tmp_path} --device cpu` continues from there."
    said = [line for line in out1.splitlines() if line.startswith("The demo stopped")]
    assert said == [f"The demo stopped during stage 1 (SIGTERM). Saved: the flowers, stage 1 at step 3 of 6 ({ckpt})"
                    f". {again}"]
    assert "Traceback" not in out1 + err1 + out2 + err2
    # The second run trained steps 4 to 6 only: the rest of phase 1, then phase 2.
    assert "==== Stage 1: the VQGAN, steps 4 to 6 (about" in out2 and f"Resumed from {ckpt} at step 3." in out2
    assert trained2 == [4, 5, 6]
    steps = [json.loads(line)["step"] for line in (tmp_path / "stage1" / "results" / "vqgan_metrics.jsonl").open()]
    assert steps == [3, 4, 6]  # logged at the stop and at the end of each phase, none twice
    assert load_checkpoint(ckpt)["opt_vq"]["state"][0]["step"] == 6  # one optimizer state throughout


@pytest.mark.xdist_group("tiny_demo")
def test_each_stage_keeps_its_own_config_and_tensorboard_run(tiny_demo):
    tmp_path, _, _ = tiny_demo
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    vqgan = json.loads((stage1 / "results" / "vqgan_config.json").read_text())
    gpt = json.loads((stage2 / "results" / "transformer_config.json").read_text())
    train_dir = str(tmp_path / "data" / f"train-32px-{demo.TINY.train_images}")
    assert (vqgan["out_dir"], vqgan["dataset_path"], vqgan["max_steps"], vqgan["latent_dim"]) == \
        (str(stage1), train_dir, demo.TINY.vqgan_steps, TINY_VQGAN["latent_dim"])  # the last phase's flags
    assert (gpt["out_dir"], gpt["checkpoint_path"], gpt["max_steps"], gpt["n_layer"]) == \
        (str(stage2), str(stage1 / "checkpoints" / "vqgan_last.pt"), demo.TINY.gpt_steps, TINY_GPT["n_layer"])
    assert not list(tmp_path.rglob("config.json"))
    # A TensorBoard run per stage, each with only its own curves: stage 1's two phases and its resume in one.
    runs = {path.parent.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("events.out.tfevents.*")}
    assert runs == {"stage1/tensorboard/vqgan", "stage2/tensorboard/transformer"}
    vqgan_tags = set(EventAccumulator(str(stage1 / "tensorboard" / "vqgan")).Reload().Tags()["scalars"])
    gpt_tags = set(EventAccumulator(str(stage2 / "tensorboard" / "transformer")).Reload().Tags()["scalars"])
    assert "l1" in vqgan_tags and "bits_per_token" not in vqgan_tags
    assert "bits_per_token" in gpt_tags and "l1" not in gpt_tags


@pytest.mark.xdist_group("tiny_demo")
def test_tiny_conditional_demo_builds_on_the_default_run(tiny_demo, tmp_path, capsys):
    tiny, c = demo.TINY, demo.COND_TINY
    out = tmp_path / "demo"
    shutil.copytree(tiny_demo[0], out)  # with its files' times: the finished stages stay finished
    stage1_ckpt, gpt_ckpt = demo.stage_checkpoints(out)
    before = gpt_ckpt.stat().st_mtime_ns
    summary = demo.main(demo.build_parser().parse_args(["--tiny", "--conditional", "--out-dir", str(out), "--device",
                                                        "cpu"]))
    printed = capsys.readouterr().out
    for stage in ("Stage 1", "Stage 2", "Sampling"):
        assert f"==== {stage}: " in printed and "(finished by an earlier run)" in printed.split(f"==== {stage}: ")[1]
    assert gpt_ckpt.stat().st_mtime_ns == before  # stage 2's GPT is the unconditional baseline, kept

    train, heldout = demo.data_dirs(out, tiny)
    for folder in (train, heldout):  # a label map (classes of FLOWER_LABELS) beside every flower
        assert [p.name for p in find_images(demo.labels_dir(folder))] == [p.name for p in find_images(folder)]
    labels_ckpt, cond_ckpt, _ = demo.conditional_checkpoints(out)
    labels = torch.load(labels_ckpt, weights_only=True)
    assert (labels["config"]["image_kind"], labels["config"]["num_labels"]) == ("segmentation", 4)
    assert labels["step"] == c.labels_steps
    cond, plain = torch.load(cond_ckpt, weights_only=True), torch.load(gpt_ckpt, weights_only=True)
    assert cond["cond_kind"] == "segmentation" and cond["step"] == plain["step"] == tiny.gpt_steps
    assert {group["lr"] for group in cond["optimizer"]["param_groups"]} == {tiny.gpt_lr[-1][1]}  # stage 2's phases
    assert Path(cond["cond_checkpoint"]) == labels_ckpt.resolve()
    assert Path(cond["vqgan_checkpoint"]) == stage1_ckpt.resolve()  # the image stage 1 of stage1/
    same = ("n_layer", "n_head", "n_embd", "pkeep", "embd_pdrop")  # the same GPT, but for the block it reads
    assert [cond["config"][k] for k in same] == [plain["config"][k] for k in same]
    assert (cond["config"]["block_size"], plain["config"]["block_size"]) == (c.block_size, TINY_GPT["block_size"])
    assert cond["config"]["cond_embedding"] == "separate"  # the layout codes' own rows (docs/conditional.md)
    assert "--block-size" in printed and printed.count(f"--block-size {c.block_size}") >= 1
    assert not any(line.count("--block-size") > 1 for line in printed.splitlines() if line.startswith("$ python"))

    results = summary["conditional"]["results"]
    for name in ("conditional", "unconditional"):  # both GPTs measured on the held-out pairs
        saved = json.loads((out / "conditional" / "results" / f"eval_{name}.json").read_text())
        assert saved == results[name] and saved["protocol"]["pairs"]["num_pairs"] == tiny.heldout_images
        for key in ("val_bits_per_token", "psnr_to_reference", "sample_mean_iou"):
            assert math.isfinite(saved[key]), (name, key)
    assert 0 <= summary["conditional"]["segmenter"]["pixel_accuracy"] <= 1

    cell = tiny.image_size + 2  # make_grid's padding
    assert pixels(summary["conditional"]["pictures"][0]).shape == \
        (tiny.enlarge * (c.layouts * cell + 2), tiny.enlarge * ((c.samples_per_layout + 2) * cell + 2), 3)
    large = torch.load(out / "conditional" / "samples" / "large" / "indices.pt", weights_only=True)
    f = 2 ** (len(torch.load(stage1_ckpt, weights_only=True)["config"]["ch_mult"]) - 1)
    side = c.large_scale * tiny.image_size // f  # the large layout's canvas in image tokens
    assert large.shape == (c.samples_per_layout, side, side)

    # Run again: every stage but the two drawings (which keep existing files) was finished by the first run.
    demo.main(demo.build_parser().parse_args(["--tiny", "--conditional", "--out-dir", str(out), "--device", "cpu"]))
    again = capsys.readouterr().out
    assert (again.count("==== "), again.count("(finished by an earlier run)")) == (12, 10)
    assert "$ python" not in again


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
