"""gpu_check.py: every command it runs is a valid command line of its script (the paths themselves run in the other
tests); its table reports each step and bench.py's figures."""
import json
import sys

import bench
import gpu_check
import sample_transformer
import training_transformer
import training_vqgan

PARSERS = {"training_vqgan.py": training_vqgan.build_parser(), "training_transformer.py":
           training_transformer.build_parser(), "sample_transformer.py": sample_transformer.build_parser(),
           "bench.py": bench.build_parser()}


def test_every_planned_command_parses_in_its_script(tmp_path):
    for quick in (False, True):
        args = gpu_check.build_parser().parse_args(["--nproc", "2"] + (["--quick", "--device", "cpu"] if quick else []))
        steps = gpu_check.plan(args, tmp_path)
        names = [name for name, _ in steps]
        assert names[0] == "CUDA-marked tests" and any("--compile" in n for n in names) and names[-1] == "bench.py"
        assert sum("torchrun x2" in n for n in names) == 2
        for name, command in steps:
            script = next((c for c in command if c.endswith(".py") and c.split("/")[-1] in PARSERS), None)
            if script is None:
                assert command[1:4] == ["-m", "pytest", "-q"] and "cuda" in command
                continue
            if "torchrun" in name:
                assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
            flags = command[command.index(script) + 1:]
            PARSERS[script.split("/")[-1]].parse_args(flags)  # exits (SystemExit) on an unknown flag


def test_report_lists_each_step_and_the_bench_figures(tmp_path):
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({
        "device_name": "NVIDIA H200",
        "stage1": {"items_per_s": 240.0, "unit": "images", "mfu": 0.35, "peak_memory_bytes": 2**34},
        "sampling": {"tokens_per_s": 12000.0, "images_per_s": 47.0, "mfu": None, "peak_memory_bytes": 2**31}}))
    table = gpu_check.report([("stage 1, defaults", 0, 12.3), ("bench.py", 1, 40.0)], bench_json)
    assert "| stage 1, defaults | ok | 12 |" in table and "| bench.py | FAILED (exit 1) | 40 |" in table
    assert "device: NVIDIA H200" in table and "| stage1 | 240.0 images/s | 35.0% | 16.00 GiB |" in table
    assert "| sampling | 12000 tokens/s, 47.00 samples/s | - | 2.00 GiB |" in table
