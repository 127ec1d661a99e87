"""The pix2pix PatchGAN discriminator used by taming-transformers, its config and its initialisation."""
from dataclasses import dataclass

import torch.nn as nn

from checkpoint import read_taming


@dataclass
class DiscriminatorConfig:
    """taming's defaults: 3 hidden layers of 64, 128, 256 (then 512) channels."""
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3


def weights_init(m):
    """pix2pix init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, each logit of the (B, 1, h, w) output judges one overlapping patch (70x70 for 3 layers)."""

    def __init__(self, config: DiscriminatorConfig = None):
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        in_channels, ndf, n_layers = config.in_channels, config.ndf, config.n_layers
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),  # BN has the bias
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x)

    @classmethod
    def from_taming(cls, ckpt_path, config_path):
        """Load the discriminator of a taming-transformers `last.ckpt` + `model.yaml` pair, in eval mode."""
        state, params = read_taming(ckpt_path, config_path)
        loss_params = params.get("lossconfig", {}).get("params", {})
        model = cls(DiscriminatorConfig(in_channels=loss_params.get("disc_in_channels", 3),
                                        ndf=loss_params.get("disc_ndf", 64),
                                        n_layers=loss_params.get("disc_num_layers", 3)))
        prefix = "loss.discriminator."
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return model.eval()


Discriminator = NLayerDiscriminator  # the name the training script uses

