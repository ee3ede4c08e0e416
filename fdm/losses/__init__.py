"""Training losses of FDM (Park & Jung, WACV 2025): the qe loss of phase 2 and the reconstruction losses of
phase 3 (L1, image gradient, non-saturating GAN, VGG19 perceptual and style), with the paper's weights.

    L = L_qe + L_rec,  L_rec = L1 + 5 * gradient + 0.1 * adversarial + 0.1 * perceptual + 250 * style
"""

from fdm.losses.adversarial import discriminator_loss, generator_loss
from fdm.losses.combined import PAPER_START_STEPS, PAPER_WEIGHTS, TERMS, LossSchedule, Phase3Loss
from fdm.losses.perceptual import PERCEPTUAL_LAYERS, STYLE_LAYERS, gram_matrix, perceptual_loss, style_loss
from fdm.losses.pixel import gradient_loss, image_gradients, l1_loss
from fdm.losses.qe import qe_loss

__all__ = [
    "PAPER_START_STEPS",
    "PAPER_WEIGHTS",
    "PERCEPTUAL_LAYERS",
    "STYLE_LAYERS",
    "TERMS",
    "LossSchedule",
    "Phase3Loss",
    "discriminator_loss",
    "generator_loss",
    "gradient_loss",
    "gram_matrix",
    "image_gradients",
    "l1_loss",
    "perceptual_loss",
    "qe_loss",
    "style_loss",
]
