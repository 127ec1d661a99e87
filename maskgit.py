"""MaskGIT (Chang et al., CVPR 2022) on the same tokens: a bidirectional GPT learns to predict masked tokens, and
sampling fills a whole grid in a few passes, keeping at each pass the tokens it is most confident of.

Training masks a share cos(pi/2 r) of each sequence's tokens, r ~ U(0, 1), with a learned [MASK] token and scores the
masked positions only. Decoding starts from an all-masked grid and after pass t of T leaves floor(n cos(pi/2 (t+1)/T))
of its n unknown tokens masked: those whose drawn token has the lowest log-probability plus Gumbel noise annealed from
--choice-temperature to 0. A canvas larger than the training grid is filled window by window (window_origins).
"""
import math
from functools import partial

import torch
import torch.nn.functional as F

from mingpt import sample_next

DEFAULT_STEPS = 8  # MaskGIT's decoding passes for a 16x16 grid
DEFAULT_CHOICE_TEMPERATURE = 4.5  # MaskGIT's scale of the Gumbel noise on the confidence, annealed to 0
DEFAULT_LABEL_SMOOTHING = 0.1  # MaskGIT's
VALIDATION_RATIOS = (0.5, 0.9)  # validation masks these shares of each grid, at the same positions every time


def cosine_schedule(r):
    """The share of tokens masked at progress r in [0, 1]: cos(pi/2 r), from 1 down to 0."""
    return torch.cos(math.pi / 2 * r) if torch.is_tensor(r) else math.cos(math.pi / 2 * r)


def validation_key(ratio):
    """The logged name of the validation loss at a masking ratio: val_loss_mask50 for 0.5."""
    return f"val_loss_mask{round(100 * ratio)}"


# ---- training ----

def random_mask(ratios, num_tokens, generator=None):
    """(B, N) bool: ceil(ratio x N) positions of each row (at least one), chosen uniformly at random.

    With a generator, the positions are drawn on its device and moved to the ratios' device."""
    counts = (ratios * num_tokens).ceil().clamp(1, num_tokens)  # (B,)
    device = ratios.device if generator is None else generator.device
    scores = torch.rand(len(ratios), num_tokens, device=device, generator=generator).to(ratios.device)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, N): each position's place in a random order
    return ranks < counts[:, None]


def masked_token_loss(gpt, prefix, inputs, targets, masked, mask_token, num_codes, label_smoothing=0.0):
    """Code logits (B, N, K) and the mean cross-entropy over the masked positions only.

    inputs, targets (B, N): the tokens the GPT reads (possibly noised) and the clean ones; masked (B, N) bool: the
    positions replaced by the [MASK] token; prefix: (B, 1) class tokens, or None (unconditional).
    """
    tokens = inputs.masked_fill(masked, mask_token)
    if prefix is not None:
        tokens = torch.cat([prefix, tokens], dim=1)
    logits = gpt(tokens)[0][:, -targets.size(1):, :num_codes]  # (B, N, K): codes only, never a special token
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none",
                             label_smoothing=label_smoothing).view_as(targets)  # (B, N)
    # a sum over the masked positions of the batch: static shapes (no boolean indexing) for torch.compile
    return logits, (losses * masked).sum() / masked.sum()


def training_loss(model, prefix, inputs, targets):
    """One training step's logits and loss: a cosine-schedule ratio per sequence, its positions masked at random."""
    ratios = cosine_schedule(torch.rand(len(targets), device=targets.device))
    masked = random_mask(ratios, targets.size(1))
    return masked_token_loss(model.gpt, prefix, inputs, targets, masked, model.mask_token, model.num_codebook_vectors,
                             model.config.label_smoothing)


@torch.no_grad()
def validation_losses(model, indices, labels=None, generator=None):
    """{validation_key(ratio): mean cross-entropy on the masked tokens} for each of VALIDATION_RATIOS, without label
    smoothing; a generator seeded the same way masks the same positions in every evaluation."""
    prefix = model.start_tokens(len(indices), labels, indices.device) if model.num_classes else None
    losses = {}
    for ratio in VALIDATION_RATIOS:
        masked = random_mask(torch.full((len(indices),), ratio, device=indices.device), indices.size(1), generator)
        losses[validation_key(ratio)] = masked_token_loss(model.gpt, prefix, indices, indices, masked,
                                                          model.mask_token, model.num_codebook_vectors)[1]
    return losses


# ---- decoding ----

def masked_after(num_unknown, steps):
    """How many of num_unknown tokens are still masked after each pass: MaskGIT's floor(n cos(pi/2 (t+1)/T)), kept
    so that every pass fixes at least one token and none is left after the last (T is at most n)."""
    steps, left, counts = min(steps, num_unknown), num_unknown, []
    for t in range(steps):
        scheduled = math.floor(num_unknown * cosine_schedule((t + 1) / steps))
        left = max(steps - 1 - t, min(left - 1, scheduled))
        counts.append(left)
    return counts


@torch.inference_mode()
def decode(gpt, tokens, unknown, steps, mask_token, num_codes, prefix=None, cfg_scale=None, temperature=1.0,
           top_k=None, top_p=None, choice_temperature=DEFAULT_CHOICE_TEMPERATURE):
    """Draw the unknown positions (N,) bool of tokens (n, N) in `steps` passes; every other token is kept as it is.

    prefix: (n, 1) class tokens, or (2n, 1) class then null tokens for guidance by cfg_scale; None: unconditional.
    Each pass draws a token at every position (temperature, top_k, top_p as for ar) and fixes, among the unknown
    ones, those of highest confidence: the model's log-probability of the drawn token + choice_temperature x
    (1 - (t+1)/T) x Gumbel noise.
    """
    n, N = tokens.shape
    counts, left = masked_after(int(unknown.sum()), steps), int(unknown.sum())
    masked = unknown.to(tokens.device).expand(n, N).clone()  # (n, N): still to be drawn
    tokens = tokens.masked_fill(masked, mask_token)
    rows = 1 if prefix is None else len(prefix) // n  # 2: conditional and null rows in one forward
    for t, remaining in enumerate(counts):
        inputs = tokens.repeat(rows, 1) if rows > 1 else tokens
        if prefix is not None:
            inputs = torch.cat([prefix, inputs], dim=1)  # (rows * n, 1 + N)
        logits = gpt(inputs)[0][:, -N:, :num_codes].float()  # (rows * n, N, K)
        if rows == 2:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        drawn = sample_next(logits.flatten(0, 1), temperature, top_k, top_p).view(n, N)  # (n, N)
        # the model's own log-probability of each drawn token (before temperature and filtering, as MaskGIT's)
        confidence = logits.log_softmax(dim=-1).gather(-1, drawn[..., None])[..., 0]  # (n, N)
        noise = choice_temperature * (1 - (t + 1) / len(counts))
        if noise > 0:
            confidence = confidence - noise * torch.empty_like(confidence).exponential_().log()  # -log E: Gumbel
        chosen = confidence.masked_fill(~masked, -math.inf).topk(left - remaining, dim=1).indices  # (n, fixed now)
        tokens.scatter_(1, chosen, drawn.gather(1, chosen))
        masked.scatter_(1, chosen, False)
        left = remaining
    return tokens


def window_origins(size, window):
    """Where the windows that cover `size` tokens start along one axis: every window // 2 tokens, the last flush
    with the edge (a canvas of the window's size is one window)."""
    return sorted(set(range(0, size - window, max(1, window // 2))) | {size - window})


@torch.inference_mode()
def sample_canvas(model, n, canvas_hw=None, steps=DEFAULT_STEPS, choice_temperature=DEFAULT_CHOICE_TEMPERATURE,
                  temperature=1.0, top_k=None, top_p=None, labels=None, cfg_scale=None, codes=None, regenerate=None):
    """Token grids (n, H, W) on a canvas of H x W tokens, as VQGANTransformer.sample_canvas but by iterative decoding.

    The canvas is covered by windows of the training grid at half-window strides, in raster order; each window draws
    its tokens that are still unknown in `steps` passes, reading the tokens earlier windows drew (and the kept codes)
    as known. codes (n, H, W) and regenerate (H, W) bool: keep the codes where regenerate is False.
    """
    (H, W), (h, w) = canvas_hw or model.latent_hw, model.latent_hw
    if H < h or W < w:
        raise ValueError(f"A canvas of {H}x{W} tokens is smaller than the model's {h}x{w} window.")
    device = model.gpt.head.weight.device
    grid = torch.zeros(n, H, W, dtype=torch.long, device=device) if codes is None else codes.to(device).clone()
    todo = torch.ones(H, W, dtype=torch.bool) if regenerate is None else regenerate.cpu().clone()
    prefix = model.start_tokens(n, labels, device) if model.num_classes else None
    guided = cfg_scale is not None and cfg_scale != 1  # scale 1 is the conditional model itself
    if guided:
        prefix = torch.cat([prefix, model.null_tokens(n, device)])  # (2n, 1): conditional rows, then null ones
    for top in window_origins(H, h):
        for left in window_origins(W, w):
            unknown = todo[top:top + h, left:left + w].flatten()  # (h * w,)
            if not unknown.any():
                continue
            window = grid[:, top:top + h, left:left + w].flatten(1)  # (n, h * w)
            window = decode(model.gpt, window, unknown, steps, model.mask_token, model.num_codebook_vectors, prefix,
                            cfg_scale if guided else None, temperature, top_k, top_p, choice_temperature)
            grid[:, top:top + h, left:left + w] = window.view(n, h, w)
            todo[top:top + h, left:left + w] = False
    return grid


def canvas_sampler(model, steps=None, choice_temperature=None):
    """The sample_canvas of the model's objective, with sample_canvas's arguments: VQGANTransformer's for ar, this
    module's for maskgit with --steps and --choice-temperature (None: MaskGIT's defaults)."""
    if model.config.objective != "maskgit":
        given = [flag for flag, value in (("--steps", steps), ("--choice-temperature", choice_temperature))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} set the iterative decoding of maskgit checkpoints; this one is "
                             f"autoregressive (one pass per token).")
        return model.sample_canvas
    steps = DEFAULT_STEPS if steps is None else steps
    if not 1 <= steps <= model.num_tokens:
        raise ValueError(f"--steps must be between 1 and the {model.num_tokens} tokens of the model's grid, got "
                         f"{steps}.")
    choice_temperature = DEFAULT_CHOICE_TEMPERATURE if choice_temperature is None else choice_temperature
    if not choice_temperature >= 0:
        raise ValueError(f"--choice-temperature must be 0 or more, got {choice_temperature}.")
    return partial(sample_canvas, model, steps=steps, choice_temperature=choice_temperature)
