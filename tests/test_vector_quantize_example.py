"""examples/vector_quantize_vqvae.py runs end to end on a tiny budget: it trains the VQ-VAE and its FDM, writes the
model (safetensors + sizes), the FDM and the metrics, and prints the held-out table; the saved VQ-VAE rebuilds from
its sizes and loads back, and the FDM belongs to it (codebook fingerprint)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_training_data import write_images

import fdm

pytest.importorskip("vector_quantize_pytorch")
from fdm.adapters.vector_quantize import load_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _example():
    path = ROOT / "examples" / "vector_quantize_vqvae.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    """The example sets torch's thread count (``--threads``); the rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("levels", [1, 2])  # a VectorQuantize, a ResidualVQ
def test_the_example_trains_saves_and_measures(tmp_path, capsys, levels):
    train = write_images(tmp_path / "train", [(48, 64), (64, 48), (56, 56), (40, 72)])
    heldout = write_images(tmp_path / "heldout", [(48, 48), (40, 56)], seed=1)
    out = tmp_path / "run"
    record = _example().main([
        "--out", str(out), "--train", str(train), "--heldout", str(heldout), "--vq-minutes", "0.002",
        "--fdm-minutes", "0.002", "--crop", "16", "--crops-per-image", "2", "--batch", "4", "--width", "16",
        "--fdm-hidden", "16", "--fdm-blocks", "1", "--eval-crop", "16", "--eval-views", "1", "--no-extras",
        "--no-progress", "--levels", str(levels),
    ])
    table = capsys.readouterr().out
    assert "| heldout | 2 |" in table and "feature error ratio" in table
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(record))
    assert record["vqvae"]["steps"] >= 1 and record["fdm"]["steps"] >= 1
    sizes = json.loads((out / "vqvae.json").read_text())
    model = load_weights(_example().build_vqvae(**sizes), out / "vqvae.safetensors")
    module = fdm.FDM.from_pretrained(out / "fdm")
    assert module.base_model_fingerprint == fdm.find_adapter(model).fingerprint()
    with torch.no_grad():
        image = fdm.Dequantizer(model, module).reconstruct(torch.zeros(1, 3, 16, 16))
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
