"""One command that proves the scripts on a GPU machine within a fixed time (under 7 minutes), and prints one table.

    python gpu_check.py                              # on a machine with a CUDA GPU
    python gpu_check.py --wheels .whl                # the same, installing the wheel folder below first
    python gpu_check.py --quick --device cpu         # its CPU form: the tests' tiny models, 2 gloo processes
    python gpu_check.py --download-wheels .whl       # on a connected machine: the packages an offline node lacks

First it checks that every package its steps import is there (the missing ones named in one line). Then it prints
its plan: each step's estimate, derived from the FLOPs bench.py counts (on fake tensors, nothing computed) at a
stated throughput plus stated allowances for start-up, compiling and kernel launches. Steps are dropped from the end
of the plan (the least needed) until the estimate fits --budget. Each step runs as its own process group in a fresh
folder, with its own time limit and, under torchrun, a one-minute --dist-timeout; no step starts after the deadline
(--budget plus a sixth). The table, gpu_check.md and gpu_check.json, is written even when steps fail. docs/gpu.md.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import CONFIGS, DEFAULT_SIZES, config_flops, markdown_table
from cli import ScriptParser, run_script
from demo_flowers import make_demo_flowers
from presets import TINY_GPT, TINY_VQGAN, as_flags
from vqgan import VQGANConfig

ROOT = Path(__file__).resolve().parent
# What a step costs besides its FLOPs, by device type. The table puts each step's seconds beside its estimate: the
# first GPU run corrects these.
COSTS = {
    "cuda": dict(flops_per_s=0.4 * 788e12,  # 40% of the bf16 matmul rate measured on this project's H200: 788 TFLOP/s
                 start_s=8.0,  # a Python process: torch and the scripts imported, the CUDA context, models, saves
                 compile_s=30.0,  # one torch.compile'd model (forward and backward), cold cache, 16 cores
                 torchrun_s=8.0,  # torchrun's own process, the rendezvous and the process group
                 launch_s=10e-6),  # one kernel launched from Python (eager sampling: a few hundred per token)
    "cpu": dict(flops_per_s=0.1e12,  # a third of the 250-300 GFLOP/s of fp32 convolutions on 2 idle cores: shared
                start_s=6.0, compile_s=40.0, torchrun_s=6.0, launch_s=20e-6),
}
LAUNCHES_PER_LAYER, LAUNCHES_PER_TOKEN = 20, 10  # an eager GPT layer for one token; the sampling of the token
# The steps' models. On a GPU: big enough for real kernels (64x64 images, f=8, 256 codes; a 4-layer GPT 256 wide),
# small enough to compile in seconds (bench.py measures the paper config). The CPU form: presets.py's tiny ones.
SIZES = {
    "full": dict(vqgan=dict(image_size=64, ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
                            z_channels=64, latent_dim=64, num_codebook_vectors=256),
                 gpt=dict(n_layer=4, n_head=4, n_embd=256), batch_size=8, bench="paper"),
    "quick": dict(vqgan=TINY_VQGAN, gpt=TINY_GPT, batch_size=2, bench="quick"),
}
RESERVE_S, STOP_GRACE_S = 10.0, 5.0  # kept before the deadline: to stop a step that ran out of time, and the table
SAMPLES, SAMPLE_BATCH = 10, 6  # two batches, the last one smaller (the compiled sampler pads it)
# bench.py's sampling section, compiled, once per sampling objective: bench.py's flags, and how many token positions
# a sampled image runs through the GPT (issue 25: a second objective adds its line).
SAMPLING_OBJECTIVES = {"autoregressive": ([], lambda tokens: tokens)}
# The packages the steps import (module: what for); lpips: its linear heads, for bench.py's stage-1 LPIPS.
PACKAGES = {"torchvision": "models, images", "numpy": "data", "PIL": "images", "yaml": "configs", "tqdm": "bars",
            "matplotlib": "plots", "tensorboard": "logs", "albumentations": "image folders", "lpips": "LPIPS heads"}
TEST_PACKAGES = {"pytest": "the CUDA tests", "xdist": "pytest.ini's -n"}
# The wheels an offline node with torch and torchvision still needs: albumentations and lpips with their dependencies
# (each Requires-Dist read from the wheel), at the versions the suite runs with.
WHEELS = ("albumentations==2.0.8", "albucore==0.0.24", "pydantic==2.13.4", "pydantic-core==2.46.4",
          "annotated-types==0.7.0", "typing-inspection==0.4.2", "typing-extensions==4.16.0", "stringzilla==5.3.2",
          "simsimd==6.5.16", "lpips==0.1.4")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass
class Step:
    """One command of the plan, what its estimate is made of, and (once run) its outcome."""
    name: str
    command: list
    processes: int = 1  # Python processes started one after another (each pays the start-up)
    torchrun: bool = False
    compiles: int = 0  # models compiled by torch.compile
    flops: float = 0.0  # counted FLOPs of its work
    launches: int = 0  # kernels launched one by one from Python
    other_s: float = 0.0  # what none of the above covers, said in `why`
    needs: dict = field(default_factory=dict)  # file name in this step's inputs/ -> (step, path in its folder)
    why: str = ""
    folder: str = ""
    estimate_s: float = 0.0
    limit_s: float = 0.0
    result: str = "not run"
    seconds: float = 0.0


# ---- the plan ----

def per_token_launches(n_layer, compiled, device_type):
    """Kernels launched per sampled token: every layer's eager ones, or on CUDA one graph replay."""
    return LAUNCHES_PER_TOKEN + (0 if compiled and device_type == "cuda" else n_layer * LAUNCHES_PER_LAYER)


def plan(args, run_dir, device_type, gpus, flops, bench_flops):
    """Every step, in the order they run, which is also the order they are kept in when the budget is short."""
    size = SIZES["quick" if args.quick else "full"]
    python, device = sys.executable, ["--device", args.device]
    vq = VQGANConfig(**size["vqgan"])
    tokens = (vq.image_size // vq.downsample_factor) ** 2
    s1_flags, s2_flags = as_flags(size["vqgan"]), as_flags({**size["gpt"], "block_size": tokens})
    n_layer, batch, steps = size["gpt"]["n_layer"], size["batch_size"], args.steps
    common = ["--dataset-path", str(run_dir / "flowers"), "--num-workers", "2", "--max-steps", str(steps),
              "--log-every", "1", "--sample-every", str(steps), "--batch-size", str(batch), *device]
    stage1 = [*s1_flags, "--perceptual-loss-factor", "0", "--disc-start", "2", *common]  # LPIPS needs VGG weights
    stage2 = [*s2_flags, "--val-batches", "2", *common, "--checkpoint-path", "inputs/vqgan_last.pt"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    sample = [python, str(ROOT / "sample_transformer.py"), "--checkpoint-path", "inputs/transformer_last.pt",
              "--num-samples", str(SAMPLES), "--batch-size", str(SAMPLE_BATCH), "--out-dir", "samples", *device]
    batches = -(-SAMPLES // SAMPLE_BATCH)
    s1_flops = flops["stage1_per_image"] * batch * steps
    # stage 2: encode and train per step; at the end the grid's completion and sample of 4 images, and validation
    grid_flops = 4 * (2 * tokens * flops["forward_per_token"] + 3 * flops["decode_per_image"])
    s2_flops = (flops["encode_per_image"] + tokens * flops["stage2_per_token"]) * batch * (steps + 2) + grid_flops
    s2_launches = 2 * tokens * per_token_launches(n_layer, False, device_type)
    sampling_flops = SAMPLES * (tokens * flops["forward_per_token"] + flops["decode_per_image"])
    vqgan_ckpt, gpt_ckpt = ("stage 1", "checkpoints/vqgan_last.pt"), ("stage 2", "checkpoints/transformer_last.pt")

    def sampling(compiled):
        launches = batches * tokens * per_token_launches(n_layer, compiled, device_type)
        return dict(flops=sampling_flops, launches=launches, needs={"transformer_last.pt": gpt_ckpt})

    steps_ = [
        Step("CUDA-marked tests", [python, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                                   str(ROOT / "tests" / "test_cuda.py")],
             other_s=10.0, why="10 s: 9 tiny tests, one a bench.py section"),
        Step("stage 1", [python, str(ROOT / "training_vqgan.py"), *stage1], flops=s1_flops),
        Step("stage 2", [python, str(ROOT / "training_transformer.py"), *stage2], flops=s2_flops,
             launches=s2_launches, needs={"vqgan_last.pt": vqgan_ckpt}),
        Step("sampling", sample, **sampling(False)),
        Step(f"stage 1, torchrun x{gpus}", [*torchrun, str(ROOT / "training_vqgan.py"), *stage1,
                                            "--dist-timeout", "1"], torchrun=True, flops=s1_flops * gpus),
        Step(f"stage 2, torchrun x{gpus}, token cache",
             [*torchrun, str(ROOT / "training_transformer.py"), *stage2, "--precompute-tokens", "--dist-timeout", "1"],
             torchrun=True, flops=s2_flops * gpus, launches=s2_launches,
             needs={"vqgan_last.pt": (f"stage 1, torchrun x{gpus}", vqgan_ckpt[1])}),
    ]
    if not args.skip_bench:
        steps_.append(bench_step(args, device_type, bench_flops))
    if not args.skip_compile:
        steps_ += [
            Step("stage 1, --compile", [python, str(ROOT / "training_vqgan.py"), *stage1, "--compile"],
                 compiles=2, flops=s1_flops),
            Step("stage 2, --compile", [python, str(ROOT / "training_transformer.py"), *stage2, "--compile"],
                 compiles=1, flops=s2_flops, launches=s2_launches, needs={"vqgan_last.pt": vqgan_ckpt}),
            Step("sampling, --compile", sample + ["--compile"], compiles=1, **sampling(True)),
        ]
    if not args.skip_bench and not args.skip_compile:
        steps_ += [bench_step(args, device_type, bench_flops, objective) for objective in SAMPLING_OBJECTIVES]
    if args.skip_tests:
        steps_ = steps_[1:]
    for i, step in enumerate(steps_):
        step.folder = f"{i + 1:02d}-" + "".join(c if c.isalnum() else "-" for c in step.name.lower()).strip("-")
    return steps_


def bench_step(args, device_type, flops, objective=None):
    """bench.py on its config, in one process: stage 1, stage 2 and sampling; or, compiled, sampling alone (with one
    sampling objective). Never its sliding-window section (a minute per canvas at the paper size)."""
    config = SIZES["quick" if args.quick else "full"]["bench"]
    sizes, grid = DEFAULT_SIZES[device_type], VQGANConfig(**CONFIGS[config]["vqgan"])
    tokens = (grid.image_size // grid.downsample_factor) ** 2
    n_layer = CONFIGS[config]["gpt"]["n_layer"]
    command = [sys.executable, str(ROOT / "bench.py"), "--config", config, "--device", args.device, "--skip-window",
               "--in-process", "--out-json", "bench.json"]
    warmup, steps, runs = 2, 5, sizes["sample_runs"]  # bench.py's defaults
    if args.quick:
        steps = 1
        command += ["--steps", "1"]
    flags, positions = SAMPLING_OBJECTIVES.get(objective, ([], lambda t: t))
    sampled = sizes["sample_batch_size"] * (positions(tokens) * runs + 8)  # + the 8-token warm-up
    sampling_flops = sampled * flops["forward_per_token"] + sizes["sample_batch_size"] * (runs + 1) * \
        flops["decode_per_image"]
    compiled = objective is not None
    launches = (positions(tokens) * runs + 8) * per_token_launches(n_layer, compiled, device_type)
    if compiled:
        return Step(f"bench.py sampling ({objective}), --compile",
                    command + ["--compile", "--skip-stage1", "--skip-stage2", *flags],
                    compiles=n_layer // 8 or 1, flops=sampling_flops, launches=launches,
                    why=f"one compile per 8 layers unrolled ({n_layer})")
    counted = warmup + steps  # the first warm-up step also counts the FLOPs (eagerly): about one step more
    return Step("bench.py", command, flops=sampling_flops + counted * (
        sizes["batch_size"] * flops["stage1_per_image"] + sizes["gpt_batch_size"] * tokens * flops["stage2_per_token"]),
        launches=launches)


def estimate(step, costs):
    """Seconds: start-ups, torchrun, compiles, FLOPs at the stated rate, launches, and what else the step says."""
    return (step.processes * costs["start_s"] + step.torchrun * costs["torchrun_s"] + step.compiles *
            costs["compile_s"] + step.flops / costs["flops_per_s"] + step.launches * costs["launch_s"] + step.other_s)


def fit_budget(steps, budget_s, spent_s):
    """Drop steps from the end (with the steps that need them) until spent_s + the estimates fit budget_s."""
    kept = list(steps)
    while kept and spent_s + sum(s.estimate_s for s in kept) > budget_s:
        kept.pop().result = "not run: over --budget"
    names = {s.name for s in kept}
    for step in kept:
        if any(source not in names for source, _ in step.needs.values()):
            step.result = "not run: over --budget"
    return [s for s in kept if s.result == "not run"]


def print_plan(steps, costs, spent_s, budget_s, deadline_s):
    print(f"Estimates: FLOPs counted by bench.py at {costs['flops_per_s'] / 1e12:.0f} TFLOP/s, plus "
          f"{costs['start_s']:.0f} s per process start, {costs['torchrun_s']:.0f} s per torchrun, "
          f"{costs['compile_s']:.0f} s per compiled model, {1e6 * costs['launch_s']:.0f} us per kernel launched "
          f"from Python ({LAUNCHES_PER_LAYER} per GPT layer and {LAUNCHES_PER_TOKEN} per sampled token).")
    print("| step | start-up s | compiles | GFLOP | compute s | launches s | other s | estimate s | limit s |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in steps:
        start = s.processes * costs["start_s"] + s.torchrun * costs["torchrun_s"]
        print(f"| {s.name} | {start:.0f} | {s.compiles} | {s.flops / 1e9:,.0f} | {s.flops / costs['flops_per_s']:.1f} "
              f"| {s.launches * costs['launch_s']:.1f} | {s.other_s:.0f}{f' ({s.why})' if s.why else ''} | "
              f"{s.estimate_s:.0f} | {s.limit_s:.0f} |")
    total = spent_s + sum(s.estimate_s for s in steps)
    print(f"Total: {spent_s:.0f} s spent before the first step (wheels, package check, FLOP counting, data) + "
          f"{total - spent_s:.0f} s of steps = {total:.0f} s estimated, within the --budget of {budget_s:.0f} s; "
          f"no step starts after {deadline_s:.0f} s.", flush=True)


# ---- before any step: wheels, packages, compiler ----

def download_wheels(folder, python_version):
    """On a connected machine: pip download of WHEELS for an offline node's Python (manylinux x86_64)."""
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS]
    print(" ".join(command), flush=True)
    if subprocess.run(command).returncode:
        raise ValueError(f"pip download failed (above); the folder {folder} may be incomplete.")
    size = sum(p.stat().st_size for p in Path(folder).glob("*.whl"))
    print(f"{len(list(Path(folder).glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {folder}. On the GPU node: "
          f"python gpu_check.py --wheels {folder}")


def install_wheels(folder, site):
    """pip install --no-index of every wheel in `folder` into `site`, which this process and its steps then import."""
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        raise ValueError(f"No wheels in {folder}: prepare them with `python gpu_check.py --download-wheels {folder}` "
                         f"on a connected machine.")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *wheels]
    if subprocess.run(command).returncode:
        raise ValueError(f"Installing the wheels of {folder} failed (above).")
    sys.path.insert(0, str(site))


def missing_packages(needed):
    """'name (why it fails)' of each needed package that does not import; lpips must also carry its heads file."""
    missing = []
    for name in needed:
        try:
            if name == "lpips":
                from lpips import heads_path  # this project's lpips.py: finds the package's file without importing it
                heads_path()
            else:
                __import__(name)
        except Exception as error:  # ImportError, a broken dependency, the heads file missing ...
            missing.append(f"{name} ({error})")
    return missing


def missing_compiler():
    """Why torch.compile cannot build kernels here (a C compiler and Python's headers are needed), or None."""
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return "no C compiler"
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        return "no Python.h"
    return None


# ---- running ----

def link_inputs(step, run_dir, by_name):
    """Link (else copy) into the step's inputs/ the files it needs from this run's steps; the name of a step that
    did not make them, or None."""
    for name, (source, path) in step.needs.items():
        made_by = by_name[source]
        if made_by.result != "ok":
            return source
        src, dst = run_dir / made_by.folder / path, run_dir / step.folder / "inputs" / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return None


def run_step(step, run_dir, env, timeout_s, by_name):
    """Run one step in its fresh folder as its own process group, its output in log.txt. On the time limit the whole
    group is stopped (torchrun's workers and the loaders' too, which subprocess.run's timeout would leave)."""
    folder = run_dir / step.folder
    (folder / "inputs").mkdir(parents=True)
    missing = link_inputs(step, run_dir, by_name)
    if missing:
        step.result = f"skipped: needs {missing}"
        return
    if step.compiles and missing_compiler():
        step.result = f"skipped: no compiler ({missing_compiler()})"
        return
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(step.command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            step.result = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            stop_group(proc)
            step.result = f"TIMED OUT after {timeout_s:.0f} s"
    step.seconds = time.perf_counter() - start


def stop_group(proc):
    """SIGTERM to the process group (the training scripts save and exit), then SIGKILL to whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def log_tail(path, lines=15):
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ---- the table ----

def report(steps, run_dir, header):
    """The markdown table (each step's outcome, seconds, estimate and limit, then the figures of each bench.py step)
    and the same as JSON, in the run's folder."""
    rows = [header, "", "| step | result | seconds | estimate s | limit s |", "| --- | --- | ---: | ---: | ---: |"]
    rows += [f"| {s.name} | {s.result} | {f'{s.seconds:.0f}' if s.seconds else '-'} | {s.estimate_s:.0f} | "
             f"{s.limit_s:.0f} |" for s in steps]
    bench = {}
    for s in steps:
        path = run_dir / s.folder / "bench.json"
        if s.name.startswith("bench.py") and s.result == "ok" and path.exists():
            bench[s.name] = json.loads(path.read_text())
            rows += ["", f"{s.name} ({bench[s.name]['device_name']}, {bench[s.name]['precision']}):", "",
                     markdown_table(bench[s.name])]
    table = "\n".join(rows)
    (run_dir / "gpu_check.md").write_text(table + "\n")
    (run_dir / "gpu_check.json").write_text(json.dumps(
        {"header": header, "steps": [asdict(s) for s in steps], "bench": bench}, indent=2, default=str) + "\n")
    return table


# ---- main ----

def main(args):
    """Plan, run and report; the steps (each with its result) are returned."""
    clock = time.perf_counter()
    if args.download_wheels:
        download_wheels(args.download_wheels, args.python_version)
        return []
    if args.budget <= 0:
        raise ValueError(f"--budget must be positive, got {args.budget}.")
    run_dir = Path(args.work_dir) / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    run_dir.mkdir(parents=True)  # fresh: no step ever reads an earlier run's outputs
    if args.wheels:
        install_wheels(args.wheels, run_dir / "site")
    missing = missing_packages({**PACKAGES, **({} if args.skip_tests else TEST_PACKAGES)})
    if missing:
        raise ValueError(f"Missing packages: {', '.join(missing)}. Install them (pip install -r requirements.txt) "
                         f"or, without a package registry, from a wheel folder (docs/gpu.md).")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.device is None or (args.device.startswith("cuda") and not torch.cuda.is_available()):
        raise ValueError("No CUDA device here: run the CPU form, `python gpu_check.py --quick --device cpu`.")
    device_type = torch.device(args.device).type
    gpus = args.nproc or (torch.cuda.device_count() if device_type == "cuda" else 2)
    costs, size = COSTS[device_type], SIZES["quick" if args.quick else "full"]
    flops = config_flops(VQGANConfig(**size["vqgan"]), size["gpt"], perceptual=False)
    bench = CONFIGS[size["bench"]]
    bench_flops = config_flops(VQGANConfig(**bench["vqgan"]), bench["gpt"]) if not args.skip_bench else None
    make_demo_flowers(run_dir / "flowers", num_images=64, size=size["vqgan"]["image_size"] + 16)
    steps = plan(args, run_dir, device_type, gpus, flops, bench_flops)
    for step in steps:
        step.estimate_s = estimate(step, costs)
        step.limit_s = 2 * step.estimate_s + 30
    deadline_s, spent_s = args.budget * 7 / 6, time.perf_counter() - clock
    to_run = fit_budget(steps, args.budget, spent_s)
    print_plan(to_run, costs, spent_s, args.budget, deadline_s)

    paths = [str(run_dir / "site")] if args.wheels else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [*paths, str(ROOT), os.environ.get("PYTHONPATH")] if p))
    if device_type == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # two gloo processes share the cores
    by_name = {step.name: step for step in steps}
    for step in to_run:
        left = deadline_s - RESERVE_S - (time.perf_counter() - clock)
        if left <= 0:
            step.result = "not run: out of time"
            continue
        print(f"== {step.name}: {' '.join(step.command)}", flush=True)
        run_step(step, run_dir, env, min(step.limit_s, left), by_name)
        print(f"   {step.result}" + (f" in {step.seconds:.0f} s (estimate {step.estimate_s:.0f} s)" if step.seconds
                                      else ""), flush=True)
        if step.result.startswith(("FAILED", "TIMED OUT")):
            print(log_tail(run_dir / step.folder / "log.txt"), flush=True)
    name = torch.cuda.get_device_name() if device_type == "cuda" else "CPU"
    header = (f"gpu_check.py on {name} ({gpus} x {args.device}), torch {torch.__version__}, "
              f"{datetime.now(timezone.utc):%Y-%m-%d}: {time.perf_counter() - clock:.0f} s in all, "
              f"{spent_s + sum(s.estimate_s for s in to_run):.0f} s estimated")
    table = report(steps, run_dir, header)
    print(f"\n{table}\n\nWrote {run_dir / 'gpu_check.md'} and gpu_check.json; each step's output is in its "
          f"folder's log.txt.")
    if args.report_dir:
        shutil.copytree(run_dir, args.report_dir, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if not (n.endswith((".md", ".json", ".txt"))
                                                                                or (Path(folder) / n).is_dir())])
    return steps


def build_parser():
    p = ScriptParser("Run every GPU path of the scripts once, within a time budget, and print one table.")
    a = p.add_argument
    a("--device", default=None, help="passed to every step (default: cuda; the CPU form needs --device cpu)")
    a("--quick", action="store_true", help="the tests' tiny models at 32x32 and bench.py's quick config: the CPU form")
    a("--steps", type=int, default=5, help="optimizer steps of each training run")
    a("--nproc", type=int, default=None, help="processes under torchrun (default: every GPU; 2 on the CPU)")
    a("--budget", type=float, default=360.0,
      help="seconds the plan's estimate must fit (steps are dropped from the end until it does); no step starts "
           "after the budget plus a sixth")
    a("--work-dir", default="runs/gpu_check", help="each run makes a fresh folder of its own in here")
    a("--report-dir", default=None, help="also copy the table and every step's log.txt here (e.g. a results folder)")
    a("--wheels", default=None, help="first pip install --no-index the wheels of this folder (an offline node)")
    a("--download-wheels", default=None, metavar="DIR",
      help="only download, into DIR, the wheels an offline node needs (on a connected machine), then stop")
    a("--python-version", default="3.12", help="with --download-wheels: the offline node's Python version")
    a("--skip-tests", action="store_true", help="do not run the CUDA-marked tests")
    a("--skip-compile", action="store_true", help="do not run the --compile steps")
    a("--skip-bench", action="store_true", help="do not run bench.py")
    return p


if __name__ == "__main__":
    outcome = run_script(main, build_parser())
    sys.exit(0 if all(not s.result.startswith(("FAILED", "TIMED OUT")) for s in outcome) else 1)
