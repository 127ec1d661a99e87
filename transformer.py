"""Stage 2: VQGANTransformer = a frozen stage-1 VQGAN that turns images into codebook indices + a GPT over them."""
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import maskgit
from checkpoint import CheckpointError, load_weights, read_checkpoint, write_model_folder
from config import ConfigError, check_positive, config_from_dict
from mingpt import GPT, GPTConfig, pad_rows, sample_next, static_cache
from vqgan import VQGAN


def corrupt(indices, pkeep, num_codebook_vectors):
    """Replace each index by a uniformly random code with probability 1 - pkeep (taming's input noise)."""
    if pkeep >= 1.0:
        return indices
    keep = torch.bernoulli(torch.full(indices.shape, pkeep, device=indices.device)).bool()
    return torch.where(keep, indices, torch.randint_like(indices, num_codebook_vectors))


OBJECTIVES = ("ar", "maskgit")


@dataclass
class TransformerConfig:
    """Stage 2: the GPT over a VQGAN's token grid; the defaults are taming's ImageNet transformer."""
    image_size: Optional[int] = None  # training crop; None: the VQGAN's training size
    objective: str = "ar"  # ar: next-token prediction (taming); maskgit: masked tokens, bidirectional (maskgit.py)
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    block_size: int = 256  # at least the h*w tokens of the grid (start token + all indices but the last)
    pkeep: float = 1.0  # probability of keeping each input index (taming's input noise)
    num_classes: int = 0  # 0: unconditional, one start token
    class_dropout: float = 0.0  # > 0: a learned null-class token replaces the class this often (classifier-free)
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    label_smoothing: float = 0.0  # maskgit's cross-entropy on the masked tokens (MaskGIT: 0.1)

    def __post_init__(self):
        """Refuse impossible values once, naming the field (GPTConfig checks the GPT's sizes)."""
        if self.image_size is not None:
            check_positive(self, "image_size")
        if not 0.0 < self.pkeep <= 1.0:
            raise ConfigError("pkeep", f"must be in (0, 1], got {self.pkeep}.")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError("class_dropout", f"must be in [0, 1), got {self.class_dropout}.")
        if self.class_dropout and not self.num_classes:
            raise ConfigError("class_dropout", "needs a class-conditional model (`num_classes` > 0).")
        if self.objective not in OBJECTIVES:
            raise ConfigError("objective", f"must be one of {', '.join(OBJECTIVES)}, got {self.objective}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}.")
        if self.label_smoothing and self.objective != "maskgit":
            raise ConfigError("label_smoothing", "is a setting of the maskgit objective (`objective` maskgit).")

    @staticmethod
    def flag_values(args):
        """cli.config_from_flags: the fields whose flag has another name or default (each other field has its own)."""
        class_dropout = args.class_dropout
        if class_dropout is None:  # a null class for classifier-free guidance when class-conditional
            class_dropout = 0.1 if args.conditional else 0.0
        label_smoothing = args.label_smoothing
        if label_smoothing is None:
            label_smoothing = maskgit.DEFAULT_LABEL_SMOOTHING if args.objective == "maskgit" else 0.0
        return dict(embd_pdrop=args.dropout, resid_pdrop=args.dropout, attn_pdrop=args.dropout,
                    class_dropout=class_dropout, label_smoothing=label_smoothing)


def window_origin(i, j, canvas_hw, window_hw):
    """Top-left token (row, col) of the window that predicts token (i, j) of a canvas: taming's sliding window.

    Inside the canvas the token sits at the window's centre row and column (h // 2, w // 2); near a border the
    window stops at the edge, and the token keeps its own distance to that edge.
    """
    (H, W), (h, w) = canvas_hw, window_hw
    return min(max(i - h // 2, 0), H - h), min(max(j - w // 2, 0), W - w)


class WindowCache:
    """The GPT's key/value cache of one window: the next token of the same window runs alone; any other token
    runs its window's prefix from the start token, so a token never costs more than one forward over a window."""

    def __init__(self, gpt, rows):
        self.gpt, self.origin, self.length = gpt, None, 0
        if gpt.decode_fn is not None:  # the GPT's one static cache, for every batch: rows padded to its size
            self.kv, self.rows = gpt.static_decode_cache(rows)
        else:  # allocated on first use; a new prefix overwrites it from position 0
            self.kv, self.rows = [{} for _ in gpt.blocks], rows

    def next_logits(self, tokens, origin):
        """Logits (B, V) after tokens (B, T): a start token, then the first T - 1 tokens of the window at origin."""
        n, T = tokens.shape
        tokens = pad_rows(tokens, self.rows)
        if origin == self.origin and T == self.length + 1 and self.gpt.decode_fn is not None:
            position = torch.full((), self.length, dtype=torch.long, device=tokens.device)  # static shapes
            # a fresh (B, 1) tensor: the slice's strides (T, 1) would change with T, and each change recompile
            logits = self.gpt.decode_fn(tokens[:, -1:].contiguous(), self.kv, position)[:, None]  # (B, 1, V)
        elif origin == self.origin and T == self.length + 1:
            logits = self.gpt._run(tokens[:, -1:], self.kv, self.length)  # (B, 1, V): the cache holds the rest
        else:
            logits = self.gpt._run(tokens, self.kv, 0)  # (B, T, V)
            if self.gpt.decode_fn is not None:
                static_cache(self.kv)
        self.origin, self.length = origin, T
        return logits[:n, -1]


class VQGANTransformer(nn.Module):
    """Tokens are the codebook indices in raster order, preceded by a start token that is never a code.

    Vocabulary: codes 0 .. K-1, then the start token K (unconditional) or one start token per class,
    K .. K + num_classes - 1 (class-conditional), then with class_dropout > 0 the null class K + num_classes, and
    last, for the maskgit objective, the [MASK] token. A maskgit model reads the whole grid, after its class token
    when class-conditional (maskgit.py).
    """

    def __init__(self, vqgan, config: TransformerConfig):
        super().__init__()
        self.vqgan = vqgan.eval().requires_grad_(False)  # frozen: stage 2 never changes the tokenizer
        self.config = config
        self.num_codebook_vectors = vqgan.config.num_codebook_vectors
        f = vqgan.config.downsample_factor
        self.image_size = config.image_size or vqgan.config.image_size
        if self.image_size % f:
            raise ConfigError("image_size", f"{self.image_size} must divide by the stage-1 downsampling factor {f}.")
        self.latent_hw = (self.image_size // f, self.image_size // f)  # the token grid (h, w)
        self.num_tokens = self.latent_hw[0] * self.latent_hw[1]
        class_token = config.objective == "maskgit" and config.num_classes > 0  # maskgit reads it before the grid
        if config.block_size < self.num_tokens + class_token:
            reads = ("its class token and all of them (maskgit)" if class_token else
                     "the start token and all indices but the last")
            raise ConfigError("block_size", f"{config.block_size} is smaller than the {self.num_tokens} tokens of a "
                                            f"{self.latent_hw[0]}x{self.latent_hw[1]} latent grid (the GPT reads "
                                            f"{reads}).")
        self.pkeep, self.num_classes = config.pkeep, config.num_classes
        self.null_token = self.num_codebook_vectors + config.num_classes if config.class_dropout > 0 else None
        num_start_tokens = max(1, config.num_classes) + (self.null_token is not None)
        self.mask_token = self.num_codebook_vectors + num_start_tokens if config.objective == "maskgit" else None
        vocab_size = self.num_codebook_vectors + num_start_tokens + (self.mask_token is not None)
        self.gpt = GPT(GPTConfig(vocab_size=vocab_size,
                                 block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
                                 n_embd=config.n_embd, embd_pdrop=config.embd_pdrop, resid_pdrop=config.resid_pdrop,
                                 attn_pdrop=config.attn_pdrop, causal=config.objective == "ar"))

    @classmethod
    def from_checkpoint(cls, path, vqgan_path=None, trust=False, ema=True, user="VQGANTransformer.from_checkpoint"):
        """Rebuild a trained stage-2 model and its stage-1 VQGAN, in eval mode, from a checkpoint of
        training_transformer.py or a model folder of export.py (a local folder or a Hub model id); with the EMA weights
        of both when their runs kept them (--ema-decay), unless ema=False. Another kind of checkpoint is an error
        naming it and `user`'s needs."""
        ckpt = read_checkpoint(path, trust).expect("stage2", user=user)
        stage1 = vqgan_path or ckpt.stage1_path()
        if not Path(stage1).exists() and vqgan_path is None:
            raise CheckpointError(f"The stage-1 checkpoint {stage1} that {ckpt.path} was trained on is missing; "
                                  f"pass its new place with --vqgan-checkpoint.")
        vqgan = VQGAN.from_checkpoint(stage1, trust=trust, ema=ema,
                                      user="--vqgan-checkpoint" if vqgan_path else f"the stage-2 model {ckpt.path}")
        model = cls(vqgan, config_from_dict(TransformerConfig, ckpt.config))
        load_weights(model.gpt, ckpt.weights(ema), ckpt.path)
        model.classes = (ckpt.folder if ckpt.folder is not None else ckpt.entries).get("classes")
        model.uses_ema = ckpt.uses_ema(ema)
        return model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path, ema=True):
        """A stage-2 model folder of export.py, local or on the Hugging Face Hub (owner/name); as from_checkpoint."""
        return cls.from_checkpoint(name_or_path, ema=ema, user="VQGANTransformer.from_pretrained")

    def save_pretrained(self, folder, vqgan_info=None, **info):
        """Write a model folder that from_pretrained reads: config.json (with `info`) and model.safetensors of the
        GPT, and the stage-1 model's folder in the sub-folder vqgan/ (with `vqgan_info`)."""
        self.vqgan.save_pretrained(Path(folder) / "vqgan", **(vqgan_info or {}))
        write_model_folder(folder, "vqgan-transformer", asdict(self.config), self.gpt.state_dict(), vqgan="vqgan",
                           classes=getattr(self, "classes", None), **info)

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

    def null_tokens(self, batch_size, device=None):
        """(B, 1) null-class start tokens: the unconditional half of classifier-free guidance."""
        if self.null_token is None:
            raise ValueError("This model was trained without a null class, so it cannot use --cfg-scale: train it "
                             "with --conditional --class-dropout P (P > 0).")
        device = device or self.gpt.head.weight.device
        return torch.full((batch_size, 1), self.null_token, dtype=torch.long, device=device)

    @torch.no_grad()
    def encode_to_indices(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> indices (B, h*w) in raster order."""
        _, indices, _ = self.vqgan.encode(x)
        return indices.flatten(1)

    @torch.no_grad()
    def encode_to_grid(self, x):
        """Images (B, 3, H, W) of any size that divides by f -> token grids (B, H/f, W/f)."""
        return self.vqgan.encode(x)[1]

    @torch.no_grad()
    def indices_to_image(self, indices):
        """Indices (B, h*w), or token grids (B, H, W) of any canvas, -> images (B, 3, H*f, W*f) in [-1, 1]."""
        grid = indices if indices.dim() == 3 else indices.view(-1, *self.latent_hw)
        return self.vqgan.decode_indices(grid).clamp(-1, 1)  # the whole canvas in one decode

    def forward(self, indices, labels=None):
        """Next-token logits (B, h*w, V) and loss: the input is the start token + the (noised) indices but the last.

        maskgit: code logits and the loss on the masked tokens of a cosine-schedule share (maskgit.training_loss)."""
        noisy = corrupt(indices, self.pkeep, self.num_codebook_vectors) if self.training else indices
        starts = self.start_tokens(len(indices), labels, indices.device)  # (B, 1)
        if self.training and self.null_token is not None:  # learn p(x) beside p(x | class) for guidance
            dropped = torch.rand(starts.shape, device=starts.device) < self.config.class_dropout
            starts = starts.masked_fill(dropped, self.null_token)
        if self.config.objective == "maskgit":
            return maskgit.training_loss(self, starts if self.num_classes else None, noisy, indices)
        tokens = torch.cat([starts, noisy[:, :-1]], dim=1)
        return self.gpt(tokens, targets=indices)  # targets stay clean

    @torch.no_grad()
    def validation_losses(self, indices, labels=None, generator=None):
        """A batch's validation losses (0-d tensors) by name, the model in eval mode: ar's cross-entropy val_loss (nats
        per token), maskgit's on the masked tokens at fixed ratios, positions drawn by generator (maskgit.py)."""
        if self.config.objective == "maskgit":
            return maskgit.validation_losses(self, indices, labels, generator)
        return dict(val_loss=self(indices, labels)[1])

    @torch.no_grad()
    def sample_indices(self, n, temperature=1.0, top_k=None, top_p=None, labels=None, prefix=None):
        """Sample (n, h*w) indices, continuing `prefix` (n, t) if given; special tokens are never sampled."""
        tokens = self.start_tokens(n, labels)
        if prefix is not None:
            tokens = torch.cat([tokens, prefix], dim=1)
        out = self.gpt.generate(tokens, self.num_tokens + 1 - tokens.shape[1], temperature=temperature, top_k=top_k,
                                top_p=top_p, vocab_limit=self.num_codebook_vectors)
        return out[:, 1:]

    @torch.inference_mode()
    def sample_canvas(self, n, canvas_hw=None, temperature=1.0, top_k=None, top_p=None, labels=None, cfg_scale=None,
                      codes=None, regenerate=None):
        """Sample token grids (n, H, W) on a canvas of H x W tokens, each token predicted from its sliding window.

        codes (n, H, W) and regenerate (H, W) bool: keep the codes where regenerate is False (completion).
        cfg_scale: draw from uncond + cfg_scale * (cond - uncond) logits (classifier-free guidance).
        At the training size, with neither, this draws the tokens of sample_indices, token for token.
        """
        (H, W), (h, w) = canvas_hw or self.latent_hw, self.latent_hw
        if H < h or W < w:
            raise ValueError(f"A canvas of {H}x{W} tokens is smaller than the model's {h}x{w} window.")
        device = self.gpt.head.weight.device
        grid = torch.zeros(n, H, W, dtype=torch.long, device=device) if codes is None else codes.to(device).clone()
        regenerate = torch.ones(H, W, dtype=torch.bool) if regenerate is None else regenerate.cpu()
        starts = self.start_tokens(n, labels, device)  # (n, 1)
        guided = cfg_scale is not None and cfg_scale != 1  # scale 1 is the conditional model itself
        if guided:
            starts = torch.cat([starts, self.null_tokens(n, device)])  # (2n, 1): conditional rows, then null ones
        cache = WindowCache(self.gpt, len(starts))
        for i, j in regenerate.nonzero().tolist():  # raster order
            top, left = window_origin(i, j, (H, W), (h, w))
            p = (i - top) * w + j - left  # the token's place in its window's raster order
            before = grid[:, top:top + h, left:left + w].flatten(1)[:, :p]  # (n, p): final tokens only
            tokens = torch.cat([starts, before.repeat(len(starts) // n, 1)], dim=1)  # (n or 2n, 1 + p)
            logits = cache.next_logits(tokens, (top, left))[:, :self.num_codebook_vectors]  # codes only
            if guided:
                cond, uncond = logits.float().chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            grid[:, i, j] = sample_next(logits, temperature, top_k, top_p)[:, 0]
        return grid

    @torch.no_grad()
    def log_images(self, x, labels=None, temperature=1.0, top_k=None, top_p=None):
        """Input, its reconstruction, a completion of its top half, and a free sample, each (B, 3, H, W)."""
        indices = self.encode_to_indices(x)
        half = self.num_tokens // 2 // self.latent_hw[1] * self.latent_hw[1]  # whole rows of the top half
        if self.config.objective == "maskgit":  # iterative decoding; the completion keeps the top half's codes
            sample = partial(maskgit.sample_canvas, self, len(x), temperature=temperature, top_k=top_k, top_p=top_p,
                             labels=labels)
            bottom = torch.arange(self.num_tokens).view(self.latent_hw) >= half  # (h, w): regenerated
            completion, free = sample(codes=indices.view(-1, *self.latent_hw), regenerate=bottom), sample()
        else:
            completion = self.sample_indices(len(x), temperature, top_k, top_p, labels, prefix=indices[:, :half])
            free = self.sample_indices(len(x), temperature, top_k, top_p, labels)
        return dict(input=x.clamp(-1, 1), reconstruction=self.indices_to_image(indices),
                    half_completion=self.indices_to_image(completion), sample=self.indices_to_image(free))
