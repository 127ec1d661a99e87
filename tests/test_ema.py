"""EMA weights (--ema-decay): the update by hand, an exact resume, the checkpoint entry that sampling loads."""
from dataclasses import asdict

import pytest
import torch

import training_transformer
from checkpoint import load_checkpoint, save_checkpoint
from demo_flowers import make_demo_flowers
from ema import EMA
from helpers import STAGE2_FLAGS, TINY
from transformer import VQGANTransformer
from vqgan import VQGAN, VQGANConfig


def test_the_update_by_hand():
    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    model.add_module("frozen", frozen)  # not trained: not averaged, its current value is saved
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.0)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
        model.bias.fill_(1.0)
    ema.update(model)  # 0.9 * old + 0.1 * new
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0]]))
    ema.update(model)
    state = ema.state_dict(model)
    torch.testing.assert_close(state["weight"], torch.tensor([[0.9 * (0.9 * 1 + 0.3), 0.9 * 1.8]]))
    torch.testing.assert_close(state["bias"], torch.tensor([0.9 * 0.1 + 0.1]))
    assert torch.equal(state["frozen.weight"], frozen.weight) and "frozen.weight" not in ema.names
    with ema.applied(model):
        torch.testing.assert_close(model.weight, state["weight"])
    assert torch.equal(model.weight, torch.zeros(1, 2))  # its own weights are back
    with pytest.raises(ValueError, match="EMA decay must be between 0 and 1"):
        EMA(model, 1.0)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Demo flowers and an untrained tiny stage-1 checkpoint."""
    root = tmp_path_factory.mktemp("ema")
    data = make_demo_flowers(root / "flowers", num_images=17, size=32)
    torch.manual_seed(0)
    path = root / "stage1" / "vqgan.pt"
    save_checkpoint(dict(model=VQGAN(VQGANConfig(**TINY)).state_dict(), config=asdict(VQGANConfig(**TINY)), step=0),
                    path)
    return data, path


def train(stage1, out, *extra):
    data, path = stage1
    flags = [*STAGE2_FLAGS, "--dataset-path", str(data), "--checkpoint-path", str(path), "--out-dir", str(out),
             "--precompute-tokens", "--ema-decay", "0.8", "--sample-every", "1000", "--learning-rate", "1e-2", *extra]
    training_transformer.main(training_transformer.build_parser().parse_args(flags))
    return load_checkpoint(out / "checkpoints" / "transformer_last.pt")


def test_resume_continues_the_average_exactly_and_sampling_loads_it(stage1, tmp_path):
    """From token caches training is deterministic: 2 steps + a resume for 2 more give the EMA of 4 steps."""
    straight = train(stage1, tmp_path / "straight", "--max-steps", "4")
    train(stage1, tmp_path / "resumed", "--max-steps", "2")
    resumed = train(stage1, tmp_path / "resumed", "--max-steps", "4", "--resume")
    assert straight["step"] == resumed["step"] == 4
    for name, value in straight["ema"].items():
        assert torch.equal(value, resumed["ema"][name]), name
    assert any(not torch.equal(straight["ema"][n], straight["model"][n]) for n in straight["model"])

    path = tmp_path / "straight" / "checkpoints" / "transformer_last.pt"
    with_ema = VQGANTransformer.from_checkpoint(path)
    without = VQGANTransformer.from_checkpoint(path, ema=False)
    for name, value in with_ema.gpt.state_dict().items():
        assert torch.equal(value, straight["ema"][name]) and torch.equal(without.gpt.state_dict()[name],
                                                                         straight["model"][name])
