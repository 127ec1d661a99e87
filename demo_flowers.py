"""The demo data set: procedurally drawn flowers (petals of varied count, shape and colour on varied backgrounds).

    python demo_flowers.py --out data/flowers --num-images 300                  # 256x256, seed 0
    python demo_flowers.py --out data/heldout --num-images 100 --size 32 --seed 1
    python demo_flowers.py --out data/flowers --with-segmentation               # label maps in data/flowers_labels/

With segmentation, each flower's label map (pixel = class index in FLOWER_LABELS) has the same file name in a sibling
folder, drawn with the same shapes as the flower: each pixel's class is the part that covers most of it.
"""
import colorsys
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cli import ScriptParser, run_script

FLOWER_LABELS = ("background", "petal", "centre", "stem and leaf")  # the class index of each part in label maps
# Which part shows where two cover a pixel equally: the one drawn later (stem, then petals, then the centre).
_DRAWING_ORDER = np.array([0, 2, 3, 1])  # by class index

def _hsv(h, s, v):
    """An RGB tuple of ints from HSV values in [0, 1] (hue wraps around)."""
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, min(s, 1.0), min(v, 1.0)))


def _draw_background(rng, size):
    """A flat colour, a vertical gradient, or soft noise with blades of grass."""
    kind = rng.integers(3)
    if kind == 0:
        return Image.new('RGB', (size, size), _hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.95)))
    if kind == 1:
        hue = rng.random()
        top = np.array(_hsv(hue, rng.uniform(0.2, 0.6), rng.uniform(0.7, 1.0)), dtype=float)
        bottom = np.array(_hsv(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.7)))
        ramp = np.linspace(0, 1, size)[:, None, None]
        column = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)  # (size, 1, 3)
        return Image.fromarray(column).resize((size, size), Image.NEAREST)
    # Two octaves of coarse noise, enlarged smoothly, shade a green-ish field.
    noise = sum(np.asarray(Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
                           .resize((size, size), Image.BICUBIC), dtype=float) * weight
                for cells, weight in ((4, 0.6), (16, 0.4))) / 255
    dark = np.array(_hsv(rng.uniform(0.2, 0.4), 0.7, rng.uniform(0.2, 0.35)))
    light = np.array(_hsv(rng.uniform(0.15, 0.35), 0.6, rng.uniform(0.55, 0.8)))
    image = Image.fromarray((dark + (light - dark) * noise[..., None]).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(120):
        x, y = rng.uniform(0, size), rng.uniform(0.3 * size, 1.1 * size)
        tip = (x + rng.uniform(-0.08, 0.08) * size, y - rng.uniform(0.05, 0.2) * size)
        green = _hsv(rng.uniform(0.2, 0.38), rng.uniform(0.5, 0.9), rng.uniform(0.25, 0.75))
        draw.line([(x, y), tip], fill=green, width=max(1, size // 200))
    return image


class _Painter:
    """Draws each shape on the image and, when a label map is kept, the same pixels of it with the part's class."""

    def __init__(self, image, labels=None):
        self.image, self.labels = ImageDraw.Draw(image), None if labels is None else ImageDraw.Draw(labels)

    def draw(self, shape, part, *args, fill, outline=None, **kwargs):
        """ImageDraw's `shape` ('polygon', 'line', 'ellipse') on both; `part` names a FLOWER_LABELS entry."""
        getattr(self.image, shape)(*args, fill=fill, **({} if outline is None else {'outline': outline}), **kwargs)
        if self.labels is not None:
            label = FLOWER_LABELS.index(part)
            getattr(self.labels, shape)(*args, fill=label, **({} if outline is None else {'outline': label}),
                                        **kwargs)


def _majority_labels(labels, factor=2):
    """(factor*H, factor*W) class indices -> (H, W): the class covering most of each block, ties to the later drawn."""
    h, w = labels.shape[0] // factor, labels.shape[1] // factor
    blocks = labels.reshape(h, factor, w, factor)
    counts = np.stack([(blocks == c).sum((1, 3)) for c in range(len(FLOWER_LABELS))])  # (classes, H, W)
    score = counts * len(FLOWER_LABELS) + _DRAWING_ORDER[:, None, None]  # the count decides, the order breaks ties
    return score.argmax(0).astype(np.uint8)


def _petal(cx, cy, angle, length, half_width, shape):
    """Polygon of a petal (or leaf) growing from (cx, cy) along `angle`."""
    u = np.linspace(0, 1, 24)
    if shape == 'ellipse':
        width = 2 * np.sqrt(u * (1 - u))
    elif shape == 'pointed':
        width = np.sqrt(u) * (1 - u) / 0.385  # straight sides meeting at the tip
    else:  # 'round': narrow base, broad round tip
        width = u ** 0.7 * np.sqrt(np.clip(1 - u ** 4, 0, 1)) / 0.8
    xs = np.concatenate([u, u[::-1]]) * length
    ys = np.concatenate([width, -width[::-1]]) * half_width
    cos, sin = math.cos(angle), math.sin(angle)
    return list(zip(cx + xs * cos - ys * sin, cy + xs * sin + ys * cos))


def _draw_flower(rng, size, with_labels=False):
    """One flower on a random background, drawn at 2x and downsampled so the edges are antialiased; with_labels:
    also its label map, (image, labels)."""
    s = 2 * size
    image = _draw_background(rng, s)
    labels = Image.new('L', (s, s), FLOWER_LABELS.index('background')) if with_labels else None
    draw = _Painter(image, labels)
    cx, cy, radius = s * rng.uniform(0.35, 0.65), s * rng.uniform(0.3, 0.6), s * rng.uniform(0.2, 0.36)
    if rng.random() < 0.7:  # a stem curving down past the bottom edge, usually with a leaf
        green = _hsv(rng.uniform(0.22, 0.38), rng.uniform(0.5, 0.9), rng.uniform(0.3, 0.6))
        end = np.array([cx + rng.uniform(-0.2, 0.2) * s, s * 1.05])
        bend = np.array([(cx + end[0]) / 2 + rng.uniform(-0.15, 0.15) * s, (cy + end[1]) / 2])
        t = np.linspace(0, 1, 24)[:, None]
        curve = (1 - t) ** 2 * np.array([cx, cy]) + 2 * t * (1 - t) * bend + t ** 2 * end  # quadratic Bezier
        draw.draw('line', 'stem and leaf', [tuple(p) for p in curve], fill=green, width=int(s * 0.022), joint='curve')
        if rng.random() < 0.8:
            x, y = curve[rng.integers(12, 19)]
            angle = -math.pi / 2 + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
            length = radius * rng.uniform(0.6, 0.9)
            leaf = _petal(x, y, angle, length, 0.22 * length, rng.choice(['ellipse', 'pointed']))
            draw.draw('polygon', 'stem and leaf', leaf, fill=green)
    count, shape = int(rng.integers(4, 13)), rng.choice(['ellipse', 'pointed', 'round'])
    hue = rng.choice([rng.uniform(-0.1, 0.18), rng.uniform(0.5, 1.0)])  # anything but leaf green
    saturation, rotation = rng.uniform(0.4, 0.95), rng.uniform(0, 2 * math.pi)
    half_width = min(rng.uniform(0.5, 0.85) * math.pi * radius / count, 0.45 * radius)  # neighbours overlap
    eye = _hsv(hue + rng.uniform(-0.08, 0.08), saturation + 0.3, rng.uniform(0.4, 0.7))
    rows = [(0.85, math.pi / count, 0.75), (1.0, 0.0, 1.0)] if rng.random() < 0.5 else [(1.0, 0.0, 1.0)]
    for scale, offset, shade in rows:  # an optional darker back row, then the front row
        angles = rotation + offset + 2 * math.pi * np.arange(count) / count
        for angle in angles:
            value = shade * rng.uniform(0.85, 1.0)
            draw.draw('polygon', 'petal', _petal(cx, cy, angle, scale * radius, half_width, shape), width=2,
                      fill=_hsv(hue + rng.uniform(-0.02, 0.02), saturation, value),
                      outline=_hsv(hue, saturation, 0.7 * value))
        for angle in angles:  # a darker eye at the base of each petal, as many flowers have
            draw.draw('polygon', 'petal', _petal(cx, cy, angle, 0.45 * scale * radius, 0.45 * half_width, 'ellipse'),
                      fill=eye)
    disc = radius * rng.uniform(0.16, 0.3)
    draw.draw('ellipse', 'centre', [cx - disc, cy - disc, cx + disc, cy + disc], width=2,
              outline=_hsv(0.08, 0.8, 0.25), fill=_hsv(rng.uniform(0.02, 0.16), rng.uniform(0.6, 1.0),
                                                       rng.uniform(0.3, 1.0)))
    seeds, dot = int(rng.integers(25, 70)), disc * 0.09
    seed_colour = _hsv(rng.uniform(0.02, 0.12), 0.8, rng.uniform(0.15, 0.45))
    for k in range(1, seeds):  # seeds on a Fermat spiral at the golden angle, as in a sunflower head
        r, a = disc * 0.88 * math.sqrt(k / seeds), k * 2.39996
        x, y = cx + r * math.cos(a), cy + r * math.sin(a)
        draw.draw('ellipse', 'centre', [x - dot, y - dot, x + dot, y + dot], fill=seed_colour)
    image = image.resize((size, size), Image.LANCZOS)
    if labels is None:
        return image
    return image, Image.fromarray(_majority_labels(np.asarray(labels)))


def _write_png(image, path):
    """Save through a temporary name, so an interrupted run never leaves a broken PNG."""
    partial = path.with_name(path.name + '.tmp')
    image.save(partial, format='PNG')
    os.replace(partial, path)


def make_demo_flowers(root, num_images=300, size=256, seed=0, segmentation_dir=None):
    """Write a procedural 'flowers' data set of PNGs, deterministic from `seed`; existing files are kept.

    segmentation_dir: also write each flower's label map (8-bit, pixel = class index in FLOWER_LABELS) there under the
    flower's file name. The flowers are the same with or without it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    label_root = None if segmentation_dir is None else Path(segmentation_dir)
    if label_root is not None:
        label_root.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        path = root / f'flower_{i:04d}.png'
        label_path = None if label_root is None else label_root / path.name
        if path.exists() and (label_path is None or label_path.exists()):
            continue
        # A stream per image: the same image for any count.
        drawn = _draw_flower(np.random.default_rng([seed, i]), size, with_labels=label_path is not None)
        image, labels = drawn if label_path is not None else (drawn, None)
        if labels is not None:
            _write_png(labels, label_path)
        _write_png(image, path)
    return root


def write_default_demo_set(path):
    """A new user's first run of a training script with the default data path: draw the demo flowers there, saying
    so in a line. A folder that exists is left as it is."""
    if not Path(path).exists():
        print(f"Writing the demo data set of drawn flowers to {path}/ (first run with the default path).")
        make_demo_flowers(path)


# ---- command line ----

def build_parser():
    p = ScriptParser("Write the demo data set of procedurally drawn flowers (PNGs).")
    p.add_argument("--out", required=True, help="folder to write flower_XXXX.png into (existing files are kept)")
    p.add_argument("--num-images", type=int, default=300, help="how many flowers")
    p.add_argument("--size", type=int, default=256, help="side of each square image in pixels")
    p.add_argument("--seed", type=int, default=0, help="another seed draws other flowers (e.g. a held-out set)")
    p.add_argument("--with-segmentation", action="store_true",
                   help=f"also write each flower's label map, same file name, into the sibling folder <out>_labels/ "
                        f"(8-bit PNG, pixel = class: {', '.join(f'{i} {n}' for i, n in enumerate(FLOWER_LABELS))})")
    return p


def main(args):
    if args.num_images <= 0 or args.size < 8:
        raise ValueError(f"--num-images must be positive and --size at least 8, got {args.num_images} and "
                         f"{args.size}.")
    labels = label_folder(args.out) if args.with_segmentation else None
    root = make_demo_flowers(args.out, num_images=args.num_images, size=args.size, seed=args.seed,
                             segmentation_dir=labels)
    print(f"Wrote {args.num_images} demo flowers of {args.size}x{args.size} (seed {args.seed}) to {root}/"
          + (f" and their label maps to {labels}/." if labels else "."))
    return root


def label_folder(out):
    """Where --with-segmentation writes the label maps of the flowers in `out`: the sibling folder <out>_labels."""
    out = Path(out)
    return out.with_name(out.name + '_labels')


if __name__ == "__main__":
    run_script(main, build_parser())
