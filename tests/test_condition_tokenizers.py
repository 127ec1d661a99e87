"""Condition tokenizers in stage 1 (--image-kind gray and segmentation): taming parity of the segmentation model, the
BCE loss, the training script, evaluation by pixel accuracy and mean IoU."""
from pathlib import Path

import pytest
import torch

from vqgan import VQGAN

COND_FIXTURES = Path(__file__).parent / "fixtures" / "taming_cond_tiny"


def test_segmentation_stage_matches_taming_reference():
    """The cond_stage_model of taming's Net2NetTransformer fixture (a VQSegmentationModel, 5 labels) loads as a
    segmentation VQGAN that gives taming's logits and tokens for the one-hot label maps."""
    model = VQGAN.from_taming(COND_FIXTURES / "last.ckpt", COND_FIXTURES / "model.yaml", stage="cond_stage")
    ref = torch.load(COND_FIXTURES / "reference_outputs.pt", weights_only=True)
    assert (model.config.image_kind, model.config.num_labels, model.config.in_channels) == ("segmentation", 5, 5)
    assert not model.training
    c = torch.nn.functional.one_hot(ref["labels"], 5).permute(0, 3, 1, 2).float()
    assert torch.equal(c, ref["c"])
    with torch.no_grad():
        logits, indices, _ = model(c)
    torch.testing.assert_close(logits, ref["cond_reconstruction"], atol=1e-5, rtol=0)
    assert torch.equal(indices.flatten(1), ref["c_indices"])  # (B, 16), row-major as taming's
    first = VQGAN.from_taming(COND_FIXTURES / "last.ckpt", COND_FIXTURES / "model.yaml", stage="first_stage")
    assert first.config.image_kind == "rgb"
    with torch.no_grad():
        assert torch.equal(first.encode(ref["x"])[1].flatten(1), ref["z_indices"])


def test_a_net2net_config_needs_the_stage_named():
    with pytest.raises(ValueError, match="first_stage or cond_stage"):
        VQGAN.from_taming(COND_FIXTURES / "last.ckpt", COND_FIXTURES / "model.yaml")
