"""fdm-vq: the Feature Dequantization Module (FDM, WACV 2025) for vector-quantized image models.

    z_dq = z_q + F([z_q, m]) * m

Public names: :class:`FDM`, :class:`Dequantizer`, :func:`latent_mask`, mask helpers, the model-family
registry (:mod:`fdm.registry`), and the exceptions. Training lives in :mod:`fdm.training`, adapters in :mod:`fdm.adapters`.
"""

from fdm.adapter import VQAdapter
from fdm.dequantizer import Dequantizer
from fdm.errors import CheckpointError, FdmError, FingerprintMismatchError, InputError
from fdm.io.fingerprint import codebook_fingerprint
from fdm.masks import latent_mask, load_mask, random_irregular_mask
from fdm.module import FDM
from fdm.registry import ModelFamily, find_adapter, register_family

__version__ = "0.1.0"

__all__ = [
    "FDM",
    "CheckpointError",
    "Dequantizer",
    "FdmError",
    "FingerprintMismatchError",
    "InputError",
    "ModelFamily",
    "VQAdapter",
    "codebook_fingerprint",
    "find_adapter",
    "latent_mask",
    "load_mask",
    "random_irregular_mask",
    "register_family",
]
