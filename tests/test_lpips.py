"""Our LPIPS computes what the `lpips` package computes, is frozen, and fails clearly without VGG16 weights."""
import os
import subprocess
import sys
import textwrap
import urllib.error

import pytest
import torch

from lpips import LPIPS, SLICES, lpips_available

# Run by a child process outside the repository, so that `import lpips` finds the package and not our module.
PACKAGE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import lpips

    vgg_state, x, y = torch.load(sys.argv[1], weights_only=True)
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # linear heads: the package's own file
    assert lpips.__file__ != {our_file!r}
    # torchvision's features key {{index}}.weight lives at net.slice{{k}}.{{index}}.weight, index unchanged.
    state = {{}}
    for key, value in vgg_state.items():
        index = int(key.split(".")[0])
        k = next(k for k, (start, stop) in enumerate({slices!r}, start=1) if start <= index < stop)
        state[f"slice{{k}}.{{key}}"] = value
    model.net.load_state_dict(state)
    with torch.no_grad():
        torch.save(model(x, y), sys.argv[2])
""")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LPIPS(vgg_weights=None)


@pytest.fixture
def empty_hub(tmp_path):
    """Point torch.hub at an empty folder, as on a machine that never downloaded VGG16."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(old)


def images(seed, shape=(2, 3, 64, 64)):
    """Random images in [-1, 1]."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_matches_lpips_package(model, tmp_path):
    # Our VGG weights as torchvision's `features` state dict: slices.{k}.{index}.weight -> {index}.weight.
    state = model.state_dict()
    vgg_state = {key.split(".", 2)[2]: value for key, value in state.items() if key.startswith("slices.")}
    x, y = images(1), images(2)
    with torch.no_grad():
        expected = model(x, y)
        assert torch.equal(LPIPS(vgg_weights=vgg_state)(x, y), expected)
    torch.save((vgg_state, x, y), tmp_path / "inputs.pt")
    script = tmp_path / "package_lpips.py"
    script.write_text(PACKAGE_SCRIPT.format(slices=SLICES, our_file=os.path.abspath(sys.modules["lpips"].__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, str(script), "inputs.pt", "theirs.pt"],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    assert expected.shape == theirs.shape == (2, 1, 1, 1)
    assert (expected > 0).all()
    torch.testing.assert_close(expected, theirs, atol=1e-5, rtol=1e-5)


def test_missing_imagenet_weights_says_what_to_do(empty_hub, monkeypatch):
    assert not lpips_available()

    def offline(url, *args, **kwargs):  # as on a machine without internet (and never a real download in tests)
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        LPIPS()
    assert "vgg16-397923af.pth" in str(info.value)
    assert os.path.join(torch.hub.get_dir(), "checkpoints") in str(info.value)
    assert "--perceptual-loss-factor 0" in str(info.value)


def test_corrupt_imagenet_weights_says_what_to_do(empty_hub):
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"half a download")
    assert lpips_available()
    with pytest.raises(RuntimeError, match="--perceptual-loss-factor 0"):
        LPIPS()


def test_frozen_and_always_eval(model):
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    model.train()
    assert not model.training and not any(m.training for m in model.modules())


def test_gradient_reaches_input(model):
    x = images(1).requires_grad_()
    model(x, images(2)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_identity_is_zero(model):
    x, y = images(1), images(2)
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(2, 1, 1, 1))
        assert (model(x, y) > 0).all()


def test_fp32_under_autocast(model):
    x, y = images(1), images(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        distance = model(x, y)
    assert distance.dtype == torch.float32 and torch.isfinite(distance).all()
