"""Small shared helpers of the scripts' outputs: the output folder, image grids, loss plots and the metrics log."""
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch
import torchvision
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from data import DataError


# ---- output folder ----

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


# ---- images and plots ----

def to_image_range(x):
    """Map a tensor from [-1, 1] to [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def label_palette(num_labels=256):
    """(num_labels, 3) uint8 colours of classes, the same for every data set (the PASCAL VOC colour map): class 0
    black, and bit k of the index sets bit 7 - k // 3 of red, green or blue (k % 3), so neighbours differ clearly."""
    index = np.arange(num_labels)
    palette = np.zeros((num_labels, 3), dtype=np.int64)
    for k in range(24):
        palette[:, k % 3] |= ((index >> k) & 1) << (7 - k // 3)
    return palette.astype(np.uint8)


def colour_labels(labels):
    """Class indices (B, H, W) -> (B, 3, H, W) in [-1, 1], each class in its label_palette colour."""
    palette = torch.from_numpy(label_palette(int(labels.max()) + 1)).to(labels.device)
    return palette[labels.long()].permute(0, 3, 1, 2).float() / 127.5 - 1


def for_display(x, kind):
    """Model inputs or outputs (B, C, H, W) as RGB images in [-1, 1] for a grid: label maps (one-hot or logits) in
    the colours of their argmax, gray maps in gray."""
    if kind == "segmentation":
        return colour_labels(x.argmax(1))
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def save_image_grid(images, path, nrow=8, row_labels=None):
    """Save a (N, 3, H, W) batch in [-1, 1] as one PNG grid; row_labels: a name written left of each row."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid = torchvision.utils.make_grid(to_image_range(images.detach().float().cpu()), nrow=nrow)
    image = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    if row_labels:
        font = ImageFont.load_default()
        margin = 8 + max(int(ImageDraw.Draw(image).textlength(label, font=font)) for label in row_labels)
        labelled = Image.new("RGB", (image.width + margin, image.height), "white")
        labelled.paste(image, (margin, 0))
        row_height = images.shape[-2] + 2  # make_grid's 2-pixel padding
        for i, label in enumerate(row_labels):
            ImageDraw.Draw(labelled).text((4, 2 + i * row_height + row_height // 2 - 6), label, fill="black",
                                          font=font)
        image = labelled
    image.save(path, format="PNG")


def save_plots(history, path, panels, title=""):
    """Draw {name: [(step, value), ...]} as a PNG of panels, one per kind of quantity, side by side.

    panels: [(panel title, [series names], log_scale)]. Non-finite values (and, on a log scale, values <= 0) are
    left out; series of 50 points or more are drawn faintly with a moving average on top.
    """
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    figure = Figure(figsize=(4.4 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, cols, squeeze=False).flatten()
    for axes in grid[len(panels):]:
        axes.set_visible(False)
    for axes, (panel, names, log_scale) in zip(grid, panels):
        axes.set_title(panel, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        drawn = False
        for name in names:
            xy = np.array([(float(s), float(v)) for s, v in history.get(name, ()) if math.isfinite(float(v))
                           and (not log_scale or float(v) > 0)]).reshape(-1, 2)
            if not len(xy):
                continue
            if len(xy) >= 50:
                window = max(2, len(xy) // 25)
                line, = axes.plot(xy[:, 0], xy[:, 1], alpha=0.25)
                smooth = np.convolve(xy[:, 1], np.ones(window) / window, mode="valid")
                axes.plot(xy[window - 1:, 0], smooth, color=line.get_color(), label=f"{name}  {xy[-1, 1]:.4g}")
            else:
                axes.plot(xy[:, 0], xy[:, 1], marker="." if len(xy) < 20 else None, label=f"{name}  {xy[-1, 1]:.4g}")
            drawn = True
        if drawn:
            axes.set_yscale("log" if log_scale else "linear")
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes.transAxes, color="gray")
    if title:
        figure.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


# ---- metrics log ----

class MetricsLog:
    """Appends {'step': ..., metric: value} JSON lines to a file and keeps them for save_plots."""

    def __init__(self, path, resume=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records, self.last_line_at = [], None  # where the last line logged by this process starts
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
        """{name: [(step, value), ...]}, the input of save_plots."""
        history = {}
        for record in self.records:
            for name, value in record.items():
                if name != 'step':
                    history.setdefault(name, []).append((record['step'], value))
        return history

    def log(self, step, **metrics):
        """Append one line; a second call for the same step adds to that step's line. Tensors and numpy scalars
        become floats."""
        record = {name: float(value) for name, value in metrics.items()}
        if self.last_line_at is not None and self.records[-1]['step'] == int(step):
            self.records[-1].update(record)
            with open(self.path, 'r+') as f:  # rewrite the last line only
                f.seek(self.last_line_at)
                f.truncate()
                f.write(json.dumps(self.records[-1]) + '\n')
            return
        self.records.append({'step': int(step), **record})
        with open(self.path, 'a') as f:
            self.last_line_at = f.tell()
            f.write(json.dumps(self.records[-1]) + '\n')

    def truncate_after(self, step):
        """Forget lines logged after `step` (a run resuming from a checkpoint at `step`) and rewrite the file."""
        self.records, self.last_line_at = [record for record in self.records if record['step'] <= step], None
        partial = self.path.with_name(self.path.name + '.tmp')
        partial.write_text(''.join(json.dumps(record) + '\n' for record in self.records))
        os.replace(partial, self.path)
