"""bench.py runs its sections on the tiny models and writes the table's figures as JSON (no timing asserted)."""
import json

import torch

import bench
from measure import peak_tflops_of
from presets import TINY_GPT


def test_quick_bench_runs_and_writes_json(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        results = bench.main(bench.build_parser().parse_args(
            ["--quick", "--steps", "1", "--warmup", "1", "--in-process", "--device", "cpu", "--out-json", str(out),
             "--window-scales", "1", "2"]))
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["config"] == results["config"] == "quick"
    for section in ("stage1", "stage2", "sampling"):
        assert results[section]["step_s"] > 0 and results[section]["peak_memory_bytes"] > 0
    # FLOPs are counted, not assumed: a training step costs about 3x its forward, so far more than zero; a GPT token at
    # least 6 FLOPs per weight of its Linear layers (2 in the forward, 4 in the backward)
    linear_weights = TINY_GPT["n_layer"] * 12 * TINY_GPT["n_embd"] ** 2 + TINY_GPT["n_embd"] * (64 + 1)
    assert results["stage1"]["flops_per_item"] > 1e9 and results["stage2"]["flops_per_item"] > 6 * linear_weights
    assert results["stage1"]["mfu"] is None  # no MFU on the CPU
    assert list(results["window"]["canvases"]) == ["1x1", "2x2"]  # sliding-window sampling on 8x8 and 16x16 tokens
    assert results["window"]["canvases"]["2x2"]["tokens"] == 256
    assert "| sliding-window sampling (2x2 canvas, 256 tokens) | 1 |" in bench.markdown_table(results)


def test_quick_bench_samples_with_int8_weights():
    threads = torch.get_num_threads()
    try:
        results = bench.main(bench.build_parser().parse_args(
            ["--quick", "--warmup", "1", "--in-process", "--device", "cpu", "--skip-stage1", "--skip-stage2",
             "--skip-window", "--quantize", "int8", "--out-json", ""]))
    finally:
        torch.set_num_threads(threads)
    assert "stage1" not in results and results["sampling"]["quantize"] == "int8"
    assert "| sampling (64 tokens, int8 weights) |" in bench.markdown_table(results)


def test_mfu_peak_is_looked_up_by_the_most_specific_device_name():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_tflops_of("NVIDIA H100 NVL") == 835.0  # not the SXM's 989
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("NVIDIA H200") == 989.0 and peak_tflops_of("NVIDIA H200 NVL") == 835.0
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops_of("Tesla T4") is None


def test_window_section_alone():
    """The docs' sliding-window command: every other section skipped, the window measured at the training size."""
    threads = torch.get_num_threads()
    try:
        results = bench.main(bench.build_parser().parse_args(
            ["--quick", "--device", "cpu", "--in-process", "--skip-stage1", "--skip-stage2", "--skip-sampling",
             "--window-scales", "1", "--threads", "1", "--out-json", ""]))
    finally:
        torch.set_num_threads(threads)
    assert not {"stage1", "stage2", "sampling"} & set(results)
    assert list(results["window"]["canvases"]) == ["1x1"] and results["window"]["canvases"]["1x1"]["tokens"] == 64


def test_each_section_takes_its_device_as_training_does(monkeypatch):
    """A section's process sets its device up with runtime.use_device, as the training scripts do (on CUDA: the
    current device and cudnn.benchmark, without which convolutions run untuned kernels and images/s are not training's)."""
    seen = []
    monkeypatch.setattr(bench, "use_device", lambda device: seen.append(device) or device)
    threads = torch.get_num_threads()
    args = bench.build_parser().parse_args(["--quick", "--device", "cpu", "--steps", "1", "--warmup", "1",
                                            "--gpt-batch-size", "1", "--threads", "1"])
    try:
        result = bench.run_section("stage2", args)
    finally:
        torch.set_num_threads(threads)
    assert seen == [torch.device("cpu")] and result["items_per_s"] > 0


def test_maskgit_section_measures_both_objectives_in_one_run():
    """ar (fp32 and int8 weights) and maskgit at each step count, at each batch size, in one process."""
    threads = torch.get_num_threads()
    try:
        results = bench.main(bench.build_parser().parse_args(
            ["--quick", "--device", "cpu", "--in-process", "--skip-stage1", "--skip-stage2", "--skip-sampling",
             "--skip-window", "--maskgit-steps", "2", "8", "--maskgit-batch-sizes", "1", "2", "--sample-runs", "2",
             "--threads", "1", "--out-json", ""]))
    finally:
        torch.set_num_threads(threads)
    rows = results["maskgit"]["rows"]
    assert [(r["batch_size"], r["objective"], r["weights"], r["steps"], r["passes"]) for r in rows] == [
        (n, *row) for n in (1, 2) for row in
        (("ar", "fp32", None, 64), ("ar", "int8", None, 64), ("maskgit", "fp32", 2, 2), ("maskgit", "fp32", 8, 8))]
    assert all(len(r["runs_s"]) == 2 and r["s_per_image"] == r["median_s"] / r["batch_size"] for r in rows)
    assert rows[0]["speedup_vs_ar"] == 1.0 and rows[2]["speedup_vs_ar"] == rows[0]["median_s"] / rows[2]["median_s"]
    # a maskgit step is one forward over the grid; ar's 64 cached passes add up to one (at least 2 FLOPs per weight
    # of its Linear layers for each of the 64 tokens)
    linear_weights = TINY_GPT["n_layer"] * 12 * TINY_GPT["n_embd"] ** 2 + TINY_GPT["n_embd"] * (64 + 1)
    assert rows[3]["flops_per_image"] == 4 * rows[2]["flops_per_image"] > rows[0]["flops_per_image"] > \
        2 * 64 * linear_weights
    assert "| sampling (maskgit, 8 steps, 64 tokens) | 2 |" in bench.markdown_table(results)
