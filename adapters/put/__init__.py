"""PUT (Liu et al., CVPR 2022) with FDM (Park & Jung, WACV 2025): P-VQVAE, UQ-Transformer, checkpoint
loading (PUT and FDM-authors layouts), and pluralistic inpainting with the FDM correction.

PUT has no installable package; this is a self-contained implementation with PUT's parameter names.
"""

from .adapter import PUTAdapter
from .checkpoints import (
    fdm_authors_state_dict,
    fdm_to_put_layout,
    load_model,
    put_state_dicts,
    put_to_fdm_layout,
    split_checkpoint,
)
from .inpaint import InpaintOutput, inpaint
from .model import PUT
from .pvqvae import PVQVAE, DualCodebookQuantizer, GuidedDecoder, PatchEncoder
from .sampler import sample_codes
from .transformer import UQTransformer

__all__ = [
    "PUT",
    "PVQVAE",
    "DualCodebookQuantizer",
    "GuidedDecoder",
    "InpaintOutput",
    "PUTAdapter",
    "PatchEncoder",
    "UQTransformer",
    "fdm_authors_state_dict",
    "fdm_to_put_layout",
    "inpaint",
    "load_model",
    "put_state_dicts",
    "put_to_fdm_layout",
    "sample_codes",
    "split_checkpoint",
]
