"""GPT-2-style decoder with taming-transformers' minGPT parameter names, a key/value cache and sampling."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from config import ConfigError, check_positive


@dataclass
class GPTConfig:
    """Hyper-parameters of the GPT; the defaults of n_layer/n_head/n_embd are taming's ImageNet transformer."""

    vocab_size: int
    block_size: int
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    causal: bool = True  # False: every token attends to every other (a bidirectional model, maskgit.py)

    def __post_init__(self):
        """Refuse impossible sizes once, naming the field."""
        check_positive(self, "n_layer", "n_head", "n_embd", "block_size")
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd", f"{self.n_embd} must divide by `n_head` {self.n_head}.")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, causal unless config.causal is False, that can read and extend a per-layer
    key/value cache."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.causal = config.n_head, config.causal
        self.block_size = config.block_size
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.attn_drop = nn.Dropout(config.attn_pdrop)  # its rate is passed to scaled_dot_product_attention
        self.resid_drop = nn.Dropout(config.resid_pdrop)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, kv_cache=None, pos=0):
        B, T, C = x.size()
        hs = C // self.n_head
        q = self.query(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None and not kv_cache:  # allocate on first use: dtype and device follow k (autocast)
            kv_cache["k"] = k.new_zeros(B, self.n_head, self.block_size, hs)  # zeros: masked slots must be finite
            kv_cache["v"] = v.new_zeros(B, self.n_head, self.block_size, hs)
        if torch.is_tensor(pos):  # static shapes (GPT.decode_step): one token, the whole cache, later slots masked
            kv_cache["k"].index_copy_(2, pos.view(1), k)
            kv_cache["v"].index_copy_(2, pos.view(1), v)
            visible = (torch.arange(self.block_size, device=x.device) <= pos).view(1, 1, 1, -1)  # (1, 1, 1, S)
            y = F.scaled_dot_product_attention(q, kv_cache["k"], kv_cache["v"], attn_mask=visible)  # (B, nh, 1, hs)
            return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        if kv_cache is not None:
            kv_cache["k"][:, :, pos:pos + T] = k
            kv_cache["v"][:, :, pos:pos + T] = v
            k, v = kv_cache["k"][:, :, :pos + T], kv_cache["v"][:, :, :pos + T]  # (B, nh, pos+T, hs)
        # a single new token may see every cached key; a longer chunk starts at position 0 (checked in GPT._run),
        # where SDPA's top-left aligned causal mask is the right one
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=T > 1 and self.causal, dropout_p=self.attn_drop.p if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.resid_pdrop),
        )

    def forward(self, x, kv_cache=None, pos=0):
        x = x + self.attn(self.ln1(x), kv_cache, pos)
        return x + self.mlp(self.ln2(x))


class Int8Linear(nn.Module):
    """A Linear for sampling on the CPU: int8 weights with one scale per output row (weight-only quantization).

    Batch-1 sampling reads every weight once per token, so it is bound by memory bandwidth: a quarter of the fp32
    bytes made it 1.7x faster on the project's CPU. Activations enter torch's int8 kernel in bf16; the output
    returns to x's dtype.
    """

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        # the kernel takes bf16 scales: quantize with the rounded scale, so only the int8 rounding is left as error
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).to(torch.bfloat16)
        self.register_buffer("weight", (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self.scale)
        y = y.float() if self.bias is None else y.float() + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit (..., V) outside the top_k largest and outside the top_p nucleus."""
    if top_k is not None:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        # scatter rather than compare with the k-th value, so that ties never keep more than k tokens
        logits = torch.full_like(logits, -float("inf")).scatter(-1, indices, values)
    if top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token is always kept
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, sorted_idx, drop), -float("inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token id per row of logits (B, V) -> (B, 1), drawn on the device without a read-back to the host.

    The exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is token i with probability p_i.
    torch.multinomial draws the same distribution but waits for the GPU on every call. top_k=1 is the exact argmax.
    """
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    if top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)  # never 0/0
    return (probs / race).argmax(dim=-1, keepdim=True)


def pad_rows(x, rows):
    """x (B, ...) with its first row repeated up to `rows` rows; the padding's results are dropped by the caller."""
    return x if len(x) == rows else torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])])


def static_cache(kv_cache):
    """Tell torch.compile that the cache tensors keep their addresses, so that a CUDA graph may update them in place
    (mutated inputs of unknown address would make it fall back to running without graphs)."""
    for layer in kv_cache:
        for tensor in layer.values():
            torch._dynamo.mark_static_address(tensor)


class GPT(nn.Module):
    """Token and position embeddings, n_layer blocks, final LayerNorm and an unbiased head (taming's minGPT)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.decode_fn = None  # None: generate() slices the cache; else decode_step (plain or compiled)
        self.decode_cache, self.decode_rows = None, 0  # decode_fn's key/value cache, kept from batch to batch
        self.apply(self._init_weights)  # LayerNorms keep their default weight 1, bias 0; pos_emb stays zero

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _run(self, idx, kv_cache=None, pos=0):
        """Logits (B, T, V) of tokens idx (B, T) at positions pos..pos+T-1, reading and extending kv_cache if given."""
        T = idx.size(1)
        if torch.is_tensor(pos):  # decode_step: one token at a position held on the device
            x = self.tok_emb(idx) + self.pos_emb.index_select(1, pos.view(1))  # (B, 1, C)
            for i, block in enumerate(self.blocks):
                x = block(x, kv_cache[i], pos)
            return self.head(self.ln_f(x))
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size {self.config.block_size}")
        if kv_cache is not None and pos > 0 and T > 1:
            raise ValueError("with a cache, feed the prompt at position 0, then one token at a time")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, pos:pos + T])  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache[i], pos)
        return self.head(self.ln_f(x))

    def forward(self, idx, targets=None):
        """Logits (B, T, V) for tokens idx (B, T), and the mean cross-entropy against targets (B, T) if given."""
        logits = self._run(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.inference_mode()  # less per-operator work than no_grad: a few % of CPU sampling time
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, vocab_limit=None):
        """Append max_new_tokens sampled tokens to idx (B, T); the prompt is run once, then one token per step.

        vocab_limit: sample only ids below it (special tokens such as a start token are never generated).
        """
        if not self.config.causal:
            raise ValueError("A bidirectional GPT does not generate token by token: sample it by iterative decoding "
                             "(maskgit.py).")
        if idx.size(1) + max_new_tokens - 1 > self.config.block_size:  # the last new token is never fed back
            raise ValueError(f"prompt of {idx.size(1)} tokens + {max_new_tokens} new tokens needs a block_size of "
                             f"at least {idx.size(1) + max_new_tokens - 1}, not {self.config.block_size}")
        n, pos, position = len(idx), 0, None
        if self.decode_fn is not None:  # one cache for every batch, its rows padded to the cache's
            kv_cache, rows = self.static_decode_cache(n)
            x = pad_rows(idx, rows)
        else:
            kv_cache, x = [{} for _ in self.blocks], idx  # per layer: keys and values (B, nh, block_size, hs)
        for _ in range(max_new_tokens):
            if self.decode_fn is not None and pos > 0:  # static shapes: the position lives on the device
                if position is None:
                    position = torch.full((), pos, dtype=torch.long, device=x.device)
                    static_cache(kv_cache)
                logits = self.decode_fn(x, kv_cache, position)[:, :vocab_limit]
                position = position + 1  # a new tensor: a captured graph may still hold the old one
            else:
                logits = self._run(x, kv_cache, pos)[:, -1, :vocab_limit]  # (B, V)
            pos += x.size(1)
            x = sample_next(logits, temperature, top_k, top_p)  # (B, 1), the only token the next step has to run
            idx = torch.cat((idx, x[:n]), dim=1)
        return idx

    def static_decode_cache(self, rows):
        """decode_fn's key/value cache and its number of rows (at least `rows`). Allocated by the first batch, then
        kept for every batch of at most as many rows, which is padded to it: the compiled step sees the same tensors
        and shapes every time, so it compiles once and records one CUDA graph, the last, smaller batch included."""
        if self.decode_cache is None or rows > self.decode_rows:
            self.decode_cache, self.decode_rows = [{} for _ in self.blocks], rows  # filled by the first forward
        return self.decode_cache, self.decode_rows

    def decode_step(self, x, kv_cache, position):
        """Logits (B, V) of one token x (B, 1) at `position` (a 0-d device tensor), with static shapes: every layer
        writes its cache slot in place and attends over the whole cache with the later slots masked. The same shapes
        at every step, so torch.compile compiles it once and on CUDA can replay it as a CUDA graph."""
        return self._run(x, kv_cache, position)[:, -1]

    def compile_decode(self, dtype=torch.float32):
        """Sample through a compiled decode_step (on CUDA with CUDA graphs); generate() is otherwise unchanged.

        dtype: the autocast dtype sampling will run in. The Linear weights are cast to it here, once: in a compiled
        graph autocast casts them at every token (for the paper's GPT, 1.2 GB read and 0.6 GB written per token).
        Autocast would round them the same way, and embeddings and LayerNorms stay fp32, so the logits are the same.
        """
        if dtype != torch.float32:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)
        mode = "reduce-overhead" if self.head.weight.device.type == "cuda" else None
        self.decode_fn = torch.compile(self.decode_step, mode=mode, dynamic=False)
        return self

    def quantize_int8(self):
        """Replace every Linear (attention, MLP, head) by an Int8Linear, in place; for sampling on the CPU only."""
        if any(p.device.type != "cpu" for p in self.parameters()):
            raise ValueError("int8 weights are a CPU sampling path (torch's int8 kernel); on CUDA use "
                             "--precision bf16.")
        self.eval()
        parents = [m for m in self.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
        for module in parents:  # holding no Linear here, so each one's fp32 weight is freed once it is replaced
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, Int8Linear(child))
        return self

    def configure_optimizers(self, learning_rate, weight_decay=0.01, betas=(0.9, 0.95)):
        """AdamW that decays only the weights of Linear layers (minGPT's parameter groups)."""
        decay, no_decay = set(), set()
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}" if module_name else param_name
                if param_name == "weight" and isinstance(module, nn.Linear):
                    decay.add(name)
                elif param_name == "bias" or isinstance(module, (nn.LayerNorm, nn.Embedding)) or name == "pos_emb":
                    no_decay.add(name)
        params = dict(self.named_parameters())
        assert not decay & no_decay, f"parameters in both groups: {decay & no_decay}"
        assert decay | no_decay == params.keys(), f"parameters in no group: {params.keys() - (decay | no_decay)}"
        groups = [
            {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
        ]
        fused = all(p.device.type in ("cpu", "cuda") for p in params.values())  # torch's fused AdamW kernels
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True if fused else None)

    @classmethod
    def from_taming(cls, ckpt_path, config_path):
        """A GPT in eval mode with the weights of a taming-transformers checkpoint (keys transformer.*)."""
        with open(config_path) as f:
            hparams = yaml.safe_load(f)["model"]["params"]["transformer_config"]["params"]
        model = cls(taming_gpt_config(hparams))
        model.load_state_dict(taming_gpt_weights(torch.load(ckpt_path, map_location="cpu", weights_only=True)
                                                 ["state_dict"]))
        return model.eval()


def taming_gpt_config(hparams):
    """GPTConfig from the `transformer_config.params` of a taming-transformers config."""
    if hparams.get("n_unmasked", 0) != 0:
        raise ValueError("taming GPTs with n_unmasked > 0 (a bidirectional prefix) are not supported")
    return GPTConfig(**{k: hparams[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")})


def taming_gpt_weights(state_dict):
    """Our GPT's state dict from a taming-transformers state dict (its transformer.* keys)."""
    prefix = "transformer."
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and not k.endswith(".attn.mask")}  # the mask is our is_causal
