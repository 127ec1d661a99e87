"""The whole method on a CPU in about 8 minutes: demo flowers, stage 1, held-out evaluation, stage 2, samples.

    python demo.py                       # everything under runs/demo/
    python demo.py --out-dir runs/demo2
    python demo.py --tiny                # every step with tiny sizes, in seconds (what tests/test_demo.py runs)

It calls the scripts' own main() functions with the flags printed below, so each step can be re-run by hand. It writes
<out-dir>/data/ (training and held-out flowers), stage1/ (the VQGAN's checkpoints/, results/ with its config, logs,
eval_vqgan.json and reconstructions.png, and tensorboard/), stage2/ (the GPT's, and samples/) and, enlarged for
viewing, demo_reconstructions.png and demo_samples.png. Stopped (Ctrl-C, SIGTERM), it saves; run again with the same
--out-dir, it skips the finished stages and continues the stopped one.
"""
import json
import shlex
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import eval_vqgan
import sample_transformer
import training_transformer
import training_vqgan
from checkpoint import checkpoint_path, load_checkpoint
from cli import ScriptParser, call_main, run_script
from demo_flowers import make_demo_flowers
from presets import TINY_GPT, TINY_VQGAN, as_flags
from runtime import STOP_SIGNALS, Interrupted, keeps_signal_handlers

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
    seconds={"drawing": 9, "stage 1": 0.244, "evaluation": 3, "stage 2": 0.152, "sampling": 4})

TINY = DemoSettings(  # the tiny models of presets.py
    image_size=TINY_VQGAN["image_size"], train_images=16, heldout_images=4,
    vqgan_flags=[*as_flags(TINY_VQGAN, leave_out=["image_size"]), "--batch-size", "4", "--disc-start", "100"],
    vqgan_lr=[(4, 1e-3), (6, 3e-4)],
    gpt_flags=[*as_flags(TINY_GPT), "--batch-size", "4"],
    gpt_lr=[(3, 1e-3), (4, 3e-4)], num_samples=4, top_k=8, evals=1, enlarge=2,
    seconds={"drawing": 1, "stage 1": 0.1, "evaluation": 2, "stage 2": 0.1, "sampling": 2})


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


def saved_so_far(s, out):
    """What a stopped demo leaves in out, in words."""
    saved = ["the flowers"] if data_dirs(out, s)[1].is_dir() else []
    for stage, ckpt, steps in zip((1, 2), stage_checkpoints(out), (s.vqgan_steps, s.gpt_steps)):
        if ckpt.is_file():
            saved.append(f"stage {stage} at step {saved_step(ckpt)} of {steps} ({ckpt})")
    return ", ".join(saved) or "nothing"


# ---- main ----

@keeps_signal_handlers
def main(args):
    s = TINY if args.tiny else DEMO
    out = Path(args.out_dir)
    device = ["--device", args.device] if args.device else []
    flags = [*device, *(["--threads", str(args.threads)] if args.threads else [])]  # every step's
    again = shlex.join(["python", "demo.py", *(["--tiny"] if args.tiny else []), "--out-dir", str(out), *flags])
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
            print(f"\nThe demo stopped during {name} ({how}). Saved: {saved_so_far(s, out)}. `{again}` continues "
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
    return dict(psnr=metrics["psnr"], ssim=metrics["ssim"], codebook_usage=metrics["codebook_usage"],
                val_bits_per_token=bits, seconds=total, times=times, eval_json=eval_json,
                reconstructions=pictures[0], samples=pictures[1])


# ---- command line ----

def build_parser():
    p = ScriptParser("Run the whole method on demo flowers: data, stage 1, evaluation, stage 2 and sampling, in about "
                     "8 minutes on 2 CPU cores (estimated 2026-12-03 from measured per-step times: docs/demo.md). "
                     "Stopped (Ctrl-C, SIGTERM), it saves; run again with the same --out-dir, it continues.")
    p.add_argument("--out-dir", default="runs/demo", help="where the data, both stages' runs and the pictures go")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a few steps: checks every step in seconds")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch's operators in every step (default: torch's, all cores)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
