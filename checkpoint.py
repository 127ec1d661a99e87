"""Checkpoints: atomic saves, weights-only loading with clear errors, config checks on resume, taming's files."""
import glob
import os
import pickle
import uuid
from pathlib import Path

import torch
import yaml


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged, or not safe to load."""


class MissingWeights(RuntimeError):
    """Pretrained weights (VGG16 for LPIPS) that are not on disk and cannot be downloaded."""


def checkpoint_path(out_dir, run_name):
    """Where a training run keeps its checkpoint: <out_dir>/checkpoints/<run_name>_last.pt."""
    return Path(out_dir) / "checkpoints" / f"{run_name}_last.pt"


def run_config_path(out_dir, run_name):
    """Where a training run writes its flags, for --config: <out_dir>/results/<run_name>_config.json."""
    return Path(out_dir) / "results" / f"{run_name}_config.json"


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


def load_checkpoint(path, trust=False, mmap=False):
    """Load a checkpoint onto the CPU; arbitrary pickled objects are refused unless `trust` is set.

    mmap: map the tensors' storage instead of reading it (for a look at the small entries of a big file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The checkpoint '{path}' does not exist.")
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as error:
        if not trust:  # weights_only met an object that unpickling would construct by running code
            raise CheckpointError(f"The checkpoint '{path}' holds Python objects that could run code when loaded; "
                                  f"if you trust its source, pass --trust-checkpoint.") from error
        raise CheckpointError(f"The checkpoint '{path}' is damaged ({type(error).__name__}).") from error
    except (RuntimeError, EOFError, KeyError) as error:  # how torch reports a truncated or foreign file
        raise CheckpointError(f"The checkpoint '{path}' is damaged or not a PyTorch file "
                              f"({type(error).__name__}).") from error


def check_same_config(saved, current, ckpt_path):
    """Refuse to resume a checkpoint whose config differs from the flags, naming every differing field."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v  # a saved tuple comes back as a list
    mismatched = [k for k, v in current.items() if k in saved and norm(saved[k]) != norm(v)]
    if mismatched:
        raise CheckpointError(f"The checkpoint {ckpt_path} was trained with other values of "
                              f"{', '.join(mismatched)}; pass the same flags or another --out-dir.")


def read_taming(ckpt_path, config_path):
    """The state dict of a taming-transformers checkpoint and the `model.params` of its yaml config."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    with open(config_path) as f:
        params = yaml.safe_load(f)["model"]["params"]
    return state, params
