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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from checkpoint import load_checkpoint
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
    a("--threads", type=int, default=None, help="CPU threads of torch's operators (default: torch's, all cores)")
    a("--config", default=None,
      help="start from the flags of a run's config.json (its --out-dir and --resume excepted); flags given override")
    a("--no-tensorboard", action="store_true", help="do not write TensorBoard event files to <out-dir>/tensorboard/")
    a("--ema-decay", type=float, default=None,
      help="keep an exponential moving average of the weights with this decay (e.g. 0.999), saved as the "
           "checkpoint's `ema` and used by sampling and evaluation (default: none, as in the paper)")


# Flags that may change when a run resumes. Every other flag comes back from the run's checkpoint.
MUTABLE_FLAGS = {"epochs", "max_steps", "learning_rate", "save_every", "sample_every", "log_every", "num_workers",
                 "device", "out_dir", "resume", "trust_checkpoint", "threads", "dist_timeout", "max_nonfinite_steps",
                 "compile", "precision", "recompute", "channels_last", "no_tensorboard", "config", "val_batches",
                 "sample_top_k"}
NOT_FROM_CONFIG_FILES = {"config", "out_dir", "resume"}  # a run started from another's config.json is a new run


def explicit_flags(parser, argv=None):
    """{dest: value} of the flags written on the command line, without the defaults."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


def read_config(path):
    """The flags of a run's config.json as a dict."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"Cannot read the config file {path} ({error}).") from None
    if not isinstance(values, dict):
        raise DataError(f"The config file {path} does not hold a dict of flags.")
    return values


def parse_flags(parser, argv=None, checkpoint_name=None):
    """The flags of a script run: its defaults, then a --config file (a run's config.json), then the command line.

    With --resume and `<out-dir>/checkpoints/<checkpoint_name>_last.pt`, the run's own flags come back from the
    checkpoint: the command line may change only MUTABLE_FLAGS, and another value of any other flag is refused.
    """
    args, given = parser.parse_args(argv), explicit_flags(parser, argv)
    if getattr(args, "config", None):
        values = read_config(args.config)
        unknown = sorted(set(values) - set(vars(args)))
        if unknown:
            raise DataError(f"The config file {args.config} has flags this script does not know: {unknown}.")
        for name, value in values.items():
            if name not in given and name not in NOT_FROM_CONFIG_FILES:
                setattr(args, name, value)
    path = Path(args.out_dir) / "checkpoints" / f"{checkpoint_name}_last.pt" if checkpoint_name else None
    if path is not None and getattr(args, "resume", False) and path.exists():
        saved = load_checkpoint(path, trust=args.trust_checkpoint, mmap=True).get("args", {})
        changed = sorted(f"--{name.replace('_', '-')}" for name in set(saved) & set(given) - MUTABLE_FLAGS
                         if given[name] != saved[name])
        if changed:
            raise ValueError(f"--resume continues the run of {path} with its own {', '.join(changed)}; start a new "
                             f"run with another --out-dir to change them.")
        for name, value in saved.items():
            if name not in given and name != "resume" and hasattr(args, name):
                setattr(args, name, value)
    return args


def check_positive(args, *names):
    """Reject a zero or negative value of each named flag, naming the flag."""
    for name in names:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
