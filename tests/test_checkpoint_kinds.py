"""Every script given the wrong kind of checkpoint says in one line what it got and what it needs: stage 1 and stage 2
.pt files, taming-transformers' VQGAN and transformer checkpoints, model folders, a Hub id with no network, and a
file of none of these kinds."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import app
import eval_transformer
import eval_vqgan
import export
import sample_transformer
import training_transformer
from checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from helpers import STAGE2_FLAGS, script_error, write_tiny_checkpoints

REPO = Path(__file__).resolve().parents[1]
TAMING = REPO / "tests" / "fixtures" / "taming_tiny"
STAGE1 = "is a stage-1 (VQGAN) checkpoint, which eval_vqgan.py, training_transformer.py --checkpoint-path, app.py " \
         "and export.py read"
TAMING2 = "is a taming-transformers transformer (Net2NetTransformer) checkpoint, which sample_transformer.py and " \
          "eval_transformer.py with --taming-config model.yaml, and eval_vqgan.py and export.py with --taming-config " \
          "model.yaml --taming-stage (its VQ models) read"
STAGE2 = "is a stage-2 (transformer) checkpoint, which sample_transformer.py, eval_transformer.py, app.py and " \
         "export.py read"
NEEDS_STAGE1 = "needs a stage-1 checkpoint from training_vqgan.py (or a stage-1 model folder from export.py)"
NEEDS_STAGE2 = "needs a stage-2 checkpoint from training_transformer.py (or a stage-2 model folder from export.py)"


@pytest.fixture(scope="module")
def files(tmp_path_factory, flowers):
    """{name: path} of every kind: our two stages, their exported folders, taming's two, and a stranger."""
    folder = tmp_path_factory.mktemp("kinds")
    _, stage1, stage2 = write_tiny_checkpoints(folder)
    export.main(export.build_parser().parse_args(["--checkpoint-path", str(stage2), "--out", str(folder / "m")]))
    save_checkpoint(dict(features=torch.zeros(4, 8), extractor="random-conv"), folder / "reference_x.pt")
    return dict(stage1=stage1, stage2=stage2, folder2=folder / "m", folder1=folder / "m" / "vqgan",
                taming=TAMING / "last.ckpt", taming2=TAMING / "transformer.ckpt", other=folder / "reference_x.pt",
                flowers=flowers, out=folder / "out")


def test_each_kind_is_told_apart(files):
    kinds = {name: read_checkpoint(files[name]).kind for name in ("stage1", "stage2", "folder1", "folder2", "taming",
                                                                   "taming2", "other")}
    assert kinds == dict(stage1="stage1", stage2="stage2", folder1="stage1", folder2="stage2", taming="taming",
                         taming2="taming-stage2", other=None)


def test_a_stage1_checkpoint_to_sample_transformer_is_one_line_on_stderr(files):
    result = subprocess.run([sys.executable, "sample_transformer.py", "--checkpoint-path", str(files["stage1"]),
                             "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr == (f"error: {files['stage1']} {STAGE1}; sample_transformer.py {NEEDS_STAGE2}.\n")


# (script module, flags with {name} for the files above, what stderr says)
WRONG_KINDS = [
    (eval_transformer, "--checkpoint-path {stage1} --reference {flowers}",
     f"{STAGE1}; eval_transformer.py {NEEDS_STAGE2}."),
    (eval_vqgan, "--checkpoint-path {stage2} --dataset-path {flowers}",
     f"{STAGE2}; eval_vqgan.py {NEEDS_STAGE1} such as the one it was trained on, {{stage1}}."),
    (eval_vqgan, "--checkpoint-path {folder2} --dataset-path {flowers}",
     f"is a stage-2 (transformer) model folder, which sample_transformer.py, eval_transformer.py, app.py and export.py "
     f"read; eval_vqgan.py {NEEDS_STAGE1} such as the one it was trained on, {{folder1}}."),
    (training_transformer, "--checkpoint-path {stage2} --dataset-path {flowers} --out-dir {out}",
     f"{STAGE2}; training_transformer.py --checkpoint-path {NEEDS_STAGE1} such as the one it was trained on, "
     f"{{stage1}}."),
    (sample_transformer, "--checkpoint-path {taming}",
     "is a taming-transformers VQGAN checkpoint, which eval_vqgan.py and export.py with --taming-config model.yaml "
     f"read; sample_transformer.py {NEEDS_STAGE2}."),
    (eval_transformer, "--checkpoint-path {taming2} --reference {flowers}",
     f"{TAMING2}; eval_transformer.py {NEEDS_STAGE2}."),
    (sample_transformer, "--checkpoint-path {folder1}",
     f"is a stage-1 (VQGAN) model folder, which eval_vqgan.py, training_transformer.py --checkpoint-path, app.py and "
     f"export.py read; sample_transformer.py {NEEDS_STAGE2}."),
    (sample_transformer, "--checkpoint-path {stage2} --vqgan-checkpoint {stage2}",
     f"{STAGE2}; --vqgan-checkpoint {NEEDS_STAGE1} such as the one it was trained on, {{stage1}}."),
    (eval_vqgan, f"--checkpoint-path {{stage1}} --taming-config {TAMING / 'model.yaml'} --dataset-path {{flowers}}",
     f"{STAGE1}; --taming-config needs a taming-transformers VQGAN checkpoint (its last.ckpt) or a "
     f"taming-transformers Net2NetTransformer checkpoint."),
    (sample_transformer, f"--checkpoint-path {{stage2}} --taming-config {TAMING / 'transformer.yaml'}",
     f"{STAGE2}; sample_transformer.py --taming-config needs a taming-transformers Net2NetTransformer checkpoint."),
    (eval_transformer, f"--checkpoint-path {{taming}} --taming-config {TAMING / 'model.yaml'} --reference {{flowers}}",
     "is a taming-transformers VQGAN checkpoint, which eval_vqgan.py and export.py with --taming-config model.yaml "
     "read; eval_transformer.py --taming-config needs a taming-transformers Net2NetTransformer checkpoint."),
    (app, "--checkpoint-path {taming2}",
     f"{TAMING2}; app.py {NEEDS_STAGE2} or a stage-1 checkpoint"),
    (export, "--checkpoint-path {other} --out {out}",
     "is not a checkpoint this project writes (it holds features, extractor); export.py needs a stage-2 checkpoint"),
]


@pytest.mark.parametrize("script, flags, message", WRONG_KINDS,
                         ids=[f"{s.__name__}-{f.split()[1]}" for s, f, _ in WRONG_KINDS])
def test_every_script_names_the_kind_it_got(files, script, flags, message, capsys):
    argv = flags.format(**files).split()
    extra = STAGE2_FLAGS if script is training_transformer else [] if script is export else ["--device", "cpu"]
    error = script_error(script, [*argv, *extra], capsys)  # one line, exit code 1
    assert error.startswith(f"{argv[1]} ") and message.format(**files) in error, error
    assert not files["out"].exists()  # nothing was started: training_transformer fails before its run folder


def test_a_hub_id_without_the_network_is_one_sentence():
    with pytest.raises(CheckpointError, match=r"^someone/tiny-vqgan is neither a local file or folder nor a model that "
                                              r"could be fetched from the Hugging Face Hub \(HF_HUB_OFFLINE is set\)"):
        read_checkpoint("someone/tiny-vqgan")
