"""taming-transformers' Net2NetTransformer checkpoints: parity with taming's own outputs on taming_cond_tiny (a
segmentation-conditioned model), and every other conditioning stage taming has, built from the same weights."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import eval_transformer
import sample_transformer
from checkpoint import CheckpointError
from data import PairedFolder
from eval_transformer import RandomConvFeatures
from mingpt import GPT
from net2net import from_taming
from vqgan import VQGAN, VQGANConfig

FIXTURES = Path(__file__).parent / "fixtures" / "taming_cond_tiny"
REF = torch.load(FIXTURES / "reference_outputs.pt", weights_only=True)


def test_segmentation_conditioned_model_matches_taming():
    model = from_taming(FIXTURES / "last.ckpt", FIXTURES / "model.yaml")
    assert model.cond_kind == "segmentation" and model.prefix_length == 16 and model.gpt.config.vocab_size == 32
    z, c = model.encode_to_indices(REF["x"]), model.encode_condition(REF["c"])
    assert torch.equal(z, REF["z_indices"]) and torch.equal(c.flatten(1), REF["c_indices"])
    logits, _ = model(z, cond=c)  # eval mode: no input noise
    torch.testing.assert_close(logits, REF["logits"], atol=1e-5, rtol=0)
    assert torch.equal(model.sample_indices(2, top_k=1, cond=c), REF["greedy_indices"])
    assert torch.equal(model.sample_canvas(2, top_k=1, cond=c).flatten(1), REF["greedy_indices"])
    decoded = model.vqgan.decode_indices(REF["greedy_indices"].view(2, 4, 4))  # taming's decode is not clamped
    torch.testing.assert_close(decoded, REF["greedy_image"], atol=1e-5, rtol=0)


def test_sample_transformer_reproduces_tamings_greedy_samples_from_label_map_pngs(tmp_path):
    """`sample_transformer.py --taming-config model.yaml --cond-image labels.png --top-k 1`, one PNG per label map
    (pixel value = class), gives taming's greedy_indices row for row."""
    for i, labels in enumerate(REF["labels"]):
        Image.fromarray(labels.numpy().astype(np.uint8)).save(tmp_path / f"labels{i}.png")
        sample_transformer.main(sample_transformer.build_parser().parse_args([
            "--checkpoint-path", str(FIXTURES / "last.ckpt"), "--taming-config", str(FIXTURES / "model.yaml"),
            "--cond-image", str(tmp_path / f"labels{i}.png"), "--top-k", "1", "--num-samples", "1",
            "--out-dir", str(tmp_path / f"out{i}"), "--device", "cpu"]))
        indices = torch.load(tmp_path / f"out{i}" / "indices.pt", weights_only=True)
        assert indices.shape == (1, 4, 4) and torch.equal(indices.flatten(1)[0], REF["greedy_indices"][i])


def test_eval_transformer_measures_a_taming_model_on_pairs(tmp_path):
    """eval_transformer.py --taming-config with the label maps of its reference images: the validation loss is taming's
    cross-entropy of the image tokens after the condition tokens (the fixture's logits), averaged over the pairs."""
    for i in range(4):  # the fixture's two pairs and their mirror images
        x, labels = (REF["x"][i % 2], REF["labels"][i % 2]) if i < 2 else (REF["x"][i % 2].flip(-1),
                                                                             REF["labels"][i % 2].flip(-1))
        pixels = ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(labels.numpy().astype(np.uint8)).save(tmp_path / "labels" / f"{i}.png")
    result = eval_transformer.main(eval_transformer.build_parser().parse_args([
        "--checkpoint-path", str(FIXTURES / "last.ckpt"), "--taming-config", str(FIXTURES / "model.yaml"),
        "--reference", str(tmp_path / "images"), "--cond-path", str(tmp_path / "labels"), "--num-samples", "4",
        "--device", "cpu", "--out-json", str(tmp_path / "m.json"), "--num-workers", "0"]),
        feature_extractor=RandomConvFeatures())
    model = from_taming(FIXTURES / "last.ckpt", FIXTURES / "model.yaml")
    pairs = PairedFolder(tmp_path / "images", tmp_path / "labels", 16, train=False, cond_kind="segmentation",
                         num_labels=5)
    x, c = (torch.stack([pairs[i][key] for i in range(4)]) for key in ("image", "cond"))
    z = model.encode_to_indices(x)
    logits, _ = model(z, cond=model.encode_condition(c))
    assert torch.equal(c[:2].argmax(1), REF["labels"])  # the PNGs hold the fixture's label maps
    torch.testing.assert_close(logits[:2], REF["logits"], atol=1e-5, rtol=0)  # the fixture's image is the PNG's
    expected = F.cross_entropy(logits.flatten(0, 1), z.flatten()).item() / math.log(2)
    assert result["val_bits_per_token"] == pytest.approx(expected, rel=1e-5)
    assert result["num_samples"] == 4 and result["sampling"]["ema"] is False


def variant(tmp_path, ckpt=FIXTURES / "last.ckpt", **params):
    """The fixture's model.yaml with other Net2NetTransformer params (None deletes one); (checkpoint, yaml)."""
    config = yaml.safe_load((FIXTURES / "model.yaml").read_text())
    for key, value in params.items():
        if value is None:
            config["model"]["params"].pop(key, None)
        else:
            config["model"]["params"][key] = value
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    return ckpt, path


def greedy_reference(gpt, prefix, steps):
    """taming's sample(..., sample=False): the whole sequence through the GPT at every step, argmax of the last."""
    x = prefix
    for _ in range(steps):
        x = torch.cat([x, gpt(x)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[:, prefix.shape[1]:]


@pytest.mark.parametrize("params, first_tokens", [
    (dict(cond_stage_config="__is_unconditional__", sos_token=7), lambda z: torch.full((2, 1), 7)),
    (dict(unconditional=True), lambda z: torch.full((2, 1), 0)),  # SOSProvider's default sos_token is 0
    (dict(cond_stage_config={"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}),
     lambda z: torch.tensor([[3], [8]])),  # the class id is the token
])
def test_sos_and_class_stages_put_their_token_first(tmp_path, params, first_tokens):
    model = from_taming(*variant(tmp_path, **params))
    gpt = GPT.from_taming(*variant(tmp_path, **params))
    labels = torch.tensor([3, 8]) if model.num_classes else None
    z = model.encode_to_indices(REF["x"])
    tokens = torch.cat([first_tokens(z), z[:, :-1]], dim=1)
    logits, _ = model(z, labels)
    torch.testing.assert_close(logits, gpt(tokens)[0], atol=1e-6, rtol=0)
    assert model.cond_vqgan is None and model.prefix_length == 1
    assert torch.equal(model.sample_indices(2, top_k=1, labels=labels),
                       greedy_reference(gpt, first_tokens(z), 16))


@pytest.mark.parametrize("downsample, cond_tokens", [(-1, 16), (8, 4)])
def test_first_stage_condition_and_downsample_cond_size(tmp_path, downsample, cond_tokens):
    """__is_first_stage__: the image's own codes as the condition; downsample_cond_size 8: the 16x16 condition is
    shrunk to 8x8 by nearest neighbour (F.interpolate's default, as taming calls it) before it is tokenized."""
    ckpt, path = variant(tmp_path, cond_stage_config="__is_first_stage__", downsample_cond_size=downsample)
    model, gpt = from_taming(ckpt, path), GPT.from_taming(ckpt, path)
    assert model.cond_vqgan is model.vqgan and model.num_cond_tokens == cond_tokens
    c = REF["x"].flip(-1)  # any RGB image
    small = F.interpolate(c, size=(8, 8)) if downsample > 0 else c
    zc = model.vqgan.encode(small)[1].flatten(1)
    assert torch.equal(model.encode_condition(c).flatten(1), zc)
    z = model.encode_to_indices(REF["x"])
    logits, _ = model(z, cond=zc)
    torch.testing.assert_close(logits, gpt(torch.cat([zc, z[:, :-1]], dim=1))[0][:, cond_tokens - 1:], atol=1e-6,
                               rtol=0)
    assert torch.equal(model.sample_indices(2, top_k=1, cond=zc), greedy_reference(gpt, zc, 16))


def test_one_channel_condition_stage_loads_as_gray(tmp_path):
    """A depth-like stage: a one-channel VQModel under cond_stage_model.* (written here from a random VQGAN)."""
    torch.manual_seed(0)
    depth = VQGAN(VQGANConfig(image_kind="gray", image_size=16, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                              attn_resolutions=(4,), z_channels=16, latent_dim=8, num_codebook_vectors=24)).eval()
    state = torch.load(FIXTURES / "last.ckpt", weights_only=True)["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    state.update({f"cond_stage_model.{k}": v for k, v in depth.state_dict().items()})
    torch.save({"state_dict": state}, tmp_path / "depth.ckpt")
    dd = dict(double_z=False, z_channels=16, resolution=16, in_channels=1, out_ch=1, ch=32, ch_mult=[1, 1, 1],
              num_res_blocks=1, attn_resolutions=[4], dropout=0.0)
    model = from_taming(*variant(tmp_path, tmp_path / "depth.ckpt", cond_stage_config={
        "target": "taming.models.vqgan.VQModel", "params": dict(embed_dim=8, n_embed=24, ddconfig=dd)}))
    assert model.cond_kind == "gray"
    d = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(model.encode_condition(d), depth.encode(d)[1])


def test_unsupported_taming_configs_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="permuter .*AlternateParsing is not supported"):
        from_taming(*variant(tmp_path, permuter_config={
            "target": "taming.modules.transformer.permuter.AlternateParsing"}))
    with pytest.raises(ValueError, match="conditioning stage taming.modules.misc.Coord is not supported"):
        from_taming(*variant(tmp_path, cond_stage_config={"target": "taming.modules.misc.Coord"}))
    with pytest.raises(ValueError, match="is not a Net2NetTransformer config"):
        from_taming(FIXTURES / "last.ckpt", FIXTURES.parent / "taming_tiny" / "model.yaml")
    with pytest.raises(CheckpointError, match=r"last.ckpt is a taming-transformers VQGAN checkpoint, which .*; "
                                              r"net2net.from_taming needs a taming-transformers Net2NetTransformer"):
        from_taming(FIXTURES.parent / "taming_tiny" / "last.ckpt", FIXTURES.parent / "taming_tiny" / "model.yaml")
