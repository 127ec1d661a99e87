"""Both training scripts under torchrun on the CPU (two gloo processes); DDP leaves the discriminator's BatchNorm
statistics alone; the learning rate from the global batch."""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import runtime
import training_vqgan
from checkpoint import load_checkpoint, save_checkpoint
from cli import BASE_LEARNING_RATE, run_script
from data import find_images, map_to_tensor, read_map, split_paths
from demo_flowers import FLOWER_LABELS, make_demo_flowers
from discriminator import Discriminator, DiscriminatorConfig
from helpers import STAGE2_FLAGS, TINY, write_tiny_checkpoints
from helpers import TINY_FLAGS as SHARED_TINY_FLAGS
from loss import hinge_d_loss
from runtime import Dist, no_sync, wrap_model
from vqgan import VQGAN, VQGANConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = SHARED_TINY_FLAGS + ["--batch-size", "2", "--disc-start", "1"]  # the last value of a flag wins

# Runs training_vqgan.py exactly as `torchrun ... training_vqgan.py` would (as __main__, same argv), and afterwards
# writes the parameters of the modules this rank wrapped in DDP, so the test can compare the ranks. The script
# reads DistributedDataParallel from torch.nn.parallel when it imports, so a recording subclass put there first
# sees every module it wraps; nothing in the script changes. The EMA weights (--ema-decay) are recorded the same way.
RECORD_RANK_WEIGHTS = textwrap.dedent("""
    import os, runpy, sys
    import torch, torch.nn.parallel
    import ema

    script, out = sys.argv[1], sys.argv[2]
    wrapped = []

    class RecordingDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            wrapped.append(module)

    torch.nn.parallel.DistributedDataParallel = RecordingDDP
    averages, ema_init = [], ema.EMA.__init__

    def recording_init(self, *args, **kwargs):
        ema_init(self, *args, **kwargs)
        averages.append(self)

    ema.EMA.__init__ = recording_init
    sys.argv = [script] + sys.argv[3:]
    runpy.run_path(script, run_name="__main__")
    params = [{name: p.detach().clone() for name, p in module.named_parameters()} for module in wrapped]
    params += [{"ema." + name: p for name, p in zip(e.names, e.params)} for e in averages]
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    torch.save(params, os.path.join(out, f"params_rank{rank}.pt"))
""")


LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
                    "SLURM_NTASKS")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, launcher, script, flags, **variables):
    """`*launcher script *flags` in `folder` through the recording harness (rank r's weights in
    folder/params_rank{r}.pt), with no launch variable of this process and the given ones."""
    folder.mkdir(parents=True, exist_ok=True)
    harness = folder / "record_rank_weights.py"
    harness.write_text(RECORD_RANK_WEIGHTS)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **variables)
    command = [*launcher, str(harness), str(ROOT / script), str(folder), *map(str, flags)]
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*procs, timeout=240):
    """Wait for every process; each must exit 0."""
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def rank_weights(*folders):
    """The weights each rank's harness recorded, rank 0 first (in whichever folder its node wrote them)."""
    files = sorted((f for folder in folders for f in folder.glob("params_rank*.pt")), key=lambda f: f.name)
    return [torch.load(f, weights_only=True) for f in files]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun(tmp_path, script, *flags):
    """Run `script` under `torchrun --nproc_per_node 2` (gloo) through the recording harness; the ranks' weights."""
    finish(start(tmp_path, [*TORCHRUN, "--standalone", "--nproc_per_node", "2"], script, flags))
    return rank_weights(tmp_path)


def two_nodes(tmp_path, script, *flags):
    """Run `script` as two torchrun "nodes" of one process each on localhost, node n in tmp_path/node<n> (its own
    working folder: relative paths in `flags` are node-local); the ranks' weights."""
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                  str(free_port())]
    nodes = [tmp_path / f"node{n}" for n in (0, 1)]
    finish(*[start(node, [*TORCHRUN, *rendezvous, "--node_rank", str(n)], script, flags)
             for n, node in enumerate(nodes)])
    return rank_weights(*nodes)


def slurm_tasks(tmp_path, script, *flags):
    """Run `script` as two SLURM tasks would start under srun: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the
    batch script's MASTER_ADDR/MASTER_PORT, no torchrun; the ranks' weights and outputs."""
    address = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SLURM_NTASKS="2")
    outputs = finish(*[start(tmp_path, [sys.executable], script, flags, SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                             **address) for r in (0, 1)])
    return rank_weights(tmp_path), outputs


@pytest.fixture(scope="module")
def stage1_job(tmp_path_factory):
    """One `torchrun --nproc_per_node 2` (gloo) run of training_vqgan.py with --grad-accum 2 for 3 steps, the
    discriminator on from step 1: (out dir, its checkpoint, rank 0's and rank 1's wrapped modules' weights)."""
    tmp_path = tmp_path_factory.mktemp("stage1_job")
    data = make_demo_flowers(tmp_path / "flowers", num_images=12, size=40)
    out = tmp_path / "run"
    rank0, rank1 = torchrun(tmp_path, "training_vqgan.py", *TINY_FLAGS, "--dataset-path", data, "--grad-accum", 2,
                            "--max-steps", 3, "--out-dir", out)
    return out, load_checkpoint(out / "checkpoints" / "vqgan_last.pt"), rank0, rank1


@pytest.mark.xdist_group("stage1_job")
def test_rank0_alone_saves_and_logs_every_step(stage1_job):
    out, ckpt, _, _ = stage1_job
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["vqgan_last.pt"]
    assert ckpt["step"] == 3 and ckpt["opt_vq"]["state"][0]["step"] == 3  # two micro-batches, one Adam step each
    logs = list((out / "results").glob("*metrics.jsonl"))
    assert len(logs) == 1
    assert [json.loads(line)["step"] for line in logs[0].read_text().splitlines()] == [1, 2, 3]


@pytest.mark.xdist_group("stage1_job")
def test_the_learning_rate_scales_with_the_global_batch(stage1_job):
    """lr = 4.5e-6 x --batch-size x processes x --grad-accum."""
    _, ckpt, _, _ = stage1_job
    assert ckpt["opt_vq"]["param_groups"][0]["lr"] == ckpt["opt_disc"]["param_groups"][0]["lr"] == \
        BASE_LEARNING_RATE * 2 * 2 * 2


@pytest.mark.xdist_group("stage1_job")
def test_two_processes_train_like_one(stage1_job):
    """Each rank draws other images (its shard of the sampler, its own augmentation seed), so the ranks' weights can
    only agree bit for bit if DDP averaged the gradients of every step, accumulated without all-reduce on the first
    micro-step (no_sync); the discriminator takes part from step 1. Only parameters are compared: BatchNorm running
    statistics are per rank (DDP does not broadcast buffers).
    """
    _, ckpt, rank0, rank1 = stage1_job
    assert len(rank0) == len(rank1) == 2  # the VQGAN and the discriminator
    for saved, module0, module1 in zip((ckpt["model"], ckpt["discriminator"]), rank0, rank1):
        assert module0.keys() == module1.keys() and module0
        for name in module0:
            assert torch.equal(module0[name], module1[name]), name
            assert torch.equal(saved[name], module1[name]), name  # what rank 0 saved is what rank 1 holds


def test_segmentation_tokenizer_two_processes(tmp_path):
    """training_vqgan.py --image-kind segmentation under torchrun (gloo): label maps one-hot in, the ranks end with
    the saved weights, and no GAN ever stepped (its module wrapped but never used)."""
    make_demo_flowers(tmp_path / "flowers", num_images=8, size=32, segmentation_dir=tmp_path / "labels")
    out = tmp_path / "run"
    rank0, rank1 = torchrun(tmp_path, "training_vqgan.py", *TINY_FLAGS, "--image-kind", "segmentation",
                            "--num-labels", len(FLOWER_LABELS), "--dataset-path", tmp_path / "labels", "--max-steps", 2,
                            "--sample-every", 2, "--out-dir", out)
    ckpt = load_checkpoint(out / "checkpoints" / "vqgan_last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["image_kind"] == "segmentation" and ckpt["opt_disc"]["state"] == {}
    assert ckpt["model"]["encoder.conv_in.weight"].shape[1] == len(FLOWER_LABELS)
    assert rank0[0].keys() == ckpt["model"].keys()
    for name in rank0[0]:
        assert torch.equal(rank0[0][name], rank1[0][name]) and torch.equal(ckpt["model"][name], rank1[0][name]), name
    assert (out / "results" / "reconstructions_0000002.png").exists()


def same_tensors(a, b):
    """The names of the entries of two state dicts (or nested dicts of them) that differ."""
    if isinstance(a, dict):
        return [f"{k}.{name}" for k in a.keys() | b.keys() for name in same_tensors(a.get(k), b.get(k))] if \
            a.keys() == b.keys() else ["(keys)"]
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [""]
    return [] if a == b else [""]


def stage1_flags(data, out):
    """stage1_job's flags, with this run's data folder and out dir."""
    return [*TINY_FLAGS, "--dataset-path", data, "--grad-accum", 2, "--max-steps", 3, "--out-dir", out]


def check_same_stage1_run(ckpt, reference, rank0, rank1):
    """A stage-1 run ended where `reference` (stage1_job's checkpoint) did: weights, BatchNorm statistics, optimizer
    states and data position; both ranks hold the saved weights."""
    for key in ("model", "discriminator", "opt_vq", "opt_disc"):
        assert same_tensors(ckpt[key], reference[key]) == [], key
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == \
        (reference["step"], reference["epoch"], reference["batch_in_epoch"])
    for saved, module0, module1 in zip((ckpt["model"], ckpt["discriminator"]), rank0, rank1):
        assert all(torch.equal(saved[name], module0[name]) and torch.equal(module0[name], module1[name])
                   for name in module0)


@pytest.mark.xdist_group("stage1_job")
def test_two_nodes_train_like_two_processes_on_one(stage1_job, tmp_path):
    """torchrun --nnodes 2 --node_rank 0/1 on localhost, one process per node, each node in a folder of its own with
    its own copy of the data: the run ends where stage1_job's (one node, two processes, the same flags) ended, and
    node 1 writes nothing (rank 0 alone saves and logs)."""
    for node in (0, 1):
        make_demo_flowers(tmp_path / f"node{node}" / "flowers", num_images=12, size=40)
    rank0, rank1 = two_nodes(tmp_path, "training_vqgan.py", *stage1_flags("flowers", "run"))
    check_same_stage1_run(load_checkpoint(tmp_path / "node0" / "run" / "checkpoints" / "vqgan_last.pt"),
                          stage1_job[1], rank0, rank1)
    assert not (tmp_path / "node1" / "run").exists()


@pytest.mark.xdist_group("stage1_job")
def test_a_resume_with_another_number_of_processes_follows_the_global_batch(stage1_job, tmp_path, capsys):
    """stage1_job's checkpoint (2 processes; 12 images, batches of 2, --grad-accum 2: 3 micro-batches per rank and
    epoch; 3 steps: two epochs) resumed by one process, with --epochs 3 in place of --max-steps: the learning rate
    halves with the global batch, and the run ends with the third epoch, 6 micro-batches of 2 images (3 steps) later;
    steps counted as for a new run would have ended it at step 3 x 3 = 9."""
    out, reference, _, _ = stage1_job
    ckpt = dict(reference, args=dict(reference["args"], max_steps=None, epochs=3, out_dir=str(tmp_path)))
    save_checkpoint(ckpt, tmp_path / "checkpoints" / "vqgan_last.pt")
    assert (ckpt["epoch"], ckpt["samples_in_epoch"], ckpt["world_size"]) == (1, 12, 2)  # epoch 1 all taken
    run_script(training_vqgan.main, training_vqgan.build_parser(), ["--out-dir", str(tmp_path), "--resume"])
    lr = BASE_LEARNING_RATE * 2 * 2
    assert f"The run had 2 processes and has 1: global batch 4 (was 8), learning rate {lr:.3g} (was {2 * lr:.3g}); " \
           f"epoch 1 goes on after the 12 samples it has used." in capsys.readouterr().out
    resumed = load_checkpoint(tmp_path / "checkpoints" / "vqgan_last.pt")
    assert (resumed["step"], resumed["epoch"], resumed["samples_in_epoch"], resumed["world_size"]) == (6, 2, 12, 1)
    assert resumed["opt_vq"]["param_groups"][0]["lr"] == lr


# ---- stage 2 and its token cache ----

STAGE2_RUN = [*STAGE2_FLAGS, "--precompute-tokens", "--max-steps", 3, "--sample-every", 3, "--ema-decay", 0.9]


def stage2_inputs(folder, stage1_bytes):
    """21 demo flowers (20 train, 1 held out) and a copy of the stage-1 checkpoint in `folder`, whose token caches
    are written beside the checkpoint: (data folder, stage-1 checkpoint path)."""
    stage1 = folder / "stage1" / "vqgan.pt"
    stage1.parent.mkdir(parents=True)
    stage1.write_bytes(stage1_bytes)
    return make_demo_flowers(folder / "flowers", num_images=21, size=32), stage1


@pytest.fixture(scope="module")
def stage1_bytes(tmp_path_factory):
    """The bytes of a tiny stage-1 checkpoint (random weights): every stage-2 run here encodes with the same VQGAN."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("stage1") / "vqgan.pt"
    save_checkpoint(dict(model=VQGAN(VQGANConfig(**TINY)).state_dict(), config=asdict(VQGANConfig(**TINY)), step=0),
                    path)
    return path.read_bytes()


def token_caches(stage1):
    """{"train"/"val": the rows} of the token caches beside a stage-1 checkpoint; every file there must be one."""
    files = sorted(p.name for p in stage1.parent.iterdir() if p != stage1)
    assert all(re.fullmatch(r"tokens_(train|val)_32px_[0-9a-f]{16}\.pt", name) for name in files), files
    return {name.split("_")[1]: load_checkpoint(stage1.parent / name) for name in files}


@pytest.fixture(scope="module")
def stage2_job(tmp_path_factory, stage1_bytes):
    """Stage 2 on one node as two SLURM tasks (the variables srun sets and the batch script's MASTER_ADDR/MASTER_PORT,
    no torchrun) with --precompute-tokens and the default validation split: (out dir, checkpoint, token caches, rank
    0's and rank 1's weights, the tasks' outputs)."""
    tmp_path = tmp_path_factory.mktemp("stage2_job")
    data, stage1 = stage2_inputs(tmp_path, stage1_bytes)
    out = tmp_path / "stage2"
    (rank0, rank1), outputs = slurm_tasks(tmp_path, "training_transformer.py", *STAGE2_RUN, "--dataset-path", data,
                                          "--checkpoint-path", stage1, "--out-dir", out)
    ckpt = load_checkpoint(out / "checkpoints" / "transformer_last.pt")
    return out, ckpt, token_caches(stage1), rank0, rank1, outputs


@pytest.mark.xdist_group("stage2_job")
def test_stage2_as_two_slurm_tasks_with_token_cache_and_validation_split(stage2_job):
    """The SLURM tasks join one process group (rank 0 says so before it waits); both ranks encode their share of
    each cache (train and val), which reaches rank 0 by a collective; nobody waits for ever, and the ranks end with
    the saved GPT's weights and the same EMA weights (--ema-decay)."""
    out, ckpt, caches, rank0, rank1, (output0, output1) = stage2_job
    assert "Joining 2 SLURM tasks at 127.0.0.1:" in output0 and "Joining" not in output1
    assert caches["train"]["indices"].shape == (40, 64)  # 20 images and their flips, from both ranks' shares
    assert caches["val"]["indices"].shape == (2, 64)  # rank 1's share of the one held-out image is empty
    records = [json.loads(line) for line in (out / "results" / "transformer_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "val_loss" in records[-1]
    assert ckpt["step"] == 3 and len(rank0) == len(rank1) == 2  # one DDP module, the transformer, and the EMA
    gpt0 = {k[len("gpt."):]: v for k, v in rank0[0].items() if k.startswith("gpt.")}
    gpt1 = {k[len("gpt."):]: v for k, v in rank1[0].items() if k.startswith("gpt.")}
    assert gpt0.keys() == ckpt["model"].keys()
    for name in gpt0:
        assert torch.equal(gpt0[name], gpt1[name]) and torch.equal(ckpt["model"][name], gpt1[name]), name
    ema0, ema1 = rank0[1], rank1[1]  # the EMA weights: the same on both ranks, and what rank 0 saved
    assert ema0.keys() == {"ema." + name for name in gpt0}
    for name in ema0:
        assert torch.equal(ema0[name], ema1[name]) and torch.equal(ckpt["ema"][name[4:]], ema1[name]), name


def test_stage2_two_processes_with_an_image_condition(tmp_path):
    """Stage 2 with --cond-path (label maps tokenized by their own tokenizer) and the token cache under torchrun:
    each rank encodes its share of the pairs and their condition rows, and both ranks end with the saved GPT."""
    data = make_demo_flowers(tmp_path / "flowers", num_images=21, size=32)  # 20 training pairs and 1 held out
    (tmp_path / "labels").mkdir()
    for path in find_images(data):
        with Image.open(path) as image:  # 3 classes by brightness
            Image.fromarray(np.asarray(image.convert("L")) // 86).save(tmp_path / "labels" / path.name)
    torch.manual_seed(0)
    labels = VQGANConfig(image_kind="segmentation", num_labels=3, image_size=32, ch=32, ch_mult=(1, 1, 1, 1),
                         num_res_blocks=1, attn_resolutions=(), z_channels=16, latent_dim=8, num_codebook_vectors=24)
    stage1 = tmp_path / "stage1"
    for name, config in (("vqgan", VQGANConfig(**TINY)), ("labels", labels)):
        save_checkpoint(dict(model=VQGAN(config).state_dict(), config=asdict(config), step=0), stage1 / f"{name}.pt")
    out = tmp_path / "stage2"
    rank0, rank1 = torchrun(tmp_path, "training_transformer.py", *STAGE2_FLAGS, "--block-size", 80, "--dataset-path",
                            data, "--cond-path", tmp_path / "labels", "--checkpoint-path", stage1 / "vqgan.pt",
                            "--cond-checkpoint", stage1 / "labels.pt", "--cond-dropout", 0.1, "--precompute-tokens",
                            "--max-steps", 2, "--sample-every", 2, "--out-dir", out)
    train = load_checkpoint(next(stage1.glob("tokens_train_*.pt")))
    assert train["indices"].shape == (40, 64) and train["cond_indices"].shape == (40, 16)  # both ranks' shares
    # The condition rows came through the gather beside their images' rows: pair i, then its mirror image.
    maps = torch.stack([map_to_tensor(read_map(tmp_path / "labels" / path.name, "segmentation", 3), "segmentation", 3)
                        for path in split_paths(find_images(data), 0.05, seed=0)[0]])  # (20, 3, 32, 32), in order
    tokenizer = VQGAN.from_checkpoint(stage1 / "labels.pt")
    expected = torch.stack([tokenizer.encode(maps)[1], tokenizer.encode(maps.flip(-1))[1]], 1).flatten(0, 1)
    assert torch.equal(train["cond_indices"].long(), expected.flatten(1))
    ckpt = load_checkpoint(out / "checkpoints" / "transformer_last.pt")
    assert ckpt["step"] == 2 and ckpt["cond_kind"] == "segmentation"
    gpt0 = {k[len("gpt."):]: v for k, v in rank0[0].items() if k.startswith("gpt.")}
    gpt1 = {k[len("gpt."):]: v for k, v in rank1[0].items() if k.startswith("gpt.")}
    assert gpt0.keys() == ckpt["model"].keys()
    for name in gpt0:
        assert torch.equal(gpt0[name], gpt1[name]) and torch.equal(ckpt["model"][name], gpt1[name]), name


@pytest.mark.xdist_group("stage2_job")
def test_stage2_on_two_nodes_with_node_local_folders(stage2_job, stage1_bytes, tmp_path):
    """Two torchrun nodes, each with its own data and stage-1 copy: rank 0 alone looks for and writes the token
    caches (node 1's stage-1 folder stays as it was), rank 1's rows come by collectives, and the GPT ends as
    stage2_job's two processes on one node (SLURM tasks, the same flags) left it."""
    for node in (0, 1):
        stage2_inputs(tmp_path / f"node{node}", stage1_bytes)
    two_nodes(tmp_path, "training_transformer.py", *STAGE2_RUN, "--dataset-path", "flowers", "--checkpoint-path",
              "stage1/vqgan.pt", "--out-dir", "stage2")
    ckpt = load_checkpoint(tmp_path / "node0" / "stage2" / "checkpoints" / "transformer_last.pt")
    _, reference, caches, _, _, _ = stage2_job
    assert same_tensors(ckpt["model"], reference["model"]) == [] and same_tensors(ckpt["ema"], reference["ema"]) == []
    assert same_tensors(token_caches(tmp_path / "node0" / "stage1" / "vqgan.pt"), caches) == []
    assert sorted(p.name for p in (tmp_path / "node1" / "stage1").iterdir()) == ["vqgan.pt"]
    assert not (tmp_path / "node1" / "stage2").exists()


# Runs a script with data.encode_images made to wait, once it has encoded, until the other job has encoded too:
# both jobs then write the same cache at the same moment.
ENCODE_IN_STEP = textwrap.dedent("""
    import pathlib, runpy, sys, time
    import data

    me, other = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    encode_images, calls = data.encode_images, []

    def in_step(*args, **kwargs):
        rows = encode_images(*args, **kwargs)
        calls.append(1)
        pathlib.Path(f"{me}{len(calls)}").touch()
        deadline = time.monotonic() + 120
        while not pathlib.Path(f"{other}{len(calls)}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return rows

    data.encode_images = in_step
    sys.argv = sys.argv[3:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.mark.xdist_group("stage2_job")
def test_two_jobs_at_once_write_one_token_cache(stage2_job, stage1_bytes, tmp_path):
    """Two single-process jobs on one stage-1 checkpoint, encoding and writing its caches at the same moment: both
    finish, no temporary file is left, and the caches hold the rows stage2_job's two ranks made (image order, each
    image followed by its mirror image, whatever the number of ranks)."""
    data, stage1 = stage2_inputs(tmp_path, stage1_bytes)
    harness = tmp_path / "encode_in_step.py"
    harness.write_text(ENCODE_IN_STEP)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    jobs = [subprocess.Popen([sys.executable, str(harness), str(tmp_path / f"encoded{job}"),
                              str(tmp_path / f"encoded{1 - job}"), str(ROOT / "training_transformer.py"),
                              *map(str, STAGE2_FLAGS), "--precompute-tokens", "--max-steps", "1", "--dataset-path",
                              str(data), "--checkpoint-path", str(stage1), "--out-dir", str(tmp_path / f"job{job}")],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for job in (0, 1)]
    outputs = finish(*jobs)
    assert all(output.count("Wrote the token cache") == 2 for output in outputs)  # both did encode and write
    assert same_tensors(token_caches(stage1), stage2_job[2]) == []


def _share_rows(rank, store, out):
    """One rank of two: 2 and 5 rows (indices (n, 3) int32 and labels (n,)), in pieces of 2 rows."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    runtime.CHUNK_BYTES = 24  # 2 rows of indices, 3 of labels: every share travels in several pieces
    n = (2, 5)[rank]
    mine = {"indices": torch.arange(3 * n, dtype=torch.int32).reshape(n, 3) + 100 * rank,
            "labels": torch.full((n,), rank)}
    gathered = runtime.gather_rows(mine)
    everyone = runtime.broadcast_rows(gathered)
    nobody = runtime.gather_rows(None)  # no rank has a row
    only_rank1 = runtime.gather_rows(mine if rank else None)
    torch.save(dict(gathered=gathered, everyone=everyone, nobody=nobody, only_rank1=only_rank1),
               out / f"rows_rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_rows_of_unequal_shares_reach_rank_0_then_every_rank(tmp_path):
    """The token cache's collectives: shares of 2 and 5 rows padded to 5 in pieces, gathered in rank order on rank 0,
    sent back to every rank; an empty share, and no rows at all (every rank learns it, to stop alike)."""
    mp.start_processes(_share_rows, args=(tmp_path / "store", tmp_path), nprocs=2, start_method="fork")  # no imports
    ranks = [torch.load(tmp_path / f"rows_rank{r}.pt", weights_only=True) for r in (0, 1)]
    rank1 = {"indices": torch.arange(15, dtype=torch.int32).reshape(5, 3) + 100, "labels": torch.ones(5).long()}
    expected = {"indices": torch.cat([torch.arange(6, dtype=torch.int32).reshape(2, 3), rank1["indices"]]),
                "labels": torch.tensor([0, 0, 1, 1, 1, 1, 1])}
    assert same_tensors(ranks[0]["gathered"], expected) == [] and ranks[1]["gathered"] is None
    assert same_tensors(ranks[0]["only_rank1"], rank1) == [] and ranks[1]["only_rank1"] is None
    assert all(same_tensors(r["everyone"], expected) == [] and r["nobody"] == {} for r in ranks)


def test_stage2_maskgit_two_processes(tmp_path):
    """training_transformer.py --objective maskgit under torchrun (gloo): the ranks end with the saved weights of the
    bidirectional GPT, and rank 0 validates at the fixed masking ratios."""
    data = make_demo_flowers(tmp_path / "flowers", num_images=12, size=32)
    _, stage1, _ = write_tiny_checkpoints(tmp_path / "tiny")
    out = tmp_path / "stage2"
    rank0, rank1 = torchrun(tmp_path, "training_transformer.py", *STAGE2_FLAGS, "--dataset-path", data,
                            "--checkpoint-path", stage1, "--objective", "maskgit", "--val-fraction", 0.2,
                            "--max-steps", 2, "--sample-every", 2, "--out-dir", out)
    ckpt = load_checkpoint(out / "checkpoints" / "transformer_last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["objective"] == "maskgit"
    records = [json.loads(line) for line in (out / "results" / "transformer_metrics.jsonl").read_text().splitlines()]
    assert {"val_loss_mask50", "val_loss_mask90"} <= set(records[-1])
    gpt0 = {k[len("gpt."):]: v for k, v in rank0[0].items() if k.startswith("gpt.")}
    gpt1 = {k[len("gpt."):]: v for k, v in rank1[0].items() if k.startswith("gpt.")}
    assert gpt0.keys() == ckpt["model"].keys()
    for name in gpt0:
        assert torch.equal(gpt0[name], gpt1[name]) and torch.equal(ckpt["model"][name], gpt1[name]), name


def _discriminator_forwards(rank, store, out):
    """One rank: the discriminator under DDP as training_vqgan runs it, real then fake images, one backward."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks
    disc = Discriminator(DiscriminatorConfig(ndf=8, n_layers=2))
    ddp = wrap_model(disc, Dist(rank=rank, local_rank=rank, world_size=2))
    seen = []  # the first BatchNorm's running mean as each forward begins (after DDP's pre-forward work)
    disc.register_forward_pre_hook(lambda module, args: seen.append(disc.main[3].running_mean.clone()))
    torch.manual_seed(1 + rank)  # other images on each rank
    real, fake = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32) + 2.0
    logits_real = ddp(real)
    after_first = disc.main[3].running_mean.clone()
    logits_fake = ddp(fake)
    hinge_d_loss(logits_real, logits_fake).backward()  # torch >= 2.6 fails here if a buffer was overwritten
    torch.save(dict(seen=seen, after_first=after_first), out / f"bn_rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_keeps_each_ranks_batchnorm_statistics_between_the_two_forwards(tmp_path):
    """With DDP's default broadcast_buffers=True, rank 1's statistics would be replaced by rank 0's before its second
    forward (and the backward could fail); each rank must see its own statistics from its first forward."""
    mp.spawn(_discriminator_forwards, args=(tmp_path / "store", tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"bn_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for record in ranks:
        assert len(record["seen"]) == 2 and torch.equal(record["seen"][1], record["after_first"])
    assert not torch.equal(ranks[0]["after_first"], ranks[1]["after_first"])  # the ranks' statistics differ


def test_no_sync_reaches_ddp_inside_torch_compile(tmp_path):
    """torch.compile(DDP(model)), the order the scripts use: no_sync must still find DDP's no_sync."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        compiled = torch.compile(ddp)  # compiles lazily: never called here
        with no_sync(compiled, sync=False):
            assert ddp.require_backward_grad_sync is False
        assert ddp.require_backward_grad_sync is True
        with no_sync(compiled, sync=True):
            assert ddp.require_backward_grad_sync is True
    finally:
        torch.distributed.destroy_process_group()
