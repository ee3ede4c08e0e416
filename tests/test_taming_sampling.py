"""Sampling taming transformers with FDM: the KV-cached forward and samplers against taming's own GPT and
samplers (same random draws), the sliding-window sampler against taming's sample_conditional.py algorithm,
decoding with FDM, the ``fdm sample`` command and the three example scripts on tiny official-layout models."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fdm
from fdm.adapters.taming.sampling import (
    KVCache,
    decode_indices,
    filter_logits,
    gpt_forward,
    sample_class,
    sample_semantic,
    sample_unconditional,
)
from fdm.errors import InputError

pytest.importorskip("taming")
from taming_tiny import (  # noqa: E402
    N_LABELS,
    class_config,
    random_model,
    save_lightning_ckpt,
    semantic_config,
    unconditional_config,
    write_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def uncond() -> torch.nn.Module:
    return random_model(unconditional_config())


@pytest.fixture(scope="module")
def semantic() -> torch.nn.Module:
    return random_model(semantic_config())


def _fdm_for(model: torch.nn.Module) -> fdm.FDM:
    adapter = fdm.find_adapter(model)
    module = fdm.FDM(adapter.channels, mask_channels=0, hidden_channels=16, num_blocks=2,
                     base_model_fingerprint=adapter.fingerprint())
    torch.nn.init.normal_(module.head.weight, std=0.1)
    return module.eval()


# --- KV-cached forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_unmasked", [0, 3])
def test_cached_logits_equal_taming_full_forward(uncond, n_unmasked):
    from taming.modules.transformer.mingpt import GPT

    gpt = GPT(vocab_size=16, block_size=24, n_layer=2, n_head=2, n_embd=32, n_unmasked=n_unmasked).eval()
    idx = torch.randint(0, 16, (2, 24))
    with torch.no_grad():
        full = gpt(idx)[0]  # taming's own uncached forward
        cache = KVCache(gpt, 2)
        pieces = [gpt_forward(gpt, idx[:, :5], cache)] + [gpt_forward(gpt, idx[:, t:t + 1], cache) for t in range(5, 24)]
        uncached = gpt_forward(gpt, idx)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncached, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="block size"):
        gpt_forward(gpt, idx[:, :1], cache)


def test_filter_logits():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8: keep two
    assert keep(filter_logits(logits, top_p=0.4)) == [True, False, False, False]
    assert keep(filter_logits(logits, top_k=3, top_p=0.9)) == [True, True, True, False]
    assert keep(filter_logits(logits)) == [True] * 4


# --- samplers against taming's own ------------------------------------------------------------------------


def test_unconditional_equals_taming_sample(uncond):
    torch.manual_seed(7)
    ours = sample_unconditional(uncond, 3, top_k=5, temperature=0.9, progress=False)
    torch.manual_seed(7)
    sos = torch.zeros(3, 1, dtype=torch.long)
    theirs = uncond.sample(sos[:, :0], sos, steps=64, temperature=0.9, sample=True, top_k=5)
    assert ours.shape == (3, 8, 8) and torch.equal(ours.reshape(3, -1), theirs)


def test_class_conditional_equals_taming_sample_with_past():
    from taming.modules.transformer.mingpt import sample_with_past

    model = random_model(class_config())
    classes = torch.tensor([3, 3, 9])
    torch.manual_seed(1)
    ours = sample_class(model, classes, top_k=6, top_p=0.8, progress=False)
    torch.manual_seed(1)  # taming's KV-cached sampler, with fdm's stand-in for transformers' filtering
    theirs = sample_with_past(classes[:, None], model.transformer, steps=64, top_k=6, top_p=0.8)
    assert torch.equal(ours.reshape(3, -1), theirs)
    with pytest.raises(InputError, match=r"class ids must be in \[0, 10\)"):
        sample_class(model, [10], progress=False)


def test_seed_and_options():
    model = random_model(unconditional_config())
    a = sample_unconditional(model, 2, seed=3, top_k=8, progress=False)
    assert torch.equal(a, sample_unconditional(model, 2, seed=3, top_k=8, progress=False))
    assert not torch.equal(a, sample_unconditional(model, 2, seed=4, top_k=8, progress=False))
    with pytest.raises(InputError, match="temperature"):
        sample_unconditional(model, 1, temperature=0, progress=False)
    with pytest.raises(InputError, match="top_p"):
        sample_unconditional(model, 1, top_p=1.5, progress=False)
    with pytest.raises(InputError, match="block size"):
        sample_unconditional(model, 1, latent_shape=(8, 9), progress=False)


def _taming_sliding_window(model, cond: torch.Tensor, window: int, top_k: int) -> torch.Tensor:
    """taming's scripts/sample_conditional.py loop (window centred where possible), with taming's GPT forward."""
    b, h, w = cond.shape
    half = window // 2
    idx = torch.zeros_like(cond)
    for i in range(h):
        local_i = i if i <= half else (window - (h - i) if h - i < half else half)
        for j in range(w):
            local_j = j if j <= half else (window - (w - j) if w - j < half else half)
            i0, j0 = i - local_i, j - local_j
            patch = idx[:, i0:i0 + window, j0:j0 + window].reshape(b, -1)
            cpatch = cond[:, i0:i0 + window, j0:j0 + window].reshape(b, -1)
            logits, _ = model.transformer(torch.cat((cpatch, patch), dim=1)[:, :-1])
            logits = logits[:, -window * window:].reshape(b, window, window, -1)[:, local_i, local_j]
            probs = torch.softmax(model.top_k_logits(logits, top_k), dim=-1)
            idx[:, i, j] = torch.multinomial(probs, num_samples=1)[:, 0]
    return idx


def _cond_codes(model, labels: torch.Tensor) -> torch.Tensor:
    one_hot = torch.nn.functional.one_hot(labels, N_LABELS).permute(0, 3, 1, 2).float()
    _, _, (_, _, indices) = model.cond_stage_model.encode(one_hot)
    return indices.reshape(labels.shape[0], labels.shape[1] // 4, labels.shape[2] // 4)


def test_semantic_sliding_window_equals_taming_algorithm(semantic):
    labels = torch.randint(0, N_LABELS, (2, 40, 32))  # 10x8 codes, window 4x4
    with torch.no_grad():
        cond = _cond_codes(semantic, labels)
        torch.manual_seed(5)
        theirs = _taming_sliding_window(semantic, cond, 4, top_k=8)
    torch.manual_seed(5)
    ours = sample_semantic(semantic, labels, window=4, top_k=8, progress=False)
    assert ours.shape == (2, 10, 8) and torch.equal(ours, theirs)


def test_semantic_within_window_equals_taming_sample(semantic):
    labels = torch.randint(0, N_LABELS, (2, 16, 16))  # 4x4 codes: one KV-cached pass
    one_hot = torch.nn.functional.one_hot(labels, N_LABELS).permute(0, 3, 1, 2).float()
    cond = _cond_codes(semantic, labels).reshape(2, -1)
    torch.manual_seed(2)
    ours = sample_semantic(semantic, one_hot, window=4, top_k=8, progress=False)
    torch.manual_seed(2)
    theirs = semantic.sample(cond[:, :0], cond, steps=16, sample=True, top_k=8)
    assert torch.equal(ours.reshape(2, -1), theirs)
    with pytest.raises(InputError, match="label map"):
        sample_semantic(semantic, torch.zeros(1, 3, 16, 16), progress=False)


def test_decode_indices_with_and_without_fdm(uncond):
    indices = torch.randint(0, 16, (3, 8, 8))
    fdm_module = _fdm_for(uncond)
    adapter = fdm.find_adapter(uncond)
    with torch.no_grad():
        baseline = decode_indices(uncond, indices)
        corrected = decode_indices(uncond, indices, fdm_module)
        explicit = uncond.first_stage_model.decode(fdm_module(adapter.lookup(indices)))
        taming = uncond.decode_to_img(indices.reshape(3, -1), (3, 8, 8, 8))
    assert torch.equal(baseline, taming) and torch.equal(corrected, explicit)
    assert torch.equal(decode_indices(uncond.first_stage_model, indices), taming)


# --- command line and examples --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Tiny official-layout checkpoints + configs for the three tasks, and an FDM saved with save_pretrained."""
    root = tmp_path_factory.mktemp("taming")
    out, first_stage = {}, None
    for task, make in [("unconditional", unconditional_config), ("class", class_config),
                       ("semantic", semantic_config)]:
        model = random_model(make())
        if first_stage is None:
            first_stage = model.first_stage_model.state_dict()
        model.first_stage_model.load_state_dict(first_stage)  # one VQGAN under the three transformers
        out[f"{task}_config"] = write_config(make(), root / f"{task}-project.yaml")
        out[f"{task}_ckpt"] = save_lightning_ckpt(model.state_dict(), root / f"{task}.ckpt")
    _fdm_for(model).save_pretrained(root / "fdm")
    out["fdm"] = root / "fdm"
    labels = np.random.default_rng(0).integers(0, N_LABELS, (32, 48)).astype(np.uint8)
    Image.fromarray(labels).save(root / "labels.png")
    out["labels"] = root / "labels.png"
    return out


def _run_sample(argv: list[str]) -> int:
    from fdm.adapters.taming import command as sample

    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    return sample.run(parser.parse_args(argv))


@pytest.mark.parametrize("task,extra", [("unconditional", ["--num-samples", "3"]),
                                         ("class", ["--classes", "1", "7", "--per-class", "2"]),
                                         ("semantic", ["--window", "4"])])
def test_fdm_sample_command(tmp_path, saved, task, extra):
    if task == "semantic":
        extra = extra + ["--segmentation", str(saved["labels"])]
    common = [task, "--config", str(saved[f"{task}_config"]), "--checkpoint", str(saved[f"{task}_ckpt"]),
              "--top-k", "8", "--seed", "1", "--no-progress", "--device", "cpu", *extra]
    assert _run_sample([*common, "--fdm", str(saved["fdm"]), "--out", str(tmp_path / "fdm")]) == 0
    assert _run_sample([*common, "--no-fdm", "--out", str(tmp_path / "base")]) == 0
    with_fdm = np.asarray(Image.open(tmp_path / "fdm" / "grid.png"))
    without = np.asarray(Image.open(tmp_path / "base" / "grid.png"))
    assert with_fdm.shape == without.shape and not np.array_equal(with_fdm, without)
    count = {"unconditional": 3, "class": 4, "semantic": 1}[task]
    assert len(list((tmp_path / "fdm").glob("sample_*.png"))) == count
    if task == "semantic":
        assert Image.open(tmp_path / "fdm" / "sample_0000.png").size == (48, 32)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,task,extra", [
    ("ffhq_unconditional", "unconditional", ["--num-samples", "2"]),
    ("imagenet_class", "class", ["--classes", "0", "5"]),
    ("ade20k_semantic", "semantic", ["--window", "4"]),
])
def test_examples(tmp_path, saved, name, task, extra):
    if task == "semantic":
        extra = extra + ["--segmentation", str(saved["labels"])]
    path = _example(name).main(["--config", str(saved[f"{task}_config"]), "--checkpoint", str(saved[f"{task}_ckpt"]),
                                "--fdm", str(saved["fdm"]), "--top-k", "8", "--out", str(tmp_path), "--device", "cpu",
                                *extra])
    grid = np.asarray(Image.open(path))
    (columns, width), pad = ((3, 48) if task == "semantic" else (2, 32)), 4
    assert grid.shape[1] == columns * width + (columns + 1) * pad

    def cell(column: int) -> np.ndarray:
        x = pad + column * (width + pad)
        return grid[pad:pad + 32, x:x + width]

    assert not np.array_equal(cell(columns - 2), cell(columns - 1))  # with FDM differs from without


def test_label_maps_are_checked_before_they_are_read(tmp_path):
    from fdm.adapters.taming.command import read_label_maps
    from fdm.errors import InputError

    good = tmp_path / "good.npy"
    np.save(good, np.arange(16, dtype=np.float32).reshape(4, 4))  # whole numbers as floats are class ids
    assert torch.equal(read_label_maps([good])[0], torch.arange(16).reshape(4, 4))
    huge = tmp_path / "huge.npy"  # a header claiming 10**10 labels, no data: refused without allocating them
    with huge.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 100_000)})
    with pytest.raises(InputError, match="huge.npy"):
        read_label_maps([huge])
    for name, array, phrase in [("nan", np.array([[0.0, np.nan]]), "NaN, Inf or fractions"),
                                ("negative", np.array([[0, -3]]), "cannot be negative; got -3"),
                                ("complex", np.array([[1j, 0]]), "dtype complex128")]:
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(InputError, match=phrase):
            read_label_maps([tmp_path / f"{name}.npy"])
