"""The pix2pix PatchGAN discriminator used by taming-transformers, and its initialisation."""
import torch
import torch.nn as nn


def weights_init(m):
    """pix2pix init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, each logit of the (B, 1, h, w) output judges one overlapping patch (70x70 for 3 layers)."""

    def __init__(self, *, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        self.config = dict(in_channels=in_channels, ndf=ndf, n_layers=n_layers)
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
        from vqgan import read_taming  # the shared reader of taming's file pair lives with the VQGAN
        state, params = read_taming(ckpt_path, config_path)
        loss_params = params.get("lossconfig", {}).get("params", {})
        model = cls(in_channels=loss_params.get("disc_in_channels", 3), ndf=loss_params.get("disc_ndf", 64),
                    n_layers=loss_params.get("disc_num_layers", 3))
        prefix = "loss.discriminator."
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return model.eval()


Discriminator = NLayerDiscriminator  # the name the training script uses


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
