"""A run remembers itself: --resume takes the run's flags from its checkpoint, its config file and --config, TensorBoard
event files in a run named by the stage, and one line (never a traceback) for the expected failures of a start."""
import json
import sys
import urllib.error
from dataclasses import asdict

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training_transformer
import training_vqgan
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cli import parse_flags, run_script
from demo_flowers import make_demo_flowers
from helpers import STAGE2_FLAGS, TINY, TINY_FLAGS, script_error
from vqgan import VQGAN, VQGANConfig

# a run with non-default model, loss and data flags, which a resume must not need again
FIRST = ["--codebook-dim", "8", "--beta", "0.5", "--disc-start", "1", "--max-steps", "2", "--sample-every", "2"]


@pytest.fixture(scope="module")
def first_run(flowers, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = parse_flags(training_vqgan.build_parser(), [*TINY_FLAGS, *FIRST, "--dataset-path", str(flowers),
                                                       "--out-dir", str(out)])
    training_vqgan.main(args)
    return out, args


@pytest.mark.xdist_group("first_run")
def test_resume_with_no_model_flags_continues_the_same_run(first_run, tmp_path):
    out, first = first_run
    resumed = parse_flags(training_vqgan.build_parser(), ["--out-dir", str(out), "--resume", "--max-steps", "3",
                                                          "--learning-rate", "1e-3"])
    assert (resumed.beta, resumed.codebook_dim, resumed.ch, resumed.dataset_path) == (0.5, 8, 32, first.dataset_path)
    assert resumed.max_steps == 3 and resumed.learning_rate == 1e-3  # what may change mid-run does
    assert resumed.sample_every == 2 and resumed.log_every == 1  # and what is not given again stays the run's
    training_vqgan.main(resumed)
    ckpt = load_checkpoint(out / "checkpoints" / "vqgan_last.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["codebook_dim"] == 8 and ckpt["opt_vq"]["state"][0]["step"] == 3
    assert ckpt["opt_vq"]["param_groups"][0]["lr"] == 1e-3


@pytest.mark.xdist_group("first_run")
def test_a_changed_model_flag_is_refused_naming_it(first_run):
    out, _ = first_run
    with pytest.raises(ValueError, match="--resume continues the run of .* with its own --beta, --ch; start a new"):
        parse_flags(training_vqgan.build_parser(), ["--out-dir", str(out), "--resume", "--ch", "64", "--beta", "0.1",
                                                    "--codebook-dim", "8"])  # the same value may be given


@pytest.mark.xdist_group("first_run")
def test_config_json_round_trips(first_run, tmp_path):
    out, first = first_run
    path = out / "results" / "vqgan_config.json"  # named by the stage: stage 2 in the same --out-dir keeps it
    assert not (out / "config.json").exists()
    saved = json.loads(path.read_text())  # the last start's flags (the resume's, if it ran first)
    assert {k: v for k, v in saved.items() if k not in ("max_steps", "learning_rate", "resume")} == \
        {k: v for k, v in vars(first).items() if k not in ("max_steps", "learning_rate", "resume")}
    again = parse_flags(training_vqgan.build_parser(), ["--config", str(path), "--out-dir", str(tmp_path), "--seed",
                                                        "7"])
    expected = dict(saved, out_dir=str(tmp_path), seed=7, config=str(path), resume=False)
    assert vars(again) == expected  # the file's flags, then the command line's; a new run in a new folder
    (tmp_path / "bad.json").write_text(json.dumps({"no_such_flag": 1}))
    with pytest.raises(Exception, match="no_such_flag"):
        parse_flags(training_vqgan.build_parser(), ["--config", str(tmp_path / "bad.json")])


@pytest.mark.xdist_group("first_run")
def test_tensorboard_has_every_logged_scalar_and_the_grids(first_run):
    out, _ = first_run
    events = EventAccumulator(str(out / "tensorboard" / "vqgan")).Reload()  # a run of its own: stage 2's is beside it
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "l1", "q_loss", "g_loss", "d_loss", "lam", "usage", "perplexity", "lr"} <= scalars
    logged = [json.loads(line) for line in (out / "results" / "vqgan_metrics.jsonl").read_text().splitlines()]
    first_two = [r for r in logged if r["step"] <= 2]
    assert [e.step for e in events.Scalars("l1")][:2] == [1, 2]
    assert [e.value for e in events.Scalars("l1")][:2] == pytest.approx([r["l1"] for r in first_two], rel=1e-6)
    assert "reconstructions" in events.Tags()["images"] and events.Tags()["histograms"]


def test_missing_vgg_weights_is_one_line(flowers, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(sys, "argv", ["training_vqgan.py", *TINY_FLAGS, "--perceptual-loss-factor", "1",
                                      "--dataset-path", str(flowers), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        run_script(training_vqgan.main, training_vqgan.build_parser())
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: LPIPS needs")
    assert "--perceptual-loss-factor 0" in lines[0]


def test_a_missing_stage1_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["training_transformer.py", "--checkpoint-path", str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit) as exit_:
        run_script(training_transformer.main, training_transformer.build_parser())
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and lines == [f"error: No stage-1 checkpoint at {tmp_path / 'none.pt'}: train one "
                                               f"with `python training_vqgan.py` or pass --checkpoint-path."]


def test_a_checkpoint_from_before_a_new_config_field_resumes_with_its_default_or_is_refused(tmp_path):
    """A class-conditional checkpoint written before --class-dropout existed has no null class: resuming it with the
    new default (0.1 with --conditional) must be refused in one sentence, not fail loading the GPT's weights."""
    for name, seed in (("roses", 0), ("tulips", 1)):
        make_demo_flowers(tmp_path / "data" / name, num_images=6, size=32, seed=seed)
    stage1 = tmp_path / "vqgan.pt"
    save_checkpoint(dict(model=VQGAN(VQGANConfig(**TINY)).state_dict(), config=asdict(VQGANConfig(**TINY))), stage1)
    out = tmp_path / "stage2"
    flags = [*STAGE2_FLAGS, "--dataset-path", str(tmp_path / "data"), "--checkpoint-path", str(stage1), "--out-dir",
             str(out), "--conditional", "--max-steps", "1", "--sample-every", "100"]
    parser = training_transformer.build_parser()
    training_transformer.main(parser.parse_args(flags + ["--class-dropout", "0"]))
    path = out / "checkpoints" / "transformer_last.pt"
    old = load_checkpoint(path)
    del old["config"]["class_dropout"], old["args"]["class_dropout"]  # as written before the field existed
    save_checkpoint(old, path)
    with pytest.raises(CheckpointError, match="other values of class_dropout"):
        training_transformer.main(parser.parse_args(flags + ["--resume", "--max-steps", "2"]))
    training_transformer.main(parser.parse_args(flags + ["--resume", "--max-steps", "2", "--class-dropout", "0"]))
    assert load_checkpoint(path)["step"] == 2


@pytest.mark.parametrize("script", [training_vqgan, training_transformer], ids=lambda s: s.__name__)
@pytest.mark.parametrize("out_dir", ["missing", "empty"])
def test_resume_without_a_checkpoint_refuses_and_writes_nothing(script, out_dir, tmp_path, monkeypatch, capsys):
    """A mistyped --out-dir with --resume: one sentence naming the path looked for; no run config, no TensorBoard
    folder, no demo data set (the default --dataset-path is relative to the working folder)."""
    monkeypatch.chdir(tmp_path)
    if out_dir == "empty":
        (tmp_path / "runs" / "my_rnu").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    path = tmp_path / "runs" / "my_rnu" / "checkpoints" / f"{script.RUN_NAME}_last.pt"
    argv = ["--resume", "--out-dir", str(tmp_path / "runs" / "my_rnu"), "--device", "cpu"]
    assert script_error(script, argv, capsys) == f"--resume found no checkpoint at {path}: check --out-dir, or " \
                                                 f"pass --resume auto to start afresh when there is none."
    if script is training_vqgan:  # main() called with parsed flags (a notebook) refuses as well, before writing
        with pytest.raises(CheckpointError, match="--resume found no checkpoint"):
            script.main(script.build_parser().parse_args(argv))
    assert sorted(tmp_path.rglob("*")) == before


def test_resume_auto_starts_afresh_then_continues(flowers, tmp_path, capsys):
    """What a requeued cluster job runs: the same command, once with no checkpoint and once with one."""
    out = tmp_path / "run"
    argv = [*TINY_FLAGS, "--dataset-path", str(flowers), "--out-dir", str(out), "--resume", "auto", "--sample-every",
            "100"]
    path = out / "checkpoints" / "vqgan_last.pt"
    for max_steps in (1, 2):
        run_script(training_vqgan.main, training_vqgan.build_parser(), argv + ["--max-steps", str(max_steps)])
    printed = capsys.readouterr().out
    assert f"--resume auto: no checkpoint at {path}: starting afresh." in printed
    assert f"Resumed from {path} at step 1." in printed
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(path)["opt_vq"]["state"][0]["step"] == 2
    with pytest.raises(SystemExit):
        training_vqgan.build_parser().parse_args(["--resume", "yes"])  # "auto" is the only value
