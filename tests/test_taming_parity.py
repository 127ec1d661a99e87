"""Our modules load taming-transformers checkpoints and compute what taming's own code computed."""
from pathlib import Path

import torch

from discriminator import Discriminator
from vqgan import VQGAN

FIXTURES = Path(__file__).parent / "fixtures" / "taming_tiny"


def test_vqgan_matches_taming_reference():
    model = VQGAN.from_taming(FIXTURES / "last.ckpt", FIXTURES / "model.yaml")
    ref = torch.load(FIXTURES / "reference_outputs.pt", weights_only=True)
    assert not model.training
    x = ref["x"]
    with torch.no_grad():
        enc = model.encoder(x)
        h = model.quant_conv(enc)
        z_q, indices, _ = model.quantize(h)
        rec = model.decode(z_q)
    torch.testing.assert_close(enc, ref["encoder_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(h, ref["quant_conv_out"], atol=1e-5, rtol=0)
    assert torch.equal(indices, ref["indices"])
    torch.testing.assert_close(z_q, ref["z_q"], atol=1e-5, rtol=0)
    torch.testing.assert_close(rec, ref["reconstruction"], atol=1e-5, rtol=0)
    # The public path gives the same reconstruction, and so does decoding the indices.
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref["reconstruction"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode_indices(indices), ref["reconstruction"], atol=1e-5, rtol=0)


def test_discriminator_matches_taming_reference():
    disc = Discriminator.from_taming(FIXTURES / "last.ckpt", FIXTURES / "model.yaml")
    ref = torch.load(FIXTURES / "reference_outputs.pt", weights_only=True)
    assert not disc.training
    with torch.no_grad():
        logits = disc(ref["x"])
    torch.testing.assert_close(logits, ref["discriminator_logits"], atol=1e-5, rtol=0)
