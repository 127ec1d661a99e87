"""Stage 2: VQGANTransformer = a frozen stage-1 VQGAN that turns images into codebook indices + a GPT over them."""
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import maskgit
from checkpoint import CheckpointError, load_weights, read_checkpoint, write_model_folder
from config import ConfigError, check_positive, config_from_dict
from mingpt import GPT, GPTConfig, pad_rows, sample_next, static_cache
from utils import for_display
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
    cond_downsample: int = 1  # the image condition is resized to 1/S before tokenizing (taming's downsample_cond_size)
    cond_dropout: float = 0.0  # > 0: the null condition replaces the image condition this often (guidance)
    cond_embedding: str = "shared"  # condition code k is token k (taming's one table), or "separate": token K + k
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
        check_positive(self, "cond_downsample")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError("cond_dropout", f"must be in [0, 1), got {self.cond_dropout}.")
        if self.cond_embedding not in ("shared", "separate"):
            raise ConfigError("cond_embedding", f"must be shared or separate, got {self.cond_embedding!r}.")
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


def cond_window_origin(top, left, window_hw, cond_window_hw):
    """Top-left condition token of the condition window that goes with the image window at (top, left).

    taming cuts both windows at the same token coordinates, its condition grid being as fine as the image's. Here the
    condition grid may be coarser or finer (--cond-downsample, another tokenizer's f): the condition window covers
    the same part of the picture, rounded to the nearest condition token (half up). On a canvas of H x W image tokens
    the condition grid is H * hc / h x W * wc / w, so the window never leaves it: top <= H - h gives
    top * hc / h <= Hc - hc, an integer that rounding cannot pass.
    """
    (h, w), (hc, wc) = window_hw, cond_window_hw
    return (2 * top * hc + h) // (2 * h), (2 * left * wc + w) // (2 * w)


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
    """Tokens are the codebook indices in raster order, after a prefix that is never predicted: a start token, then
    with an image condition the condition's tokens (taming's Net2NetTransformer: [condition, image]).

    Vocabulary: the codes (image codes 0 .. K-1; with an image condition its codes too, at 0 .. Kc-1 in taming's
    shared table or at K .. K + Kc - 1 with cond_embedding "separate"), then from B = the end of the codes: the start
    token B (unconditional) or one per class, B .. B + num_classes - 1, then with class_dropout > 0 the null class,
    then with cond_dropout > 0 the null condition token, and last, for the maskgit objective, the [MASK] token. The
    loss is on the image tokens only. A maskgit model reads the whole grid, after its class token when
    class-conditional (maskgit.py), and takes no image condition.
    """

    def __init__(self, vqgan, config: TransformerConfig, cond_vqgan=None, taming=None):
        """cond_vqgan: the frozen stage-1 model that tokenizes the image condition (may be vqgan itself).
        taming: a taming-transformers checkpoint's layout (net2net.py): {"vocab_size", "start": None, "sos" or
        "class", "sos_token"}; its condition codes share the table and there is no start token before them."""
        super().__init__()
        self.vqgan = vqgan.eval().requires_grad_(False)  # frozen: stage 2 never changes the tokenizer
        self.cond_vqgan = None if cond_vqgan is None else cond_vqgan.eval().requires_grad_(False)
        self.config, self.taming = config, taming
        self.num_codebook_vectors = K = vqgan.config.num_codebook_vectors
        f = vqgan.config.downsample_factor
        self.image_size = config.image_size or vqgan.config.image_size
        if self.image_size % f:
            raise ConfigError("image_size", f"{self.image_size} must divide by the stage-1 downsampling factor {f}.")
        self.latent_hw = (self.image_size // f, self.image_size // f)  # the token grid (h, w)
        self.num_tokens = self.latent_hw[0] * self.latent_hw[1]
        self.cond_hw, num_cond_codes = (0, 0), 0
        if cond_vqgan is not None:
            if config.objective == "maskgit":
                raise ConfigError("objective", "maskgit takes no image condition (`cond_path`): an image condition "
                                               "is read by the ar objective.")
            S, fc = config.cond_downsample, cond_vqgan.config.downsample_factor
            if self.image_size % (S * fc):
                raise ConfigError("image_size", f"{self.image_size} must divide by `cond_downsample` {S} times the "
                                                f"condition tokenizer's downsampling factor {fc}.")
            self.cond_hw = (self.image_size // S // fc,) * 2  # the condition's token grid (hc, wc)
            num_cond_codes = cond_vqgan.config.num_codebook_vectors
        elif config.cond_dropout:
            raise ConfigError("cond_dropout", "needs an image condition (`cond_path`).")
        self.num_cond_tokens = self.cond_hw[0] * self.cond_hw[1]
        self.pkeep, self.num_classes = config.pkeep, config.num_classes
        self.num_start_tokens = 0 if taming is not None and taming["start"] is None else 1
        self.prefix_length = self.num_start_tokens + self.num_cond_tokens
        class_token = config.objective == "maskgit" and config.num_classes > 0  # maskgit reads it before the grid
        # ar reads the prefix and all image tokens but the last; maskgit all of them, after its class token
        needed = self.num_tokens + class_token if config.objective == "maskgit" else \
            self.prefix_length + self.num_tokens - 1
        if config.block_size < needed:
            reads = ("its class token and all of them (maskgit)" if class_token else
                     "the start token and all indices but the last")
            what = (f"the {self.num_tokens} tokens of a {self.latent_hw[0]}x{self.latent_hw[1]} latent grid (the GPT "
                    f"reads {reads})") if not self.num_cond_tokens else \
                (f"the {needed} tokens the GPT reads: {'the start token, ' * self.num_start_tokens}the "
                 f"{self.num_cond_tokens} condition tokens ({self.cond_hw[0]}x{self.cond_hw[1]}) and all "
                 f"{self.num_tokens} image indices but the last")
            raise ConfigError("block_size", f"{config.block_size} is smaller than {what}.")
        if taming is not None:  # taming's own table: condition codes as they are, its class ids or SOS as tokens
            self.cond_offset, self.start_token, self.null_token, self.null_cond_token = 0, None, None, None
            self.mask_token, vocab_size = None, taming["vocab_size"]
        else:
            self.cond_offset = K if config.cond_embedding == "separate" and cond_vqgan is not None else 0
            self.start_token = max(K, self.cond_offset + num_cond_codes)  # the first token that is not a code
            vocab_size = self.start_token + max(1, config.num_classes)
            self.null_token = vocab_size if config.class_dropout > 0 else None
            vocab_size += self.null_token is not None
            self.null_cond_token = vocab_size if config.cond_dropout > 0 else None
            vocab_size += self.null_cond_token is not None
            self.mask_token = vocab_size if config.objective == "maskgit" else None
            vocab_size += self.mask_token is not None
        self.gpt = GPT(GPTConfig(vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                                 n_head=config.n_head, n_embd=config.n_embd, embd_pdrop=config.embd_pdrop,
                                 resid_pdrop=config.resid_pdrop, attn_pdrop=config.attn_pdrop,
                                 causal=config.objective == "ar"))

    @classmethod
    def from_checkpoint(cls, path, vqgan_path=None, trust=False, ema=True, user="VQGANTransformer.from_checkpoint",
                        cond_path=None):
        """Rebuild a trained stage-2 model, its stage-1 VQGAN and its condition tokenizer, in eval mode, from a
        checkpoint of training_transformer.py or a model folder of export.py (a local folder or a Hub model id); with
        the EMA weights of each when their runs kept them (--ema-decay), unless ema=False. Another kind of checkpoint
        is an error naming it and `user`'s needs. vqgan_path, cond_path: where the tokenizers are now, if they
        moved."""
        ckpt = read_checkpoint(path, trust).expect("stage2", user=user)
        stage1 = vqgan_path or ckpt.stage1_path()
        if not Path(stage1).exists() and vqgan_path is None:
            raise CheckpointError(f"The stage-1 checkpoint {stage1} that {ckpt.path} was trained on is missing; "
                                  f"pass its new place with --vqgan-checkpoint.")
        vqgan = VQGAN.from_checkpoint(stage1, trust=trust, ema=ema,
                                      user="--vqgan-checkpoint" if vqgan_path else f"the stage-2 model {ckpt.path}")
        cond_vqgan = None
        if ckpt.cond_path() is not None:
            if cond_path is None and ckpt.cond_path() == ckpt.stage1_path():
                cond_path = stage1  # the image's own tokenizer, wherever it is now
            cond_path = cond_path or ckpt.cond_path()
            if not Path(cond_path).exists():
                raise CheckpointError(f"The condition tokenizer {cond_path} that {ckpt.path} was trained with is "
                                      f"missing; pass its new place with --cond-checkpoint.")
            cond_vqgan = vqgan if Path(cond_path).resolve() == Path(stage1).resolve() else VQGAN.from_checkpoint(
                cond_path, trust=trust, ema=ema, user="--cond-checkpoint")
            kind = ckpt.info.get("cond_kind")
            if cond_vqgan.config.image_kind != kind:
                raise CheckpointError(f"The condition tokenizer {cond_path} reads {cond_vqgan.config.image_kind} "
                                      f"images, but the stage-2 model {ckpt.path} was trained on {kind} conditions.")
        model = cls(vqgan, config_from_dict(TransformerConfig, ckpt.config), cond_vqgan)
        load_weights(model.gpt, ckpt.weights(ema), ckpt.path)
        model.classes = ckpt.info.get("classes")
        model.uses_ema = ckpt.uses_ema(ema)
        return model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path, ema=True):
        """A stage-2 model folder of export.py, local or on the Hugging Face Hub (owner/name); as from_checkpoint."""
        return cls.from_checkpoint(name_or_path, ema=ema, user="VQGANTransformer.from_pretrained")

    def save_pretrained(self, folder, vqgan_info=None, cond_info=None, **info):
        """Write a model folder that from_pretrained reads: config.json (with `info`) and model.safetensors of the
        GPT, the stage-1 model's folder in the sub-folder vqgan/ (with `vqgan_info`) and a condition tokenizer of its
        own in cond/ (with `cond_info`)."""
        self.vqgan.save_pretrained(Path(folder) / "vqgan", **(vqgan_info or {}))
        cond = None if self.cond_vqgan is None else "vqgan" if self.cond_vqgan is self.vqgan else "cond"
        if cond == "cond":
            self.cond_vqgan.save_pretrained(Path(folder) / "cond", **(cond_info or {}))
        write_model_folder(folder, "vqgan-transformer", asdict(self.config), self.gpt.state_dict(), vqgan="vqgan",
                           classes=getattr(self, "classes", None), cond=cond, cond_kind=self.cond_kind, **info)

    @property
    def cond_kind(self):
        """What the image condition is: "rgb", "gray" or "segmentation" (the tokenizer's image_kind); None without."""
        return None if self.cond_vqgan is None else self.cond_vqgan.config.image_kind

    def train(self, mode=True):
        """Train the GPT only; the tokenizers stay in eval mode."""
        super().train(mode)
        self.vqgan.eval()
        if self.cond_vqgan is not None:
            self.cond_vqgan.eval()
        return self

    # ---- the prefix: start token and condition tokens ----

    def start_tokens(self, batch_size, labels=None, device=None):
        """(B, 1) start tokens: the start token, or one per class when class-conditional; (B, 0) for a taming model
        conditioned on images alone."""
        device = device or self.gpt.head.weight.device
        if self.num_classes and labels is None:
            raise ValueError("A class-conditional model needs class labels.")
        if self.taming is not None and self.taming["start"] != "sos":
            if self.taming["start"] is None:
                return torch.zeros(batch_size, 0, dtype=torch.long, device=device)
            return labels.to(device).long().view(-1, 1)  # taming's Labelator: the class id is the token
        if self.num_classes:
            return (self.start_token + labels.to(device).long()).view(-1, 1)
        first = self.taming["sos_token"] if self.taming is not None else self.start_token
        return torch.full((batch_size, 1), first, dtype=torch.long, device=device)

    @property
    def guidable(self):
        """Whether the model learned to do without its conditions (a null class or a null image condition)."""
        return self.null_token is not None or self.null_cond_token is not None

    def null_tokens(self, batch_size, device=None):
        """(B, 1) null-class start tokens: the unconditional half of classifier-free guidance."""
        if self.null_token is None:
            raise ValueError("This model was trained without a null class, so it cannot use --cfg-scale: train it "
                             "with --conditional --class-dropout P (P > 0).")
        device = device or self.gpt.head.weight.device
        return torch.full((batch_size, 1), self.null_token, dtype=torch.long, device=device)

    def cond_tokens(self, cond):
        """Condition codes (B, hc, wc) or (B, hc*wc) -> their tokens (B, hc*wc)."""
        return cond.flatten(1).long() + self.cond_offset

    def prefix(self, starts, cond=None, drop_condition=None):
        """(B, P) prefix: the start tokens (B, 0 or 1), then the condition's tokens (B, hc*wc) for its codes cond.
        drop_condition (B,) bool: those rows get the null condition (every condition token the null token)."""
        if self.cond_vqgan is None:
            return starts
        if cond is None:
            raise ValueError("This model is conditioned on an image: pass the condition (--cond-image).")
        tokens = self.cond_tokens(cond).to(starts.device)
        if drop_condition is not None:
            tokens = tokens.masked_fill(drop_condition.view(-1, 1), self.null_cond_token)
        return torch.cat([starts, tokens], dim=1)

    def null_prefix(self, starts, cond=None):
        """The unconditional half of guidance: every condition the model learned to drop is dropped."""
        if not self.guidable:
            raise ValueError("This model was trained without a null class or a null condition, so it cannot use "
                             "--cfg-scale: train it with --class-dropout P or --cond-dropout P (P > 0).")
        if self.null_token is not None:
            starts = self.null_tokens(len(starts), starts.device)
        drop = None if self.null_cond_token is None else torch.ones(len(starts), dtype=torch.bool, device=starts.device)
        return self.prefix(starts, cond, drop)

    # ---- tokenizing and decoding ----

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
    def encode_condition(self, c):
        """Conditions (B, C, H, W) as data.map_to_tensor makes them -> condition codes (B, H/(S fc), W/(S fc)).

        With --cond-downsample S the condition is first resized to 1/S by nearest neighbour, as taming does: a label
        map keeps its labels, and a condition enlarged S times by nearest neighbour comes back exactly.
        """
        S = self.config.cond_downsample
        if c.shape[-2] % S or c.shape[-1] % S:
            raise ValueError(f"A condition of {c.shape[-2]}x{c.shape[-1]} pixels does not divide by "
                             f"--cond-downsample {S}.")
        if S > 1:
            c = F.interpolate(c, size=(c.shape[-2] // S, c.shape[-1] // S), mode="nearest")
        return self.cond_vqgan.encode(c)[1]

    @torch.no_grad()
    def indices_to_image(self, indices):
        """Indices (B, h*w), or token grids (B, H, W) of any canvas, -> images (B, 3, H*f, W*f) in [-1, 1]."""
        grid = indices if indices.dim() == 3 else indices.view(-1, *self.latent_hw)
        return self.vqgan.decode_indices(grid).clamp(-1, 1)  # the whole canvas in one decode

    # ---- training ----

    def forward(self, indices, labels=None, cond=None):
        """Logits (B, h*w, V) of the image tokens and their loss: the GPT reads the prefix, then the (noised)
        indices but the last; cond (B, hc*wc) are the condition's codes when the model has an image condition.

        maskgit: code logits and the loss on the masked tokens of a cosine-schedule share (maskgit.training_loss)."""
        noisy = corrupt(indices, self.pkeep, self.num_codebook_vectors) if self.training else indices
        starts = self.start_tokens(len(indices), labels, indices.device)  # (B, 1)
        if self.training and self.null_token is not None:  # learn p(x) beside p(x | class) for guidance
            dropped = torch.rand(starts.shape, device=starts.device) < self.config.class_dropout
            starts = starts.masked_fill(dropped, self.null_token)
        if self.config.objective == "maskgit":
            return maskgit.training_loss(self, starts if self.num_classes else None, noisy, indices)
        drop = None
        if self.training and self.null_cond_token is not None:  # and p(x | class) beside p(x | class, condition)
            drop = torch.rand(len(indices), device=indices.device) < self.config.cond_dropout
        prefix = self.prefix(starts, cond, drop)
        logits, _ = self.gpt(torch.cat([prefix, noisy[:, :-1]], dim=1))
        logits = logits[:, prefix.shape[1] - 1:]  # (B, h*w, V): the positions that predict image tokens
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), indices.reshape(-1))  # clean targets

    @torch.no_grad()
    def validation_losses(self, indices, labels=None, generator=None, cond=None):
        """A batch's validation losses (0-d tensors) by name, the model in eval mode: ar's cross-entropy val_loss (nats
        per token), maskgit's on the masked tokens at fixed ratios, positions drawn by generator (maskgit.py)."""
        if self.config.objective == "maskgit":
            return maskgit.validation_losses(self, indices, labels, generator)
        return dict(val_loss=self(indices, labels, cond)[1])

    # ---- sampling ----

    @torch.no_grad()
    def sample_indices(self, n, temperature=1.0, top_k=None, top_p=None, labels=None, prefix=None, cond=None):
        """Sample (n, h*w) indices, continuing `prefix` (n, t) if given; special tokens are never sampled.
        cond (n, hc, wc): the condition's codes, for a model with an image condition."""
        tokens = self.prefix(self.start_tokens(n, labels), cond)
        P = tokens.shape[1]
        if prefix is not None:
            tokens = torch.cat([tokens, prefix], dim=1)
        out = self.gpt.generate(tokens, self.num_tokens + P - tokens.shape[1], temperature=temperature, top_k=top_k,
                                top_p=top_p, vocab_limit=self.num_codebook_vectors)
        return out[:, P:]

    def cond_canvas_hw(self, canvas_hw):
        """(Hc, Wc): the condition's token grid that goes with a canvas of H x W image tokens."""
        (H, W), (h, w), (hc, wc) = canvas_hw, self.latent_hw, self.cond_hw
        if H * hc % h or W * wc % w:
            raise ValueError(f"A canvas of {H}x{W} image tokens has no whole condition grid: the condition has "
                             f"{hc}x{wc} tokens for every {h}x{w} image tokens.")
        return H * hc // h, W * wc // w

    @torch.inference_mode()
    def sample_canvas(self, n, canvas_hw=None, temperature=1.0, top_k=None, top_p=None, labels=None, cfg_scale=None,
                      codes=None, regenerate=None, cond=None):
        """Sample token grids (n, H, W) on a canvas of H x W tokens, each token predicted from its sliding window.

        codes (n, H, W) and regenerate (H, W) bool: keep the codes where regenerate is False (completion).
        cond (n or 1, Hc, Wc): the condition's codes on the canvas; each window reads the condition window at
        cond_window_origin of its own origin (both windows slide together, taming's rule).
        cfg_scale: draw from uncond + cfg_scale * (cond - uncond) logits (classifier-free guidance).
        At the training size, with neither, this draws the tokens of sample_indices, token for token.
        """
        (H, W), (h, w) = canvas_hw or self.latent_hw, self.latent_hw
        if H < h or W < w:
            raise ValueError(f"A canvas of {H}x{W} tokens is smaller than the model's {h}x{w} window.")
        device = self.gpt.head.weight.device
        grid = torch.zeros(n, H, W, dtype=torch.long, device=device) if codes is None else codes.to(device).clone()
        regenerate = torch.ones(H, W, dtype=torch.bool) if regenerate is None else regenerate.cpu()
        if self.cond_vqgan is not None and cond is not None:
            if tuple(cond.shape[-2:]) != self.cond_canvas_hw((H, W)):
                raise ValueError(f"The condition's {cond.shape[-2]}x{cond.shape[-1]} tokens do not cover a canvas "
                                 f"of {H}x{W} image tokens ({self.cond_canvas_hw((H, W))} would).")
            cond = cond.to(device).expand(n, -1, -1)
        starts = self.start_tokens(n, labels, device)  # (n, 1)
        guided = cfg_scale is not None and cfg_scale != 1  # scale 1 is the conditional model itself
        hc, wc = self.cond_hw
        cache, window = WindowCache(self.gpt, 2 * n if guided else n), None
        for i, j in regenerate.nonzero().tolist():  # raster order
            top, left = window_origin(i, j, (H, W), (h, w))
            if window != (top, left):  # the prefix of a new window: the condition window slides with it
                window, cond_window = (top, left), None
                if cond is not None:
                    ctop, cleft = cond_window_origin(top, left, (h, w), (hc, wc))
                    cond_window = cond[:, ctop:ctop + hc, cleft:cleft + wc]
                prefix = self.prefix(starts, cond_window)  # (n, P)
                if guided:  # conditional rows, then unconditional ones
                    prefix = torch.cat([prefix, self.null_prefix(starts, cond_window)])  # (2n, P)
            p = (i - top) * w + j - left  # the token's place in its window's raster order
            before = grid[:, top:top + h, left:left + w].flatten(1)[:, :p]  # (n, p): final tokens only
            tokens = torch.cat([prefix, before.repeat(len(prefix) // n, 1)], dim=1)  # (n or 2n, P + p)
            logits = cache.next_logits(tokens, (top, left))[:, :self.num_codebook_vectors]  # image codes only
            if guided:
                cond_logits, uncond = logits.float().chunk(2)
                logits = uncond + cfg_scale * (cond_logits - uncond)
            grid[:, i, j] = sample_next(logits, temperature, top_k, top_p)[:, 0]
        return grid

    @torch.no_grad()
    def log_images(self, x, labels=None, temperature=1.0, top_k=None, top_p=None, cond=None):
        """Input, its reconstruction, a completion of its top half, and a free sample, each (B, 3, H, W); with an
        image condition (B, C, H, W), the condition drawn in colour first and both samples drawn for it."""
        indices = self.encode_to_indices(x)
        codes = None if cond is None else self.encode_condition(cond)
        half = self.num_tokens // 2 // self.latent_hw[1] * self.latent_hw[1]  # whole rows of the top half
        if self.config.objective == "maskgit":  # iterative decoding; the completion keeps the top half's codes
            sample = partial(maskgit.sample_canvas, self, len(x), temperature=temperature, top_k=top_k, top_p=top_p,
                             labels=labels)
            bottom = torch.arange(self.num_tokens).view(self.latent_hw) >= half  # (h, w): regenerated
            completion, free = sample(codes=indices.view(-1, *self.latent_hw), regenerate=bottom), sample()
        else:
            completion = self.sample_indices(len(x), temperature, top_k, top_p, labels, indices[:, :half], codes)
            free = self.sample_indices(len(x), temperature, top_k, top_p, labels, cond=codes)
        logs = {} if cond is None else dict(condition=for_display(cond, self.cond_kind))
        return dict(**logs, input=x.clamp(-1, 1), reconstruction=self.indices_to_image(indices),
                    half_completion=self.indices_to_image(completion), sample=self.indices_to_image(free))
