"""The demo model embedded in the package: a small f4 VQGAN in the taming-transformers architecture (CVPR 2021)
and an FDM trained for it (WACV 2025), both reproduced by ``examples/train_demo_model.py`` (see docs/demo.md).

The VQGAN loads through :func:`fdm.adapters.taming.load_model` (taming's ``model.yaml`` + ``.safetensors``) and the
FDM through :meth:`fdm.FDM.from_pretrained` on a ``save_pretrained`` folder, the code paths of Hub models.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fdm.adapters.taming import load_model
from fdm.module import FDM

__all__ = ["ASSETS", "DEMO_FDM_DIR", "DEMO_VQGAN_CONFIG", "DEMO_VQGAN_WEIGHTS", "load_demo_fdm", "load_demo_vqgan"]

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_VQGAN_CONFIG = ASSETS / "vqgan.yaml"
DEMO_VQGAN_WEIGHTS = ASSETS / "vqgan.safetensors"
DEMO_FDM_DIR = ASSETS / "fdm"


def load_demo_vqgan() -> nn.Module:
    """The embedded VQGAN (taming ``VQModel``, f4, 512 codes of 16 channels), on the CPU in eval mode.

    Raises:
        ImportError: taming-transformers is missing (``pip install ".[taming]"`` from a clone).
    """
    return load_model(DEMO_VQGAN_CONFIG, DEMO_VQGAN_WEIGHTS)


def load_demo_fdm() -> FDM:
    """The FDM trained for :func:`load_demo_vqgan` (mask-conditioned, phase 2), on the CPU in eval mode."""
    return FDM.from_pretrained(DEMO_FDM_DIR)
