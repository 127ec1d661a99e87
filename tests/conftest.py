"""What the tests share: the tiny model configs and flag lists, and generated images (nothing is downloaded)."""
import os

import pytest
import torch

from demo_flowers import make_demo_flowers
from runtime import usable_cores

# pytest.ini runs the tests in two pytest-xdist workers. Each computes on its share of the cores: two workers of all
# cores' OpenMP threads each would wait for each other's threads (tiny steps get many times slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """12 readable 40x40 demo images; runs never write into it."""
    return make_demo_flowers(tmp_path_factory.mktemp("flowers"), num_images=12, size=40)
