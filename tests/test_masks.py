"""Masks: latent-cell masks, mask files in both conventions, random irregular training masks."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fdm
import fdm.validation
from fdm.errors import InputError
from fdm.evaluation.comparison import compare


def test_latent_mask_any_hole_pixel_marks_the_cell():
    mask = torch.zeros(2, 1, 32, 48)
    mask[0, 0, 17, 47] = 1  # one pixel in cell (1, 2) of image 0
    cells = fdm.latent_mask(mask, 16)
    assert cells.shape == (2, 1, 2, 3)
    assert cells[0, 0].tolist() == [[0, 0, 0], [0, 0, 1]]
    assert cells[1].sum() == 0


def test_latent_mask_accepts_bool_and_keeps_float_dtype():
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 0, 0] = True
    assert fdm.latent_mask(mask, 4).dtype == torch.float32
    assert fdm.latent_mask(mask.double(), 4).dtype == torch.float64


@pytest.mark.parametrize(
    "mask, factor, match",
    [
        (torch.zeros(1, 1, 30, 32), 16, "multiple of the downsampling factor 16"),
        (torch.zeros(1, 32, 32), 16, r"\(B, 1, H, W\)"),
        (torch.full((1, 1, 32, 32), 0.3), 16, "binary"),
    ],
)
def test_latent_mask_rejects_bad_masks(mask, factor, match):
    with pytest.raises(InputError, match=match):
        fdm.latent_mask(mask, factor)


@pytest.mark.parametrize("white_is_hole", [True, False])
def test_load_mask_conventions(tmp_path, white_is_hole):
    pixels = np.zeros((16, 24), dtype=np.uint8)
    pixels[4:8, 10:20] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    mask = fdm.load_mask(path, white_is_hole=white_is_hole)
    assert mask.shape == (1, 1, 16, 24)
    white = torch.from_numpy(pixels == 255)
    assert torch.equal(mask[0, 0].bool(), white if white_is_hole else ~white)


def test_load_mask_resizes_with_nearest_neighbour(tmp_path):
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:4] = 255
    Image.fromarray(pixels).save(tmp_path / "m.png")
    mask = fdm.load_mask(tmp_path / "m.png", size=(16, 32))
    assert mask.shape == (1, 1, 16, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, :8].all() and not mask[0, 0, 8:].any()


def test_load_mask_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        fdm.load_mask(tmp_path / "nope.png")


def test_random_irregular_mask_is_seeded_binary_and_in_range():
    ratios = []
    for seed in range(12):
        m = fdm.random_irregular_mask(64, 96, (0.2, 0.6), generator=torch.Generator().manual_seed(seed))
        assert m.shape == (1, 64, 96) and set(m.unique().tolist()) <= {0.0, 1.0}
        ratios.append(m.mean().item())
    assert all(0.15 <= r <= 0.6 + 1e-6 for r in ratios), ratios
    a = fdm.random_irregular_mask(32, 32, generator=torch.Generator().manual_seed(3))
    b = fdm.random_irregular_mask(32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_cell_mask_bank_picks_seeded_cell_masks_under_flips():
    bank = fdm.masks.CellMaskBank((8, 8), 4, (0.2, 0.6), seed=5, count=16)
    again = fdm.masks.CellMaskBank((8, 8), 4, (0.2, 0.6), seed=5, count=16)
    assert torch.equal(bank.cells, again.cells) and bank.cells.shape == (16, 1, 8, 8)
    other = fdm.masks.CellMaskBank((8, 8), 4, (0.2, 0.6), seed=6, count=16)
    assert not any(torch.equal(a, b) for a in bank.cells for b in other.cells)  # other seeds share no mask
    seed = fdm.masks._mask_seed(5, 0)
    first = fdm.latent_mask(fdm.random_irregular_mask(32, 32, (0.2, 0.6), generator=torch.Generator().manual_seed(seed))[None], 4)[0]
    assert torch.equal(bank.pick(0), first)  # key 0: mask 0 as drawn
    variants = {tuple(bank.pick(k).flatten().tolist()) for k in range(8)}  # the 8 flips / rotations of mask 0
    assert len(variants) > 1 and all(sum(v) == first.sum() for v in variants)
    assert torch.equal(bank.pick(8), bank.cells[1]) and torch.equal(bank.pick(8 + 16 * 8), bank.pick(8))
    wide = fdm.masks.CellMaskBank((4, 8), 4, (0.2, 0.6), count=2)
    assert {tuple(wide.pick(k).shape) for k in range(16)} == {(1, 4, 8)}  # no transposes of a non-square map


def test_random_irregular_mask_rejects_bad_ratio():
    with pytest.raises(InputError, match="hole_ratio"):
        fdm.random_irregular_mask(32, 32, (0.7, 0.2))


# --- one binary check per public call --------------------------------------------------------------------------

@pytest.fixture
def binary_checks(monkeypatch) -> list[str]:
    """The names of the masks passed to ``fdm.validation.check_binary_mask`` (the one binary check, a device
    sync), counted in every fdm module that imported it."""
    calls: list[str] = []
    original = fdm.validation.check_binary_mask

    def counted(mask: torch.Tensor, *, name: str = "mask") -> None:
        calls.append(name)
        original(mask, name=name)

    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "fdm" and getattr(module, "check_binary_mask", None) is original:
            monkeypatch.setattr(module, "check_binary_mask", counted)
    return calls


def _hole(b: int, h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(b, 1, h, w)
    mask[..., h // 4: h // 2, w // 3: w // 2 + 3] = 1
    return mask


def _checked_once(calls: list[str], run) -> torch.Tensor:
    calls.clear()
    out = run()
    assert calls == ["mask"]
    return out


def _fdm_for(adapter: fdm.VQAdapter) -> fdm.FDM:
    module = fdm.FDM(adapter.channels, hidden_channels=8, num_blocks=1, base_model_fingerprint=adapter.fingerprint())
    torch.nn.init.normal_(module.head.weight, std=0.1)
    return module.eval()


@torch.no_grad()
def test_put_checks_each_mask_once_per_public_call(binary_checks):
    from fdm.adapters.put import PUTAdapter, inpaint, load_model

    data = Path(__file__).parent / "data" / "put"
    model = load_model(data / "put_tiny_p_vqvae.safetensors", data / "put_tiny_transformer.safetensors", n_head=4)
    deq = fdm.Dequantizer(model, _fdm_for(PUTAdapter(model)))
    x, hole = torch.rand(1, 3, 32, 48) * 2 - 1, _hole(1, 32, 48)
    z_q = deq.quantize(deq.encode(x))[0]

    out = _checked_once(binary_checks, lambda: deq.reconstruct(x, hole))
    assert out.shape == (1, 3, 32, 48)
    _checked_once(binary_checks, lambda: deq.encode(x, hole))
    corrected = _checked_once(binary_checks, lambda: deq.decode(z_q, hole))
    _checked_once(binary_checks, lambda: deq.correct(z_q, fdm.masks.pool_cells(hole, 8)))
    _checked_once(binary_checks, lambda: compare(deq, x, hole))
    _checked_once(binary_checks, lambda: model.codec.reconstruct(x, hole))
    _checked_once(binary_checks, lambda: inpaint(model, x, hole, top_k=1, fdm=deq.fdm, progress=False))
    _checked_once(binary_checks, lambda: deq.attach(hole))  # checked when attached ...
    try:
        assert torch.equal(model.codec.decode(z_q), corrected)
        assert torch.equal(model.codec.decode(z_q), corrected)
        assert binary_checks == ["mask"]  # ... not at each decode the hook corrects
    finally:
        deq.detach()


@torch.no_grad()
def test_taming_checks_the_mask_once_per_public_call(binary_checks):
    pytest.importorskip("taming")
    from taming_tiny import random_model, vqgan_config

    model = random_model(vqgan_config())
    deq = fdm.Dequantizer(model, _fdm_for(fdm.find_adapter(model)))
    x, hole = torch.rand(2, 3, 32, 32) * 2 - 1, _hole(2, 32, 32)
    out = _checked_once(binary_checks, lambda: deq.reconstruct(x, hole))
    assert out.shape == (2, 3, 32, 32)
    _checked_once(binary_checks, lambda: compare(deq, x, hole))
