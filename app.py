"""Try a trained model in the browser: sample images, inpaint or outpaint an uploaded image, draw images for an
uploaded condition (a model trained with --cond-path), reconstruct one through stage 1 and see its tokens. A Gradio
page on this machine only (127.0.0.1); it runs on the CPU.

    python app.py --checkpoint-path checkpoints/transformer_last.pt    # then open http://127.0.0.1:7860
    python app.py --checkpoint-path models/flowers                      # a model folder of export.py (or a Hub id)
    python app.py --checkpoint-path checkpoints/vqgan_last.pt           # stage 1 only: the reconstruct tab

Sampling and completion are sample_transformer.py's own functions, with the page's settings as its flags.
"""
import functools
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import sample_transformer
from checkpoint import CheckpointError, checkpoint_path, read_checkpoint
from cli import ScriptParser, run_script
from codebook import codebook_usage
from data import DataError
from eval_vqgan import psnr
from runtime import autocast, pick_device, resolve_precision, seed_everything, set_threads
from transformer import VQGANTransformer
from utils import for_display, to_image_range
from vqgan import VQGAN

MAX_PIXELS = 4096 * 4096  # larger uploads are refused before any work
MIN_SIDE = 8  # pixels: a smaller upload has too little in it to cover a canvas
PAGE_BATCH = 4  # images sampled at a time: the progress bar moves batch by batch
CSS = """
.pixels img { image-rendering: pixelated; }  /* small images enlarged with square pixels, not blurred */
footer { display: none !important; }
"""
THEME = gr.themes.Soft()


# ---- what the page's controls become ----

def sampling_flags(model, num_images, top_k, temperature, class_name, cfg_scale, size=None, cond_image=None):
    """sample_transformer.py's flags for the page's settings, checked by its own check_args."""
    classes = class_names(model)  # the page's dropdown offers these only
    args = sample_transformer.build_parser().parse_args([])
    args.num_samples, args.batch_size = int(num_images), min(int(num_images), PAGE_BATCH)
    args.top_k, args.temperature = (int(top_k) or None), float(temperature)  # top-k 0: all codes
    args.class_id = classes.index(class_name) if classes else None
    args.cfg_scale = float(cfg_scale) if model.guidable and cfg_scale and cfg_scale != 1 else None
    args.size = None if size is None else [int(s) for s in size]
    args.cond_image = cond_image
    sample_transformer.check_args(args, model)
    return args


def class_names(model):
    """The names of a class-conditional model's classes (their numbers when it has none), else []."""
    return list(model.classes or map(str, range(model.num_classes))) if model.num_classes else []


def page_error(message):
    """A message in the page (Gradio shows it in a box); expected, so no traceback in the console either."""
    return gr.Error(message, print_exception=False)


def upload(image, what="image"):
    """An uploaded PIL image as RGB, or a message in the page that says what is wrong with it."""
    if image is None:
        raise page_error(f"Upload an {what} first.")
    if image.width * image.height > MAX_PIXELS:
        raise page_error(f"The {what} is {image.width}x{image.height} pixels; at most {MAX_PIXELS // 10 ** 6} "
                         f"megapixels.")
    if min(image.size) < MIN_SIDE:
        raise page_error(f"The {what} is {image.width}x{image.height} pixels; it needs at least {MIN_SIDE} a side.")
    return image.convert("RGB")


def to_pixels(image):
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return (to_image_range(image.float().cpu()) * 255).round().byte().permute(1, 2, 0).numpy()


def token_map(indices, num_codes, f):
    """A picture of a token grid (h, w): each code its own colour (a fixed random palette), f x f pixels a token."""
    palette = np.random.default_rng(0).integers(40, 256, (num_codes, 3), dtype=np.uint8)
    return palette[indices.cpu().numpy()].repeat(f, axis=0).repeat(f, axis=1)


def readable(component):
    """An image input whose uploads that are not images are a message in the page: Gradio decodes them before any
    function of ours runs, and its own error is a traceback in the console and a bare "Error" in the page. (Wrapped
    on the instance: a subclass of a Gradio component makes Gradio write a .pyi file beside this one.)"""
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise page_error(f"The upload is not an image this page can read ({type(error).__name__}).") from None
    component.preprocess = preprocess
    return component


def user_errors(fn):
    """An expected failure (a bad upload or setting) is a message in the page, never a traceback."""
    @functools.wraps(fn)  # Gradio reads the signature: a gr.Progress default turns on the progress bar
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, DataError, CheckpointError, UnidentifiedImageError, OSError) as error:
            raise page_error(str(error)) from None
    return wrapper


# ---- the page ----

class Demo:
    """The model and the work behind each button; one request at a time (Gradio's default queue)."""

    def __init__(self, model, device, precision, name):
        self.model, self.device, self.precision, self.name = model, device, precision, name
        self.vqgan = model.vqgan if isinstance(model, VQGANTransformer) else model
        self.f = self.vqgan.config.downsample_factor
        self.stage2 = isinstance(model, VQGANTransformer)

    def sample(self, num_images, top_k, temperature, seed, class_name, cfg_scale, height, width,
               progress=gr.Progress(track_tqdm=True)):  # the page's bar follows draw()'s tqdm bar
        """New images on a canvas of height x width pixels (larger than the training size: a sliding window)."""
        args = sampling_flags(self.model, num_images, top_k, temperature, class_name, cfg_scale, (height, width))
        size = sample_transformer.canvas_size(args, self.model)
        regenerate = torch.ones(size[0] // self.f, size[1] // self.f, dtype=torch.bool)
        seed_everything(int(seed))
        _, images = sample_transformer.draw(self.model, args, None, regenerate, self.device, self.precision)
        return [to_pixels(image) for image in images], f"{len(images)} images of {size[0]}x{size[1]} pixels."

    def complete(self, editor, mode, left, top, right, bottom, num_images, top_k, temperature, seed, class_name,
                 cfg_scale, progress=gr.Progress(track_tqdm=True)):  # the page's bar follows draw()'s tqdm bar
        """Regenerate the painted part of an uploaded image (inpaint) or a margin around it (outpaint)."""
        image = upload((editor or {}).get("background"))
        args = sampling_flags(self.model, num_images, top_k, temperature, class_name, cfg_scale)
        size = sample_transformer.canvas_size(args, self.model)  # the training size
        x = (sample_transformer.cover(image, size).float() / 127.5 - 1)[None].to(self.device)
        if mode.startswith("inpaint"):
            painted = [layer for layer in editor.get("layers") or [] if layer is not None]
            if not painted:
                raise page_error("Paint over the part of the image to regenerate first (the brush), or pick "
                                 "outpaint.")
            alpha = np.max([np.asarray(layer.convert("RGBA"))[..., 3] for layer in painted], axis=0)  # (H, W)
            mask = Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8))
            if mask.size != image.size:
                raise page_error(f"The painted layer is {mask.width}x{mask.height} pixels, the image "
                               f"{image.width}x{image.height}; upload the image again.")
            regenerate = sample_transformer.mask_tokens(Image.fromarray(
                sample_transformer.cover(mask, size, Image.NEAREST)[0].numpy()), size, self.f)
            pad = None
        else:
            pad = [int(p) for p in (left, top, right, bottom)]
            if any(p < 0 or p % self.f for p in pad):
                raise page_error(f"The margins {pad} must be non-negative multiples of {self.f} pixels (a token).")
            regenerate = None
        with autocast(self.precision, self.device):
            codes, regenerate = sample_transformer.completion_codes(self.model, x, regenerate, pad)
            shown = sample_transformer.masked_input(self.model, codes, regenerate)
        if not regenerate.any():
            raise page_error("Nothing to regenerate: the painted part covers no token, and no margin was given.")
        seed_everything(int(seed))
        _, images = sample_transformer.draw(self.model, args, codes, regenerate, self.device, self.precision)
        status = (f"{int(regenerate.sum())} of {regenerate.numel()} tokens regenerated "
                  f"({regenerate.shape[0]}x{regenerate.shape[1]} tokens), {len(images)} images.")
        return to_pixels(shown), [to_pixels(image) for image in images], status

    def condition(self, path, num_images, top_k, temperature, seed, class_name, cfg_scale,
                  progress=gr.Progress(track_tqdm=True)):  # the page's bar follows draw()'s tqdm bar
        """Images for an uploaded condition file, on a canvas of its size (sliding windows over both grids beyond the
        training size), read and tokenized as sample_transformer.py --cond-image reads it."""
        if path is None:
            raise page_error(f"Upload a condition first: {condition_words(self.model)}.")
        with Image.open(path) as image:  # the header only: the size limits before any work
            upload(image, "condition")
        args = sampling_flags(self.model, num_images, top_k, temperature, class_name, cfg_scale, cond_image=path)
        cond = sample_transformer.load_condition(path, self.model).to(self.device)  # (1, C, H, W)
        size = sample_transformer.canvas_size(args, self.model, cond.shape[-2:])
        with autocast(self.precision, self.device):
            codes = self.model.encode_condition(cond)  # (1, Hc', Wc')
        seed_everything(int(seed))
        regenerate = torch.ones(size[0] // self.f, size[1] // self.f, dtype=torch.bool)
        _, images = sample_transformer.draw(self.model, args, None, regenerate, self.device, self.precision, codes)
        shown = for_display(cond.cpu(), self.model.cond_kind)[0]
        return to_pixels(shown), [to_pixels(image) for image in images], \
            f"{len(images)} images of {size[0]}x{size[1]} pixels for the condition's {codes.shape[1]}x" \
            f"{codes.shape[2]} tokens."

    @torch.no_grad()
    def reconstruct(self, image):
        """The image's centre crop at the training size, encoded to tokens and decoded, and which codes it used."""
        image = upload(image)
        size = (self.vqgan.config.image_size,) * 2
        x = (sample_transformer.cover(image, size).float() / 127.5 - 1)[None].to(self.device)
        with autocast(self.precision, self.device):
            x_rec, indices, _ = self.vqgan(x)
        x_rec = x_rec.float().clamp(-1, 1)
        num_codes = self.vqgan.config.num_codebook_vectors
        usage, perplexity = codebook_usage(indices.flatten().cpu(), num_codes)
        distinct = int(indices.unique().numel())
        h, w = indices.shape[1:]
        status = (f"{h} x {w} tokens use {distinct} distinct codes of {num_codes} ({100 * distinct / num_codes:.1f}%), "
                  f"perplexity {perplexity:.1f}; PSNR {psnr(to_image_range(x), to_image_range(x_rec)).item():.2f} dB.")
        return to_pixels(x[0]), to_pixels(x_rec[0]), token_map(indices[0], num_codes, self.f), status

    def describe(self):
        """One line on the model for the page's header."""
        c = self.vqgan.config
        tokens = f"{c.image_size // self.f}x{c.image_size // self.f} tokens of {c.num_codebook_vectors} codes"
        if not self.stage2:
            return f"Stage-1 VQGAN `{self.name}`: {c.image_size}x{c.image_size} images, {tokens}."
        g, m = self.model.config, self.model
        kind = f"{m.num_classes} classes" if m.num_classes else "unconditional" if m.cond_kind is None else ""
        kind += f"{', ' if kind else ''}{m.cond_kind} conditions" if m.cond_kind else ""
        return (f"`{self.name}`: {m.image_size}x{m.image_size} images, {tokens}, a {g.n_layer}-layer GPT ({kind}); "
                f"on {self.device.type.upper()}.")


def sampling_controls(demo):
    """The settings shared by the sampling tabs, as a list of components (in the functions' order)."""
    m = demo.model
    classes = class_names(m)
    num_images = gr.Slider(1, 16, value=8, step=1, label="number of images")
    top_k = gr.Slider(0, m.num_codebook_vectors, value=min(100, m.num_codebook_vectors), step=1,
                      label="top-k (0: all codes)")
    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
    seed = gr.Number(value=0, precision=0, label="seed")
    class_name = gr.Dropdown(classes, value=classes[0] if classes else None, label="class", visible=bool(classes))
    cfg_scale = gr.Slider(1.0, 10.0, value=1.0, step=0.5, label="guidance scale (1: none)",
                          visible=m.guidable)
    return [num_images, top_k, temperature, seed, class_name, cfg_scale]


def condition_words(model):
    """What a model's conditions are, for the page."""
    return dict(segmentation=f"a label map, a PNG whose pixel values are classes 0 to "
                             f"{model.cond_vqgan.config.num_labels - 1}",
                gray="a one-channel map such as depth (8 or 16 bits)",
                rgb="an image such as a low-resolution copy").get(model.cond_kind, model.cond_kind)


def condition_tab(demo, settings):
    """A model with an image condition: upload a condition file and draw images for it (any size whose sides divide
    by the tokenizers' factors; beyond the training size the windows of both grids slide together)."""
    m = demo.model
    with gr.Tab("Condition"):
        gr.Markdown(f"Upload a condition, {condition_words(m)}, of {m.image_size}x{m.image_size} pixels or larger: "
                    f"the images are drawn on a canvas of its size.")
        with gr.Row():
            condition = gr.File(label="condition", file_types=["image"], type="filepath")
            button = gr.Button("Draw for it", variant="primary", elem_id="condition-button")
        with gr.Row():
            shown = gr.Image(label="condition as read", format="png", elem_classes="pixels")
            gallery = gr.Gallery(label="samples", columns=4, format="png", object_fit="contain", height="auto",
                                 elem_classes="pixels")
        status = gr.Markdown()
        button.click(user_errors(demo.condition), [condition, *settings], [shown, gallery, status],
                     api_name="condition")


def build_app(demo):
    """The Gradio page of a loaded model."""
    with gr.Blocks(title=f"VQGAN: {demo.name}", analytics_enabled=False) as app:  # no telemetry lookups
        gr.Markdown(f"## VQGAN {'transformer' if demo.stage2 else 'tokenizer'}\n{demo.describe()}")
        with gr.Row():
            if demo.stage2:
                with gr.Column(scale=1, min_width=240):
                    gr.Markdown("**Sampling settings**")
                    settings = sampling_controls(demo)
            with gr.Column(scale=3):
                with gr.Tabs():
                    if demo.stage2 and demo.model.cond_vqgan is not None:  # every draw needs a condition
                        condition_tab(demo, settings)
                    elif demo.stage2:
                        sample_tab(demo, settings)
                        complete_tab(demo, settings)
                    reconstruct_tab(demo)
    return app


def sample_tab(demo, settings):
    size, f = demo.model.image_size, demo.f
    with gr.Tab("Sample"):
        with gr.Row():
            height = gr.Slider(size, 4 * size, value=size, step=f, label="canvas height (pixels)")
            width = gr.Slider(size, 4 * size, value=size, step=f, label="canvas width (pixels)")
        button = gr.Button("Sample", variant="primary", elem_id="sample-button")
        gallery = gr.Gallery(label="samples", columns=4, format="png", object_fit="contain", height="auto",
                             elem_id="samples", elem_classes="pixels")
        status = gr.Markdown()
        button.click(user_errors(demo.sample), [*settings, height, width], [gallery, status], api_name="sample")


def complete_tab(demo, settings):
    size, f = demo.model.image_size, demo.f
    with gr.Tab("Inpaint / outpaint"):
        gr.Markdown(f"Upload an image (centre-cropped to {size}x{size}); paint over what to regenerate, or choose "
                    f"outpaint and the margins to add.")
        with gr.Row():
            editor = readable(gr.ImageEditor(type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                                             layers=False, transforms=[], label="image (paint: regenerate)",
                                             brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                             elem_classes="pixels"))
            with gr.Column():
                modes = ["inpaint: the painted part", "outpaint: the margins"]
                mode = gr.Radio(modes, value=modes[0], label="regenerate")
                margins = [gr.Slider(0, 2 * size, value=0 if side in ("top", "bottom") else size // 2, step=f,
                                     label=f"{side} margin (pixels)") for side in ("left", "top", "right", "bottom")]
        button = gr.Button("Complete", variant="primary")
        with gr.Row():
            shown = gr.Image(label="kept (grey: regenerated)", format="png", elem_classes="pixels")
            gallery = gr.Gallery(label="completions", columns=4, format="png", elem_classes="pixels")
        status = gr.Markdown()
        button.click(user_errors(demo.complete), [editor, mode, *margins, *settings], [shown, gallery, status],
                     api_name="complete")


def reconstruct_tab(demo):
    size = demo.vqgan.config.image_size
    with gr.Tab("Reconstruct"):
        gr.Markdown(f"Upload an image: its centre crop at {size}x{size} goes through the VQGAN's encoder, codebook and "
                    f"decoder.")
        with gr.Row():
            image = readable(gr.Image(type="pil", sources=["upload", "clipboard"], label="image"))
            button = gr.Button("Reconstruct", variant="primary")
        with gr.Row():
            outputs = [gr.Image(label=label, format="png", elem_classes="pixels")
                       for label in ("input crop", "reconstruction", "tokens (a colour per code)")]
        status = gr.Markdown()
        button.click(user_errors(demo.reconstruct), [image], [*outputs, status], api_name="reconstruct")


def load_model(path, trust=False, ema=True):
    """A stage-2 model, or a stage-1 one (reconstruction only), from any checkpoint or model folder."""
    ckpt = read_checkpoint(path, trust).expect("stage2", "stage1", user="app.py")
    if ckpt.kind == "stage2":
        return VQGANTransformer.from_checkpoint(ckpt, trust=trust, ema=ema, user="app.py")
    return VQGAN.from_checkpoint(ckpt, trust=trust, ema=ema, user="app.py")


def main(args, launch=True):
    """Build the page; serve it unless launch=False (tests launch it themselves)."""
    set_threads(args.threads)
    device = pick_device(args.device)
    model = load_model(args.checkpoint_path, args.trust_checkpoint, not args.no_ema).to(device)
    demo = Demo(model, device, resolve_precision(args.precision, device), Path(args.checkpoint_path).name)
    page = build_app(demo)
    if launch:
        serve(page, args.host, args.port)
    return page


def serve(page, host="127.0.0.1", port=None, block=True):
    """Serve the page (port None: the first free one from 7860); block=False returns at once (tests)."""
    page.queue().launch(server_name=host, server_port=port, share=False, css=CSS, theme=THEME,
                        prevent_thread_lock=not block, quiet=not block)


def build_parser():
    p = ScriptParser("Try a trained model in the browser: sample, inpaint/outpaint, reconstruct (a Gradio page on "
                     "127.0.0.1).")
    a = p.add_argument
    a("--checkpoint-path", default=str(checkpoint_path(".", "transformer")),
      help="a stage-2 checkpoint or model folder (a stage-1 one gives the reconstruct tab only); a Hub id works too")
    a("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 shows the page to your network)")
    a("--port", type=int, default=7860, help="port to serve on")
    a("--device", default="cpu", help="cpu, cuda ...")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--no-ema", action="store_true", help="the trained weights, not the EMA weights a run with --ema-decay kept")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    a("--threads", type=int, default=None, help="CPU threads of torch's operators (default: torch's, all cores)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
