"""Quantizers behind one contract, and their usage statistics.

forward(z (B, C, h, w)) -> (z_q (B, C, h, w), indices (B, h, w) int64 in [0, K), auxiliary loss (scalar));
lookup(indices) -> z_q; usage() -> (fraction of codes used, perplexity) over the last training steps;
K is `num_codebook_vectors`. Here: the paper's VQ (`Codebook`) and the EMA codebook; FSQ and LFQ, whose codebooks
are implicit, are in scalar_quantizers.py. `vqgan.build_quantizer(config)` picks one by `config.quantizer`.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def codebook_usage(indices, num_codebook_vectors):
    """Fraction of the codebook used at least once by `indices`, and the perplexity exp(H) of their histogram."""
    counts = torch.bincount(indices.flatten(), minlength=num_codebook_vectors).double()
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


def distributed():
    return dist.is_available() and dist.is_initialized()


def to_rows(z):
    """(B, C, h, w) -> (B*h*w, C) in fp32: every quantizer computes in fp32, also under bf16/fp16 autocast."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()


def to_map(rows, like):
    """(B*h*w, C) -> (B, C, h, w) in the dtype of `like`, the quantizer's input."""
    B, _, h, w = like.shape
    return rows.to(like.dtype).reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()


class Quantizer(nn.Module):
    """What every quantizer shares: its size and the usage window over the last `usage_window` training steps.

    A training step here is a forward pass in training mode (a micro-step under gradient accumulation), counted in
    `train_steps`, a Python int so that reading it never waits for the GPU. Evaluation passes change no statistic.
    """

    def __init__(self, num_codebook_vectors, usage_window=100):
        super().__init__()
        self.num_codebook_vectors = num_codebook_vectors
        # Statistics, not weights: kept out of the state dict so that taming checkpoints load unchanged.
        self.register_buffer("window_counts", torch.zeros(usage_window, num_codebook_vectors), persistent=False)
        self.train_steps = 0

    @torch.compiler.disable  # bookkeeping on Python ints: compiled, every new step count would mean a recompile
    @torch.no_grad()
    def _track(self, indices):
        # scatter_add rather than bincount, which on CUDA waits for the GPU to learn the largest index
        counts = torch.zeros(self.num_codebook_vectors, device=indices.device).scatter_add_(
            0, indices, torch.ones(indices.shape, device=indices.device))
        self.window_counts[self.train_steps % self.window_counts.shape[0]] = counts
        self._observe(counts)
        self.train_steps += 1

    def _observe(self, counts):
        """Called with each training step's (K,) code counts; for quantizers that keep more statistics."""

    def usage(self, as_tensors=False):
        """Usage fraction and perplexity over the last `usage_window` training steps (see usage_from_counts)."""
        return usage_from_counts(self.window_counts.sum(0), as_tensors)


# ---- the paper's VQ ----

def rotate_onto(e, q):
    """The rotation trick (Fifty et al. 2024): q in the forward pass; backwards, e's gradient is lambda R^T g.

    R rotates e's direction onto q's and lambda = |q| / |e| rescales, both constants of the backward pass:
    R = I - 2 r r^T + 2 q_hat e_hat^T with r = (e_hat + q_hat) / |e_hat + q_hat|, so R e = |e| q_hat. e, q: (N, D).
    """
    e_norm, q_norm = e.detach().norm(dim=1, keepdim=True), q.detach().norm(dim=1, keepdim=True)
    e_hat, q_hat = e.detach() / e_norm.clamp(min=1e-12), q.detach() / q_norm.clamp(min=1e-12)
    r = F.normalize(e_hat + q_hat, dim=1)
    rotated = e - 2 * (e * r).sum(1, keepdim=True) * r + 2 * (e * e_hat).sum(1, keepdim=True) * q_hat
    rotated = rotated * (q_norm / e_norm.clamp(min=1e-12))
    return q.detach() + (rotated - rotated.detach())  # exactly q forwards, the rotation's Jacobian backwards


@torch.no_grad()
def kmeans(x, k, iterations=10):
    """k centres of the rows of x (N, D) by Lloyd's algorithm from k random rows; an empty cluster keeps its centre."""
    pick = torch.randperm(len(x), device=x.device)[:k]
    if len(pick) < k:
        pick = torch.randint(len(x), (k,), device=x.device)
    centres = x[pick].clone()
    for _ in range(iterations):
        nearest = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)
        counts = torch.zeros(k, device=x.device).index_add_(0, nearest, torch.ones(len(x), device=x.device))
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres


def gather_rows(x):
    """Every rank's rows (N_r, D), concatenated in rank order: ranks may hold different numbers of rows (a batch
    that lost unreadable images), so each sends its count first and its rows padded to the largest count."""
    counts = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(len(x), device=x.device))
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, counts)])


class Codebook(Quantizer):
    """Nearest-neighbour vector quantizer (the paper's VQ), with optional switches against codebook collapse.

    - codebook_dim: look up in a low-dimensional space through linear projections in and out (ViT-VQGAN, LlamaGen).
    - l2_norm: l2-normalise codes and inputs, so that the nearest code is the one of highest cosine similarity.
    - restart_dead_codes: every `restart_every` (25) training steps, re-seed the codes whose share of the hits since
      the last check is below `dead_threshold` (10%) of the uniform share 1/K, with randomly chosen encoder outputs
      of the current batch. Each check starts a new count, so a re-seeded code is judged on the steps after its
      restart. Frequent checks and a threshold well above zero leave no code rare for long, however fast the encoder
      moves away from it (that is, at any learning rate): the collapse of the first steps is undone at the first
      check, and a code whose share fades is re-seeded within `restart_every` steps of falling below 10%.
    - rotation_trick: the encoder's gradient through the rotation onto its code instead of a copy (rotate_onto).
    - kmeans_init: at the first training step, the codes become k-means centres of the batch's encoder outputs
      (of all ranks' batches, computed on rank 0 and broadcast).
    """

    def __init__(self, *, num_codebook_vectors=1024, latent_dim=256, beta=0.25, codebook_dim=None, l2_norm=False,
                 restart_dead_codes=False, restart_every=25, dead_threshold=0.1, usage_window=100,
                 rotation_trick=False, kmeans_init=False):
        super().__init__(num_codebook_vectors, usage_window)
        self.beta = beta
        self.l2_norm = l2_norm
        self.codebook_dim = codebook_dim or latent_dim
        self.embedding = nn.Embedding(num_codebook_vectors, self.codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codebook_vectors, 1.0 / num_codebook_vectors)  # taming's init
        if self.codebook_dim != latent_dim:
            self.proj_in = nn.Linear(latent_dim, self.codebook_dim)
            self.proj_out = nn.Linear(self.codebook_dim, latent_dim)

        self.restart_dead_codes, self.rotation_trick, self.kmeans_init = restart_dead_codes, rotation_trick, kmeans_init
        self.restart_every, self.dead_threshold = restart_every, dead_threshold
        # Not saved, by design: after --resume the count starts afresh and the first check comes `restart_every`
        # steps later (train_steps restarts at 0), judged on the steps since the resume.
        self.register_buffer("hits_since_check", torch.zeros(num_codebook_vectors), persistent=False)
        if kmeans_init:  # saved, so that a resumed run does not initialise again
            self.register_buffer("kmeans_done", torch.zeros((), dtype=torch.bool))

    def codes(self):
        """The codebook as the lookup sees it: (K, codebook_dim)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def loss(self, z_low, z_q_low):
        """The paper's: ||sg[z] - z_q||^2 moves the codes, beta * ||z - sg[z_q]||^2 commits the encoder."""
        return F.mse_loss(z_q_low, z_low.detach()) + self.beta * F.mse_loss(z_low, z_q_low.detach())

    def forward(self, z):
        """z (B, C, h, w) -> z_q (B, C, h, w) with straight-through gradient, indices (B, h, w), loss (scalar)."""
        B, C, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):  # distances and loss in fp32
            z_low = to_rows(z)  # (N, C), N = B*h*w
            if hasattr(self, "proj_in"):
                z_low = self.proj_in(z_low)
            if self.l2_norm:
                z_low = F.normalize(z_low, dim=-1)
            if self.training and self.kmeans_init:
                self._maybe_kmeans_init(z_low.detach())
            if self.training and self.restart_dead_codes:
                self._maybe_restart(z_low.detach())
            codes = self.codes()
            with torch.no_grad():
                distances = (z_low.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)
                             - 2.0 * z_low @ codes.t())  # (N, K): ||z - e||^2
                indices = distances.argmin(dim=1)
            z_q_low = codes[indices]
            loss = self.loss(z_low, z_q_low)
            if self.training:
                self._update_codes(z_low.detach(), indices)
            if self.rotation_trick:
                z_q_low = rotate_onto(z_low, z_q_low)
            else:
                z_q_low = z_low + (z_q_low - z_low).detach()  # straight-through: the decoder's gradient reaches z
            z_q = self.proj_out(z_q_low) if hasattr(self, "proj_out") else z_q_low
        if self.training:
            self._track(indices)
        return to_map(z_q, z), indices.reshape(B, h, w), loss

    def lookup(self, indices):
        """indices (B, h, w) -> quantized latents (B, latent_dim, h, w), as the decoder expects them."""
        z_q = self.codes()[indices]
        if hasattr(self, "proj_out"):
            z_q = self.proj_out(z_q)
        return z_q.permute(0, 3, 1, 2).contiguous()

    def _update_codes(self, z_low, indices):
        """Codes learn by gradient here; the EMA codebook overrides this."""

    @torch.no_grad()
    def _reseed(self, which, new_codes):
        """Set the codes `which` (index tensor) to `new_codes` (len(which), codebook_dim)."""
        self.embedding.weight.data[which] = new_codes.to(self.embedding.weight.dtype)

    # ---- usage statistics, dead-code restarts, k-means initialisation ----

    def _observe(self, counts):
        if self.restart_dead_codes:
            self.hits_since_check += counts  # this rank's; summed over the ranks at the check, not every step

    @torch.no_grad()
    def dead_codes(self):
        """Boolean mask (K,) of the codes whose share of the hits since the last check is below `dead_threshold`
        times the uniform share 1/K (none before any hit)."""
        hits = self.hits_since_check
        return hits * self.num_codebook_vectors < self.dead_threshold * hits.sum()

    @torch.compiler.disable
    @torch.no_grad()
    def _maybe_restart(self, z_low):
        step = self.train_steps
        if step == 0 or step % self.restart_every != 0:
            return
        if distributed():
            dist.all_reduce(self.hits_since_check)  # every rank judges the same hits and takes the same decision
        dead = self.dead_codes().nonzero().squeeze(1)
        self.hits_since_check.zero_()  # the next check judges the steps from here, re-seeded codes included
        if len(dead) == 0:
            return
        # A random sample of this batch's encoder outputs (with replacement only when the batch is too small).
        pick = torch.randperm(len(z_low), device=z_low.device)[:len(dead)]
        if len(pick) < len(dead):
            pick = torch.randint(len(z_low), (len(dead),), device=z_low.device)
        new_codes = z_low[pick].to(self.embedding.weight.dtype)
        if distributed():
            dist.broadcast(new_codes, src=0)
        self._reseed(dead, new_codes)

    @torch.compiler.disable  # reads the step counter: compiled, every new step count would mean a recompile
    @torch.no_grad()
    def _maybe_kmeans_init(self, z_low):
        if self.train_steps != 0 or self.kmeans_done.item():  # read once per process: a resumed run keeps its codes
            return
        if distributed():  # every rank's batch, so that all ranks start from the same codes
            z_low = gather_rows(z_low)
        centres = kmeans(z_low, self.num_codebook_vectors).to(self.embedding.weight.dtype)
        if distributed():
            dist.broadcast(centres, src=0)
        self._reseed(torch.arange(self.num_codebook_vectors, device=centres.device), centres)
        self.kmeans_done.fill_(True)


class EMACodebook(Codebook):
    """Codes as exponential moving averages of the encoder outputs assigned to them (van den Oord et al. 2017,
    appendix A.1; taming's EMAVectorQuantizer). No gradient reaches the codes; the loss is beta * commitment only.

    Per training step, with n_k the number of vectors assigned to code k and s_k their sum (all-reduced over ranks):
    N_k <- decay N_k + (1 - decay) n_k, m_k <- decay m_k + (1 - decay) s_k, e_k = m_k / N~_k, where N~_k is N_k with
    Laplace smoothing, (N_k + eps) / (sum N + K eps) * sum N. Only the codes assigned this step are rewritten.
    N and m start at zero, so m_k / N_k is a weighted mean of the vectors assigned to code k, without a start bias:
    at its first assignment a code jumps to the mean of its vectors. (Starting m at the random initial codes, as
    taming does, drags a new code back towards its start for some hundred steps; measured in docs/quantizers.md.)
    """

    def __init__(self, *, decay=0.99, eps=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.embedding.weight.requires_grad_(False)
        self.decay, self.eps = decay, eps
        self.register_buffer("cluster_size", torch.zeros(self.num_codebook_vectors))
        self.register_buffer("embed_avg", torch.zeros_like(self.embedding.weight))

    def loss(self, z_low, z_q_low):
        return self.beta * F.mse_loss(z_low, z_q_low.detach())

    @torch.compiler.disable
    @torch.no_grad()
    def _update_codes(self, z_low, indices):
        K = self.num_codebook_vectors
        counts = torch.zeros(K, device=z_low.device).index_add_(0, indices, torch.ones(len(indices),
                                                                                      device=z_low.device))
        sums = torch.zeros(K, z_low.shape[1], device=z_low.device).index_add_(0, indices, z_low)
        if distributed():  # every rank then holds the same codebook
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + K * self.eps) * total
        updated = self.embed_avg / smoothed[:, None]
        w = self.embedding.weight
        w.copy_(torch.where(counts[:, None] > 0, updated.to(w.dtype), w))

    @torch.no_grad()
    def _reseed(self, which, new_codes):
        super()._reseed(which, new_codes)
        self.cluster_size[which] = 1.0
        self.embed_avg[which] = new_codes.to(self.embed_avg.dtype)
