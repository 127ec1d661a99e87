"""Stage 2: VQGANTransformer = a frozen stage-1 VQGAN that turns images into codebook indices + a GPT over them."""
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from mingpt import GPT, GPTConfig


def corrupt(indices, pkeep, num_codebook_vectors):
    """Replace each index by a uniformly random code with probability 1 - pkeep (taming's input noise)."""
    if pkeep >= 1.0:
        return indices
    keep = torch.bernoulli(torch.full(indices.shape, pkeep, device=indices.device)).bool()
    return torch.where(keep, indices, torch.randint_like(indices, num_codebook_vectors))


@dataclass
class TransformerConfig:
    """Stage 2: the GPT over a VQGAN's token grid; the defaults are taming's ImageNet transformer."""
    image_size: Optional[int] = None  # training crop; None: the VQGAN's training size
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    block_size: int = 256  # at least the h*w tokens of the grid (start token + all indices but the last)
    pkeep: float = 1.0  # probability of keeping each input index (taming's input noise)
    num_classes: int = 0  # 0: unconditional, one start token
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image-size must be positive, got {self.image_size}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} must divide by --n-head {self.n_head}.")
        if not 0.0 < self.pkeep <= 1.0:
            raise ValueError(f"--pkeep must be in (0, 1], got {self.pkeep}.")

    @classmethod
    def from_dict(cls, d):
        """Build from a checkpoint's `config` dict; unknown keys are an error that names them."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"The checkpoint's transformer config has fields this code does not know: {unknown}.")
        return cls(**d)


class VQGANTransformer(nn.Module):
    """Tokens are the codebook indices in raster order, preceded by a start token that is never a code.

    Vocabulary: codes 0 .. K-1, then the start token K (unconditional) or one start token per class,
    K .. K + num_classes - 1 (class-conditional).
    """

    def __init__(self, vqgan, config: TransformerConfig):
        super().__init__()
        self.vqgan = vqgan.eval().requires_grad_(False)  # frozen: stage 2 never changes the tokenizer
        self.config = config
        self.num_codebook_vectors = vqgan.config.num_codebook_vectors
        f = vqgan.config.downsample_factor
        self.image_size = config.image_size or vqgan.config.image_size
        if self.image_size % f:
            raise ValueError(f"--image-size {self.image_size} must divide by the stage-1 downsampling factor {f}.")
        self.latent_hw = (self.image_size // f, self.image_size // f)  # the token grid (h, w)
        self.num_tokens = self.latent_hw[0] * self.latent_hw[1]
        if config.block_size < self.num_tokens:
            raise ValueError(f"--block-size {config.block_size} is smaller than the {self.num_tokens} tokens of a "
                             f"{self.latent_hw[0]}x{self.latent_hw[1]} latent grid (the GPT reads the start token "
                             f"and all indices but the last).")
        self.pkeep, self.num_classes = config.pkeep, config.num_classes
        self.gpt = GPT(GPTConfig(vocab_size=self.num_codebook_vectors + max(1, config.num_classes),
                                 block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
                                 n_embd=config.n_embd, embd_pdrop=config.embd_pdrop, resid_pdrop=config.resid_pdrop,
                                 attn_pdrop=config.attn_pdrop))

    @classmethod
    def from_checkpoint(cls, path, vqgan_path=None, trust=False):
        """Rebuild a trained stage-2 model (and its stage-1 VQGAN) from our checkpoint, in eval mode."""
        from utils import CheckpointError, load_checkpoint
        from vqgan import VQGAN
        ckpt = load_checkpoint(path, trust=trust)
        vqgan_path = vqgan_path or ckpt["vqgan_checkpoint"]
        if not Path(vqgan_path).is_file():
            raise CheckpointError(f"The stage-1 checkpoint {vqgan_path} that {path} was trained on is missing; "
                                  f"pass its new place with --vqgan-checkpoint.")
        model = cls(VQGAN.from_checkpoint(vqgan_path, trust=trust), TransformerConfig.from_dict(ckpt["config"]))
        model.gpt.load_state_dict(ckpt["model"])
        model.classes = ckpt.get("classes")
        return model.eval()

    def train(self, mode=True):
        """Train the GPT only; the VQGAN stays in eval mode."""
        super().train(mode)
        self.vqgan.eval()
        return self

    def start_tokens(self, batch_size, labels=None, device=None):
        """(B, 1) start tokens: K, or K + class label when class-conditional."""
        device = device or self.gpt.head.weight.device
        if self.num_classes:
            if labels is None:
                raise ValueError("A class-conditional model needs class labels.")
            return (self.num_codebook_vectors + labels.to(device).long()).view(-1, 1)
        return torch.full((batch_size, 1), self.num_codebook_vectors, dtype=torch.long, device=device)

    @torch.no_grad()
    def encode_to_indices(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> indices (B, h*w) in raster order."""
        _, indices, _ = self.vqgan.encode(x)
        return indices.flatten(1)

    @torch.no_grad()
    def indices_to_image(self, indices):
        """Indices (B, h*w) -> images (B, 3, H, W) in [-1, 1]."""
        return self.vqgan.decode_indices(indices.view(-1, *self.latent_hw)).clamp(-1, 1)

    def forward(self, indices, labels=None):
        """Next-token logits (B, h*w, V) and loss: the input is the start token + the (noised) indices but the last."""
        noisy = corrupt(indices, self.pkeep, self.num_codebook_vectors) if self.training else indices
        tokens = torch.cat([self.start_tokens(len(indices), labels, indices.device), noisy[:, :-1]], dim=1)
        return self.gpt(tokens, targets=indices)  # targets stay clean

    @torch.no_grad()
    def sample_indices(self, n, temperature=1.0, top_k=None, top_p=None, labels=None, prefix=None):
        """Sample (n, h*w) indices, continuing `prefix` (n, t) if given; special tokens are never sampled."""
        tokens = self.start_tokens(n, labels)
        if prefix is not None:
            tokens = torch.cat([tokens, prefix], dim=1)
        out = self.gpt.generate(tokens, self.num_tokens + 1 - tokens.shape[1], temperature=temperature, top_k=top_k,
                                top_p=top_p, vocab_limit=self.num_codebook_vectors)
        return out[:, 1:]

    @torch.no_grad()
    def sample(self, n, temperature=1.0, top_k=None, top_p=None, labels=None):
        """n new images (n, 3, H, W) in [-1, 1]."""
        return self.indices_to_image(self.sample_indices(n, temperature, top_k, top_p, labels))

    @torch.no_grad()
    def log_images(self, x, labels=None, temperature=1.0, top_k=None, top_p=None):
        """Input, its reconstruction, a completion of its top half, and a free sample, each (B, 3, H, W)."""
        indices = self.encode_to_indices(x)
        half = self.num_tokens // 2 // self.latent_hw[1] * self.latent_hw[1]  # whole rows of the top half
        completion = self.sample_indices(len(x), temperature, top_k, top_p, labels, prefix=indices[:, :half])
        free = self.sample_indices(len(x), temperature, top_k, top_p, labels)
        return dict(input=x.clamp(-1, 1), reconstruction=self.indices_to_image(indices),
                    half_completion=self.indices_to_image(completion), sample=self.indices_to_image(free))
