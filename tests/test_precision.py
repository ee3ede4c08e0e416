"""Mixed precision (fdm.precision, ``--precision``): bf16 and fp16 autocast in phase 2, phase 3 and inference,
with float32 weights, float32 losses and metrics, and the fp16 loss scale carried through checkpoints. Runs on
CPU (the same code path as CUDA: only the autocast device type differs)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_training_data import write_images

import fdm
from fdm.errors import InputError
from fdm.evaluation.comparison import evaluate_views
from fdm.losses import gram_matrix
from fdm.precision import PRECISIONS, autocast, check_precision, full_precision, grad_scaler
from fdm.training import Phase2Config, Phase2Trainer, TensorViews, latest_checkpoint, load_checkpoint
from fdm.training.phase3 import Phase3Config, Phase3Trainer
from toy_vq import ToyVQ


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def toy_model() -> ToyVQ:
    torch.manual_seed(1)
    model = ToyVQ().eval()
    with torch.no_grad():  # codes spread over the encoder's range, so cells use several codes
        model.codebook.weight.mul_(0.3)
    return model


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def phase2_config(tmp_path, precision: str, **overrides) -> Phase2Config:
    settings = dict(steps=8, batch_size=4, lr=2e-3, warmup_steps=2, progress=False, checkpoint_every=0, log_every=4,
                    cache_dtype="float32", hidden_channels=16, num_blocks=2, precision=precision,
                    output_dir=str(tmp_path / precision))
    return Phase2Config(**(settings | overrides))


# --- the helpers -------------------------------------------------------------------------------------------


def test_invalid_precision_is_an_input_error_naming_the_allowed_values(tmp_path):
    for make in (lambda: check_precision("fp8"), lambda: autocast("cpu", "half"), lambda: grad_scaler("cpu", "16"),
                 lambda: Phase2Config(steps=1, precision="float16"), lambda: Phase3Config(precision="amp")):
        with pytest.raises(InputError, match="precision must be one of fp32, bf16, fp16"):
            make()
    model = toy_model()
    module = fdm.FDM(8, hidden_channels=4, num_blocks=1, base_model_fingerprint=fdm.find_adapter(model).fingerprint())
    with pytest.raises(InputError, match="fp32, bf16, fp16"):  # refused before any work
        evaluate_views(fdm.Dequantizer(model, module), TensorViews(smooth_images(1, 16)), precision="bfloat16", progress=False)


def test_autocast_scaler_and_full_precision_follow_the_precision():
    x = torch.randn(2, 4)
    w = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ w).dtype == torch.float32
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast("cpu", precision):
            assert (x @ w).dtype == dtype
            with full_precision("cpu"):
                assert (x @ w).dtype == torch.float32
    assert [grad_scaler("cpu", p).is_enabled() for p in PRECISIONS] == [False, False, True]
    # the style term's Gram matrices stay float32 under autocast (float16 sums over h*w products overflow)
    features = torch.rand(1, 4, 64, 64) * 40
    with autocast("cpu", "fp16"):
        gram = gram_matrix(features)
    assert gram.dtype == torch.float32 and torch.isfinite(gram).all()
    torch.testing.assert_close(gram, gram_matrix(features))


# --- phase 2 -------------------------------------------------------------------------------------------------


def test_bf16_phase2_runs_in_bfloat16_and_stays_close_to_fp32(tmp_path):
    views = TensorViews(smooth_images(8, 16))
    results, head_dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        trainer = Phase2Trainer(toy_model(), views, phase2_config(tmp_path, precision))
        seen: list[torch.dtype] = []
        trainer.fdm.head.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out.dtype))
        results[precision] = (weights(trainer.train()), trainer.final_loss)
        head_dtypes[precision] = set(seen)
        assert not trainer.scaler.is_enabled()
    assert head_dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    (w32, loss32), (w16, loss16) = results["fp32"], results["bf16"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w16.values())  # float32 weights
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=0.05)
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)
    for key in w32:
        torch.testing.assert_close(w16[key], w32[key], rtol=0.05, atol=0.02)


def test_fp16_phase2_scales_gradients_and_resumes_its_loss_scale_exactly(tmp_path):
    views = TensorViews(smooth_images(8, 16))
    full = Phase2Trainer(toy_model(), views, phase2_config(tmp_path / "full", "fp16", checkpoint_every=3,
                                                           keep_checkpoints=None))
    assert full.scaler.is_enabled()
    reference = weights(full.train())
    step3 = tmp_path / "full" / "fp16" / "checkpoints" / "step-00000003"
    saved = load_checkpoint(step3, {"fdm": fdm.FDM(8, hidden_channels=16, num_blocks=2)})["scaler"]
    assert saved["scale"] > 1 and saved["_growth_tracker"] >= 1  # an enabled scaler's state, three steps in

    resumed = Phase2Trainer(toy_model(), views, phase2_config(tmp_path / "resumed", "fp16"))
    result = resumed.train(resume_from=step3)
    assert all(torch.equal(reference[k], v) for k, v in weights(result).items())
    assert resumed.scaler.state_dict() == full.scaler.state_dict()  # a fresh scale would count its growth anew

    # a run may resume at another precision: the loss scale is then simply not used
    other = Phase2Trainer(toy_model(), views, phase2_config(tmp_path / "other", "bf16"))
    assert all(torch.isfinite(v).all() for v in weights(other.train(resume_from=step3)).values())


# --- phase 3 -------------------------------------------------------------------------------------------------


def phase3_config(tmp_path, name: str, precision: str, **overrides) -> Phase3Config:
    settings = dict(steps=4, batch_size=2, warmup_steps=1, disc_warmup_steps=1, disc_channels=8, drop_vgg_terms=True,
                    start_steps={"gradient": 0, "adversarial": 1}, log_every=0, val_every=0, checkpoint_every=0,
                    progress=False, precision=precision, output_dir=str(tmp_path / name))
    return Phase3Config(**(settings | overrides))


def phase3_trainer(tmp_path, name: str, precision: str, **overrides) -> Phase3Trainer:
    torch.manual_seed(2)
    module = fdm.FDM(8, hidden_channels=16, num_blocks=2)
    views = TensorViews(smooth_images(4, 32))
    return Phase3Trainer(toy_model(), module, views, phase3_config(tmp_path, name, precision, **overrides))


def test_bf16_phase3_runs_generator_and_discriminator_in_bfloat16(tmp_path):
    trainer = phase3_trainer(tmp_path, "bf16", "bf16")
    seen: dict[str, set] = {"decoder": set(), "discriminator": set()}
    trainer.generator.decoder["decoder"].register_forward_hook(lambda m, a, out: seen["decoder"].add(out.dtype))
    trainer.discriminator.register_forward_hook(lambda m, a, out: seen["discriminator"].add(out.dtype))
    before = {name: weights(module) for name, module in trainer.checkpoint_modules().items()}
    result = trainer.train()
    assert seen == {"decoder": {torch.bfloat16}, "discriminator": {torch.bfloat16}}
    assert not trainer.scaler.is_enabled() and not trainer.disc_scaler.is_enabled()
    for name, module in trainer.checkpoint_modules().items():
        after = weights(module)
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values()), name
        assert any(not torch.equal(before[name][k], after[k]) for k in after), name  # every part trained
    assert result.training_info["phase3"]["precision"] == "bf16"


def test_fp16_phase3_resume_restores_both_loss_scales(tmp_path):
    full = phase3_trainer(tmp_path, "full", "fp16")
    full.train()
    split = phase3_trainer(tmp_path, "split", "fp16")
    split.train(until=2)
    checkpoint = latest_checkpoint(tmp_path / "split" / "checkpoints")
    resumed = phase3_trainer(tmp_path, "split", "fp16")
    resumed.train(resume_from=checkpoint)
    for name, module in full.checkpoint_modules().items():
        assert all(torch.equal(v, weights(resumed.checkpoint_modules()[name])[k]) for k, v in weights(module).items()), name
    for name, scaler in full.gradient_scalers().items():
        assert scaler.is_enabled() and resumed.gradient_scalers()[name].state_dict() == scaler.state_dict(), name


# --- inference -----------------------------------------------------------------------------------------------


def toy_dequantizer() -> fdm.Dequantizer:
    """The toy model with an FDM that changes its features (a random, small output layer)."""
    model = toy_model()
    torch.manual_seed(3)
    module = fdm.FDM(8, hidden_channels=16, num_blocks=2, base_model_fingerprint=fdm.find_adapter(model).fingerprint())
    torch.nn.init.normal_(module.head.weight, std=0.05)
    return fdm.Dequantizer(model, module.eval())


def test_dequantizer_runs_under_autocast_and_keeps_the_exact_codes():
    deq = toy_dequantizer()
    x = smooth_images(2, 16, seed=4)
    hole = torch.zeros(2, 1, 16, 16)
    hole[..., 4:12, 0:8] = 1
    with torch.no_grad():
        reference = deq.reconstruct(x, hole)
        with autocast(x.device, "bf16"):  # float32 input, float32 weights: the dtype check accepts autocast
            image = deq.reconstruct(x, hole)
    assert image.dtype == torch.bfloat16
    assert 0 < (image.float() - reference).abs().mean() < 0.02

    pytest.importorskip("taming")  # a quantizer whose distances are matrix products (taming's VectorQuantizer2)
    from fdm.demo.model import load_demo_fdm, load_demo_vqgan
    from fdm.demo.run import SAMPLE_IMAGES, load_sample

    demo = fdm.Dequantizer(load_demo_vqgan(), load_demo_fdm())
    with torch.no_grad():
        z = demo.encode(torch.cat([load_sample(name)[..., :64, :64] for name in SAMPLE_IMAGES]))
        _, codes = demo.quantize(z)
        with autocast(z.device, "bf16"):
            _, autocast_codes = demo.quantize(z)
            raw_codes = demo.adapter.quantize(z)[1]
    assert torch.equal(autocast_codes, codes)
    assert not torch.equal(raw_codes, codes)  # what a bfloat16 nearest-code search does


def test_evaluate_views_and_eval_command_with_bf16(tmp_path, monkeypatch):
    from fdm.cli import main

    deq = toy_dequantizer()
    views = TensorViews(smooth_images(4, 16, seed=5))
    low = evaluate_views(deq, views, extras=False, progress=False, precision="bf16")["settings"]["reconstruction"]
    high = evaluate_views(deq, views, extras=False, progress=False)["settings"]["reconstruction"]
    assert low["psnr"]["fdm"] != high["psnr"]["fdm"]  # the models ran in bfloat16 ...
    assert low["psnr"]["fdm"] == pytest.approx(high["psnr"]["fdm"], abs=0.2)  # ... and the metrics in float32
    assert low["feature_ratio"] == pytest.approx(high["feature_ratio"], abs=0.02)

    deq.fdm.save_pretrained(tmp_path / "fdm")
    write_images(tmp_path / "images", [(24, 24), (20, 28)])
    monkeypatch.setattr("fdm.commands.model_options.load_base_model", lambda args: deq.model)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", str(tmp_path / "images"), "--fdm", str(tmp_path / "fdm"), "--precision", "bf16",
                     "--json", "--no-extras", "--no-progress", "--crop", "16", "--views-per-image", "1"])
    assert code == 0
    report = json.loads(out.getvalue())
    assert report["precision"] == "bf16" and report["views"] == 2
    assert math.isfinite(report["settings"]["reconstruction"]["psnr"]["fdm"])


def test_commands_take_a_precision_option():
    from fdm.commands import evaluate, finetune, train

    for command, required in ((train, ["--data", "d", "--out", "o"]),
                              (finetune, ["--data", "d", "--out", "o", "--steps", "1"]),
                              (evaluate, ["folder"])):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        assert parser.parse_args(required).precision == "fp32"
        assert parser.parse_args([*required, "--precision", "bf16"]).precision == "bf16"
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            parser.parse_args([*required, "--precision", "fp8"])
