"""Phase-2 FDM training for a taming VQGAN from a folder of photos (``fdm train --model taming --no-mask``):
the trained FDM saves with save_pretrained and loads with the Dequantizer."""

from __future__ import annotations

import argparse

import pytest
import torch

import fdm

pytest.importorskip("taming")
from taming_tiny import random_model, save_lightning_ckpt, vqgan_config, write_config  # noqa: E402,F401


def test_fdm_train_taming_mask_free(tmp_path, photos_dir):
    from fdm.adapters.taming import load_model
    from fdm.commands import train

    vqgan = random_model(vqgan_config())
    config = write_config(vqgan_config(), tmp_path / "model.yaml")
    ckpt = save_lightning_ckpt(vqgan.state_dict(), tmp_path / "last.ckpt", loss_keys=True)
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args([
        "--model", "taming", "--config", str(config), "--checkpoint", str(ckpt), "--device", "cpu",
        "--data", str(photos_dir / "train"), "--crop-size", "32", "--out", str(tmp_path / "fdm"),
        "--steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--no-mask", "--hidden-channels", "16",
        "--num-blocks", "2", "--checkpoint-every", "0", "--no-progress",
    ])
    assert train.run(args) == 0

    trained = fdm.FDM.from_pretrained(tmp_path / "fdm")
    assert trained.channels == 8 and trained.head.weight.abs().sum() > 0  # left the identity initialisation
    model = load_model(config, ckpt)
    deq = fdm.Dequantizer(model, trained)  # fingerprint check passes for the base model
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, _ = deq.quantize(deq.encode(x))
        with deq.attached():
            hooked = model.decode(z_q)
        assert torch.equal(hooked, model.decode(trained(z_q)))
