"""Sampling taming-transformers' Net2NetTransformer (CVPR 2021) for the FDM paper's three generation tasks:
unconditional (SOS token, FFHQ), class-conditional (class id token, ImageNet) and semantic (segmentation map,
ADE20K, with taming's 16x16 sliding window for maps larger than the transformer's window).

Sampling runs its own key/value-cached forward over the weights of taming's minGPT (``tok_emb``, ``pos_emb``,
``blocks.N.{ln1, ln2, attn.{key, query, value, proj}, mlp}``, ``ln_f``, ``head``). Sampling returns code
indices; :func:`decode_indices` turns them into images through taming's own ``decode_to_img`` with FDM
attached (or without it for the baseline).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fdm.adapters.taming.adapter import Net2NetTransformerAdapter, first_stage_adapter
from fdm.dequantizer import Dequantizer
from fdm.errors import InputError
from fdm.module import FDM
from fdm.registry import find_adapter

__all__ = [
    "KVCache",
    "decode_indices",
    "filter_logits",
    "gpt_forward",
    "one_hot_segmentation",
    "sample_class",
    "sample_semantic",
    "sample_tokens",
    "sample_unconditional",
]

logger = logging.getLogger(__name__)


def filter_logits(
    logits: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    filter_value: float = -float("inf"),
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """Top-k and nucleus (top-p) filtering of (B, V) logits; filtered entries get ``filter_value``.

    Top-k keeps the ``top_k`` largest logits (ties at the k-th value kept); top-p then keeps the smallest set
    of most probable tokens whose probability reaches ``top_p``. ``None`` / 0 / 1.0 disable a filter.
    """
    logits = logits.clone()
    if top_k:
        k = min(max(int(top_k), min_tokens_to_keep), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits[logits < kth] = filter_value
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
        remove[..., :min_tokens_to_keep] = False
        logits[remove.scatter(-1, order, remove)] = filter_value
    return logits


class KVCache:
    """Keys and values of every attention layer for the tokens fed so far.

    Args:
        gpt: taming's ``GPT`` (reads ``n_layer``, ``n_head``, ``n_embd``, ``block_size`` from its weights).
        batch_size: B.
    """

    def __init__(self, gpt: nn.Module, batch_size: int):
        n_embd = gpt.tok_emb.embedding_dim
        n_head = gpt.blocks[0].attn.n_head
        shape = (len(gpt.blocks), 2, batch_size, n_head, gpt.block_size, n_embd // n_head)
        self.kv = torch.empty(shape, device=gpt.pos_emb.device, dtype=gpt.pos_emb.dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, t, hs) ``k``, ``v`` after the cached ones; return all (B, nh, length + t, hs)."""
        end = self.length + k.shape[2]
        self.kv[layer, 0, :, :, self.length:end] = k
        self.kv[layer, 1, :, :, self.length:end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


def gpt_forward(gpt: nn.Module, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """taming's minGPT forward, optionally continuing from (and extending) a :class:`KVCache`.

    Args:
        gpt: taming's ``GPT`` in eval mode.
        idx: (B, t) token ids that follow the ``cache.length`` tokens already cached.
        cache: None for a plain forward of ``idx`` from position 0.

    Returns:
        (B, t, vocab) logits, equal (up to float rounding) to ``gpt(full_sequence)[0][:, -t:]``.
    """
    if gpt.training:
        raise InputError("gpt_forward is for inference: call model.eval() first (dropout would be skipped).")
    b, t = idx.shape
    start = cache.length if cache is not None else 0
    if start + t > gpt.block_size:
        raise InputError(f"{start + t} tokens exceed the transformer's block size {gpt.block_size}.")
    x = gpt.tok_emb(idx) + gpt.pos_emb[:, start:start + t]  # (B, t, C)
    c = x.shape[-1]
    for layer, block in enumerate(gpt.blocks):
        attn = block.attn
        h = block.ln1(x)  # (B, t, C)
        heads = (b, t, attn.n_head, c // attn.n_head)
        q = attn.query(h).view(heads).transpose(1, 2)  # (B, nh, t, hs)
        k = attn.key(h).view(heads).transpose(1, 2)  # (B, nh, t, hs)
        v = attn.value(h).view(heads).transpose(1, 2)  # (B, nh, t, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, start + t, hs)
        allowed = attn.mask[:, :, start:start + t, :start + t].bool()  # taming's causal (+ n_unmasked) mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, nh, t, hs)
        x = x + attn.proj(y.transpose(1, 2).reshape(b, t, c))  # (B, t, C)
        x = x + block.mlp(block.ln2(x))  # (B, t, C)
    if cache is not None:
        cache.length += t
    return gpt.head(gpt.ln_f(x))  # (B, t, vocab)


def _check_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise InputError(f"temperature must be > 0; got {temperature}.")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be a positive integer or None; got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] or None; got {top_p}.")


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) sampled token ids."""
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def sample_tokens(
    gpt: nn.Module,
    prefix: torch.Tensor,
    steps: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Autoregressive sampling with a KV cache: one new token per step, each step feeding one token.

    Args:
        gpt: taming's ``GPT`` in eval mode.
        prefix: (B, L) conditioning tokens (SOS, class id or segmentation codes).
        steps: number of tokens to sample; ``L + steps - 1`` must fit the block size.

    Returns:
        (B, steps) sampled token ids.
    """
    _check_options(temperature, top_k, top_p)
    if prefix.shape[1] + steps - 1 > gpt.block_size:
        raise InputError(f"{prefix.shape[1]} conditioning + {steps} sampled tokens do not fit the transformer's "
                         f"block size {gpt.block_size}.")
    cache = KVCache(gpt, prefix.shape[0])
    logits = gpt_forward(gpt, prefix, cache)[:, -1]  # (B, V)
    out = []
    for step in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        token = _draw(logits, temperature, top_k, top_p, generator)  # (B, 1)
        out.append(token)
        if step + 1 < steps:
            logits = gpt_forward(gpt, token, cache)[:, -1]
    return torch.cat(out, dim=1)


def _transformer_parts(model: nn.Module) -> tuple[nn.Module, Net2NetTransformerAdapter]:
    adapter = find_adapter(model)
    if not isinstance(adapter, Net2NetTransformerAdapter):
        raise InputError(f"Sampling needs a taming Net2NetTransformer; got {type(model).__name__}.")
    if model.transformer.training:
        raise InputError("Call model.eval() before sampling.")
    return model.transformer, adapter


def _latent_shape(model: nn.Module, latent_shape: tuple[int, int] | None) -> tuple[int, int]:
    if latent_shape is not None:
        return int(latent_shape[0]), int(latent_shape[1])
    first_stage = model.first_stage_model
    side = first_stage.encoder.resolution // first_stage_adapter(first_stage).factor
    h = w = side
    if h * w > model.transformer.block_size:
        h = w = int(math.isqrt(model.transformer.block_size))
    return h, w


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def _to_spatial(model: nn.Module, sequence: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, h*w) tokens in the transformer's order -> (B, h, w) spatial code indices."""
    return model.permuter(sequence, reverse=True).reshape(sequence.shape[0], *shape)


def _sample_with_prefix(
    model: nn.Module, prefixes: torch.Tensor, shape: tuple[int, int], *, batch_size: int, temperature: float,
    top_k: int | None, top_p: float | None, seed: int | None, progress: bool,
) -> torch.Tensor:
    gpt, _ = _transformer_parts(model)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1; got {batch_size}.")
    generator = _generator(seed, prefixes.device)
    chunks = []
    for start in tqdm(range(0, prefixes.shape[0], batch_size), desc="batches", disable=not progress):
        prefix = prefixes[start:start + batch_size]
        tokens = sample_tokens(gpt, prefix, shape[0] * shape[1], temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator, progress=progress)
        chunks.append(_to_spatial(model, tokens, shape))
    return torch.cat(chunks)


@torch.no_grad()
def sample_unconditional(
    model: nn.Module,
    num_samples: int,
    *,
    latent_shape: tuple[int, int] | None = None,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample codes from an unconditional Net2NetTransformer (SOS token, e.g. FFHQ).

    Args:
        model: taming ``Net2NetTransformer`` whose cond stage is an ``SOSProvider``, in eval mode.
        num_samples: N.
        latent_shape: (h, w) of the code map; default: the first stage's training resolution / factor.
        batch_size, temperature, top_k, top_p: sampling options (top-k then nucleus filtering).
        seed: seeds a private generator (same seed and batch size -> same samples).
        progress: show tqdm progress bars.

    Returns:
        (N, h, w) code indices (spatial order), to decode with :func:`decode_indices`.
    """
    shape = _latent_shape(model, latent_shape)
    device = model.transformer.pos_emb.device
    sos = int(getattr(model.cond_stage_model, "sos_token", getattr(model, "sos_token", 0)))
    prefixes = torch.full((num_samples, 1), sos, dtype=torch.long, device=device)
    return _sample_with_prefix(model, prefixes, shape, batch_size=batch_size, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, progress=progress)


@torch.no_grad()
def sample_class(
    model: nn.Module,
    class_ids: torch.Tensor | list[int],
    *,
    latent_shape: tuple[int, int] | None = None,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample codes from a class-conditional Net2NetTransformer (ImageNet ``cin``: the class id is the one
    conditioning token).

    Args:
        class_ids: (N,) class indices, one sample each (repeat an id for several samples).
        Other arguments as in :func:`sample_unconditional`.

    Returns:
        (N, h, w) code indices.
    """
    device = model.transformer.pos_emb.device
    ids = torch.as_tensor(class_ids, dtype=torch.long, device=device).reshape(-1)
    n_classes = getattr(model.cond_stage_model, "n_classes", None)
    if n_classes is not None and (ids.min() < 0 or ids.max() >= n_classes):
        raise InputError(f"class ids must be in [0, {n_classes}); got values from {int(ids.min())} "
                         f"to {int(ids.max())}.")
    shape = _latent_shape(model, latent_shape)
    return _sample_with_prefix(model, ids[:, None], shape, batch_size=batch_size, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, progress=progress)


def one_hot_segmentation(segmentation: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) integer label map or (B, num_classes, H, W) one-hot -> (B, num_classes, H, W) float one-hot."""
    if segmentation.dim() == 3 and not segmentation.is_floating_point():
        if segmentation.min() < 0 or segmentation.max() >= num_classes:
            raise InputError(f"segmentation labels must be in [0, {num_classes}); got values from "
                             f"{int(segmentation.min())} to {int(segmentation.max())}.")
        return F.one_hot(segmentation.long(), num_classes).permute(0, 3, 1, 2).float()
    if segmentation.dim() == 4 and segmentation.shape[1] == num_classes:
        return segmentation.float()
    raise InputError(f"segmentation must be a (B, H, W) integer label map or a (B, {num_classes}, H, W) one-hot "
                     f"map; got shape {tuple(segmentation.shape)}, dtype {segmentation.dtype}.")


def _window_start(position: int, size: int, window: int) -> int:
    """First row/column of the window that contains ``position`` (taming's sample_conditional.py rule)."""
    half = window // 2
    if position <= half:
        local = position
    elif size - position < half:
        local = window - (size - position)
    else:
        local = half
    return position - local


@torch.no_grad()
def sample_semantic(
    model: nn.Module,
    segmentation: torch.Tensor,
    *,
    window: int = 16,
    batch_size: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample codes conditioned on segmentation maps (ADE20K: 151 classes, cond stage = a VQModel on one-hot maps).

    Maps whose code grid fits in ``window`` x ``window`` are sampled in one KV-cached pass (conditioning codes,
    then image codes). Larger maps use taming's sliding-window sampler: each code is drawn with a
    ``window`` x ``window`` crop of conditioning and image codes around it, the crop centred where possible.

    Args:
        model: taming ``Net2NetTransformer`` with a VQModel cond stage, in eval mode.
        segmentation: (B, H, W) integer labels or (B, n_classes, H, W) one-hot; H, W multiples of the
            factor. The image has the same size.
        window: the transformer's training window in codes (16 for the released 256x256 models).

    Returns:
        (B, H/f, W/f) code indices.
    """
    gpt, adapter = _transformer_parts(model)
    cond_adapter = first_stage_adapter(model.cond_stage_model)
    device = gpt.pos_emb.device
    n_classes = model.cond_stage_model.encoder.conv_in.in_channels
    seg = one_hot_segmentation(segmentation.to(device), n_classes)
    h, w = seg.shape[-2] // adapter.factor, seg.shape[-1] // adapter.factor
    if seg.shape[-2] % adapter.factor or seg.shape[-1] % adapter.factor:
        raise InputError(f"segmentation size {tuple(seg.shape[-2:])} is not a multiple of the factor {adapter.factor}.")
    generator = _generator(seed, device)
    chunks = []
    for start in tqdm(range(0, seg.shape[0], batch_size), desc="batches", disable=not progress):
        chunk = seg[start:start + batch_size]
        _, cond = cond_adapter.quantize(cond_adapter.encode(chunk))  # (b, hc, wc)
        if cond.shape[-2:] != (h, w):
            raise InputError(f"The cond stage gives a {tuple(cond.shape[-2:])} code map but the image map is "
                             f"{(h, w)}; this sampler needs both at the same resolution.")
        if h <= window and w <= window:
            tokens = sample_tokens(gpt, cond.reshape(cond.shape[0], -1), h * w, temperature=temperature,
                                   top_k=top_k, top_p=top_p, generator=generator, progress=progress)
            chunks.append(_to_spatial(model, tokens, (h, w)))
        else:
            chunks.append(_sliding_window(model, gpt, cond, window, temperature, top_k, top_p, generator, progress))
    return torch.cat(chunks)


def _sliding_window(model: nn.Module, gpt: nn.Module, cond: torch.Tensor, window: int, temperature: float,
                    top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                    progress: bool) -> torch.Tensor:
    """taming's sliding-window sampler for (B, h, w) conditioning codes larger than ``window``."""
    if type(model.permuter).__name__ != "Identity":
        raise InputError("The sliding-window sampler works in raster order; this model uses the permuter "
                         f"{type(model.permuter).__name__}.")
    b, h, w = cond.shape
    wh, ww = min(window, h), min(window, w)
    if 2 * wh * ww - 1 > gpt.block_size:
        raise InputError(f"A {wh}x{ww} window needs {2 * wh * ww - 1} tokens; the block size is {gpt.block_size}.")
    codes = torch.zeros_like(cond)  # (B, h, w)
    bar = tqdm(total=h * w, desc="sampling", disable=not progress, leave=False)
    for i in range(h):
        i0 = _window_start(i, h, wh)
        for j in range(w):
            j0 = _window_start(j, w, ww)
            cond_patch = cond[:, i0:i0 + wh, j0:j0 + ww].reshape(b, -1)  # (B, wh*ww)
            code_patch = codes[:, i0:i0 + wh, j0:j0 + ww].reshape(b, -1)  # (B, wh*ww)
            position = (i - i0) * ww + (j - j0)
            tokens = torch.cat([cond_patch, code_patch[:, :position]], dim=1)  # causal: later tokens are unused
            logits = gpt_forward(gpt, tokens)[:, -1]  # (B, V)
            codes[:, i, j] = _draw(logits, temperature, top_k, top_p, generator)[:, 0]
            bar.update(1)
    bar.close()
    return codes


@torch.no_grad()
def decode_indices(
    model: nn.Module,
    indices: torch.Tensor,
    fdm_module: FDM | None = None,
    *,
    batch_size: int = 16,
    check_fingerprint: bool = True,
) -> torch.Tensor:
    """Decode (N, h, w) code indices to (N, 3, H, W) images in [-1, 1], with FDM or without (``fdm_module=None``).

    For a Net2NetTransformer this goes through taming's own ``decode_to_img`` with the FDM attached to the
    first stage's ``post_quant_conv``; for a VQModel / GumbelVQ through ``model.decode``.
    """
    adapter = find_adapter(model)
    if indices.dim() != 3 or indices.is_floating_point():
        raise InputError(f"indices must be an integer tensor (N, h, w); got {tuple(indices.shape)}, {indices.dtype}.")
    deq = Dequantizer(model, fdm_module, adapter=adapter, check_fingerprint=check_fingerprint) if fdm_module else None
    if deq is not None:  # a phase-3 FDM's decoder lives in the Dequantizer's copy of the model
        model, adapter = deq.model, deq.adapter
    images = []
    with deq.attached() if deq is not None else contextlib.nullcontext():
        for start in range(0, indices.shape[0], batch_size):
            chunk = indices[start:start + batch_size].to(adapter.device)
            if isinstance(adapter, Net2NetTransformerAdapter):
                b, h, w = chunk.shape
                sequence = model.permuter(chunk.reshape(b, -1))  # the transformer's token order
                images.append(model.decode_to_img(sequence, (b, adapter.channels, h, w)))
            else:
                images.append(adapter.decode(adapter.lookup(chunk)))
    return torch.cat(images)
