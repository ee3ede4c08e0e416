"""PUT sampling speed (CVPR 2022's UQ-Transformer sampler): the released loop against fdm-vq's sampler.

The released ``sample_largest`` re-runs the whole transformer for every filled cell. The transformer is
bidirectional, so a filled cell changes every cell's representation and a KV cache does not apply; what
can be saved without changing results is the work around the pass: Python loops over cells, one-hot
einsums, re-projecting the sampled code each step, attention written as explicit softmax, and passes for
images already finished. Part 1 checks that fdm-vq's sampler draws exactly the same codes as a faithful
re-statement of the released loop (same seed, top-50). Part 2 times one pass at the released size and the
cells/second of each option; several cells per pass (``cells_per_step``) is faster but changes results.

    python benchmarks/put_sampling_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from fdm.adapters.put import PVQVAE, UQTransformer, sample_codes
from fdm.adapters.put.transformer import _SelfAttention


def explicit_attention(self: _SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """PUT's FullAttention: q k^T / sqrt(d), softmax, @ v (no fused kernel)."""
    b, t, d = x.shape
    q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.query, self.key, self.value))
    att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1]), dim=-1)
    return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


@torch.no_grad()
def released_loop(transformer, codebook, features, known, top_k, generator):
    """The released sample_largest, re-stated: one pass per cell, one-hot einsums, per-cell Python writes."""
    b, _, h, w = features.shape
    emb = transformer.embed(features)
    filled = known.reshape(b, -1).clone()
    tokens = torch.full((b, h * w), -1, dtype=torch.long)
    while not filled.all():
        active = filled.sum(-1) < filled.shape[-1]
        logits = transformer(emb[active])
        best = logits.max(dim=-1).values.masked_fill(filled[active], float("-inf"))
        index = best.topk(1, dim=1).indices
        one_hot = F.one_hot(index, logits.shape[1]).float()
        cell_logits = torch.einsum("blc,bnl->bnc", logits, one_hot)
        val, ind = cell_logits.topk(top_k, dim=-1)
        probs = torch.softmax(torch.full_like(cell_logits, float("-inf")).scatter_(-1, ind, val), dim=-1)
        sample = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(index.shape)
        feat = transformer.emb_proj(codebook[sample]) + torch.einsum("bld,bnl->bnd",
                                                                      transformer.pos_emb.expand(len(index), -1, -1),
                                                                      one_hot)
        emb_a, tok_a, fill_a = emb[active], tokens[active], filled[active]
        for i in range(len(index)):
            for j in range(index.shape[1]):
                if not fill_a[i, index[i, j]]:
                    emb_a[i, index[i, j]] = feat[i, j]
                    tok_a[i, index[i, j]] = sample[i, j]
                    fill_a[i, index[i, j]] = True
        emb[active], tokens[active], filled[active] = emb_a, tok_a, fill_a
    return tokens.view(b, h, w)


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="passes timed per row at the released size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # Part 1: equal results (reduced widths so that a whole sampling run is quick; 64 x 64 image, 64 cells)
    codec = PVQVAE().eval()
    small = UQTransformer(n_embd=64, n_layer=2, n_head=4, seq_len=64).eval()
    for p in small.parameters():
        torch.nn.init.normal_(p, std=0.5)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    hole = torch.zeros(2, 1, 64, 64)
    hole[0, :, 10:50, 5:40] = 1
    hole[1, :, 30:64, 20:64] = 1
    with torch.no_grad():
        z = codec.encode(image, hole)
    known = codec.known_cells(hole, image)
    ours = sample_codes(small, codec.quantize.embedding, z, known, top_k=50,
                        generator=torch.Generator().manual_seed(1), progress=False)
    original = _SelfAttention.forward
    _SelfAttention.forward = explicit_attention
    try:
        ref = released_loop(small, codec.quantize.embedding, z, known, 50, torch.Generator().manual_seed(1))
    finally:
        _SelfAttention.forward = original
    same = torch.equal(torch.where(known, torch.full_like(ref, -1), ref), ours)
    print(f"equal codes, released loop vs fdm-vq sampler (seed 1, top-50, {int((~known).sum())} cells): {same}")

    # Part 2: one pass at the released size (35 x 512, 1024 cells)
    full = UQTransformer().eval()
    emb = torch.randn(1, 1024, 512)
    rows = []
    with torch.inference_mode():
        full(emb)
        _SelfAttention.forward = explicit_attention
        try:
            t_explicit = timed(lambda: full(emb), args.repeats)
        finally:
            _SelfAttention.forward = original
        t_fused = timed(lambda: full(emb), args.repeats)
        t_batch4 = timed(lambda: full(emb.expand(4, -1, -1).contiguous()), args.repeats)
    rows.append(("released: explicit attention, 1 image", t_explicit, 1, "exact"))
    rows.append(("fused attention (SDPA), 1 image", t_fused, 1, "same codes (float rounding)"))
    rows.append(("fused, 4 samples in one batch", t_batch4, 4, "same codes per sample"))
    for k in (4, 16):
        rows.append((f"fused, {k} cells per pass (cells_per_step)", t_fused, k, "approximate: other samples"))
    print(f"threads {torch.get_num_threads()}; seconds per transformer pass at the released size")
    print(f"{'variant':<44}{'s / pass':>10}{'cells / s':>11}{'vs released':>13}  results")
    base = 1 / t_explicit
    for name, seconds, cells, note in rows:
        rate = cells / seconds
        print(f"{name:<44}{seconds:>10.2f}{rate:>11.3f}{rate / base:>12.2f}x  {note}")


if __name__ == "__main__":
    main()
