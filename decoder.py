"""The taming-transformers convolutional decoder: latents (B, z_channels, h, w) -> image (B, 3, h*f, w*f)."""
import torch.nn as nn

from blocks import AttnBlock, Normalize, ResnetBlock, Upsample, norm_swish_conv


class Decoder(nn.Module):
    """Mirror of the encoder with num_res_blocks + 1 ResNet blocks per level and an upsample between levels."""

    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 z_channels=256, resolution=256, out_channels=3, dropout=0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        # Built from the lowest resolution up, but stored so that up[i] is level i (taming's checkpoint layout).
        levels = []
        for i_level in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)
        self.recompute = False  # see blocks.norm_swish_conv

    def forward(self, z, return_features=False):
        """Decode; with return_features also return the input of `conv_out` (used for the adaptive GAN weight)."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = norm_swish_conv(h, self.norm_out, recompute=self.recompute)  # kept: the features for λ
        out = self.conv_out(h)
        return (out, h) if return_features else out
