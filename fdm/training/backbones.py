"""Feature extractors of FDM's perceptual and style losses, selected by name (:data:`BACKBONES`):

- ``"vgg19"``: VGG19 (Simonyan & Zisserman 2015), the paper's backbone, built with torchvision's layer layout so
  torchvision's ImageNet weights (``vgg19-dcbac81d.pth``) load into it. Weights come only from a file the user
  names or from torchvision's download cache (``<torch.hub.get_dir()>/checkpoints/vgg19-dcbac81d.pth``).
- ``"st-vgg16"``: the shift-tolerant VGG16 of ST-LPIPS (Ghildyal & Liu, ECCV 2022: max-pool with stride 1, then a
  3x3 binomial blur with stride 2), whose full weights ship inside the ``stlpips_pytorch`` package: phase 3 runs
  offline with ``pip install ".[eval]"``. Evaluation uses ST-LPIPS's *AlexNet*, another network.

Nothing is downloaded. Each backbone names the activations its perceptual and style terms compare
(``perceptual_layers``, ``style_layers``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fdm.evaluation.metrics import _stlpips_weight_file
from fdm.io.torch_files import read_checkpoint
from fdm.io.weights import load_state_dict_strict

__all__ = [
    "BACKBONES",
    "ShiftTolerantVGG16Features",
    "VGG19Features",
    "VGG19WeightsMissing",
    "load_backbone",
    "load_st_vgg16",
    "load_vgg19",
]

logger = logging.getLogger(__name__)

_VGG19_FILE = "vgg19-dcbac81d.pth"
"""File name of torchvision's ImageNet VGG19 weights (``VGG19_Weights.IMAGENET1K_V1``)."""

# torchvision's VGG19 "E" configuration: conv widths, "M" = 2x2 max-pool.
_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
_BLOCK_SIZES = (2, 2, 4, 4, 4)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


BACKBONES = ("vgg19", "st-vgg16")
"""Names accepted by :func:`load_backbone` (``Phase3Config.backbone``, ``fdm finetune --backbone``)."""

# ST-LPIPS's VGG16 "D" configuration; "M" = max-pool 2x2 with stride 1, then a blur-pool with stride 2.
_ST_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# ImageNet normalisation of LPIPS for images in [-1, 1]: (x - shift) / scale
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG19WeightsMissing(FileNotFoundError):
    """No VGG19 weight file was given and none is in torchvision's cache."""


def _relu_names(config: tuple, pool_size: int) -> dict[int, str]:
    """Index in the layer list of each ReLU -> its name (``relu3_4``...); a pool takes ``pool_size`` layers."""
    names, index, block, conv = {}, 0, 0, 0
    for item in config:
        if item == "M":
            index, block, conv = index + pool_size, block + 1, 0
        else:
            conv += 1
            names[index + 1] = f"relu{block + 1}_{conv}"
            index += 2
    return names


class _NamedActivations(nn.Module):
    """A layer list whose forward returns the named ReLU activations, after normalising [-1, 1] images."""

    names: dict[int, str]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self._normalise(x)  # (B, 3, H, W)
        out = {}
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in self.names:
                out[self.names[i]] = h
        return out


class _BlurPool(nn.Module):
    """Anti-aliased down-sampling: reflect-pad by 2, then a fixed per-channel 3x3 binomial filter, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        self.register_buffer("filt", kernel.expand(channels, 1, 3, 3).clone())  # (C, 1, 3, 3), saved with weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
        return torch.nn.functional.conv2d(padded, self.filt.to(x.dtype), stride=2, groups=x.shape[1])


class ShiftTolerantVGG16Features(_NamedActivations):
    """The shift-tolerant VGG16 trunk of ST-LPIPS, returning named ReLU activations (``relu1_2`` ... ``relu5_3``).

    Parameter names are ``layers.<i>.weight`` / ``layers.<i>.filt`` with the indices of ST-LPIPS's
    ``net.slice*`` modules. A freshly constructed instance has random weights: use :func:`load_st_vgg16`.

    Input: (B, 3, H, W) images in [-1, 1] (LPIPS's normalisation inside).
    """

    perceptual_layers = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
    style_layers = ("relu2_2", "relu3_3", "relu4_3", "relu5_3")

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _ST_CONFIG:
            if item == "M":
                layers += [nn.MaxPool2d(2, stride=1), _BlurPool(in_ch)]
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU()]
                in_ch = item
        self.layers = nn.Sequential(*layers)
        self.names = _relu_names(_ST_CONFIG, pool_size=2)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)


class VGG19Features(_NamedActivations):
    """VGG19 convolutional trunk returning named ReLU activations.

    The parameter names (``layers.<i>.weight``) follow the indices of torchvision's ``vgg19().features``.
    A freshly constructed instance has random weights: use :func:`load_vgg19` for the ImageNet ones.

    Args:
        last_layer: deepest activation computed (layers after it are not built).

    Input: (B, 3, H, W) images in [-1, 1] (normalised to ImageNet statistics inside).
    Output: dict name -> (B, C, H / 2^k, W / 2^k) for every ReLU up to ``last_layer``.
    """

    perceptual_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    style_layers = ("relu2_2", "relu3_4", "relu4_4", "relu5_2")

    def __init__(self, last_layer: str = "relu5_2"):
        super().__init__()
        names = _relu_names(_CONFIG, pool_size=1)
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

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # ImageNet-normalised


def _default_vgg19_path() -> Path:
    """Where torchvision caches its VGG19 download: ``<torch.hub.get_dir()>/checkpoints/vgg19-dcbac81d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _VGG19_FILE


def load_vgg19(path: str | Path | None = None, *, last_layer: str = "relu5_2") -> VGG19Features:
    """Load VGG19 weights into a frozen :class:`VGG19Features` in eval mode.

    Args:
        path: a torchvision VGG19 state dict (``.pth``, read by :func:`fdm.io.torch_files.read_checkpoint`, keys ``features.*``;
            classifier keys are ignored) or a ``.safetensors`` / ``.pth`` holding :class:`VGG19Features`'s
            own keys (``layers.*``). None: torchvision's cache (:func:`_default_vgg19_path`).
        last_layer: deepest activation computed.

    Raises:
        VGG19WeightsMissing: no file at ``path`` (or, without ``path``, none in torchvision's cache).
        CheckpointError: the file does not hold VGG19 weights of the expected shapes.
    """
    file = Path(path) if path is not None else _default_vgg19_path()
    if not file.is_file():
        where = f"at {file}" if path is not None else f"in torchvision's cache ({file})"
        raise VGG19WeightsMissing(
            f"No VGG19 weights {where}. The perceptual and style losses need ImageNet VGG19 weights: pass the "
            f"path of torchvision's {_VGG19_FILE} (--vgg-weights), put it in the cache, or drop the two terms "
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


def load_st_vgg16(path: str | Path | None = None) -> ShiftTolerantVGG16Features:
    """Load ST-LPIPS's shift-tolerant VGG16 trunk into a frozen :class:`ShiftTolerantVGG16Features` in eval mode.

    Args:
        path: ST-LPIPS's ``vgg_shift_tolerant.pth`` (keys ``net.slice<k>.<i>.*``; the ``lin*`` and scaling keys
            are ignored). None: the file bundled with the installed ``stlpips_pytorch`` package.

    Raises:
        MissingExtraError: no ``path`` and ``stlpips_pytorch`` is not installed (names the ``eval`` extra).
        CheckpointError: the file does not hold the expected weights.
    """
    if path is None:
        path = _stlpips_weight_file("vgg", alternative=", or pass the path of vgg_shift_tolerant.pth")
    file = Path(path)
    state = read_checkpoint(file)
    trunk = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):
            trunk[f"layers.{parts[2]}.{parts[3]}"] = value  # net.slice<k>.<i>.<name> -> layers.<i>.<name>
    module = ShiftTolerantVGG16Features()
    load_state_dict_strict(module, trunk, source=f"ST-LPIPS VGG16 weight file {file}")
    logger.info("Loaded the shift-tolerant VGG16 from %s", file)
    return module.requires_grad_(False).eval()


def load_backbone(name: str, path: str | Path | None = None) -> nn.Module:
    """The perceptual backbone ``name`` (one of :data:`BACKBONES`), frozen, in eval mode.

    Args:
        name: ``"vgg19"`` (:func:`load_vgg19`) or ``"st-vgg16"`` (:func:`load_st_vgg16`).
        path: its weight file; None: the default location of each (torchvision's cache, the stlpips package).
    """
    if name == "vgg19":
        return load_vgg19(path)
    if name == "st-vgg16":
        return load_st_vgg16(path)
    raise ValueError(f"backbone must be one of {BACKBONES}; got {name!r}.")
