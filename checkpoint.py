"""Checkpoints: atomic saves, weights-only loading with clear errors, config checks on resume, taming's files, the
kind of every checkpoint this project reads, and model folders (config.json + model.safetensors, local or on the
Hub)."""
import glob
import json
import os
import pickle
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


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
    """torch.save that never leaves a partial file at `path`: write a temporary file beside it, then rename.

    Several processes may save to one path at once (two jobs writing the same token cache): each writes its own
    temporary file, the last rename wins, and none removes another's unfinished file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is an atomic rename on one file system; 'x' mode keeps the user's umask.
    partial = path.with_name(f'{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp')
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
    for partial in path.parent.glob(f'{glob.escape(path.name)}.*.tmp'):
        if _left_by_a_killed_save(partial, path.name):
            partial.unlink(missing_ok=True)


def _left_by_a_killed_save(partial, name):
    """Whether the temporary file `partial` of a save to `name` belongs to no running process: one this host's process
    wrote and that process is gone, or one named as before the names carried the writer (<name>.<hex>.tmp).
    Another host's files are left alone: whether their writer runs cannot be told from here."""
    writer = partial.name[len(name) + 1:-len('.tmp')].rsplit('-', 2)
    if len(writer) != 3:
        return True
    host, pid = writer[0], writer[1]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's
        pass
    return False


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


def read_taming(ckpt_path, config_path, trust=False):
    """The state dict of a taming-transformers checkpoint (a VQ model or a Net2NetTransformer) and the `model.params`
    of its yaml config."""
    ckpt = read_checkpoint(ckpt_path, trust).expect("taming", "taming-stage2", user="--taming-config")
    state = ckpt.entries["state_dict"]
    try:
        with open(config_path) as f:
            params = yaml.safe_load(f)["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise CheckpointError(f"Cannot read the taming config {config_path} ({type(error).__name__}: {error}); "
                              f"--taming-config takes the model.yaml released beside the checkpoint.") from None
    return state, params


# ---- the kind of a checkpoint: every script tells the user which one it got and which script takes it ----

# kind: (what it is, with {} for "checkpoint" or "model folder"; the scripts and flags that read it)
KINDS = {
    "stage1": ("a stage-1 (VQGAN) {}",
               "eval_vqgan.py, training_transformer.py --checkpoint-path, app.py and export.py"),
    "stage2": ("a stage-2 (transformer) {}", "sample_transformer.py, eval_transformer.py, app.py and export.py"),
    "taming": ("a taming-transformers VQGAN checkpoint", "eval_vqgan.py and export.py with --taming-config model.yaml"),
    "taming-stage2": ("a taming-transformers transformer (Net2NetTransformer) checkpoint",
                      "sample_transformer.py and eval_transformer.py with --taming-config model.yaml, and "
                      "eval_vqgan.py and export.py with --taming-config model.yaml --taming-stage (its VQ models)"),
}
WANTED = {  # what a script needs, in the words of the error
    "stage1": "a stage-1 checkpoint from training_vqgan.py (or a stage-1 model folder from export.py)",
    "stage2": "a stage-2 checkpoint from training_transformer.py (or a stage-2 model folder from export.py)",
    "taming": "a taming-transformers VQGAN checkpoint (its last.ckpt)",
    "taming-stage2": "a taming-transformers Net2NetTransformer checkpoint",
}
MODEL_TYPES = {"vqgan": "stage1", "vqgan-transformer": "stage2"}  # config.json's model_type in a model folder
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
FOLDER_FORMAT = 1  # config.json's `format`: raised when the folder layout changes
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name; a path to a file would exist or end in .pt/.ckpt


@dataclass
class Checkpoint:
    """A checkpoint file or model folder with its kind (a key of KINDS; None: not a checkpoint of this project)."""
    path: Path
    kind: str = None
    entries: dict = None  # a file's dict
    folder: dict = None   # a model folder's config.json

    def describe(self):
        if self.kind is None:
            shown = ", ".join(map(str, list(self.entries)[:6])) if isinstance(self.entries, dict) else \
                type(self.entries).__name__
            return f"not a checkpoint this project writes (it holds {shown})"
        return KINDS[self.kind][0].format("model folder" if self.folder is not None else "checkpoint")

    def expect(self, *kinds, user):
        """Itself when its kind is one of `kinds`; else a CheckpointError saying in one sentence what it is, which
        scripts read it, and what `user` (a script or a flag) needs."""
        if self.kind in kinds:
            return self
        readers = KINDS[self.kind][1] if self.kind else None
        readers = f", which {readers} read" if readers else ""
        hint = ""
        if self.kind == "stage2" and "stage1" in kinds:
            hint = f" such as the one it was trained on, {self.stage1_path()}"
        raise CheckpointError(f"{self.path} is {self.describe()}{readers}; {user} needs "
                              f"{' or '.join(WANTED[k] for k in kinds)}{hint}.")

    @property
    def config(self):
        """The model's config dict."""
        return self.info["config"]

    @property
    def info(self):
        """What a stage-2 model recorded beside its weights (classes, cond_kind ...): a file's dict or config.json."""
        return self.folder if self.folder is not None else self.entries

    def stage1_path(self):
        """Where a stage-2 checkpoint's stage-1 model is: the folder's sub-folder, or the path saved in training."""
        return self.path / self.folder["vqgan"] if self.folder is not None else Path(self.entries["vqgan_checkpoint"])

    def cond_path(self):
        """Where a stage-2 checkpoint's condition tokenizer is (the folder's sub-folder, or the path saved in
        training); None for a model without an image condition."""
        if self.folder is not None:
            return self.path / self.folder["cond"] if self.folder.get("cond") else None
        return Path(self.entries["cond_checkpoint"]) if self.entries.get("cond_checkpoint") else None

    def uses_ema(self, ema=True):
        """Whether weights(ema) are EMA weights."""
        if self.folder is not None:
            return self.folder.get("weights") == "ema"
        return bool(ema and self.entries.get("ema"))

    def weights(self, ema=True):
        """The state dict: a file's EMA weights when its run kept them (unless ema=False), else its trained ones; a
        model folder's one set of weights, read from safetensors (which never runs code)."""
        if self.folder is None:
            return self.entries["ema"] if self.uses_ema(ema) else self.entries["model"]
        if not ema and self.uses_ema():
            raise CheckpointError(f"The model folder {self.path} holds the EMA weights only; export the checkpoint "
                                  f"again with --no-ema for the trained ones.")
        path = self.path / WEIGHTS_FILE
        if not path.is_file():
            raise CheckpointError(f"The model folder {self.path} has no {WEIGHTS_FILE}.")
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} is damaged or not a safetensors file ({error}).") from None


def checkpoint_kind(entries):
    """The kind of a loaded checkpoint file's contents (None: none of this project's)."""
    if not isinstance(entries, dict):
        return None
    if isinstance(entries.get("state_dict"), dict):  # a PyTorch Lightning checkpoint of taming-transformers
        keys = entries["state_dict"].keys()
        if any(k.startswith(("transformer.", "first_stage_model.")) for k in keys):
            return "taming-stage2"
        return "taming" if any(k.startswith("encoder.") for k in keys) else None
    if not isinstance(entries.get("config"), dict) or "model" not in entries:
        return None
    if "vqgan_checkpoint" in entries or "n_layer" in entries["config"]:
        return "stage2"
    return "stage1" if "ch_mult" in entries["config"] else None


def read_checkpoint(path, trust=False):
    """Any checkpoint this project reads, with its kind: a .pt of either stage, taming's .ckpt, or a model folder of
    export.py, given as a local folder or as a Hub model id (owner/name, downloaded into the Hub's cache)."""
    if isinstance(path, Checkpoint):
        return path
    path = Path(path)
    if not path.exists() and HUB_ID.fullmatch(str(path)) and path.suffix not in (".pt", ".pth", ".ckpt"):
        path = download_model_folder(str(path))
    if path.is_dir():
        return read_model_folder(path)
    entries = load_checkpoint(path, trust=trust)
    return Checkpoint(path, checkpoint_kind(entries), entries=entries)


def download_model_folder(repo_id):
    """The local copy of a Hub model repo's folder (its JSON, safetensors and Markdown files only)."""
    from huggingface_hub import snapshot_download  # imported here: only a Hub id needs it, and it is slow to import
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except Exception as error:  # offline, unknown repo, no access: the Hub's errors have no common base class
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise CheckpointError(f"{repo_id} is neither a local file or folder nor a model that could be fetched from "
                              f"the Hugging Face Hub{offline}: {type(error).__name__}.") from None


def read_model_folder(path):
    """A model folder's config.json, checked; its weights are read when asked for (Checkpoint.weights)."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"The folder {path} is not a model folder of export.py (it has no {CONFIG_FILE}).")
    try:
        folder = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Cannot read {config_path} ({error}).") from None
    kind = MODEL_TYPES.get(folder.get("model_type")) if isinstance(folder, dict) else None
    if kind is None or not isinstance(folder.get("config"), dict):
        raise CheckpointError(f"{config_path} is not the config of a model folder of export.py (its model_type must "
                              f"be one of {', '.join(MODEL_TYPES)}, beside a `config` dict).")
    if folder.get("format", FOLDER_FORMAT) > FOLDER_FORMAT:
        raise CheckpointError(f"The model folder {path} has format {folder['format']}, newer than this code's "
                              f"{FOLDER_FORMAT}: update the code.")
    return Checkpoint(path, kind, folder=folder)


def write_model_folder(folder, model_type, config, state_dict, **info):
    """config.json ({model_type, format, config, **info}) and model.safetensors in `folder` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in state_dict.items()}  # no shared storage
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = dict(model_type=model_type, format=FOLDER_FORMAT, config=config, **info)
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_weights(module, state, source):
    """Load a state dict into `module`; one with other tensor names or shapes is refused in one sentence."""
    own = module.state_dict()
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    problems = [f"{len(names)} {what} (such as {names[0]})" for names, what in
                ((missing, "missing"), (extra, "unknown"), (reshaped, "of another shape")) if names]
    if problems:
        raise CheckpointError(f"The weights of {source} do not fit the model its config describes: "
                              f"{', '.join(problems)} tensors.")
    module.load_state_dict(state)
    return module
