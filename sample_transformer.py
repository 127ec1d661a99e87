"""Sample new images from a trained stage-2 model: one PNG per sample, a grid, and the token grids (indices.pt).

    python sample_transformer.py --checkpoint-path checkpoints/transformer_last.pt --num-samples 16
    python sample_transformer.py ... --size 256 1024                     # a canvas 4x as wide (sliding window)
    python sample_transformer.py ... --input-image me.png --mask mask.png # regenerate the white part of the mask
    python sample_transformer.py ... --input-image me.png --pad 64 0 64 0 # outpaint 64 pixels left and right
    python sample_transformer.py ... --class-id 3 --cfg-scale 3           # classifier-free guidance
    python sample_transformer.py ... --cond-image layout.png --target-image photo.png  # an image condition (any size)
    python sample_transformer.py --checkpoint-path last.ckpt --taming-config model.yaml ...  # taming's Net2Net models
    python sample_transformer.py ... --steps 12                          # a maskgit checkpoint: 12 decoding passes
"""
import math
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import center_crop, pil_to_tensor
from torchvision.utils import save_image
from tqdm import tqdm

import net2net
from checkpoint import checkpoint_path
from cli import ScriptParser, run_script
from config import check_positive
from data import DataError, map_to_tensor, read_map
from maskgit import canvas_sampler
from runtime import PRECISIONS, autocast, pick_device, resolve_precision, seed_everything, set_threads
from transformer import VQGANTransformer
from utils import check_writable, for_display, save_image_grid, to_image_range


# ---- the canvas and what to keep of an input image ----

def canvas_size(args, model, cond_hw=None):
    """(H, W) pixels of --size (default: the condition's size less --pad, else the training size), each a multiple of
    the downsampling factor f."""
    f = model.vqgan.config.downsample_factor
    left, top, right, bottom = args.pad or (0, 0, 0, 0)
    size = tuple(args.size) if args.size else (cond_hw[0] - top - bottom, cond_hw[1] - left - right) if cond_hw \
        else (model.image_size, model.image_size)
    if any(s % f for s in size):
        raise ValueError(f"--size {size[0]} {size[1]} must be a multiple of the downsampling factor {f} in both "
                         f"directions.")
    if size[0] < model.image_size or size[1] < model.image_size:
        raise ValueError(f"--size {size[0]} {size[1]} is smaller than the training size {model.image_size}, the "
                         f"window the model predicts each token from.")
    return size


def read_image(path, what):
    """A PIL RGB image, or a DataError that names the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:  # missing, unreadable, not an image, truncated
        reason = getattr(err, "strerror", None) or "not an image file PIL can read"
        raise DataError(f"Cannot read the {what} {path} ({reason}).") from None


def cover(image, size, resample=Image.BICUBIC):
    """A PIL image resized to cover size (H, W) and centre-cropped to it: (C, H, W) uint8."""
    scale = max(size[0] / image.height, size[1] / image.width)
    resized = image.resize((max(size[1], round(image.width * scale)), max(size[0], round(image.height * scale))),
                           resample)
    return center_crop(pil_to_tensor(resized), list(size))


def load_input_image(path, size):
    """The image at path, resized to cover size (H, W) and centre-cropped to it: (1, 3, H, W) in [-1, 1]."""
    return (cover(read_image(path, "input image"), size).float() / 127.5 - 1).unsqueeze(0)


def mask_tokens(mask, canvas, f, name="mask"):
    """(H/f, W/f) bool: True where the f x f cell of a token holds a white pixel of the mask, a PIL image (H, W)."""
    if (mask.height, mask.width) != canvas:
        raise ValueError(f"The {name} is {mask.height}x{mask.width} pixels; it must be the canvas size, "
                         f"{canvas[0]}x{canvas[1]} (height x width).")
    white = pil_to_tensor(mask.convert("L"))[0] >= 128  # (H, W)
    return F.max_pool2d(white[None].float(), f)[0].bool()


def load_mask(path, canvas, f):
    """(H/f, W/f) bool: True where the f x f cell of a token holds a white pixel of the mask PNG (H, W)."""
    return mask_tokens(read_image(path, "mask"), canvas, f, name=f"mask {path}")


def completion_grid(args, model, size, device):
    """Codes (1, Hc, Wc) of the input image on the canvas, and which tokens (Hc, Wc) to regenerate."""
    f = model.vqgan.config.downsample_factor
    if args.pad and any(p < 0 or p % f for p in args.pad):
        raise ValueError(f"--pad {' '.join(map(str, args.pad))} must be non-negative multiples of the downsampling "
                         f"factor {f}.")
    x = load_input_image(args.input_image, size).to(device)
    return completion_codes(model, x, load_mask(args.mask, size, f) if args.mask else None, args.pad)


def completion_codes(model, x, regenerate=None, pad=None):
    """Codes (1, Hc, Wc) of the image x (1, 3, H, W) on the canvas, and which tokens (Hc, Wc) to regenerate: those
    of `regenerate` (H/f, W/f) bool, or the padding (left, top, right, bottom; multiples of f pixels) around x."""
    f = model.vqgan.config.downsample_factor
    codes = model.encode_to_grid(x)  # (1, H/f, W/f)
    if regenerate is not None:
        return codes, regenerate
    left, top, right, bottom = pad
    codes = F.pad(codes, (left // f, right // f, top // f, bottom // f))  # the padding's codes are all regenerated
    regenerate = torch.ones(codes.shape[1:], dtype=torch.bool)
    regenerate[top // f:top // f + x.shape[2] // f, left // f:left // f + x.shape[3] // f] = False
    return codes, regenerate


def masked_input(model, codes, regenerate):
    """The input's reconstruction on the canvas, grey where tokens are regenerated: (3, H, W) in [-1, 1]."""
    f = model.vqgan.config.downsample_factor
    image = model.indices_to_image(codes)[0].float().cpu()
    return image.masked_fill(regenerate.repeat_interleave(f, 0).repeat_interleave(f, 1), 0.0)


def load_condition(path, model):
    """The condition image at path as the model reads it, (1, C, H, W); H and W must be multiples of f (and of the
    condition's own factor times --cond-downsample)."""
    try:
        array = read_map(path, model.cond_kind, model.cond_vqgan.config.num_labels)
    except (OSError, SyntaxError, ValueError) as err:  # missing, unreadable, not an image, truncated
        reason = getattr(err, "strerror", None) or "not an image file PIL can read"
        raise DataError(f"Cannot read the condition image {path} ({reason}).") from None
    height, width = array.shape[:2]
    f, S, fc = (model.vqgan.config.downsample_factor, model.config.cond_downsample,
                model.cond_vqgan.config.downsample_factor)
    multiple = math.lcm(f, S * fc)
    if height % multiple or width % multiple:
        why = f"the downsampling factor f = {f}" + (f" and --cond-downsample {S} x the condition tokenizer's {fc}"
                                                     if multiple != f else "")
        raise ValueError(f"The condition image {path} is {height}x{width} pixels; both sides must be multiples of "
                         f"{multiple} ({why}).")
    return map_to_tensor(array, model.cond_kind, model.cond_vqgan.config.num_labels)[None]


def result_grid(images, cond=None, target=None, kind=None):
    """The samples (N, 3, H, W), 8 to a row; with a condition (1, C, H, W) a row for it above them and with a target
    image (1, 3, H, W) a row for it below, each drawn first in its row. (grid, row labels)."""
    nrow = min(8, len(images))
    if cond is None:
        return images, nrow, None
    blank = torch.ones_like(images[:1]).expand(nrow - 1, -1, -1, -1)  # white
    pad = torch.ones_like(images[:1]).expand(-len(images) % nrow, -1, -1, -1)
    rows = [for_display(cond, kind), blank, images, pad]
    labels = ["condition", "samples"] + [""] * (-(-len(images) // nrow) - 1)
    if target is not None:
        rows += [target, blank]
        labels.append("ground truth")
    return torch.cat(rows), nrow, labels


def check_args(args, model):
    check_positive(args, "num_samples", "batch_size", "temperature")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if model.num_classes and args.class_id is None:
        raise ValueError(f"This model is class-conditional: pass --class-id between 0 and {model.num_classes - 1}"
                         f" ({', '.join(model.classes or [])}).")
    if args.cfg_scale is not None and not model.guidable:
        raise ValueError("This model was trained without a null class or a null condition, so it cannot use "
                         "--cfg-scale: train it with --conditional --class-dropout P or --cond-dropout P (P > 0).")
    if args.cond_image and model.cond_vqgan is None:
        raise ValueError("--cond-image needs a model trained with an image condition (training_transformer.py "
                         "--cond-path); this one has none.")
    if model.cond_vqgan is not None and not args.cond_image:
        raise ValueError(f"This model draws images for a condition ({model.cond_kind}): pass one with --cond-image.")
    if args.target_image and not args.cond_image:
        raise ValueError("--target-image is the ground truth of a --cond-image; pass the condition too.")
    if (args.mask or args.pad) and not args.input_image:
        raise ValueError("--mask and --pad regenerate part of an input image: pass one with --input-image.")
    if args.input_image and bool(args.mask) == bool(args.pad):
        raise ValueError("--input-image needs exactly one of --mask (white: regenerate) and --pad (pixels added "
                         "around it).")
    if args.class_id is not None and not 0 <= args.class_id < max(model.num_classes, 1):
        raise ValueError(f"--class-id {args.class_id} is not a class of this model "
                         f"({model.num_classes} classes)." if model.num_classes else
                         "--class-id needs a model trained with --conditional.")
    if args.compile and model.config.objective == "maskgit":
        raise ValueError("--compile compiles the one-token step of autoregressive sampling; a maskgit checkpoint "
                         "samples without it.")
    canvas_sampler(model, args.steps, args.choice_temperature)  # --steps and --choice-temperature fit the model


def load_model(args, device, user="sample_transformer.py"):
    """Our stage-2 checkpoint, or with --taming-config a taming-transformers Net2NetTransformer."""
    if args.taming_config:
        return net2net.from_taming(args.checkpoint_path, args.taming_config, trust=args.trust_checkpoint,
                                   user=f"{user} --taming-config").to(device)
    return VQGANTransformer.from_checkpoint(args.checkpoint_path, args.vqgan_checkpoint, trust=args.trust_checkpoint,
                                            ema=not args.no_ema, user=user, cond_path=args.cond_checkpoint).to(device)


def draw(model, args, codes, regenerate, device, precision, cond=None):
    """Token grids (N, Hc, Wc) and images [(3, H, W) in [-1, 1]] of --num-samples draws on the canvas of `regenerate`
    (keeping `codes` (1, Hc, Wc) where it is False), for the condition codes `cond` (1, Hc', Wc') of the whole canvas
    if the model has an image condition, --batch-size at a time, with a progress bar."""
    images, grids = [], []
    sample_canvas = canvas_sampler(model, args.steps, args.choice_temperature)  # by the checkpoint's objective
    with tqdm(total=args.num_samples, desc="sampling") as bar:
        while len(images) < args.num_samples:
            n = min(args.batch_size, args.num_samples - len(images))
            labels = torch.full((n,), args.class_id, device=device) if args.class_id is not None else None
            with autocast(precision, device):
                condition = {} if cond is None else dict(cond=cond)  # maskgit models take no image condition
                grid = sample_canvas(n, tuple(regenerate.shape), temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, labels=labels, cfg_scale=args.cfg_scale,
                                     codes=None if codes is None else codes.expand(n, -1, -1),
                                     regenerate=regenerate, **condition)  # (n, Hc, Wc)
                batch = model.indices_to_image(grid)  # the whole canvas in one decode
            grids.append(grid.cpu())
            images += list(batch.float().cpu())
            bar.update(n)
    return torch.cat(grids), images


def main(args):
    set_threads(args.threads)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    model = load_model(args, device)
    check_args(args, model)
    cond = load_condition(args.cond_image, model).to(device) if args.cond_image else None  # (1, C, H, W)
    size = canvas_size(args, model, None if cond is None else cond.shape[-2:])
    if args.quantize == "int8":
        model.gpt.quantize_int8()
    if args.compile:
        model.gpt.compile_decode(PRECISIONS[precision])  # its Linear weights held in the sampling dtype
    out_dir = check_writable(args.out_dir)
    seed_everything(args.seed)
    f = model.vqgan.config.downsample_factor
    codes, regenerate = None, torch.ones(size[0] // f, size[1] // f, dtype=torch.bool)  # (Hc, Wc) tokens
    if args.input_image:
        with autocast(precision, device):
            codes, regenerate = completion_grid(args, model, size, device)
            save_image(to_image_range(masked_input(model, codes, regenerate)), out_dir / "masked_input.png")
    cond_codes = None
    if cond is not None:
        canvas = (regenerate.shape[0] * f, regenerate.shape[1] * f)
        if tuple(cond.shape[-2:]) != canvas:
            raise ValueError(f"The condition image {args.cond_image} is {cond.shape[-2]}x{cond.shape[-1]} pixels, "
                             f"the canvas {canvas[0]}x{canvas[1]} (--size plus --pad): they must be the same.")
        with autocast(precision, device):
            cond_codes = model.encode_condition(cond)  # (1, Hc', Wc'): the condition on the whole canvas

    start = time.perf_counter()
    grids, images = draw(model, args, codes, regenerate, device, precision, cond_codes)
    elapsed = time.perf_counter() - start
    for i, image in enumerate(images):
        save_image(to_image_range(image), out_dir / f"sample_{i:04d}.png")
    target = load_input_image(args.target_image, tuple(cond.shape[-2:])) if args.target_image else None
    grid, nrow, row_labels = result_grid(torch.stack(images), None if cond is None else cond.cpu(), target,
                                         model.cond_kind)
    save_image_grid(grid, out_dir / "grid.png", nrow=nrow, row_labels=row_labels)
    torch.save(grids, out_dir / "indices.pt")  # (N, Hc, Wc) int64: re-decode or inspect them
    rate = len(images) / elapsed
    print(f"{len(images)} samples of {images[0].shape[1]}x{images[0].shape[2]} in {elapsed:.1f} s ({rate:.2f} "
          f"samples/s, {rate * int(regenerate.sum()):.0f} tokens/s) written to {out_dir}/")
    return images


def add_model_flags(a):
    """The flags of load_model beside --checkpoint-path (sample_transformer.py's and eval_transformer.py's)."""
    a("--vqgan-checkpoint", default=None,
      help="the stage-1 checkpoint, if it moved since stage-2 training (default: the path stored in the stage-2 one)")
    a("--cond-checkpoint", default=None, help="the condition tokenizer, if it moved since stage-2 training (default: "
      "the path stored in the stage-2 checkpoint)")
    a("--taming-config", default=None, help="the model.yaml of a taming-transformers Net2NetTransformer checkpoint "
      "given as --checkpoint-path (its last.ckpt): unconditional, class (Labelator), segmentation, depth or RGB "
      "conditions (default: --checkpoint-path is one of ours)")


def build_parser():
    p = ScriptParser("Sample images from a trained VQGAN transformer.")
    a = p.add_argument
    a("--checkpoint-path", default=str(checkpoint_path(".", "transformer")),
      help="a stage-2 checkpoint, or a stage-2 model folder of export.py (a local folder or a Hub model id)")
    add_model_flags(a)
    a("--cond-image", default=None, help="for a model with an image condition: the condition to draw images for (a "
      "label map PNG, a depth map, an RGB image: the kind the model was trained on); the canvas is its size, and a "
      "larger one is sampled with the sliding window over condition and image together")
    a("--target-image", default=None, help="the ground truth of --cond-image, drawn in grid.png's last row")
    a("--num-samples", type=int, default=16, help="images to generate")
    a("--batch-size", type=int, default=16, help="images sampled in parallel")
    a("--temperature", type=float, default=1.0, help="softmax temperature (lower: safer, less varied)")
    a("--top-k", type=int, default=None,
      help="sample among the k most likely codes only (1: greedy; default: all codes)")
    a("--top-p", type=float, default=None,
      help="nucleus sampling: the smallest set of codes with this mass (default: off)")
    a("--class-id", type=int, default=None, help="the class to sample, for a model trained with --conditional")
    a("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
      help="canvas in pixels, multiples of f, at least the training size (default); larger ones are sampled with "
           "a sliding window of the training size (maskgit: windows at half-window strides, each decoded in --steps "
           "passes)")
    a("--input-image", default=None, help="an image to complete, resized and centre-cropped to --size")
    a("--mask", default=None, help="with --input-image: a PNG of the canvas size; every token whose f x f cell holds "
      "a white pixel (grey level 128 or more) is regenerated")
    a("--pad", type=int, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"), default=None,
      help="with --input-image: pixels added around it (multiples of f), all regenerated; the canvas is --size plus "
           "these")
    a("--cfg-scale", type=float, default=None,
      help="classifier-free guidance: sample from uncond + S x (cond - uncond); needs a model trained with "
           "--class-dropout; 1 is plain conditional sampling")
    a("--steps", type=int, default=None,
      help="maskgit checkpoints: decoding passes per window, 1 to the grid's token count (default: 8, MaskGIT's)")
    a("--choice-temperature", type=float, default=None,
      help="maskgit checkpoints: scale of the Gumbel noise added to the confidence that chooses the tokens to keep, "
           "annealed to 0 over the passes (default: 4.5, MaskGIT's; 0: keep the most probable)")
    a("--seed", type=int, default=0, help="random seed")
    a("--out-dir", default="samples", help="where the PNGs go")
    a("--device", default=None, help="cuda, cpu ... (default: CUDA when available)")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--quantize", choices=["none", "int8"], default="none",
      help="int8: the GPT's weights in int8 with a scale per row, for about 1.7x faster batch-1 sampling (CPU only)")
    a("--compile", action="store_true",
      help="each new token through a compiled static-shape step (CUDA graphs on CUDA): a switch until measured")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    a("--threads", type=int, default=None, help="CPU threads of torch's operators (default: torch's, all cores)")
    a("--no-ema", action="store_true", help="the trained weights, not the EMA weights a run with --ema-decay kept")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
