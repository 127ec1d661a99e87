"""The tiny model configs and flag lists that the tests share (imported as a normal module, not from conftest), and
the tiny checkpoints written from them."""
from dataclasses import asdict
from pathlib import Path

import torch

from checkpoint import save_checkpoint
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN, VQGANConfig

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


def write_tiny_checkpoints(folder, ema=False, classes=None, **gpt):
    """A tiny stage-2 model's checkpoints as the training scripts write them: (model, stage-1 path, stage-2 path).

    ema: both carry an `ema` entry whose weights differ from the trained ones; classes: names of a class-conditional
    model's classes."""
    torch.manual_seed(0)
    config = TransformerConfig(**{**TINY_GPT, **gpt}, num_classes=len(classes or []))
    model = VQGANTransformer(VQGAN(VQGANConfig(**TINY)), config).eval()
    model.classes = classes
    folder = Path(folder)
    vq_path, path = folder / "checkpoints" / "vqgan_last.pt", folder / "checkpoints" / "transformer_last.pt"

    def halved(module):
        return {k: v * 0.5 if v.is_floating_point() else v for k, v in module.state_dict().items()} if ema else None

    save_checkpoint(dict(model=model.vqgan.state_dict(), ema=halved(model.vqgan), config=asdict(model.vqgan.config),
                         step=5, args=dict(dataset_path="data/flowers", image_size=32, ema_decay=0.9 if ema else None)),
                    vq_path)
    save_checkpoint(dict(model=model.gpt.state_dict(), ema=halved(model.gpt), config=asdict(model.config), step=3,
                         vqgan_checkpoint=str(vq_path), classes=classes,
                         args=dict(dataset_path="data/flowers", n_layer=config.n_layer, max_steps=3, epochs=100,
                                   conditional=bool(classes))), path)
    return model, vq_path, path
