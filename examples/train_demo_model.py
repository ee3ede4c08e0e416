"""Reproduce the demo model embedded in ``fdm.demo``: a small f4 VQGAN in the taming-transformers architecture
(Esser et al., CVPR 2021) trained on random photo crops, then an FDM for it (Park & Jung, WACV 2025).

Sub-commands (run in this order; each is seeded and runs on CPU, see docs/demo.md for timings):

    python examples/train_demo_model.py vqgan            # stage 1 -> fdm/demo/assets/vqgan.{yaml,safetensors}
    python examples/train_demo_model.py vqgan-decoder    # stage 1b: its decoder alone, on z -> the same files
    python examples/train_demo_model.py fdm              # stage 2 (phase 2) -> runs/fdm-phase2/
    python examples/train_demo_model.py fdm-addon        # phase 3, decoder frozen: the add-on FDM -> runs/fdm-addon/
    python examples/train_demo_model.py fdm-joint        # phase 3, FDM + decoder (the paper) -> runs/fdm-joint/
    python examples/train_demo_model.py decoder-only     # phase 3 ablation, decoder alone -> runs/decoder-only/
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger("train_demo_model")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "fdm" / "demo" / "assets"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "photos" / "train"
PHASE2_DIR = ROOT / "runs" / "fdm-phase2"  # stage 2's FDM, the start of stage 3 (not shipped)

# The demo VQGAN: taming's Encoder/Decoder at f4 (two down-samplings), no attention, 512 codes of 16 channels: enough
# for recognisable reconstructions, coarse enough that the quantization error is visible. At least 64 channels:
# taming normalises with GroupNorm(32 groups), and with 32 channels (one per group) the last norms of the encoder and
# decoder remove each channel's mean over the image, so the absolute colour of the image is lost. It is trained with
# quantization dropout (most samples decode z itself), so its decoder can use the detail that quantization removes
# and that FDM restores.
DDCONFIG = {
    "double_z": False,
    "z_channels": 64,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 64,
    "ch_mult": [1, 1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
N_EMBED = 512
EMBED_DIM = 16
BETA = 0.05
CONTINUOUS_FRACTION = 0.9
SEED = 0


class DemoVQGAN(nn.Module):
    """Training-time stand-in for taming's ``VQModel``: the same sub-modules under the same attribute names, so the
    state dict has VQModel's key names (the Lightning and loss parts of VQModel are not needed to train it)."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, beta: float = BETA):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=beta)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> z (B, embed_dim, H/4, W/4), the feature before quantization."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))


# ----------------------------------------------------------------------------------------------- data


class CropSampler:
    """Random square crops of the training photos at a random down-scaling, with horizontal flips, in [-1, 1].

    A crop's side in source pixels is log-uniform between ``size`` (native resolution: fine texture) and the
    photo's shorter side (the whole photo: object structure), resized to ``size`` with antialiasing.
    """

    def __init__(self, folder: Path, size: int = 64, seed: int = SEED):
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not paths:
            raise FileNotFoundError(f"no .jpg/.png images in {folder}")
        self.images = [
            torch.from_numpy(np.array(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
            for p in paths
        ]
        self.size = size
        self.gen = torch.Generator().manual_seed(seed)

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=self.gen).item()

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.gen))

    def sample(self, batch: int) -> torch.Tensor:
        """-> (batch, 3, size, size) in [-1, 1]."""
        out = []
        for _ in range(batch):
            img = self.images[self._randint(len(self.images))]
            h, w = img.shape[-2:]
            short = min(h, w)
            side = min(short, int(round(math.exp(self._uniform(math.log(self.size), math.log(max(short, self.size)))))))
            top, left = self._randint(h - side + 1), self._randint(w - side + 1)
            crop = img[None, :, top : top + side, left : left + side]
            if side != self.size:
                crop = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True,
                                     align_corners=False)
            if self._randint(2):
                crop = crop.flip(-1)
            out.append(crop.clamp(-1, 1))
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------- helpers


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 1e-6) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``floor`` (the paper's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def restart_dead_codes(quantize: nn.Module, usage: torch.Tensor, z: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed codes unused since the last call with random encoder features of the batch (avoids codebook collapse).

    Args:
        quantize: taming ``VectorQuantizer2``.
        usage: (n_embed,) hit counts since the last call.
        z: (B, C, h, w) pre-quantization features of the current batch.
    Returns:
        the number of codes restarted.
    """
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(flat.shape[0], (dead.numel(),), generator=gen)
    with torch.no_grad():
        quantize.embedding.weight[dead] = flat[pick] + 0.01 * flat.std() * torch.randn(
            dead.numel(), flat.shape[1], generator=gen)
    return int(dead.numel())


def vqgan_yaml(n_embed: int, embed_dim: int, ddconfig: dict) -> str:
    """taming's model.yaml layout for a VQModel (the loss is left out: inference only)."""
    cfg = {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": embed_dim,
                "n_embed": n_embed,
                "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        }
    }
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def save_vqgan(model: nn.Module, out_yaml: Path, out_weights: Path, meta: dict) -> None:
    out_yaml.parent.mkdir(parents=True, exist_ok=True)
    out_yaml.write_text(vqgan_yaml(model.quantize.n_e, model.quantize.e_dim, DDCONFIG))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out_weights), metadata={k: str(v) for k, v in meta.items()})
    log.info("wrote %s and %s (%.2f MB)", out_yaml, out_weights, out_weights.stat().st_size / 2**20)


def save_stage(directory: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
               generators: dict[str, torch.Generator], **extra: torch.Tensor) -> None:
    """Replace the stage's resumable checkpoint in ``directory``: weights, optimizer, every random state, ``extra``."""
    from fdm.training.checkpointing import save_checkpoint

    state = {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
             "generators": {name: g.get_state() for name, g in generators.items()}, **extra}
    save_checkpoint(directory, step, {"vqgan": model}, state, keep=1)


def resume_stage(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                 generators: dict[str, torch.Generator]) -> dict | None:
    """Restore the latest checkpoint that :func:`save_stage` wrote into ``directory``; -> its state (``"step"``,
    the extras), or None when there is none (a fresh start)."""
    from fdm.training.checkpointing import latest_checkpoint, load_checkpoint

    if (resume := latest_checkpoint(directory)) is None:
        return None
    state = load_checkpoint(resume, {"vqgan": model})
    opt.load_state_dict(state["optimizer"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    torch.set_rng_state(state["torch_rng"])
    log.info("resumed from %s", resume)
    return state


# ----------------------------------------------------------------------------------------------- stage 1


def train_vqgan(args: argparse.Namespace) -> None:
    """Stage 1: L1 reconstruction + taming's codebook/commitment loss, Adam, warm-up + cosine, dead-code restarts.

    Resumable: every ``--checkpoint-every`` steps the model, optimizer, code usage and every random state are saved
    to ``--checkpoint-dir`` (the previous checkpoint is replaced); a later run with the same options continues from
    the latest one and ends with the same weights as an uninterrupted run.
    """
    torch.manual_seed(args.seed)
    data = CropSampler(args.data, size=args.crop, seed=args.seed)
    warm = CropSampler(args.data, size=args.warm_crop, seed=args.seed + 2)
    warm_steps = int(args.warm_fraction * args.steps)
    model = DemoVQGAN(DDCONFIG, args.n_embed, args.embed_dim, beta=args.beta)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(args.seed + 1)
    generators = {"data": data.gen, "warm": warm.gen, "dropout": gen}
    state = resume_stage(args.checkpoint_dir, model, opt, generators)
    usage, first = (state["usage"], state["step"]) if state else (torch.zeros(args.n_embed), 0)
    start = time.time()
    for step in range(first, args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=args.steps // 50)
        x = (warm if step < warm_steps else data).sample(args.batch)
        z = model.encode_continuous(x)
        z_q, qloss, (_, _, idx) = model.quantize(z)
        if args.continuous_fraction > 0:  # these samples decode z itself (quantization dropout)
            keep = torch.rand(len(x), 1, 1, 1, generator=gen) < args.continuous_fraction
            z_q = torch.where(keep, z, z_q)
        x_rec = model.decode(z_q)
        rec = (x - x_rec).abs().mean()
        loss = rec + qloss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage 1: the loss is {loss.item()} at step {step + 1}; nothing saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx.flatten(), minlength=args.n_embed).float()
        if (step + 1) % args.restart_every == 0:
            restarted = restart_dead_codes(model.quantize, usage, z, gen) if step < 0.8 * args.steps else 0
            psnr = 10 * math.log10(4 / F.mse_loss(x_rec, x).item())
            log.info("step %d/%d  l1 %.4f  q %.4f  psnr %.2f  used %d/%d  restarted %d  lr %.2e  %.1f s",
                     step + 1, args.steps, rec.item(), qloss.item(), psnr, int((usage > 0).sum()), args.n_embed,
                     restarted, opt.param_groups[0]["lr"], time.time() - start)
            usage.zero_()
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_stage(args.checkpoint_dir, step + 1, model, opt, generators, usage=usage)
    model.eval()
    log_quantization_gap(model, DEFAULT_DATA.parent / "val", args.crop, args.seed)
    meta = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "crop": args.crop,
            "warm_crop": args.warm_crop, "warm_fraction": args.warm_fraction,
            "data": Path(args.data).name, "script": "examples/train_demo_model.py vqgan"}
    save_vqgan(model, args.out / "vqgan.yaml", args.out / "vqgan.safetensors", meta)


@torch.no_grad()
def log_quantization_gap(model: DemoVQGAN, folder: Path, crop: int, seed: int, views: int = 256) -> None:
    """Log the PSNR of decode(z_q) and decode(z) on held-out crops: FDM can only raise PSNR up to that gap."""
    if not folder.is_dir():
        return
    x = CropSampler(folder, size=crop, seed=seed + 99).sample(views)
    z = torch.cat([model.encode_continuous(x[i:i + 64]) for i in range(0, views, 64)])
    z_q = model.quantize(z)[0]

    def psnr(features: torch.Tensor) -> float:
        rec = torch.cat([model.decode(features[i:i + 64]) for i in range(0, views, 64)]).clamp(-1, 1)
        return (10 * torch.log10(4 / ((rec - x) ** 2).mean(dim=(1, 2, 3)))).mean().item()

    log.info("held-out crops (%s): PSNR decode(z_q) %.2f dB, decode(z) %.2f dB, ||z - z_q|| / ||z|| %.3f",
             folder.name, psnr(z_q), psnr(z), ((z - z_q).norm() / z.norm()).item())


# ----------------------------------------------------------------------------------------------- stage 1b


def train_decoder(args: argparse.Namespace) -> None:
    """Stage 1b: the decoder (and ``post_quant_conv``) alone, on the continuous features ``z``; L1, Adam, warm-up +
    cosine. The encoder, ``quant_conv`` and the codebook stay frozen, so ``z``, ``z_q`` and the codebook fingerprint
    are those of stage 1 and a stage-2 FDM trained on them stays valid. Resumable like stage 1.
    """
    from safetensors import safe_open

    torch.manual_seed(args.seed)
    with safe_open(str(args.vqgan_dir / "vqgan.safetensors"), "pt") as f:  # one read: the weights and stage 1's record
        meta, weights = f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    codebook = weights.get("quantize.embedding.weight")
    if codebook is None or codebook.ndim != 2:
        raise ValueError(f"{args.vqgan_dir / 'vqgan.safetensors'}: expected a stage-1 VQGAN with a (codes, channels) "
                         f"quantize.embedding.weight; got {None if codebook is None else tuple(codebook.shape)}")
    model = DemoVQGAN(DDCONFIG, *codebook.shape)
    model.load_state_dict(weights)
    model.requires_grad_(False)
    trained = [*model.decoder.parameters(), *model.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=args.lr, betas=(0.5, 0.9))
    data = CropSampler(args.data, size=args.crop, seed=args.seed + 3)
    state = resume_stage(args.checkpoint_dir, model, opt, {"data": data.gen})
    first = state["step"] if state else 0
    start = time.time()
    for step in range(first, args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=args.steps // 20)
        x = data.sample(args.batch)
        with torch.no_grad():
            z = model.encode_continuous(x)
        rec = (x - model.decode(z)).abs().mean()
        if not torch.isfinite(rec):
            raise FloatingPointError(f"stage 1b: the loss is {rec.item()} at step {step + 1}; nothing saved")
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log.info("step %d/%d  l1 %.4f  lr %.2e  %.1f s", step + 1, args.steps, rec.item(),
                     opt.param_groups[0]["lr"], time.time() - start)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_stage(args.checkpoint_dir, step + 1, model, opt, {"data": data.gen})
    model.eval()
    log_quantization_gap(model, DEFAULT_DATA.parent / "val", args.crop, args.seed)
    meta |= {"decoder_steps": args.steps, "decoder_batch": args.batch, "decoder_lr": args.lr,
             "decoder_script": "examples/train_demo_model.py vqgan-decoder"}
    save_vqgan(model, args.out / "vqgan.yaml", args.out / "vqgan.safetensors", meta)


# ----------------------------------------------------------------------------------------------- stage 2


def load_base(args: argparse.Namespace) -> nn.Module:
    """The stage-1 VQGAN through the library's taming loader (the path `fdm demo` uses)."""
    from fdm.adapters.taming import load_model

    return load_model(args.vqgan_dir / "vqgan.yaml", args.vqgan_dir / "vqgan.safetensors")


def training_views(args: argparse.Namespace) -> torch.Tensor:
    """``args.views`` fixed random 64 px crops of the training photos (seeded): (N, 3, 64, 64) in [-1, 1]."""
    sampler = CropSampler(args.data, size=args.crop, seed=args.seed + 10)
    return torch.cat([sampler.sample(256) for _ in range(math.ceil(args.views / 256))])[: args.views]


def train_fdm(args: argparse.Namespace) -> None:
    """Stage 2: the project's phase-2 trainer (qe loss) on cached features of fixed crops.

    Masks: random irregular holes covering 30 % to 90 % of the pixels, so the FDM sees everything from partly
    known maps to all-ones cell masks (plain reconstruction, the case `fdm demo` and `fdm eval` measure).
    """
    from fdm.training import Phase2Config, Phase2Trainer, TensorViews, latest_checkpoint

    model = load_base(args)
    views = TensorViews(training_views(args))
    config = Phase2Config(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.steps // 20, hole_ratio=(0.3, 0.9),
        seed=args.seed, hidden_channels=args.hidden, num_blocks=args.blocks, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=1, output_dir=str(args.out), log_every=250,
        base_model="fdm-vq demo VQGAN (fdm/demo/assets/vqgan.yaml)",
    )
    trainer = Phase2Trainer(model, views, config)
    module = trainer.train(resume_from=latest_checkpoint(trainer.checkpoint_dir))
    log.info("FDM: %d parameters, saved to %s", sum(p.numel() for p in module.parameters()), args.out)


# Phase-3 runs compared in docs/quality.md: the same crops, losses (the paper's qe + L1 + gradient + adversarial +
# perceptual + style, the backbone terms on ST-LPIPS's shift-tolerant VGG16, which ships with the eval extra) and
# budget; they differ only in what is trained.
PHASE3_RUNS = {
    "fdm-addon": ("add-on FDM: the phase-2 FDM trained further through the frozen decoder (base model unchanged)",
                  {"freeze_decoder": True}),
    "fdm-joint": ("the paper's phase 3: the phase-2 FDM and the decoder trained jointly", {}),
    "decoder-only": ("ablation: the decoder alone, with an identity FDM (decoder fine-tuning, no FDM)",
                     {"freeze_fdm": True}),
}


def train_phase3(args: argparse.Namespace) -> None:
    """The project's phase-3 trainer on the demo VQGAN, as ``PHASE3_RUNS[args.command]`` says; writes the result
    (an FDM folder, with ``decoder.safetensors`` when the decoder was trained) to ``--out``. The VQGAN's files are
    not modified. The loss terms start at 10 % (gradient, perceptual, style) and 20 % (adversarial) of the run,
    the paper's start steps scaled to this budget."""
    from fdm import FDM
    from fdm.training import Phase3Config, Phase3Trainer, TensorViews, latest_checkpoint

    model = load_base(args)
    _, overrides = PHASE3_RUNS[args.command]
    if overrides.get("freeze_fdm"):  # a fresh FDM is an exact identity (zero-initialised head)
        module = FDM(model.quantize.e_dim, hidden_channels=2, num_blocks=0)
    else:
        module = FDM.from_pretrained(args.fdm_dir)
    later = max(1, args.steps // 10)
    config = Phase3Config(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.steps // 20, hole_ratio=(0.3, 0.9),
        start_steps={"gradient": later, "perceptual": later, "style": later, "adversarial": 2 * later},
        disc_warmup_steps=later, backbone="st-vgg16", seed=args.seed, output_dir=str(args.work / args.command),
        val_every=0, checkpoint_every=args.checkpoint_every, extra_metrics=False, log_every=50, **overrides,
    )
    trainer = Phase3Trainer(model, module, TensorViews(training_views(args)), config)
    resume = latest_checkpoint(trainer.checkpoint_dir)
    trainer.train(resume_from=resume).save_pretrained(args.out)
    log.info("%s saved to %s", args.command, args.out)


# ----------------------------------------------------------------------------------------------- CLI


def _stage_parser(sub, name: str, what: str, func, *, out: Path, steps: int, batch: int, lr: float,
                  base: bool = True, views: int | None = 4096) -> argparse.ArgumentParser:
    """A sub-command with the options every stage has; ``base``: it also reads the VQGAN; ``views``: it trains on
    that many fixed crops (None: on fresh random crops)."""
    p = sub.add_parser(name, help=what)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    if base:
        p.add_argument("--vqgan-dir", type=Path, default=ASSETS)
    if views is not None:
        p.add_argument("--views", type=int, default=views, help="fixed training crops (default %(default)s)")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _stage_parser(sub, "vqgan", "stage 1: train the demo VQGAN", train_vqgan, out=ASSETS, steps=4000, batch=16,
                      lr=1e-3, base=False, views=None)
    p.add_argument("--warm-crop", type=int, default=32, help="smaller crops for the first steps (4x cheaper)")
    p.add_argument("--warm-fraction", type=float, default=0.4, help="fraction of steps on --warm-crop crops")
    p.add_argument("--checkpoint-dir", type=Path, default=ROOT / "training-checkpoints" / "demo-vqgan",
                   help="resumable checkpoint (one, replaced); a run resumes from it when it exists")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: none)")
    p.add_argument("--n-embed", type=int, default=N_EMBED)
    p.add_argument("--embed-dim", type=int, default=EMBED_DIM)
    p.add_argument("--beta", type=float, default=BETA, help="commitment weight of taming's VectorQuantizer2")
    p.add_argument("--continuous-fraction", type=float, default=CONTINUOUS_FRACTION,
                   help="fraction of the samples that the decoder sees unquantized (z instead of z_q)")
    p.add_argument("--restart-every", type=int, default=100)

    p = _stage_parser(sub, "vqgan-decoder", "stage 1b: train the VQGAN's decoder alone on continuous features",
                      train_decoder, out=ASSETS, steps=1000, batch=16, lr=2e-4, views=None)
    p.add_argument("--checkpoint-dir", type=Path, default=ROOT / "training-checkpoints" / "demo-vqgan-decoder",
                   help="resumable checkpoint (one, replaced); a run resumes from it when it exists")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: none)")

    p = _stage_parser(sub, "fdm", "stage 2: train the demo FDM with the phase-2 trainer", train_fdm, out=PHASE2_DIR,
                      steps=6000, batch=32, lr=1e-3, views=16384)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between resumable checkpoints in OUT/checkpoints (one kept; 0: none)")

    for name, (what, _) in PHASE3_RUNS.items():
        p = _stage_parser(sub, name, what, train_phase3, out=ROOT / "runs" / name, steps=400, batch=8, lr=2e-4)
        p.add_argument("--fdm-dir", type=Path, default=PHASE2_DIR, help="the phase-2 FDM to start from")
        p.add_argument("--work", type=Path, default=ROOT / "runs" / "phase3-work",
                       help="checkpoints and metrics.jsonl (in WORK/<command>); a run resumes from its checkpoint")
        p.add_argument("--checkpoint-every", type=int, default=100)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
