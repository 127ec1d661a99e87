"""export.py and from_pretrained: model folders (config.json, model.safetensors, README.md) that load into the same
models, with and without EMA, for both stages and a taming checkpoint; refused tensors; every script reading a folder;
the Hub upload (mocked: no network)."""
import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import app
import eval_transformer
import eval_vqgan
import export
import sample_transformer
import training_transformer
from checkpoint import CheckpointError, load_checkpoint
from helpers import STAGE2_FLAGS, write_tiny_checkpoints
from transformer import VQGANTransformer
from vqgan import VQGAN

TAMING = Path(__file__).parent / "fixtures" / "taming_tiny"
TAMING_COND = Path(__file__).parent / "fixtures" / "taming_cond_tiny"  # a segmentation-conditioned Net2NetTransformer


def run_export(checkpoint, out, *flags):
    return export.main(export.build_parser().parse_args(["--checkpoint-path", str(checkpoint), "--out", str(out),
                                                         *flags]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with EMA weights in both stages, a results/ folder, and its exports with and without EMA."""
    folder = tmp_path_factory.mktemp("run")
    _, stage1, stage2 = write_tiny_checkpoints(folder, ema=True)
    results = folder / "results"
    results.mkdir()
    (results / "eval_vqgan.json").write_text(json.dumps(dict(psnr=23.456, ssim=0.7, lpips=None, rfid=None,
                                                             codebook_usage=0.5, perplexity=20.0, num_images=100,
                                                             dataset="data/heldout", checkpoint=str(stage1))))
    (results / "transformer_metrics.jsonl").write_text('{"step": 2, "loss": 4.0}\n{"step": 3, "val_bits_per_token": '
                                                       '5.4321}\n')
    exports = {(stage, ema): run_export(path, folder / f"{stage}-{ema}", *([] if ema else ["--no-ema"]))
               for stage, path in (("stage1", stage1), ("stage2", stage2)) for ema in (True, False)}
    return dict(folder=folder, stage1=stage1, stage2=stage2, exports=exports)


@pytest.mark.parametrize("ema", [True, False])
def test_stage1_folder_is_the_same_model(run, ema):
    folder = run["exports"]["stage1", ema]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded, original = VQGAN.from_pretrained(folder), VQGAN.from_checkpoint(run["stage1"], ema=ema)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), original(x)))
        other = VQGAN.from_checkpoint(run["stage1"], ema=not ema)(x)[0]
    assert not torch.equal(loaded(x)[0], other)  # the EMA and trained weights differ: the right ones were exported
    assert json.loads((folder / "config.json").read_text())["weights"] == ("ema" if ema else "trained")


@pytest.mark.parametrize("ema", [True, False])
def test_stage2_folder_is_the_same_model_with_its_stage1_inside(run, ema):
    folder = run["exports"]["stage2", ema]
    assert {str(p.relative_to(folder)) for p in folder.rglob("*")} == {
        "README.md", "config.json", "model.safetensors", "vqgan", "vqgan/README.md", "vqgan/config.json",
        "vqgan/model.safetensors"}
    loaded = VQGANTransformer.from_pretrained(folder)
    original = VQGANTransformer.from_checkpoint(run["stage2"], ema=ema)
    tokens = torch.randint(0, 64, (2, 64))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], original(tokens)[0])
        assert torch.equal(loaded.indices_to_image(tokens), original.indices_to_image(tokens))
        other = VQGANTransformer.from_checkpoint(run["stage2"], ema=not ema)
        assert not torch.equal(loaded(tokens)[0], other(tokens)[0])
    torch.manual_seed(0)
    a = loaded.sample_canvas(2, top_k=8)
    torch.manual_seed(0)
    assert torch.equal(a, original.sample_canvas(2, top_k=8))
    assert loaded.uses_ema == ema


def test_model_cards_carry_the_runs_record(run):
    card = (run["exports"]["stage2", True] / "README.md").read_text()
    assert "| weights | EMA weights |" in card and "3 optimizer steps" in card
    short = card.split("<details>")[0]  # the table of flags before the full list
    assert "| --dataset-path | data/flowers |" in short and "| --max-steps | 3 |" in short
    assert "--epochs" not in short and "--conditional" not in short  # overridden by --max-steps; off
    assert "| val_bits_per_token | 5.432 |" in card and "(step 3)" in card  # the training log's last values
    assert f'VQGANTransformer.from_pretrained("{run["exports"]["stage2", True]}")' in card
    stage1_card = (run["exports"]["stage2", True] / "vqgan" / "README.md").read_text()
    assert "| PSNR (dB) | 23.46 |" in stage1_card and "(100 images of data/heldout)" in stage1_card
    assert "EMA weights (decay 0.9)" in stage1_card and "5 optimizer steps" in stage1_card
    assert "the trained weights (the checkpoint also has EMA weights" in (
        run["exports"]["stage1", False] / "README.md").read_text()


def test_a_taming_checkpoint_exports_to_the_same_model(tmp_path):
    folder = run_export(TAMING / "last.ckpt", tmp_path / "taming", "--taming-config", str(TAMING / "model.yaml"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(VQGAN.from_pretrained(folder)(x)[0],
                           VQGAN.from_taming(TAMING / "last.ckpt", TAMING / "model.yaml")(x)[0])
    assert "converted from a taming-transformers checkpoint" in (folder / "README.md").read_text()
    # The condition stage of a Net2NetTransformer: a segmentation tokenizer, one of its two VQ models.
    folder = run_export(TAMING_COND / "last.ckpt", tmp_path / "cond", "--taming-config",
                        str(TAMING_COND / "model.yaml"), "--taming-stage", "cond_stage")
    loaded = VQGAN.from_pretrained(folder)
    original = VQGAN.from_taming(TAMING_COND / "last.ckpt", TAMING_COND / "model.yaml", stage="cond_stage")
    assert loaded.config == original.config and loaded.config.image_kind == "segmentation"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values()))


def test_extra_or_missing_tensors_are_refused_in_one_sentence(run, tmp_path):
    folder = tmp_path / "m"
    run_export(run["stage1"], folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^The weights of {folder} do not fit the model its config describes: "
                                              r"1 unknown \(such as extra.weight\) tensors\.$"):
        VQGAN.from_pretrained(folder)
    del tensors["decoder.conv_out.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing \(such as decoder.conv_out.bias\) tensors\.$"):
        VQGAN.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(CheckpointError, match="is damaged or not a safetensors file"):
        VQGAN.from_pretrained(folder)


def test_every_script_reads_a_model_folder(run, tmp_path, flowers):
    folder, out = run["exports"]["stage2", True], tmp_path / "out"
    images = sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(folder), "--num-samples", "2", "--device", "cpu", "--out-dir", str(out)]))
    same = sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(run["stage2"]), "--num-samples", "2", "--device", "cpu", "--out-dir", str(out)]))
    assert all(torch.equal(a, b) for a, b in zip(images, same))
    result = eval_transformer.main(eval_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(folder), "--reference", str(flowers), "--num-samples", "4", "--device", "cpu",
         "--num-workers", "0", "--out-json", str(tmp_path / "e.json"), "--features", "random-conv"]))
    assert result["sampling"]["ema"] is True and result["fid"] > 0
    metrics = eval_vqgan.main(eval_vqgan.build_parser().parse_args(
        ["--checkpoint-path", str(folder / "vqgan"), "--dataset-path", str(flowers), "--device", "cpu",
         "--num-workers", "0", "--out-json", str(tmp_path / "v.json")]))
    assert metrics["num_images"] == 12
    # Stage 2 trained on a stage-1 folder: its checkpoint points at the folder, which sampling then reads.
    ckpt = training_transformer.main(training_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(run["exports"]["stage1", False]), "--dataset-path", str(flowers), "--out-dir",
         str(tmp_path / "s2"), "--max-steps", "1", "--no-tensorboard", "--precompute-tokens", *STAGE2_FLAGS]))
    assert load_checkpoint(ckpt)["vqgan_checkpoint"] == str(run["exports"]["stage1", False].resolve())
    assert len(sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(ckpt), "--num-samples", "1", "--device", "cpu", "--out-dir", str(out)]))) == 1
    page = app.main(app.build_parser().parse_args(["--checkpoint-path", str(folder)]), launch=False)
    assert {fn.api_name for fn in page.fns.values() if fn.api_name} == {"sample", "complete", "reconstruct"}


def test_a_folder_of_ema_weights_refuses_no_ema(run, tmp_path):
    with pytest.raises(CheckpointError, match="holds the EMA weights only; export the checkpoint again with --no-ema"):
        sample_transformer.main(sample_transformer.build_parser().parse_args(
            ["--checkpoint-path", str(run["exports"]["stage2", True]), "--no-ema", "--device", "cpu", "--out-dir",
             str(tmp_path)]))


def test_push_to_hub_sends_the_folder(run, tmp_path, monkeypatch):
    sent = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        sent.update(repo_id=repo_id, files={str(p.relative_to(folder_path)): p.read_bytes()
                                            for p in Path(folder_path).rglob("*") if p.is_file()})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: sent.update(created=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = run_export(run["stage2"], tmp_path / "m", "--push-to-hub", "someone/tiny")
    assert sent["created"] == sent["repo_id"] == "someone/tiny"
    assert sent["files"] == {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(sent["files"]) == 6 and 'from_pretrained("someone/tiny")' in sent["files"]["README.md"].decode()


def test_export_never_overwrites_by_accident(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="exists and is not empty; pass --overwrite"):
        run_export(run["stage1"], tmp_path)
    with pytest.raises(Exception, match="is not a model folder of export.py"):
        run_export(run["stage1"], tmp_path, "--overwrite")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    again = run_export(run["stage1"], run["exports"]["stage1", True], "--overwrite")
    assert sorted(p.name for p in again.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_conditional_model_exports_with_its_condition_tokenizer(tmp_path):
    model, _, path = write_tiny_checkpoints(tmp_path, num_labels=3, cond_dropout=0.1)
    folder = run_export(path, tmp_path / "layouts")
    assert {"cond/README.md", "cond/config.json", "cond/model.safetensors"} <= \
        {str(p.relative_to(folder)) for p in folder.rglob("*")}
    loaded = VQGANTransformer.from_pretrained(folder)
    assert loaded.cond_kind == "segmentation" and loaded.cond_vqgan is not loaded.vqgan
    maps = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 32, 32)), 3).permute(0, 3, 1, 2).float()
    codes, tokens = model.encode_condition(maps), torch.randint(0, 64, (2, 64))
    assert torch.equal(loaded.encode_condition(maps), codes)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, cond=codes)[0], model(tokens, cond=codes)[0])
    card = (folder / "README.md").read_text()
    assert "segmentation image conditions: 4 x 4 tokens from the tokenizer in cond/; guidance (null condition at " \
           "rate 0.1)" in card and "--cond-image condition.png" in card
    assert "4 optimizer steps" in (folder / "cond" / "README.md").read_text()  # the tokenizer's own record
