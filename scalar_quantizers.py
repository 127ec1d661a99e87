"""Quantizers with an implicit codebook, each dimension quantized on its own: FSQ rounds, LFQ takes signs.

Both project the latent (latent_dim) to a few dimensions, quantize there, and project back; the code of a vector is
its digits read as one number. Same contract as codebook.Codebook (see codebook.py).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from codebook import Quantizer, to_map, to_rows


class FSQ(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023): dimension i is bounded and rounded to one of levels[i]
    values, so the codebook is the grid of prod(levels) points and there is no auxiliary loss.

    bound(z) = tanh(z + shift) * half_l - offset with half_l = (L - 1)(1 + eps) / 2, and for even L offset 1/2 and
    shift atanh(offset / half_l), so that z = 0 stays 0 and the rounded values are the L integers -L/2 .. L/2 - 1
    (odd L: -(L-1)/2 .. (L-1)/2); they are divided by L // 2. The paper's listing has (1 - eps) and tan, which leave
    L = 2 undefined (atanh of more than 1) and z = 0 off-centre. Rounding passes gradients straight through.
    """

    def __init__(self, *, levels, latent_dim=256, usage_window=100):
        super().__init__(math.prod(levels), usage_window)
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + list(levels[:-1])), 0), persistent=False)
        self.proj_in = nn.Linear(latent_dim, len(levels))
        self.proj_out = nn.Linear(len(levels), latent_dim)

    def quantize(self, z):
        """z (N, d) -> codes (N, d) in [-1, 1] with straight-through rounding, indices (N,)."""
        L = self.levels.float()
        half_l = (L - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = (self.levels // 2).float()
        digits = (rounded.detach() + half_width).long()  # in [0, L)
        return rounded / half_width, (digits * self.basis).sum(1)

    def forward(self, z):
        B, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):  # in bf16, FSQ loses half its codes
            codes, indices = self.quantize(self.proj_in(to_rows(z)))
            z_q = self.proj_out(codes)
        if self.training:
            self._track(indices)
        return to_map(z_q, z), indices.reshape(B, h, w), torch.zeros((), device=z.device)

    def codes_of(self, indices):
        """indices (...) -> grid points (..., d) in [-1, 1]."""
        half_width = self.levels // 2
        return ((indices[..., None] // self.basis) % self.levels - half_width) / half_width

    def lookup(self, indices):
        """indices (B, h, w) -> (B, latent_dim, h, w)."""
        return self.proj_out(self.codes_of(indices)).permute(0, 3, 1, 2).contiguous()


class LFQ(Quantizer):
    """Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): `bits` dimensions, each quantized to its sign (+-1),
    so the codebook is the 2^bits corners of the cube; a code's index reads the positive signs as bits, first
    dimension most significant. Signs pass gradients straight through.

    Loss: beta * ||z - sg[q]||^2 (commitment) + entropy_weight * (E[H(p(.|z))] - diversity_weight * H(E[p(.|z)])),
    with p(c|z) = softmax_c(-||z - c||^2 / temperature) over all 2^bits codes: each vector should be confident of
    its code (low per-sample entropy) while the batch spreads over the codebook (high codebook entropy). The
    codebook entropy is taken over each process's batch.
    """

    def __init__(self, *, bits, latent_dim=256, beta=0.25, entropy_weight=0.1, diversity_weight=1.0,
                 temperature=0.01, usage_window=100):
        super().__init__(2 ** bits, usage_window)
        self.bits, self.beta, self.temperature = bits, beta, temperature
        self.entropy_weight, self.diversity_weight = entropy_weight, diversity_weight
        self.register_buffer("bit_values", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)
        self.register_buffer("all_codes", self.codes_of(torch.arange(2 ** bits)), persistent=False)  # (K, bits)
        self.proj_in = nn.Linear(latent_dim, bits)
        self.proj_out = nn.Linear(bits, latent_dim)

    def codes_of(self, indices):
        """indices (...) -> codes (..., bits) of +-1."""
        bits = (indices[..., None] // self.bit_values) % 2
        return bits.float() * 2 - 1

    def entropy_loss(self, z):
        """Per-sample entropy minus diversity_weight times codebook entropy of p(c|z), z (N, bits)."""
        # -||z - c||^2 = 2 z.c - |z|^2 - bits: only 2 z.c depends on c
        log_p = F.log_softmax(2 * z @ self.all_codes.t() / self.temperature, dim=1)  # (N, K)
        # entropies from log_p: p log p of an underflowed p = 0 would give a NaN gradient; the clamp keeps p out of
        # the denormal floats, on which CPUs are some ten times slower
        p = log_p.clamp(min=-80.0).exp()
        per_sample = -(p * log_p).sum(1).mean()
        mean_p = p.mean(0)
        codebook = -(mean_p * mean_p.clamp(min=1e-30).log()).sum()
        return per_sample - self.diversity_weight * codebook

    def forward(self, z):
        B, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_low = self.proj_in(to_rows(z))  # (N, bits)
            q = torch.where(z_low > 0, 1.0, -1.0)
            indices = ((z_low > 0).long() * self.bit_values).sum(1)
            loss = self.beta * F.mse_loss(z_low, q)
            if self.entropy_weight:
                loss = loss + self.entropy_weight * self.entropy_loss(z_low)
            z_q = self.proj_out(z_low + (q - z_low).detach())
        if self.training:
            self._track(indices)
        return to_map(z_q, z), indices.reshape(B, h, w), loss

    def lookup(self, indices):
        """indices (B, h, w) -> (B, latent_dim, h, w)."""
        return self.proj_out(self.codes_of(indices)).permute(0, 3, 1, 2).contiguous()
