"""Both training scripts under torchrun on the CPU (two gloo processes); DDP leaves the discriminator's BatchNorm
statistics alone; the learning rate from the global batch."""
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from checkpoint import load_checkpoint, save_checkpoint
from cli import BASE_LEARNING_RATE
from demo_flowers import FLOWER_LABELS, make_demo_flowers
from discriminator import Discriminator, DiscriminatorConfig
from helpers import STAGE2_FLAGS, TINY
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
    torch.save(params, os.path.join(out, f"params_rank{os.environ['RANK']}.pt"))
""")


def torchrun(tmp_path, script, *flags):
    """Run `script` under `torchrun --nproc_per_node 2` (gloo) through the recording harness; the ranks' weights."""
    harness = tmp_path / "record_rank_weights.py"
    harness.write_text(RECORD_RANK_WEIGHTS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(harness),
               str(ROOT / script), str(tmp_path), *map(str, flags)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]


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


def test_stage2_two_processes_with_token_cache_and_validation_split(tmp_path):
    """Stage 2 under torchrun with --precompute-tokens and the default validation split: both ranks encode their
    share of each cache (train and val), nobody waits for ever, and the ranks end with the saved GPT's weights and
    the same EMA weights (--ema-decay)."""
    data = make_demo_flowers(tmp_path / "flowers", num_images=21, size=32)  # 20 train (+ flips) and 1 held out
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1" / "vqgan.pt"
    save_checkpoint(dict(model=VQGAN(VQGANConfig(**TINY)).state_dict(), config=asdict(VQGANConfig(**TINY)), step=0),
                    stage1)
    out = tmp_path / "stage2"
    rank0, rank1 = torchrun(tmp_path, "training_transformer.py", *STAGE2_FLAGS, "--dataset-path", data,
                            "--checkpoint-path", stage1, "--precompute-tokens", "--max-steps", 3, "--sample-every",
                            3, "--ema-decay", 0.9, "--out-dir", out)
    caches = sorted(p.name for p in stage1.parent.glob("tokens_*"))
    assert len(caches) == 2 and all(name.endswith(".pt") for name in caches)  # the shares were merged and removed
    train_rows = load_checkpoint(stage1.parent / next(c for c in caches if "_train_" in c))["indices"]
    assert train_rows.shape == (40, 64)  # 20 images and their flips, from both ranks' shares
    records = [json.loads(line) for line in (out / "results" / "transformer_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "val_loss" in records[-1]
    ckpt = load_checkpoint(out / "checkpoints" / "transformer_last.pt")
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


def test_stage2_maskgit_two_processes(tmp_path):
    """training_transformer.py --objective maskgit under torchrun (gloo): the ranks end with the saved weights of the
    bidirectional GPT, and rank 0 validates at the fixed masking ratios."""
    data = make_demo_flowers(tmp_path / "flowers", num_images=12, size=32)
    torch.manual_seed(0)
    stage1 = tmp_path / "vqgan.pt"
    save_checkpoint(dict(model=VQGAN(VQGANConfig(**TINY)).state_dict(), config=asdict(VQGANConfig(**TINY)), step=0),
                    stage1)
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
