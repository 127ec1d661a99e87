"""TrainingRun: the part of both training loops that is not the algorithm (resume, atomic saves, stop signals, the
non-finite guard, epochs and skipped files, the metrics log, TensorBoard and the progress bar)."""
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoint import (CheckpointError, check_same_config, checkpoint_path, load_checkpoint, run_config_path,
                        save_checkpoint)
from cli import check_run_flags, checkpoint_to_resume, learning_rate
from codebook import Quantizer
from config import config_from_dict
from data import MAX_NAMED_UNREADABLE, DataError, ResumableSampler, Unreadable, build_loader, find_images
from demo_flowers import write_default_demo_set
from ema import EMA
from runtime import (Interrupted, StopSignal, barrier, cleanup_distributed, resolve_precision, reuse_freed_memory,
                     seed_everything, set_threads, setup_distributed, wrap_model)
from utils import MetricsLog, check_writable, save_image_grid, to_image_range


class TrainingRun:
    """Everything of a training run that is not the algorithm: the script builds its models (run.guard(...) those
    whose forward changes state besides the gradients), then loops

        for batches in run.steps(loader):      # the micro-batches of one optimizer step
            ...forward, backward...
            if run.skip_update(losses): ...    # any micro-batch non-finite on any rank: keep the last good state
            ...optimizer step...
            run.end_step(metrics)              # count, log every --log-every steps, save every --save-every

    and run.finish() saves the last checkpoint. Each checkpoint holds the script's state (the function given to
    run.steps returns the models' and optimizers' states), the run's position (step, epoch, samples of the epoch
    taken, number of processes), the config and the flags. A resume with another number of processes is exact: the
    learning rate follows the global batch (unless --learning-rate fixes it) and the epoch goes on from the samples
    taken; with --epochs, the run still ends at the end of the last epoch.
    """

    def __init__(self, args, name):
        check_run_flags(args)
        self.resume_from = checkpoint_to_resume(args, name)  # before anything is written
        self.args, self.name = args, name
        set_threads(args.threads)
        self.dist = setup_distributed(args.device, args.dist_timeout)
        self.device, self.is_main = self.dist.device, self.dist.is_main
        self.ckpt_path = checkpoint_path(args.out_dir, name)
        if self.dist.enabled:  # ranks that start afresh beside ranks that resume would train apart: refuse
            found = torch.tensor([self.resume_from is not None, self.resume_from is None], dtype=torch.float,
                                 device=self.device)
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
            if found.all():
                raise CheckpointError(f"Some ranks find the checkpoint {self.ckpt_path} and others do not: --resume "
                                      f"needs an --out-dir that every node reads (a shared file system).")
        reuse_freed_memory(self.device)
        self.precision = resolve_precision(args.precision, self.device)
        self.out_dir = Path(args.out_dir)
        self.results = self.out_dir / "results"
        self.tensorboard = None
        if self.is_main:  # each stage's record is named by it, so both stages can share an --out-dir
            check_writable(self.out_dir)
            self.results.mkdir(exist_ok=True)
            run_config_path(self.out_dir, name).write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
            if not args.no_tensorboard:  # a TensorBoard run per stage
                self.tensorboard = SummaryWriter(self.out_dir / "tensorboard" / name)
        seed_everything(args.seed + self.dist.rank)  # other noise per rank, the same model init after DDP's broadcast
        self.step = self.epoch = self.samples_in_epoch = 0  # samples: taken by all ranks together in this epoch
        self.resumed_world_size = self.dist.world_size
        self.config, self.checkpoint_state, self.log, self.bar, self.data = None, None, None, None, None
        self.stop = StopSignal(announce=self.is_main)
        self.stopped, self.nonfinite_in_a_row = False, 0
        self.forward_state = None  # run.guard(...): what a skipped step puts back besides the weights
        self.step_flags = torch.zeros(2, device=self.device)  # (non-finite loss, stop requested): one collective
        self.sums, self.count, self.shown = None, 0, {}  # shown: the values in the progress bar

    def resume(self, config):
        """With --resume and a checkpoint: check its config against `config` (a config dataclass), take its
        position, return it. A field the checkpoint predates counts with its default (the model it was then)."""
        self.config = asdict(config)
        if self.resume_from is None:
            if self.args.resume and self.is_main:  # --resume auto
                print(f"--resume auto: no checkpoint at {self.ckpt_path}: starting afresh.")
            return None
        ckpt = load_checkpoint(self.ckpt_path, trust=self.args.trust_checkpoint)
        check_same_config(asdict(config_from_dict(type(config), ckpt["config"])), self.config, self.ckpt_path)
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        # a checkpoint without world_size was written by code that resumed only with the same number of processes
        world_size, was = self.dist.world_size, ckpt.get("world_size", self.dist.world_size)
        self.samples_in_epoch = ckpt.get("samples_in_epoch", ckpt.get("batch_in_epoch", 0) * self.args.batch_size * was)
        self.resumed_world_size = was
        if self.is_main:
            print(f"Resumed from {self.ckpt_path} at step {self.step}.")
            if was != world_size:
                batch = self.args.batch_size * self.args.grad_accum
                print(f"The run had {was} processes and has {world_size}: global batch {batch * world_size} (was "
                      f"{batch * was}), learning rate {learning_rate(self.args, world_size):.3g} (was "
                      f"{learning_rate(self.args, was):.3g}); epoch {self.epoch} goes on after the "
                      f"{self.samples_in_epoch} samples it has used.")
        return ckpt

    def keep_ema(self, model, ckpt=None):
        """With --ema-decay: an EMA of `model`'s weights, resumed from the checkpoint's `ema`; else None."""
        if self.args.ema_decay is None:
            return None
        ema = EMA(model, self.args.ema_decay)
        if ckpt is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        return ema

    def training_images(self, dataset_path, default_path):
        """The training images' paths. At the script's default path, rank 0 first writes the demo flowers there (and
        says so) while the other ranks wait."""
        if self.is_main and dataset_path == default_path:
            write_default_demo_set(default_path)
        barrier()
        return find_images(dataset_path)

    def guard(self, *modules):
        """Keep what the forward passes of `modules` change (buffers, a quantizer's codes and counters) as it was before
        each step, to put back when the step is skipped."""
        self.forward_state = ForwardState(modules)

    def wrap(self, module):
        return wrap_model(module, self.dist, self.args.compile)

    def loader(self, dataset, batch_size):
        """A loader of this rank's shard, resumable mid-epoch; sets the number of steps of the run."""
        args, world_size = self.args, self.dist.world_size
        self.sampler = ResumableSampler(len(dataset), batch_size, shuffle=True, seed=args.seed, rank=self.dist.rank,
                                        world_size=world_size)
        batches_per_epoch = len(dataset) // world_size // batch_size
        if batches_per_epoch < args.grad_accum:
            readable = sum(not isinstance(dataset[i], Unreadable) for i in range(len(dataset)))  # a few files
            items = f"{len(dataset)} training items" if readable == len(dataset) else \
                f"{readable} readable training items (of {len(dataset)} files)"
            raise DataError(f"{items} make fewer than one step of --batch-size {batch_size} x --grad-accum "
                            f"{args.grad_accum} per process; add images or lower the batch size.")
        if args.max_steps is not None:
            self.max_steps = args.max_steps
        elif self.resumed_world_size == world_size:
            self.max_steps = args.epochs * (batches_per_epoch // args.grad_accum)
        else:  # the steps so far had another global batch: as many steps of this one as end the last epoch
            self.sampler.set_epoch(self.epoch, self.samples_in_epoch)
            batches_left = len(self.sampler) // batch_size + (args.epochs - self.epoch - 1) * batches_per_epoch
            self.max_steps = self.step + max(0, batches_left) // args.grad_accum
        self.batch_size = batch_size
        self.data = build_loader(dataset, batch_size, train=True, num_workers=args.num_workers, sampler=self.sampler)
        return self.data

    def steps(self, loader, checkpoint_state):
        """Yield the micro-batches of each optimizer step until --max-steps (or the epochs) or a stop signal.

        checkpoint_state(): the script's part of each checkpoint this run saves (models, optimizers, scalers ...).
        """
        self.checkpoint_state = checkpoint_state
        if self.is_main:
            self.log = MetricsLog(self.results / f"{self.name}_metrics.jsonl", resume=self.step > 0)
            self.log.truncate_after(self.step)
        self.bar = tqdm(total=self.max_steps, initial=self.step, desc=self.name, disable=not self.is_main,
                        dynamic_ncols=True)
        group = []  # a step's micro-batches may span an epoch's end
        while self.step < self.max_steps:
            self.sampler.set_epoch(self.epoch, self.samples_in_epoch)
            step_at_epoch_start, whole_epoch = self.step, self.samples_in_epoch == 0
            for batch in self.closing_bar_on_error(loader):
                self.samples_in_epoch += self.batch_size * self.dist.world_size
                if batch is None:  # every file of this batch was unreadable (the loader named them)
                    continue
                group.append(batch)
                if len(group) < self.args.grad_accum:
                    continue
                if self.forward_state is not None:
                    self.forward_state.save()
                yield group
                group = []
                if self.stopped:
                    self.save(f"received {self.stop.received or 'a stop signal'}")
                    return
                if self.step >= self.max_steps:
                    return
            if self.step == step_at_epoch_start and whole_epoch:
                self.bar.close()  # the error's line goes below the bar
                raise DataError(f"A whole epoch gave no usable batch: are the images in "
                                f"{self.args.dataset_path} readable?")
            self.epoch, self.samples_in_epoch = self.epoch + 1, 0

    def closing_bar_on_error(self, batches):
        """Yield from `batches`; an error they raise (a bad label map, ...) is printed on a line below the bar."""
        try:
            yield from batches
        except Exception:
            self.bar.close()
            raise

    def skip_update(self, losses):
        """True (on every rank alike) when a loss of the step (`losses`: each micro-batch's, 0-d tensors) is not
        finite on some rank: skip its update; the state kept by run.guard is put back.

        The step's one collective and one read: the non-finite flag and the stop flag travel together.
        """
        self.step_flags[0] = (~torch.isfinite(torch.stack([loss.detach().float() for loss in losses]))).any()
        self.step_flags[1].fill_(float(self.stop.received is not None))
        if self.dist.enabled:
            dist.all_reduce(self.step_flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = self.step_flags.tolist()
        self.stopped = self.stopped or stop > 0
        if not nonfinite:
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_in_a_row += 1
        if self.forward_state is not None:
            self.forward_state.restore()
        if self.is_main:
            print(f"Step {self.step}: non-finite loss, update skipped ({self.nonfinite_in_a_row} in a row).",
                  flush=True)
        if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            kept = f"The last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists() else "Nothing was saved"
            raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite losses in a row: stopping. {kept}; try a "
                                     f"lower --learning-rate.")
        return True

    def end_step(self, metrics, bar_keys=("loss",), **host_values):
        """Count the step; every --log-every steps (and at the end) log the means of `metrics` (0-d tensors) since
        the last log, read from the device at once, and `host_values` (numbers, e.g. the learning rate); every
        --save-every steps save."""
        self.step += 1
        self.bar.update(1)
        if self.is_main:
            values = torch.stack([v.detach().float() for v in metrics.values()])  # on the device: no wait
            self.sums, self.count = values if self.sums is None else self.sums + values, self.count + 1
            if self.step % self.args.log_every == 0 or self.step == self.max_steps or self.stopped:
                means = dict(zip(metrics, (self.sums / self.count).tolist()))
                self.sums, self.count = None, 0
                self.record(bar_keys, **means, **host_values)
        if self.step % self.args.save_every == 0:
            self.save()

    def record(self, bar_keys=(), **values):
        """Rank 0: log values of this step to the metrics file and TensorBoard; show `bar_keys` in the bar."""
        self.log.log(self.step, **values)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, self.step)
        self.shown.update({k: f"{values[k]:.3f}" for k in bar_keys if k in values})
        self.bar.set_postfix(self.shown)

    def save_grid(self, images, name, nrow, row_labels=None):
        """Rank 0: an image grid as results/<name>_<step>.png and in TensorBoard."""
        path = self.results / f"{name}_{self.step:07d}.png"
        save_image_grid(images, path, nrow=nrow, row_labels=row_labels)
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, to_image_range(images), self.step, dataformats="NCHW")
        return path

    def due(self, every):
        """True after a step that is a multiple of `every`, and after the last step."""
        return self.step % every == 0 or self.step == self.max_steps

    def save(self, reason=""):
        """Rank 0 writes the checkpoint atomically: the script's states, the run's position, config and flags."""
        if not self.is_main:
            return
        save_checkpoint(dict(**self.checkpoint_state(), step=self.step, epoch=self.epoch,
                             samples_in_epoch=self.samples_in_epoch, world_size=self.dist.world_size,
                             batch_in_epoch=self.samples_in_epoch // (self.batch_size * self.dist.world_size),
                             config=self.config, args=vars(self.args)),
                        self.ckpt_path)
        if reason:
            tqdm.write(f"Saved {self.ckpt_path} at step {self.step} ({reason}).")

    def finish(self):
        """Save the last checkpoint (unless a stop signal already did), report skipped files, leave torchrun."""
        self.bar.close()
        if not self.stopped:
            self.save("end of training")
        skipped = len(self.data.unreadable)
        if self.is_main and skipped:
            named = f"the first {MAX_NAMED_UNREADABLE} named above" if skipped > MAX_NAMED_UNREADABLE else "named above"
            print(f"Skipped {skipped} unreadable image file(s) during training ({named}).")
        if self.tensorboard is not None:
            self.tensorboard.close()
        cleanup_distributed()
        if self.stopped:
            raise Interrupted(self.stop.received or "SIGTERM")  # another rank's signal: torchrun's SIGTERM
        return self.ckpt_path


class ForwardState:
    """What training forward passes change besides the gradients: the modules' buffers (BatchNorm statistics, the EMA
    codebook's averages, usage and dead-code counts), each quantizer's codes (EMA updates, restarts, k-means) and step
    count. save() copies them on the device (no wait for it), restore() puts them back, so a non-finite batch leaves
    no trace in them."""

    def __init__(self, modules):
        tensors = {}  # by id: a tensor reachable twice is kept once
        for module in modules:
            tensors.update((id(t), t) for t in module.buffers())
            for quantizer in self.quantizers(module):
                tensors.update((id(p), p) for p in quantizer.parameters())
        self.tensors = list(tensors.values())
        self.copies = [torch.empty_like(t) for t in self.tensors]
        self.counted = [q for module in modules for q in self.quantizers(module)]
        self.train_steps = []

    @staticmethod
    def quantizers(module):
        return [m for m in module.modules() if isinstance(m, Quantizer)]

    @torch.no_grad()
    def save(self):
        for copy, tensor in zip(self.copies, self.tensors):
            copy.copy_(tensor)
        self.train_steps = [q.train_steps for q in self.counted]

    @torch.no_grad()
    def restore(self):
        for copy, tensor in zip(self.copies, self.tensors):
            tensor.copy_(copy)
        for quantizer, steps in zip(self.counted, self.train_steps):
            quantizer.train_steps = steps
