"""The tiny models that every quick path shares: the tests, gpu_check.py --quick, bench.py --quick and demo.py --tiny,
as config values and (through as_flags) as the scripts' flags."""

# A VQGAN of 32x32 images, 3 levels (f=4: an 8x8 token grid), 64 codes of dimension 16.
TINY_VQGAN = dict(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
                  latent_dim=16, num_codebook_vectors=64)
# A 2-layer GPT over its 64 tokens.
TINY_GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


def as_flags(values, leave_out=()):
    """The flags that set these config values, but those in leave_out: dict(ch_mult=(1, 2)) -> --ch-mult 1 2."""
    flags = []
    for name, value in values.items():
        if name not in leave_out:
            flags += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, (tuple, list)) else [value])]
    return flags
