"""Evaluate a stage-1 VQGAN on a folder of images: PSNR, SSIM, LPIPS, codebook usage and perplexity, rFID.

    python eval_vqgan.py --checkpoint-path checkpoints/vqgan_last.pt --dataset-path data/val
    python eval_vqgan.py --checkpoint-path last.ckpt --taming-config model.yaml --dataset-path data/val

Every image is resized (shorter side) and center-cropped to --image-size, encoded, quantized and decoded. Writes the
metrics as JSON, a grid of originals over their reconstructions beside it, and prints a small table. The model's
--image-kind decides the metrics: gray maps get PSNR and SSIM on their one channel (LPIPS and rFID judge RGB images);
label maps (segmentation) get pixel accuracy and mean IoU of the argmax of the logits, and a grid in label colours.
"""
import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import ScriptParser, run_script
from codebook import codebook_usage
from config import check_positive
from data import DataError, ImageFolder, build_loader
from lpips import LPIPS, VGG16_WEIGHTS, lpips_available, vgg16_path
from runtime import pick_device, set_threads
from utils import for_display, save_image_grid, to_image_range
from vqgan import VQGAN

# TensorFlow's FID Inception weights as torch-fidelity ships them; its loader would download them on first use.
FID_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                   "weights-inception-2015-12-05-6726825d.pth")
PSNR_CAP = 100.0  # dB for identical images (MSE 0), so that a mean over images stays finite


# ---- image metrics (images in [0, 1]) ----

def psnr(x, y):
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1]: 10 log10(1 / MSE), capped at PSNR_CAP -> (B,)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp(min=10 ** (-PSNR_CAP / 10)))).float()


def gaussian_window(size=11, sigma=1.5):
    """(size, size) normalised Gaussian, the window of Wang et al. (2004)."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, y, size=11, sigma=1.5):
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (Wang et al. 2004) -> (B,).

    Local statistics under an 11x11 Gaussian window (sigma 1.5), each channel on its own, with the paper's
    constants C1 = (0.01 L)^2, C2 = (0.03 L)^2 for L = 1; the map over the valid window positions and the channels is
    averaged. Same as skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False).
    """
    B, C, H, W = x.shape
    if min(H, W) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {H}x{W}; raise --image-size.")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    window = gaussian_window(size, sigma).to(x.device).expand(C, 1, size, size)  # one filter per channel
    x, y = x.double(), y.double()

    def blur(t):
        return F.conv2d(t, window, groups=C)  # valid positions only: (B, C, H - size + 1, W - size + 1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


# ---- label maps ----

def confusion_matrix(target, pred, num_labels):
    """(num_labels, num_labels) int64 counts of pixels of class i (target, rows) predicted as class j (columns)."""
    pairs = target.flatten().long() * num_labels + pred.flatten().long()
    return torch.bincount(pairs, minlength=num_labels ** 2).reshape(num_labels, num_labels)


def segmentation_scores(confusion):
    """Pixel accuracy, mean IoU over the classes present in the targets, and those classes' IoU {class: IoU}.

    IoU of class c = |target c and predicted c| / |target c or predicted c|, over all pixels of the data set. A class
    absent from the targets is left out of the mean (predicting it still lowers the IoU of the class it covers)."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = (confusion.sum(1) > 0).nonzero().flatten().tolist()
    iou = {c: (hits[c] / union[c]).item() for c in present}
    accuracy = (hits.sum() / confusion.sum()).item()
    return accuracy, sum(iou.values()) / len(iou), iou


# ---- rFID: Fréchet distance between Inception features of originals and reconstructions ----

def inception_weights_path():
    """Where torch-fidelity (through torch.hub) keeps its weights: <torch hub dir>/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))


def load_inception(device):
    """torch-fidelity's InceptionV3 (2048-d pool features), or (None, why not); no download is ever attempted."""
    path = inception_weights_path()
    weights = f"put {os.path.basename(path)} (from {FID_WEIGHTS_URL}) in {os.path.dirname(path)}/"
    if importlib.util.find_spec("torch_fidelity") is None:
        return None, f"rfid is null: it needs torch-fidelity (pip install torch-fidelity) and its weights: {weights}."
    note = f"rfid is null: the FID Inception weights are missing: {weights}."
    if not os.path.isfile(path):  # offline, the package's download would fail or hang
        return None, note
    # Imported only now: rFID is optional, and the package takes seconds to import.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    except Exception as err:  # a truncated or corrupt weights file
        return None, f"{note} (The file there could not be loaded: {type(err).__name__}.)"
    return net.to(device), None


def inception_features(net, images):
    """(B, 3, H, W) in [0, 1] -> (B, D) float64 features of the 8-bit images (as if saved to PNG and read back)."""
    return net((images * 255).round().to(torch.uint8))[0].flatten(1).double().cpu()


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets, computed by torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    stats_a, stats_b = fid_features_to_statistics(features_a.double()), fid_features_to_statistics(features_b.double())
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])


# ---- model ----

def load_model(args):
    """Our stage-1 checkpoint or model folder, or a taming-transformers one when --taming-config is given; eval mode."""
    if args.taming_config:
        return VQGAN.from_taming(args.checkpoint_path, args.taming_config, stage=args.taming_stage,
                                 trust=args.trust_checkpoint)
    return VQGAN.from_checkpoint(args.checkpoint_path, trust=args.trust_checkpoint, ema=not args.no_ema,
                                 user="eval_vqgan.py")


# ---- main ----

@torch.no_grad()
def main(args):
    set_threads(args.threads)
    check_positive(args, "batch_size")
    if args.num_grid < 0:
        raise ValueError(f"--num-grid must not be negative, got {args.num_grid}.")
    device = pick_device(args.device)
    model = load_model(args).to(device)
    image_size = args.image_size or model.config.image_size
    f = model.config.downsample_factor
    if image_size % f:
        raise ValueError(f"--image-size {image_size} must divide by the model's downsampling factor {f}.")
    kind, num_labels = model.config.image_kind, model.config.num_labels
    dataset = ImageFolder(args.dataset_path, image_size, train=False, kind=kind, num_labels=num_labels)
    loader = build_loader(dataset, args.batch_size, train=False, num_workers=args.num_workers)

    notes = []
    lpips = inception = None
    if kind != "rgb":
        notes.append(f"lpips and rfid are null: their networks judge RGB images, not {kind} maps.")
    else:
        if lpips_available():
            lpips = LPIPS().to(device)
        else:
            vgg = vgg16_path()
            notes.append(f"lpips is null: LPIPS needs torchvision's ImageNet VGG16 weights: put "
                         f"{os.path.basename(vgg)} (from {VGG16_WEIGHTS.url}) in {os.path.dirname(vgg)}/.")
        inception, note = load_inception(device)
        if note:
            notes.append(note)

    sums = dict(psnr=0.0, ssim=0.0, lpips=0.0)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)  # segmentation: (target, predicted) counts
    all_indices, feats_real, feats_rec, grid_real, grid_rec = [], [], [], [], []
    num_images = 0
    for batch in tqdm(loader, desc="eval", dynamic_ncols=True):
        if batch is None:  # every file of this batch was unreadable (the loader named them)
            continue
        x = batch["image"].to(device)  # (B, C, H, W): in [-1, 1], or one-hot label maps
        x_rec, indices, _ = model(x)
        if kind == "segmentation":  # logits: the predicted class is their argmax
            confusion += confusion_matrix(x.argmax(1), x_rec.argmax(1), num_labels).cpu()
        else:
            x_rec = x_rec.float().clamp(-1, 1)
            real, rec = to_image_range(x), to_image_range(x_rec)
            sums["psnr"] += psnr(real, rec).sum().item()
            sums["ssim"] += ssim(real, rec).sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(x, x_rec).sum().item()
        if inception is not None:
            feats_real.append(inception_features(inception, real))
            feats_rec.append(inception_features(inception, rec))
        all_indices.append(indices.flatten().cpu())
        if sum(len(g) for g in grid_real) < args.num_grid:
            grid_real.append(for_display(x, kind).cpu())
            grid_rec.append(for_display(x_rec, kind).cpu())
        num_images += len(x)
    if num_images == 0:
        raise DataError(f"None of the images in {args.dataset_path} could be read.")

    usage, perplexity = codebook_usage(torch.cat(all_indices), model.config.num_codebook_vectors)
    rfid = None
    if inception is not None:
        if num_images < 2:
            notes.append("rfid is null: the Fréchet distance needs at least 2 images.")
        else:
            rfid = frechet_distance(torch.cat(feats_real), torch.cat(feats_rec))
            if num_images < 2048:  # fewer images than feature dimensions: a rank-deficient covariance
                notes.append(f"rfid on {num_images} images is biased upwards; compare only values on the same set.")
    if loader.unreadable:
        notes.append(f"{len(loader.unreadable)} unreadable image file(s) were skipped (named on stderr).")
    scores = dict(psnr=None, ssim=None)  # label maps: pixel accuracy and mean IoU instead
    if kind == "segmentation":
        accuracy, mean_iou, iou = segmentation_scores(confusion)
        scores.update(pixel_accuracy=accuracy, mean_iou=mean_iou, iou_per_class={str(c): v for c, v in iou.items()})
        notes.append(f"psnr and ssim are null for label maps; mean_iou averages the {len(iou)} classes present in the "
                     f"data ({', '.join(map(str, iou))}) of {num_labels}.")
    else:
        scores.update(psnr=sums["psnr"] / num_images, ssim=sums["ssim"] / num_images)
    metrics = dict(image_kind=kind, **scores,
                   lpips=sums["lpips"] / num_images if lpips is not None else None,
                   codebook_usage=usage, perplexity=perplexity, rfid=rfid, num_images=num_images,
                   image_size=image_size, num_codes=model.config.num_codebook_vectors,
                   checkpoint=str(args.checkpoint_path), dataset=str(args.dataset_path), notes=notes)

    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(metrics, indent=2) + "\n")
    grid_path = out_json.parent / "reconstructions.png"
    if args.num_grid > 0:  # originals in the top row, their reconstructions below
        n = min(args.num_grid, num_images)
        save_image_grid(torch.cat([torch.cat(grid_real)[:n], torch.cat(grid_rec)[:n]]), grid_path, nrow=n)

    print_table(metrics)
    for note in notes:
        print(f"note: {note}")
    print(f"Wrote {out_json}" + (f" and {grid_path}" if args.num_grid > 0 else "") + ".")
    return metrics


def print_table(metrics):
    """The metrics as two aligned columns; null values print as n/a."""
    def value(key, form):
        return "n/a" if metrics.get(key) is None else format(metrics[key], form)

    if metrics["image_kind"] == "segmentation":
        scores = [("pixel accuracy", value("pixel_accuracy", ".4f")), ("mean IoU", value("mean_iou", ".4f"))]
    else:
        scores = [("PSNR (dB)", value("psnr", ".2f")), ("SSIM", value("ssim", ".4f"))]
    rows = [("images", f"{metrics['num_images']}"), *scores, ("LPIPS", value("lpips", ".4f")),
            ("codebook usage", f"{metrics['codebook_usage']:.3f} of {metrics['num_codes']} codes"),
            ("perplexity", f"{metrics['perplexity']:.1f}"), ("rFID", value("rfid", ".2f"))]
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")


# ---- command line ----

def build_parser():
    p = ScriptParser("Reconstruct a folder of images with a stage-1 VQGAN and measure it.")
    a = p.add_argument
    a("--checkpoint-path", required=True, help="our vqgan_last.pt, a stage-1 model folder of export.py (local or a "
      "Hub id), or taming's last.ckpt with --taming-config")
    a("--taming-config", default=None,
      help="taming-transformers' model.yaml for a taming checkpoint (default: ours, no yaml)")
    a("--taming-stage", choices=["first_stage", "cond_stage"], default=None,
      help="which VQ model of a taming Net2NetTransformer checkpoint to evaluate (needed for those only)")
    a("--dataset-path", required=True, help="folder of images, searched recursively")
    a("--image-size", type=int, default=None, help="center-crop size; default: the model's training size")
    a("--batch-size", type=int, default=16, help="images per batch")
    a("--device", default=None, help="cuda, cuda:1, cpu ...; default: CUDA when available")
    a("--num-workers", type=int, default=2, help="data-loading worker processes")
    a("--num-grid", type=int, default=8, help="images in reconstructions.png (0: no grid)")
    a("--out-json", default="results/eval_vqgan.json", help="metrics file; reconstructions.png goes beside it")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    a("--threads", type=int, default=None, help="CPU threads of torch's operators (default: torch's, all cores)")
    a("--no-ema", action="store_true", help="the trained weights, not the EMA weights a run with --ema-decay kept")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
