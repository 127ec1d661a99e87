"""gpu_check.py: its plan (every command valid, the H200 estimate within 6 minutes), its CPU form end to end, and
what it does with failed, timed-out and skipped steps, missing packages and the wheels of an offline node."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time

import pytest

import bench
import gpu_check
import packages
import sample_transformer
import training_transformer
import training_vqgan
from helpers import script_error

PARSERS = {"training_vqgan.py": training_vqgan.build_parser(), "training_transformer.py":
           training_transformer.build_parser(), "sample_transformer.py": sample_transformer.build_parser(),
           "bench.py": bench.build_parser()}
UNIT_FLOPS = dict.fromkeys(("stage1_per_image", "encode_per_image", "decode_per_image", "stage2_per_token",
                            "forward_per_token"), 1.0)


def flags(argv):
    return gpu_check.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [[], ["--quick", "--device", "cpu"]])
def test_every_planned_command_parses_in_its_script(tmp_path, argv):
    device_type = "cpu" if argv else "cuda"
    steps = gpu_check.plan(flags(argv + ["--device", device_type]), tmp_path, device_type, 2, UNIT_FLOPS, UNIT_FLOPS)
    names = [s.name for s in steps]
    assert names[:4] == ["CUDA-marked tests", "stage 1", "stage 2", "sampling"]
    assert names[-1] == "bench.py sampling (autoregressive), --compile" and sum("torchrun x2" in n for n in names) == 2
    assert len({s.folder for s in steps}) == len(steps)  # a folder of its own each
    for step in steps:
        if "torchrun" in step.name:
            assert step.command[:3] == [sys.executable, "-m", "torch.distributed.run"]
            assert step.command[-2:] == ["--dist-timeout", "1"]  # a hung collective ends the step in a minute
        script = next((c for c in step.command if c.split("/")[-1] in PARSERS), None)
        if script is None:
            assert step.command[1:3] == ["-m", "pytest"] and step.command[-1].endswith("test_cuda.py")
            continue
        parsed = PARSERS[script.split("/")[-1]].parse_args(step.command[step.command.index(script) + 1:])
        if script.endswith("bench.py"):
            assert parsed.skip_window and parsed.in_process and parsed.config == ("quick" if argv else "paper")
            assert parsed.compile == step.name.endswith("--compile")
            assert parsed.skip_maskgit == parsed.compile  # ar against maskgit: in the eager bench.py step only
        for source, _ in step.needs.values():
            assert names.index(source) < names.index(step.name)  # made earlier in the same run


@pytest.fixture(scope="module")
def h200_plan():
    """The dry run of the GPU plan with the wheels, its FLOPs counted for real (on fake tensors)."""
    args = flags(["--dry-run", "--wheels", ".whl"])
    return gpu_check.main(args)


@pytest.mark.xdist_group("h200_plan")
def test_the_gpu_plan_fits_six_minutes_with_start_up_and_wheels(h200_plan, capsys):
    assert all(s.result == "not run" for s in h200_plan)  # nothing dropped at the default budget
    costs = gpu_check.COSTS["cuda"]
    total = costs["count_s"] + costs["wheels_s"] + sum(s.estimate_s for s in h200_plan)
    assert total <= 360
    # bench.py: 8 steps of 16 images and of 32 x 256 tokens; 64 samples of 3 x 256 + 8 tokens and 4 decodes, at the
    # per-item FLOPs bench.py reports for the paper config (docs/speed.md); ar against maskgit: 4 runs at batch 1 and
    # 64, each image one forward over the 256 tokens for ar and 8 + 12 for maskgit, and 2 counted forwards
    bench_step = next(s for s in h200_plan if s.name == "bench.py")
    assert bench_step.flops == pytest.approx(8 * (16 * 1.345e12 + 32 * 256 * 1.906e9) +
                                             64 * (776 * 6.312e8 + 4 * 2.527e11) +
                                             (4 * 65 * 21 + 2) * 256 * 6.312e8, rel=0.01)
    for step in h200_plan:
        assert step.estimate_s == pytest.approx(gpu_check.estimate(step, costs))
        assert step.limit_s == pytest.approx(3 * step.estimate_s + 30)


@pytest.mark.xdist_group("h200_plan")
def test_budget_drops_steps_from_the_end_and_their_dependants(h200_plan):
    steps = [gpu_check.Step(**{k: v for k, v in vars(s).items() if k != "result"}) for s in h200_plan]
    kept = gpu_check.fit_budget(steps, 100, 25)
    assert [s.name for s in kept] == [s.name for s in steps[:len(kept)]] and len(kept) < len(steps)
    assert 25 + sum(s.estimate_s for s in kept) <= 100
    assert all(s.result == "not run: over --budget" for s in steps[len(kept):])
    # a step whose input comes from a dropped step is dropped too
    steps = [gpu_check.Step("a", [], estimate_s=50), gpu_check.Step("b", [], estimate_s=5, needs={"x": ("c", "x")}),
             gpu_check.Step("c", [], estimate_s=50)]
    assert [s.name for s in gpu_check.fit_budget(steps, 60, 0)] == ["a"] and steps[1].result.startswith("not run")


def test_the_cpu_form_runs_and_writes_its_table(tmp_path, capsys):
    """One real step within the budget (stage 1 of the tiny models); the others are rows saying why they did not run."""
    steps = gpu_check.main(flags(["--quick", "--device", "cpu", "--skip-tests", "--skip-compile", "--skip-bench",
                                  "--budget", "35", "--deadline", "600", "--work-dir", str(tmp_path),
                                  "--report-dir", str(tmp_path / "report")]))
    out = capsys.readouterr().out
    assert out.index("| step | start-up s |") < out.index("== stage 1:") < out.index("| step | result |")
    assert [s.result for s in steps] == ["ok"] + ["not run: over --budget"] * 4
    run_dir = next(p for p in tmp_path.iterdir() if p.name != "report")
    assert (run_dir / "01-stage-1" / "checkpoints" / "vqgan_last.pt").is_file()
    table = (tmp_path / "report" / "gpu_check.md").read_text()
    assert re.search(r"\| stage 1 \| ok \| \d+ \| \d+ \| \d+ \|", table)
    assert "| stage 2, torchrun x2, token cache | not run: over --budget | - |" in table
    saved = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert saved["steps"][0]["command"] == steps[0].command
    assert (tmp_path / "report" / "01-stage-1" / "log.txt").is_file()
    assert not (tmp_path / "report" / "01-stage-1" / "checkpoints" / "vqgan_last.pt").exists()  # logs, not weights


def test_failed_timed_out_and_skipped_steps_are_rows_of_the_table(tmp_path, monkeypatch):
    python = sys.executable
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
            "time.sleep(60)']); open('grandchild', 'w').write(str(p.pid)); time.sleep(60)"
    steps = [gpu_check.Step("fails", [python, "-c", "import sys; print('the error'); sys.exit(3)"]),
             gpu_check.Step("hangs", [python, "-c", child]),
             gpu_check.Step("needs fails", [python, "-c", ""], needs={"x": ("fails", "x")}),
             gpu_check.Step("compiles", [python, "-c", ""], compiles=1),
             gpu_check.Step("recompiles", [python, "-c", "print('W torch._dynamo hit config.recompile_limit (8)')"])]
    for i, step in enumerate(steps):
        step.folder = f"{i:02d}"
    by_name = {s.name: s for s in steps}
    monkeypatch.setenv("CC", "no-such-compiler")
    assert packages.missing_compiler() == "no C compiler"
    monkeypatch.setattr(gpu_check, "missing_compiler", lambda: "no C compiler")
    start = time.perf_counter()
    for step in steps:
        gpu_check.run_step(step, tmp_path, dict(os.environ), 3.0, by_name)
    assert time.perf_counter() - start < 30  # the hung step was stopped at its limit
    assert [s.result for s in steps] == ["FAILED (exit 3)", "TIMED OUT after 3 s", "skipped: needs fails",
                                         "skipped: no compiler (no C compiler)",
                                         "RECOMPILED past dynamo's limit, then ran uncompiled (log.txt)"]
    assert "the error" in (tmp_path / "00" / "log.txt").read_text()
    grandchild = int((tmp_path / "01" / "grandchild").read_text())
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{grandchild}") or \
        open(f"/proc/{grandchild}/stat").read().split(") ")[1][0] == "Z"  # the whole group was stopped
    table = gpu_check.report(steps, tmp_path, "header")
    assert "| fails | FAILED (exit 3) |" in table and "| compiles | skipped: no compiler (no C compiler) | - |" in table
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][1]["result"] == "TIMED OUT after 3 s"


def test_missing_packages_are_named_in_one_line_before_any_step(tmp_path, monkeypatch, capsys):
    def no_heads():
        raise FileNotFoundError("no heads")

    monkeypatch.setitem(sys.modules, "albumentations", None)  # `import albumentations` raises ImportError
    monkeypatch.setattr("lpips.heads_path", no_heads)
    error = script_error(gpu_check, ["--quick", "--device", "cpu", "--work-dir", tmp_path], capsys)
    assert re.match(r"Missing packages: albumentations \(.*\), lpips \(no heads\)\. Install them .*docs/gpu\.md",
                    error)
    assert list(next(tmp_path.iterdir()).iterdir()) == []  # no step began


def test_wheels_are_downloaded_for_the_node_and_installed_without_an_index(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(packages.subprocess, "run", lambda command: commands.append(command) or
                        type("Done", (), {"returncode": 0}))
    packages.download_wheels(tmp_path / "whl", "3.12")
    download = commands[-1]
    assert download[1:4] == ["-m", "pip", "download"] and "--no-deps" in download and "--only-binary=:all:" in download
    assert download[download.index("--python-version") + 1] == "3.12" and download[-len(packages.WHEELS):] == \
        list(packages.WHEELS)
    assert [download[i + 1] for i, c in enumerate(download) if c == "--platform"] == list(packages.PLATFORMS)
    (tmp_path / "whl" / "a-1-py3-none-any.whl").parent.mkdir(exist_ok=True)
    (tmp_path / "whl" / "a-1-py3-none-any.whl").write_bytes(b"")
    packages.install_wheels(tmp_path / "whl", tmp_path / "site")
    assert commands[-1][1:] == ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                                str(tmp_path / "site"), str(tmp_path / "whl" / "a-1-py3-none-any.whl")]
    sys.path.remove(str(tmp_path / "site"))


def test_the_wheels_are_every_dependency_the_node_lacks_at_the_installed_versions():
    """albumentations and lpips with their dependencies, as installed here, less what the GPU node already has."""
    node_has = {"numpy", "scipy", "pyyaml", "opencv-python-headless", "torch", "torchvision", "tqdm"}
    wanted, todo = {}, ["albumentations", "lpips"]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in wanted or name in node_has:
            continue
        wanted[name] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" not in requirement and "python_version <" not in requirement:
                todo.append(re.split(r"[ ;<>=!~(\[]", requirement, maxsplit=1)[0])
    assert sorted(f"{n}=={v}" for n, v in wanted.items()) == sorted(packages.WHEELS)


def test_an_interrupted_run_stops_its_step_and_still_writes_the_table(tmp_path, monkeypatch):
    """Ctrl-C reaches gpu_check.py alone (each step runs in a session of its own): it stops the running step's
    process group, and the table is written before the interrupt goes on."""
    started = []

    class CtrlC(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

        def wait(self, timeout=None):
            if timeout not in (None, gpu_check.STOP_GRACE_S):  # the step's own wait: Ctrl-C comes in
                raise KeyboardInterrupt
            return super().wait(timeout)

    monkeypatch.setattr(gpu_check, "config_flops", lambda *args, **kwargs: UNIT_FLOPS)  # nothing to count here
    monkeypatch.setattr(subprocess, "Popen", CtrlC)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(flags(["--quick", "--device", "cpu", "--skip-tests", "--skip-compile", "--skip-bench",
                              "--work-dir", str(tmp_path)]))
    assert len(started) == 1 and started[0].poll() is not None  # the step's process is gone
    table = next(tmp_path.iterdir()).joinpath("gpu_check.md").read_text()
    assert "| stage 1 | stopped: gpu_check.py was interrupted |" in table and "| stage 2 | not run |" in table
