"""The whole method on a CPU in about 9 minutes: demo flowers, stage 1, held-out evaluation, stage 2, samples.

    python demo.py                       # everything under runs/demo/
    python demo.py --out-dir runs/demo2
    python demo.py --tiny                # every step with tiny sizes, in seconds (what tests/test_demo.py runs)
    python demo.py --conditional         # then flowers drawn for label maps (docs/conditional.md)

It calls the scripts' own main() functions with the flags printed below, so each step can be re-run by hand. It writes
<out-dir>/data/ (training and held-out flowers), stage1/ (the VQGAN's checkpoints/, results/ with its config, logs,
eval_vqgan.json and reconstructions.png, and tensorboard/), stage2/ (the GPT's, and samples/) and, enlarged for
viewing, demo_reconstructions.png and demo_samples.png. Stopped (Ctrl-C, SIGTERM), it saves; run again with the same
--out-dir, it skips the finished stages and continues the stopped one.

--conditional adds, beside them, the label maps of the flowers (data/*_labels/), their tokenizer (labels/), a GPT of
stage 2's size and schedule that reads [layout tokens, image tokens] and the per-pixel classifier that measures its
samples (conditional/), and demo_conditional.png and demo_conditional_2x.png; stage 2's GPT is the unconditional
baseline it is measured against.
"""
import json
import shlex
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import eval_transformer
import eval_vqgan
import sample_transformer
import segmenter
import training_transformer
import training_vqgan
from checkpoint import checkpoint_path, load_checkpoint
from cli import ScriptParser, call_main, run_script
from data import map_to_tensor, read_map
from demo_flowers import FLOWER_LABELS, make_demo_flowers
from presets import TINY_GPT, TINY_VQGAN, as_flags
from runtime import STOP_SIGNALS, Interrupted, keeps_signal_handlers
from utils import for_display, save_image_grid

HELDOUT_SEED = 1  # the held-out flowers are drawn from another seed than the training flowers (seed 0)
LOADING = ["--num-workers", "0"]  # data loading in the process: the images are small


# ---- the settings: chosen on this project's 2-core CPU (docs/demo.md, "Why these settings") ----

@dataclass
class DemoSettings:
    image_size: int        # the flowers are drawn at this size, so the crop is the whole flower
    train_images: int      # both stages train on these
    heldout_images: int    # stage-1 evaluation and stage-2 validation
    vqgan_flags: list      # training_vqgan.py's model and optimiser flags
    vqgan_lr: list         # (train until this step, at this learning rate), ...: a step decay, one run per phase
    gpt_flags: list        # training_transformer.py's model and optimiser flags
    gpt_lr: list           # as vqgan_lr
    num_samples: int
    top_k: int
    evals: int             # reconstruction grids (stage 1), validations and sample grids (stage 2) per stage
    enlarge: int           # the pictures are also written this many times larger (nearest neighbour) for viewing
    seconds: dict          # each stage's expected time on 2 CPU cores: in all for drawing, evaluation and sampling,
                           # per step for the two training stages (measured: docs/demo.md)

    @property
    def vqgan_steps(self):
        return self.vqgan_lr[-1][0]

    @property
    def gpt_steps(self):
        return self.gpt_lr[-1][0]


DEMO = DemoSettings(
    image_size=32, train_images=2000, heldout_images=100,
    vqgan_flags=["--ch", "32", "--ch-mult", "1", "2", "2", "--num-res-blocks", "1", "--attn-resolutions", "8",
                 "--latent-dim", "32", "--num-codebook-vectors", "512", "--codebook-dim", "8", "--codebook-l2-norm",
                 "--restart-dead-codes", "--batch-size", "16", "--disc-start", "100000"],
    vqgan_lr=[(1100, 6e-4), (1400, 2e-4)],
    gpt_flags=["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "32"],
    gpt_lr=[(600, 1e-3), (800, 3e-4)], num_samples=32, top_k=30, evals=5, enlarge=3,
    seconds={"drawing": 8, "stage 1": 0.294, "evaluation": 1, "stage 2": 0.156, "sampling": 1})

TINY = DemoSettings(  # the tiny models of presets.py
    image_size=TINY_VQGAN["image_size"], train_images=16, heldout_images=4,
    vqgan_flags=[*as_flags(TINY_VQGAN, leave_out=["image_size"]), "--batch-size", "4", "--disc-start", "100"],
    vqgan_lr=[(4, 1e-3), (6, 3e-4)],
    gpt_flags=[*as_flags(TINY_GPT), "--batch-size", "4"],
    gpt_lr=[(3, 1e-3), (4, 3e-4)], num_samples=4, top_k=8, evals=1, enlarge=2,
    seconds={"drawing": 1, "stage 1": 0.1, "evaluation": 2, "stage 2": 0.1, "sampling": 2})


@dataclass
class ConditionalSettings:
    labels_flags: list     # training_vqgan.py --image-kind segmentation: the tokenizer of the label maps
    labels_lr: list        # as DemoSettings.vqgan_lr
    block_size: int        # stage 2's GPT, reading the start token and the layout's tokens before the image's
    segmenter_steps: int   # segmenter.py: the per-pixel classifier that measures the samples
    layouts: int           # held-out layouts in demo_conditional.png, each with its samples and its flower
    samples_per_layout: int
    large_scale: int       # the large layout is this many times the training size
    seconds: dict          # as DemoSettings.seconds: per step for the two training stages, in all for the others

    @property
    def labels_steps(self):
        return self.labels_lr[-1][0]


COND = ConditionalSettings(
    labels_flags=["--ch", "32", "--ch-mult", "1", "2", "2", "--num-res-blocks", "1", "--attn-resolutions", "8",
                  "--latent-dim", "32", "--num-codebook-vectors", "128", "--codebook-dim", "8", "--codebook-l2-norm",
                  "--restart-dead-codes", "--batch-size", "16"],  # docs/conditional.md
    labels_lr=[(600, 6e-4)], block_size=128, segmenter_steps=600, layouts=4, samples_per_layout=4, large_scale=2,
    seconds={"label maps": 10, "layout tokenizer": 0.25, "layout evaluation": 2, "conditional stage 2": 0.33,
             "segmenter": 30, "measurements": 10, "pictures": 8})  # per step: stage 2's times the ratio measured

COND_TINY = ConditionalSettings(  # f = 8: 4x4 layout tokens
    labels_flags=["--ch", "32", "--ch-mult", "1", "1", "1", "1", "--num-res-blocks", "1", "--attn-resolutions",
                  "--z-channels", "8", "--latent-dim", "8", "--num-codebook-vectors", "16", "--batch-size", "4"],
    labels_lr=[(3, 1e-3)], block_size=80, segmenter_steps=3, layouts=2, samples_per_layout=2, large_scale=2,
    seconds={"label maps": 1, "layout tokenizer": 0.1, "layout evaluation": 2, "conditional stage 2": 0.1,
             "segmenter": 2, "measurements": 5, "pictures": 5})


# ---- helpers ----

def run_step(script, flags):
    """Print the equivalent command line, then run the script with those flags as that command line would (its
    errors and a stop signal's Interrupted reach the demo)."""
    print(f"\n$ python {script.__name__}.py {shlex.join(flags)}", flush=True)
    return call_main(script.main, script.build_parser(), flags)


def data_dirs(out, s):
    """The training and held-out flowers' folders. Their names carry the settings, so a later run with other sizes
    never mixes in these files."""
    return (out / "data" / f"train-{s.image_size}px-{s.train_images}",
            out / "data" / f"heldout-{s.image_size}px-{s.heldout_images}-seed{HELDOUT_SEED}")


def stage_dirs(out):
    """Each stage's --out-dir: its checkpoints/, results/ and tensorboard/ stay together."""
    return out / "stage1", out / "stage2"


def stage_checkpoints(out):
    """Each stage's checkpoint."""
    stage1, stage2 = stage_dirs(out)
    return checkpoint_path(stage1, training_vqgan.RUN_NAME), checkpoint_path(stage2, training_transformer.RUN_NAME)


def conditional_dirs(out):
    """--conditional's runs, beside the stages': the layout tokenizer's and the conditional GPT's (with the segmenter,
    the measurements and the pictures)."""
    return out / "labels", out / "conditional"


def conditional_checkpoints(out):
    """The layout tokenizer's, the conditional GPT's and the segmenter's checkpoints."""
    labels, conditional = conditional_dirs(out)
    return (checkpoint_path(labels, training_vqgan.RUN_NAME),
            checkpoint_path(conditional, training_transformer.RUN_NAME), conditional / "checkpoints" / "segmenter.pt")


def labels_dir(images):
    """Where demo_flowers writes the label maps of the flowers in `images` (a sibling folder)."""
    return images.with_name(images.name + "_labels")


def large_dir(out, s, c):
    """The large held-out flower's folder: the first held-out flower drawn at c.large_scale x the size."""
    return out / "data" / f"heldout-{c.large_scale * s.image_size}px-1-seed{HELDOUT_SEED}"


def with_flag(flags, name, value):
    """The flag list with `name` set to `value` (in its place when present, else at the end)."""
    if name not in flags:
        return [*flags, name, str(value)]
    i = flags.index(name)
    return [*flags[:i + 1], str(value), *flags[i + 2:]]


def saved_step(ckpt):
    """The step of the checkpoint at ckpt, 0 when there is none."""
    return load_checkpoint(ckpt, mmap=True)["step"] if ckpt.is_file() else 0


def newer(output, source):
    """Whether the file output was written after the file source (a finished step of the demo)."""
    return output.is_file() and output.stat().st_mtime >= source.stat().st_mtime


def last_value(metrics_path, key):
    """The last logged value of `key` in a metrics .jsonl file, or None."""
    values = [record[key] for record in map(json.loads, Path(metrics_path).read_text().splitlines()) if key in record]
    return values[-1] if values else None


def read_pictures(paths, kind="rgb", num_labels=0):
    """PNG files -> (N, 3, H, W) in [-1, 1] to draw: images as they are, label maps in their classes' colours."""
    return torch.cat([for_display(map_to_tensor(read_map(path, kind, num_labels), kind, num_labels)[None], kind)
                      for path in paths])


def enlarge(src, dst, factor):
    """A copy of the PNG at src, `factor` times larger with square pixels (the demo's images are small)."""
    with Image.open(src) as image:
        image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(dst)
    return dst


def announce(stage, what, seconds=None):
    """Print a stage's start: what it does and its expected time on 2 CPU cores (None: an earlier run did it)."""
    about = "finished by an earlier run" if seconds is None else \
        f"about {seconds / 60:.1f} min on 2 CPU cores" if seconds >= 90 else f"about {seconds:.0f} s on 2 CPU cores"
    print(f"\n==== {stage}: {what} ({about})", flush=True)


def steps_left(done, steps):
    """A training stage's steps in words: all of them, or those after the step a stopped run saved."""
    return f"{steps} steps" if done in (0, steps) else f"steps {done + 1} to {steps}"


def stop_at_once(signum, frame):
    """The demo's SIGINT and SIGTERM handler outside the training loops, which have their own: nothing is unsaved."""
    raise Interrupted(signal.Signals(signum).name)


# ---- the stages: each skips what an earlier run of the demo finished ----

def draw_flowers(s, out):
    """Flowers drawn at the training size, and held-out flowers drawn from another seed (existing files are kept)."""
    train_dir, heldout_dir = data_dirs(out, s)
    announce("Data", f"{s.train_images} training and {s.heldout_images} held-out flowers of {s.image_size}x"
                     f"{s.image_size}", s.seconds["drawing"])
    make_demo_flowers(train_dir, num_images=s.train_images, size=s.image_size, seed=0)
    make_demo_flowers(heldout_dir, num_images=s.heldout_images, size=s.image_size, seed=HELDOUT_SEED)


def train_in_phases(stage, what, script, ckpt, phases, seconds_per_step, flags, every):
    """A training stage run phase by phase, (until this step, at this learning rate), ...: the training scripts keep
    the learning rate constant, so a lower one for the last steps is a --resume with another --learning-rate, which
    continues from the exact step with the same optimizer state and data order. A stopped run is resumed the same way,
    and the phases it finished are skipped."""
    steps, done = phases[-1][0], saved_step(ckpt)
    announce(stage, f"{what}, {steps_left(done, steps)}", (steps - done) * seconds_per_step if done < steps else None)
    for until_step, lr in phases:
        done = saved_step(ckpt)
        if done < until_step:
            run_step(script, [*flags, "--learning-rate", str(lr), "--max-steps", str(until_step), "--sample-every",
                              str(every), "--save-every", str(every), *(["--resume"] if done else [])])
    return ckpt


def train_stage1(s, out, flags):
    """The VQGAN on the training flowers (no LPIPS: no VGG16 weights are needed)."""
    return train_in_phases("Stage 1", "the VQGAN", training_vqgan, stage_checkpoints(out)[0], s.vqgan_lr,
                           s.seconds["stage 1"], [
                               "--dataset-path", str(data_dirs(out, s)[0]), "--image-size", str(s.image_size),
                               *s.vqgan_flags, "--perceptual-loss-factor", "0", "--out-dir", str(stage_dirs(out)[0]),
                               *LOADING, *flags], every=s.vqgan_steps // s.evals)


def evaluate_stage1(s, out, flags, vqgan_ckpt):
    """Held-out reconstructions, measured by eval_vqgan.py: stage1/results/eval_vqgan.json and reconstructions.png."""
    eval_json = stage_dirs(out)[0] / "results" / "eval_vqgan.json"
    finished = newer(eval_json, vqgan_ckpt)
    announce("Evaluation", f"stage 1 on the {s.heldout_images} held-out flowers",
             None if finished else s.seconds["evaluation"])
    if not finished:
        run_step(eval_vqgan, ["--checkpoint-path", str(vqgan_ckpt), "--dataset-path", str(data_dirs(out, s)[1]),
                              "--out-json", str(eval_json), "--num-grid", "12", *LOADING, *flags])
    return eval_json


def train_stage2(s, out, flags, vqgan_ckpt):
    """A GPT on the codes of the training flowers (encoded once, with their flips), validated on the held-out
    flowers' codes."""
    train_dir, heldout_dir = data_dirs(out, s)
    return train_in_phases("Stage 2", "the GPT", training_transformer, stage_checkpoints(out)[1], s.gpt_lr,
                           s.seconds["stage 2"], [
                               "--dataset-path", str(train_dir), "--val-path", str(heldout_dir), "--checkpoint-path",
                               str(vqgan_ckpt), "--precompute-tokens", *s.gpt_flags, "--out-dir",
                               str(stage_dirs(out)[1]), *LOADING, *flags], every=s.gpt_steps // s.evals)


def sample(s, out, flags, gpt_ckpt):
    """New flowers: sample codes from the GPT and decode them."""
    samples_dir = stage_dirs(out)[1] / "samples"
    finished = newer(samples_dir / "grid.png", gpt_ckpt)
    announce("Sampling", f"{s.num_samples} new flowers", None if finished else s.seconds["sampling"])
    if not finished:
        run_step(sample_transformer, ["--checkpoint-path", str(gpt_ckpt), "--num-samples", str(s.num_samples),
                                      "--top-k", str(s.top_k), "--out-dir", str(samples_dir), *flags])
    return samples_dir


def saved_so_far(s, c, out):
    """What a stopped demo leaves in out, in words."""
    saved = ["the flowers"] if data_dirs(out, s)[1].is_dir() else []
    runs = (("stage 1", stage_checkpoints(out)[0], s.vqgan_steps), ("stage 2", stage_checkpoints(out)[1], s.gpt_steps),
            ("the layout tokenizer", conditional_checkpoints(out)[0], c.labels_steps),
            ("the conditional GPT", conditional_checkpoints(out)[1], s.gpt_steps))
    for name, ckpt, steps in runs:
        if ckpt.is_file():
            saved.append(f"{name} at step {saved_step(ckpt)} of {steps} ({ckpt})")
    return ", ".join(saved) or "nothing"


# ---- --conditional's stages: the same skipping ----

def draw_label_maps(s, c, out):
    """The label maps of the flowers (background, petal, centre, stem and leaf), drawn with the same shapes, and a
    large held-out flower with its map (existing files are kept)."""
    train_dir, heldout_dir = data_dirs(out, s)
    announce("Label maps", f"of the flowers, and a held-out flower of {c.large_scale * s.image_size}x"
                           f"{c.large_scale * s.image_size}", c.seconds["label maps"])
    for folder, count, seed in ((train_dir, s.train_images, 0), (heldout_dir, s.heldout_images, HELDOUT_SEED)):
        make_demo_flowers(folder, num_images=count, size=s.image_size, seed=seed, segmentation_dir=labels_dir(folder))
    large = large_dir(out, s, c)
    make_demo_flowers(large, num_images=1, size=c.large_scale * s.image_size, seed=HELDOUT_SEED,
                      segmentation_dir=labels_dir(large))


def train_layout_tokenizer(s, c, out, flags):
    """The label maps' tokenizer: one-hot in, logits out, binary cross-entropy (taming's VQSegmentationModel)."""
    return train_in_phases("Layout tokenizer", "the label maps' VQ model", training_vqgan,
                           conditional_checkpoints(out)[0], c.labels_lr, c.seconds["layout tokenizer"], [
                               "--image-kind", "segmentation", "--num-labels", str(len(FLOWER_LABELS)),
                               "--dataset-path", str(labels_dir(data_dirs(out, s)[0])), "--image-size",
                               str(s.image_size), *c.labels_flags, "--out-dir", str(conditional_dirs(out)[0]),
                               *LOADING, *flags], every=c.labels_steps)


def evaluate_layout_tokenizer(s, c, out, flags, labels_ckpt):
    """The layout tokenizer on the held-out maps: pixel accuracy and mean IoU in labels/results/eval_vqgan.json."""
    eval_json = conditional_dirs(out)[0] / "results" / "eval_vqgan.json"
    finished = newer(eval_json, labels_ckpt)
    announce("Layout evaluation", f"the layout tokenizer on the {s.heldout_images} held-out maps",
             None if finished else c.seconds["layout evaluation"])
    if not finished:
        run_step(eval_vqgan, ["--checkpoint-path", str(labels_ckpt), "--dataset-path",
                              str(labels_dir(data_dirs(out, s)[1])), "--out-json", str(eval_json), "--num-grid", "12",
                              *LOADING, *flags])
    return json.loads(eval_json.read_text())


def train_conditional(s, c, out, flags, vqgan_ckpt, labels_ckpt):
    """Stage 2's GPT, flags and schedule, reading [start, layout tokens, image tokens]: a longer block, and the layout
    codes in embedding rows of their own (measured better than taming's shared rows: docs/conditional.md)."""
    train_dir, heldout_dir = data_dirs(out, s)
    return train_in_phases("Conditional stage 2", "the GPT reading the layouts", training_transformer,
                           conditional_checkpoints(out)[1], s.gpt_lr, c.seconds["conditional stage 2"], [
                               "--dataset-path", str(train_dir), "--cond-path", str(labels_dir(train_dir)),
                               "--val-path", str(heldout_dir), "--val-cond-path", str(labels_dir(heldout_dir)),
                               "--checkpoint-path", str(vqgan_ckpt), "--cond-checkpoint", str(labels_ckpt),
                               "--precompute-tokens", *with_flag(s.gpt_flags, "--block-size", c.block_size),
                               "--cond-embedding", "separate", "--out-dir", str(conditional_dirs(out)[1]), *LOADING,
                               *flags],
                           every=s.gpt_steps // s.evals)


def train_segmenter(s, c, out, flags):
    """The ruler: a per-pixel classifier of the training (flower, label map) pairs; returns its held-out scores."""
    (train_dir, heldout_dir), ckpt = data_dirs(out, s), conditional_checkpoints(out)[2]
    finished = ckpt.is_file()
    announce("Segmenter", "the per-pixel classifier that measures the samples",
             None if finished else c.seconds["segmenter"])
    if not finished:
        run_step(segmenter, [
            "--images", str(train_dir), "--labels", str(labels_dir(train_dir)), "--num-labels",
            str(len(FLOWER_LABELS)), "--val-images", str(heldout_dir), "--val-labels", str(labels_dir(heldout_dir)),
            "--image-size", str(s.image_size), "--steps", str(c.segmenter_steps), "--out", str(ckpt), *flags])
    return load_checkpoint(ckpt)["held_out"]


def measure(s, c, out, flags, gpt_ckpts):
    """Each GPT of gpt_ckpts ({name: checkpoint}) on the held-out pairs: bits per token, and one sample per layout
    compared with its flower (PSNR) and its layout (the mean IoU of its segmentation); for the unconditional GPT,
    which reads no layout, chance levels. Returns {name: eval_transformer.py's results}."""
    heldout_dir, segmenter_ckpt = data_dirs(out, s)[1], conditional_checkpoints(out)[2]
    jsons = {name: conditional_dirs(out)[1] / "results" / f"eval_{name}.json" for name in gpt_ckpts}
    todo = [name for name, ckpt in gpt_ckpts.items()
            if not (newer(jsons[name], ckpt) and newer(jsons[name], segmenter_ckpt))]
    announce("Measurements", " and ".join(gpt_ckpts) + " GPT on the held-out pairs",
             c.seconds["measurements"] * len(todo) / len(gpt_ckpts) if todo else None)
    for name in todo:
        run_step(eval_transformer, [
            "--checkpoint-path", str(gpt_ckpts[name]), "--reference", str(heldout_dir), "--cond-path",
            str(labels_dir(heldout_dir)), "--segmenter", str(segmenter_ckpt), "--features", "random-conv",
            "--num-samples", str(s.heldout_images), "--top-k", str(s.top_k), "--num-grid", "0", "--out-json",
            str(jsons[name]), *LOADING, *flags])
    return {name: json.loads(path.read_text()) for name, path in jsons.items()}


def draw_layouts(s, c, out, flags, cond_ckpt):
    """Held-out layouts, their samples and their flowers (conditional/layouts.png); the large layout, drawn by the
    sliding window (conditional/samples/large/)."""
    heldout_dir, cond_out = data_dirs(out, s)[1], conditional_dirs(out)[1]
    layouts, large_samples = cond_out / "layouts.png", cond_out / "samples" / "large"
    finished = newer(layouts, cond_ckpt) and newer(large_samples / "grid.png", cond_ckpt)
    announce("Pictures", f"{c.samples_per_layout} samples for each of {c.layouts} held-out layouts and for a layout "
                         f"{c.large_scale}x the training size", None if finished else c.seconds["pictures"])
    if finished:
        return layouts, large_samples
    rows, num_labels = [], len(FLOWER_LABELS)
    for i in range(c.layouts):
        name, samples_dir = f"flower_{i:04d}.png", cond_out / "samples" / f"layout_{i}"
        run_step(sample_transformer, [
            "--checkpoint-path", str(cond_ckpt), "--cond-image", str(labels_dir(heldout_dir) / name), "--target-image",
            str(heldout_dir / name), "--num-samples", str(c.samples_per_layout), "--top-k", str(s.top_k), "--seed",
            str(i), "--out-dir", str(samples_dir), *flags])
        rows += [read_pictures([labels_dir(heldout_dir) / name], "segmentation", num_labels),
                 read_pictures(sorted(samples_dir.glob("sample_*.png"))), read_pictures([heldout_dir / name])]
    large = large_dir(out, s, c)
    run_step(sample_transformer, [
        "--checkpoint-path", str(cond_ckpt), "--cond-image", str(labels_dir(large) / "flower_0000.png"),
        "--target-image", str(large / "flower_0000.png"), "--num-samples", str(c.samples_per_layout), "--top-k",
        str(s.top_k), "--out-dir", str(large_samples), *flags])
    save_image_grid(torch.cat(rows), layouts, nrow=c.samples_per_layout + 2)
    return layouts, large_samples


# ---- main ----

@keeps_signal_handlers
def main(args):
    s, c = (TINY, COND_TINY) if args.tiny else (DEMO, COND)
    out = Path(args.out_dir)
    device = ["--device", args.device] if args.device else []
    flags = [*device, *(["--threads", str(args.threads)] if args.threads else [])]  # every step's
    again = shlex.join(["python", "demo.py", *(["--tiny"] if args.tiny else []),
                        *(["--conditional"] if args.conditional else []), "--out-dir", str(out), *flags])
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop_at_once)
    start, times = time.perf_counter(), {}

    @contextmanager
    def stage(name):
        """Time a stage; stopped, say what is saved and how to go on."""
        began = time.perf_counter()
        try:
            yield
        except (Interrupted, KeyboardInterrupt) as stop:  # KeyboardInterrupt: a second signal in a training loop
            how = stop.signal_name if isinstance(stop, Interrupted) else "stopped at once"
            print(f"\nThe demo stopped during {name} ({how}). Saved: {saved_so_far(s, c, out)}. `{again}` continues "
                  f"from there.", flush=True)
            raise
        times[name] = time.perf_counter() - began

    with stage("drawing"):
        draw_flowers(s, out)
    with stage("stage 1"):
        vqgan_ckpt = train_stage1(s, out, flags)
    with stage("evaluation"):
        eval_json = evaluate_stage1(s, out, flags, vqgan_ckpt)
    with stage("stage 2"):
        gpt_ckpt = train_stage2(s, out, flags, vqgan_ckpt)
    with stage("sampling"):
        samples_dir = sample(s, out, flags, gpt_ckpt)

    metrics = json.loads(eval_json.read_text())
    pictures = (enlarge(eval_json.parent / "reconstructions.png", out / "demo_reconstructions.png", s.enlarge),
                enlarge(samples_dir / "grid.png", out / "demo_samples.png", s.enlarge))
    bits = last_value(gpt_ckpt.parent.parent / "results" / "transformer_metrics.jsonl", "val_bits_per_token")
    total = time.perf_counter() - start
    print(f"\nDemo done in {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ").")
    print(f"Held-out reconstructions ({metrics['num_images']} flowers of seed {HELDOUT_SEED}): "
          f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
          f"{100 * metrics['codebook_usage']:.1f}% of the {metrics['num_codes']} codes used ({eval_json}).")
    if bits is not None:
        print(f"Stage-2 validation loss on the held-out flowers' codes: {bits:.2f} bits per token.")
    print(f"Pictures: {pictures[0]} (originals above their reconstructions) and {pictures[1]} (new flowers). "
          f"Curves: tensorboard --logdir {out}")
    summary = dict(psnr=metrics["psnr"], ssim=metrics["ssim"], codebook_usage=metrics["codebook_usage"],
                   val_bits_per_token=bits, seconds=total, times=times, eval_json=eval_json,
                   reconstructions=pictures[0], samples=pictures[1])
    if not args.conditional:
        return summary

    # --conditional: flowers drawn for held-out label maps, measured against stage 2's GPT.
    default_stages = set(times)
    with stage("label maps"):
        draw_label_maps(s, c, out)
    with stage("layout tokenizer"):
        labels_ckpt = train_layout_tokenizer(s, c, out, flags)
    with stage("layout evaluation"):
        labels_eval = evaluate_layout_tokenizer(s, c, out, flags, labels_ckpt)
    with stage("conditional stage 2"):
        cond_ckpt = train_conditional(s, c, out, flags, vqgan_ckpt, labels_ckpt)
    with stage("segmenter"):
        segmenter_scores = train_segmenter(s, c, out, flags)
    with stage("measurements"):
        results = measure(s, c, out, flags, {"conditional": cond_ckpt, "unconditional": gpt_ckpt})
    with stage("pictures"):
        layouts, large_samples = draw_layouts(s, c, out, flags, cond_ckpt)

    pictures = (enlarge(layouts, out / "demo_conditional.png", s.enlarge),
                enlarge(large_samples / "grid.png", out / "demo_conditional_2x.png", s.enlarge))
    extra = {k: v for k, v in times.items() if k not in default_stages}
    print(f"\nThe conditional part took {sum(extra.values()) / 60:.1f} min more ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in extra.items()) + ").")
    print(f"Layout tokenizer on the held-out maps: pixel accuracy {labels_eval['pixel_accuracy']:.4f}, mean IoU "
          f"{labels_eval['mean_iou']:.4f}. Segmenter on the held-out flowers: pixel accuracy "
          f"{segmenter_scores['pixel_accuracy']:.4f}, mean IoU {segmenter_scores['mean_iou']:.4f}.")
    for name, r in results.items():
        print(f"{name:>13} GPT on the held-out pairs: {r['val_bits_per_token']:.3f} bits per token; a sample per "
              f"layout: PSNR to its flower {r['psnr_to_reference']:.2f} dB, mean IoU to its layout "
              f"{r['sample_mean_iou']:.4f}.")
    print(f"Pictures: {pictures[0]} (each row: layout, samples, the held-out flower) and {pictures[1]} (a layout "
          f"{c.large_scale}x the training size).")
    summary["conditional"] = dict(results=results, labels_eval=labels_eval, segmenter=segmenter_scores,
                                  seconds=sum(extra.values()), pictures=pictures)
    return summary


# ---- command line ----

def build_parser():
    p = ScriptParser("Run the whole method on demo flowers: data, stage 1, evaluation, stage 2 and sampling, in about "
                     "9 minutes on 2 CPU cores (timed 2026-12-03 on a quiet machine: docs/demo.md). "
                     "Stopped (Ctrl-C, SIGTERM), it saves; run again with the same --out-dir, it continues.")
    p.add_argument("--out-dir", default="runs/demo", help="where the data, both stages' runs and the pictures go")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a few steps: checks every step in seconds")
    p.add_argument("--conditional", action="store_true", help="then draw flowers for held-out label maps: a layout "
                   "tokenizer and a conditional GPT, measured against stage 2's GPT, in about 8 minutes more "
                   "(docs/conditional.md)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch's operators in every step (default: torch's, all cores)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
