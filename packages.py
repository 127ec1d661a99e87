"""The Python packages gpu_check.py's steps need: checked at once (the missing ones named in one line), and carried
to a node without a package registry as a folder of wheels (docs/gpu.md); and whether torch.compile can build there."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# The packages the steps import; lpips: the linear heads of bench.py's stage-1 LPIPS.
PACKAGES = ("torchvision", "numpy", "cv2", "PIL", "yaml", "tqdm", "matplotlib", "tensorboard", "albumentations",
            "lpips")
TEST_PACKAGES = ("pytest", "xdist")  # the CUDA tests; pytest.ini's -n needs xdist
# What an offline node with torch and torchvision still lacks: albumentations and lpips with their dependencies
# (each wheel's Requires-Dist), at the versions the suite runs with.
WHEELS = ("albumentations==2.0.8", "albucore==0.0.24", "pydantic==2.13.4", "pydantic-core==2.46.4",
          "annotated-types==0.7.0", "typing-inspection==0.4.2", "typing-extensions==4.16.0", "stringzilla==5.3.2",
          "simsimd==6.5.16", "lpips==0.1.4")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_wheels(folder, python_version):
    """On a connected machine: pip download of WHEELS for an offline node's Python (manylinux x86_64)."""
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS]
    print(" ".join(command), flush=True)
    if subprocess.run(command).returncode:
        raise ValueError(f"pip download failed (above); {folder} may be incomplete.")
    wheels = list(Path(folder).glob("*.whl"))
    print(f"{len(wheels)} wheels, {sum(p.stat().st_size for p in wheels) / 2**20:.1f} MiB in {folder}. On the "
          f"offline node: python gpu_check.py --wheels {folder}")


def install_wheels(folder, site):
    """pip install --no-index of every wheel in `folder` into `site`, which this process and its steps import from."""
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        raise ValueError(f"No wheels in {folder}: prepare them on a connected machine with `python gpu_check.py "
                         f"--download-wheels {folder}`.")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *wheels]
    if subprocess.run(command).returncode:
        raise ValueError(f"Installing the wheels of {folder} failed (above).")
    sys.path.insert(0, str(site))


def missing_packages(skip_tests=False):
    """'name (why)' of each package the steps need that does not import; lpips must also carry its heads' file."""
    missing = []
    for name in PACKAGES + (() if skip_tests else TEST_PACKAGES):
        try:
            if name == "lpips":
                # this project's lpips.py finds the package's file without importing the package; imported here,
                # not at the top, because it needs torchvision, which may be among the missing
                from lpips import heads_path
                heads_path()
            else:
                __import__(name)
        except Exception as error:  # not installed, a dependency missing, the heads' file missing ...
            missing.append(f"{name} ({error})")
    return missing


def missing_compiler():
    """Why torch.compile could not build kernels here (it needs a C compiler and Python's headers), or None."""
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return "no C compiler"
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        return "no Python.h"
    return None
