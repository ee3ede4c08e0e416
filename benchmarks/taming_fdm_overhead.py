"""FDM's share of taming-transformers' FFHQ generation (FDM, WACV 2025; taming, CVPR 2021) at the released sizes.

Random weights (timing only): f16 VQGAN (ch 128, ch_mult 1,1,2,2,4, 1024 x 256 codebook), FFHQ GPT
(24 layers x 1664, 16 heads, block 256), FDM at C = 256 (paper size, no mask channel), one 256 x 256 image
(16 x 16 codes). Sampling uses fdm's KV-cached sampler; ``--tokens`` steps are measured and the per-token
time extrapolated to all 256 tokens (each cached step costs about the same; the table says so).

    python benchmarks/taming_fdm_overhead.py --tokens 32 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import fdm
from fdm.adapters.taming import build_model
from fdm.adapters.taming.sampling import KVCache, gpt_forward

F16 = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
FFHQ = {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
    "cond_stage_config": "__is_unconditional__", "first_stage_key": "image",
    "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                           "params": {"vocab_size": 1024, "block_size": 256, "n_layer": 24, "n_head": 16,
                                      "n_embd": 1664}},
    "first_stage_config": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 256, "n_embed": 1024, "ddconfig": F16, "lossconfig": {"target": "torch.nn.Identity"}}}}}


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="sampling steps measured (extrapolated to 256)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the decode / FDM timings")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_model(FFHQ).to(device).eval()
    first_stage, gpt = model.first_stage_model, model.transformer
    module = fdm.FDM(channels=256, mask_channels=0).to(device).eval()
    torch.nn.init.normal_(module.head.weight, std=1e-3)
    tokens = 256

    with torch.inference_mode():
        z_q = first_stage.quantize.get_codebook_entry(torch.randint(0, 1024, (tokens,), device=device),
                                                      (1, 16, 16, 256))
        t_decode = timed(lambda: first_stage.decode(z_q), args.repeats, sync)
        t_fdm = timed(lambda: module(z_q), args.repeats, sync)

        def sample_steps() -> None:
            cache = KVCache(gpt, 1)
            token = torch.zeros(1, 1, dtype=torch.long, device=device)  # SOS
            for _ in range(args.tokens):
                logits = gpt_forward(gpt, token, cache)[:, -1]
                token = torch.multinomial(logits.softmax(-1), 1)

        t_token = timed(sample_steps, 1, sync) / args.tokens
    t_sample = t_token * tokens
    t_total = t_sample + t_decode

    decoder_params = sum(p.numel() for m in (first_stage.post_quant_conv, first_stage.decoder) for p in m.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    fdm_params = sum(p.numel() for p in module.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"taming FFHQ (f16 VQGAN + GPT 24x1664), 256x256, batch 1, {device_name}, "
          f"{torch.get_num_threads()} threads, random weights")
    print(f"| {'quantity':<52} | {'value':>12} |")
    print(f"|{'-' * 54}|{'-' * 14}|")
    rows = [
        ("first-stage decode (post_quant_conv + decoder)", f"{t_decode * 1e3:.1f} ms"),
        ("FDM forward (C=256, 8 blocks)", f"{t_fdm * 1e3:.2f} ms"),
        (f"KV-cached sampling per token (mean of {args.tokens})", f"{t_token * 1e3:.1f} ms"),
        ("sampling 256 tokens (extrapolated)", f"{t_sample:.2f} s"),
        ("sample-and-decode (extrapolated)", f"{t_total:.2f} s"),
        ("FDM / decode time (target < 2%)", f"{100 * t_fdm / t_decode:.2f} %"),
        ("FDM / sample-and-decode time (target < 0.5%)", f"{100 * t_fdm / t_total:.3f} %"),
        ("FDM parameters", f"{fdm_params / 1e6:.2f} M"),
        ("FDM / decoder parameters", f"{100 * fdm_params / decoder_params:.1f} %"),
        ("FDM / whole model parameters (GPT + VQGAN)", f"{100 * fdm_params / total_params:.2f} %"),
    ]
    for name, value in rows:
        print(f"| {name:<52} | {value:>12} |")


if __name__ == "__main__":
    main()
