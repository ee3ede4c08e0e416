"""FDM's phase-3 objective (WACV 2025): ``L = L_qe + L_rec`` with
``L_rec = L1 + 5 * gradient + 0.1 * adversarial + 0.1 * perceptual + 250 * style`` (style on the hole region),
each term switched on at its own start step (the official recipe: gradient, perceptual and style from step
150, adversarial from step 300)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fdm.losses.adversarial import discriminator_loss, generator_loss
from fdm.losses.perceptual import PERCEPTUAL_LAYERS, STYLE_LAYERS, perceptual_loss, style_loss
from fdm.losses.pixel import gradient_loss, l1_loss
from fdm.losses.qe import qe_loss

__all__ = ["PAPER_START_STEPS", "PAPER_WEIGHTS", "TERMS", "LossSchedule", "Phase3Loss"]

TERMS = ("qe", "l1", "gradient", "adversarial", "perceptual", "style")
"""Names of the phase-3 loss terms."""

PAPER_WEIGHTS = {"qe": 1.0, "l1": 1.0, "gradient": 5.0, "adversarial": 0.1, "perceptual": 0.1, "style": 250.0}
"""Weights of the paper (and of the official ``fdm_tuning.yaml``)."""

PAPER_START_STEPS = {"qe": 0, "l1": 0, "gradient": 150, "adversarial": 300, "perceptual": 150, "style": 150}
"""Optimisation steps from which each term counts (official ``fdm_tuning.yaml``: ``*_start``)."""

BACKBONE_TERMS = ("perceptual", "style")


def _check_names(values: Mapping[str, float], what: str) -> None:
    unknown = sorted(set(values) - set(TERMS))
    if unknown:
        raise ValueError(f"Unknown loss term(s) {unknown} in {what}; the terms are {list(TERMS)}.")


@dataclass
class LossSchedule:
    """Weight and start step of every term; missing entries take the paper's values.

    Args:
        weights: term name -> weight; 0 drops the term.
        start_steps: term name -> first optimisation step (0-based) at which the term counts.

    Example:
        >>> s = LossSchedule(start_steps={"adversarial": 1000}).without("perceptual", "style")
        >>> s.active("adversarial", 999), s.active("adversarial", 1000), s.active("style", 10**6)
        (False, True, False)
    """

    weights: dict[str, float] = field(default_factory=dict)
    start_steps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_names(self.weights, "weights")
        _check_names(self.start_steps, "start_steps")
        self.weights = {**PAPER_WEIGHTS, **{k: float(v) for k, v in self.weights.items()}}
        self.start_steps = {**PAPER_START_STEPS, **{k: int(v) for k, v in self.start_steps.items()}}
        bad = {k: v for k, v in self.weights.items() if v < 0} | {k: v for k, v in self.start_steps.items() if v < 0}
        if bad:
            raise ValueError(f"Loss weights and start steps must be >= 0; got {bad}.")

    def active(self, term: str, step: int) -> bool:
        """Whether ``term`` has a non-zero weight and counts at optimisation step ``step``."""
        return self.weights[term] > 0 and step >= self.start_steps[term]

    def uses(self, term: str) -> bool:
        """Whether ``term`` ever counts (non-zero weight)."""
        return self.weights[term] > 0

    def without(self, *terms: str) -> LossSchedule:
        """A copy with ``terms`` dropped (weight 0)."""
        _check_names(dict.fromkeys(terms, 0.0), "without()")
        return LossSchedule({**self.weights, **dict.fromkeys(terms, 0.0)}, dict(self.start_steps))

    def to_dict(self) -> dict[str, dict[str, float]]:
        """JSON-able form (written to the FDM's training record)."""
        return {"weights": dict(self.weights), "start_steps": dict(self.start_steps)}


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` of ``module``'s parameters (the discriminator during the generator step)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class Phase3Loss(nn.Module):
    """The generator and discriminator objectives of phase 3.

    Args:
        schedule: weights and start steps (paper values by default).
        backbone: feature extractor for the perceptual and style terms: a module mapping (B, 3, H, W) images
            in [-1, 1] to a dict of named activations (:func:`fdm.training.backbones.load_backbone`). Its
            ``perceptual_layers`` / ``style_layers`` attributes name the activations each term compares (VGG19's
            layers of the paper when it has none). Required when either term has a non-zero weight.
        discriminator: patch discriminator returning logits; required when the adversarial weight is non-zero.
            Pass the plain module (not a DistributedDataParallel wrapper): the generator step runs it with
            its parameters frozen.

    Raises:
        ValueError: a term that needs a backbone or discriminator has a weight but none was given.
    """

    def __init__(
        self,
        schedule: LossSchedule | None = None,
        *,
        backbone: nn.Module | None = None,
        discriminator: nn.Module | None = None,
    ):
        super().__init__()
        self.schedule = schedule or LossSchedule()
        needs_backbone = [t for t in BACKBONE_TERMS if self.schedule.uses(t)]
        if needs_backbone and backbone is None:
            raise ValueError(
                f"The {' and '.join(needs_backbone)} loss(es) need a backbone with real weights; none was "
                "given. Load one with fdm.training.backbones.load_backbone('st-vgg16') (offline, from the eval "
                "extra) or load_backbone('vgg19', path), or drop the terms with "
                "LossSchedule().without('perceptual', 'style')."
            )
        if self.schedule.uses("adversarial") and discriminator is None:
            raise ValueError("The adversarial loss needs a discriminator; pass one or drop the term with "
                             "LossSchedule().without('adversarial').")
        self.backbone = backbone if needs_backbone else None
        self.perceptual_layers = getattr(backbone, "perceptual_layers", PERCEPTUAL_LAYERS)
        self.style_layers = getattr(backbone, "style_layers", STYLE_LAYERS)
        if self.backbone is not None:
            self.backbone.requires_grad_(False).eval()
        self.discriminator = discriminator if self.schedule.uses("adversarial") else None

    def generator(
        self,
        image: torch.Tensor,
        reconstruction: torch.Tensor,
        step: int,
        *,
        hole: torch.Tensor | None = None,
        z_dq: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        cell_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted generator loss at ``step`` and its active terms (unweighted, detached).

        Args:
            image: (B, 3, H, W) target in [-1, 1].
            reconstruction: (B, 3, H, W) decoded image in [-1, 1].
            step: optimisation step (0-based), compared with the start steps.
            hole: (B, 1, H, W) pixel hole mask (1 = hole) restricting the style term; None = whole image.
            z_dq, z, cell_mask: FDM output, continuous target (B, C, h, w) and latent-cell mask (B, 1, h, w)
                for the qe term; the term is skipped when ``z_dq`` is None.

        Returns:
            ``(total, terms)``: scalar loss to back-propagate and ``{term: value}`` for logging.
        """
        s = self.schedule
        terms: dict[str, torch.Tensor] = {}
        if z_dq is not None and s.active("qe", step):
            terms["qe"] = qe_loss(z_dq, z, cell_mask)
        if s.active("l1", step):
            terms["l1"] = l1_loss(reconstruction.float(), image.float())
        if s.active("gradient", step):
            terms["gradient"] = gradient_loss(reconstruction.float(), image.float())
        if s.active("adversarial", step):
            with _frozen(self.discriminator):
                terms["adversarial"] = generator_loss(self.discriminator(reconstruction))
        feats = None
        if s.active("perceptual", step):
            feats = self._features(reconstruction, image)
            terms["perceptual"] = perceptual_loss(*feats, layers=self.perceptual_layers)
        if s.active("style", step):
            if hole is not None:
                hole = hole.to(image.dtype)
                feats = self._features(reconstruction * hole, image * hole)
            terms["style"] = style_loss(*(feats or self._features(reconstruction, image)), layers=self.style_layers)
        total = sum((s.weights[k] * v for k, v in terms.items()), torch.zeros((), device=image.device))
        return total, {k: v.detach() for k, v in terms.items()}

    def _features(
        self, reconstruction: torch.Tensor, image: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Backbone activations of the reconstruction (with gradient) and of the target (without)."""
        with torch.no_grad():
            target = self.backbone(image)
        return self.backbone(reconstruction), target

    def discriminator_step_active(self, step: int) -> bool:
        """Whether the discriminator trains at ``step`` (from the adversarial term's start step on)."""
        return self.schedule.active("adversarial", step)

    def discriminator_loss(
        self, discriminator: nn.Module, image: torch.Tensor, reconstruction: torch.Tensor
    ) -> torch.Tensor:
        """Non-saturating discriminator loss on real ``image`` and detached ``reconstruction`` -> scalar.

        ``discriminator`` may be the DistributedDataParallel wrapper of :attr:`discriminator`: both batches go
        through it in one forward pass.
        """
        logits = discriminator(torch.cat([image, reconstruction.detach()], dim=0))  # (2B, 1, h', w')
        real, fake = logits.chunk(2, dim=0)
        return discriminator_loss(real, fake)
