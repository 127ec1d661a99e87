"""The .npz files of OpenAI's ADM evaluator (guided-diffusion's evaluations/), the FID protocol of LlamaGen, VAR and
TiTok: sample batches (arr_0: uint8 N x H x W x 3, arr_1: class labels) and reference batches (arr_0 images, and mu /
sigma: the mean and covariance of their 2048-d Inception pool features, computed by ADM's TensorFlow graph)."""
from pathlib import Path

import albumentations as A
import numpy as np
import torch

from data import DataError


def write_samples(path, images, labels=None):
    """Save images (N, H, W, 3) uint8 as arr_0 and labels (N,) as arr_1, as ADM's sampling scripts write them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(arr_0=images) if labels is None else dict(arr_0=images, arr_1=np.asarray(labels, dtype=np.int64))
    partial = path.with_name(path.name + ".tmp.npz")  # np.savez adds .npz to a name without it
    np.savez(partial, **arrays)
    partial.replace(path)
    return path


def read_array(path, key):
    """One array of an .npz (no pickles: np.load refuses object arrays), or a DataError naming the file."""
    try:
        with np.load(path) as npz:
            return npz[key] if key in npz.files else None
    except (OSError, ValueError) as error:  # not a zip, truncated, object arrays
        raise DataError(f"Cannot read {path} as an .npz file ({error}).") from None


def read_statistics(path, dim):
    """{'mu': (D,), 'sigma': (D, D)} float64 of a reference batch, taken as given; None when it has none."""
    mu, sigma = read_array(path, "mu"), read_array(path, "sigma")
    if mu is None or sigma is None:
        return None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise DataError(f"The statistics in {path} are {mu.shape[0] if mu.ndim == 1 else mu.shape}-dimensional, the "
                        f"feature network's {dim}-dimensional; pass --npz-images to use its arr_0 images instead.")
    return dict(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))


def image_batches(path, image_size, batch_size):
    """Batches {'image': (B, 3, S, S) in [-1, 1], 'skipped': 0} of the arr_0 images (N, H, W, 3) uint8 of an .npz,
    resized (shorter side) and centre-cropped to S as ImageFolder(train=False) does with files."""
    images = read_array(path, "arr_0")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = "no arr_0" if images is None else f"arr_0 of {images.dtype} {tuple(images.shape)}"
        raise DataError(f"{path} holds {shape}; ADM's batches hold arr_0 as uint8 images (N, H, W, 3).")
    fit = A.Compose([A.SmallestMaxSize(max_size=image_size), A.CenterCrop(image_size, image_size)])
    for first in range(0, len(images), batch_size):
        batch = images[first:first + batch_size]
        if batch.shape[1:3] != (image_size, image_size):
            batch = np.stack([fit(image=image)["image"] for image in batch])
        yield {"image": torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1, "skipped": 0}
