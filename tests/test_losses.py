"""fdm.losses, the VGG19 backbone loader and the patch discriminator: values on hand-computable inputs,
the paper's weights and start steps, and the refusal to run VGG terms without real weights."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from fdm.errors import CheckpointError
from fdm.losses import (
    PAPER_START_STEPS,
    PAPER_WEIGHTS,
    LossSchedule,
    Phase3Loss,
    discriminator_loss,
    generator_loss,
    gradient_loss,
    gram_matrix,
    l1_loss,
    perceptual_loss,
    qe_loss,
    style_loss,
)
from fdm.training.backbones import VGG19Features, VGG19WeightsMissing, load_vgg19
from fdm.training.discriminator import PatchDiscriminator


@pytest.fixture(scope="module")
def vgg() -> VGG19Features:
    torch.manual_seed(0)
    return VGG19Features().requires_grad_(False).eval()


def test_l1_of_constant_images():
    x, y = torch.full((2, 3, 8, 8), 0.5), torch.full((2, 3, 8, 8), -0.25)
    assert l1_loss(x, y).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same shape"):
        l1_loss(x, y[:, :1])


@pytest.mark.parametrize("axis", [-1, -2])
def test_gradient_loss_of_a_ramp(axis):
    a = 0.1
    ramp = torch.arange(16, dtype=torch.float32) * a
    x = (ramp.view(1, 1, 1, 16) if axis == -1 else ramp.view(1, 1, 16, 1)).expand(2, 3, 16, 16).contiguous()
    flat = torch.zeros_like(x)
    # |dx| = a along the ramp, 0 across it, and 0 for the flat image: (a + 0) / 2
    assert gradient_loss(x, flat).item() == pytest.approx(a / 2)
    assert gradient_loss(x + 0.5, x).item() == pytest.approx(0.0, abs=1e-6)  # same gradients
    x.requires_grad_(True)
    target = torch.zeros_like(x, requires_grad=True)
    gradient_loss(x, target).backward()
    assert target.grad is None and x.grad is not None and x.grad.abs().sum() > 0  # the target is detached


def test_gram_matrix_of_a_known_feature_map():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)  # C = 2, h * w = 2
    expected = torch.tensor([[1 + 4, 3 + 8], [3 + 8, 9 + 16]]) / (2 * 2 * 1)
    torch.testing.assert_close(gram_matrix(f)[0], expected)


def test_perceptual_and_style_on_known_features():
    fx = {"a": torch.ones(1, 2, 2, 2), "b": torch.full((1, 4, 1, 1), 3.0)}
    fy = {"a": torch.zeros(1, 2, 2, 2), "b": torch.ones(1, 4, 1, 1)}
    assert perceptual_loss(fx, fy, layers=("a", "b")).item() == pytest.approx(1 + 2)
    # Gram of ones (C=2, hw=4): entries 4 / 8 = 0.5; of zeros: 0. Gram of 3s (C=4, hw=1): 9/4, of 1s: 1/4.
    assert style_loss(fx, fy, layers=("a", "b")).item() == pytest.approx(0.5 + 2.0)
    with pytest.raises(KeyError, match="lack layers"):
        perceptual_loss(fx, fy, layers=("a", "relu9_9"))


def test_gan_losses_with_known_logits():
    zeros = torch.zeros(2, 1, 3, 3)
    assert generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    # D(fake) = sigmoid(log 3) = 3/4: generator loss -log(3/4)
    assert generator_loss(torch.full((4,), math.log(3))).item() == pytest.approx(-math.log(0.75))
    # confident and right: ~0; real -log(3/4), fake -log(1 - 1/4) -> mean of the two
    assert discriminator_loss(torch.full((4,), 30.0), torch.full((4,), -30.0)).item() == pytest.approx(0, abs=1e-6)
    assert discriminator_loss(torch.full((4,), math.log(3)), torch.full((4,), -math.log(3))).item() == pytest.approx(
        -math.log(0.75)
    )


def test_qe_loss_counts_generated_cells():
    z = torch.zeros(1, 4, 2, 2)
    z_dq = torch.ones(1, 4, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert qe_loss(z_dq, z).item() == pytest.approx(1.0)
    assert qe_loss(z_dq, z, mask).item() == pytest.approx(0.25)


def test_schedule_defaults_are_the_papers():
    s = LossSchedule()
    assert s.weights == PAPER_WEIGHTS == {"qe": 1, "l1": 1, "gradient": 5, "adversarial": 0.1, "perceptual": 0.1,
                                          "style": 250}
    assert s.start_steps == PAPER_START_STEPS
    with pytest.raises(ValueError, match="Unknown loss term"):
        LossSchedule(weights={"lpips": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        LossSchedule(start_steps={"style": -1})


def test_start_steps_are_honoured(vgg):
    disc = PatchDiscriminator(channels=8)
    schedule = LossSchedule(start_steps={"gradient": 2, "perceptual": 3, "style": 3, "adversarial": 5})
    loss = Phase3Loss(schedule, backbone=vgg, discriminator=disc)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (image + 0.1 * torch.randn_like(image)).clamp(-1, 1)
    z, z_dq = torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), 0.5)
    expected = {0: {"qe", "l1"}, 1: {"qe", "l1"}, 2: {"qe", "l1", "gradient"},
                3: {"qe", "l1", "gradient", "perceptual", "style"},
                5: {"qe", "l1", "gradient", "perceptual", "style", "adversarial"}}
    for step, names in expected.items():
        total, terms = loss.generator(image, recon, step, z_dq=z_dq, z=z)
        assert set(terms) == names, step
        assert total.item() == pytest.approx(sum(schedule.weights[k] * v.item() for k, v in terms.items()), rel=1e-5)
        assert loss.discriminator_step_active(step) == (step >= 5)
    assert terms["qe"].item() == pytest.approx(0.5)
    assert terms["l1"].item() == pytest.approx(l1_loss(recon, image).item())


def test_style_is_restricted_to_the_hole(vgg):
    loss = Phase3Loss(LossSchedule(start_steps={"style": 0}).without("adversarial"), backbone=vgg)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    hole = torch.zeros(1, 1, 32, 32)
    hole[..., 8:24, 8:24] = 1
    recon = torch.where(hole.bool(), image, -image)  # differs from the image only outside the hole
    assert loss.generator(image, recon, 0, hole=hole)[1]["style"].item() == 0.0
    assert loss.generator(image, recon, 0)[1]["style"].item() > 0


def test_generator_gradients_reach_the_reconstruction_only(vgg):
    disc = PatchDiscriminator(channels=8)
    loss = Phase3Loss(LossSchedule(start_steps=dict.fromkeys(PAPER_WEIGHTS, 0)), backbone=vgg, discriminator=disc)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    recon = torch.zeros(1, 3, 32, 32, requires_grad=True)
    loss.generator(image, recon, 0)[0].backward()
    assert recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again after the generator loss
    disc.eval()  # no power iteration between the two calls
    d = loss.discriminator_loss(disc, image, recon)
    logits = disc(torch.cat([image, recon.detach()]))
    assert d.item() == pytest.approx(discriminator_loss(logits[:1], logits[1:]).item(), rel=1e-5)


def test_vgg_terms_refuse_to_run_without_a_backbone():
    with pytest.raises(ValueError, match="need a backbone with real weights.*load_backbone\\('st-vgg16'\\)"):
        Phase3Loss(LossSchedule().without("adversarial"))
    with pytest.raises(ValueError, match="discriminator"):
        Phase3Loss(LossSchedule().without("perceptual", "style"))
    loss = Phase3Loss(LossSchedule().without("perceptual", "style", "adversarial"))
    x = torch.zeros(1, 3, 8, 8)
    assert set(loss.generator(x, x, 10**6)[1]) == {"l1", "gradient"}


def test_load_vgg19_missing_weights_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(VGG19WeightsMissing, match="torchvision's cache"):
        load_vgg19()
    with pytest.raises(VGG19WeightsMissing, match="--no-perceptual"):
        load_vgg19(tmp_path / "nope.pth")


def test_load_vgg19_reads_torchvision_layout_and_matches_torchvision(tmp_path, monkeypatch):
    torch.manual_seed(1)
    features = make_layers(cfgs["E"])  # torchvision's vgg19().features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "vgg19-dcbac81d.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() = $TORCH_HOME/hub
    module = load_vgg19()
    assert not any(p.requires_grad for p in module.parameters()) and not module.training
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    normalised = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(module(x)["relu5_2"], features[:32](normalised))
    torch.testing.assert_close(module(x)["relu3_4"], features[:18](normalised))
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, cache / "vgg19-dcbac81d.pth")
    with pytest.raises(CheckpointError, match="wrong shapes.*layers.0.weight"):
        load_vgg19()


def test_patch_discriminator_shapes_and_spectral_norm():
    disc = PatchDiscriminator(channels=8).train()
    x = torch.randn(2, 3, 64, 48)
    for _ in range(30):  # power iterations converge
        out = disc(x)
    assert out.shape == (2, 1, 64 // 8 - 2, 48 // 8 - 2)
    for conv in (m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)):
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="H, W >= 32"):
        disc(torch.randn(1, 3, 16, 16))


# --- the offline backbone: ST-LPIPS's shift-tolerant VGG16 ----------------------------------------------------


@pytest.fixture(scope="module")
def st_vgg16():
    pytest.importorskip("stlpips_pytorch")
    from fdm.training.backbones import load_backbone

    return load_backbone("st-vgg16")


def test_st_vgg16_reproduces_stlpips_own_network(st_vgg16, monkeypatch):
    """Ground truth: the activations of stlpips_pytorch's own shift-tolerant VGG16 (its LPIPS 'vgg' trunk)."""
    import types

    for name, attr in (("IPython", "embed"), ("torchsummary", "summary")):  # imported, never used, by stlpips
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**{attr: None}))
    from stlpips_pytorch.stlpips import LPIPS

    reference = LPIPS(net="vgg", variant="shift_tolerant", verbose=False).eval()
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = reference.net(reference.scaling_layer(x))
        ours = st_vgg16(x)
    assert list(st_vgg16.perceptual_layers) == ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]
    for name, want in zip(st_vgg16.perceptual_layers, expected):
        torch.testing.assert_close(ours[name], want, rtol=0, atol=1e-5)


def test_stlpips_loader_reproduces_stlpips_own_metric(monkeypatch):
    """fdm.evaluation.metrics.load_stlpips (the one loader of `fdm eval` and the phase-3 validation) reads the bundled weights
    with every key checked and gives exactly the distances of stlpips_pytorch's own loader; no AlexNet download."""
    pytest.importorskip("stlpips_pytorch")
    import types

    from fdm.evaluation.metrics import load_stlpips
    from fdm.training.monitoring import ImageMetrics

    ours = load_stlpips()
    assert not any(p.requires_grad for p in ours.parameters())
    for name, attr in (("IPython", "embed"), ("torchsummary", "summary")):  # imported, never used, by stlpips
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**{attr: None}))
    from stlpips_pytorch.stlpips import LPIPS

    reference = LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours(x, y), reference(x, y))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-torch-hub")  # no torchvision cache needed
    metrics = ImageMetrics(lpips=True)(x, y)
    assert metrics["lpips"] == pytest.approx(reference(x, y).mean().item(), abs=1e-6)


def test_phase3_loss_uses_the_backbones_own_layers(st_vgg16):
    loss = Phase3Loss(LossSchedule().without("adversarial"), backbone=st_vgg16)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    recon = (image + 0.1 * torch.randn_like(image)).requires_grad_(True)
    total, terms = loss.generator(image, recon, 10**6)
    assert {"perceptual", "style"} <= set(terms) and terms["perceptual"] > 0 and terms["style"] > 0
    total.backward()
    assert recon.grad.abs().sum() > 0 and not any(p.requires_grad for p in st_vgg16.parameters())
    assert loss.generator(image, image.clone(), 10**6)[1]["perceptual"] == 0


def test_unknown_backbone_name_is_refused():
    from fdm.training.backbones import load_backbone
    from fdm.training.phase3 import Phase3Config

    with pytest.raises(ValueError, match="backbone must be one of"):
        load_backbone("resnet")
    with pytest.raises(ValueError, match="backbone must be one of"):
        Phase3Config(backbone="resnet")
