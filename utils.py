"""Small shared helpers of the scripts: flags, the output folder, image grids, loss plots and the metrics log."""
import argparse
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch
import torchvision
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
        """{name: [(step, value), ...]}, the input of save_loss_plot."""
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


# ---- command lines ----

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None and the help text says what happens instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_run_flags(parser, name):
    """Flags of the training loop, the same in both scripts."""
    a = parser.add_argument
    a("--epochs", type=int, default=100, help="passes over the data set (unless --max-steps is given)")
    a("--max-steps", type=int, default=None,
      help="stop after this many optimizer steps, counted across resumes (overrides --epochs)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--compile", action="store_true", help="wrap the models in torch.compile")
    a("--device", default=None, help="cuda, cuda:1, cpu ... (default: CUDA when available)")
    a("--out-dir", default=".", help="where results/ and checkpoints/ go")
    a("--resume", action="store_true", help=f"continue from <out-dir>/checkpoints/{name}_last.pt")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    a("--seed", type=int, default=0, help="random seed (offset by rank)")
    a("--num-workers", type=int, default=4, help="data-loading worker processes per GPU")
    a("--save-every", type=int, default=1000, help="steps between checkpoints")
    a("--sample-every", type=int, default=500, help="steps between sample grids (and validation in stage 2)")
    a("--log-every", type=int, default=10,
      help="steps between reads of the logged values (each read waits for the GPU); they are averaged over them")
    a("--max-nonfinite-steps", type=int, default=20, help="stop after this many non-finite losses in a row")
    a("--dist-timeout", type=float, default=30.0,
      help="minutes a rank may wait in a collective under torchrun before the job stops with an error")


def check_positive(args, *names):
    """Reject a zero or negative value of each named flag, naming the flag."""
    for name in names:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
