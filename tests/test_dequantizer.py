"""fdm.Dequantizer on a plain encoder / quantizer / decoder model (tests/toy_vq.py)."""

import pytest
import torch
from torch import nn

import fdm
from fdm.errors import FingerprintMismatchError, InputError
from toy_vq import ToyVQ, ToyVQAdapter


def _trained_looking_fdm(channels=8):
    module = fdm.FDM(channels, hidden_channels=16, num_blocks=2)
    nn.init.normal_(module.head.weight, std=0.1)
    return module.eval()


@pytest.fixture
def deq(toy_model):
    return fdm.Dequantizer(toy_model, _trained_looking_fdm())


def test_adapter_is_chosen_from_model_type(deq):
    assert isinstance(deq.adapter, ToyVQAdapter) and deq.factor == 4


def test_unknown_model_type_is_refused():
    with pytest.raises(TypeError, match="No fdm adapter handles torch.nn.modules.linear.Linear"):
        fdm.Dequantizer(nn.Linear(2, 2), fdm.FDM(8))


def test_identity_fdm_changes_nothing(toy_model):
    deq = fdm.Dequantizer(toy_model, fdm.FDM(8, hidden_channels=8, num_blocks=1))
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z_q, _ = deq.quantize(deq.encode(x))
    assert torch.equal(deq.decode(z_q), toy_model.decode(z_q))


def test_decode_applies_fdm_before_post_quant_conv(deq, toy_model):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = deq.encode(x)
    z_q, indices = deq.quantize(z)
    assert indices.shape == (2, 4, 4) and torch.equal(toy_model.lookup(indices), z_q)
    expected = toy_model.decode(deq.fdm(z_q))
    assert torch.allclose(deq.decode(z_q), expected)
    assert torch.allclose(deq.decode_indices(indices), expected)
    assert torch.allclose(deq.reconstruct(x), expected)
    assert torch.allclose(deq.reconstruct(x, use_fdm=False), toy_model.decode(z_q))


def test_reconstruct_with_mask_keeps_continuous_features_on_known_cells(deq, toy_model):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :5, :] = 1  # rows 0-4 -> latent rows 0 and 1
    z = toy_model.encode(x)
    z_q, _ = toy_model.quantize(z)
    cells = fdm.latent_mask(mask, 4)
    z_in = torch.where(cells.bool(), z_q, z)
    assert torch.allclose(deq.reconstruct(x, mask), toy_model.decode(deq.fdm(z_in, cells)))
    assert torch.allclose(deq.reconstruct(x, mask, use_fdm=False), toy_model.decode(z_in))


def test_pixel_and_latent_masks_are_equivalent(deq):
    z_q = torch.randn(1, 8, 4, 4)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6, 9] = 1
    assert torch.equal(deq.decode(z_q, mask), deq.decode(z_q, fdm.latent_mask(mask, 4)))


def test_attach_corrects_the_models_own_decode_and_detach_restores_it(deq, toy_model):
    z_q = torch.randn(2, 8, 4, 4)
    plain = toy_model.decode(z_q)
    explicit = deq.decode(z_q)
    assert not torch.allclose(plain, explicit)
    with deq.attached():
        assert deq.is_attached
        assert torch.equal(toy_model.decode(z_q), explicit)
        assert torch.equal(deq.decode(z_q), explicit)  # no double correction
        assert torch.equal(toy_model.decode(z_q), explicit)  # ... and the hook is still in place afterwards
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        assert torch.equal(deq.reconstruct(x), deq.decode(deq.quantize(deq.encode(x))[0]))
    assert not deq.is_attached
    assert torch.equal(toy_model.decode(z_q), plain)


def test_an_explicit_decode_keeps_the_hook_where_it_was(deq, toy_model):
    """A hook added after attach still runs after FDM's once an explicit decode has passed (it sees the corrected
    map), and one added before still runs before."""
    seen = {}

    def recorder(name):
        def hook(module, args):
            seen[name] = args[0].clone()
        return hook

    z_q = torch.randn(1, 8, 4, 4)
    target = toy_model.post_quant_conv
    before = target.register_forward_pre_hook(recorder("before"))
    with deq.attached():
        after = target.register_forward_pre_hook(recorder("after"))
        order = list(target._forward_pre_hooks)
        deq.decode(z_q)  # explicit: FDM's hook passes its input through for this call
        assert torch.equal(seen["before"], seen["after"])
        assert list(target._forward_pre_hooks) == order
        toy_model.decode(z_q)
        assert torch.equal(seen["before"], z_q) and torch.equal(seen["after"], deq.correct(z_q))
        after.remove()
    before.remove()


def test_attached_with_mask_and_detach_on_error(deq, toy_model):
    z_q = torch.randn(1, 8, 4, 4)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1
    with pytest.raises(RuntimeError, match="boom"), deq.attached(mask):
        assert torch.equal(toy_model.decode(z_q), deq.decode(z_q, mask))
        raise RuntimeError("boom")
    assert not deq.is_attached


def test_fingerprint_mismatch_is_refused_unless_overridden(toy_model):
    module = _trained_looking_fdm()
    module.base_model_fingerprint = fdm.codebook_fingerprint(toy_model.codebook.weight)
    fdm.Dequantizer(toy_model, module)  # matching pair
    other = ToyVQ()  # different random codebook
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        fdm.Dequantizer(other, module)
    fdm.Dequantizer(other, module, check_fingerprint=False)


def test_channel_mismatch_is_refused(toy_model):
    with pytest.raises(FingerprintMismatchError, match="16-channel"):
        fdm.Dequantizer(toy_model, fdm.FDM(16))


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(3, 16, 16), "Add a batch dimension"),
        (torch.zeros(1, 1, 16, 16), r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 18, 16), "not a multiple of the downsampling factor 4"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_images_are_rejected(deq, x, match):
    with pytest.raises(InputError, match=match):
        deq.reconstruct(x, pad=False)  # pad=False: a size that is not a multiple of the factor is refused


def test_bad_masks_are_rejected(deq):
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(InputError, match=r"\(1, 1, 16, 16\)"):
        deq.reconstruct(x, torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="binary"):
        deq.reconstruct(x, torch.full((1, 1, 16, 16), 0.5))
    with pytest.raises(InputError, match="pixel mask"):
        deq.decode(torch.randn(1, 8, 4, 4), torch.zeros(1, 1, 5, 5))


def test_bad_indices_are_rejected(deq):
    with pytest.raises(InputError, match="integer tensor of shape"):
        deq.decode_indices(torch.zeros(1, 4, 4))


def test_device_and_dtype_follow_inputs(toy_model):
    deq = fdm.Dequantizer(toy_model.double(), _trained_looking_fdm().double())
    out = deq.reconstruct(torch.rand(1, 3, 8, 8, dtype=torch.float64) * 2 - 1)
    assert out.dtype == torch.float64
