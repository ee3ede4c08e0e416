"""One accelerator check of fdm-vq (FDM, Park & Jung, WACV 2025): CPU-vs-device equality of decodes, bf16 phase-2
and phase-3 runs, FDM's time share of decoding and sampling at the released sizes (taming-transformers FFHQ f16,
CVPR 2021; PUT, CVPR 2022) and the phase-2 feature-cache speed-up. Prints one table; random weights only,
nothing is downloaded. See docs/performance.md.

    bash benchmarks/gpu_check.sh                          # on a CUDA machine (sized for < 8 min on one H200)
    python benchmarks/gpu_check.py --device cpu --quick   # every row on the CPU at tiny sizes (a smoke test)

Exit status 1 when a check fails (its traceback goes to stderr), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from taming_fdm_overhead import FFHQ  # the released FFHQ sizes: f16 VQGAN (1024 x 256) + GPT 24 x 1664
from torch import nn

import fdm
from fdm.adapters.put import PUT, PVQVAE, UQTransformer, sample_codes
from fdm.adapters.taming import build_model
from fdm.adapters.taming.sampling import sample_unconditional
from fdm.losses import TERMS
from fdm.pipeline import encode_latents
from fdm.training import Phase2Config, Phase2Trainer, Phase3Config, Phase3Trainer, TensorViews
from fdm.training.backbones import VGG19Features

TOLERANCE = 1e-4
"""Largest |CPU - device| accepted in a decoded image (values in [-1, 1], float32, TF32 off)."""

TINY_DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
"""The tests' tiny taming VQGAN (factor 4, 8 channels, 32 x 32 images; tests/taming_tiny.py)."""
TINY_GPT = {"vocab_size": 16, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of the training and timing rows: the released architectures, or tiny ones (``--quick``)."""

    tiny: bool
    batch: int  # phase-2 batch (rows 2 and 4)
    phase2_steps: int
    phase3_batch: int
    phase3_steps: int
    cache_views: int  # synthetic views of row 4
    cached_steps: int  # row 4, feature cache in memory
    reencode_steps: int  # row 4, cache="none"
    repeats: int  # timing repeats of the decode rows (the median is reported)


RELEASED = Scale(tiny=False, batch=16, phase2_steps=40, phase3_batch=4, phase3_steps=20, cache_views=48,
                 cached_steps=60, reencode_steps=15, repeats=20)
QUICK = Scale(tiny=True, batch=4, phase2_steps=8, phase3_batch=2, phase3_steps=6, cache_views=16, cached_steps=12,
              reencode_steps=8, repeats=3)


@dataclasses.dataclass
class Row:
    check: str
    setting: str
    result: str
    verdict: str  # "pass", "FAIL", "info" (a measurement) or "skipped"


# --- models, data, timing ------------------------------------------------------------------------------------

def taming_config(tiny: bool) -> dict:
    """The released FFHQ Net2NetTransformer config (f16 VQGAN, 1024 x 256 codes; GPT 24 x 1664), or a tiny one."""
    config = copy.deepcopy(FFHQ)
    if tiny:
        params = config["params"]
        params["transformer_config"]["params"] = dict(TINY_GPT)
        params["first_stage_config"]["params"].update(embed_dim=8, n_embed=16, ddconfig=dict(TINY_DDCONFIG))
    return config


def taming_vqgan(tiny: bool, n_embed: int | None = None) -> nn.Module:
    """The first stage of :func:`taming_config` (a taming VQModel; ``n_embed`` codes instead of its own if given)
    with random weights and a N(0, 1) codebook."""
    config = taming_config(tiny)["params"]["first_stage_config"]
    if n_embed is not None:
        config["params"]["n_embed"] = n_embed
    model = build_model(config)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model


def put_codec(tiny: bool) -> PVQVAE:
    """PUT's P-VQVAE at the released size (patch 8, 1024 x 256 codes), or the tests' tiny one (8 channels)."""
    if not tiny:
        return PVQVAE()
    return PVQVAE(encoder_channels=16, encoder_out_channels=16, encoder_blocks=2, encoder_block_channels=8,
                  num_codes=32, embed_dim=8, known_codes=16, decoder_in_channels=8, decoder_channels=16,
                  decoder_blocks=2, decoder_block_channels=8, base_channels=4)


def put_transformer(tiny: bool) -> UQTransformer:
    """PUT's UQ-Transformer at the Places / Paris size (35 x 512, 1024 cells), or a tiny one for 32 x 32 images."""
    if not tiny:
        return UQTransformer()
    return UQTransformer(embed_dim=8, n_embd=16, n_layer=1, n_head=2, num_codes=16, seq_len=16)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1] (bicubically upsampled noise)."""
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call, synchronised on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class StepClock:
    """Steps per second of a trainer, from the FDM's forward calls (one per optimizer step in both trainers).

    The first ``warmup`` steps are left out (CUDA kernels are selected and compiled there), and so are the set-up
    before the first step and the saving after the last.
    """

    def __init__(self, module: nn.Module, device: torch.device, warmup: int = 2):
        self.device, self.warmup, self.ticks = device, warmup, []
        self._handle = module.register_forward_pre_hook(self._tick)

    def _tick(self, *_) -> None:
        synchronize(self.device)
        self.ticks.append(time.perf_counter())

    def steps_per_second(self) -> float:
        self._handle.remove()
        ticks = self.ticks[self.warmup:]
        if len(ticks) < 2:
            raise RuntimeError(f"{len(self.ticks)} training steps timed; need at least {self.warmup + 2}.")
        return (len(ticks) - 1) / (ticks[-1] - ticks[0])


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


# --- 1. CPU vs device ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tf32_off():
    """Full float32 matmuls and convolutions on CUDA (TF32 off) for the equality check; restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_fdm(channels: int, mask_channels: int) -> fdm.FDM:
    """A small FDM with a random output layer (a fresh FDM is the identity, which would test nothing)."""
    module = fdm.FDM(channels, mask_channels=mask_channels, hidden_channels=16, num_blocks=2)
    nn.init.normal_(module.head.weight, std=0.1)
    return module.eval()


def decode_pair(model: nn.Module, module: fdm.FDM, z: torch.Tensor, device: torch.device,
                mask: torch.Tensor | None = None, **guide: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decode ``z`` on ``device`` without and with FDM (model and FDM are moved there)."""
    module.base_model_fingerprint = fdm.find_adapter(model).fingerprint()
    deq = fdm.Dequantizer(model.to(device), module.to(device))
    guide = {k: v.to(device) for k, v in guide.items()}
    z = z.to(device)
    return {"decode": deq.adapter.decode(z, **guide),
            "decode + FDM": deq.decode(z, None if mask is None else mask.to(device), **guide)}


def fdm_alone(device: torch.device) -> dict[str, torch.Tensor]:
    module = tiny_fdm(8, mask_channels=1)
    z, cells = torch.randn(2, 8, 8, 8), (torch.rand(2, 1, 8, 8) < 0.5).float()
    return {"FDM": module.to(device)(z.to(device), cells.to(device))}


def taming_decode(device: torch.device) -> dict[str, torch.Tensor]:
    vqgan = taming_vqgan(tiny=True)
    adapter = fdm.find_adapter(vqgan)
    z_q, _ = adapter.quantize(adapter.encode(smooth_images(2, 32)))  # codes chosen on the CPU in both runs
    return decode_pair(vqgan, tiny_fdm(8, mask_channels=0), z_q, device)


def put_decode(device: torch.device) -> dict[str, torch.Tensor]:
    codec, x = put_codec(tiny=True).eval(), smooth_images(2, 32)
    hole = torch.zeros(2, 1, 32, 32)
    hole[0, :, 4:20, 8:28], hole[1, :, 12:32, 0:16] = 1, 1
    lat = encode_latents(fdm.find_adapter(codec), x, hole)  # continuous known cells, codes in the hole
    return decode_pair(codec, tiny_fdm(8, mask_channels=1), lat.z_in, device, hole, **lat.guide)


def diffusers_decode(device: torch.device) -> dict[str, torch.Tensor]:
    from diffusers import VQModel

    model = VQModel(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    block_out_channels=(16, 16, 32), layers_per_block=1, latent_channels=4, vq_embed_dim=6,
                    num_vq_embeddings=8, norm_num_groups=8).eval()
    adapter = fdm.find_adapter(model)
    z_q, _ = adapter.quantize(adapter.encode(smooth_images(2, 32)))
    return decode_pair(model, tiny_fdm(adapter.channels, mask_channels=0), z_q, device)


@torch.no_grad()
def equality_rows(device: torch.device, scale: Scale) -> list[Row]:
    """Row 1: the same seeded tiny models decode the same inputs on the CPU and on ``device``."""
    cases = {"FDM alone (C=8)": fdm_alone, "taming VQGAN (f4, 16 codes)": taming_decode,
             "PUT P-VQVAE with guide (8 ch)": put_decode, "diffusers VQModel (f4, 8 codes)": diffusers_decode}
    rows = []
    with tf32_off():
        for name, case in cases.items():
            try:
                outputs = []
                for where in (torch.device("cpu"), device):
                    torch.manual_seed(0)
                    outputs.append({k: v.float().cpu() for k, v in case(where).items()})
            except ImportError as error:  # diffusers is optional
                rows.append(Row("CPU vs device decode", name, f"not run: {error}", "skipped"))
                continue
            cpu, dev = outputs
            diffs = {k: (cpu[k] - dev[k]).abs().max().item() for k in cpu}
            result = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            verdict = "pass" if max(diffs.values()) <= TOLERANCE else "FAIL"
            rows.append(Row("CPU vs device decode", name, f"max abs diff {result} (tol {TOLERANCE:.0e})", verdict))
    return rows


# --- 2. bf16 training ------------------------------------------------------------------------------------------

def verdict_finite(loss: float) -> str:
    return "pass" if math.isfinite(loss) else "FAIL"


def phase2_row(vqgan: nn.Module, views: TensorViews, device: torch.device, scale: Scale, what: str, tmp: str) -> Row:
    """A short mask-free phase-2 run in bf16: steps/s and a finite final loss."""
    config = Phase2Config(steps=scale.phase2_steps, batch_size=scale.batch, hole_ratio=None, warmup_steps=1,
                          device=str(device), progress=False, checkpoint_every=0, log_every=5,
                          output_dir=f"{tmp}/phase2", precision="bf16")
    trainer = Phase2Trainer(vqgan, views, config)
    clock = StepClock(trainer.fdm, device)
    trainer.train()
    loss = trainer.final_loss
    return Row("phase 2 in bf16", f"{what}, batch {scale.batch}, {scale.phase2_steps} steps",
               f"{clock.steps_per_second():.1f} steps/s, final loss {loss:.4g}", verdict_finite(loss))


def phase3_row(vqgan: nn.Module, views: TensorViews, device: torch.device, scale: Scale, what: str, tmp: str) -> Row:
    """A short mask-free phase-3 run in bf16 with every loss term from step 0: steps/s and a finite final loss."""
    config = Phase3Config(steps=scale.phase3_steps, batch_size=scale.phase3_batch, hole_ratio=None, warmup_steps=1,
                          disc_warmup_steps=1, start_steps=dict.fromkeys(TERMS, 0), device=str(device),
                          output_dir=f"{tmp}/phase3", log_every=scale.phase3_steps, val_every=0, checkpoint_every=0,
                          extra_metrics=False, progress=False, precision="bf16")
    backbone = VGG19Features().eval().requires_grad_(False)  # random weights: cost and numerics only
    module = fdm.FDM(vqgan.quantize.e_dim, mask_channels=0)
    nn.init.normal_(module.head.weight, std=1e-3)  # as after phase 2: not the identity
    trainer = Phase3Trainer(vqgan, module, views, config, backbone=backbone)
    clock = StepClock(module, device)
    trainer.train()
    records = [json.loads(line) for line in Path(f"{tmp}/phase3/metrics.jsonl").read_text().splitlines()]
    loss = [r for r in records if r["split"] == "train"][-1]["loss"]
    return Row("phase 3 in bf16", f"{what}, batch {scale.phase3_batch}, {scale.phase3_steps} steps, all six loss "
               "terms from step 0 (VGG19 with random weights)",
               f"{clock.steps_per_second():.2f} steps/s, final loss {loss:.4g}", verdict_finite(loss))


def training_rows(device: torch.device, scale: Scale) -> list[Row]:
    """Row 2: short phase-2 and phase-3 runs in bf16 on the FFHQ-size VQGAN (tiny with --quick)."""
    vqgan = taming_vqgan(scale.tiny)
    size = vqgan.encoder.resolution
    views = TensorViews(smooth_images(max(scale.batch, scale.phase3_batch) * 2, size))
    what = f"taming VQGAN {'tiny' if scale.tiny else 'f16 FFHQ size'}, {size}px, mask-free"
    with tempfile.TemporaryDirectory() as tmp:
        return [run(vqgan, views, device, scale, what, tmp) for run in (phase2_row, phase3_row)]


# --- 3. FDM's share of decoding and sampling ------------------------------------------------------------------

def share_row(name: str, setting: str, t_decode: float, t_fdm: float, t_with: float) -> Row:
    return Row(f"FDM share of decode, {name}", setting,
               f"decode {t_decode * 1e3:.2f} ms, with FDM {t_with * 1e3:.2f} ms, FDM alone {t_fdm * 1e3:.3f} ms "
               f"= {100 * t_fdm / t_with:.2f} % of the decode with FDM", "info")


def sampling_row(name: str, setting: str, t_sampling: float, t_with: float, t_fdm: float) -> Row:
    total = t_sampling + t_with
    return Row(f"FDM share of sampling, {name}", setting,
               f"sampling {t_sampling:.2f} s + decode with FDM {t_with * 1e3:.1f} ms; FDM {t_fdm * 1e3:.3f} ms "
               f"= {100 * t_fdm / total:.4f} %", "info")


@torch.inference_mode()
def taming_share_rows(device: torch.device, scale: Scale) -> list[Row]:
    """FDM against the FFHQ first stage's decode and a full KV-cached sampling run of the FFHQ GPT."""
    torch.manual_seed(0)
    model = build_model(taming_config(scale.tiny), device=device)
    first_stage, gpt = model.first_stage_model, model.transformer
    channels = first_stage.quantize.e_dim
    side = first_stage.encoder.resolution // 2 ** (first_stage.encoder.num_resolutions - 1)
    module = fdm.FDM(channels, mask_channels=0).to(device).eval()  # the paper's FDM: C -> C, 8 blocks, no mask
    codes = torch.randint(0, first_stage.quantize.n_e, (side * side,), device=device)
    z_q = first_stage.quantize.get_codebook_entry(codes, (1, side, side, channels))
    t_decode = timed(lambda: first_stage.decode(z_q), device, scale.repeats)
    t_fdm = timed(lambda: module(z_q), device, scale.repeats)
    t_with = timed(lambda: first_stage.decode(module(z_q)), device, scale.repeats)
    t_sampling = timed(lambda: sample_unconditional(model, 1, top_k=250, seed=0, progress=False), device, 1)
    what = "tiny taming" if scale.tiny else "taming FFHQ f16 (256px, 16x16 x 256)"
    return [share_row(what, f"FDM C={channels}, 8 blocks, batch 1", t_decode, t_fdm, t_with),
            sampling_row(what, f"GPT {len(gpt.blocks)} x {gpt.tok_emb.embedding_dim}, full KV-cached run of "
                         f"{side * side} tokens (measured, not extrapolated)", t_sampling, t_with, t_fdm)]


@torch.inference_mode()
def put_share_rows(device: torch.device, scale: Scale) -> list[Row]:
    """FDM against PUT's guided decode and a full sampling run (one UQ-Transformer pass per generated cell)."""
    torch.manual_seed(0)
    with torch.device(device):
        put = PUT(put_codec(scale.tiny), put_transformer(scale.tiny)).eval()
    codec, transformer = put.codec, put.transformer
    size = codec.patch_size * transformer.token_shape[0]
    image = smooth_images(1, size).to(device)
    hole = fdm.random_irregular_mask(size, size, (0.4, 0.4), generator=torch.Generator().manual_seed(0))[None]
    hole = hole.to(device)
    module = fdm.FDM(codec.embed_dim).to(device).eval()  # with the mask channel, as for inpainting
    z = codec.encode(image, hole)
    known = codec.known_cells(hole, image)
    cells = (~known[:, None]).float()
    t_decode = timed(lambda: codec.decode(z, image, hole), device, scale.repeats)
    t_fdm = timed(lambda: module(z, cells), device, scale.repeats)
    t_with = timed(lambda: codec.decode(module(z, cells), image, hole), device, scale.repeats)

    def sample() -> None:
        generator = torch.Generator(device).manual_seed(0)
        sample_codes(transformer, codec.quantize.embedding, z, known, top_k=50, generator=generator, progress=False)

    t_sampling = timed(sample, device, 1)
    what = "tiny PUT" if scale.tiny else "PUT P-VQVAE (256px, 32x32 x 256)"
    return [share_row(what, f"FDM C={codec.embed_dim} + mask, 40 % hole, batch 1", t_decode, t_fdm, t_with),
            sampling_row(what, f"UQ-Transformer {len(transformer.blocks)} x {transformer.pos_emb.shape[-1]}, full "
                         f"run: {int(cells.sum())} passes, one cell each (measured)", t_sampling, t_with, t_fdm)]


def share_rows(device: torch.device, scale: Scale) -> list[Row]:
    """Row 3: FDM's time against the decode and a full sampling run, batch 1, float32."""
    return taming_share_rows(device, scale) + put_share_rows(device, scale)


# --- 4. phase-2 feature cache ----------------------------------------------------------------------------------

def cache_rows(device: torch.device, scale: Scale) -> list[Row]:
    """Row 4: phase-2 steps/s with the features cached in memory against re-encoding every step."""
    vqgan = taming_vqgan(scale.tiny)
    size = vqgan.encoder.resolution
    views = TensorViews(smooth_images(scale.cache_views, size, seed=1))
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cache, steps in (("memory", scale.cached_steps), ("none", scale.reencode_steps)):
            config = Phase2Config(steps=steps, batch_size=scale.batch, hole_ratio=None, cache=cache, warmup_steps=1,
                                  device=str(device), progress=False, checkpoint_every=0,
                                  output_dir=f"{tmp}/{cache}", precision="bf16")
            trainer = Phase2Trainer(vqgan, views, config)
            clock = StepClock(trainer.fdm, device)
            trainer.train()
            rates[cache] = clock.steps_per_second()
            if cache == "memory":
                fill = trainer.cache_fill_seconds
    what = "tiny taming VQGAN" if scale.tiny else "taming f16 encoder (FFHQ size)"
    setting = (f"{what}, {len(views)} synthetic {size}px views, batch {scale.batch}, "
               "bf16, mask-free")
    return [Row("phase-2 feature cache speed-up", setting,
                f"cached {rates['memory']:.1f} steps/s (filled in {fill:.2f} s), re-encoding {rates['none']:.2f} "
                f"steps/s: {rates['memory'] / rates['none']:.1f}x", "info")]


# --- the table -------------------------------------------------------------------------------------------------

SECTIONS = {"1 CPU vs device decode": equality_rows, "2 bf16 training": training_rows,
            "3 FDM time share": share_rows, "4 phase-2 cache speed-up": cache_rows}


def run_sections(device: torch.device, scale: Scale) -> list[tuple[str, Row]]:
    """Every section's rows, numbered; a section that raises becomes one FAIL row (traceback on stderr)."""
    rows = []
    for name, section in SECTIONS.items():
        number, title = name.split(" ", 1)
        try:
            found = section(device, scale)
        except Exception as error:  # one broken check must not hide the others' results
            traceback.print_exc()
            found = [Row(title, "", f"error: {type(error).__name__}: {error}", "FAIL")]
        rows += [(number, row) for row in found]
    return rows


def format_table(rows: list[tuple[str, Row]]) -> str:
    """Markdown table: row number, check, setting, result, verdict."""
    header = ("#", "check", "setting", "result", "verdict")
    cells = [header] + [(n, r.check, r.setting, r.result, r.verdict) for n, r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="device compared with the CPU and timed (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny models everywhere (a smoke test of the table)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # a machine without an accelerator: not an error
        print("gpu_check: no CUDA accelerator available (torch.cuda.is_available() is False): nothing measured "
              "(--device cpu --quick runs a CPU smoke test of the table).")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else RELEASED
    started = time.perf_counter()
    rows = run_sections(device, scale)
    sizes = "tiny models (--quick)" if scale.tiny else "released sizes, random weights"
    print(f"fdm-vq gpu_check, {datetime.date.today()}: device {device} = {device_name(device)}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} CPU threads, {sizes}; "
          f"{time.perf_counter() - started:.0f} s\n")
    print(format_table(rows))
    return 1 if any(row.verdict == "FAIL" for _, row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
