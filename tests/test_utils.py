"""Tests for utils.py, checkpoint.py and the device choice: devices, checkpoints, grids, plots and the metrics log."""
import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import runtime
import utils
from checkpoint import CheckpointError


# ---- devices ----

def test_pick_device(capsys):
    assert runtime.pick_device('cpu') == torch.device('cpu')
    if torch.cuda.is_available():
        assert runtime.pick_device().type == 'cuda'
    else:
        assert runtime.pick_device() == torch.device('cpu')
        assert 'No CUDA device found' in capsys.readouterr().out
        with pytest.raises(ValueError, match='CUDA'):
            runtime.pick_device('cuda')


# ---- checkpoints ----

def test_save_checkpoint_round_trips(tmp_path):
    path = tmp_path / 'new' / 'folder' / 'ckpt.pt'
    state = {'model': {'weight': torch.arange(6.0)}, 'step': 7, 'config': {'lr': 1e-4}}
    checkpoint.save_checkpoint(state, path)
    loaded = checkpoint.load_checkpoint(path)
    assert torch.equal(loaded['model']['weight'], state['model']['weight']) and loaded['step'] == 7
    assert [p.name for p in path.parent.iterdir()] == ['ckpt.pt']


def test_save_checkpoint_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    checkpoint.save_checkpoint({'step': 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        checkpoint.save_checkpoint({'step': 2}, path)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path) == {'step': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pt']


class WritesMarker:
    """Unpickling this runs open(marker, 'w'): the kind of code a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_load_checkpoint_refuses_code_without_trust(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pt'
    torch.save({'step': 1, 'payload': WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match='--trust-checkpoint'):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()
    checkpoint.load_checkpoint(path, trust=True)  # the payload is real: trusting the file runs it
    assert marker.exists()


def test_load_checkpoint_with_trust_and_missing_files(tmp_path):
    path = tmp_path / 'args.pt'
    torch.save({'args': argparse.Namespace(lr=0.1)}, path)  # a plain object weights_only refuses
    with pytest.raises(CheckpointError, match='--trust-checkpoint'):
        checkpoint.load_checkpoint(path)
    assert checkpoint.load_checkpoint(path, trust=True)['args'].lr == 0.1
    with pytest.raises(CheckpointError, match='missing.pt'):
        checkpoint.load_checkpoint(tmp_path / 'missing.pt')
    (tmp_path / 'cut.pt').write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match='cut.pt'):
        checkpoint.load_checkpoint(tmp_path / 'cut.pt')


# ---- images, plots and the metrics log ----

def test_image_grid(tmp_path):
    images = torch.linspace(-2, 2, 4 * 3 * 8 * 8).view(4, 3, 8, 8)
    assert utils.to_image_range(images).min() == 0 and utils.to_image_range(images).max() == 1
    utils.save_image_grid(images, tmp_path / 'grids' / 'grid.png', nrow=2)
    assert Image.open(tmp_path / 'grids' / 'grid.png').size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2-pixel padding


@pytest.mark.parametrize('history', [
    {'loss': [(step, 1 / (step + 1)) for step in range(200)], 'gan': [(0, float('nan')), (5, 0.7), (9, float('inf'))]},
    {'single': [(3, 0.5)], 'constant': [(0, 2.0), (1, 2.0)], 'empty': []},
    {},
    {'all nan': [(0, float('nan')), (1, float('nan'))]},
])
def test_save_plots(tmp_path, history):
    """One panel per kind of quantity, three to a row; NaN, inf, empty and missing series are survived."""
    path = tmp_path / 'plots' / 'loss.png'
    panels = [('losses', ['loss', 'single', 'all nan'], True), ('gan', ['gan', 'constant'], False),
              ('nothing', ['missing', 'empty'], False), ('lr', ['lr'], True)]
    utils.save_plots(history, path, panels, title='losses')
    image = Image.open(path)
    assert image.size == (int(3 * 4.4 * 90), int(2 * 3.2 * 90)) and image.mode in ('RGB', 'RGBA')


def test_metrics_log_resume_and_truncate(tmp_path):
    path = tmp_path / 'run' / 'metrics.jsonl'
    log = utils.MetricsLog(path)
    for step in range(5):
        log.log(step, loss=torch.tensor(1.0 / (step + 1)), lr=np.float32(0.5))
    assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    with open(path, 'a') as f:
        f.write('{"step": 5, "lo')  # a crash in the middle of a line
    resumed = utils.MetricsLog(path, resume=True)
    assert resumed.history['loss'][1] == (1, 0.5) and len(resumed.history['lr']) == 5
    resumed.truncate_after(2)
    resumed.log(3, loss=0.1, lr=0.5)
    assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    assert [step for step, _ in utils.MetricsLog(path, resume=True).history['loss']] == [0, 1, 2, 3]
    assert utils.MetricsLog(path).history == {} and path.read_text() == ''  # a fresh run starts over


def test_save_checkpoint_removes_partial_files_of_killed_saves_only(tmp_path):
    """Of the temporary files beside a checkpoint, those of killed saves go; those another running process (another
    job saving the same token cache) or another host is writing stay."""
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True,
                          check=True)
    host, path = socket.gethostname(), tmp_path / 'ckpt.pt'
    killed = [tmp_path / f'ckpt.pt.{host}-{gone.stdout.strip()}-deadbeef.tmp', tmp_path / 'ckpt.pt.deadbeef.tmp']
    running = [tmp_path / f'ckpt.pt.{host}-{os.getppid()}-cafecafe.tmp', tmp_path / 'ckpt.pt.node-7-1-cafecafe.tmp',
               tmp_path / 'other.pt.cafe.tmp']
    for partial in killed + running:
        partial.write_bytes(b'half a checkpoint')
    checkpoint.save_checkpoint({'step': 1}, path)
    assert [p.exists() for p in killed + running] == [False, False, True, True, True]
    assert checkpoint.load_checkpoint(path)['step'] == 1
