"""Phase-2 training of FDM (sampler-free qe loss, FDM WACV 2025 sec. 3.3) on the toy VQ model."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_training_data import write_images

import fdm
from fdm.commands import train as train_command
from fdm.errors import CheckpointError, InputError, UsageError
from fdm.training import (
    ImageFolderViews,
    Phase2Config,
    Phase2Trainer,
    TensorViews,
    latest_checkpoint,
    train_phase2,
)
from toy_vq import ToyVQ


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    folder = write_images(tmp_path_factory.mktemp("phase2") / "images", [(40, 56), (64, 48), (32, 32), (24, 40)])
    return ImageFolderViews(folder, crop_size=16, views_per_image=2, seed=3)


@pytest.fixture
def model(spread_toy_model):
    return spread_toy_model


def config(tmp_path, **overrides):
    settings = dict(steps=12, batch_size=4, lr=2e-3, warmup_steps=2, progress=False, checkpoint_every=0,
                    log_every=4, output_dir=str(tmp_path / "out"))
    settings.update(overrides)
    return Phase2Config(**settings)


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_loss_decreases_and_fdm_reduces_the_quantization_error(tmp_path, model, views):
    trainer = Phase2Trainer(model, views, config(tmp_path, steps=None, epochs=8, hole_ratio=None))
    trained = trainer.train()
    assert len(trainer.history) == 8
    assert trainer.history[-1]["loss"] < 0.7 * trainer.history[0]["loss"]
    # the quantity the loss measures, recomputed independently: mean |FDM(z_q) - z| versus |z_q - z|
    adapter = fdm.find_adapter(model)
    with torch.no_grad():
        x = torch.stack([views[i] for i in range(len(views))])
        z = adapter.encode(x)
        z_q, _ = adapter.quantize(z)
        assert (trained(z_q) - z).abs().mean() < 0.8 * (z_q - z).abs().mean()


def test_saved_fdm_loads_and_works_in_a_dequantizer(tmp_path, model, views):
    cfg = config(tmp_path, base_model="toy")
    trained = train_phase2(model, views, cfg)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    adapter = fdm.find_adapter(model)
    assert saved["base_model_fingerprint"] == adapter.fingerprint() == trained.base_model_fingerprint
    assert saved["base_model"] == "toy" and saved["mask_channels"] == 1
    info = saved["training"]
    assert info["phase"] == 2 and info["steps"] == 12 and info["batch_size"] == 4 and info["seed"] == 0
    assert info["hole_ratio"] == list(fdm.masks.DEFAULT_HOLE_RATIO) and info["data"] == "images"
    assert info["final_loss"] == pytest.approx(trained.training_info["final_loss"]) and info["final_loss"] > 0

    loaded = fdm.FDM.from_pretrained(tmp_path / "out")
    assert_same(weights(loaded), weights(trained))
    deq = fdm.Dequantizer(model, loaded)
    x = torch.stack([views[0], views[1]])
    hole = torch.zeros(2, 1, 16, 16)
    hole[..., 4:12, 4:12] = 1
    with torch.no_grad():
        out = deq.reconstruct(x, hole)
        plain = deq.reconstruct(x, hole, use_fdm=False)
    assert out.shape == x.shape and not torch.equal(out, plain)
    other = ToyVQ()
    with pytest.raises(fdm.FingerprintMismatchError):
        fdm.Dequantizer(other, loaded)


def test_cached_and_uncached_training_agree(tmp_path, model, views):
    results = {}
    for mode in ("memory", "disk", "none"):
        trainer = Phase2Trainer(model, views, config(tmp_path / mode, cache=mode, cache_dtype="float32", steps=8))
        results[mode] = weights(trainer.train())
        assert trainer.history
    assert_same(results["memory"], results["disk"])
    for key in results["memory"]:
        torch.testing.assert_close(results["none"][key], results["memory"][key], rtol=1e-5, atol=1e-6)


def test_resume_equals_uninterrupted_run(tmp_path, model, views):
    # uninterrupted: 10 steps (5 epochs of 2 steps), a checkpoint every 3 steps (mid-epoch), all kept
    full = Phase2Trainer(model, views, config(tmp_path / "full", steps=10, checkpoint_every=3, keep_checkpoints=None))
    reference = weights(full.train())
    step3 = tmp_path / "full" / "out" / "checkpoints" / "step-00000003"
    assert step3.is_dir() and latest_checkpoint(step3.parent).name == "step-00000009"

    # "interrupted" at step 3 (the state its checkpoint holds), resumed in a new trainer with a new FDM;
    # unrelated random draws in between must not matter
    torch.rand(100)
    resumed = Phase2Trainer(model, views, config(tmp_path / "resumed", steps=10, checkpoint_every=3))
    assert not torch.equal(resumed.fdm.head.weight, full.fdm.head.weight)
    result = resumed.train(resume_from=step3)
    assert_same(weights(result), reference)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    assert resumed.final_loss == full.final_loss

    changed = Phase2Trainer(model, views, config(tmp_path / "full", steps=10, batch_size=2))
    with pytest.raises(CheckpointError, match="batch_size"):
        changed.train(resume_from=step3)
    torch.manual_seed(5)
    other_model = Phase2Trainer(ToyVQ().eval(), views, config(tmp_path / "other", steps=10, checkpoint_every=3))
    with pytest.raises(CheckpointError, match=r"for another base model: the base model \(codebook fingerprint\) differ"):
        other_model.train(resume_from=step3)


def test_mask_free_training(tmp_path, model, views):
    trainer = Phase2Trainer(model, views, config(tmp_path, hole_ratio=None, steps=6))
    assert trainer.fdm.mask_channels == 0
    trained = trainer.train()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["mask_channels"] == 0 and saved["training"]["hole_ratio"] is None
    assert trained.head.weight.abs().sum() > 0
    with pytest.raises(InputError, match="mask_channels=1"):
        Phase2Trainer(model, views, config(tmp_path), fdm_module=fdm.FDM(8, mask_channels=0))


def test_nan_training_images_are_rejected(tmp_path, model):
    class Views(torch.utils.data.Dataset):  # a user dataset that produces a bad view
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 8, 8), float("nan") if i == 2 else 0.5)

    with pytest.raises(InputError, match="NaN/Inf"):
        Phase2Trainer(model, Views(), config(tmp_path, steps=2)).train()
    with pytest.raises(InputError, match="NaN/Inf"):
        TensorViews(torch.full((2, 3, 8, 8), float("inf")))


def test_config_validation_and_json_round_trip():
    cfg = Phase2Config(epochs=3, hole_ratio=[0.1, 0.3])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert Phase2Config.from_dict(data) == cfg and cfg.hole_ratio == (0.1, 0.3) and cfg.betas == (0.0, 0.9)
    with pytest.raises(InputError, match="steps, epochs or minutes"):
        Phase2Config()
    with pytest.raises(InputError, match="not both"):
        Phase2Config(steps=3, epochs=3)
    with pytest.raises(InputError, match="hole_ratio"):
        Phase2Config(steps=3, hole_ratio=(0.7, 0.2))
    with pytest.raises(InputError, match="cache"):
        Phase2Config(steps=3, cache="ram")
    with pytest.raises(InputError, match="unknown Phase2Config fields"):
        Phase2Config.from_dict({"steps": 3, "learning_rate": 1})


def run_train_command(argv):
    """Parse ``fdm train`` options the way fdm.cli does (a parser with the command's arguments) and run it."""
    parser = argparse.ArgumentParser(prog="fdm train")
    train_command.add_arguments(parser)
    return train_command.run(parser.parse_args(argv))


def test_train_command(tmp_path, model, views, monkeypatch):
    monkeypatch.setattr(train_command, "load_base_model", lambda args: model)
    out = tmp_path / "cli"
    common = ["--data", str(views.root), "--steps", "4", "--batch-size", "2", "--crop-size", "16", "--no-progress",
              "--checkpoint-every", "2", "--lr", "1e-3", "--warmup-steps", "1", "--hidden-channels", "12",
              "--num-blocks", "2", "--device", "cpu"]
    argv = common + ["--out", str(out), "--no-mask"]
    assert run_train_command(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["mask_channels"] == 0 and saved["hidden_channels"] == 12 and saved["num_blocks"] == 2
    assert saved["training"]["steps"] == 4 and saved["base_model"] == "demo"
    first = fdm.FDM.from_pretrained(out)
    assert first.head.weight.abs().sum() > 0
    # --resume continues from the latest checkpoint (step 4, the end): same weights, no step repeated
    assert run_train_command(argv + ["--resume"]) == 0
    assert_same(weights(fdm.FDM.from_pretrained(out)), weights(first))
    with pytest.raises(CheckpointError, match="holds an earlier run"):  # a new run, same --out
        run_train_command(argv)
    # masked training with an explicit hole-ratio range
    assert run_train_command(common + ["--out", str(tmp_path / "masked"), "--hole-ratio", "0.1", "0.3",
                                       "--base-model", "toy VQ, seed 1"]) == 0
    saved = json.loads((tmp_path / "masked" / "config.json").read_text())
    assert saved["mask_channels"] == 1 and saved["training"]["hole_ratio"] == [0.1, 0.3]
    assert saved["base_model"] == "toy VQ, seed 1"
    with pytest.raises(InputError, match="not found"):
        run_train_command(["--data", str(tmp_path / "none"), "--out", str(out), "--steps", "1"])


def test_one_run_per_folder_new_resume_and_overwrite(tmp_path, model, views, caplog):
    """A folder holds one run: run.json records it; a new run into it is refused (naming the earlier run's files),
    a run of another kind is refused naming the field that differs, --overwrite replaces the run, --resume continues
    it."""
    out = tmp_path / "run"
    trainer = Phase2Trainer(model, views, config(out, steps=2, checkpoint_every=1))
    with caplog.at_level("INFO", logger="fdm"):
        assert trainer.start_point(resume=True) is None  # nothing to resume yet
    assert "no checkpoint in" in caplog.text
    assert trainer.start_point(resume=False) is None
    trainer.train()
    record = json.loads((out / "out" / "run.json").read_text())
    assert record["phase"] == 2 and record["data"]["views"]["crop_size"] == views.crop_size
    again = Phase2Trainer(model, views, config(out, steps=2, checkpoint_every=1))
    with pytest.raises(CheckpointError, match=r"holds an earlier run \(run.json, metrics.jsonl, checkpoints, "
                                              r"model.safetensors, config.json\): continue it with --resume, replace "
                                              r"it with --overwrite, or choose another --out"):
        again.start_point(resume=False)
    assert again.start_point(resume=True).name == "step-00000002"
    with pytest.raises(UsageError, match="give one of them"):
        again.start_point(resume=True, overwrite=True)
    # another kind of run into the same folder: refused by the trainer itself, naming the field
    cropped = ImageFolderViews(views.root, crop_size=8, views_per_image=views.views_per_image, seed=views.seed)
    with pytest.raises(CheckpointError, match=r"the training views differ \(crop_size: 16 \(saved\), 8 \(now\)\)"):
        Phase2Trainer(model, cropped, config(out, steps=2)).train()
    with pytest.raises(CheckpointError, match=r"another config \(lr: 0.002 \(saved\), 0.001 \(now\)\)"):
        Phase2Trainer(model, views, config(out, steps=2, lr=1e-3)).train()
    # --overwrite: the earlier run's files go (a feature cache would stay), the new run starts from scratch
    replaced = Phase2Trainer(model, cropped, config(out, steps=1))
    assert replaced.start_point(resume=False, overwrite=True) is None
    assert not (out / "out" / "checkpoints").exists() and not (out / "out" / "model.safetensors").exists()
    replaced.train()
    assert json.loads((out / "out" / "run.json").read_text())["data"]["views"]["crop_size"] == 8
