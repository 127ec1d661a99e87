"""The tiny models' configs and flag lists that the tests share (imported as a normal module, not from conftest), the
one-line error of a script, and the tiny models' checkpoints as the training scripts write them."""
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from checkpoint import save_checkpoint
from cli import run_script
from presets import TINY_GPT, TINY_VQGAN, as_flags
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN, VQGANConfig


TINY = TINY_VQGAN  # presets.py: 32x32 images, f=4 (an 8x8 token grid), 64 codes
# The tiny VQGAN in one process on the CPU, without VGG; the tiny GPT likewise.
TINY_FLAGS = [*as_flags(TINY_VQGAN), "--batch-size", "4", "--num-workers", "0", "--perceptual-loss-factor", "0",
              "--device", "cpu", "--log-every", "1"]
STAGE2_FLAGS = [*as_flags(TINY_GPT), "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--log-every", "1"]


def script_error(script, argv, capsys):
    """The one error line (without "error: ") that `python <script>.py *argv` prints on stderr, exiting with 1."""
    with pytest.raises(SystemExit) as stop:
        run_script(script.main, script.build_parser(), list(map(str, argv)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 1 and len(lines) == 1, lines
    return lines[0][len("error: "):]


# A tokenizer of label maps for TINY's 32x32 images: f = 8 (4x4 condition tokens), 16 codes.
TINY_LABELS = dict(image_size=32, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                   latent_dim=8, num_codebook_vectors=16)


def write_tiny_checkpoints(folder, ema=False, classes=None, num_labels=0, **gpt):
    """The tiny models' checkpoints as the training scripts write them: (stage-2 model, stage-1 path, stage-2 path).

    ema: both carry an `ema` entry whose weights differ from the trained ones; classes: names of a class-conditional
    model's classes; num_labels > 0: the GPT reads label maps of that many classes, tokenized by a TINY_LABELS model
    saved as checkpoints/labels_last.pt (the block grows to 1 + 16 + 63 tokens)."""
    torch.manual_seed(0)
    config = TransformerConfig(**{**TINY_GPT, **(dict(block_size=80) if num_labels else {}), **gpt},
                               num_classes=len(classes or []))
    labels = VQGAN(VQGANConfig(**TINY_LABELS, image_kind="segmentation", num_labels=num_labels)) if num_labels else None
    model = VQGANTransformer(VQGAN(VQGANConfig(**TINY)), config, labels).eval()
    model.classes = classes
    folder = Path(folder)
    vq_path, path = folder / "checkpoints" / "vqgan_last.pt", folder / "checkpoints" / "transformer_last.pt"

    def halved(module):
        return {k: v * 0.5 if v.is_floating_point() else v for k, v in module.state_dict().items()} if ema else None

    save_checkpoint(dict(model=model.vqgan.state_dict(), ema=halved(model.vqgan), config=asdict(model.vqgan.config),
                         step=5, args=dict(dataset_path="data/flowers", image_size=32, ema_decay=0.9 if ema else None)),
                    vq_path)
    cond = {}
    if num_labels:
        cond = dict(cond_checkpoint=str(folder / "checkpoints" / "labels_last.pt"), cond_kind="segmentation")
        save_checkpoint(dict(model=labels.state_dict(), config=asdict(labels.config), step=4,
                             args=dict(dataset_path="data/flowers_labels", image_size=32)), cond["cond_checkpoint"])
    save_checkpoint(dict(model=model.gpt.state_dict(), ema=halved(model.gpt), config=asdict(model.config), step=3,
                         vqgan_checkpoint=str(vq_path), classes=classes, **cond,
                         args=dict(dataset_path="data/flowers", n_layer=config.n_layer, max_steps=3, epochs=100,
                                   conditional=bool(classes))), path)
    return model, vq_path, path
