"""One command that proves the scripts on a GPU machine in under 7 minutes, and prints one table (docs/gpu.md).

    python gpu_check.py                              # on a machine with a CUDA GPU
    python gpu_check.py --wheels .whl                # the same, installing an offline node's wheel folder first
    python gpu_check.py --dry-run                    # only the plan and its estimates (any machine)
    python gpu_check.py --quick --device cpu         # its CPU form: presets.py's tiny models, 2 gloo processes
    python gpu_check.py --download-wheels .whl       # on a connected machine: the wheels an offline node lacks

It checks first that every package its steps import is there, naming the missing ones in one line. Then it prints
its plan: each step's estimate, derived from the FLOPs bench.py counts (on fake tensors) at a stated throughput plus
stated allowances for start-up, compiling and kernel launches; steps are dropped from the end of the plan (the least
needed) until the estimate fits --budget. Each step runs as its own process group in a fresh folder, with its own
time limit and, under torchrun, a one-minute --dist-timeout; no step starts after --deadline. The table
(gpu_check.md and gpu_check.json) is written even when steps fail.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import CONFIGS, DEFAULT_SIZES, MASKGIT_STEPS, config_flops, markdown_table
from cli import ScriptParser, run_script
from demo_flowers import make_demo_flowers
from packages import download_wheels, install_wheels, missing_compiler, missing_packages
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
                 launch_s=10e-6,  # one kernel launched from Python (eager sampling: a few hundred per token)
                 count_s=10.0,  # this script's start: imports, the package check, counting FLOPs, drawing the data
                 wheels_s=15.0),  # --wheels: pip install --no-index of about 10 wheels
    # the project's 2 shared cores: fp32 convolutions at 250-300 GFLOP/s when idle, a third of that shared
    "cpu": dict(flops_per_s=0.1e12, start_s=10.0, compile_s=60.0, torchrun_s=10.0, launch_s=20e-6, count_s=20.0,
                wheels_s=15.0),
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
SAMPLES, SAMPLE_BATCH = 10, 6  # two batches, the last one smaller (the compiled sampler pads it)
# bench.py's sampling section, compiled, once per sampling objective whose sampling compiles: its bench.py flags,
# and how many token positions one sampled image runs through the GPT (maskgit's sampling is not compiled).
SAMPLING_OBJECTIVES = {"autoregressive": ([], lambda tokens: tokens)}
RECOMPILE_LIMIT = "hit config.recompile_limit"  # dynamo's warning when it gives up compiling a function
FAILURES = ("FAILED", "TIMED OUT", "RECOMPILED")  # results that make the exit code 1
RESERVE_S, STOP_GRACE_S = 10.0, 5.0  # kept before the deadline: to stop a step that ran out of time, and the table


@dataclass
class Step:
    """One command of the plan, what its estimate is made of, and (once run) its outcome."""
    name: str
    command: list
    torchrun: bool = False
    compiles: int = 0  # compile allowances: models compiled by torch.compile
    flops: float = 0.0  # counted FLOPs of its work (of one rank under torchrun)
    launches: int = 0  # kernels launched one by one from Python
    other_s: float = 0.0  # what none of the above covers
    needs: dict = field(default_factory=dict)  # file name in its inputs/ -> (step, path in that step's folder)
    folder: str = ""
    estimate_s: float = 0.0
    limit_s: float = 0.0
    result: str = "not run"
    seconds: float = 0.0


# ---- the plan ----

def per_token_launches(n_layer, compiled, device_type):
    """Kernels launched per sampled token: every layer's, or on CUDA one graph replay (compiled)."""
    return LAUNCHES_PER_TOKEN + (0 if compiled and device_type == "cuda" else n_layer * LAUNCHES_PER_LAYER)


def plan(args, run_dir, device_type, gpus, flops, bench_flops):
    """Every step, in the order they run, which is also the order they are kept in when the budget is short."""
    size = SIZES["quick" if args.quick else "full"]
    python, device = sys.executable, ["--device", args.device]
    vq = VQGANConfig(**size["vqgan"])
    tokens = (vq.image_size // vq.downsample_factor) ** 2
    n_layer, batch, steps = size["gpt"]["n_layer"], size["batch_size"], args.steps
    common = ["--dataset-path", str(run_dir / "flowers"), "--num-workers", "2", "--max-steps", str(steps),
              "--log-every", "1", "--sample-every", str(steps), "--batch-size", str(batch), *device]
    stage1 = [python, str(ROOT / "training_vqgan.py"), *as_flags(size["vqgan"]), "--perceptual-loss-factor", "0",
              "--disc-start", "2", *common]  # no LPIPS: its VGG16 weights would be a download
    stage2 = [python, str(ROOT / "training_transformer.py"), *as_flags({**size["gpt"], "block_size": tokens}),
              "--val-batches", "2", *common, "--checkpoint-path", "inputs/vqgan_last.pt"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    sample = [python, str(ROOT / "sample_transformer.py"), "--checkpoint-path", "inputs/transformer_last.pt",
              "--num-samples", str(SAMPLES), "--batch-size", str(SAMPLE_BATCH), "--out-dir", "samples", *device]
    s1 = dict(flops=flops["stage1_per_image"] * batch * steps)
    # stage 2: encode and train per step, validation, and the grid's completions and samples of 4 images at the end
    s2 = dict(flops=(flops["encode_per_image"] + tokens * flops["stage2_per_token"]) * batch * (steps + 2) + 4 * (
        2 * tokens * flops["forward_per_token"] + 3 * flops["decode_per_image"]),
        launches=2 * tokens * per_token_launches(n_layer, False, device_type),
        needs={"vqgan_last.pt": ("stage 1", "checkpoints/vqgan_last.pt")})

    def sampling(compiled):
        batches = -(-SAMPLES // SAMPLE_BATCH)
        return dict(flops=SAMPLES * (tokens * flops["forward_per_token"] + flops["decode_per_image"]),
                    launches=batches * tokens * per_token_launches(n_layer, compiled, device_type),
                    needs={"transformer_last.pt": ("stage 2", "checkpoints/transformer_last.pt")})

    ddp = f"stage 1, torchrun x{gpus}"
    steps_ = [] if args.skip_tests else [
        Step("CUDA-marked tests", [python, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                                   str(ROOT / "tests" / "test_cuda.py")], other_s=10.0)]  # 10 tiny tests
    steps_ += [
        Step("stage 1", stage1, **s1),
        Step("stage 2", stage2, **s2),
        Step("sampling", sample, **sampling(False)),
        # the ranks work side by side: a step's time is one rank's FLOPs
        Step(ddp, [*torchrun, *stage1[1:], "--dist-timeout", "1"], torchrun=True, **s1),
        Step(f"stage 2, torchrun x{gpus}, token cache", [*torchrun, *stage2[1:], "--precompute-tokens",
                                                        "--dist-timeout", "1"], torchrun=True,
             **dict(s2, needs={"vqgan_last.pt": (ddp, "checkpoints/vqgan_last.pt")})),
    ]
    if not args.skip_bench:
        steps_.append(bench_step(args, device_type, bench_flops))
    if not args.skip_compile:
        steps_ += [Step("stage 1, --compile", stage1 + ["--compile"], compiles=2, **s1),  # VQGAN, discriminator
                   Step("stage 2, --compile", stage2 + ["--compile"], compiles=1, **s2),
                   Step("sampling, --compile", sample + ["--compile"], compiles=1, **sampling(True))]
    if not args.skip_bench and not args.skip_compile:
        steps_ += [bench_step(args, device_type, bench_flops, objective) for objective in SAMPLING_OBJECTIVES]
    for i, step in enumerate(steps_):
        step.folder = f"{i + 1:02d}-" + "".join(c if c.isalnum() else "-" for c in step.name.lower()).strip("-")
    return steps_


def bench_step(args, device_type, flops, objective=None):
    """bench.py on its config in one process: stage 1, stage 2, sampling and ar against maskgit; or, with an
    objective, compiled sampling alone. Never its sliding-window section (a minute per canvas at the paper size)."""
    config = SIZES["quick" if args.quick else "full"]["bench"]
    sizes, vq = DEFAULT_SIZES[device_type], VQGANConfig(**CONFIGS[config]["vqgan"])
    tokens, n_layer = (vq.image_size // vq.downsample_factor) ** 2, CONFIGS[config]["gpt"]["n_layer"]
    command = [sys.executable, str(ROOT / "bench.py"), "--config", config, "--device", args.device, "--skip-window",
               "--in-process", "--out-json", "bench.json"]
    warmup, timed, runs = 2, 5, sizes["sample_runs"]  # bench.py's defaults; the CPU form times one step
    if args.quick:
        timed, command = 1, command + ["--steps", "1"]
    build_s = 10.0 if config == "paper" else 0.0  # 440M weights drawn on the CPU (GPT, VGG16), cuDNN's autotuning
    flags, positions = SAMPLING_OBJECTIVES.get(objective, ([], lambda t: t))
    per_run = positions(tokens)
    sampling = dict(flops=sizes["sample_batch_size"] * ((per_run * runs + 8) * flops["forward_per_token"] +
                                                        (runs + 1) * flops["decode_per_image"]),  # + 8-token warm-up
                    launches=(per_run * runs + 8) * per_token_launches(n_layer, objective is not None, device_type))
    if objective is not None:  # a deep GPT is a long graph: one compile allowance per 12 layers
        return Step(f"bench.py sampling ({objective}), --compile", command + ["--compile", "--skip-stage1",
                                                                           "--skip-stage2", "--skip-maskgit", *flags],
                    compiles=max(1, n_layer // 12), other_s=build_s / 2, **sampling)
    # stage 1 and 2: the warm-up steps, the timed ones, and the eager step that counts the FLOPs
    train = (warmup + timed + 1) * (sizes["batch_size"] * flops["stage1_per_image"] +
                                    sizes["gpt_batch_size"] * tokens * flops["stage2_per_token"])
    # ar against maskgit, eager, each sampler once untimed and `runs` times timed at each batch size: ar a pass per
    # token (on the CPU also with int8 weights), maskgit a pass over the grid per step; and two counted forwards
    ar_rows, passes, runs_all = 2 if device_type == "cpu" else 1, sum(MASKGIT_STEPS), runs + 1
    images = runs_all * sum(sizes["maskgit_batch_sizes"])
    versus = dict(flops=(images * (ar_rows + passes) + 2) * tokens * flops["forward_per_token"],
                  launches=runs_all * len(sizes["maskgit_batch_sizes"]) * (
                      ar_rows * tokens * per_token_launches(n_layer, False, device_type) +
                      passes * (n_layer * LAUNCHES_PER_LAYER + LAUNCHES_PER_TOKEN)))
    return Step("bench.py", command, flops=train + sampling["flops"] + versus["flops"],
                launches=sampling["launches"] + versus["launches"], other_s=build_s)


def estimate(step, costs):
    """Seconds: start-up, torchrun, compiles, the FLOPs at the stated rate, launches, and what else it does."""
    return (costs["start_s"] + step.torchrun * costs["torchrun_s"] + step.compiles * costs["compile_s"] +
            step.flops / costs["flops_per_s"] + step.launches * costs["launch_s"] + step.other_s)


def fit_budget(steps, budget_s, before_s):
    """The steps that fit: dropped from the end until before_s + their estimates fit budget_s (and a step whose
    inputs come from a dropped one is dropped too)."""
    kept = list(steps)
    while kept and before_s + sum(s.estimate_s for s in kept) > budget_s:
        kept.pop().result = "not run: over --budget"
    names = {s.name for s in kept}
    for step in kept:
        if any(source not in names for source, _ in step.needs.values()):
            step.result = "not run: over --budget"
    return [s for s in kept if s.result == "not run"]


def print_plan(steps, costs, before_s, budget_s, deadline_s):
    print(f"Plan: each step's estimate is {costs['start_s']:.0f} s to start a process (+ {costs['torchrun_s']:.0f} "
          f"s under torchrun), + {costs['compile_s']:.0f} s per compiled model, + its FLOPs counted by bench.py at "
          f"{costs['flops_per_s'] / 1e12:.3g} TFLOP/s, + {1e6 * costs['launch_s']:.0f} us per kernel launched from "
          f"Python ({LAUNCHES_PER_LAYER} per GPT layer and {LAUNCHES_PER_TOKEN} per sampled token).")
    print("| step | start-up s | compiles | GFLOP | compute s | launches s | other s | estimate s | limit s |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in steps:
        start = costs["start_s"] + s.torchrun * costs["torchrun_s"]
        print(f"| {s.name} | {start:.0f} | {s.compiles} | {s.flops / 1e9:,.0f} | {s.flops / costs['flops_per_s']:.1f} "
              f"| {s.launches * costs['launch_s']:.1f} | {s.other_s:.0f} | {s.estimate_s:.0f} | {s.limit_s:.0f} |")
    steps_s = sum(s.estimate_s for s in steps)
    print(f"Estimate: {before_s:.0f} s before the first step (this script's start and FLOP counting, the wheels if "
          f"any) + {steps_s:.0f} s of steps = {before_s + steps_s:.0f} s, within the budget of {budget_s:.0f} s. "
          f"Limits: 3x a step's estimate + 30 s, and no step starts after {deadline_s:.0f} s.", flush=True)


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
    """Run one step in its fresh folder as its own process group, its output in log.txt. At the time limit the
    whole group is stopped: torchrun's workers and the loaders' too, which subprocess.run's timeout would leave."""
    folder = run_dir / step.folder
    (folder / "inputs").mkdir(parents=True)
    source = link_inputs(step, run_dir, by_name)
    if source:
        step.result = f"skipped: needs {source}"
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
        except BaseException:  # Ctrl-C reaches this script only (the step has a session of its own): stop the step
            stop_group(proc)
            step.result = "stopped: gpu_check.py was interrupted"
            raise
    step.seconds = time.perf_counter() - start
    if step.result == "ok" and RECOMPILE_LIMIT in (folder / "log.txt").read_text(errors="replace"):
        step.result = "RECOMPILED past dynamo's limit, then ran uncompiled (log.txt)"  # ok, but not what was meant


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


def report(steps, run_dir, header):
    """The table (each step's result, seconds, estimate and limit, then the figures of each bench.py step that
    ran), as gpu_check.md and, with every step's command, as gpu_check.json."""
    rows = [header, "", "| step | result | seconds | estimate s | limit s |", "| --- | --- | ---: | ---: | ---: |"]
    rows += [f"| {s.name} | {s.result} | {f'{s.seconds:.0f}' if s.seconds else '-'} | {s.estimate_s:.0f} | "
             f"{s.limit_s:.0f} |" for s in steps]
    bench = {}
    for s in steps:
        path = run_dir / s.folder / "bench.json"
        if s.name.startswith("bench.py") and s.result == "ok" and path.exists():
            bench[s.name] = results = json.loads(path.read_text())
            rows += ["", f"{s.name}, {results['config']} config ({results['device_name']}, {results['precision']}):",
                     "", markdown_table(results)]
    table = "\n".join(rows)
    (run_dir / "gpu_check.md").write_text(table + "\n")
    (run_dir / "gpu_check.json").write_text(json.dumps({"header": header, "steps": [asdict(s) for s in steps],
                                                        "bench": bench}, indent=2) + "\n")
    return table


# ---- main ----

def main(args):
    """Plan, run and report; returns the steps, each with its result."""
    clock = time.perf_counter()
    if args.download_wheels:
        download_wheels(args.download_wheels, args.python_version)
        return []
    for name in ("budget", "deadline", "steps", "nproc"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    deadline_s = args.deadline or args.budget * 7 / 6
    device_type = torch.device(args.device or "cuda").type
    args.device = args.device or "cuda"
    run_dir = Path(args.work_dir) / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")  # fresh for every run
    if not args.dry_run:
        run_dir.mkdir(parents=True)
        if args.wheels:
            install_wheels(args.wheels, run_dir / "site")
        missing = missing_packages(skip_tests=args.skip_tests)
        if missing:
            raise ValueError(f"Missing packages: {', '.join(missing)}. Install them (pip install -r "
                             f"requirements.txt) or, without a package registry, from a wheel folder (docs/gpu.md).")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError("No CUDA device here: run the CPU form, `python gpu_check.py --quick --device cpu`.")
    gpus = args.nproc or (max(1, torch.cuda.device_count()) if device_type == "cuda" else 2)
    costs, size = COSTS[device_type], SIZES["quick" if args.quick else "full"]
    flops = config_flops(VQGANConfig(**size["vqgan"]), size["gpt"], perceptual=False)
    bench = CONFIGS[size["bench"]]
    bench_flops = None if args.skip_bench else config_flops(VQGANConfig(**bench["vqgan"]), bench["gpt"])
    steps = plan(args, run_dir, device_type, gpus, flops, bench_flops)
    for step in steps:
        step.estimate_s = estimate(step, costs)
        step.limit_s = 3 * step.estimate_s + 30  # the allowances are a first guess, which the first run corrects
    before_s = costs["count_s"] + (costs["wheels_s"] if args.wheels else 0.0)
    to_run = fit_budget(steps, args.budget, before_s)
    print_plan(to_run, costs, before_s, args.budget, deadline_s)
    if args.dry_run:
        return steps

    # at least one batch per rank under torchrun after the validation split, on every GPU of the node
    make_demo_flowers(run_dir / "flowers", num_images=max(64, 2 * gpus * size["batch_size"]),
                      size=size["vqgan"]["image_size"] + 16)
    paths = [str(run_dir / "site")] if args.wheels else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [*paths, str(ROOT), os.environ.get("PYTHONPATH")]
                                                      if p))
    if device_type == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # two gloo processes share the cores
    print(f"Started {time.perf_counter() - clock:.0f} s ago (estimated {before_s:.0f} s).", flush=True)
    try:
        run_plan(to_run, run_dir, env, {step.name: step for step in steps}, lambda: time.perf_counter() - clock,
                 deadline_s)
    finally:  # the table, whatever happened (an interrupted run too)
        device_name = torch.cuda.get_device_name() if device_type == "cuda" else "CPU"
        header = (f"gpu_check.py on {device_name} ({gpus} x {args.device}), torch {torch.__version__}, "
                  f"{datetime.now(timezone.utc):%Y-%m-%d}: {time.perf_counter() - clock:.0f} s in all, estimated "
                  f"{before_s + sum(s.estimate_s for s in to_run):.0f} s")
        table = report(steps, run_dir, header)
        print(f"\n{table}\n\nWrote {run_dir}/gpu_check.md and gpu_check.json; each step's output is in its "
              f"folder's log.txt.")
        if args.report_dir:  # the tables and the logs: no checkpoint, image or installed wheel
            shutil.copytree(run_dir, args.report_dir, dirs_exist_ok=True, ignore=lambda folder, names: [
                n for n in names if n == "site" or not (n.endswith((".md", ".json", ".txt")) or
                                                        (Path(folder) / n).is_dir())])
    return steps


def run_plan(steps, run_dir, env, by_name, elapsed, deadline_s):
    """Run the steps in order, each within its limit and the deadline, saying how each went."""
    for step in steps:
        left = deadline_s - RESERVE_S - elapsed()
        if left <= 0:
            step.result = "not run: out of time"
            continue
        print(f"== {step.name}: {' '.join(step.command)}", flush=True)
        run_step(step, run_dir, env, min(step.limit_s, left), by_name)
        if step.result.startswith("TIMED OUT") and left < step.limit_s:
            step.result += " (the deadline)"
        took = f" in {step.seconds:.0f} s (estimate {step.estimate_s:.0f} s)" if step.seconds else ""
        print(f"   {step.result}{took}", flush=True)
        if step.result.startswith(FAILURES):  # the end of its log, where the error is
            print("\n".join((run_dir / step.folder / "log.txt").read_text(errors="replace").splitlines()[-15:]))


def build_parser():
    p = ScriptParser("Run every GPU path of the scripts once, within a time budget, and print one table.")
    a = p.add_argument
    a("--device", default=None, help="passed to every step (default: cuda; the CPU form needs --device cpu)")
    a("--quick", action="store_true", help="presets.py's tiny models everywhere, bench.py --quick: the CPU form")
    a("--steps", type=int, default=5, help="optimizer steps of each training run")
    a("--nproc", type=int, default=None, help="processes under torchrun (default: every GPU; 2 on the CPU)")
    a("--budget", type=float, default=360.0,
      help="seconds the plan's estimate must fit: steps are dropped from the end of the plan until it does")
    a("--deadline", type=float, default=None,
      help="seconds after which no step starts, and a running one is stopped (default: the budget plus a sixth)")
    a("--dry-run", action="store_true", help="print the plan and its estimates for --device, and run nothing")
    a("--work-dir", default="runs/gpu_check", help="each run makes a fresh folder of its own in here")
    a("--report-dir", default=None, help="also copy the tables and every step's log.txt here")
    a("--wheels", default=None, metavar="DIR", help="first pip install --no-index the wheels in DIR (offline nodes)")
    a("--download-wheels", default=None, metavar="DIR",
      help="on a connected machine, only download into DIR the wheels an offline node lacks (docs/gpu.md)")
    a("--python-version", default="3.12", help="with --download-wheels: the offline node's Python version")
    a("--skip-tests", action="store_true", help="do not run the CUDA-marked tests")
    a("--skip-compile", action="store_true", help="do not run the --compile steps")
    a("--skip-bench", action="store_true", help="do not run bench.py")
    return p


if __name__ == "__main__":
    outcome = run_script(main, build_parser())
    sys.exit(1 if any(s.result.startswith(FAILURES) for s in outcome) else 0)
