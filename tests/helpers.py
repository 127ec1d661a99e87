"""The tiny models' configs and flag lists that the tests share (imported as a normal module, not from conftest), and
the one-line error of a script."""
import pytest

from cli import run_script
from presets import TINY_GPT, TINY_VQGAN, as_flags


TINY = TINY_VQGAN  # presets.py: 32x32 images, f=4 (an 8x8 token grid), 64 codes
# The tiny VQGAN in one process on the CPU, without VGG; the tiny GPT likewise.
TINY_FLAGS = [*as_flags(TINY_VQGAN), "--batch-size", "4", "--num-workers", "0", "--perceptual-loss-factor", "0",
              "--device", "cpu", "--log-every", "1"]
STAGE2_FLAGS = [*as_flags(TINY_GPT), "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--log-every", "1"]


def script_error(script, argv, capsys):
    """The one error line (without "error: ") that `python <script>.py *argv` prints on stderr, exiting with 1."""
    with pytest.raises(SystemExit) as stop:
        run_script(script.main, script.build_parser(), list(map(str, argv)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 1 and len(lines) == 1, lines
    return lines[0][len("error: "):]
