"""The scripts' command lines: their parser, the flags of both training loops, --config and --resume, flags to
config dataclasses, and run_script, every script's entry point."""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from checkpoint import CheckpointError, MissingWeights, checkpoint_path, load_checkpoint, run_config_path
from config import ConfigError, check_positive
from data import DataError
from runtime import Interrupted


BASE_LEARNING_RATE = 4.5e-6  # taming-transformers: lr = 4.5e-6 x global batch size


def run_script(main, parser, argv=None):
    """A script's entry point: main(flags of parse_flags) and what it returns. An expected failure is one line on
    stderr and exit code 1, never a traceback, a config's error worded by the flags; a run stopped by a signal exits
    with 130 (SIGINT) or 143 (SIGTERM) after saving, and one stopped at once by Ctrl-C with 130 after a line."""
    try:
        return call_main(main, parser, argv)
    except Interrupted as stop:
        sys.exit(stop.exit_code)
    except KeyboardInterrupt as stop:  # a second Ctrl-C in a training loop, or one outside it
        print(f"Stopped at once: {stop}." if str(stop) else "Stopped by Ctrl-C.", file=sys.stderr)
        sys.exit(130)
    except (DataError, CheckpointError, MissingWeights, ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def call_main(main, parser, argv=None):
    """main(flags of parse_flags) and what it returns, its errors raised as they are but a config's, which is raised
    worded by the flags (demo.py runs each script's step through this)."""
    args = parse_flags(parser, argv)
    try:
        return main(args)
    except ConfigError as error:
        raise ValueError(in_flag_words(error, args)) from None


def in_flag_words(error, args):
    """A ConfigError's message with each field that is a flag of the script written as that flag: n_embd, --n-embd."""
    return error.worded(lambda name: f"--{name.replace('_', '-')}" if hasattr(args, name) else name)


# ---- the parser ----

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None and the help text says what happens instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """A script's parser, whose --help shows every default. A training script's also names its run (its checkpoint is
    <out-dir>/checkpoints/<run_name>_last.pt) and the flags besides RUN_MUTABLE_FLAGS that a --resume may change."""

    def __init__(self, description, run_name=None, mutable_flags=()):
        super().__init__(description=description, formatter_class=HelpFormatter)
        self.run_name, self.mutable_flags = run_name, RUN_MUTABLE_FLAGS | set(mutable_flags)


def add_run_flags(parser):
    """Flags of the training loop, the same in both scripts."""
    a = parser.add_argument
    a("--learning-rate", type=float, default=None,
      help="Adam's learning rate (AdamW's in stage 2); default: 4.5e-6 x the global batch (--batch-size x processes x "
           "--grad-accum), taming's scaling")
    a("--epochs", type=int, default=100, help="passes over the data set (unless --max-steps is given)")
    a("--max-steps", type=int, default=None,
      help="stop after this many optimizer steps, counted across resumes (overrides --epochs)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="autocast dtype; fp16 is CUDA only, with a gradient scaler per optimizer (default: bf16 on CUDA if "
           "supported, else fp32)")
    a("--compile", action="store_true", help="wrap the models in torch.compile (checkpoints hold the plain weights)")
    a("--device", default=None, help="cuda, cuda:1, cpu ... (default: CUDA when available)")
    a("--out-dir", default=".", help="where results/ and checkpoints/ go")
    a("--resume", nargs="?", const=True, default=False, type=resume_mode, metavar="auto",
      help=f"continue from {checkpoint_path('<out-dir>', parser.run_name)}, refused when there is none; --resume auto: "
           f"continue when it exists, else start afresh (for a cluster job that may be requeued)")
    a("--trust-checkpoint", action="store_true",
      help="allow loading checkpoints that need full unpickling (only files you trust)")
    a("--seed", type=int, default=0, help="random seed (offset by rank)")
    a("--num-workers", type=int, default=4, help="data-loading worker processes per process")
    a("--save-every", type=int, default=1000, help="steps between checkpoints")
    a("--sample-every", type=int, default=500, help="steps between sample grids (and validation in stage 2)")
    a("--log-every", type=int, default=10,
      help="steps between reads of the logged values (each read waits for the GPU); they are averaged over them")
    a("--max-nonfinite-steps", type=int, default=20,
      help="a non-finite loss skips its update; this many in a row stop the run (fp16's overflowed gradients are the "
           "scaler's: it skips the step and lowers its scale)")
    a("--dist-timeout", type=float, default=30.0,
      help="minutes a rank may wait in a collective (torchrun or SLURM) before the job stops with an error (NCCL's "
           "default: 10)")
    a("--threads", type=int, default=None,
      help="CPU threads of torch's operators; set it when other jobs share the machine (default: torch's, all cores)")
    a("--config", default=None,
      help=f"start from the flags of a run's {run_config_path('<out-dir>', parser.run_name)} (its --out-dir and "
           f"--resume excepted); flags given override")
    a("--no-tensorboard", action="store_true",
      help=f"do not write TensorBoard event files to <out-dir>/tensorboard/{parser.run_name}/ (a run of its own per "
           f"stage)")
    a("--ema-decay", type=float, default=None,
      help="keep an exponential moving average of the weights with this decay (e.g. 0.999), saved as the "
           "checkpoint's `ema` and used by sampling and evaluation (default: none, as in the paper)")


# ---- the flags of a run: defaults, then --config, then the command line; with --resume, the checkpoint's ----

# Run flags that may change when a run resumes (each script adds its own). Every other flag comes back from the run's
# checkpoint.
RUN_MUTABLE_FLAGS = {"epochs", "max_steps", "learning_rate", "save_every", "sample_every", "log_every", "num_workers",
                     "device", "out_dir", "resume", "trust_checkpoint", "threads", "dist_timeout",
                     "max_nonfinite_steps", "compile", "precision", "no_tensorboard", "config"}
NOT_FROM_CONFIG_FILES = {"config", "out_dir", "resume"}  # a run started from another's config.json is a new run


def resume_mode(value):
    """--resume's value: only "auto" (plain --resume stores True)."""
    if value != "auto":
        raise argparse.ArgumentTypeError(f"the only value --resume takes is 'auto', got '{value}'")
    return value


def checkpoint_to_resume(args, run_name):
    """The checkpoint a run continues, None when it starts afresh. Plain --resume refuses an out dir without one (a
    mistyped --out-dir must not start a new run); --resume auto starts afresh there."""
    path = checkpoint_path(args.out_dir, run_name)
    if not args.resume or (args.resume == "auto" and not path.exists()):
        return None
    if not path.exists():
        raise CheckpointError(f"--resume found no checkpoint at {path}: check --out-dir, or pass --resume auto to "
                              f"start afresh when there is none.")
    return path


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
    """The flags of a run's config file (results/<run name>_config.json) as a dict."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"Cannot read the config file {path} ({error}).") from None
    if not isinstance(values, dict):
        raise DataError(f"The config file {path} does not hold a dict of flags.")
    return values


def parse_flags(parser, argv=None):
    """The flags of a script run. For a training script (a parser with a run_name): its defaults, then a --config file
    (a run's config file), then the command line; with --resume and a checkpoint, the run's own flags come back from
    the checkpoint: the command line may change only the parser's mutable_flags, and another value of any other flag
    is refused."""
    args = parser.parse_args(argv)
    if getattr(parser, "run_name", None) is None:
        return args
    given = explicit_flags(parser, argv)
    if args.config:
        values = read_config(args.config)
        unknown = sorted(set(values) - set(vars(args)))
        if unknown:
            raise DataError(f"The config file {args.config} has flags this script does not know: {unknown}.")
        for name, value in values.items():
            if name not in given and name not in NOT_FROM_CONFIG_FILES:
                setattr(args, name, value)
    path = checkpoint_to_resume(args, parser.run_name)
    if path is not None:
        saved = load_checkpoint(path, trust=args.trust_checkpoint, mmap=True).get("args", {})
        changed = sorted(f"--{name.replace('_', '-')}" for name in set(saved) & set(given) - parser.mutable_flags
                         if given[name] != saved[name])
        if changed:
            raise ValueError(f"--resume continues the run of {path} with its own {', '.join(changed)}; start a new "
                             f"run with another --out-dir to change them.")
        for name, value in saved.items():
            if name not in given and name != "resume" and hasattr(args, name):
                setattr(args, name, value)
    return args


# ---- flags to values: configs, the learning rate, checks ----

def config_from_flags(cls, args, **values):
    """A config dataclass from the flags: each field from the flag of its name, or by the config's `flag_values`
    where its flag has another name or default; `values` give what no flag does. The config checks itself."""
    from_flags = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if hasattr(cls, "flag_values"):
        from_flags.update(cls.flag_values(args))
    return cls(**{**from_flags, **values})


def check_run_flags(args):
    """ConfigError for an impossible value of the training loop's flags (the scripts' entry point names the flag)."""
    check_positive(args, "batch_size", "epochs", "grad_accum", "save_every", "sample_every", "log_every",
                   "max_nonfinite_steps")
    if args.learning_rate is not None:
        check_positive(args, "learning_rate")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise ConfigError("ema_decay", f"must be between 0 and 1 (e.g. 0.999), got {args.ema_decay}.")


def learning_rate(args, world_size):
    """--learning-rate when given, else taming's scaling: BASE_LEARNING_RATE x the global batch."""
    return args.learning_rate or BASE_LEARNING_RATE * args.batch_size * world_size * args.grad_accum

