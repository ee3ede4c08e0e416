"""PUT's sampler (Liu et al., CVPR 2022): fill the hole cells of the feature map one (or a few) at a time,
each time choosing the unfilled cell whose largest logit is highest and drawing its code from the top-K.

Same rule and random-number use as the released ``sample_largest`` (one ``torch.multinomial`` call per
step over the rows still being filled), without its per-cell Python loops and per-step codebook projection.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fdm.adapters.put.transformer import UQTransformer
from fdm.errors import InputError

__all__ = ["sample_codes"]


@torch.no_grad()
def sample_codes(
    transformer: UQTransformer,
    codebook: torch.Tensor,
    features: torch.Tensor,
    known_cells: torch.Tensor,
    *,
    top_k: int = 50,
    temperature: float = 1.0,
    cells_per_step: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample codes for the cells that are not known.

    Args:
        transformer: the UQ-Transformer.
        codebook: (N, C) code vectors; the first ``transformer.num_codes`` are the ones sampled.
        features: (B, C, h, w) continuous features of the masked image.
        known_cells: (B, h, w) bool, True where the patch has no hole pixel (never resampled).
        top_k: codes kept per cell before drawing (50 in PUT and FDM; 1 = greedy, deterministic).
        temperature: softmax temperature over the kept logits (1 in PUT).
        cells_per_step: cells filled per transformer pass (1 = PUT; more is faster and approximate).
        generator: random generator for the draws (device of ``features``).
        progress: show a tqdm bar over the steps.

    Returns:
        (B, h, w) long: sampled codes in ``[0, num_codes)`` on unknown cells, -1 on known cells.
    """
    if top_k < 1 or cells_per_step < 1 or temperature <= 0:
        raise InputError(f"top_k and cells_per_step must be >= 1 and temperature > 0; got top_k={top_k}, "
                         f"cells_per_step={cells_per_step}, temperature={temperature}.")
    b, _, h, w = features.shape
    num_codes = transformer.num_codes
    emb = transformer.embed(features)  # (B, L, D)
    code_emb = transformer.emb_proj(codebook[:num_codes])  # (K, D): projected once, not per step
    pos = transformer.pos_emb[0]  # (L, D)
    filled = known_cells.reshape(b, -1).clone()  # (B, L)
    tokens = torch.full((b, h * w), -1, dtype=torch.long, device=features.device)
    k = min(top_k, num_codes)
    total = int((~filled).sum(dim=1).max()) if filled.numel() else 0
    steps = -(-total // cells_per_step)
    for _ in tqdm(range(steps), desc="PUT sampling", unit="step", disable=not progress, leave=False):
        active = (~filled).any(dim=1).nonzero().squeeze(1)  # (b,) rows still being filled
        if active.numel() == 0:
            break
        logits = transformer(emb[active])  # (b, L, K)
        best = logits.amax(dim=-1).masked_fill(filled[active], float("-inf"))  # (b, L)
        cells = best.topk(min(cells_per_step, h * w), dim=1).indices  # (b, n)
        cell_logits = logits.gather(1, cells[..., None].expand(-1, -1, num_codes))  # (b, n, K)
        kept = cell_logits.topk(k, dim=-1)  # (b, n, k)
        filtered = torch.full_like(cell_logits, float("-inf")).scatter_(-1, kept.indices, kept.values)
        probs = torch.softmax(filtered / temperature, dim=-1)  # (b, n, K)
        codes = torch.multinomial(probs.view(-1, num_codes), 1, generator=generator).view(cells.shape)  # (b, n)
        rows = active[:, None].expand_as(cells)  # (b, n)
        new = ~filled[rows, cells]  # only unfilled cells are written (cells_per_step may exceed what is left)
        rows, cells, codes = rows[new], cells[new], codes[new]
        emb[rows, cells] = code_emb[codes] + pos[cells]
        tokens[rows, cells] = codes
        filled[rows, cells] = True
    return tokens.view(b, h, w)
