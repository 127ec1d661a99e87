"""VQGAN: encoder -> quant_conv -> codebook -> post_quant_conv -> decoder; config, adaptive GAN weight, loading."""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from checkpoint import load_weights, read_checkpoint, read_taming, write_model_folder
from codebook import Codebook, EMACodebook
from config import ConfigError, check_positive, config_from_dict
from decoder import Decoder
from encoder import Encoder
from scalar_quantizers import FSQ, LFQ

IMAGE_KINDS = ("rgb", "gray", "segmentation")  # what stage 1 tokenizes: photos, depth/edge maps, label maps
QUANTIZERS = ("vq", "ema", "fsq", "lfq")  # vq: the paper's; see codebook.py and scalar_quantizers.py


@dataclass
class VQGANConfig:
    """Paper defaults for 256x256 images: f=16 (16x16 latents), 1024 codes of dimension 256."""
    image_size: int = 256  # the training resolution; decides at which levels attention sits
    image_kind: str = "rgb"  # rgb; gray (one channel: depth, edges); segmentation (one-hot label maps in, logits out)
    num_labels: int = 0  # segmentation: the number of classes, which is also the number of channels
    in_channels: int = None  # None: follows image_kind (3, 1 or num_labels); a value given must agree
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    z_channels: int = 256
    dropout: float = 0.0
    latent_dim: int = 256
    quantizer: str = "vq"  # vq (the paper), ema, fsq, lfq: see codebook.py and scalar_quantizers.py
    num_codebook_vectors: int = None  # None: 1024 for vq and ema; fsq and lfq derive it from levels or bits
    beta: float = 0.25
    codebook_dim: int = 0  # 0: look codes up in the latent space itself (the paper)
    codebook_l2_norm: bool = False
    restart_dead_codes: bool = False
    restart_every: int = 25
    rotation_trick: bool = False
    kmeans_init: bool = False
    codebook_ema_decay: float = 0.99
    fsq_levels: tuple = ()
    lfq_bits: int = 0
    lfq_entropy_weight: float = 0.1
    lfq_diversity_weight: float = 1.0

    def __post_init__(self):
        """Refuse impossible values once, naming the field."""
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        self.fsq_levels, self.lfq_bits = tuple(self.fsq_levels or ()), self.lfq_bits or 0
        self.num_codebook_vectors = self.check_quantizer()
        self.in_channels = self.check_image_kind()
        check_positive(self, "image_size", "ch", "num_res_blocks", "latent_dim", "num_codebook_vectors", "z_channels",
                       "restart_every")
        if self.codebook_dim < 0:
            raise ConfigError("codebook_dim", f"must be 0 (the `latent_dim`) or positive, got {self.codebook_dim}.")
        if any(m <= 0 for m in self.ch_mult):
            raise ConfigError("ch_mult", f"values must be positive, got {list(self.ch_mult)}.")
        f = self.downsample_factor
        if self.image_size % f:
            raise ConfigError("image_size", f"{self.image_size} must divide by the downsampling factor {f} "
                                            f"(2 ** (len(`ch_mult`) - 1)).")
        resolutions = {self.image_size // 2 ** i for i in range(len(self.ch_mult))}
        missing = sorted(set(self.attn_resolutions) - resolutions)
        if missing:
            raise ConfigError("attn_resolutions", f"{missing} never occur; the feature maps are "
                                                  f"{sorted(resolutions)} wide.")
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise ConfigError("ch", "times every `ch_mult` value must divide by 32 (GroupNorm uses 32 groups).")

    def check_image_kind(self):
        """The channel count `image_kind` implies; a ConfigError naming the fields when they do not fit."""
        kind, n = self.image_kind, self.num_labels or 0
        self.num_labels = n
        if kind not in IMAGE_KINDS:
            raise ConfigError("image_kind", f"must be one of {', '.join(IMAGE_KINDS)}, got {kind!r}.")
        if kind == "segmentation" and n < 2:
            raise ConfigError("num_labels", f"must be given for `image_kind` segmentation: the number of classes (2 "
                                            f"or more), got {n}.")
        if kind != "segmentation" and n:
            raise ConfigError("num_labels", f"only applies to `image_kind` segmentation, not {kind}.")
        channels = {"rgb": 3, "gray": 1, "segmentation": n}[kind]
        if self.in_channels is not None and self.in_channels != channels:
            raise ConfigError("in_channels", f"{self.in_channels} does not match `image_kind` {kind}, which has "
                                             f"{channels} channel(s).")
        return channels

    def check_quantizer(self):
        """The codebook size the quantizer fields make; a ConfigError naming the fields when they do not fit."""
        q, n = self.quantizer, self.num_codebook_vectors
        if q not in QUANTIZERS:
            raise ConfigError("quantizer", f"must be one of {', '.join(QUANTIZERS)}, got {q!r}.")
        if self.fsq_levels and q != "fsq":
            raise ConfigError("fsq_levels", f"only applies to `quantizer` fsq, not {q}.")
        if self.lfq_bits and q != "lfq":
            raise ConfigError("lfq_bits", f"only applies to `quantizer` lfq, not {q}.")
        if q in ("vq", "ema"):
            if not 0 < self.codebook_ema_decay < 1:
                raise ConfigError("codebook_ema_decay", f"must lie between 0 and 1, got {self.codebook_ema_decay}.")
            return 1024 if n is None else n
        learned = [name for name in ("codebook_dim", "codebook_l2_norm", "restart_dead_codes", "rotation_trick",
                                     "kmeans_init") if getattr(self, name)]
        if learned:
            raise ConfigError(learned[0], f"is for a learned codebook (`quantizer` vq or ema); {q} has none.")
        if q == "fsq":
            if not self.fsq_levels or min(self.fsq_levels) < 2:
                raise ConfigError("fsq_levels", f"must be given for `quantizer` fsq, each at least 2 (e.g. 8 8 8 for "
                                                f"512 codes), got {list(self.fsq_levels)}.")
            size, given = math.prod(self.fsq_levels), f"`fsq_levels` {' '.join(map(str, self.fsq_levels))}"
        else:
            if not 1 <= self.lfq_bits <= 16:
                raise ConfigError("lfq_bits", f"must be between 1 and 16 for `quantizer` lfq (2^bits codes, all of "
                                              f"which its entropy loss scores), got {self.lfq_bits}.")
            size, given = 2 ** self.lfq_bits, f"`lfq_bits` {self.lfq_bits}"
        if n is not None and n != size:
            raise ConfigError("num_codebook_vectors", f"{n} does not match {given}, which make {size} codes; "
                                                      f"leave it out.")
        return size

    @property
    def downsample_factor(self):
        return 2 ** (len(self.ch_mult) - 1)



def build_quantizer(c):
    """The quantizer that `c.quantizer` names, from a (validated) VQGANConfig."""
    if c.quantizer in ("vq", "ema"):
        kw = dict(num_codebook_vectors=c.num_codebook_vectors, latent_dim=c.latent_dim, beta=c.beta,
                  codebook_dim=c.codebook_dim or None, l2_norm=c.codebook_l2_norm,
                  restart_dead_codes=c.restart_dead_codes, restart_every=c.restart_every,
                  rotation_trick=c.rotation_trick, kmeans_init=c.kmeans_init)
        return Codebook(**kw) if c.quantizer == "vq" else EMACodebook(decay=c.codebook_ema_decay, **kw)
    if c.quantizer == "fsq":
        return FSQ(levels=c.fsq_levels, latent_dim=c.latent_dim)
    if c.quantizer == "lfq":
        return LFQ(bits=c.lfq_bits, latent_dim=c.latent_dim, beta=c.beta, entropy_weight=c.lfq_entropy_weight,
                   diversity_weight=c.lfq_diversity_weight)
    raise ConfigError("quantizer", f"must be one of {', '.join(QUANTIZERS)}, got {c.quantizer!r}.")


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        c = config
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_resolutions=c.attn_resolutions,
                    z_channels=c.z_channels, resolution=c.image_size, dropout=c.dropout)
        self.encoder = Encoder(in_channels=c.in_channels, **arch)
        self.decoder = Decoder(out_channels=c.in_channels, **arch)
        self.quant_conv = nn.Conv2d(c.z_channels, c.latent_dim, 1)
        self.quantize = build_quantizer(c)  # vq (the paper), ema, fsq or lfq
        self.post_quant_conv = nn.Conv2d(c.latent_dim, c.z_channels, 1)

    def encode(self, x):
        """x (B, C, H, W) -> z_q (B, latent_dim, H/f, W/f), indices (B, H/f, W/f), codebook loss.

        C is in_channels: 3 or 1 channels in [-1, 1] (rgb, gray), or a one-hot label map (segmentation)."""
        f = self.config.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"Image sides must divide by the downsampling factor {f}; got {tuple(x.shape[-2:])}.")
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q, return_features=False):
        """z_q (B, latent_dim, h, w) -> x_rec (B, C, h*f, w*f), logits for segmentation; optionally also the input of
        the last conv."""
        return self.decoder(self.post_quant_conv(z_q), return_features=return_features)

    def decode_indices(self, indices):
        """indices (B, h, w) -> x_rec (B, C, h*f, w*f)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x, return_features=False):
        """x -> (x_rec, indices, q_loss); with return_features, (x_rec, features, indices, q_loss)."""
        z_q, indices, q_loss = self.encode(x)
        if return_features:
            x_rec, features = self.decode(z_q, return_features=True)
            return x_rec, features, indices, q_loss
        return self.decode(z_q), indices, q_loss

    def set_recompute(self, on=True):
        """Recompute GroupNorm + swish in the backward instead of keeping them (blocks.norm_swish_conv).

        Off by default; training_vqgan.py turns it on for the CPU.
        """
        for module in self.modules():
            if hasattr(module, "recompute"):
                module.recompute = on
        return self

    # ---- the adaptive weight of the GAN loss (loss.py) ----

    def last_layer_grad(self, features, grad_out):
        """Gradient at the decoder's last conv weight of a loss whose gradient w.r.t. x_rec is `grad_out`.

        For x_rec = conv_out(features) this is the weight gradient of a conv, so the loss need not be
        back-propagated through the decoder a second time to get it.
        """
        w = self.decoder.conv_out.weight
        return torch.nn.grad.conv2d_weight(features.float(), w.shape, grad_out.float(), padding=1)

    # ---- checkpoints ----

    @classmethod
    def from_checkpoint(cls, path, trust=False, ema=True, user="VQGAN.from_checkpoint"):
        """Rebuild a stage-1 model, in eval mode, from a checkpoint of training_vqgan.py (its config travels inside) or
        a model folder of export.py (a local folder or a Hub model id); with the EMA weights when the run kept them
        (--ema-decay), unless ema=False. Another kind of checkpoint is an error naming it and `user`'s needs."""
        ckpt = read_checkpoint(path, trust).expect("stage1", user=user)
        model = cls(config_from_dict(VQGANConfig, ckpt.config))
        return load_weights(model, ckpt.weights(ema), ckpt.path).eval()

    @classmethod
    def from_pretrained(cls, name_or_path, ema=True):
        """A stage-1 model folder of export.py, local or on the Hugging Face Hub (owner/name); as from_checkpoint."""
        return cls.from_checkpoint(name_or_path, ema=ema, user="VQGAN.from_pretrained")

    def save_pretrained(self, folder, **info):
        """Write a model folder (config.json with `info`, model.safetensors) that from_pretrained reads."""
        write_model_folder(folder, "vqgan", asdict(self.config), self.state_dict(), **info)

    @classmethod
    def from_taming(cls, ckpt_path, config_path, stage=None, trust=False):
        """Load a taming-transformers VQ model (`last.ckpt` + `model.yaml`), in eval mode: a VQModel (e.g.
        vqgan_imagenet_f16_16384; a one-channel one, such as the depth stage, loads as gray) or a VQSegmentationModel.
        stage: "first_stage" or "cond_stage" picks that VQ model out of a Net2NetTransformer checkpoint."""
        state, params = read_taming(ckpt_path, config_path, trust)
        if stage is not None or "first_stage_config" in params:
            if stage not in ("first_stage", "cond_stage"):
                raise ValueError(f"{config_path} is a Net2NetTransformer: say which of its VQ models to load "
                                 f"(first_stage or cond_stage).")
            sub = params.get(f"{stage}_config")
            if not isinstance(sub, dict) or "ddconfig" not in sub.get("params", {}):
                what = sub.get("target") if isinstance(sub, dict) else sub
                raise ValueError(f"The {stage} of {config_path} is {what}, not a VQ model.")
            prefix = f"{stage}_model."
            state, params = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, sub["params"]
        return cls.from_taming_state(state, params, source=ckpt_path)

    @classmethod
    def from_taming_state(cls, state, params, source="the taming state dict"):
        """A VQGAN from a taming VQ model's state dict and the `params` of its config (ddconfig, n_embed, embed_dim,
        and n_labels for a VQSegmentationModel), in eval mode; `source` names the weights in an error."""
        dd = params["ddconfig"]
        if dd.get("double_z", False):
            raise ValueError("This taming config has double_z: true, which a VQGAN encoder never uses.")
        in_channels = dd.get("in_channels", 3)
        if dd.get("out_ch", in_channels) != in_channels:
            raise ValueError(f"This taming model maps {in_channels} channels to {dd['out_ch']}; a VQGAN reconstructs "
                             f"its input.")
        if "n_labels" in params:  # only VQSegmentationModel takes it: one-hot label maps in, logits out
            kind = dict(image_kind="segmentation", num_labels=params["n_labels"])
        elif in_channels in (1, 3):
            kind = dict(image_kind="gray" if in_channels == 1 else "rgb")
        else:
            raise ValueError(f"This taming VQModel has {in_channels} input channels and no n_labels: neither rgb, "
                             f"gray nor segmentation.")
        config = VQGANConfig(image_size=dd["resolution"], in_channels=in_channels, ch=dd["ch"], ch_mult=dd["ch_mult"],
                             num_res_blocks=dd["num_res_blocks"], attn_resolutions=dd["attn_resolutions"],
                             z_channels=dd["z_channels"], dropout=dd.get("dropout", 0.0),
                             latent_dim=params["embed_dim"], num_codebook_vectors=params["n_embed"], **kind)
        model = cls(config)
        keep = ("encoder.", "decoder.", "quantize.embedding.", "quant_conv.", "post_quant_conv.")
        return load_weights(model, {k: v for k, v in state.items() if k.startswith(keep)}, source).eval()
