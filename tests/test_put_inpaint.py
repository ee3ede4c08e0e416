"""PUT inpainting with FDM: sampling determinism, mask conventions, the FDM step, input errors, the adapter
and the ``fdm inpaint`` command, on the tiny reference model of tests/data/put (32 x 48 images, 4 x 6 cells)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fdm
from fdm.adapters.put import PUT, PUTAdapter, fdm_authors_state_dict, inpaint, load_model
from fdm.errors import InputError

DATA = Path(__file__).parent / "data" / "put"



@pytest.fixture(scope="module")
def model() -> PUT:
    return load_model(DATA / "put_tiny_p_vqvae.safetensors", DATA / "put_tiny_transformer.safetensors", n_head=4)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.fixture
def hole() -> torch.Tensor:
    mask = torch.zeros(2, 1, 32, 48)
    mask[0, :, 5:19, 9:30] = 1
    mask[1, :, 10:30, 20:44] = 1
    return mask


def _random_fdm(channels: int = 16) -> fdm.FDM:
    module = fdm.FDM(channels=channels, hidden_channels=16, num_blocks=2)
    torch.nn.init.normal_(module.head.weight, std=0.1)
    return module.eval()


def test_greedy_sampling_is_deterministic(model, image, hole):
    a = inpaint(model, image, hole, 3, top_k=1, seed=1, progress=False)
    b = inpaint(model, image, hole, 3, top_k=1, seed=2, progress=False)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert torch.equal(a.indices[:, 0], a.indices[:, 2])  # every sample is the argmax path


def test_seeded_sampling_is_reproducible_and_pluralistic(model, image, hole):
    a = inpaint(model, image, hole, 4, top_k=32, seed=5, progress=False)
    b = inpaint(model, image, hole, 4, top_k=32, seed=5, progress=False)
    assert torch.equal(a.indices, b.indices)
    assert len({tuple(a.indices[0, k].flatten().tolist()) for k in range(4)}) > 1  # several completions
    assert a.images.shape == (2, 4, 3, 32, 48) and a.indices.shape == (2, 4, 4, 6) and a.images_without_fdm is None


def test_known_cells_and_pixels_are_kept(model, image, hole):
    out = inpaint(model, image, hole, 2, top_k=8, seed=0, progress=False)
    known_cells = out.cell_mask == 0  # (B, 1, h, w)
    z = model.codec.encode(image, hole)
    _, nearest = model.codec.quantize.quantize(z, known_cells[:, 0])
    assert torch.equal(out.indices[:, 0][known_cells[:, 0]], nearest[known_cells[:, 0]])
    assert (out.indices[:, :, ~known_cells[0, 0]] < model.transformer.num_codes).all()
    keep = hole[:, None].expand_as(out.images) == 0
    assert torch.equal(out.images[keep], image[:, None].expand_as(out.images)[keep])
    raw = inpaint(model, image, hole, 2, top_k=8, seed=0, paste_known=False, progress=False)
    assert not torch.equal(raw.images[keep], out.images[keep])


def test_fdm_applied_on_generated_cells_as_in_the_paper(model, image, hole):
    module = _random_fdm()
    out = inpaint(model, image, hole, 1, top_k=4, seed=0, fdm=module, paste_known=False, progress=False)
    codec = model.codec
    known = out.cell_mask[:, 0] == 0
    z = codec.encode(image, hole)  # continuous masked-image features
    feats = torch.where(known[:, None], z, codec.quantize.lookup(out.indices[:, 0]))
    with torch.no_grad():
        z_dq = feats + module.predict_error(feats, out.cell_mask)  # correction on generated cells only
        expected = codec.decode(z_dq, image, hole)
        plain = codec.decode(feats, image, hole)
    torch.testing.assert_close(out.images[:, 0], expected)
    torch.testing.assert_close(out.images_without_fdm[:, 0], plain)
    assert not torch.allclose(out.images, out.images_without_fdm)
    fresh = inpaint(model, image, hole, 1, top_k=4, seed=0, fdm=fdm.FDM(channels=16), progress=False)
    assert torch.equal(fresh.images, fresh.images_without_fdm)  # a fresh FDM is an exact identity


def test_mask_file_conventions(model, image, hole, tmp_path):
    hole0 = hole[:1]
    white_hole = Image.fromarray((hole0[0, 0].numpy() * 255).astype(np.uint8))
    white_known = Image.fromarray(((1 - hole0[0, 0].numpy()) * 255).astype(np.uint8))  # PUT's sample masks
    white_hole.save(tmp_path / "pconv.png")
    white_known.save(tmp_path / "put.png")
    assert torch.equal(fdm.load_mask(tmp_path / "pconv.png"), hole0)
    assert torch.equal(fdm.load_mask(tmp_path / "put.png", white_is_hole=False), hole0)
    a = inpaint(model, image[:1], fdm.load_mask(tmp_path / "put.png", white_is_hole=False), 1, top_k=1, progress=False)
    b = inpaint(model, image[:1], hole0, 1, top_k=1, progress=False)
    assert torch.equal(a.images, b.images)


def test_bad_masks_and_sizes_are_refused(model, image, hole):
    with pytest.raises(InputError, match="binary"):
        inpaint(model, image, hole * 0.5, progress=False)
    with pytest.raises(InputError, match="shape"):
        inpaint(model, image, hole[:, :, :16], progress=False)
    with pytest.raises(InputError, match="multiple of the downsampling factor 8"):
        inpaint(model, image[..., :30, :], hole[..., :30, :], progress=False)
    with pytest.raises(InputError, match="position table has 24 entries"):
        inpaint(model, image[..., :32], hole[..., :32], progress=False)
    with pytest.raises(InputError, match="top_k"):
        inpaint(model, image, hole, top_k=0, progress=False)
    with pytest.raises(InputError, match="UQ-Transformer"):
        inpaint(PUT(model.codec), image, hole, progress=False)


def test_other_sizes_with_a_resized_position_table(model, image, hole):
    resized = load_model(DATA / "put_tiny_p_vqvae.safetensors", DATA / "put_tiny_transformer.safetensors", n_head=4)
    resized.transformer.token_shape = (4, 6)
    resized.transformer.resize_position_table((6, 4))
    out = inpaint(resized, image[..., :48, :32].new_zeros(1, 3, 48, 32), hole.new_ones(1, 1, 48, 32), 1, progress=False)
    assert out.images.shape == (1, 1, 3, 48, 32) and (out.cell_mask == 1).all()


def test_several_cells_per_step_fill_every_cell(model, image, hole):
    out = inpaint(model, image, hole, 2, top_k=4, cells_per_step=5, seed=0, progress=False)
    generated = out.cell_mask[:, None].expand(-1, 2, -1, -1, -1)[:, :, 0] == 1  # (B, N, h, w)
    codes = out.indices[generated]
    assert codes.numel() == 2 * int(out.cell_mask.sum()) > 0  # every generated cell of both samples ...
    assert ((codes >= 0) & (codes < model.transformer.num_codes)).all()  # ... holds a sampled code, none left -1


def test_adapter_and_dequantizer(model, image, hole):
    assert isinstance(fdm.find_adapter(model), PUTAdapter) and isinstance(fdm.find_adapter(model.codec), PUTAdapter)
    deq = fdm.Dequantizer(model, _random_fdm())
    assert deq.factor == 8
    with torch.no_grad():
        # known cells take their features from the masked image (PUT's encoding), not from the whole image
        torch.testing.assert_close(deq.encode(image, hole), model.codec.encode(image, hole))
        assert not torch.allclose(deq.encode(image, hole), deq.encode(image))
        assert deq.adapter.decode_guide(image, hole) == {"image": image, "pixel_mask": hole}
        with_fdm = deq.reconstruct(image, hole)
        without = deq.reconstruct(image, hole, use_fdm=False)
        assert with_fdm.shape == image.shape and not torch.allclose(with_fdm, without)
        z = deq.encode(image, hole)
        z_q, _ = deq.quantize(z)
        explicit = deq.decode(z_q, hole, image=image)  # the guide built from image and the mask given once
        torch.testing.assert_close(explicit, deq.decode(z_q, hole, image=image, pixel_mask=hole))
        with pytest.raises(InputError, match=r"mask \(a pixel mask of image's size, with image=\)"):
            deq.decode(z_q, deq.cell_mask(hole, z_q), image=image)  # a latent-cell mask cannot guide pixels
        with deq.attached(hole):  # PUT's own decode path, corrected by the hook
            hooked = model.codec.decode(z_q, image, hole)
        torch.testing.assert_close(hooked, explicit)
        assert not deq.is_attached and not torch.allclose(model.codec.decode(z_q, image, hole), explicit)
    adapter = PUTAdapter(model)
    with torch.no_grad():
        adapter.encode(image)  # no hidden state: an earlier encode does not become the decoder's guide
    with pytest.raises(InputError, match="image="):
        adapter.decode(z_q, pixel_mask=hole)


def _write_inputs(tmp_path: Path, image: torch.Tensor, hole: torch.Tensor) -> tuple[Path, Path]:
    from fdm.images import save_image

    save_image(image[0], tmp_path / "photo.png")
    Image.fromarray(((1 - hole[0, 0].numpy()) * 255).astype(np.uint8)).save(tmp_path / "mask.png")  # white = known
    return tmp_path / "photo.png", tmp_path / "mask.png"


def test_inpaint_command(model, image, hole, tmp_path):
    from fdm.adapters.put import command

    fdm_module = fdm.FDM(channels=16)
    torch.nn.init.normal_(fdm_module.head.weight, std=0.1)
    torch.save({"model": fdm_authors_state_dict(model, fdm_module)}, tmp_path / "fdm_authors.pth")
    photo, mask = _write_inputs(tmp_path, image, hole)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "fdm_authors.pth"), "--image", str(photo), "--mask",
                              str(mask), "--white-is-known", "--out", str(tmp_path / "out"), "--num-samples", "2",
                              "--top-k", "4", "--device", "cpu", "--no-progress"])
    assert args.model == "put"
    assert command.run(args) == 0  # codec, sampler and FDM all read from the one FDM-authors file
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["photo_compare.png", "photo_sample0.png", "photo_sample0_without_fdm.png",
                     "photo_sample1.png", "photo_sample1_without_fdm.png"]
    compare = Image.open(tmp_path / "out" / "photo_compare.png")
    assert compare.size == (48 * 5, 32)
    kept = np.asarray(Image.open(tmp_path / "out" / "photo_sample0.png"))[hole[0, 0].numpy() == 0]
    assert np.array_equal(kept, np.asarray(Image.open(photo))[hole[0, 0].numpy() == 0])  # known pixels pasted


@pytest.mark.slow
def test_phase2_training_through_the_core_trainer(model, photos_dir, tmp_path):
    """Phase 2 (FDM, WACV 2025 sec. 3.3) for a PUT model with random irregular masks, via fdm.training."""
    from fdm.training import ImageFolderViews, Phase2Config, train_phase2

    views = ImageFolderViews(photos_dir / "train", crop_size=32, views_per_image=1)
    config = Phase2Config(steps=40, batch_size=8, lr=1e-3, warmup_steps=0, progress=False, checkpoint_every=0,
                          hidden_channels=16, num_blocks=2, output_dir=str(tmp_path / "fdm"))
    trained = train_phase2(model, views, config)
    x = torch.stack([views[i] for i in range(8)])
    holes = torch.stack([fdm.random_irregular_mask(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)])
    deq = fdm.Dequantizer(model, trained)
    with torch.no_grad():
        z = deq.encode(x)
        z_q, _ = deq.quantize(z)
        cells = fdm.latent_mask(holes, 8)
        mixed = torch.where(cells.bool(), z_q, z)
        before = ((mixed - z).abs() * cells).sum() / cells.sum()
        after = ((trained(mixed, cells) - z).abs() * cells).sum() / cells.sum()
    assert after < before  # the quantization error on generated cells shrinks
