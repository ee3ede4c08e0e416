"""fdm.FDM: the paper's architecture, identity at initialisation, masking, and the official checkpoint."""

import pytest
import torch
from torch import nn

import fdm
from fdm.errors import CheckpointError, InputError
from fdm.io.official import fdm_to_official_state_dict


class _OfficialBlock(nn.Module):
    """The released residual block's layout: ``conv`` = Sequential(conv3x3, ReLU, conv1x1)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(), nn.Conv2d(c // 2, c, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def _official_reference(c):
    """The released module's layout (``mix`` Sequential, indices 0..10), built independently of fdm.FDM."""
    mix = nn.Sequential(nn.Conv2d(c + 1, c, 3, padding=1), nn.ReLU(), *[_OfficialBlock(c) for _ in range(8)],
                        nn.Conv2d(c, c, 3, padding=1))
    holder = nn.Module()
    holder.mix = mix
    return holder


def test_parameter_count_matches_paper():
    n = sum(p.numel() for p in fdm.FDM(256).parameters())
    assert 3.7e6 < n < 3.9e6  # "about 3.8 M parameters at C = 256"


@pytest.mark.parametrize("mask_channels", [0, 1])
def test_fresh_fdm_is_exact_identity(mask_channels):
    module = fdm.FDM(16, mask_channels=mask_channels, hidden_channels=8, num_blocks=2)
    z = torch.randn(3, 16, 5, 7)
    mask = (torch.rand(3, 1, 5, 7) > 0.5).float()
    assert torch.equal(module(z), z)
    assert torch.equal(module(z, mask), z)


def test_correction_only_on_generated_cells():
    module = fdm.FDM(8, hidden_channels=8, num_blocks=1)
    nn.init.normal_(module.head.weight)
    z = torch.randn(2, 8, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    out = module(z, mask)
    assert torch.equal(out[:, :, 2:], z[:, :, 2:])
    assert not torch.allclose(out[:, :, :2], z[:, :, :2])
    assert torch.allclose(module.predict_error(z, mask), out - z)


def test_mask_batch_of_one_broadcasts():
    module = fdm.FDM(8, hidden_channels=8, num_blocks=1)
    nn.init.normal_(module.head.weight)
    z = torch.randn(3, 8, 4, 4)
    mask = (torch.rand(1, 1, 4, 4) > 0.5).float()
    assert torch.allclose(module(z, mask), module(z, mask.expand(3, -1, -1, -1)))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(8, 4, 4), "shape"),
        (torch.randn(1, 7, 4, 4), "8 channels"),
        (torch.randint(0, 3, (1, 8, 4, 4)), "floating-point"),
    ],
)
def test_bad_feature_maps_are_rejected(bad, match):
    with pytest.raises(InputError, match=match):
        fdm.FDM(8, hidden_channels=8, num_blocks=1)(bad)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.full((1, 1, 4, 4), 0.5), "binary"),
        (torch.ones(1, 1, 8, 8), "latent-cell mask"),
        (torch.ones(1, 2, 4, 4), "latent-cell mask"),
    ],
)
def test_bad_masks_are_rejected(mask, match):
    with pytest.raises(InputError, match=match):
        fdm.FDM(8, hidden_channels=8, num_blocks=1)(torch.randn(1, 8, 4, 4), mask)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="mask_channels"):
        fdm.FDM(8, mask_channels=3)


@pytest.mark.parametrize("prefix", ["fdm.", "lip."])
def test_official_checkpoint_gives_official_outputs(tmp_path, prefix):
    c = 16
    reference = _official_reference(c)
    for p in reference.parameters():
        nn.init.normal_(p, std=0.1)
    state = {f"{prefix}{k}": v for k, v in reference.state_dict().items()}
    state.update({"content_codec.quant_conv.weight": torch.zeros(1), "loss.discriminator.w": torch.zeros(1)})
    path = tmp_path / "official.pth"
    torch.save({"model": state}, path)

    module = fdm.FDM.from_official_checkpoint(path)
    assert module.channels == c and not module.training
    z_q, z = torch.randn(2, c, 6, 6), torch.randn(2, c, 6, 6)
    cells = (torch.rand(2, 1, 6, 6) > 0.4).float()
    z_in = z * (1 - cells) + z_q * cells  # the official apply_fdm: continuous on known, quantized on holes
    expected = z_in + reference.mix(torch.cat([z_in, cells], 1)) * cells
    assert torch.allclose(module(z_in, cells), expected, atol=1e-6)


def test_official_key_mapping_round_trip():
    module = fdm.FDM(16)
    official = fdm_to_official_state_dict(module.state_dict())
    assert set(official) == {f"fdm.{k}" for k in _official_reference(16).state_dict()}
    again = fdm.FDM.from_official_checkpoint({"model": official})
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values()))


def test_official_checkpoint_errors(tmp_path):
    reference = _official_reference(16)
    state = {f"fdm.{k}": v for k, v in reference.state_dict().items()}
    with pytest.raises(CheckpointError, match="No FDM weights"):
        fdm.FDM.from_official_checkpoint({"model": {"content_codec.x": torch.zeros(1)}})
    broken = dict(state)
    del broken["fdm.mix.5.conv.2.weight"]
    with pytest.raises(CheckpointError, match="mix.5|blocks.3.expand.weight"):
        fdm.FDM.from_official_checkpoint(broken)
    wrong = dict(state)
    wrong["fdm.mix.10.weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        fdm.FDM.from_official_checkpoint(wrong)
    truncated = tmp_path / "cut.pth"
    torch.save({"model": state}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        fdm.FDM.from_official_checkpoint(truncated)
