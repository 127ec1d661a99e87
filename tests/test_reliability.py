"""The stage-1 script end to end under trouble: bad files, clean failures, SIGKILL then --resume, a kill while saving,
SIGINT/SIGTERM, a checkpoint carrying code, non-finite losses, config mismatches and weights-only loading.

Most script runs are children of one multiprocessing fork server that imported training_vqgan once: each child runs
the script's `__main__` block as `python training_vqgan.py ...` would, in a process of its own that can be killed,
but starts in a fraction of a second instead of the seconds that importing torch, torchvision and albumentations
takes on a busy CI core. The bad-files run goes through a fresh interpreter, so that path is covered too.
"""
import ast
import json
import multiprocessing
import os
import random
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import loss
import training_vqgan
from checkpoint import CheckpointError, load_checkpoint
from data import find_images
from demo_flowers import make_demo_flowers
from helpers import TINY_FLAGS, script_error
from runtime import STOP_SIGNALS
from vqgan import VQGAN

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_vqgan.py"
BATCHES_PER_EPOCH = 3  # 12 demo images, batches of 4


def script_flags(data, out, *extra):
    return [*TINY_FLAGS, "--dataset-path", str(data), "--out-dir", str(out), *map(str, extra)]


def logged_steps(out):
    """Steps in the run's metrics log; a line cut short by a kill is left out."""
    path = out / "results" / "vqgan_metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps


def inode(path):
    """Changes when save_checkpoint or MetricsLog.truncate_after replaces the file (both write a new file)."""
    return path.stat().st_ino if path.exists() else None


def error_lines(stderr):
    """Lines starting with 'error:'; progress bars redraw with \\r, so that ends a line too."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]


def write_corrupt_files(folder, copies=1):
    """Zero bytes named .jpg, a JPEG cut in half, and text named .png (`copies` of each)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "whole.jpg")
    jpeg = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    paths = []
    for i in range(copies):
        paths += [folder / f"zero_bytes{i}.jpg", folder / f"truncated{i}.jpg", folder / f"text{i}.png"]
        paths[-3].write_bytes(b"")
        paths[-2].write_bytes(jpeg[:len(jpeg) // 2])
        paths[-1].write_text("this is not an image\n")
    return paths


def write_odd_images(folder):
    """Readable images that need converting: grayscale, palette, RGBA, CMYK, 16-bit, and one smaller than the crop."""
    rgb = np.random.default_rng(1).integers(0, 256, (36, 48, 3), dtype=np.uint8)
    alpha = np.random.default_rng(2).integers(0, 256, (36, 48, 1), dtype=np.uint8)
    images = {"gray.png": Image.fromarray(rgb).convert("L"), "palette.png": Image.fromarray(rgb).convert("P"),
              "rgba.png": Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA"),
              "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
              "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),  # 16-bit grayscale
              "tiny.png": Image.fromarray(rgb[:7, :10])}  # 10x7, upscaled to the 32x32 crop
    for name, image in images.items():
        image.save(folder / name)
    modes = {name: Image.open(folder / name).mode for name in images}
    assert modes == {"gray.png": "L", "palette.png": "P", "rgba.png": "RGBA", "cmyk.jpg": "CMYK",
                     "deep.png": "I;16", "tiny.png": "RGB"}  # the files really are what they claim
    return [folder / name for name in images]


# ---- runs of the script in children of a fork server ----

def _become_script(argv, stdout_path, stderr_path):
    """Body of a fork-server child: `python training_vqgan.py *argv`, printing to files."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        with open(path, "ab") as f:
            os.dup2(f.fileno(), fd)
    sys.stdout.reconfigure(line_buffering=True)  # lines printed before a SIGKILL must reach the file
    torch.set_num_threads(1)  # two CI cores, other tests running
    os.chdir(REPO)
    sys.argv = [str(SCRIPT), *argv]
    # SystemExit gives the exit code; an uncaught exception prints its traceback and exits 1, as the interpreter does.
    runpy.run_path(str(SCRIPT), run_name="__main__")


def _become_script_with_slow_steps(argv, stdout_path, stderr_path, marks):
    """Body of a fork-server child: _become_script, each training step taking 5 s more; it writes
    <marks>.start<step> as it begins and <marks>.end<step> as it ends."""
    real_train_step = loss.train_step

    def slow_train_step(stage1, x, step, *args, **kwargs):
        Path(f"{marks}.start{step}").touch()
        time.sleep(5)
        result = real_train_step(stage1, x, step, *args, **kwargs)
        Path(f"{marks}.end{step}").touch()
        return result

    loss.train_step = slow_train_step  # the script imports it from loss when it runs
    _become_script(argv, stdout_path, stderr_path)


def _save_forever(path, first_step):
    """Body of a fork-server child: save checkpoints of changing size to one path, back to back, until killed."""
    torch.set_num_threads(1)
    step = first_step
    while True:
        checkpoint.save_checkpoint({"step": step, "weights": checkpoint_weights(step)}, path)
        step += 1


def checkpoint_weights(step):
    return torch.full((250_000 * (1 + step % 8),), float(step))  # 1 to 8 MB


@pytest.fixture(scope="module")
def fork_server():
    """A multiprocessing context whose children fork from a server that has already imported training_vqgan."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "training_vqgan", "albumentations"])  # data.py imports it lazily
    with pytest.MonkeyPatch.context() as patch:  # the server's environment, read once when it starts
        patch.setenv("OMP_NUM_THREADS", "1")
        paths = [str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]  # for the preload
        patch.setenv("PYTHONPATH", os.pathsep.join(path for path in paths if path))
        warm_up = context.Process(target=time.sleep, args=(0,))
        warm_up.start()
        warm_up.join()
    return context


class ScriptRun:
    """One run of training_vqgan.py in a child of the fork server (body: _become_script, or another with more args)."""

    def __init__(self, fork_server, argv, log_prefix, body=_become_script, *body_args):
        self.stdout_path, self.stderr_path = Path(f"{log_prefix}.out"), Path(f"{log_prefix}.err")
        self.stdout_path.touch()
        self.stderr_path.touch()
        self.proc = fork_server.Process(target=body, args=(list(map(str, argv)), str(self.stdout_path),
                                                           str(self.stderr_path), *body_args))
        self.proc.start()

    def stdout(self):
        return self.stdout_path.read_text(errors="replace")

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout=60):
        """The exit code (-9 after SIGKILL); a run still going after `timeout` seconds fails the test."""
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            pytest.fail(f"The run did not end within {timeout} s. Its stderr ends:\n{self.stderr()[-2000:]}")
        return self.proc.exitcode

    def wait_for(self, condition, what, timeout=60):
        """Poll until `condition()` holds; fail if the run ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.proc.is_alive():
                pytest.fail(f"The run ended (exit {self.proc.exitcode}) before {what}:\n{self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"No {what} after {timeout} s:\n{self.stderr()[-2000:]}")
            time.sleep(0.02)

    def kill(self, signum=signal.SIGKILL):
        os.kill(self.proc.pid, signum)


@pytest.fixture
def script(fork_server, tmp_path):
    """start(argv, name) runs the script in a child, logging to tmp_path/name.out and .err; none outlives the test."""
    runs = []

    def start(argv, name, *body):
        runs.append(ScriptRun(fork_server, argv, tmp_path / name, *body))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.is_alive():
            run.proc.kill()
        run.proc.join()


@pytest.fixture
def train_here():
    """Calls training_vqgan.main in this process on one thread; after each test, its signal handlers must be gone."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on two busy cores, OpenMP threads waiting for each other make tiny steps 40x slower
    yield lambda argv: training_vqgan.main(training_vqgan.build_parser().parse_args(argv))
    torch.set_num_threads(threads)
    # main() puts them back on every way out, errors included (runtime.keeps_signal_handlers)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


# ---- data ----

def test_bad_files_are_skipped_and_named_odd_images_are_converted(tmp_path):
    """A fresh interpreter: 11 good images, 6 that need converting and 3 undecodable ones, over two epochs."""
    data = make_demo_flowers(tmp_path / "data", num_images=11, size=40)
    converted, bad = write_odd_images(data), write_corrupt_files(data)
    assert len(find_images(data)) == 20  # 5 full batches of 4: each epoch reads every file
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), *script_flags(data, out, "--epochs", 2)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = re.split(r"[\r\n]", result.stderr)  # a progress bar redraws with \r
    for path in bad:  # named once, though both epochs met it, in a line of its own that says why
        named = [line for line in lines if str(path) in line]
        assert len(named) == 1 and named[0].startswith(f"Skipping unreadable image '{path}': "), named
    assert not [path for path in converted if str(path) in result.stderr]
    # The project's own line, not a warning of torch's DataLoader (its file and source line).
    assert not [line for line in lines if "Warning" in line or "site-packages" in line or "Traceback" in line]
    # At the end, the count of files, not of reads (two epochs read each bad file twice).
    assert result.stdout.splitlines()[-1] == "Skipped 3 unreadable image file(s) during training (named above)."
    assert load_checkpoint(out / "checkpoints" / "vqgan_last.pt")["step"] == 10  # no batch was lost


def test_batches_with_no_readable_file_are_counted(train_here, tmp_path, capsys):
    """With --batch-size 1 each bad file is a batch of its own, which the loader gives as None."""
    data = make_demo_flowers(tmp_path / "data", num_images=4, size=40)
    write_corrupt_files(data)
    train_here(script_flags(data, tmp_path / "out", "--batch-size", 1, "--max-steps", 8))  # two epochs
    printed = capsys.readouterr()
    assert printed.out.splitlines()[-1].startswith("Skipped 3 unreadable image file(s)")
    assert printed.err.count("Skipping unreadable image") == 3


def failing_setup(case, tmp_path, flowers):
    """(data folder, out dir, extra flags, what the error line must contain) for a run that cannot start."""
    out = tmp_path / "out"
    if case == "missing folder":
        return tmp_path / "nowhere", out, [], [str(tmp_path / "nowhere"), "does not exist"]
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        return tmp_path / "empty", out, [], [str(tmp_path / "empty"), "No image files"]
    if case == "only corrupt files":  # two batches a pass, both unreadable: must stop, not loop
        write_corrupt_files(tmp_path / "corrupt", copies=3)
        return tmp_path / "corrupt", out, [], [str(tmp_path / "corrupt"), "no usable batch"]
    if case == "too few readable files":  # 3 files, but only 1 of them counts towards a batch of 4
        make_demo_flowers(tmp_path / "few", num_images=1, size=40)
        write_corrupt_files(tmp_path / "few")
        (tmp_path / "few" / "text0.png").unlink()
        return tmp_path / "few", out, [], ["1 readable training items (of 3 files)", "--batch-size 4"]
    if case == "out-dir under a file":  # root may write anywhere, but not inside a file
        (tmp_path / "a_file").write_text("")
        return flowers, tmp_path / "a_file" / "out", [], [str(tmp_path / "a_file" / "out"), "--out-dir"]
    if case == "image size":
        return flowers, out, ["--image-size", 30], ["--image-size 30", "downsampling factor 4"]
    if case == "device":
        return flowers, out, ["--device", "gpu0"], ["--device 'gpu0'"]
    raise ValueError(case)


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "only corrupt files", "too few readable files",
                                  "out-dir under a file", "image size", "device"])
def test_a_run_that_cannot_start_ends_with_one_error_line(script, flowers, tmp_path, case):
    data, out, extra, expected = failing_setup(case, tmp_path, flowers)
    run = script(script_flags(data, out, "--max-steps", 1000, *extra), "run")
    assert run.wait(timeout=60) == 1
    stderr = run.stderr()
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].endswith((".", "?")), stderr[-2000:]
    assert all(words in lines[0] for words in expected), lines[0]
    assert not (out / "checkpoints").exists()  # it ended before training


@pytest.mark.parametrize("flag, value", [("--image-size", "-32"), ("--ch-mult", "0"), ("--restart-every", "0"),
                                         ("--codebook-dim", "-3"), ("--max-nonfinite-steps", "0"),
                                         ("--learning-rate", "-1"), ("--learning-rate", "nan"),
                                         ("--device", "gpu0")])
def test_impossible_flag_values_are_rejected_naming_the_flag(train_here, flowers, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    error = script_error(training_vqgan, script_flags(flowers, out, "--max-steps", 1, flag, value), capsys)
    assert error.startswith(flag + " ") and error.endswith(".")  # the last value of a flag wins
    assert not out.exists()  # rejected before anything was written


# ---- kills, signals and checkpoints ----

def test_sigkill_at_random_moments_then_resume_and_sigterm_sigint_save(script, flowers, tmp_path):
    """Three SIGKILLs at random moments, each followed by --resume; then SIGTERM and SIGINT, which save."""
    out = tmp_path / "run"
    ckpt_path, metrics_path = out / "checkpoints" / "vqgan_last.pt", out / "results" / "vqgan_metrics.jsonl"
    flags = script_flags(flowers, out, "--save-every", 2, "--max-steps", 100_000, "--sample-every", 100_000)
    rng = random.Random()
    resumed_from = 0
    for attempt in range(3):
        ckpt_inode = inode(ckpt_path)
        run = script(flags + ["--resume"] * (attempt > 0), f"kill{attempt}")
        if attempt > 0:
            run.wait_for(lambda: f"Resumed from {ckpt_path} at step {resumed_from}." in run.stdout(), "resume")
        run.wait_for(lambda: inode(ckpt_path) != ckpt_inode, "checkpoint of this run")
        delay = rng.uniform(0, 0.5)
        time.sleep(delay)
        run.kill()
        assert run.wait() == -signal.SIGKILL
        ckpt = load_checkpoint(ckpt_path)  # never a half-written file
        last_logged, saved = logged_steps(out)[-1], ckpt["step"]
        last_save = last_logged // 2 * 2
        # The save of `last_save` had finished, or was cut short and left the one before (or the resumed one).
        assert saved in (last_save, max(last_save - 2, resumed_from)) and saved > resumed_from, (delay, last_logged)
        assert ckpt["epoch"] * BATCHES_PER_EPOCH + ckpt["batch_in_epoch"] == saved  # the data position goes along
        resumed_from = saved

    for signum in (signal.SIGTERM, signal.SIGINT):  # only the signal saves: no --save-every step comes up
        metrics_inode = inode(metrics_path)
        run = script(flags + ["--resume", "--save-every", 100_000], signum.name)
        run.wait_for(lambda: inode(metrics_path) != metrics_inode and logged_steps(out)[-1] >= resumed_from + 2,
                     "steps after the resume")
        run.kill(signum)
        assert run.wait() == 128 + signum  # 130, 143: a wrapper can tell an interrupted run from a finished one
        done = logged_steps(out)[-1]
        assert f"Resumed from {ckpt_path} at step {resumed_from}." in run.stdout()
        assert f"Saved {ckpt_path} at step {done} (received {signum.name})." in run.stdout()
        assert "Traceback" not in run.stderr()
        assert load_checkpoint(ckpt_path)["step"] == done > resumed_from
        resumed_from = done

    # Nothing else was lost on the way: a log with no gap or repeat, and the optimizer state went on throughout.
    assert logged_steps(out) == list(range(1, resumed_from + 1))
    assert load_checkpoint(ckpt_path)["opt_vq"]["state"][0]["step"] == resumed_from


def test_ctrl_c_says_at_once_that_the_run_saves_after_the_step_and_a_second_stops_it_unsaved(script, flowers,
                                                                                               tmp_path):
    """Steps of 5 s: the first SIGINT's line comes while its step still runs; a second SIGINT ends the run at once,
    before that step ends, saving nothing."""
    out, marks = tmp_path / "run", tmp_path / "mark"
    run = script(script_flags(flowers, out, "--max-steps", 100, "--save-every", 1000), "sigint",
                 _become_script_with_slow_steps, str(marks))
    run.wait_for(lambda: Path(f"{marks}.start0").exists(), "first step")
    run.kill(signal.SIGINT)
    said = "Ctrl-C (SIGINT) received: saving and stopping after the current step. Press Ctrl-C again to stop at " \
           "once, without saving."
    run.wait_for(lambda: said in run.stderr(), "line on the first Ctrl-C", timeout=4)
    assert not Path(f"{marks}.end0").exists()  # said while the step still runs
    run.kill(signal.SIGINT)
    assert run.wait(timeout=4) == 130
    assert not Path(f"{marks}.end0").exists() and not (out / "checkpoints").exists()  # at once, nothing saved
    stderr = run.stderr()
    assert "Traceback" not in stderr and stderr.count(said) == 1
    assert "Stopped at once: a second SIGINT came before the save; nothing was saved." in stderr


def test_a_kill_while_saving_leaves_the_old_or_the_new_checkpoint(fork_server, tmp_path):
    """A child saves back to back; half the kills come at random, half as soon as a partial file is seen."""
    path = tmp_path / "ckpt.pt"
    rng = random.Random()
    last_step, kills_mid_write = 0, 0
    for kill in range(6):
        saver = fork_server.Process(target=_save_forever, args=(str(path), last_step + 1))
        saver.start()
        try:
            deadline = time.monotonic() + 30
            while inode(path) is None or load_checkpoint(path)["step"] <= last_step:  # wait for this child's first
                assert saver.is_alive() and time.monotonic() < deadline, "the saver did not save"
                time.sleep(0.01)
            if kill % 2:  # inside torch.save, the flush, the fsync or just before the rename
                while not list(tmp_path.glob("ckpt.pt.*.tmp")):
                    assert time.monotonic() < deadline, "no partial file seen"
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, 0.005))
            else:
                time.sleep(rng.uniform(0, 0.2))
        finally:
            saver.kill()
            saver.join()
        ckpt = load_checkpoint(path)
        assert ckpt["step"] > last_step and torch.equal(ckpt["weights"], checkpoint_weights(ckpt["step"]))
        partial = list(tmp_path.glob("ckpt.pt.*.tmp"))  # what a kill inside save_checkpoint leaves behind
        kills_mid_write += bool(partial)
        for leftover in partial:
            leftover.unlink()
        last_step = ckpt["step"]
    assert kills_mid_write > 0  # the test did kill the saver in the middle of writing


class RunsCode:
    """Unpickling this calls open(marker, 'w'): a harmless stand-in for what a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_carrying_code_is_refused_and_never_runs(script, flowers, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "the_payload_ran"
    ckpt_path = out / "checkpoints" / "vqgan_last.pt"
    ckpt_path.parent.mkdir(parents=True)
    torch.save({"model": {}, "step": 5, "config": {}, "payload": RunsCode(marker)}, ckpt_path)
    run = script(script_flags(flowers, out, "--resume", "--max-steps", 2), "resume")
    assert run.wait() == 1
    assert "Traceback" not in run.stderr()
    lines = error_lines(run.stderr())
    assert len(lines) == 1 and "--trust-checkpoint" in lines[0] and str(ckpt_path) in lines[0]
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        VQGAN.from_checkpoint(ckpt_path)
    assert not marker.exists()


def test_resume_with_other_model_flags_names_every_mismatched_field(train_here, flowers, tmp_path):
    out = tmp_path / "run"
    train_here(script_flags(flowers, out, "--max-steps", 1))
    with pytest.raises(CheckpointError) as error:
        train_here(script_flags(flowers, out, "--max-steps", 2, "--resume", "--latent-dim", 8,
                                "--num-codebook-vectors", 32))
    message = str(error.value)
    assert "latent_dim" in message and "num_codebook_vectors" in message
    assert "ch_mult" not in message and "attn_resolutions" not in message  # lists saved as lists still match
    assert load_checkpoint(out / "checkpoints" / "vqgan_last.pt")["step"] == 1


def test_every_torch_load_is_weights_only():
    """Only checkpoint.load_checkpoint may unpickle more, and only when --trust-checkpoint asks it to."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.split()
        files = [REPO / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [path for path in REPO.rglob("*.py") if not any(part.startswith(".") for part in path.parts)]
    allowed = {("checkpoint.py", "not trust")}
    offenders, calls = [], 0
    for path in files:
        if not path.exists():  # deleted but still listed
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.serialization.load"):
                calls += 1
                weights_only = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                name = str(path.relative_to(REPO))
                if weights_only != "True" and (name, weights_only) not in allowed:
                    offenders.append(f"{name}:{node.lineno} weights_only={weights_only}")
    assert calls > 0 and not offenders


# ---- non-finite losses ----

def test_non_finite_losses_skip_the_update_then_stop_keeping_the_last_good_checkpoint(train_here, flowers, tmp_path,
                                                                                      monkeypatch, capsys):
    """Losses 3 and 8-10 are NaN: one skipped step, training goes on, then three in a row stop the run."""
    models, weights = [], {}  # weights[call]: the parameters when reconstruction_losses is called the call-th time
    real_losses = loss.reconstruction_losses

    class RecordedVQGAN(VQGAN):
        def __init__(self, config):
            super().__init__(config)
            models.append(self)

    def losses(x, x_rec, lpips, args):
        call = len(weights) + 1
        weights[call] = {name: p.detach().clone() for name, p in models[0].named_parameters()}
        nll, p_loss = real_losses(x, x_rec, lpips, args)
        return (nll * float("nan") if call in (3, 8, 9, 10) else nll), p_loss

    def same(a, b):
        return all(torch.equal(a[name], b[name]) for name in a)

    monkeypatch.setattr(training_vqgan, "VQGAN", RecordedVQGAN)
    monkeypatch.setattr(loss, "reconstruction_losses", losses)
    out = tmp_path / "run"
    ckpt_path = out / "checkpoints" / "vqgan_last.pt"
    with pytest.raises(FloatingPointError) as error:
        train_here(script_flags(flowers, out, "--save-every", 4, "--max-steps", 50, "--max-nonfinite-steps", 3))
    assert "3 non-finite losses in a row" in str(error.value) and str(ckpt_path) in str(error.value)
    printed = capsys.readouterr().out
    assert "Step 2: non-finite loss, update skipped (1 in a row)." in printed
    assert all(f"Step 6: non-finite loss, update skipped ({k} in a row)." in printed for k in (1, 2, 3))
    assert len(weights) == 10
    assert not same(weights[2], weights[3]) and same(weights[3], weights[4])  # a good step updates, a NaN one not
    final = {name: p.detach() for name, p in models[0].named_parameters()}
    assert same(weights[8], final)  # nor did the three in a row
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # skipped steps are not steps
    ckpt = load_checkpoint(ckpt_path)  # the last good checkpoint: step 4, not overwritten at the crash
    assert ckpt["step"] == 4 and same(weights[6], ckpt["model"])  # call 6 began right after step 4
    assert all(torch.isfinite(value).all() for value in ckpt["model"].values() if value.is_floating_point())


def test_divergence_before_any_save_says_nothing_was_saved(train_here, flowers, tmp_path, monkeypatch):
    def nan_losses(x, x_rec, lpips, args):
        return (x - x_rec).abs().mean() * float("nan"), torch.zeros(())

    monkeypatch.setattr(loss, "reconstruction_losses", nan_losses)
    with pytest.raises(FloatingPointError, match="2 non-finite losses in a row: stopping. Nothing was saved"):
        train_here(script_flags(flowers, tmp_path / "run", "--max-steps", 5, "--max-nonfinite-steps", 2))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("quantizer", ["vq", "ema"])
def test_a_nan_in_the_first_micro_batch_leaves_weights_and_codebook_unchanged(train_here, flowers, tmp_path,
                                                                            monkeypatch, quantizer):
    """--grad-accum 2: the first micro-batch of step 1 is NaN, the second finite. The guard must see the first
    (a guard on the last loss alone applies the NaN gradients: vq's weights turn NaN) and put back what the forward
    changed (the EMA codebook's averages and codes, usage and dead-code counts, the discriminator's BatchNorm)."""
    models, states = [], {}  # states[call]: the whole state when train_step is called the call-th time

    class RecordedVQGAN(VQGAN):
        def __init__(self, config):
            super().__init__(config)
            models.append(self)

    real_train_step = training_vqgan.train_step

    def train_step(stage1, x, step, grad_accum=1):
        call = len(states) + 1
        states[call] = {**{f"vqgan.{k}": v.clone() for k, v in stage1.vqgan.state_dict(keep_vars=True).items()},
                        **{f"disc.{k}": v.clone() for k, v in stage1.disc.state_dict().items()},
                        **{f"buffer.{k}": v.clone() for k, v in stage1.vqgan.named_buffers()},
                        "train_steps": torch.tensor(stage1.vqgan.quantize.train_steps)}
        return real_train_step(stage1, x * float("nan") if call == 3 else x, step, grad_accum)

    monkeypatch.setattr(training_vqgan, "VQGAN", RecordedVQGAN)
    monkeypatch.setattr(training_vqgan, "train_step", train_step)
    train_here(script_flags(flowers, tmp_path / "run", "--max-steps", 3, "--grad-accum", 2, "--disc-start", 0,
                            "--quantizer", quantizer, "--restart-dead-codes", "--restart-every", 1,
                            "--batch-size", 2))
    assert len(states) == 8  # steps 0 and 1 (skipped) and two more good steps, two micro-batches each

    def changed(a, b):
        return sorted(name for name in a if not torch.equal(a[name], b[name]))

    assert changed(states[3], states[5]) == []  # the skipped step left everything as it found it
    moved = changed(states[1], states[3])  # a good step does change weights, codebook and statistics
    assert "vqgan.quantize.embedding.weight" in moved and any(name.endswith(".running_mean") for name in moved)
    assert "buffer.quantize.window_counts" in moved and "train_steps" in moved
    if quantizer == "ema":
        assert {"vqgan.quantize.cluster_size", "vqgan.quantize.embed_avg"} <= set(moved)
    final = models[0].state_dict()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
