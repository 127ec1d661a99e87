"""Vector quantization: nearest-code lookup, straight-through gradient, codebook loss and usage statistics."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def codebook_usage(indices, num_codes):
    """Fraction of the codebook used at least once by `indices`, and the perplexity exp(H) of their histogram."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    return usage_from_counts(counts)


def usage_from_counts(counts, as_tensors=False):
    """(fraction of codes with a non-zero count, perplexity of the normalised counts); 0-d tensors with as_tensors,
    computed without waiting for the device (both 0.0 for no counts at all)."""
    total = counts.sum()
    p = counts / total.clamp(min=1)
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0 log 0 = 0
    used = (counts > 0).to(p.dtype).mean()
    perplexity = torch.where(total > 0, perplexity, torch.zeros_like(perplexity))
    return (used, perplexity) if as_tensors else (used.item(), perplexity.item())


class Codebook(nn.Module):
    """Nearest-neighbour vector quantizer (the paper's VQ), with three optional switches against codebook collapse.

    - codebook_dim: look up in a low-dimensional space through linear projections in and out (ViT-VQGAN, LlamaGen).
    - l2_norm: l2-normalise codes and inputs, so that the nearest code is the one of highest cosine similarity.
    - restart_dead_codes: re-seed codes whose moving hit rate has fallen below `dead_threshold` of the uniform rate
      with randomly chosen encoder outputs of the current batch, every `restart_every` training steps.

    A training step here is a forward pass in training mode (a micro-step under gradient accumulation); the usage
    window and the restart schedule count them in `train_steps`. Evaluation passes change no statistic.
    """

    def __init__(self, *, num_codebook_vectors=1024, latent_dim=256, beta=0.25, codebook_dim=None, l2_norm=False,
                 restart_dead_codes=False, restart_every=100, dead_threshold=0.03, ema_decay=0.99, usage_window=100):
        super().__init__()
        self.num_codes = num_codebook_vectors
        self.beta = beta
        self.l2_norm = l2_norm
        self.codebook_dim = codebook_dim or latent_dim
        self.embedding = nn.Embedding(num_codebook_vectors, self.codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codebook_vectors, 1.0 / num_codebook_vectors)  # taming's init
        if self.codebook_dim != latent_dim:
            self.proj_in = nn.Linear(latent_dim, self.codebook_dim)
            self.proj_out = nn.Linear(self.codebook_dim, latent_dim)

        self.restart_dead_codes = restart_dead_codes
        self.restart_every, self.dead_threshold, self.ema_decay = restart_every, dead_threshold, ema_decay
        # Statistics, not weights: kept out of the state dict so that taming checkpoints load unchanged.
        self.register_buffer("hit_rate_ema", torch.zeros(num_codebook_vectors), persistent=False)
        self.register_buffer("window_counts", torch.zeros(usage_window, num_codebook_vectors), persistent=False)
        self.train_steps = 0  # a Python int: reading it never waits for the GPU

    def codes(self):
        """The codebook as the lookup sees it: (K, codebook_dim)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z):
        """z (B, C, h, w) -> z_q (B, C, h, w) with straight-through gradient, indices (B, h, w), loss (scalar)."""
        B, C, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (N, C), N = B*h*w
        with torch.autocast(device_type=z.device.type, enabled=False):  # distances and loss in fp32
            z_low = z_flat.float()
            if hasattr(self, "proj_in"):
                z_low = self.proj_in(z_low)
            if self.l2_norm:
                z_low = F.normalize(z_low, dim=-1)
            if self.training and self.restart_dead_codes:
                self._maybe_restart(z_low.detach())
            codes = self.codes()
            with torch.no_grad():
                distances = (z_low.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)
                             - 2.0 * z_low @ codes.t())  # (N, K): ||z - e||^2
                indices = distances.argmin(dim=1)
            z_q_low = codes[indices]
            # The paper's loss: ||sg[z] - z_q||^2 moves the codes, beta * ||z - sg[z_q]||^2 commits the encoder.
            loss = F.mse_loss(z_q_low, z_low.detach()) + self.beta * F.mse_loss(z_low, z_q_low.detach())
            z_q_low = z_low + (z_q_low - z_low).detach()  # straight-through: the decoder's gradient reaches z
            z_q = self.proj_out(z_q_low) if hasattr(self, "proj_out") else z_q_low
        if self.training:
            self._track(indices)
        z_q = z_q.to(z.dtype).reshape(B, h, w, C).permute(0, 3, 1, 2).contiguous()
        return z_q, indices.reshape(B, h, w), loss

    def lookup(self, indices):
        """indices (B, h, w) -> quantized latents (B, latent_dim, h, w), as the decoder expects them."""
        z_q = self.codes()[indices]
        if hasattr(self, "proj_out"):
            z_q = self.proj_out(z_q)
        return z_q.permute(0, 3, 1, 2).contiguous()

    # ---- usage statistics and dead-code restarts ----

    @torch.compiler.disable  # bookkeeping on Python ints: compiled, every new step count would mean a recompile
    @torch.no_grad()
    def _track(self, indices):
        # scatter_add rather than bincount, which on CUDA waits for the GPU to learn the largest index
        counts = torch.zeros(self.num_codes, device=indices.device).scatter_add_(
            0, indices, torch.ones(indices.shape, device=indices.device))
        slot = self.train_steps % self.window_counts.shape[0]
        self.window_counts[slot] = counts
        if self.restart_dead_codes and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)  # every rank sees the same hit rates and so takes the same decision
        rate = counts / counts.sum().clamp(min=1)
        self.hit_rate_ema.mul_(self.ema_decay).add_(rate, alpha=1 - self.ema_decay)  # kept for dead_codes() anyway
        self.train_steps += 1

    def usage(self, as_tensors=False):
        """Usage fraction and perplexity over the last `usage_window` training steps (see usage_from_counts)."""
        return usage_from_counts(self.window_counts.sum(0), as_tensors)

    @torch.no_grad()
    def dead_codes(self):
        """Boolean mask (K,) of codes hit less often than `dead_threshold` times the uniform rate 1/K."""
        return self.hit_rate_ema * self.num_codes < self.dead_threshold

    @torch.compiler.disable
    @torch.no_grad()
    def _maybe_restart(self, z_low):
        step = self.train_steps
        if step == 0 or step % self.restart_every != 0:
            return
        dead = self.dead_codes().nonzero().squeeze(1)
        if len(dead) == 0:
            return
        # A random sample of this batch's encoder outputs (with replacement only when the batch is too small).
        pick = torch.randperm(len(z_low), device=z_low.device)[:len(dead)]
        if len(pick) < len(dead):
            pick = torch.randint(len(z_low), (len(dead),), device=z_low.device)
        new_codes = z_low[pick].to(self.embedding.weight.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new_codes, src=0)
        self.embedding.weight.data[dead] = new_codes
        self.hit_rate_ema[dead] = 1.0 / self.num_codes  # a grace period: judged again only after they had a chance
