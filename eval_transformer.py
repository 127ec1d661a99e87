"""Measure a stage-2 model: sample N images and compare them with reference images (FID, IS, KID, precision/recall),
and the GPT's validation loss on the reference images' codes (bits per token for ar; for maskgit, nats per masked
token at fixed masking ratios).

    python eval_transformer.py --checkpoint-path checkpoints/transformer_last.pt --reference data/val
    python eval_transformer.py ... --num-samples 50000 --top-k 600 --out-json results/topk600.json
    python eval_transformer.py ... --features random-conv    # no Inception weights: a fixed stand-in network
    python eval_transformer.py ... --num-samples 50000 --reference VIRTUAL_imagenet256_labeled.npz --save-npz s.npz
                                                              # ADM's reference batch; the samples for its evaluator
    python eval_transformer.py ... --cond-path data/val_labels --segmenter checkpoints/segmenter.pt  # conditions
    python eval_transformer.py --checkpoint-path last.ckpt --taming-config model.yaml ...  # taming's Net2Net models

Samples are drawn as sample_transformer.py draws them (batched; KV-cached, or in maskgit's --steps passes) at the
model's training size; reference images are resized (shorter side) and centre-cropped to that size. Both go to the
feature network as 8-bit images. The reference features are cached beside the JSON, keyed by the folder's files, the
image size and the network, so a sweep over sampling settings computes them once. Numbers are comparable only under
the same printed protocol.
An ADM reference batch (.npz) counts by its mu/sigma statistics as given (FID only), or with --npz-images by its arr_0
images like a folder; --save-npz writes the samples as ADM's evaluator reads them (docs/share.md: which FID compares
with which paper).

With --cond-path (the reference images' conditions, paired by relative path and stem), sample i is drawn for the
condition of pair i (in turn) by a model with an image condition, and every model's sample i is compared with pair i:
the PSNR to its image and, with --segmenter (segmenter.py) for label maps, the mean IoU between its segmentation and
the label map. For a model that reads no condition these are the chance levels the conditional figures are judged by.
"""
import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import adm_npz
import eval_vqgan
import maskgit
import sample_transformer
from checkpoint import load_checkpoint, save_checkpoint
from cli import ScriptParser, run_script
from config import check_positive
from data import (DataError, ImageFolder, PairedFolder, Unreadable, build_loader, collate_images, find_images,
                  say_unreadable)
from eval_vqgan import confusion_matrix, segmentation_scores
from runtime import autocast, pick_device, resolve_precision, seed_everything, set_threads
from segmenter import PixelClassifier
from utils import save_image_grid, to_image_range

# torch-fidelity's defaults (those of the papers that introduced each metric).
ISC_SPLITS = 10            # Inception Score: mean over 10 splits of the samples
KID_SUBSETS = 100          # KID: the polynomial-kernel MMD averaged over 100 random subsets ...
KID_SUBSET_SIZE = 1000     # ... of 1000 features each (fewer when a set is smaller)
PRC_NEIGHBORHOOD = 3       # precision/recall: each point's manifold ball reaches its 3rd nearest neighbour
MIN_IMAGES = PRC_NEIGHBORHOOD + 1  # a 3rd nearest neighbour needs 4 points per set
METRIC_KEYS = ("fid", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "psnr_to_reference",
               "sample_pixel_accuracy", "sample_mean_iou")


# ---- feature networks: (B, 3, H, W) uint8 -> (pool features (B, D), logits (B, C)), with a .name ----

class RandomConvFeatures(nn.Module):
    """A fixed, randomly initialised two-layer conv net: a deterministic stand-in for Inception where its weights are
    missing (tests, CPU demos). Its numbers are comparable only with each other, never with published ones."""

    def __init__(self, seed=0, width=64, num_logits=16):
        super().__init__()
        self.name = f"random-conv-{width}-seed{seed}"  # part of the reference cache's key
        self.conv1 = nn.Conv2d(3, width // 2, 4, stride=2)
        self.conv2 = nn.Conv2d(width // 2, width, 4, stride=2)
        self.head = nn.Linear(width, num_logits)  # logits for the Inception Score
        g = torch.Generator().manual_seed(seed)  # the same weights in every process and on every machine
        for p in self.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.data = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        self.requires_grad_(False).eval()

    def forward(self, images):
        x = images.float() / 127.5 - 1
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, width, H/4 - 2, W/4 - 2)
        pool = x.mean(dim=(2, 3))  # (B, width)
        return pool, self.head(pool)


def load_feature_extractor(kind, device):
    """The feature network named by --features, or (None, why not); Inception's weights are never downloaded."""
    null = "fid, isc, kid, precision and recall are null"
    if importlib.util.find_spec("torch_fidelity") is None:  # it computes the metrics, whatever the features
        return None, f"{null}: they are computed by torch-fidelity (pip install torch-fidelity)."
    if kind == "random-conv":
        return RandomConvFeatures().to(device), None
    path = eval_vqgan.inception_weights_path()
    weights = f"put {os.path.basename(path)} (from {eval_vqgan.FID_WEIGHTS_URL}) in {os.path.dirname(path)}/"
    note = f"{null}: the FID Inception weights are missing: {weights} (or measure with --features random-conv)."
    if not os.path.isfile(path):  # offline, the package's download would fail or hang
        return None, note
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    try:  # 2048-d pool features (FID, KID, precision/recall) and the 1008 logits (IS), as torch-fidelity uses them
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=path)
    except Exception as err:  # a truncated or corrupt weights file
        return None, f"{note} (The file there could not be loaded: {type(err).__name__}.)"
    return net.to(device), None


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> uint8, as if saved to PNG and read back."""
    return (to_image_range(images.float()) * 255).round().to(torch.uint8)


@torch.no_grad()
def extract(extractor, images):
    """Pool features and logits (float64, CPU) of (B, 3, H, W) images in [-1, 1]."""
    pool, logits = extractor(to_uint8(images))
    return pool.flatten(1).double().cpu(), logits.flatten(1).double().cpu()


# ---- the metrics, from features ----

def fidelity_metrics(gen, ref, gen_logits, ref_statistics=None):
    """FID, IS, KID and precision/recall of generated features gen (N, D) against reference features ref (M, D),
    computed by torch-fidelity's own functions; gen_logits (N, C) give the Inception Score. With ref None, the FID
    is against ref_statistics {mu, sigma} and KID, precision and recall (which need features) are None."""
    # Imported only here, as in eval_vqgan.py: the package takes seconds to import and the script runs without it.
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    gen = gen.double()
    reference = ref_statistics if ref is None else fid_features_to_statistics(ref.double())
    fid = fid_statistics_to_metric(fid_features_to_statistics(gen), reference, verbose=False)
    isc = isc_features_to_metric(gen_logits, splits=min(ISC_SPLITS, len(gen_logits)))
    if ref is None:
        return dict(fid=fid[KEY_METRIC_FID], isc=isc[KEY_METRIC_ISC_MEAN], isc_std=isc[KEY_METRIC_ISC_STD],
                    kid=None, kid_std=None, precision=None, recall=None)
    ref = ref.double()
    kid = kid_features_to_metric(gen, ref, kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset_size(len(gen), len(ref)),
                                 verbose=False)
    # Generated first, reference second (torch-fidelity's convention); in blocks when the distance matrix is large.
    prc = prc_features_to_metric(gen.float(), ref.float(), prc_neighborhood=PRC_NEIGHBORHOOD, verbose=False,
                                 save_cpu_ram=len(gen) * len(ref) > 10 ** 8)
    return dict(fid=fid[KEY_METRIC_FID], isc=isc[KEY_METRIC_ISC_MEAN], isc_std=isc[KEY_METRIC_ISC_STD],
                kid=kid[KEY_METRIC_KID_MEAN], kid_std=kid[KEY_METRIC_KID_STD],
                precision=prc[KEY_METRIC_PRECISION], recall=prc[KEY_METRIC_RECALL])


def kid_subset_size(num_gen, num_ref):
    return min(KID_SUBSET_SIZE, num_gen, num_ref)


# ---- reference features, cached ----

def reference_key(paths, image_size, extractor_name):
    """Hash of the sorted files (path, size, modification time), the crop size and the feature network."""
    h = hashlib.sha256(f"{extractor_name}|{image_size}\n".encode())
    for path in sorted(paths):
        st = os.stat(path)
        h.update(f"{Path(path).resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_cache_path(cache_dir, reference, key, image_size):
    return Path(cache_dir) / f"reference_{Path(reference).resolve().name}_{image_size}px_{key[:16]}.pt"


def reference_features(reference, image_size, extractor, device, cache_dir, batch_size, num_workers):
    """Features (M, D) float64 of the reference folder's (or .npz's arr_0) centre crops: from the cache, or computed
    and cached.

    A .pt file in place of a folder is a cache written before (e.g. from a folder that is not on this machine)."""
    npz = Path(reference).suffix == ".npz"
    if Path(reference).is_file() and not npz:
        cache = Path(reference)
        saved = load_checkpoint(cache)
        if (saved.get("extractor"), saved.get("image_size")) != (extractor.name, image_size):
            raise DataError(f"The reference statistics {cache} are of {saved.get('extractor')} at "
                            f"{saved.get('image_size')} px, not of {extractor.name} at {image_size} px.")
        return saved["features"].double(), saved, cache, True
    paths = [Path(reference)] if npz else find_images(reference)
    cache = reference_cache_path(cache_dir, reference, reference_key(paths, image_size, extractor.name), image_size)
    if cache.is_file():
        saved = load_checkpoint(cache)
        return saved["features"].double(), saved, cache, True
    features, skipped = [], 0
    loader = adm_npz.image_batches(reference, image_size, batch_size) if npz else \
        build_loader(ImageFolder(reference, image_size, train=False, paths=paths), batch_size, train=False,
                     num_workers=num_workers)
    for batch in tqdm(loader, desc="reference features", dynamic_ncols=True):
        if batch is None:  # every file of this batch was unreadable (the loader named them)
            skipped += batch_size
            continue
        skipped += batch["skipped"]
        features.append(extract(extractor, batch["image"].to(device))[0])
    if not features:
        raise DataError(f"None of the images in {reference} could be read.")
    saved = dict(features=torch.cat(features).float(), extractor=extractor.name, image_size=image_size,
                 reference=str(Path(reference).resolve()), num_files=sum(map(len, features)) if npz else len(paths),
                 skipped=skipped)
    save_checkpoint(saved, cache)  # atomic: a sweep's parallel jobs never read half a file
    return saved["features"].double(), saved, cache, False


def load_reference(args, size, extractor, device, cache_dir):
    """The reference side: features (M, D) of a folder, a features .pt or an .npz's images, or, for an .npz with
    mu/sigma (unless --npz-images), those statistics; with what was saved of it, its cache and its image count."""
    if Path(args.reference).suffix == ".npz" and not args.npz_images:
        statistics = adm_npz.read_statistics(args.reference, feature_dim(extractor, size, device))
        if statistics is not None:
            print(f"Using the mu/sigma statistics of {args.reference} as given.")
            return None, statistics, dict(reference=str(Path(args.reference).resolve())), None, None
    ref, saved, cache, reused = reference_features(args.reference, size, extractor, device, cache_dir,
                                                   args.batch_size, args.num_workers)
    print(f"{'Reused' if reused else 'Wrote'} the reference features {cache} ({len(ref)} images).")
    if len(ref) < MIN_IMAGES:
        raise DataError(f"The reference set has {len(ref)} readable images; the metrics need at least {MIN_IMAGES}.")
    return ref, None, saved, cache, len(ref)


# ---- the model's side: samples and validation loss ----

def check_args(args, model):
    check_positive(args, "num_samples", "batch_size", "temperature")
    if args.num_samples < MIN_IMAGES:
        raise ValueError(f"--num-samples must be at least {MIN_IMAGES}: precision and recall reach each sample's "
                         f"{PRC_NEIGHBORHOOD}rd nearest neighbour.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.class_id is not None and not 0 <= args.class_id < max(model.num_classes, 1):
        raise ValueError(f"--class-id {args.class_id} is not a class of this model ({model.num_classes} classes)."
                         if model.num_classes else "--class-id needs a model trained with --conditional.")
    if args.cfg_scale is not None and not model.guidable:
        raise ValueError("This model was trained without a null class or a null condition, so it cannot use "
                         "--cfg-scale: train it with --conditional --class-dropout P or --cond-dropout P (P > 0).")
    if model.cond_vqgan is not None and not args.cond_path:
        raise ValueError(f"This model draws images for conditions ({model.cond_kind}): pass the reference images' "
                         f"conditions with --cond-path.")
    if args.cond_path and not Path(args.reference).is_dir():
        raise ValueError(f"--cond-path pairs the reference images with their conditions: --reference must be their "
                         f"folder, not the file {args.reference}.")
    if args.segmenter and not args.cond_path:
        raise ValueError("--segmenter compares samples with label maps: pass the reference images' with --cond-path.")
    if args.segmenter and model.cond_kind not in (None, "segmentation"):
        raise ValueError(f"--segmenter needs label maps as conditions; this model's are {model.cond_kind}.")


def class_labels(model, args, first, n, device):
    """Labels of samples first .. first + n - 1: --class-id, else every class in turn (conditional), else None."""
    if args.class_id is not None:
        return torch.full((n,), args.class_id, device=device)
    if model.num_classes:
        return (first + torch.arange(n, device=device)) % model.num_classes
    return None


def feature_dim(extractor, image_size, device):
    """The width D of the network's pool features, from one blank image."""
    return extract(extractor, torch.zeros(1, 3, image_size, image_size, device=device))[0].shape[1]


def pairs_of(model, args, segmenter):
    """The reference pairs of --cond-path (PairedFolder at the model's size, centre crops), read as the model's
    condition kind, or as label maps for the segmenter; None without --cond-path."""
    if not args.cond_path:
        return None
    kind = model.cond_kind or ("segmentation" if segmenter is not None else "rgb")
    num_labels = model.cond_vqgan.config.num_labels if model.cond_vqgan is not None else \
        segmenter.num_labels if segmenter is not None else 0
    return PairedFolder(args.reference, args.cond_path, model.image_size, train=False, cond_kind=kind,
                        num_labels=num_labels)


@torch.no_grad()
def sample_features(model, sample_canvas, args, extractor, device, precision, num_grid, pairs=None, segmenter=None):
    """Features (N, D) and logits (N, C) of --num-samples new images drawn by sample_canvas (maskgit.canvas_sampler;
    None without a network), and the first num_grid of them; with --save-npz the images also go to ADM's sample file
    (arr_0 uint8 N x H x W x 3, arr_1 labels). With pairs (sample i drawn for, and compared with, pair i mod M;
    unreadable pairs left out): the samples' PSNR to their pair's image (N,) and the confusion matrix of their
    segmentation against the pairs' label maps (segmenter). Returns (features, logits, grid, PSNRs, confusion, N)."""
    features, logits, grid, psnrs, confusion = [], [], [], [], None
    H, W = (s * model.vqgan.config.downsample_factor for s in model.latent_hw)
    images_u8 = np.empty((args.num_samples, H, W, 3), np.uint8) if args.save_npz else None  # 9.8 GB at 50000 x 256^2
    labels_all, done, unreadable = [], 0, set()
    for first in tqdm(range(0, args.num_samples, args.batch_size), desc="sampling", dynamic_ncols=True):
        n = min(args.batch_size, args.num_samples - first)
        batch = [] if pairs is None else [pairs[(first + k) % len(pairs)] for k in range(n)]
        for item in batch:
            if isinstance(item, Unreadable) and item.path not in unreadable:  # named once, however often drawn
                unreadable.add(item.path)
                say_unreadable(*item)
        items = None if pairs is None else collate_images(batch)
        if pairs is not None and items is None:
            continue  # every pair of this batch was unreadable
        n = n if items is None else len(items["image"])
        labels = class_labels(model, args, first, n, device)
        with autocast(precision, device):
            condition = {} if model.cond_vqgan is None else dict(cond=model.encode_condition(items["cond"].to(device)))
            tokens = sample_canvas(n, model.latent_hw, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, labels=labels, cfg_scale=args.cfg_scale, **condition)  # (n, h, w)
            images = model.indices_to_image(tokens).float()  # (n, 3, H, W) in [-1, 1]
        if extractor is not None:
            pool, logit = extract(extractor, images)
            features.append(pool)
            logits.append(logit)
        if images_u8 is not None:  # the 8-bit images the feature network saw
            images_u8[done:done + n] = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
            labels_all += [] if labels is None else labels.tolist()
        if items is not None:
            psnrs.append(eval_vqgan.psnr(to_image_range(images), to_image_range(items["image"].to(device))))
        if segmenter is not None:
            counts = confusion_matrix(items["cond"].argmax(1), segmenter.segment(images).cpu(), segmenter.num_labels)
            confusion = counts if confusion is None else confusion + counts
        if sum(map(len, grid)) < num_grid:
            grid.append(images.cpu())
        done += n
    if images_u8 is not None:
        adm_npz.write_samples(args.save_npz, images_u8[:done], labels_all if model.num_classes else None)
    return (torch.cat(features) if features else None, torch.cat(logits) if logits else None,
            torch.cat(grid)[:num_grid] if grid else None, torch.cat(psnrs).cpu() if psnrs else None, confusion, done)


def masked_loss_names(model):
    """maskgit's validation losses: nats per masked token at each fixed masking ratio (not a likelihood, so no bits
    per token); none for ar."""
    if model.config.objective != "maskgit":
        return []
    return [maskgit.validation_key(ratio) for ratio in maskgit.VALIDATION_RATIOS]


@torch.no_grad()
def validation_losses(model, reference, batch_size, num_workers, device, precision, max_batches, cond_path=None):
    """The GPT's mean validation losses on the codes of the reference centre crops (and of their conditions under
    cond_path) ({name: nats}, as VQGANTransformer.validation_losses names them), or ({}, why not)."""
    names = masked_loss_names(model) or ["val_bits_per_token"]
    null = f"{', '.join(names)} {'are' if len(names) > 1 else 'is'} null"
    try:
        if model.cond_vqgan is not None:
            dataset = PairedFolder(reference, cond_path, model.image_size, train=False,
                                   with_labels=bool(model.num_classes), cond_kind=model.cond_kind,
                                   num_labels=model.cond_vqgan.config.num_labels)
        else:
            dataset = ImageFolder(reference, model.image_size, train=False, with_labels=bool(model.num_classes))
    except DataError as err:  # a class-conditional model, but no class sub-folders
        return {}, f"{null}: {err}"
    if model.num_classes and dataset.classes != list(model.classes or []):
        return {}, (f"{null}: the class sub-folders of {reference} ({', '.join(dataset.classes)}) are not the model's "
                    f"classes ({', '.join(model.classes or [])}).")
    totals, count = {}, 0
    generator = torch.Generator().manual_seed(0)  # maskgit: the same masked positions in every run
    for i, batch in enumerate(build_loader(dataset, batch_size, train=False, num_workers=num_workers)):
        if max_batches is not None and i >= max_batches:
            break
        if batch is None:
            continue
        x = batch["image"].to(device)
        labels = batch["label"].to(device) if "label" in batch else None
        with autocast(precision, device):  # the model is in eval mode: no input noise
            cond = model.encode_condition(batch["cond"].to(device)) if "cond" in batch else None
            losses = model.validation_losses(model.encode_to_indices(x), labels, generator, cond)
        for name, loss in losses.items():
            totals[name] = totals.get(name, 0.0) + loss.float().item() * len(x)
        count += len(x)
    if not count:
        return {}, f"{null}: no reference image was read."
    return {name: total / count for name, total in totals.items()}, None


# ---- main ----

def main(args, feature_extractor=None):
    """feature_extractor: a network to use instead of --features (tests pass a small stand-in)."""
    set_threads(args.threads)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    model = sample_transformer.load_model(args, device, user="eval_transformer.py")
    check_args(args, model)
    segmenter = PixelClassifier.from_checkpoint(args.segmenter).to(device) if args.segmenter else None
    pairs = pairs_of(model, args, segmenter)
    sample_canvas = maskgit.canvas_sampler(model, args.steps, args.choice_temperature)  # by the objective
    if not Path(args.reference).is_file():
        find_images(args.reference)  # a missing or empty folder is an error before anything is sampled
    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    size, notes = model.image_size, []

    extractor, note = (feature_extractor, None) if feature_extractor is not None else \
        load_feature_extractor(args.features, device)
    metrics = dict.fromkeys(METRIC_KEYS)
    num_samples, num_ref, cache, saved, statistics = 0, None, None, {}, None
    if extractor is None:
        notes.append(note)
    else:
        ref, statistics, saved, cache, num_ref = load_reference(args, size, extractor, device,
                                                                args.cache_dir or out_json.parent)
        if saved.get("skipped"):
            notes.append(f"{saved['skipped']} unreadable reference image(s) were skipped.")
    if extractor is not None or args.save_npz:  # the samples of an .npz for ADM's evaluator need no features here
        seed_everything(args.seed)
        gen, gen_logits, grid, psnrs, confusion, num_samples = sample_features(
            model, sample_canvas, args, extractor, device, precision, args.num_grid, pairs, segmenter)
        if psnrs is not None:
            metrics["psnr_to_reference"] = psnrs.mean().item()
        if confusion is not None:
            metrics["sample_pixel_accuracy"], metrics["sample_mean_iou"], _ = segmentation_scores(confusion)
        if args.num_grid > 0:
            save_image_grid(grid, out_json.with_name(f"{out_json.stem}_samples.png"), nrow=min(8, len(grid)))
        if args.save_npz:
            print(f"Wrote the {num_samples} samples to {args.save_npz} (arr_0" + (", arr_1 labels" if model.num_classes
                                                                                 else "") + ") for ADM's evaluator.")
    if extractor is not None:
        metrics.update(fidelity_metrics(gen, ref, gen_logits, statistics))
        if statistics is not None:
            notes.append(f"kid, precision and recall are null: {args.reference} gives statistics, not features (pass "
                         f"--npz-images to use its arr_0 images).")
        if min(num_samples, num_ref or math.inf) < 2048 and extractor.name.startswith("inception"):
            notes.append(f"fid on {min(num_samples, num_ref or math.inf)} images is biased upwards (fewer than the "
                         f"2048 feature dimensions); compare only values under the same protocol.")

    val = {}
    if Path(args.reference).is_dir() and args.val_batches != 0:  # images, not a statistics file
        val, note = validation_losses(model, args.reference, args.batch_size, args.num_workers, device, precision,
                                      args.val_batches, args.cond_path)
        if note:
            notes.append(note)
    val_loss = val.get("val_loss")  # ar's
    # A features file (.pt) names the folder it was computed from.
    protocol = dict(reference=saved.get("reference") or str(Path(args.reference).resolve()), reference_images=num_ref,
                    image_size=size, feature_extractor=getattr(extractor, "name", None),
                    resize=("reference: the mu/sigma of the .npz as given" if statistics is not None else
                            f"reference: shorter side resized to {size} px, centre crop {size}x{size}")
                    + f"; samples drawn at {size}x{size}; 8-bit images to the feature network",
                    num_samples=args.num_samples, isc_splits=min(ISC_SPLITS, args.num_samples),
                    kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset_size(args.num_samples, num_ref or math.inf),
                    prc_neighborhood=PRC_NEIGHBORHOOD,
                    pairs=None if pairs is None else dict(conditions=str(Path(args.cond_path).resolve()),
                                                          num_pairs=len(pairs), segmenter=args.segmenter))
    sampling = dict(objective=model.config.objective, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                    cfg_scale=args.cfg_scale, class_id=args.class_id, seed=args.seed, ema=model.uses_ema)
    if model.config.objective == "maskgit":
        sampling.update(sample_canvas.keywords)  # --steps and --choice-temperature, their defaults filled in
    result = dict(**metrics, val_loss=val_loss, val_bits_per_token=None if val_loss is None else val_loss / math.log(2),
                  **{name: val.get(name) for name in masked_loss_names(model)}, num_samples=num_samples,
                  protocol=protocol, sampling=sampling, checkpoint=str(args.checkpoint_path),
                  reference_cache=None if cache is None else str(cache), samples_npz=args.save_npz, notes=notes)
    out_json.write_text(json.dumps(result, indent=2) + "\n")

    for key, value in protocol.items():
        print(f"protocol: {key} = {value}")
    print_table(result)
    for note in notes:
        print(f"note: {note}")
    print(f"Wrote {out_json}.")
    return result


def print_table(result):
    """The numbers as two aligned columns, in significant digits (the stand-in network's FIDs are small); null
    values print as n/a."""
    def fmt(key, spec, std=None):
        value = result[key]
        if value is None:
            return "n/a"
        return f"{value:{spec}}" + (f" ± {result[std]:{spec}}" if std else "")

    rows = [("samples", str(result["num_samples"])), ("FID", fmt("fid", ".4g")),
            ("Inception Score", fmt("isc", ".4g", "isc_std")), ("KID", fmt("kid", ".3g", "kid_std")),
            ("precision", fmt("precision", ".3f")), ("recall", fmt("recall", ".3f"))]
    if result["sampling"]["objective"] == "maskgit":  # nats per masked token at each fixed ratio
        rows += [(f"val loss, {round(100 * ratio)}% masked", fmt(maskgit.validation_key(ratio), ".3f"))
                 for ratio in maskgit.VALIDATION_RATIOS]
    else:
        rows.append(("val bits per token", fmt("val_bits_per_token", ".3f")))
    if result["protocol"]["pairs"] is not None:
        rows += [("PSNR to the pair's image", fmt("psnr_to_reference", ".2f")),
                 ("mean IoU to the pair's labels", fmt("sample_mean_iou", ".4f"))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


# ---- command line ----

def build_parser():
    p = ScriptParser("Sample from a stage-2 model and measure the samples against reference images (FID, IS, KID, "
                     "precision/recall) and its validation loss.")
    a = p.add_argument
    a("--checkpoint-path", required=True,
      help="a stage-2 checkpoint (transformer_last.pt), or a stage-2 model folder of export.py (local or a Hub id)")
    sample_transformer.add_model_flags(a)
    a("--cond-path", default=None, help="the reference images' conditions (same relative path and stem): a model "
      "with an image condition draws sample i for pair i in turn, and sample i is compared with pair i (PSNR; mean "
      "IoU with --segmenter) (default: none)")
    a("--segmenter", default=None, help="a segmenter.py checkpoint: the samples' segmentation against the label maps "
      "of --cond-path gives sample_mean_iou (default: none)")
    a("--reference", required=True,
      help="folder of reference images (searched recursively), a reference_*.pt features file written before, or an "
           "ADM reference batch .npz (its mu/sigma statistics: FID only; or with --npz-images its arr_0 images)")
    a("--npz-images", action="store_true",
      help="with an .npz --reference: features of its arr_0 images by --features, not its mu/sigma")
    a("--save-npz", default=None, metavar="PATH",
      help="also write the samples as ADM's evaluator reads them: arr_0 uint8 N x H x W x 3, arr_1 the labels of a "
           "class-conditional model (all in memory: 9.8 GB for 50000 at 256 px; default: none)")
    a("--num-samples", type=int, default=1000, help="images to generate, at least 4 (published FIDs use 50000)")
    a("--batch-size", type=int, default=32, help="images sampled (and reference images read) at a time")
    a("--temperature", type=float, default=1.0, help="softmax temperature")
    a("--top-k", type=int, default=None, help="sample among the k most likely codes only (default: all codes)")
    a("--top-p", type=float, default=None,
      help="nucleus sampling: the smallest set of codes with this mass (default: off)")
    a("--class-id", type=int, default=None,
      help="sample this class only; a class-conditional model otherwise samples every class in turn")
    a("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (a model with a null class)")
    a("--steps", type=int, default=None,
      help="maskgit checkpoints: decoding passes, 1 to the grid's token count (default: 8, MaskGIT's)")
    a("--choice-temperature", type=float, default=None,
      help="maskgit checkpoints: Gumbel noise on the confidence that keeps tokens, annealed to 0 (default: 4.5)")
    a("--seed", type=int, default=0, help="random seed of the sampling")
    a("--no-ema", action="store_true", help="use the trained weights, not the checkpoint's EMA weights")
    a("--features", choices=["inception", "random-conv"], default="inception",
      help="feature network: torch-fidelity's FID Inception (needs its weights file), or a fixed random conv net "
           "whose numbers are comparable only with each other")
    a("--val-batches", type=int, default=None, help="batches of reference images for the validation loss "
      "(default: all; 0: skip it)")
    a("--num-grid", type=int, default=16, help="samples in <out-json stem>_samples.png beside the JSON (0: none)")
    a("--out-json", default="results/eval_transformer.json", help="the metrics file")
    a("--cache-dir", default=None, help="where the reference features are cached (default: the JSON's folder)")
    a("--device", default=None, help="cuda, cpu ... (default: CUDA when available)")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None,
      help="default: bf16 on CUDA if supported, else fp32")
    a("--num-workers", type=int, default=2, help="data-loading worker processes")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    a("--threads", type=int, default=None, help="CPU threads of torch's operators (default: torch's, all cores)")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
