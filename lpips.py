"""LPIPS (Zhang et al. 2018): torchvision's VGG16 features and the linear heads of the `lpips` package."""
import importlib.metadata
import os
import socket

import torch
import torch.nn as nn
import torchvision

from checkpoint import MissingWeights

VGG16_WEIGHTS = torchvision.models.VGG16_Weights.IMAGENET1K_V1
# features[start:stop] ends at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; their channel counts.
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)


def vgg16_path():
    """Where torchvision looks for the ImageNet VGG16 weights: <torch hub dir>/checkpoints/vgg16-397923af.pth."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(VGG16_WEIGHTS.url))


def lpips_available() -> bool:
    """Whether the ImageNet VGG16 weights that LPIPS() needs are on disk."""
    return os.path.isfile(vgg16_path())


def heads_path():
    """The linear heads' file in the installed `lpips` package, found without importing it (this module shadows it)."""
    try:
        path = str(importlib.metadata.distribution("lpips").locate_file("lpips/weights/v0.1/vgg.pth"))
    except importlib.metadata.PackageNotFoundError:
        path = ""
    if not os.path.isfile(path):
        raise FileNotFoundError("LPIPS's linear heads ship with the lpips package: run `pip install lpips`.")
    return path


def vgg16_features(vgg_weights):
    """torchvision's VGG16 `features`: ImageNet weights for 'imagenet', random for None, or a given state dict."""
    if vgg_weights is None:
        return torchvision.models.vgg16().features
    if vgg_weights == "imagenet":
        message = (f"LPIPS needs torchvision's ImageNet VGG16 weights: put {os.path.basename(vgg16_path())} "
                   f"(from {VGG16_WEIGHTS.url}) in {os.path.dirname(vgg16_path())}/, "
                   f"or train without perceptual loss with --perceptual-loss-factor 0.")
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # a download attempt on a machine without internet must not hang
        try:  # loads the file if it is there, else downloads it once (528 MB)
            state = VGG16_WEIGHTS.get_state_dict(progress=not lpips_available(), check_hash=True)
        except Exception:  # no network, a corrupt or truncated file, a hash mismatch...
            raise MissingWeights(message) from None  # one sentence: the cause is in the message
        finally:
            socket.setdefaulttimeout(previous_timeout)
        vgg_weights = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not isinstance(vgg_weights, dict):
        raise ValueError(f"vgg_weights must be 'imagenet', None or a state dict, not {vgg_weights!r}")
    with torch.device("meta"):  # skip the random init of 138M parameters that the weights replace
        features = torchvision.models.vgg16().features
    features.load_state_dict(vgg_weights, assign=True)
    return features


def unit_normalize(features, eps=1e-10):
    """Divide each feature vector by its l2 norm over channels; (B, C, H, W) -> (B, C, H, W)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk: a frozen metric, always in eval mode, for images in [-1, 1]."""

    def __init__(self, *, vgg_weights="imagenet"):
        super().__init__()
        features = vgg16_features(vgg_weights)
        self.slices = nn.ModuleList(features[start:stop] for start, stop in SLICES)
        # Maps [-1, 1] images to roughly ImageNet-normalised ones (the lpips package's ScalingLayer).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        # The package's keys are lin{i}.model.1.weight: model.0 is a dropout, off at evaluation, so we drop it.
        heads = torch.load(heads_path(), map_location="cpu", weights_only=True)
        for i, channels in enumerate(CHANNELS):
            lin = nn.Conv2d(channels, 1, 1, bias=False)
            lin.load_state_dict({"weight": heads[f"lin{i}.model.1.weight"]})
            self.add_module(f"lin{i}", lin)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """Stay in eval mode whatever is asked: LPIPS is a fixed metric."""
        return super().train(False)

    def forward(self, x, y):
        """Perceptual distance between x and y, both (B, 3, H, W) in [-1, 1]; returns (B, 1, 1, 1) in fp32."""
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        distance = 0
        for i, vgg_slice in enumerate(self.slices):
            # A target that needs no gradient (the real image in training) keeps no activations for a backward.
            with torch.set_grad_enabled(torch.is_grad_enabled() and hx.requires_grad):
                hx = vgg_slice(hx)
            hy = vgg_slice(hy)
            # fp32 even under autocast: the sum of squares over 512 channels overflows fp16 into NaNs.
            diff = (unit_normalize(hx.float()) - unit_normalize(hy.float())) ** 2  # (B, C, h, w)
            with torch.autocast(diff.device.type, enabled=False):
                distance = distance + getattr(self, f"lin{i}")(diff).mean(dim=(2, 3), keepdim=True)
        return distance
