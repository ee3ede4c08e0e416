"""Tiny taming-transformers models in the official config and checkpoint layouts (random weights), for tests.

Configs keep what released ``*-project.yaml`` files hold that must not be acted on at load time: the
LPIPS loss, ``ckpt_path`` entries pointing at files that do not exist. Checkpoints are Lightning-style
``.ckpt`` dicts holding a pickled callback object of a class that cannot be imported when they are read.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import torch
import yaml

N_LABELS = 5  # segmentation classes of the tiny semantic model (151 for ADE20K)


def ddconfig(in_channels: int = 3) -> dict:
    return {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": in_channels,
            "out_ch": in_channels, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
            "attn_resolutions": [8], "dropout": 0.0}


def vqgan_config(n_embed: int = 16) -> dict:
    """A standalone VQGAN ``model.yaml`` (factor 4, 8 channels, 32x32 images)."""
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 8, "n_embed": n_embed, "ddconfig": ddconfig(),
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0,
                                  "disc_weight": 0.8, "codebook_weight": 1.0}}}}}


def gumbel_config() -> dict:
    return {"model": {"target": "taming.models.vqgan.GumbelVQ", "params": {
        "embed_dim": 8, "n_embed": 16, "kl_weight": 1e-8, "ddconfig": ddconfig(),
        "temperature_scheduler_config": {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler", "params": {
            "warm_up_steps": 0, "max_decay_steps": 1000, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}


def _first_stage() -> dict:
    first = copy.deepcopy(vqgan_config()["model"])
    first.pop("base_learning_rate")
    first["params"]["ckpt_path"] = "logs/missing_first_stage/checkpoints/last.ckpt"
    first["params"]["lossconfig"] = {"target": "taming.modules.losses.DummyLoss"}
    return first


def _transformer(block_size: int) -> dict:
    return {"target": "taming.modules.transformer.mingpt.GPT",
            "params": {"vocab_size": 16, "block_size": block_size, "n_layer": 2, "n_head": 2, "n_embd": 32}}


def unconditional_config() -> dict:
    """FFHQ layout: SOS token, 8x8 codes."""
    return {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_config": "__is_unconditional__", "first_stage_key": "image",
        "transformer_config": _transformer(64), "first_stage_config": _first_stage()}}}


def class_config() -> dict:
    """ImageNet ``cin`` layout: a Labelator cond stage, the class id is one token."""
    return {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "first_stage_key": "image", "cond_stage_key": "class_label",
        "transformer_config": _transformer(65), "first_stage_config": _first_stage(),
        "cond_stage_config": {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}}}}


def semantic_config() -> dict:
    """ADE20K / S-FLCKR layout: a VQModel cond stage on one-hot segmentation maps, window of 4x4 codes."""
    cond = _first_stage()
    cond["params"].update(ddconfig=ddconfig(N_LABELS), colorize_nlabels=N_LABELS, image_key="segmentation",
                          ckpt_path="logs/missing_cond_stage/checkpoints/last.ckpt")
    return {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "first_stage_key": "image", "cond_stage_key": "segmentation",
        "transformer_config": _transformer(32), "first_stage_config": _first_stage(), "cond_stage_config": cond}}}


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def random_model(config: dict) -> torch.nn.Module:
    """The model of ``config`` with random weights (non-trivial codebooks), in eval mode."""
    from fdm.adapters.taming import build_model

    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("quantize.embedding.weight", "quantize.embed.weight")):
                p.normal_()
    return model.eval()


class _Callback:
    def __init__(self):
        self.best_model_path = "logs/last.ckpt"


def save_lightning_ckpt(state_dict: dict, path: Path, *, loss_keys: bool = False) -> Path:
    """Write ``state_dict`` as an old-Lightning ``.ckpt`` that also pickles a callback object whose class
    cannot be imported when the file is read back (its module exists only while saving)."""
    state_dict = dict(state_dict)
    if loss_keys:  # standalone VQGAN checkpoints carry their discriminator / LPIPS weights
        state_dict["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
        state_dict["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 4, 1, 1)
    module = types.ModuleType("lightning_callbacks_not_installed")
    cls = type("ModelCheckpoint", (_Callback,), {"__module__": module.__name__})
    module.ModelCheckpoint = cls
    sys.modules[module.__name__] = module
    try:
        torch.save({"epoch": 3, "global_step": 120, "state_dict": state_dict,
                    "callbacks": {"ModelCheckpoint": cls()}}, path)
    finally:
        del sys.modules[module.__name__]
    return path

