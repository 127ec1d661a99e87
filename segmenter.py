"""A small per-pixel classifier of (image, label map) pairs: it segments generated images, so that the mean IoU between
a condition and the segmentation of the images drawn for it measures how well they follow it.

    python segmenter.py --images data/flowers --labels data/flowers_labels --num-labels 4 \
        --val-images data/heldout --val-labels data/heldout_labels --out checkpoints/segmenter.pt

It is no part of the method: only a ruler. Its own held-out pixel accuracy and mean IoU (printed, and kept in the
checkpoint) say how far its readings of samples can be trusted.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cli import ScriptParser, run_script
from data import DataError, PairedFolder, build_loader
from eval_vqgan import confusion_matrix, segmentation_scores
from runtime import pick_device, seed_everything, set_threads


class PixelClassifier(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> class logits (B, num_labels, H, W): 3x3 convolutions whose dilations 1, 2, 4,
    8 let each pixel see a 31-pixel neighbourhood (a petal's colour next to the centre's), then a 1x1 classifier."""

    def __init__(self, num_labels, width=32):
        super().__init__()
        self.num_labels, self.width = num_labels, width
        layers, channels = [], 3
        for dilation in (1, 2, 4, 8):
            layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.GroupNorm(8, width),
                       nn.SiLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classify = nn.Conv2d(width, num_labels, 1)

    def forward(self, x):
        return self.classify(self.features(x))

    @torch.no_grad()
    def segment(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> class indices (B, H, W)."""
        return self(x.float()).argmax(dim=1)

    def checkpoint(self, **extra):
        return dict(model=self.state_dict(), config=dict(num_labels=self.num_labels, width=self.width), **extra)

    @classmethod
    def from_checkpoint(cls, path):
        """A trained classifier in eval mode; one sentence when the file is not one."""
        saved = load_checkpoint(path)
        if set(saved.get("config", {})) != {"num_labels", "width"}:
            raise CheckpointError(f"{path} is not a segmenter checkpoint (segmenter.py writes those).")
        model = cls(**saved["config"])
        model.load_state_dict(saved["model"])
        return model.eval()


@torch.no_grad()
def evaluate(model, pairs, device, batch_size=64):
    """(pixel accuracy, mean IoU over the classes present, {class: IoU}) of the model's segmentation of the pairs'
    images against their label maps."""
    model.eval()
    confusion = torch.zeros(model.num_labels, model.num_labels, dtype=torch.long)
    for batch in build_loader(pairs, batch_size, train=False):
        if batch is not None:
            pred = model.segment(batch["image"].to(device)).cpu()
            confusion += confusion_matrix(batch["cond"].argmax(1), pred, model.num_labels)
    return segmentation_scores(confusion)


def train(pairs, num_labels, steps, batch_size=32, lr=3e-3, device=torch.device("cpu"), seed=0):
    """A PixelClassifier trained by per-pixel cross-entropy on the (random crop and flip of the) pairs."""
    seed_everything(seed)
    model = PixelClassifier(num_labels).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)  # short runs: warm up, anneal
    loader, step = build_loader(pairs, min(batch_size, len(pairs)), train=True), 0  # a small set: one batch of all
    with tqdm(total=steps, desc="segmenter") as bar:
        while step < steps:
            epoch_start = step
            for batch in loader:
                if batch is None:
                    continue
                loss = F.cross_entropy(model(batch["image"].to(device)), batch["cond"].argmax(1).to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step == steps:
                    break
            if step == epoch_start:  # every file unreadable: no epoch would ever end the loop
                raise DataError(f"None of the {len(pairs)} pairs for the segmenter could be read.")
    return model.eval()


def main(args):
    set_threads(args.threads)
    device = pick_device(args.device)
    if args.steps <= 0 or args.num_labels < 2:
        raise ValueError(f"--steps must be positive and --num-labels at least 2, got {args.steps} and "
                         f"{args.num_labels}.")
    if bool(args.val_images) != bool(args.val_labels):
        raise ValueError("--val-images and --val-labels go together: the held-out images and their label maps.")
    pairs = PairedFolder(args.images, args.labels, args.image_size, train=True, cond_kind="segmentation",
                         num_labels=args.num_labels)
    model = train(pairs, args.num_labels, args.steps, args.batch_size, args.learning_rate, device, args.seed)
    scores = {}
    if args.val_images:
        held_out = PairedFolder(args.val_images, args.val_labels, args.image_size, train=False,
                                cond_kind="segmentation", num_labels=args.num_labels)
        accuracy, mean_iou, _ = evaluate(model, held_out, device)
        scores = dict(pixel_accuracy=accuracy, mean_iou=mean_iou, val_images=str(args.val_images))
        print(f"Held-out segmentation of {len(held_out)} images: pixel accuracy {accuracy:.4f}, mean IoU "
              f"{mean_iou:.4f}.")
    save_checkpoint(model.cpu().checkpoint(held_out=scores, steps=args.steps), args.out)
    print(f"Wrote {args.out}.")
    return model, scores


def build_parser():
    p = ScriptParser("Train the small per-pixel classifier that segments generated images for the mean-IoU "
                     "measurement of conditional samples.")
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--labels", required=True, help="their label maps: same relative path and stem (PNG, pixel = class)")
    p.add_argument("--num-labels", type=int, required=True, help="number of classes")
    p.add_argument("--val-images", default=None,
                   help="held-out images, to report the classifier's own accuracy (default: none)")
    p.add_argument("--val-labels", default=None, help="the held-out images' label maps (default: none)")
    p.add_argument("--image-size", type=int, default=32, help="training crop (the images are resized to cover it)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="crops per step")
    p.add_argument("--learning-rate", type=float, default=3e-3, help="peak of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="checkpoints/segmenter.pt", help="the checkpoint to write")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch's operators (default: all cores)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
