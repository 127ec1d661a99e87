"""Stage 2: token handling of VQGANTransformer, and the training and sampling scripts end to end."""
import json
import signal
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import data
import sample_transformer
import training_run
import training_transformer
import training_vqgan
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cli import config_from_flags
from demo_flowers import make_demo_flowers
from helpers import STAGE2_FLAGS, TINY, TINY_FLAGS, TINY_GPT, script_error
from transformer import TransformerConfig, VQGANTransformer, corrupt
from vqgan import VQGAN, VQGANConfig

TINY_VQGAN = VQGANConfig(**TINY)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return VQGANTransformer(VQGAN(TINY_VQGAN), TransformerConfig(**TINY_GPT, **kwargs))


def test_pkeep_corruption_rate_and_clean_targets(monkeypatch):
    torch.manual_seed(0)
    indices = torch.randint(0, 64, (200, 64))
    noisy = corrupt(indices, pkeep=0.7, num_codebook_vectors=64)
    changed = (noisy != indices).float().mean().item()
    assert changed == pytest.approx(0.3 * 63 / 64, abs=0.01)  # a replacement equals the original 1/64 of the time
    assert noisy.max() < 64 and torch.equal(corrupt(indices, 1.0, 64), indices)

    model = tiny_model(pkeep=0.5).train()
    seen = {}

    def spy(tokens, targets=None):
        seen.update(tokens=tokens, logits=torch.randn(*tokens.shape, model.gpt.config.vocab_size))
        return seen["logits"], None
    monkeypatch.setattr(model.gpt, "forward", spy)
    indices = torch.randint(0, 64, (4, 64))
    _, loss = model(indices)
    assert loss == F.cross_entropy(seen["logits"].flatten(0, 1), indices.flatten())  # targets stay clean
    assert torch.all(seen["tokens"][:, 0] == 64)  # then the start token...
    assert (seen["tokens"][:, 1:] != indices[:, :-1]).float().mean() > 0.3  # ...and the noised indices, shifted
    model.eval()
    model(indices)
    assert torch.equal(seen["tokens"][:, 1:], indices[:, :-1])  # no noise at evaluation


def test_start_tokens_are_never_codes():
    model = tiny_model()
    assert model.gpt.config.vocab_size == 65 and torch.all(model.start_tokens(3) == 64)
    cond = tiny_model(num_classes=3)
    assert cond.gpt.config.vocab_size == 67
    assert cond.start_tokens(3, torch.tensor([0, 1, 2])).flatten().tolist() == [64, 65, 66]
    with pytest.raises(ValueError, match="class labels"):
        cond.start_tokens(3)
    # Even a GPT that strongly prefers the start token never samples it as a code.
    model.gpt.head.weight.data[64:] = 0.0
    model.gpt.head.weight.data[64:, 0] = 50.0
    model.gpt.ln_f.bias.data.fill_(1.0)
    idx = model.sample_indices(2)
    assert idx.shape == (2, 64) and idx.max() < 64


def test_latent_grid_and_block_size_come_from_stage_1():
    model = tiny_model()
    assert model.latent_hw == (8, 8) and model.num_tokens == 64
    assert tiny_model(image_size=16).num_tokens == 16
    with pytest.raises(ValueError, match="block_size 32 is smaller"):
        VQGANTransformer(VQGAN(TINY_VQGAN), TransformerConfig(n_layer=1, n_head=1, n_embd=8, block_size=32))


def test_log_images_keeps_the_top_half():
    model = tiny_model().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    logs = model.log_images(x, top_k=1)
    assert list(logs) == ["input", "reconstruction", "half_completion", "sample"]
    assert all(v.shape == x.shape for v in logs.values())
    # the completion's top half decodes from the input's own indices: the top rows of pixels agree closely
    indices = model.encode_to_indices(x)
    completion = model.sample_indices(2, top_k=1, prefix=indices[:, :32])
    assert torch.equal(completion[:, :32], indices[:, :32])


def test_stage1_stage2_sampling_end_to_end(tmp_path):
    data = make_demo_flowers(tmp_path / "flowers", num_images=16, size=40)
    stage1 = tmp_path / "stage1"
    training_vqgan.main(training_vqgan.build_parser().parse_args(
        TINY_FLAGS + ["--dataset-path", str(data), "--out-dir", str(stage1), "--max-steps", "3"]))
    vq_ckpt = stage1 / "checkpoints" / "vqgan_last.pt"

    out = tmp_path / "stage2"
    flags = STAGE2_FLAGS + ["--dataset-path", str(data), "--checkpoint-path", str(vq_ckpt), "--out-dir", str(out),
                            "--sample-every", "3", "--save-every", "2"]
    parser = training_transformer.build_parser()
    handler = signal.getsignal(signal.SIGTERM)
    training_transformer.main(parser.parse_args(flags + ["--max-steps", "3"]))
    assert signal.getsignal(signal.SIGTERM) is handler  # main's stop handlers are gone once it returns
    ckpt = load_checkpoint(out / "checkpoints" / "transformer_last.pt")
    assert ckpt["step"] == 3 and set(ckpt) >= {"model", "optimizer", "step", "epoch", "config", "vqgan_checkpoint"}
    assert (out / "results" / "transformer_samples_0000003.png").exists()
    records = [json.loads(line) for line in open(out / "results" / "transformer_metrics.jsonl")]
    assert "val_bits_per_token" in records[-1]  # a held-out split is evaluated
    assert records[-1]["val_bits_per_token"] == pytest.approx(records[-1]["val_loss"] / 0.6931471805599453)

    training_transformer.main(parser.parse_args(flags + ["--max-steps", "5", "--resume"]))
    ckpt = load_checkpoint(out / "checkpoints" / "transformer_last.pt")
    assert ckpt["step"] == 5 and ckpt["optimizer"]["state"][0]["step"] == 5
    assert [json.loads(line)["step"] for line in open(out / "results" / "transformer_metrics.jsonl")] == [1, 2, 3, 4, 5]

    samples = tmp_path / "samples"
    images = sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(out / "checkpoints" / "transformer_last.pt"), "--num-samples", "3",
         "--batch-size", "2", "--out-dir", str(samples), "--device", "cpu"]))
    assert len(images) == 3 and images[0].shape == (3, 32, 32)
    assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "indices.pt", "sample_0000.png",
                                                         "sample_0001.png", "sample_0002.png"]
    assert torch.load(samples / "indices.pt", weights_only=True).shape == (3, 8, 8)  # the token grids, to decode again

    int8 = sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(out / "checkpoints" / "transformer_last.pt"), "--num-samples", "2",
         "--out-dir", str(tmp_path / "int8"), "--device", "cpu", "--quantize", "int8"]))
    assert len(int8) == 2 and int8[0].shape == (3, 32, 32) and int8[0].abs().max() <= 1


def test_conditional_and_precomputed_tokens(tmp_path, monkeypatch):
    for name, seed in (("roses", 0), ("tulips", 1)):
        make_demo_flowers(tmp_path / "data" / name, num_images=8, size=32, seed=seed)
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1" / "vqgan.pt"
    save_checkpoint(dict(model=VQGAN(TINY_VQGAN).state_dict(), config=asdict(TINY_VQGAN), step=0), stage1)
    out = tmp_path / "stage2"
    flags = STAGE2_FLAGS + ["--dataset-path", str(tmp_path / "data"), "--checkpoint-path", str(stage1),
                            "--out-dir", str(out), "--conditional", "--precompute-tokens", "--max-steps", "2",
                            "--sample-every", "2", "--num-workers", "3"]
    # Spies: the workers each loader is asked for (built without them here), and how the loop copies labels.
    workers, label_copies, build_loader, to = [], [], data.build_loader, torch.Tensor.to

    def loader_spy(dataset, batch_size, train=True, num_workers=0, **kwargs):
        workers.append((train, num_workers))
        return build_loader(dataset, batch_size, train=train, **kwargs)

    def to_spy(tensor, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename == training_transformer.__file__ and tensor.dtype == torch.long \
                and tensor.dim() == 1:
            label_copies.append(kwargs.get("non_blocking", False))
        return to(tensor, *args, **kwargs)

    for module in (data, training_run, training_transformer):
        monkeypatch.setattr(module, "build_loader", loader_spy)
    monkeypatch.setattr(torch.Tensor, "to", to_spy)
    training_transformer.main(training_transformer.build_parser().parse_args(flags))
    monkeypatch.undo()
    assert (True, 3) in workers and (False, 3) in workers and all(n == 3 for _, n in workers)  # validation too
    assert label_copies and all(label_copies)  # from pinned memory, without waiting for the copy
    caches = sorted(p.name for p in stage1.parent.glob("tokens_*.pt"))
    assert len(caches) == 2 and caches[0].startswith("tokens_train_32px_")
    train_cache = load_checkpoint(stage1.parent / caches[0])
    assert train_cache["indices"].shape[1] == 64 and train_cache["labels"].unique().tolist() == [0, 1]
    assert len(train_cache["indices"]) % 2 == 0  # each image and its flip
    # A different image size never reuses the cache.
    assert training_transformer.token_cache_path(stage1, 16, ["a"], "train") != \
        training_transformer.token_cache_path(stage1, 32, ["a"], "train")

    ckpt = out / "checkpoints" / "transformer_last.pt"
    assert load_checkpoint(ckpt)["classes"] == ["roses", "tulips"]
    images = sample_transformer.main(sample_transformer.build_parser().parse_args(
        ["--checkpoint-path", str(ckpt), "--num-samples", "2", "--class-id", "1", "--out-dir",
         str(tmp_path / "s"), "--device", "cpu"]))
    assert len(images) == 2
    with pytest.raises(ValueError, match="--class-id"):
        sample_transformer.main(sample_transformer.build_parser().parse_args(
            ["--checkpoint-path", str(ckpt), "--num-samples", "2", "--out-dir", str(tmp_path / "s"),
             "--device", "cpu"]))


@pytest.mark.parametrize("extra, message", [
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 must divide by --n-head 4"),
    (["--block-size", "32"], "--block-size 32 is smaller than the 64 tokens"),
    (["--pkeep", "0"], "--pkeep must be in"),
    (["--image-size", "30"], "--image-size 30 must divide by the stage-1 downsampling factor 4"),
])
def test_impossible_stage2_flags_are_rejected(tmp_path, capsys, extra, message):
    stage1 = tmp_path / "vqgan.pt"
    save_checkpoint(dict(model=VQGAN(TINY_VQGAN).state_dict(), config=asdict(TINY_VQGAN), step=0), stage1)
    data = make_demo_flowers(tmp_path / "flowers", num_images=4, size=32)
    flags = STAGE2_FLAGS + ["--dataset-path", str(data), "--checkpoint-path", str(stage1), "--out-dir",
                            str(tmp_path / "out"), "--max-steps", "1"] + extra
    assert message in script_error(training_transformer, flags, capsys)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_dropout_flag_sets_the_gpts_three_dropouts():
    args = training_transformer.build_parser().parse_args(["--dropout", "0.1"])
    config = config_from_flags(TransformerConfig, args, image_size=32, num_classes=0)
    assert (config.embd_pdrop, config.resid_pdrop, config.attn_pdrop) == (0.1, 0.1, 0.1)
    assert config_from_flags(TransformerConfig, training_transformer.build_parser().parse_args([]), image_size=32,
                             num_classes=0).attn_pdrop == 0  # the paper's: no dropout


def test_missing_stage1_checkpoint_is_one_sentence(tmp_path):
    flags = STAGE2_FLAGS + ["--checkpoint-path", str(tmp_path / "nope.pt"), "--out-dir", str(tmp_path)]
    with pytest.raises(CheckpointError, match="No stage-1 checkpoint at .*python training_vqgan.py"):
        training_transformer.main(training_transformer.build_parser().parse_args(flags))


def test_canvas_sampling_through_the_static_decode_step_is_unchanged():
    """The sliding-window sampler with GPT.decode_fn set (sample_transformer.py --compile) draws the same tokens."""
    model = tiny_model().eval()
    torch.manual_seed(3)
    expected = model.sample_canvas(2, (10, 12))
    model.gpt.decode_fn = model.gpt.decode_step
    torch.manual_seed(3)
    assert torch.equal(model.sample_canvas(2, (10, 12)), expected)
    cache = model.gpt.decode_cache
    greedy = model.sample_canvas(1, (10, 12), top_k=1)  # one row, padded into the 2-row cache kept from above
    assert model.gpt.decode_cache is cache and model.gpt.decode_rows == 2
    model.gpt.decode_fn = None
    assert torch.equal(greedy, model.sample_canvas(1, (10, 12), top_k=1))


def test_compiled_canvas_sampling_compiles_once_for_every_batch_and_window():
    """sample_transformer.py --compile: the sliding-window sampler's compiled step is compiled once, for a batch of 2
    and a padded batch of 1 on a canvas whose window moves (its token input was a strided slice of the window, whose
    strides changed at every position: each one recompiled until dynamo gave up at 8)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = tiny_model().eval()
    model.gpt.decode_fn = torch.compile(model.gpt.decode_step, backend=counting_backend, dynamic=False)
    model.sample_canvas(2, (10, 12), top_k=1)
    model.sample_canvas(1, (10, 12), top_k=1)
    torch._dynamo.reset()
    assert len(graphs) == 1
