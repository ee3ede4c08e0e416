"""Phase-3 joint fine-tuning (fdm.training.phase3) on the tiny ToyVQ model: exact resume, frozen and trained
parts, the saved FDM + decoder and the Dequantizer's use of it, VGG weight handling, mask-free runs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fdm
from fdm.errors import CheckpointError
from fdm.io.decoder_weights import DECODER_WEIGHTS_NAME
from fdm.training.backbones import VGG19Features, VGG19WeightsMissing
from fdm.training.checkpointing import latest_checkpoint
from fdm.training.data import TensorViews
from fdm.training.phase3 import Phase3Config, Phase3Trainer
from toy_vq import ToyVQ


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1] (upsampled noise: something a decoder can learn)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def toy_model() -> ToyVQ:
    torch.manual_seed(0)
    return ToyVQ().eval()


def toy_fdm(mask_channels: int = 1) -> fdm.FDM:
    torch.manual_seed(1)
    return fdm.FDM(8, mask_channels=mask_channels, hidden_channels=16, num_blocks=2)


def config(tmp_path, name: str, **overrides) -> Phase3Config:
    settings = dict(steps=6, batch_size=2, warmup_steps=2, disc_warmup_steps=1, disc_channels=8, drop_vgg_terms=True,
                    start_steps={"gradient": 1, "adversarial": 2}, log_every=0, val_every=0, checkpoint_every=0,
                    progress=False, output_dir=str(tmp_path / name))
    return Phase3Config(**(settings | overrides))


def state(trainer: Phase3Trainer) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in trainer.checkpoint_modules().items() for k, v in m.state_dict().items()}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    views = TensorViews(smooth_images(8))  # 4 steps per epoch: the interruption at 3 is mid-epoch
    model = toy_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("encoder", "quant_conv", "codebook"))}
    full = Phase3Trainer(model, toy_fdm(), views, config(tmp_path, "full"))
    before = state(full)
    full.train()
    after = state(full)

    first = Phase3Trainer(toy_model(), toy_fdm(), views, config(tmp_path, "split"))
    first.train(until=3)
    assert not (tmp_path / "split" / "fdm").exists()  # an interrupted run leaves only its checkpoint
    checkpoint = latest_checkpoint(tmp_path / "split" / "checkpoints")
    assert checkpoint.name == "step-00000003"
    second = Phase3Trainer(toy_model(), toy_fdm(), views, config(tmp_path, "split"))
    second.train(resume_from=checkpoint)
    resumed = state(second)

    assert set(resumed) == set(after)
    assert all(torch.equal(resumed[k], after[k]) for k in after), [k for k in after if not torch.equal(resumed[k], after[k])]
    # FDM, decoder and discriminator trained; encoder and codebook untouched
    for prefix in ("fdm.", "decoder.", "discriminator."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())

    changed = Phase3Trainer(toy_model(), toy_fdm(), views, config(tmp_path, "split", lr=1e-3))
    with pytest.raises(CheckpointError, match=r"another config \(lr: 0.0002 \(saved\), 0.001 \(now\)\)"):
        changed.resume(checkpoint)
    other_images = Phase3Trainer(toy_model(), toy_fdm(), TensorViews(smooth_images(8, seed=1)),
                                 config(tmp_path, "split"))
    with pytest.raises(CheckpointError, match=r"other data or for another base model: the training views differ"):
        other_images.resume(checkpoint)
    torch.manual_seed(5)
    other_model = ToyVQ().eval()  # the same architecture, another codebook
    with pytest.raises(CheckpointError, match=r"for another base model: the base model \(codebook fingerprint\) differ"):
        Phase3Trainer(other_model, toy_fdm(), views, config(tmp_path, "split")).resume(checkpoint)


def test_saved_result_carries_the_decoder_and_the_dequantizer_uses_it(tmp_path):
    views = TensorViews(smooth_images(4))
    trainer = Phase3Trainer(toy_model(), toy_fdm(), views, config(tmp_path, "run", steps=2, warmup_steps=1))
    result = trainer.train()
    folder = tmp_path / "run" / "fdm"
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", DECODER_WEIGHTS_NAME, "config.json", "README.md"}
    assert json.loads((folder / "config.json").read_text())["finetuned_decoder"] is True
    assert "Fine-tuned decoder" in (folder / "README.md").read_text()

    loaded = fdm.FDM.from_pretrained(folder)
    assert loaded.finetuned_decoder and set(loaded.decoder_state) == set(result.decoder_state)
    trained_decoder = {k: v for k, v in trainer.model.state_dict().items() if k.startswith(("post_quant", "decoder"))}
    assert all(torch.equal(loaded.decoder_state[k], v) for k, v in trained_decoder.items())

    fresh = toy_model()
    x = smooth_images(1, seed=5)
    original = fresh.decode(fresh.quantize(fresh.encode(x))[0])
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    deq = fdm.Dequantizer(fresh, loaded)  # loads the fine-tuned decoder into a copy of the fresh model
    assert deq.model is not fresh and deq.adapter.model is deq.model
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())  # the caller's model untouched
    assert all(torch.equal(deq.model.state_dict()[k], v) for k, v in trained_decoder.items())
    in_place = fdm.Dequantizer(fresh, loaded, load_decoder="in_place")  # explicit opt-in: fresh itself changes
    assert in_place.model is fresh and all(torch.equal(fresh.state_dict()[k], v) for k, v in trained_decoder.items())
    torch.testing.assert_close(in_place.reconstruct(x, use_fdm=False), deq.reconstruct(x, use_fdm=False))
    tuned = deq.reconstruct(x, use_fdm=False)
    torch.testing.assert_close(tuned, trainer.model.decode(trainer.model.quantize(trainer.model.encode(x))[0]))
    assert not torch.allclose(tuned, original)

    # a phase-3 FDM without its decoder is an error, never a silent quality loss
    bare = fdm.FDM(**{**loaded.config})
    bare.load_state_dict(loaded.state_dict())
    with pytest.raises(CheckpointError, match="not valid with the model's original decoder"):
        fdm.Dequantizer(toy_model(), bare)
    with pytest.raises(CheckpointError, match="needs decoder_state"):
        bare.save_pretrained(tmp_path / "bare")
    (folder / DECODER_WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="decoder.safetensors"):
        fdm.FDM.from_pretrained(folder)


def test_frozen_decoder_trains_the_fdm_alone_into_a_drop_in_module(tmp_path):
    views = TensorViews(smooth_images(8))
    model = toy_model()
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp_path, "run", steps=20, batch_size=8, lr=1e-2, warmup_steps=0, freeze_decoder=True,
                 weights={"adversarial": 0, "qe": 0}, start_steps={}, hole_ratio=None)
    module = toy_fdm(mask_channels=0)
    trainer = Phase3Trainer(model, module, views, cfg)
    assert not trainer.generator.decoder.training
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = trainer.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in untouched.items())  # the whole base model
    assert any(not torch.equal(before[k], v) for k, v in result.state_dict().items())
    folder = tmp_path / "run" / "fdm"
    assert not result.finetuned_decoder and result.decoder_state is None
    assert not (folder / DECODER_WEIGHTS_NAME).exists()
    assert result.training_info["phase3"]["freeze_decoder"] is True
    # through the unchanged decoder, the image loss it was trained on went down
    x = smooth_images(8)
    deq = fdm.Dequantizer(toy_model(), fdm.FDM.from_pretrained(folder))
    with torch.no_grad():
        plain = (deq.reconstruct(x, use_fdm=False) - x).abs().mean()
        tuned = (deq.reconstruct(x) - x).abs().mean()
    assert tuned < plain, (tuned, plain)


def test_vgg_terms_need_real_weights_or_an_explicit_drop(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    views = TensorViews(smooth_images(2))
    with pytest.raises(VGG19WeightsMissing, match="torchvision's cache"):
        Phase3Trainer(toy_model(), toy_fdm(), views, config(tmp_path, "run", drop_vgg_terms=False))
    weights = tmp_path / "vgg19.safetensors"  # stands in for torchvision's file: random, but given explicitly
    torch.manual_seed(0)
    save_file(VGG19Features().state_dict(), str(weights))
    cfg = config(tmp_path, "run", drop_vgg_terms=False, vgg_weights=str(weights), steps=1, log_every=1,
                 start_steps={"perceptual": 0, "style": 0}, weights={"adversarial": 0})
    Phase3Trainer(toy_model(), toy_fdm(), views, cfg).train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"perceptual", "style", "l1", "qe"} <= set(logged[-1])


def test_mask_free_training_writes_validation_grids_and_metrics(tmp_path):
    views = TensorViews(smooth_images(4))
    cfg = config(tmp_path, "run", steps=2, hole_ratio=None, val_every=1, num_val_images=3, extra_metrics=False)
    Phase3Trainer(toy_model(), toy_fdm(mask_channels=0), views, cfg, val_views=views).train()
    grids = sorted((tmp_path / "run" / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000000.png", "step-00000001.png", "step-00000002.png"]
    from PIL import Image

    # 3 columns (input, reconstruction, target) x 3 rows of 32 px, 4 px padding, a 16 px line of column titles
    assert Image.open(grids[0]).size == (3 * 32 + 4 * 4, 16 + 3 * (32 + 4))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"psnr", "ssim"} <= set(records[0]) and records[0]["split"] == "val"
    with pytest.raises(fdm.InputError, match="mask_channels=1"):
        Phase3Trainer(toy_model(), toy_fdm(mask_channels=0), views, config(tmp_path, "masked"))


def test_finetuning_improves_the_reconstructions(tmp_path):
    # small holes: most latent cells keep their continuous feature, which the decoder learns to render
    views = TensorViews(smooth_images(8))
    cfg = config(tmp_path, "run", steps=40, batch_size=8, lr=1e-2, warmup_steps=0, hole_ratio=(0.0, 0.05),
                 weights={"adversarial": 0}, start_steps={}, val_every=40, num_val_images=8, extra_metrics=False)
    Phase3Trainer(toy_model(), toy_fdm(), views, cfg, val_views=views).train()
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"val"' in line]
    assert [v["step"] for v in val] == [0, 40]
    assert val[1]["psnr"] > val[0]["psnr"] + 0.8, val


def _image_folder(folder, images: torch.Tensor):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        pixels = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def test_example_and_command_run_phase_2_then_phase_3(tmp_path, monkeypatch, capsys):
    pytest.importorskip("taming.modules.diffusionmodules.model")
    import importlib.util
    from pathlib import Path

    from fdm.commands import finetune as finetune_command
    from taming_tiny import random_model, save_lightning_ckpt, vqgan_config, write_config

    def cli(argv: list[str]) -> int:  # the `fdm finetune` sub-command (fdm.cli.main without the other commands)
        parser = argparse.ArgumentParser()
        finetune_command.add_arguments(parser)
        return finetune_command.run(parser.parse_args(argv))

    cfg = vqgan_config()
    config_file = write_config(cfg, tmp_path / "model.yaml")
    torch.manual_seed(0)
    ckpt = save_lightning_ckpt(random_model(cfg).state_dict(), tmp_path / "last.ckpt", loss_keys=True)
    train = _image_folder(tmp_path / "train", smooth_images(8, size=40))
    val = _image_folder(tmp_path / "val", smooth_images(2, size=32, seed=3))
    model_args = ["--model", "taming", "--config", str(config_file), "--checkpoint", str(ckpt), "--device", "cpu"]

    path = Path(__file__).resolve().parents[1] / "examples" / "train_fdm.py"
    spec = importlib.util.spec_from_file_location("train_fdm_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main([*model_args, "--train", str(train), "--val", str(val), "--out", str(tmp_path / "run"),
                         "--crop-size", "32", "--phase2-steps", "4", "--phase3-steps", "3", "--batch-size", "2",
                         "--no-perceptual", "--num-val-images", "2", "--no-progress"])
    assert set(rows) == {"VQ only", "phase 2 FDM", "phase 3 FDM + decoder"}
    assert all(r["psnr"] > 0 for r in rows.values())
    assert (tmp_path / "run" / "phase3" / "fdm" / DECODER_WEIGHTS_NAME).is_file()
    assert "phase 3 FDM + decoder" in capsys.readouterr().out

    # `fdm finetune` continues from the phase-2 FDM; without VGG19 weights it refuses and says how to go on
    finetune = [*model_args, "--fdm", str(tmp_path / "run" / "phase2"), "--data", str(train),
                "--val-data", str(val), "--crop-size", "32", "--steps", "2", "--batch-size", "2", "--no-progress",
                "--start-step", "adversarial=1", "--loss-weight", "gradient=2.5"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(VGG19WeightsMissing, match="--no-perceptual"):
        cli([*finetune, "--out", str(tmp_path / "ft-vgg")])
    assert cli([*finetune, "--out", str(tmp_path / "ft"), "--no-perceptual"]) == 0
    tuned = fdm.FDM.from_pretrained(tmp_path / "ft" / "fdm")
    assert tuned.finetuned_decoder and tuned.training_info["phase"] == 2  # the phase-2 record is kept
    assert tuned.training_info["phase3"]["weights"]["gradient"] == 2.5
    assert sorted(p.name for p in (tmp_path / "ft" / "validation").iterdir()) == ["step-00000000.png",
                                                                                  "step-00000002.png"]


def test_put_codec_fine_tunes_through_the_same_trainer(tmp_path):
    """The trainer is generic over adapters: PUT's guided decoder (masked-image encoding on known cells)."""
    from pathlib import Path

    from fdm.adapters.put import load_model

    weights = Path(__file__).parent / "data" / "put" / "put_tiny_p_vqvae.safetensors"
    if not weights.is_file():
        pytest.skip(f"tiny PUT weights not found at {weights}")
    model = load_model(weights)
    adapter = fdm.find_adapter(model)
    assert type(adapter).encode_known is not fdm.VQAdapter.encode_known  # PUT encodes the masked image
    images = F.interpolate(smooth_images(4), size=(32, 48), mode="bilinear", align_corners=False)
    torch.manual_seed(0)
    module = fdm.FDM(adapter.channels, hidden_channels=16, num_blocks=2)
    cfg = config(tmp_path, "put", steps=3, start_steps={"gradient": 0, "adversarial": 1})
    trainer = Phase3Trainer(model, module, TensorViews(images), cfg)
    trainer.train()
    fresh = load_model(weights)
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    fdm.Dequantizer(fresh, fdm.FDM.from_pretrained(tmp_path / "put" / "fdm"), load_decoder="in_place")
    trained = trainer.model.state_dict()  # the trainer's copy of the model
    tuned = {k: v for k, v in trained.items() if ".decoder." in k or "post_quant_conv" in k}
    assert tuned and all(torch.equal(fresh.state_dict()[k], v) for k, v in tuned.items())
    assert any(not torch.equal(original[k], v) for k, v in tuned.items())  # the decoder did change
    assert all(torch.equal(original[k], v) for k, v in trained.items() if k not in tuned)  # nothing else
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # the caller's model: untouched


def test_the_callers_model_is_left_alone_unless_in_place(tmp_path):
    """As with fdm.Dequantizer: by default a copy of the model is fine-tuned, and the caller's model keeps its
    weights and requires_grad flags; in_place=True fine-tunes the caller's decoder and leaves the model frozen."""
    views = TensorViews(smooth_images(4))
    model = toy_model()
    model.decoder.requires_grad_(True)  # the caller's own flags, whatever they are, stay as they are
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    Phase3Trainer(model, toy_fdm(), views, config(tmp_path, "copy", steps=2)).train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in untouched.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags

    tuned = Phase3Trainer(model, toy_fdm(), views, config(tmp_path, "in_place", steps=2), in_place=True).train()
    changed = [k for k, v in untouched.items() if not torch.equal(v, model.state_dict()[k])]
    assert changed and all(k.startswith(("post_quant_conv", "decoder")) for k in changed)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tuned.decoder_state.items())
