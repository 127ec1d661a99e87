"""Shared helpers: image folders and loaders, devices, atomic checkpoints, image grids, plots and the metrics log."""
import glob
import json
import math
import os
import pickle
import random
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont, ImageOps

# albumentations asks PyPI for a newer version on import; training nodes are often offline.
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
import albumentations as A  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


class DataError(Exception):
    """A problem with the user's data; scripts print the message and exit without a traceback."""


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged, or not safe to load."""


# ---- data ----

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


def load_rgb(path):
    """Decode an image file to 8-bit RGB; alpha is composited on white, 16-bit values are scaled, not clipped."""
    with Image.open(path) as image:
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


_warned_paths = set()  # unreadable files already reported by this process


class ImageFolder(torch.utils.data.Dataset):
    """Images under a folder as (3, H, W) tensors in [-1, 1], optionally labelled by their top-level sub-folder."""

    def __init__(self, root, image_size, train=True, with_labels=False, paths=None):
        self.root = Path(root)
        self.paths = find_images(self.root) if paths is None else [Path(p) for p in paths]
        self.train, self.with_labels = train, with_labels
        crop = A.RandomCrop(image_size, image_size) if train else A.CenterCrop(image_size, image_size)
        flip = [A.HorizontalFlip(p=0.5)] if train else []
        # SmallestMaxSize also enlarges images smaller than the crop, so every crop is full-size.
        self.transform = A.Compose([A.SmallestMaxSize(max_size=image_size), crop, *flip])
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

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            image = np.array(load_rgb(path))
        except Exception as error:  # PIL reports bad files as OSError, SyntaxError, ValueError, ...
            if path not in _warned_paths:  # once per file, however many epochs ask for it
                _warned_paths.add(path)
                warnings.warn(f"Skipping unreadable image '{path}': {error}", stacklevel=2)
            return None
        if self.train and hasattr(self.transform, 'set_random_seed'):
            # albumentations >= 2 keeps its own generator, seeded once from the OS: forked workers would share
            # it and seed_everything would not reach it (1.x used Python's `random`, which DataLoader seeds).
            # Torch's generator is seeded per worker by DataLoader, so each item's seed is drawn from it.
            self.transform.set_random_seed(int(torch.randint(2**31, ()).item()))
        image = self.transform(image=image)['image']  # (H, W, 3) uint8
        item = {'image': torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1}
        if self.with_labels:
            item['label'] = self.labels[index]
        return item


def collate_images(batch):
    """Stack the readable items of a batch and count the skipped ones; None when nothing was readable."""
    good = [item for item in batch if item is not None]
    if not good:
        return None
    # 'image' (3, H, W) from image folders, or 'indices' (h*w,) from a stage-2 token cache
    out = {key: torch.stack([item[key] for item in good]) for key in ('image', 'indices') if key in good[0]}
    if 'label' in good[0]:
        out['label'] = torch.tensor([item['label'] for item in good], dtype=torch.long)
    out['skipped'] = len(batch) - len(good)
    return out


def build_loader(dataset, batch_size, train=True, num_workers=0, sampler=None, drop_last=None):
    """A DataLoader that shuffles for training, skips unreadable files and keeps workers alive between epochs."""
    extra = {'prefetch_factor': 4} if num_workers > 0 else {}  # decoding JPEGs is the usual bottleneck
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        drop_last=train if drop_last is None else drop_last, num_workers=num_workers,
        collate_fn=collate_images, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0, **extra)


def split_paths(paths, val_fraction=0.05, seed=0):
    """Deterministic train/val split; at least one validation image when there are two or more."""
    paths = sorted(paths)
    random.Random(seed).shuffle(paths)
    num_val = 0
    if len(paths) >= 2 and val_fraction > 0:
        num_val = min(max(1, round(len(paths) * val_fraction)), len(paths) - 1)
    return sorted(paths[num_val:]), sorted(paths[:num_val])


# ---- device and reproducibility ----

def pick_device(name=None):
    """The named device, else CUDA when available, else the CPU with a notice."""
    if name is not None:
        try:
            torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device '{name}' is not a device name torch knows (cpu, cuda, cuda:1, ...).") from None
        if torch.device(name).type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f"Device '{name}' was requested, but CUDA is not available on this machine.")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    print('No CUDA device found: running on the CPU (slow).')
    return torch.device('cpu')


def seed_everything(seed):
    """Seed Python, NumPy and torch (torch.manual_seed covers every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- output folders and checkpoints ----

def check_writable(folder):
    """Create `folder` if needed and make sure files can be written in it, before any training starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f'.write-test-{uuid.uuid4().hex}'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as err:
        raise DataError(f'Cannot write to the output folder {folder} ({err.strerror}); pass another --out-dir.')
    return folder


def _fsync_folder(folder):
    """Make a rename durable; some platforms and file systems cannot open a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(obj, path):
    """torch.save that never leaves a partial file at `path`: write a temporary file beside it, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is an atomic rename on one file system; 'x' mode keeps the user's umask.
    partial = path.with_name(f'{path.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with open(partial, 'xb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:  # also Ctrl-C halfway through a large save
        partial.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    for stale in path.parent.glob(f'{glob.escape(path.name)}.*.tmp'):  # left by a process killed while saving
        stale.unlink(missing_ok=True)


def load_checkpoint(path, trust=False):
    """Load a checkpoint onto the CPU; arbitrary pickled objects are refused unless `trust` is set."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The checkpoint '{path}' does not exist.")
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust)
    except pickle.UnpicklingError as error:
        if not trust:  # weights_only met an object that unpickling would construct by running code
            raise CheckpointError(f"The checkpoint '{path}' holds Python objects that could run code when loaded; "
                                  f"if you trust its source, pass --trust-checkpoint.") from error
        raise CheckpointError(f"The checkpoint '{path}' is damaged ({type(error).__name__}).") from error
    except (RuntimeError, EOFError, KeyError) as error:  # how torch reports a truncated or foreign file
        raise CheckpointError(f"The checkpoint '{path}' is damaged or not a PyTorch file "
                              f"({type(error).__name__}).") from error


# ---- images and plots ----

def to_image_range(x):
    """Map a tensor from [-1, 1] to [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def save_image_grid(images, path, nrow=8):
    """Save a (N, 3, H, W) batch in [-1, 1] as one PNG grid."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(to_image_range(images.detach().float().cpu()), path, nrow=nrow)


PLOT_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def save_loss_plot(history, path, title=''):
    """Draw {name: [(step, value), ...]} as a PNG line chart; long, noisy series get a moving average."""
    width, height, left, right, top, bottom = 800, 400, 70, 20, 30, 40
    image = Image.new('RGB', (width, height), 'white')
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    series = {name: np.array(sorted((float(s), float(v)) for s, v in points if math.isfinite(float(v))))
              .reshape(-1, 2) for name, points in history.items()}  # NaN and inf values are left out
    every = np.concatenate([np.zeros((0, 2)), *series.values()])
    (x_lo, y_lo), (x_hi, y_hi) = (every.min(0), every.max(0)) if len(every) else ((0, 0), (0, 0))
    if x_hi == x_lo:  # a single step: give the axis some width
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:  # a constant series: centre it
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_pixel(x, y):  # 8 px inside the frame, so a curve at its min or max does not hide under it
        return (float(left + 8 + (x - x_lo) / (x_hi - x_lo) * (width - left - right - 16)),
                float(height - bottom - 8 - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom - 16)))

    draw.text((left, 8), title, fill='black', font=font)
    draw.text((width // 2 - 10, height - 16), 'step', fill='black', font=font)
    for k in range(5):  # grid lines; the lowest and highest labels are the min and max
        y = y_lo + (y_hi - y_lo) * k / 4
        py, label = to_pixel(x_lo, y)[1], f'{y:.4g}'
        draw.line([(left, py), (width - right, py)], fill=(225, 225, 225))
        draw.text((left - 6 - draw.textlength(label, font=font), py - 6), label, fill='black', font=font)
    for x in sorted({round(x_lo + (x_hi - x_lo) * k / 4) for k in range(5)}):  # steps are whole numbers
        px = to_pixel(x, y_lo)[0]
        draw.text((px - draw.textlength(str(x), font=font) / 2, height - bottom + 6), str(x), fill='black', font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline='black')
    legend = []
    for i, (name, xy) in enumerate(series.items()):
        colour = PLOT_COLOURS[i % len(PLOT_COLOURS)]
        legend.append((f'{name}  {xy[-1, 1]:.4g}' if len(xy) else f'{name}  (no data)', colour))
        if len(xy) == 1:
            px, py = to_pixel(*xy[0])
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        elif len(xy) >= 50:  # noisy: the raw values faintly, a centred moving average on top
            draw.line([to_pixel(x, y) for x, y in xy], fill=tuple(int(c + (255 - c) * 0.7) for c in colour))
            window = max(2, len(xy) // 25)
            smooth = np.convolve(xy[:, 1], np.ones(window) / window, mode='valid')
            steps = xy[(window - 1) // 2:, 0][:len(smooth)]
            draw.line([to_pixel(x, y) for x, y in zip(steps, smooth)], fill=colour, width=2)
        elif len(xy) > 1:
            draw.line([to_pixel(x, y) for x, y in xy], fill=colour, width=2)
    if legend:  # top right, where falling loss curves usually leave room
        x0 = width - right - 46 - max(draw.textlength(text, font=font) for text, _ in legend)
        draw.rectangle([x0 - 6, top + 4, width - right - 4, top + 8 + 14 * len(legend)], fill='white',
                       outline=(180, 180, 180))
        for i, (text, colour) in enumerate(legend):
            draw.line([(x0, top + 14 + 14 * i), (x0 + 20, top + 14 + 14 * i)], fill=colour, width=3)
            draw.text((x0 + 26, top + 8 + 14 * i), text, fill='black', font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format='PNG')


# ---- metrics log ----

class MetricsLog:
    """Appends {'step': ..., metric: value} JSON lines to a file and keeps them for save_loss_plot."""

    def __init__(self, path, resume=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = []
        if resume and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
        else:
            self.path.write_text('')  # a new run starts a new curve

    @property
    def history(self):
        """{name: [(step, value), ...]}, the input of save_loss_plot."""
        history = {}
        for record in self.records:
            for name, value in record.items():
                if name != 'step':
                    history.setdefault(name, []).append((record['step'], value))
        return history

    def log(self, step, **metrics):
        """Append one line; tensors and numpy scalars become floats."""
        record = {'step': int(step), **{name: float(value) for name, value in metrics.items()}}
        self.records.append(record)
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')

    def truncate_after(self, step):
        """Forget lines logged after `step` (a run resuming from a checkpoint at `step`) and rewrite the file."""
        self.records = [record for record in self.records if record['step'] <= step]
        partial = self.path.with_name(self.path.name + '.tmp')
        partial.write_text(''.join(json.dumps(record) + '\n' for record in self.records))
        os.replace(partial, self.path)
