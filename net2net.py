"""taming-transformers' Net2NetTransformer checkpoints (`last.ckpt` + `model.yaml`: first stage, conditioning stage
and GPT in one state dict) as a VQGANTransformer, with every conditioning stage taming has."""
from checkpoint import read_checkpoint, read_taming
from mingpt import taming_gpt_config, taming_gpt_weights
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN


def from_taming(ckpt_path, config_path, trust=False, user="net2net.from_taming"):
    """A taming-transformers Net2NetTransformer (`last.ckpt` + `model.yaml`), in eval mode, computing what taming
    computes: one embedding table for condition and image codes, no start token before a condition, the SOS
    token (unconditional) or the class id (Labelator) as the first token; downsample_cond_size as a factor. Another
    kind of checkpoint is an error naming it and `user`'s needs."""
    ckpt = read_checkpoint(ckpt_path, trust).expect("taming-stage2", user=user)
    state, params = read_taming(ckpt, config_path)
    if "transformer_config" not in params or "first_stage_config" not in params:
        raise ValueError(f"{config_path} is not a Net2NetTransformer config (it has no transformer_config and "
                         f"first_stage_config); a VQ model's config goes to eval_vqgan.py.")
    permuter = (params.get("permuter_config") or {}).get("target", "Identity")
    if not permuter.endswith("Identity"):
        raise ValueError(f"taming's permuter {permuter} is not supported: only raster order (Identity).")
    stage = {}
    for name in ("first_stage", "cond_stage"):
        prefix = f"{name}_model."
        stage[name] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    vqgan = VQGAN.from_taming_state(stage["first_stage"], params["first_stage_config"]["params"])
    cond = params.get("cond_stage_config")
    target = cond.get("target", "") if isinstance(cond, dict) else cond
    layout, cond_vqgan, num_classes = dict(start=None, sos_token=params.get("sos_token", 0)), None, 0
    if params.get("unconditional", False) or cond == "__is_unconditional__":  # taming's SOSProvider
        layout["start"] = "sos"
    elif cond == "__is_first_stage__":  # a (low-resolution) copy of the image, in the image's own codes
        cond_vqgan = vqgan
    elif target.endswith("Labelator"):  # class-conditional: the class id is the first token
        layout["start"], num_classes = "class", cond["params"]["n_classes"]
    elif isinstance(cond, dict) and "ddconfig" in cond.get("params", {}):  # segmentation, depth, ...
        cond_vqgan = VQGAN.from_taming_state(stage["cond_stage"], cond["params"])
    else:
        raise ValueError(f"taming's conditioning stage {target} is not supported (SOS, Labelator, the first "
                         f"stage and VQ models are).")
    image_size, downsample = vqgan.config.image_size, params.get("downsample_cond_size", -1)
    if cond_vqgan is not None and downsample > -1 and image_size % downsample:
        raise ValueError(f"downsample_cond_size {downsample} does not divide the image size {image_size}.")
    hp = params["transformer_config"]["params"]
    gpt_config = taming_gpt_config(hp)
    layout["vocab_size"] = gpt_config.vocab_size
    config = TransformerConfig(image_size=image_size, n_layer=gpt_config.n_layer, n_head=gpt_config.n_head,
                               n_embd=gpt_config.n_embd, block_size=gpt_config.block_size,
                               num_classes=num_classes, pkeep=params.get("pkeep", 1.0),
                               cond_downsample=image_size // downsample if cond_vqgan and downsample > -1 else 1)
    model = VQGANTransformer(vqgan, config, cond_vqgan, taming=layout)
    model.gpt.load_state_dict(taming_gpt_weights(state))
    model.classes, model.uses_ema = None, False
    return model.eval()
