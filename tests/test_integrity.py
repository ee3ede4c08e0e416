"""Nothing broken is trained on or saved silently (issue 12, items 3 and 4): digests on training checkpoints,
fine-tuned decoders and the disk feature cache; non-finite losses, features and images; invalid ids, factors,
empty maps and dtypes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_phase3 import config as phase3_config
from test_phase3 import smooth_images, toy_fdm, toy_model

import fdm
from fdm.errors import CheckpointError, InputError, TrainingError
from fdm.io.decoder_weights import DECODER_WEIGHTS_NAME
from fdm.training import Phase2Config, Phase2Trainer, TensorViews, latest_checkpoint
from fdm.training.phase3 import Phase3Trainer
from toy_vq import ToyVQ


def flip_byte(path, offset_from_end: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def phase2(tmp_path, views, **overrides) -> Phase2Trainer:
    settings = dict(steps=4, batch_size=4, warmup_steps=1, progress=False, checkpoint_every=2, log_every=2,
                    cache="disk", output_dir=str(tmp_path / "out"))
    return Phase2Trainer(ToyVQ().eval(), views, Phase2Config(**(settings | overrides)))


@pytest.fixture
def views() -> TensorViews:
    return TensorViews(smooth_images(8, size=16))


def nothing_saved(tmp_path) -> bool:
    return not (tmp_path / "out" / "model.safetensors").exists()


# --- training checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["fdm.safetensors", "training_state.pt", "manifest.json"])
def test_altered_training_checkpoint_is_refused(tmp_path, views, victim):
    torch.manual_seed(0)
    phase2(tmp_path, views, steps=2).train()
    checkpoint = latest_checkpoint(tmp_path / "out" / "checkpoints")
    flip_byte(checkpoint / victim, offset_from_end=3 if victim == "manifest.json" else 9)
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match="Delete the checkpoint folder") as err:
        phase2(tmp_path, views, steps=4, output_dir=str(tmp_path / "again")).train(resume_from=checkpoint)
    assert str(checkpoint) in str(err.value)


def test_checkpoint_without_manifest_is_refused(tmp_path, views):
    phase2(tmp_path, views, steps=2).train()
    checkpoint = latest_checkpoint(tmp_path / "out" / "checkpoints")
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        phase2(tmp_path, views, steps=2, output_dir=str(tmp_path / "again")).train(resume_from=checkpoint)


def test_checkpoint_files_must_be_listed_in_the_manifest_and_be_its_own(tmp_path, views):
    phase2(tmp_path, views, steps=2).train()
    checkpoint = latest_checkpoint(tmp_path / "out" / "checkpoints")
    again = tmp_path / "again"
    (checkpoint / "discriminator.safetensors").write_bytes(b"")  # a file the manifest does not list
    with pytest.raises(CheckpointError, match=r"holds discriminator.safetensors, which its manifest does not list"):
        phase2(tmp_path, views, steps=2, output_dir=str(again)).train(resume_from=checkpoint)
    (checkpoint / "discriminator.safetensors").unlink()
    moved = tmp_path / "elsewhere.safetensors"
    (checkpoint / "fdm.safetensors").rename(moved)
    (checkpoint / "fdm.safetensors").symlink_to(moved)  # the same bytes, through a link
    with pytest.raises(CheckpointError, match=r"fdm.safetensors is a symbolic link"):
        phase2(tmp_path, views, steps=2, output_dir=str(again)).train(resume_from=checkpoint)


def test_non_finite_training_state_is_neither_resumed_nor_saved(tmp_path, views):
    """An optimizer moment set to NaN, with the checkpoint's digests recomputed (so only the values are wrong), is
    refused before any weight is loaded; a trainer never writes such a state."""
    from fdm.io.weights import file_sha256

    phase2(tmp_path, views, steps=2).train()
    checkpoint = latest_checkpoint(tmp_path / "out" / "checkpoints")
    state_file = checkpoint / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"][0] = float("nan")
    torch.save(state, state_file)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["sha256"]["training_state.pt"] = file_sha256(state_file)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    resumed = phase2(tmp_path, views, steps=4, output_dir=str(tmp_path / "again"))
    before = {k: v.clone() for k, v in resumed.fdm.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"holds NaN or Inf \(at /optimizer/state/0/exp_avg\)"):
        resumed.train(resume_from=checkpoint)
    assert all(torch.equal(v, resumed.fdm.state_dict()[k]) for k, v in before.items())
    trainer = phase2(tmp_path, views, steps=2, output_dir=str(tmp_path / "broken"))
    trainer.prepare()
    trainer.optimizer.load_state_dict(state["optimizer"])
    with pytest.raises(CheckpointError, match="the training state of step 0 holds NaN or Inf"):
        trainer.save_checkpoint()
    assert not (tmp_path / "broken" / "checkpoints").exists() or not any((tmp_path / "broken" / "checkpoints").iterdir())


# --- fine-tuned decoder ---------------------------------------------------------------------------------------


def test_flipped_byte_in_decoder_weights_is_refused(tmp_path):
    trainer = Phase3Trainer(toy_model(), toy_fdm(), TensorViews(smooth_images(4)),
                            phase3_config(tmp_path, "run", steps=1, warmup_steps=1))
    trainer.train()
    decoder = tmp_path / "run" / "fdm" / DECODER_WEIGHTS_NAME
    flip_byte(decoder)
    with pytest.raises(CheckpointError, match="corrupted") as err:
        fdm.FDM.from_pretrained(tmp_path / "run" / "fdm")
    assert str(decoder) in str(err.value)


def test_decoder_weights_without_digest_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    trainer = Phase3Trainer(toy_model(), toy_fdm(), TensorViews(smooth_images(4)),
                            phase3_config(tmp_path, "run", steps=1, warmup_steps=1))
    trainer.train()
    decoder = tmp_path / "run" / "fdm" / DECODER_WEIGHTS_NAME
    save_file(load_file(decoder), str(decoder))  # the same tensors, re-written without fdm-vq's digest
    with pytest.raises(CheckpointError, match="carries no fdm_vq.sha256 digest"):
        fdm.FDM.from_pretrained(tmp_path / "run" / "fdm")


# --- disk feature cache ---------------------------------------------------------------------------------------


def cache_folder(tmp_path):
    """The one shard of the run's feature cache."""
    (folder,) = (tmp_path / "out" / "feature-cache").glob("*/shard-00000-of-00001")
    return folder


def overwrite_with_nan(folder):
    array = np.load(folder / "z.npy", mmap_mode="r+")
    array[:] = np.nan
    array.flush()


def overwrite_with_other_codes(folder):
    array = np.load(folder / "indices.npy", mmap_mode="r+")
    array[:] = np.random.default_rng(0).integers(0, 8, size=array.shape)
    array.flush()


def truncate(folder):
    data = (folder / "z.npy").read_bytes()
    (folder / "z.npy").write_bytes(data[: len(data) // 2])


def garble_meta(folder):
    (folder / "meta.json").write_text("{not json")


def rebind_to_other_views(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["binding"]["views"] = "0" * 16
    (folder / "meta.json").write_text(json.dumps(meta))


def digests_not_a_mapping(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"] = ["0" * 64]
    (folder / "meta.json").write_text(json.dumps(meta))


def codes_out_of_range_digest_recomputed(folder):
    from fdm.io.weights import file_sha256

    array = np.load(folder / "indices.npy", mmap_mode="r+")
    array[0] = 999  # the toy codebook has 16 codes
    array.flush()
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"]["indices"] = file_sha256(folder / "indices.npy")
    (folder / "meta.json").write_text(json.dumps(meta))


def meta_nested_deeply(folder):
    (folder / "meta.json").write_text("[" * 100_000 + "]" * 100_000)  # json.loads: RecursionError


def array_as_symbolic_link(folder):
    target = folder.parent.parent / "elsewhere.npy"
    (folder / "z.npy").rename(target)
    (folder / "z.npy").symlink_to(target)


@pytest.mark.parametrize(("damage", "phrase"), [
    (overwrite_with_nan, "missing, truncated or altered"),
    (digests_not_a_mapping, "metadata .* is unreadable .*not a mapping"),
    (codes_out_of_range_digest_recomputed, r"code indices outside \[0, 16\)"),
    (array_as_symbolic_link, "is a symbolic link"),
    (overwrite_with_other_codes, "missing, truncated or altered"),
    (truncate, "missing, truncated or altered"),
    (garble_meta, "metadata .* is unreadable"),
    (meta_nested_deeply, "metadata .* is unreadable"),
    (rebind_to_other_views, "built for another views"),
])
def test_damaged_feature_cache_is_refused_and_nothing_is_saved(tmp_path, views, damage, phrase):
    torch.manual_seed(0)
    phase2(tmp_path, views, steps=1, checkpoint_every=0).train()
    (tmp_path / "out" / "model.safetensors").unlink()
    folder = cache_folder(tmp_path)
    damage(folder)
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match=phrase) as err:
        phase2(tmp_path, views, steps=1, checkpoint_every=0).train()
    assert f"Delete {folder.parent}" in str(err.value)
    assert nothing_saved(tmp_path)


def test_intact_feature_cache_is_reused(tmp_path, views):
    torch.manual_seed(0)
    first = phase2(tmp_path, views, steps=2, checkpoint_every=0)
    first.train()
    torch.manual_seed(0)
    second = phase2(tmp_path, views, steps=2, checkpoint_every=0)
    second.train()
    assert second.final_loss == first.final_loss


# --- non-finite values in training ------------------------------------------------------------------------------


def test_model_with_nan_features_stops_at_the_cache_fill(tmp_path, views):
    model = ToyVQ().eval()
    with torch.no_grad():
        model.quant_conv.bias.fill_(float("nan"))
    config = Phase2Config(steps=2, batch_size=4, warmup_steps=1, progress=False, checkpoint_every=0,
                          output_dir=str(tmp_path / "out"))
    with pytest.raises(InputError, match="encoded features z .* NaN/Inf"):
        Phase2Trainer(model, views, config).train()
    assert nothing_saved(tmp_path)


def test_diverging_phase2_run_stops_and_saves_nothing(tmp_path, views):
    torch.manual_seed(0)
    with pytest.raises(TrainingError, match="not finite, and nothing was saved"):
        phase2(tmp_path, views, steps=40, lr=1e38, warmup_steps=1, cache="memory", checkpoint_every=0).train()
    assert nothing_saved(tmp_path)


def test_nan_weights_are_neither_saved_nor_loaded(tmp_path):
    from safetensors.torch import save_file

    from fdm.io.weights import DIGEST_KEY, state_dict_digest
    from fdm.training.checkpointing import save_checkpoint

    module = fdm.FDM(8, hidden_channels=4, num_blocks=1)
    module.save_pretrained(tmp_path / "good")
    with torch.no_grad():
        module.head.bias[3] = float("nan")
        module.stem.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"weights to write to .* hold NaN or Inf values \(head.bias, stem.weight\)"):
        module.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="fdm weights of step 7 hold NaN or Inf values"):
        save_checkpoint(tmp_path / "checkpoints", 7, {"fdm": module}, {})
    assert not (tmp_path / "checkpoints").exists()
    # a weight file edited to hold a NaN, its digest recomputed to match, is refused on loading
    good = tmp_path / "good"
    edited = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(edited, str(good / "model.safetensors"), metadata={DIGEST_KEY: state_dict_digest(edited)})
    with pytest.raises(CheckpointError, match=r"weights in .*model.safetensors hold NaN or Inf values"):
        fdm.FDM.from_pretrained(good)


def test_diverging_phase3_run_stops_and_saves_nothing(tmp_path):
    trainer = Phase3Trainer(toy_model(), toy_fdm(), TensorViews(smooth_images(4)),
                            phase3_config(tmp_path, "run", steps=40, warmup_steps=1, lr=1e38))
    with pytest.raises(TrainingError, match=r"step \d+: .*not finite"):
        trainer.train()
    assert not (tmp_path / "run" / "fdm").exists()


# --- inputs of the Dequantizer and helpers ---------------------------------------------------------------------


@pytest.fixture
def deq() -> fdm.Dequantizer:
    model = ToyVQ().eval()
    adapter = fdm.find_adapter(model)
    return fdm.Dequantizer(model, fdm.FDM(adapter.channels, hidden_channels=8, num_blocks=1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_refused(deq, bad):
    x = torch.zeros(1, 3, 16, 16)
    x[0, 1, 3, 4] = bad
    with pytest.raises(InputError, match="1 NaN/Inf values"):
        deq.reconstruct(x)
    with pytest.raises(InputError, match="NaN/Inf"):
        deq.encode(x)
    assert deq.encode(x, check_finite=False).shape[0] == 1  # the documented opt-out for trusted tight loops


def test_indices_outside_the_codebook_are_refused(deq):
    size = deq.adapter.codebook().shape[0]
    with pytest.raises(InputError, match=rf"\[0, {size}\).*from 0 to {size}"):
        deq.decode_indices(torch.tensor([[[0, size]]]))
    with pytest.raises(InputError, match="from -1 to 0"):
        deq.decode_indices(torch.tensor([[[-1, 0]]]))
    with pytest.raises(InputError, match="empty"):
        deq.decode_indices(torch.zeros(1, 0, 2, dtype=torch.long))


@pytest.mark.parametrize("factor", [0, -8, 2.5, True])
def test_latent_mask_with_a_bad_factor(factor):
    with pytest.raises(InputError, match="factor must be a positive integer"):
        fdm.latent_mask(torch.zeros(1, 1, 8, 8), factor)


def test_empty_maps_are_refused(deq):
    with pytest.raises(InputError, match="empty"):
        deq.reconstruct(torch.zeros(0, 3, 16, 16))
    with pytest.raises(InputError, match="empty"):
        deq.quantize(torch.zeros(1, deq.adapter.channels, 0, 4))
    with pytest.raises(InputError, match="empty"):
        fdm.latent_mask(torch.zeros(1, 1, 0, 8), 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_need_the_model_in_that_dtype(deq, dtype):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with pytest.raises(InputError, match=f"dtype {dtype} but the model's weights are torch.float32"):
        deq.reconstruct(x.to(dtype))
    if dtype == torch.float64:  # supported once the model and FDM are moved to that dtype
        deq.to(dtype)
        out = deq.reconstruct(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_fdm_without_fingerprint_attaches_with_a_warning():
    model = ToyVQ().eval()
    adapter = fdm.find_adapter(model)
    with pytest.warns(UserWarning, match="no base-model fingerprint.* any model with 8-channel features"):
        fdm.Dequantizer(model, fdm.FDM(adapter.channels, hidden_channels=8, num_blocks=1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdm.Dequantizer(model, fdm.FDM(adapter.channels, hidden_channels=8, num_blocks=1,
                                       base_model_fingerprint=adapter.fingerprint()))
