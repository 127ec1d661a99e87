"""A fresh clone stays clean: the scripts run with their default flags (tiny sizes and a data folder elsewhere aside)
write only where .gitignore looks away, so `git status` shows nothing new."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from presets import TINY_GPT, TINY_VQGAN, as_flags

REPO = Path(__file__).resolve().parents[1]

# Each script's run in the clone, as a new user would type it after the tiny sizes and the data folder.
RUNS = [["training_vqgan.py", *as_flags(TINY_VQGAN), "--batch-size", "4", "--max-steps", "2",
         "--perceptual-loss-factor", "0"],  # LPIPS would need the VGG16 weights
        ["eval_vqgan.py", "--checkpoint-path", "checkpoints/vqgan_last.pt"],
        ["training_transformer.py", *as_flags(TINY_GPT), "--batch-size", "4", "--max-steps", "2"],
        ["sample_transformer.py", "--num-samples", "2"]]

# One interpreter runs them one after the other, each as `python <script> ...` would (a new import of torch for each
# would take longer than the runs).
DRIVER = """
import json, runpy, sys
for sys.argv in json.loads(sys.argv[1]):
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def git(*args, cwd):
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout


def test_the_scripts_with_default_flags_leave_git_status_clean(flowers, tmp_path):
    try:  # the files a clone of this working tree would have
        files = git("ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=REPO).split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    git("init", "-q", cwd=clone)
    git("add", "-A", cwd=clone)
    git("commit", "-q", "-m", "clone", cwd=clone)
    assert git("status", "--porcelain", cwd=clone) == ""

    runs = [[*run, *(["--dataset-path", str(flowers)] if run[0] != "sample_transformer.py" else [])] for run in RUNS]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=clone, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    written = {path.relative_to(clone).parts[0] for path in clone.rglob("*") if path.is_file()} - \
        {Path(name).parts[0] for name in files if name} - {".git"}
    assert {"checkpoints", "results", "tensorboard", "samples"} <= written  # they did run here
    assert git("status", "--porcelain", "--untracked-files=all", cwd=clone) == ""
