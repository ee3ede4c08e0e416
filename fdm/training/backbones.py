"""The VGG19 feature extractor (Simonyan & Zisserman 2015) of FDM's perceptual and style losses, built here
with torchvision's layer layout so torchvision's ImageNet weights (``vgg19-dcbac81d.pth``) load into it.

Weights come only from a file the user names or from torchvision's download cache
(``<torch.hub.get_dir()>/checkpoints/vgg19-dcbac81d.pth``); nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fdm.checkpoint import load_state_dict_strict, read_checkpoint

__all__ = ["VGG19_FILE", "VGG19Features", "VGG19WeightsMissing", "default_vgg19_path", "load_vgg19"]

logger = logging.getLogger(__name__)

VGG19_FILE = "vgg19-dcbac81d.pth"
"""File name of torchvision's ImageNet VGG19 weights (``VGG19_Weights.IMAGENET1K_V1``)."""

# torchvision's VGG19 "E" configuration: conv widths, "M" = 2x2 max-pool.
_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
_BLOCK_SIZES = (2, 2, 4, 4, 4)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG19WeightsMissing(FileNotFoundError):
    """No VGG19 weight file was given and none is in torchvision's cache."""


def _layer_names() -> dict[int, str]:
    """Index in torchvision's ``vgg19().features`` of each ReLU -> its name (``relu3_4``...)."""
    names, index, block, conv = {}, 0, 0, 0
    for item in _CONFIG:
        if item == "M":
            index, block, conv = index + 1, block + 1, 0
        else:
            conv += 1
            names[index + 1] = f"relu{block + 1}_{conv}"
            index += 2
    return names


class VGG19Features(nn.Module):
    """VGG19 convolutional trunk returning named ReLU activations.

    The parameter names (``layers.<i>.weight``) follow the indices of torchvision's ``vgg19().features``.
    A freshly constructed instance has random weights: use :func:`load_vgg19` for the ImageNet ones.

    Args:
        last_layer: deepest activation computed (layers after it are not built).

    Input: (B, 3, H, W) images in [-1, 1] (normalised to ImageNet statistics inside).
    Output: dict name -> (B, C, H / 2^k, W / 2^k) for every ReLU up to ``last_layer``.
    """

    def __init__(self, last_layer: str = "relu5_2"):
        super().__init__()
        names = _layer_names()
        if last_layer not in names.values():
            raise ValueError(f"last_layer must be one of {sorted(names.values())}; got {last_layer!r}.")
        last_index = next(i for i, n in names.items() if n == last_layer)
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU()]
                in_ch = item
        self.layers = nn.Sequential(*layers[: last_index + 1])
        self.names = {i: n for i, n in names.items() if i <= last_index}
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (B, 3, H, W), ImageNet-normalised
        out = {}
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in self.names:
                out[self.names[i]] = h
        return out


def default_vgg19_path() -> Path:
    """Where torchvision caches its VGG19 download: ``<torch.hub.get_dir()>/checkpoints/vgg19-dcbac81d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def load_vgg19(path: str | Path | None = None, *, last_layer: str = "relu5_2") -> VGG19Features:
    """Load VGG19 weights into a frozen :class:`VGG19Features` in eval mode.

    Args:
        path: a torchvision VGG19 state dict (``.pth``, read with ``weights_only=True``, keys ``features.*``;
            classifier keys are ignored) or a ``.safetensors`` / ``.pth`` holding :class:`VGG19Features`'s
            own keys (``layers.*``). None: torchvision's cache (:func:`default_vgg19_path`).
        last_layer: deepest activation computed.

    Raises:
        VGG19WeightsMissing: no file at ``path`` (or, without ``path``, none in torchvision's cache).
        CheckpointError: the file does not hold VGG19 weights of the expected shapes.
    """
    file = Path(path) if path is not None else default_vgg19_path()
    if not file.is_file():
        where = f"at {file}" if path is not None else f"in torchvision's cache ({file})"
        raise VGG19WeightsMissing(
            f"No VGG19 weights {where}. The perceptual and style losses need ImageNet VGG19 weights: pass the "
            f"path of torchvision's {VGG19_FILE} (--vgg-weights), put it in the cache, or drop the two terms "
            "(--no-perceptual / LossSchedule().without('perceptual', 'style'))."
        )
    state = read_checkpoint(file)
    module = VGG19Features(last_layer)
    wanted = set(module.state_dict())
    if any(k.startswith("features.") for k in state):  # torchvision layout
        state = {"layers." + k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    state = {k: v for k, v in state.items() if k in wanted or not k.startswith("layers.")}
    load_state_dict_strict(module, state, source=f"VGG19 weight file {file}")
    logger.info("Loaded VGG19 weights from %s", file)
    return module.requires_grad_(False).eval()
