"""Export a checkpoint as a model folder to share: config.json, model.safetensors (tensors only: reading them runs no
code, unlike a pickled .pt) and a README.md model card; optionally upload the folder to the Hugging Face Hub.

    python export.py --checkpoint-path checkpoints/vqgan_last.pt --out models/flowers-vqgan
    python export.py --checkpoint-path checkpoints/transformer_last.pt --out models/flowers  # stage 1 in vqgan/
    python export.py --checkpoint-path last.ckpt --taming-config model.yaml --out models/imagenet-f16-16384
    python export.py ... --push-to-hub your-name/flowers                                     # and upload it

Load a folder with VQGAN.from_pretrained(DIR) or VQGANTransformer.from_pretrained(DIR) (a Hub id owner/name works
too), or pass it to any script's --checkpoint-path.
"""
import json
import math
import shutil
import uuid
from pathlib import Path

from checkpoint import CARD_FILE, CONFIG_FILE, CheckpointError, read_checkpoint
from cli import ScriptParser, run_script
from data import DataError
from transformer import VQGANTransformer
from vqgan import VQGAN

# The flags of a run the model card lists (when the checkpoint recorded them), in this order.
CARD_FLAGS = ("dataset_path", "image_size", "batch_size", "grad_accum", "learning_rate", "max_steps", "epochs",
              "ema_decay", "disc_start", "perceptual_loss_factor", "pkeep", "dropout", "conditional", "class_dropout",
              "precision", "seed")
EVAL_KEYS = {  # the figures of an evaluation JSON the card shows: key -> (name, format)
    "eval_vqgan.json": {"psnr": ("PSNR (dB)", ".2f"), "ssim": ("SSIM", ".4f"), "lpips": ("LPIPS", ".4f"),
                        "rfid": ("rFID", ".2f"), "codebook_usage": ("codebook usage", ".3f"),
                        "perplexity": ("perplexity", ".1f")},
    "eval_transformer.json": {"fid": ("FID", ".4g"), "isc": ("Inception Score", ".4g"), "kid": ("KID", ".3g"),
                              "precision": ("precision", ".3f"), "recall": ("recall", ".3f"),
                              "val_bits_per_token": ("validation bits per token", ".3f")},
}


# ---- the model card ----

def num_parameters(module):
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def describe_vqgan(vqgan):
    """Rows (name, value) of a stage-1 model's card table."""
    c = vqgan.config
    f, size = c.downsample_factor, c.image_size
    lookup = f", looked up in {c.codebook_dim} dimensions" if c.codebook_dim else ""
    lookup += ", l2-normalised" if c.codebook_l2_norm else ""
    return [("image size", f"{size} x {size} in training; any size whose sides divide by {f}"),
            ("token grid", f"{size // f} x {size // f} (downsampling factor {f})"),
            ("quantizer", f"{c.quantizer}, {c.num_codebook_vectors} codes of dimension {c.latent_dim}{lookup}"),
            ("architecture", f"ch {c.ch}, ch_mult {list(c.ch_mult)}, {c.num_res_blocks} res block(s) per level, "
                             f"attention at {list(c.attn_resolutions)} px, z_channels {c.z_channels}"),
            ("parameters", num_parameters(vqgan))]


def describe_transformer(model):
    """Rows (name, value) of a stage-2 model's card table."""
    c, (h, w) = model.config, model.latent_hw
    classes = getattr(model, "classes", None)
    guidance = f", classifier-free guidance (null class at rate {c.class_dropout})" if model.null_token is not None \
        else ""
    conditioning = f"{c.num_classes} classes ({', '.join(classes or [])}){guidance}" if c.num_classes else \
        "unconditional" if model.cond_vqgan is None else ""
    if model.cond_vqgan is not None:
        (hc, wc), own = model.cond_hw, model.cond_vqgan is model.vqgan
        conditioning += (f"{', and ' if conditioning else ''}{model.cond_kind} image conditions: {hc} x {wc} tokens "
                         f"from {'the image tokenizer itself' if own else 'the tokenizer in cond/'}"
                         + (f", shrunk {c.cond_downsample}x first" if c.cond_downsample > 1 else "")
                         + (f"; guidance (null condition at rate {c.cond_dropout})" if c.cond_dropout else ""))
    return [("image size", f"{model.image_size} x {model.image_size} ({h} x {w} tokens); larger canvases with a "
                           f"sliding window"),
            ("GPT", f"{c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, block size {c.block_size}"),
            ("conditioning", conditioning), ("parameters", f"{num_parameters(model.gpt)} (GPT)"),
            ("stage 1", "the sub-folder vqgan/ (its own model card)")]


def table(rows):
    return "| | |\n| --- | --- |\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)


def training_section(ckpt):
    """What the checkpoint recorded of its run: steps and flags; taming's global step for an imported model."""
    if ckpt.kind.startswith("taming"):
        step = ckpt.entries.get("global_step")
        return (f"Converted from a taming-transformers checkpoint ({ckpt.path.name}"
                + (f", global step {step}" if step is not None else "") + ").\n")
    args, lines = ckpt.entries.get("args") or {}, [f"{ckpt.entries.get('step', '?')} optimizer steps.\n"]
    shown = [name for name in CARD_FLAGS if args.get(name) not in (None, False)  # unset or off: in the full list
             and not (name == "epochs" and args.get("max_steps") is not None)]  # --max-steps overrides --epochs
    flags = [(f"--{name.replace('_', '-')}", args[name]) for name in shown]
    if flags:
        lines.append("Flags of the run, as recorded in the checkpoint:\n\n" + table(flags))
        lines.append("<details><summary>all flags</summary>\n\n```json\n" + json.dumps(args, indent=2, default=str)
                     + "\n```\n</details>\n")
    return "\n".join(lines)


def fmt(value, spec):
    return "n/a" if value is None else f"{value:{spec}}"


def measured_section(ckpt, eval_name, log_name):
    """Figures from the run's results/ folder (beside checkpoints/): an evaluation JSON of this checkpoint, and the
    last values of the training log. Empty when there are none."""
    results = ckpt.path.resolve().parent.parent / "results"
    parts = []
    evaluation = results / eval_name
    if evaluation.is_file():
        saved = json.loads(evaluation.read_text())
        if Path(str(saved.get("checkpoint", ""))).name == ckpt.path.name:
            rows = [(name, fmt(saved.get(key), spec)) for key, (name, spec) in EVAL_KEYS[eval_name].items()]
            what = f"{saved.get('num_images')} images of {saved.get('dataset')}" if "dataset" in saved else \
                f"{saved.get('num_samples')} samples against {saved.get('protocol', {}).get('reference')}"
            older = evaluation.stat().st_mtime < ckpt.path.stat().st_mtime
            parts.append(f"From `results/{eval_name}` ({what}"
                         + ("; measured before the checkpoint's last save" if older else "") + "):\n\n" + table(rows))
            extractor = saved.get("protocol", {}).get("feature_extractor") or ""
            if extractor.startswith("random-conv"):
                parts.append("These FID-type figures use a random stand-in network: they compare with each other "
                             "only, never with published numbers.\n")
    log = results / log_name
    if log.is_file():
        last = {}
        for line in log.read_text().splitlines():
            try:
                last.update(json.loads(line))
            except ValueError:
                continue
        rows = [(name, f"{value:.4g}") for name, value in sorted(last.items())
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value)]
        if rows:
            parts.append(f"Last values of the training log `results/{log_name}` (step {last.get('step')}):\n\n"
                         + table(rows))
    return "\n".join(parts) if parts else "No evaluation was found beside the checkpoint (its run's results/).\n"


def model_card(title, summary, rows, training, measured, usage, weights):
    return f"""---
tags:
- vqgan
- taming-transformers
- image-generation
- safetensors
---
# {title}

{summary}

{table(rows + [("weights", weights)])}
## Training

{training}
## Measured

{measured}
## Use

{usage}
## Safety

`model.safetensors` holds tensors only: reading it never runs code, unlike unpickling a `.pt` file. `config.json` is
plain JSON.
"""


def weights_row(ckpt, ema):
    """The card's words for the weights exported."""
    if ckpt.kind.startswith("taming"):
        return "the taming-transformers weights"
    if ckpt.uses_ema(ema):
        decay = (ckpt.entries.get("args") or {}).get("ema_decay")
        return "EMA weights" + (f" (decay {decay})" if decay else "")
    return "the trained weights" + (" (the checkpoint also has EMA weights: exported with --no-ema)"
                                    if ckpt.entries.get("ema") else "")


# ---- export ----

def vqgan_card(vqgan, ckpt, name, ema):
    summary = (f"A VQGAN image tokenizer (stage 1 of Taming Transformers, Esser, Rombach and Ommer 2021): it turns an "
               f"image into a grid of codes from a codebook of {vqgan.config.num_codebook_vectors} and decodes codes "
               f"back into an image. Trained with this project's `training_vqgan.py`." if ckpt.kind == "stage1" else
               "A VQGAN image tokenizer (stage 1 of Taming Transformers), converted from a taming-transformers "
               "checkpoint.")
    usage = f"""With this project's code (its root folder on the Python path):

```python
import torch
from vqgan import VQGAN

model = VQGAN.from_pretrained("{name}")  # a local folder or a Hub id
x = torch.rand(1, 3, {vqgan.config.image_size}, {vqgan.config.image_size}) * 2 - 1  # images in [-1, 1]
x_rec, indices, _ = model(x)  # indices: (1, h, w) codes
```

```bash
python eval_vqgan.py --checkpoint-path {name} --dataset-path data/val     # PSNR, SSIM, LPIPS, rFID
python training_transformer.py --checkpoint-path {name}                    # stage 2 on its codes
```
"""
    measured = measured_section(ckpt, "eval_vqgan.json", "vqgan_metrics.jsonl") if ckpt.kind == "stage1" else \
        "Nothing measured here; the taming-transformers paper reports its own figures.\n"
    return model_card("VQGAN image tokenizer (stage 1)", summary, describe_vqgan(vqgan), training_section(ckpt),
                      measured, usage, weights_row(ckpt, ema))


def transformer_card(model, ckpt, name, ema):
    summary = ("A transformer over VQGAN codes (stage 2 of Taming Transformers, Esser, Rombach and Ommer 2021): a GPT "
               "samples a grid of codes token by token, and the VQGAN in vqgan/ decodes it into an image. Trained "
               "with this project's `training_transformer.py`.")
    class_flag = " --class-id 0" if model.num_classes else ""
    labels = ", labels=torch.tensor([0, 0, 0, 0])" if model.num_classes else ""
    imports, condition, cond = "", "", ""
    if model.cond_kind is not None:  # the condition file read as sample_transformer.py --cond-image reads it
        kind, num_labels = model.cond_kind, model.cond_vqgan.config.num_labels
        class_flag += " --cond-image condition.png"
        imports = "\nfrom data import map_to_tensor, read_map"
        condition = (f"\ncondition = map_to_tensor(read_map(\"condition.png\", \"{kind}\", {num_labels}), \"{kind}\", "
                     f"{num_labels})[None]  # (1, C, H, W) of the training size; sample_transformer.py takes any")
        cond = ", cond=model.encode_condition(condition)"
    usage = f"""With this project's code (its root folder on the Python path):

```python
import torch
from transformer import VQGANTransformer{imports}

model = VQGANTransformer.from_pretrained("{name}")  # a local folder or a Hub id{condition}
tokens = model.sample_canvas(4, top_k=100{labels}{cond})
images = model.indices_to_image(tokens)  # (4, 3, H, W) in [-1, 1]
```

```bash
python sample_transformer.py --checkpoint-path {name}{class_flag} --num-samples 16
python app.py --checkpoint-path {name}       # try it in the browser
```
"""
    return model_card("VQGAN transformer (stage 2)", summary, describe_transformer(model), training_section(ckpt),
                      measured_section(ckpt, "eval_transformer.json", "transformer_metrics.jsonl"), usage,
                      weights_row(ckpt, ema))


def check_out(out, overwrite):
    """Refuse to replace a folder unless --overwrite, and then only one that export.py wrote (it has config.json)."""
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise DataError(f"{out} exists and is not empty; pass --overwrite to replace it, or another --out.")
        if not (out / CONFIG_FILE).is_file():
            raise DataError(f"{out} is not a model folder of export.py (no {CONFIG_FILE}), so --overwrite leaves it "
                            f"alone; pass another --out.")


def export(args):
    """Write the model folder at --out (through a temporary folder beside it, so a failure leaves nothing half-done)."""
    out = Path(args.out)
    check_out(out, args.overwrite)
    ckpt = read_checkpoint(args.checkpoint_path, trust=args.trust_checkpoint)
    if ckpt.folder is not None:
        raise CheckpointError(f"{ckpt.path} is a model folder already; copy it, or upload it with "
                              f"`hf upload REPO_ID {ckpt.path}`.")
    ema, name = not args.no_ema, args.push_to_hub or str(out)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if args.taming_config:
            vqgan = VQGAN.from_taming(args.checkpoint_path, args.taming_config, stage=args.taming_stage,
                                      trust=args.trust_checkpoint)
            vqgan.save_pretrained(partial, weights="taming", step=ckpt.entries.get("global_step"),
                                  source=ckpt.path.name)
            (partial / CARD_FILE).write_text(vqgan_card(vqgan, ckpt, name, ema))
        elif ckpt.kind == "stage1":
            vqgan = VQGAN.from_checkpoint(ckpt, ema=ema, user="export.py")
            vqgan.save_pretrained(partial, weights="ema" if ckpt.uses_ema(ema) else "trained",
                                  step=ckpt.entries.get("step"), source=ckpt.path.name)
            (partial / CARD_FILE).write_text(vqgan_card(vqgan, ckpt, name, ema))
        else:
            ckpt.expect("stage2", "stage1", user="export.py")
            model = VQGANTransformer.from_checkpoint(ckpt, args.vqgan_checkpoint, trust=args.trust_checkpoint, ema=ema,
                                                     user="export.py")
            stage1 = read_checkpoint(args.vqgan_checkpoint or ckpt.stage1_path(), trust=args.trust_checkpoint)
            tokenizers = {"vqgan": (model.vqgan, stage1)}  # sub-folder: (model, checkpoint), each with its card
            if model.cond_vqgan is not None and model.cond_vqgan is not model.vqgan:
                tokenizers["cond"] = (model.cond_vqgan, read_checkpoint(ckpt.cond_path(), trust=args.trust_checkpoint))
            info = {sub: dict(weights="ema" if saved.uses_ema(ema) else "trained",
                              step=saved.entries.get("step") if saved.entries else None, source=saved.path.name)
                    for sub, (_, saved) in tokenizers.items()}
            model.save_pretrained(partial, weights="ema" if ckpt.uses_ema(ema) else "trained",
                                  step=ckpt.entries.get("step"), source=ckpt.path.name, vqgan_info=info["vqgan"],
                                  cond_info=info.get("cond"))
            (partial / CARD_FILE).write_text(transformer_card(model, ckpt, name, ema))
            for sub, (tokenizer, saved) in tokenizers.items():
                if saved.folder is not None:  # exported before: keep its card
                    shutil.copyfile(saved.path / CARD_FILE, partial / sub / CARD_FILE)
                else:
                    (partial / sub / CARD_FILE).write_text(vqgan_card(tokenizer, saved, f"{name}/{sub}", ema))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def push_to_hub(folder, repo_id, private=False):
    """Upload every file of the folder to the Hub model repo (created if missing); returns the commit's URL."""
    from huggingface_hub import HfApi  # imported here: only --push-to-hub needs it, and it is slow to import
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=f"Upload {Path(folder).name} from export.py")
    except Exception as error:  # no token, no network, no rights: the Hub's errors have no common base class
        raise CheckpointError(f"The upload of {folder} to the Hub repo {repo_id} failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); the folder is complete: upload "
                              f"it later with `hf upload {repo_id} {folder}`.") from None
    return getattr(commit, "commit_url", str(commit))


def main(args):
    out = export(args)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    print(f"Wrote {out}/ ({', '.join(files)}).")
    if args.push_to_hub:
        print(f"Uploaded to the Hub: {push_to_hub(out, args.push_to_hub, args.private)}")
    return out


def build_parser():
    p = ScriptParser("Export a checkpoint as a model folder (config.json, model.safetensors, README.md model card), "
                     "optionally uploaded to the Hugging Face Hub.")
    a = p.add_argument
    a("--checkpoint-path", required=True,
      help="a stage-1 or stage-2 checkpoint (a stage-2 folder holds its stage-1 model in vqgan/), or taming's "
           "last.ckpt with --taming-config")
    a("--out", required=True, help="the model folder to write")
    a("--no-ema", action="store_true", help="export the trained weights, not the EMA weights a run with --ema-decay "
      "kept")
    a("--vqgan-checkpoint", default=None, help="a stage-2 model's stage-1 checkpoint, if it moved since training")
    a("--taming-config", default=None, help="taming-transformers' model.yaml, for a taming VQGAN checkpoint")
    a("--taming-stage", choices=["first_stage", "cond_stage"], default=None,
      help="which VQ model of a taming Net2NetTransformer checkpoint to export (needed for those only)")
    a("--overwrite", action="store_true", help="replace --out if it is a model folder written before")
    a("--push-to-hub", default=None, metavar="REPO_ID",
      help="also upload the folder to this Hugging Face Hub model repo (owner/name; created if missing; needs a "
           "token from `hf auth login`)")
    a("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    a("--trust-checkpoint", action="store_true", help="allow loading checkpoints that need full unpickling")
    return p


if __name__ == "__main__":
    run_script(main, build_parser())
