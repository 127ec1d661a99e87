"""The tiny model configs and flag lists that the tests share (imported as a normal module, not from conftest), and
the one-line error of a script."""
import pytest

from cli import run_script


# A VQGAN of 32x32 crops, 3 levels (f=4: an 8x8 token grid), 64 codes of dimension 16; no VGG.
TINY = dict(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
            latent_dim=16, num_codebook_vectors=64)
TINY_FLAGS = ["--image-size", "32", "--ch", "32", "--ch-mult", "1", "2", "2", "--num-res-blocks", "1",
              "--attn-resolutions", "8", "--z-channels", "32", "--latent-dim", "16", "--num-codebook-vectors", "64",
              "--batch-size", "4", "--num-workers", "0", "--perceptual-loss-factor", "0", "--device", "cpu",
              "--log-every", "1"]
# A 2-layer GPT over the tiny VQGAN's 64 tokens.
TINY_GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)
STAGE2_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--batch-size", "4",
                "--num-workers", "0", "--device", "cpu", "--log-every", "1"]


def script_error(script, argv, capsys):
    """The one error line (without "error: ") that `python <script>.py *argv` prints on stderr, exiting with 1."""
    with pytest.raises(SystemExit) as stop:
        run_script(script.main, script.build_parser(), list(map(str, argv)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 1 and len(lines) == 1, lines
    return lines[0][len("error: "):]
