"""The non-saturating GAN loss (Goodfellow et al. 2014) on discriminator logits, as used with a spectral-norm
patch discriminator in FDM's phase 3 (WACV 2025, after EdgeConnect's ``nsgan`` loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["discriminator_loss", "generator_loss"]


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean(-log sigmoid(D(fake)))`` = ``mean(softplus(-logits))`` -> scalar."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``(mean(-log sigmoid(D(real))) + mean(-log(1 - sigmoid(D(fake))))) / 2`` -> scalar.

    Args:
        real_logits: patch logits on real images, any shape.
        fake_logits: patch logits on reconstructions (detached from the generator), any shape.
    """
    real = F.softplus(-real_logits.float()).mean()
    fake = F.softplus(fake_logits.float()).mean()
    return (real + fake) / 2
