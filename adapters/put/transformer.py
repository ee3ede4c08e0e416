"""PUT's UQ-Transformer (Liu et al., CVPR 2022): a bidirectional pre-LN transformer over the masked image's
continuous P-VQVAE features that predicts, for every cell, logits over the codes for fully known patches.

Parameter names follow the released code (liuqk3/PUT ``masked_image_inpainting_transformer_in_feature.py``):
``emb_proj``, ``pos_emb``, ``blocks.N.{ln1, ln2, attn.{key, query, value, proj}, mlp.{0, 2}}``,
``layer_norm``, ``to_logits``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fdm.errors import InputError

__all__ = ["UQTransformer", "GELU2"]

logger = logging.getLogger(__name__)


class GELU2(nn.Module):
    """The sigmoid approximation of GELU, ``x * sigmoid(1.702 x)`` (PUT's ``block_activate: GELU2``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _SelfAttention(nn.Module):
    """Full (non-causal) multi-head self-attention with separate key / query / value projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"n_embd ({dim}) must be a multiple of n_head ({heads}).")
        self.heads = heads
        self.key, self.query, self.value, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, T, d/heads)
                   for f in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d/heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class _Block(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, activation: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        act = GELU2() if activation == "gelu2" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), act, nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class UQTransformer(nn.Module):
    """The UQ-Transformer.

    Args:
        embed_dim: channels of the P-VQVAE features (256).
        n_embd: transformer width (512 in the Places / Paris release).
        n_layer: number of blocks (35 in the Places / Paris release).
        n_head: attention heads (8); not recorded in checkpoints, so pass it if a model used another count.
        num_codes: logits per cell, the codes for fully known patches (512).
        seq_len: length of the learned position table = cells per image (1024 = 32 x 32 for 256 x 256).
        mlp_ratio: MLP hidden width / n_embd (4).
        activation: ``"gelu2"`` (released models) or ``"gelu"``.
        token_shape: (h, w) grid the position table was trained on; defaults to a square grid.
    """

    def __init__(self, embed_dim: int = 256, n_embd: int = 512, n_layer: int = 35, n_head: int = 8,
                 num_codes: int = 512, seq_len: int = 1024, mlp_ratio: int = 4, activation: str = "gelu2",
                 token_shape: tuple[int, int] | None = None):
        super().__init__()
        if activation not in ("gelu2", "gelu"):
            raise ValueError(f"activation must be 'gelu2' or 'gelu'; got {activation!r}.")
        side = math.isqrt(seq_len)
        self.token_shape = tuple(token_shape) if token_shape else ((side, side) if side * side == seq_len else None)
        self.config: dict[str, Any] = {
            "embed_dim": embed_dim, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "num_codes": num_codes,
            "seq_len": seq_len, "mlp_ratio": mlp_ratio, "activation": activation, "token_shape": self.token_shape,
        }
        self.emb_proj = nn.Linear(embed_dim, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len, n_embd))
        self.blocks = nn.Sequential(*(_Block(n_embd, n_head, mlp_ratio, activation) for _ in range(n_layer)))
        self.layer_norm = nn.LayerNorm(n_embd)
        self.to_logits = nn.Linear(n_embd, num_codes)

    @property
    def seq_len(self) -> int:
        return self.pos_emb.shape[1]

    @property
    def num_codes(self) -> int:
        return self.to_logits.out_features

    def check_token_shape(self, h: int, w: int) -> None:
        """Raise :class:`~fdm.errors.InputError` unless an h x w cell grid fits the position table."""
        if h * w != self.seq_len:
            trained = (f"{self.token_shape[0]}x{self.token_shape[1]} cells" if self.token_shape
                       else f"{self.seq_len} cells")
            raise InputError(
                f"This UQ-Transformer's position table has {self.seq_len} entries ({trained}), but the input has "
                f"{h}x{w} = {h * w} cells. Use an image of the training size, or give the model a position table "
                f"of the right length with resize_position_table(({h}, {w})) (an approximation not in PUT)."
            )
        if self.token_shape and (h, w) != self.token_shape:
            logger.warning("cell grid %dx%d differs from the %dx%d grid the position table was trained on",
                           h, w, *self.token_shape)

    def resize_position_table(self, token_shape: tuple[int, int]) -> None:
        """Bicubically resample the position table to a new (h, w) grid (requires a known training grid)."""
        if self.token_shape is None:
            raise ValueError("The training grid of this position table is unknown; construct with token_shape=.")
        h0, w0 = self.token_shape
        table = self.pos_emb.data.view(1, h0, w0, -1).permute(0, 3, 1, 2)  # (1, D, h0, w0)
        table = F.interpolate(table, size=tuple(token_shape), mode="bicubic", align_corners=False)
        self.pos_emb = nn.Parameter(table.flatten(2).transpose(1, 2).contiguous())  # (1, h*w, D)
        self.token_shape = tuple(token_shape)
        self.config.update(seq_len=self.seq_len, token_shape=self.token_shape)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) continuous features -> (B, h*w, D) input embeddings (projection + position)."""
        b, _, h, w = features.shape
        self.check_token_shape(h, w)
        return self.emb_proj(features.flatten(2).transpose(1, 2)) + self.pos_emb  # (B, L, D)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, L, D) embeddings -> (B, L, num_codes) logits."""
        return self.to_logits(self.layer_norm(self.blocks(embeddings)))
