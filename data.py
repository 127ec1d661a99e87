"""Data: image folders, decoding, augmentation, resumable sharded sampling, loaders and token caches."""
import hashlib
import math
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from tqdm import tqdm

from checkpoint import load_checkpoint, save_checkpoint
from runtime import broadcast_rows, gather_rows, usable_cores

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


class DataError(Exception):
    """A problem with the user's data; scripts print the message and exit without a traceback."""

    def __init__(self, message):
        # Raised in a DataLoader worker, it comes back to the main process rebuilt from the worker's traceback as
        # text ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep the original line.
        if message.startswith('Caught DataError') and 'DataError: ' in message:
            message = message.rstrip().rsplit('DataError: ', 1)[1]
        super().__init__(message)


def albumentations():
    """The albumentations module, imported on first use: only image folders need it, so that sampling, bench.py
    and gpu_check.py's package check run where it is missing, and a missing install is one sentence."""
    os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')  # it asks PyPI for a newer version; nodes are often offline
    try:
        import albumentations
    except ImportError as error:
        raise DataError(f"Image folders need the albumentations package ({error}): pip install -r requirements.txt, "
                        f"or on a machine without a package registry the wheel folder of docs/gpu.md.") from None
    return albumentations


def find_images(root):
    """All image files under `root` (recursive, any letter case of the extension), sorted."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"The data folder '{root}' does not exist.")
    if not root.is_dir():
        raise DataError(f"The data path '{root}' is not a folder.")
    paths = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        # Hidden folders and files (.ipynb_checkpoints, macOS '._x.jpg') are copies or metadata, not data.
        subfolders[:] = [name for name in subfolders if not name.startswith('.')]
        paths += [Path(folder, name) for name in files
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')]
    if not paths:
        raise DataError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) were found in '{root}'.")
    return sorted(paths)


def load_rgb(path, min_side=None):
    """Decode an image file to 8-bit RGB; alpha is composited on white, 16-bit values are scaled, not clipped.

    min_side: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (PIL's draft, in the DCT) as long as its shorter side
    stays at least this long: a 1600x1200 photo for a 256 crop decodes 4x faster than at full size.
    """
    with Image.open(path) as image:
        if min_side and image.format == 'JPEG' and min(image.size) > min_side:
            scale = min_side / min(image.size)
            image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()  # decode now, so a truncated file fails here and not inside a transform
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if image.mode.startswith('I'):  # 16-bit PNGs open as 'I;16' (or 'I'): keep the high byte
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8), 'L')
    if (image.mode == 'P' and 'transparency' in image.info) or image.mode in ('PA', 'LA', 'La', 'RGBa'):
        image = image.convert('RGBA')
    if image.mode == 'RGBA':
        image = Image.alpha_composite(Image.new('RGBA', image.size, (255, 255, 255, 255)), image)
    return image.convert('RGB')


LABEL_MODES = ('1', 'L', 'P', 'I', 'I;16', 'I;16B', 'I;16L')  # one-channel modes whose values are class indices


def read_map(path, kind, num_labels=0):
    """One file as a numpy array: (H, W, 3) uint8 for rgb; (H, W, 1) float32 in [-1, 1] for gray, each map min-max
    scaled as taming's depth loader does (a constant map is all -1); (H, W) int64 class indices for segmentation.

    Gray maps keep every bit of a 16-bit PNG. A label map is a one-channel PNG whose pixel values are the classes
    (mode L, P: the palette index, or 16-bit); a class >= num_labels is a DataError naming the file.
    """
    if kind == 'rgb':
        return np.array(load_rgb(path))
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here
    if kind == 'gray':
        if not image.mode.startswith(('I', 'F', 'L')) or image.mode == 'LA':
            image = image.convert('L')  # e.g. edges saved as RGB: their luma
        values = np.asarray(image, dtype=np.float64)
        values = (values - values.min()) / max(1e-8, values.max() - values.min())
        return (2 * values - 1).astype(np.float32)[..., None]
    if kind != 'segmentation':
        raise ValueError(f"kind must be rgb, gray or segmentation, got {kind!r}.")
    if image.format == 'JPEG':
        raise DataError(f"The label map '{path}' is a JPEG, whose lossy compression changes class indices at region "
                        f"edges; save label maps as PNG.")
    if image.mode not in LABEL_MODES:
        raise DataError(f"The label map '{path}' is a {image.mode} image; a label map has one channel whose values "
                        f"are the class indices (PNG mode L, P or 16-bit).")
    labels = np.asarray(image).astype(np.int64)
    if labels.size and (labels.max() >= num_labels or labels.min() < 0):
        bad = labels.max() if labels.max() >= num_labels else labels.min()
        raise DataError(f"The label map '{path}' holds class {bad}, outside 0 to {num_labels - 1} "
                        f"(--num-labels {num_labels}).")
    return labels


def map_to_tensor(array, kind, num_labels=0):
    """An array of read_map (after its transform) -> float tensor (C, H, W): [-1, 1] for rgb and gray; one-hot over
    num_labels channels for segmentation."""
    if kind == 'segmentation':
        labels = torch.from_numpy(np.ascontiguousarray(array).astype(np.int64)).reshape(array.shape[:2])
        return torch.nn.functional.one_hot(labels, num_labels).permute(2, 0, 1).float()
    tensor = torch.from_numpy(np.ascontiguousarray(array)).float()
    tensor = (tensor[..., None] if tensor.ndim == 2 else tensor).permute(2, 0, 1)  # (C, H, W)
    return tensor / 127.5 - 1 if kind == 'rgb' else tensor  # gray maps are in [-1, 1] already


def build_transform(image_size, train=True, kind='rgb'):
    """Resize the shorter side to image_size (enlarging too, so every crop is full-size), crop (random for training,
    central for evaluation), flip half of the training items. Label maps are resized by nearest neighbour only, so
    each pixel keeps a class of the file, and nothing changes their values."""
    A = albumentations()
    crop = A.RandomCrop(image_size, image_size) if train else A.CenterCrop(image_size, image_size)
    flip = [A.HorizontalFlip(p=0.5)] if train else []
    resize = A.SmallestMaxSize(max_size=image_size, interpolation=cv2.INTER_NEAREST) if kind == 'segmentation' else \
        A.SmallestMaxSize(max_size=image_size)
    return A.Compose([resize, crop, *flip])


class Unreadable(NamedTuple):
    """The item of an image file that cannot be decoded: its path and why. A Loader names it and leaves it out."""
    path: str
    reason: str


def unreadable_reason(error, path):
    """Why a file could not be decoded, in a few words: the error's first line without the path it may repeat."""
    lines = str(error).replace(repr(str(path)), "").replace(str(path), "").strip().splitlines()
    reason = lines[0].strip(" :") if lines else ""
    return reason[:200] or type(error).__name__


class ImageFolder(torch.utils.data.Dataset):
    """Images under a folder as (C, H, W) tensors (map_to_tensor), optionally labelled by their top-level sub-folder.

    kind: rgb (3 channels in [-1, 1]), gray (1 channel in [-1, 1]) or segmentation (label maps, one-hot over
    num_labels channels)."""

    def __init__(self, root, image_size, train=True, with_labels=False, paths=None, kind='rgb', num_labels=0):
        self.root = Path(root)
        self.paths = find_images(self.root) if paths is None else [Path(p) for p in paths]
        self.train, self.with_labels, self.image_size = train, with_labels, image_size
        self.kind, self.num_labels = kind, num_labels
        self.transform = build_transform(image_size, train, kind)
        self.classes, self.labels = [], []
        if with_labels:  # classes come from the whole folder, not `paths`, so a train and a val split agree
            tops = [p.relative_to(self.root).parts for p in find_images(self.root)]
            self.classes = sorted({parts[0] for parts in tops if len(parts) > 1})
            if not self.classes:
                raise DataError(f"Labels need one sub-folder per class in '{self.root}', but none holds images.")
            index = {name: i for i, name in enumerate(self.classes)}
            for path in self.paths:
                parts = path.relative_to(self.root).parts
                if len(parts) < 2:
                    raise DataError(f"The image '{path}' is not inside a class sub-folder of '{self.root}'.")
                self.labels.append(index[parts[0]])

    def read(self, path):
        """The file as an array for the transform (read_map's; label maps as small unsigned ints, which cv2 takes)."""
        if self.kind == 'rgb':
            return np.array(load_rgb(path, self.image_size if self.train else None))  # exact decode for eval
        array = read_map(path, self.kind, self.num_labels)
        return array.astype(np.uint8 if self.num_labels <= 256 else np.uint16) if self.kind == 'segmentation' else array

    def __len__(self):
        return len(self.paths)

    def arrays(self, index):
        """The item's arrays for the transform, {'image': ...}; an Unreadable for a file that cannot be decoded."""
        path = self.paths[index]
        return read_or_unreadable(path, lambda: {'image': self.read(path)})

    def tensors(self, arrays):
        """The transformed arrays as the item's tensors."""
        return {'image': map_to_tensor(arrays['image'], self.kind, self.num_labels)}  # (C, H, W)

    def __getitem__(self, index):
        arrays = self.arrays(index)
        if isinstance(arrays, Unreadable):
            return arrays
        if self.train and hasattr(self.transform, 'set_random_seed'):
            # albumentations >= 2 keeps its own generator, seeded once from the OS: forked workers would share
            # it and seed_everything would not reach it (1.x used Python's `random`, which DataLoader seeds).
            # Torch's generator is seeded per worker by DataLoader, so each item's seed is drawn from it.
            self.transform.set_random_seed(int(torch.randint(2**31, ()).item()))
        item = self.tensors(self.transform(**arrays))  # one random crop and flip for every array of the item
        if self.with_labels:
            item['label'] = self.labels[index]
        return item


def read_or_unreadable(path, read):
    """read(), or an Unreadable naming the file when it cannot be decoded; a DataError (readable but wrong, such as a
    class out of range) is the user's to fix and is raised."""
    try:
        return read()
    except DataError:
        raise
    except Exception as error:  # PIL reports bad files as OSError, SyntaxError, ValueError, ...
        return Unreadable(str(path), unreadable_reason(error, path))


def find_partners(paths, root, cond_root):
    """For each image path under root, the file under cond_root with the same relative path and stem (any supported
    extension), or None."""
    try:
        found = find_images(cond_root)
    except DataError as error:
        raise DataError(f"--cond-path: {error}") from None
    partners = {}
    for path in found:
        key = path.relative_to(cond_root).with_suffix('')
        if key in partners:
            raise DataError(f"Two condition files have the stem of {key}: '{partners[key]}' and '{path}'.")
        partners[key] = path
    return [partners.get(Path(p).relative_to(root).with_suffix('')) for p in paths]


class PairedFolder(ImageFolder):
    """RGB images, each with its condition: the file of the same relative path and stem under cond_root, read as
    `cond_kind` (rgb, gray or segmentation with num_labels classes), of the image's size. One random crop and flip
    for both; a label map is resized by nearest neighbour only. Images without a condition file are left out and
    listed in `missing`."""

    def __init__(self, root, cond_root, image_size, train=True, with_labels=False, paths=None, cond_kind='rgb',
                 num_labels=0):
        super().__init__(root, image_size, train=train, with_labels=with_labels, paths=paths)
        self.cond_root = Path(cond_root)
        partners = find_partners(self.paths, self.root, self.cond_root)
        self.missing = [path for path, partner in zip(self.paths, partners) if partner is None]
        if len(self.missing) == len(self.paths):
            example = self.cond_root / self.paths[0].relative_to(self.root).with_suffix('.png')
            raise DataError(f"--cond-path {self.cond_root} holds a condition for none of the {len(self.paths)} images "
                            f"of {self.root} (the condition of {self.paths[0].name} would be {example}, or the same "
                            f"stem with another image extension).")
        keep = [i for i, partner in enumerate(partners) if partner is not None]
        self.paths, self.cond_paths = [self.paths[i] for i in keep], [partners[i] for i in keep]
        self.labels = [self.labels[i] for i in keep] if with_labels else []
        self.cond = ImageFolder(cond_root, image_size, train, kind=cond_kind, num_labels=num_labels,
                                paths=self.cond_paths)  # reads them as its kind
        self.transform.add_targets({'cond': 'mask' if cond_kind == 'segmentation' else 'image'})  # nearest: masks

    def arrays(self, index):
        path, cond_path = self.paths[index], self.cond_paths[index]
        image = read_or_unreadable(path, lambda: np.array(load_rgb(path)))  # whole: the draft decode would shrink it
        if isinstance(image, Unreadable):
            return image
        cond = read_or_unreadable(cond_path, lambda: self.cond.read(cond_path))
        if isinstance(cond, Unreadable):
            return cond
        if image.shape[:2] != cond.shape[:2]:  # named by the image, the pair's file the dataset lists
            return Unreadable(str(path), f"it is {image.shape[1]}x{image.shape[0]} pixels, its condition "
                                         f"'{cond_path}' {cond.shape[1]}x{cond.shape[0]}")
        return {'image': image, 'cond': cond}

    def tensors(self, arrays):
        return {'image': map_to_tensor(arrays['image'], 'rgb'),
                'cond': map_to_tensor(arrays['cond'], self.cond.kind, self.cond.num_labels)}


def collate_images(batch):
    """Stack the readable items of a batch (the dicts) and count the skipped ones; None when nothing was readable."""
    good = [item for item in batch if isinstance(item, dict)]
    if not good:
        return None
    # 'image' (C, H, W) and 'cond' (C', H, W) from image folders, or 'indices' (h*w,) and 'cond_indices' from a
    # stage-2 token cache
    out = {key: torch.stack([item[key] for item in good]) for key in ('image', 'cond', 'indices', 'cond_indices')
           if key in good[0]}
    if 'label' in good[0]:
        out['label'] = torch.tensor([item['label'] for item in good], dtype=torch.long)
    out['skipped'] = len(batch) - len(good)
    return out


def collate_with_unreadable(batch):
    """collate_images' batch and the batch's Unreadable items: what a worker process sends to the main process."""
    return collate_images(batch), [item for item in batch if isinstance(item, Unreadable)]


def say_unreadable(path, reason):
    """Name an unreadable file on stderr, in a line of its own above any progress bar."""
    tqdm.write(f"Skipping unreadable image '{path}': {reason}.", file=sys.stderr)


MAX_NAMED_UNREADABLE = 10  # a loader names this many unreadable files, one line each; more are only counted


class Loader(torch.utils.data.DataLoader):
    """A DataLoader of collate_images' batches whose main process names each unreadable file once, in a line of its
    own on stderr above any progress bar (a worker's print or warning would cut through the bar); `unreadable` maps
    each one met to its reason."""

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, collate_fn=collate_with_unreadable, **kwargs)
        self.unreadable = {}

    def __iter__(self):
        unnamed = 0  # unreadable files met for the first time in this pass, beyond MAX_NAMED_UNREADABLE
        for batch, unreadable in super().__iter__():
            for path, reason in unreadable:
                if path not in self.unreadable:
                    self.unreadable[path] = reason
                    if len(self.unreadable) <= MAX_NAMED_UNREADABLE:
                        say_unreadable(path, reason)
                    else:
                        unnamed += 1
            yield batch
        if unnamed:
            tqdm.write(f"Skipping {unnamed} more unreadable image(s), not named ({len(self.unreadable)} in all).",
                       file=sys.stderr)


def build_loader(dataset, batch_size, train=True, num_workers=0, sampler=None, drop_last=None):
    """A Loader that shuffles for training, skips unreadable files (naming them) and keeps workers alive between
    epochs.

    The workers are capped by the cores this process may use (more only compete for them)."""
    num_workers = min(num_workers, usable_cores())
    extra = {'prefetch_factor': 4} if num_workers > 0 else {}  # decoding JPEGs is the usual bottleneck
    return Loader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                  drop_last=train if drop_last is None else drop_last, num_workers=num_workers,
                  pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0, **extra)


def split_paths(paths, val_fraction=0.05, seed=0):
    """Deterministic train/val split; at least one validation image when there are two or more."""
    paths = sorted(paths)
    random.Random(seed).shuffle(paths)
    num_val = 0
    if len(paths) >= 2 and val_fraction > 0:
        num_val = min(max(1, round(len(paths) * val_fraction)), len(paths) - 1)
    return sorted(paths[num_val:]), sorted(paths[:num_val])


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffles with a seed per epoch and shards across ranks; can start an epoch after the items that the ranks have
    taken, so that a resume repeats and skips no item, with the same number of ranks or another."""

    def __init__(self, num_items, batch_size, shuffle=True, seed=0, rank=0, world_size=1):
        self.num_items, self.batch_size, self.shuffle = num_items, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """Begin epoch `epoch` after the first `start` items of its order (rank r takes items r, r + world_size,
        ..., so after b batches of every rank the ranks have taken the first b x batch_size x world_size)."""
        self.epoch, self.start = epoch, start

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        return order[self.start + self.rank:self.start + len(self) * self.world_size:self.world_size]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self):
        return max(0, self.num_items - self.start) // self.world_size  # equal shards keep DDP's ranks in step


class TokenRows(torch.utils.data.Dataset):
    """Pre-computed index rows (N, h*w), labels (N,) or None and condition rows (N, hc*wc) or None, as dicts like
    those of ImageFolder and PairedFolder."""

    def __init__(self, indices, labels, cond_indices=None):
        self.indices, self.labels, self.cond_indices = indices, labels, cond_indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        item = {"indices": self.indices[i].long()}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        if self.cond_indices is not None:
            item["cond_indices"] = self.cond_indices[i].long()
        return item


def token_cache_path(stage1_path, image_size, paths, split, cond=None):
    """Cache file next to the stage-1 checkpoint (or model folder), keyed by its bytes, the image size and the image
    list; for paired data, cond = (condition checkpoint, condition file list, --cond-downsample) is part of the key
    too."""
    h = hashlib.sha256()
    checkpoints, key = [Path(stage1_path)], f"{image_size}|" + "\n".join(map(str, paths))
    if cond is not None:
        cond_checkpoint, cond_paths, downsample = cond
        checkpoints.append(Path(cond_checkpoint))
        key += f"|condition 1/{downsample}|" + "\n".join(map(str, cond_paths))
    for checkpoint in checkpoints:
        for file in sorted(checkpoint.iterdir()) if checkpoint.is_dir() else [checkpoint]:
            if not file.is_file():
                continue
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    h.update(key.encode())
    return Path(stage1_path).parent / f"tokens_{split}_{image_size}px_{h.hexdigest()[:16]}.pt"


@torch.no_grad()
def encode_images(encode, dataset, batch_size, num_workers, items=None):
    """Rows of `encode` (a batch's {"image": ..., "cond": ...} -> {name: rows}) on each item of `dataset` (or of its
    `items`) followed by its mirror image: {"indices": (2N, h*w) int32, "cond_indices": (2N, hc*wc) int32 for pairs,
    "labels": (2N,) when the dataset has labels}; None when no item is readable."""
    dataset = dataset if items is None else torch.utils.data.Subset(dataset, items)
    parts = {}
    for batch in tqdm(build_loader(dataset, batch_size, train=False, num_workers=num_workers), desc="encoding tokens"):
        if batch is None:
            continue
        views = [encode({key: batch[key].flip(-1) if flip else batch[key] for key in ("image", "cond") if key in batch})
                 for flip in (False, True)]  # an image and its condition are mirrored together
        for name in views[0]:
            rows = torch.stack([views[0][name].int().cpu(), views[1][name].int().cpu()], 1)
            parts.setdefault(name, []).append(rows.flatten(0, 1))  # (2B, ...): item 0, its mirror, item 1, ...
        if "label" in batch:
            parts.setdefault("labels", []).append(batch["label"].repeat_interleave(2))
    return {key: torch.cat(values) for key, values in parts.items()} if parts else None


def cached_tokens(cache, images, encode, batch_size, num_workers, every_rank=True):
    """TokenRows read from `cache`, which is written first if missing; None on the ranks that do not need them.

    Rank 0 alone looks at the file and writes it, and tells the other ranks (whose disks may not hold it, or not yet)
    what it found. Under torchrun each rank encodes a contiguous share of the images, and the shares reach rank 0 by
    a collective, so the rows come in image order whatever the number of ranks; then, with `every_rank`, rank 0 sends
    the rows to every rank. No rank waits in a collective for longer than its own share takes.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    rows = None
    if rank == 0 and cache.exists():
        rows = {key: value for key, value in load_checkpoint(cache).items() if value is not None}
    found = [rows is not None]
    if distributed:
        dist.broadcast_object_list(found, src=0)
    if not found[0]:
        share = range(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
        rows = encode_images(encode, images, batch_size, num_workers, share)
        rows = gather_rows(rows) if distributed else rows or {}
        if rows == {}:  # on every rank alike
            raise DataError(f"None of the {len(images)} images for the token cache {cache.name} is readable.")
        if rank == 0:
            save_checkpoint(rows, cache)  # atomic, through a temporary file named by this process
            print(f"Wrote the token cache {cache}.")
    if distributed and every_rank:
        rows = broadcast_rows(rows)
    if rows is None:
        return None
    return TokenRows(rows["indices"], rows.get("labels"), rows.get("cond_indices"))
