"""examples/train_demo_model.py (baselines, control) and benchmarks/quality.py run end to end on tiny budgets and
write what docs/quality.md reads: VQGAN folders that change only what each method trains, and one table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("taming")

from fdm.adapters.taming import load_model  # noqa: E402
from fdm.demo.model import load_demo_vqgan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
pytestmark = pytest.mark.skipif(not (PHOTOS / "train").is_dir(), reason="needs ../shared/data/photos")

COMMANDS = ("decoder-baseline", "codebook-baseline", "decoder-control")


@pytest.fixture(autouse=True, scope="module")
def _keep_threads():
    """Both scripts set torch's thread count (``--threads``); the rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _script(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> dict[str, Path]:
    """Each baseline trained for 2 steps on 16 views, as the script's CLI does it."""
    train = _script("examples/train_demo_model.py")
    out = tmp_path_factory.mktemp("baselines")
    folders = {}
    for command in COMMANDS:
        folders[command] = out / command
        train.main([command, "--steps", "2", "--views", "16", "--batch", "4", "--threads", "1",
                    "--out", str(folders[command])])
    return folders


def _tensors(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_baselines_train_only_what_they_claim(baselines):
    demo = load_demo_vqgan()
    for command, folder in baselines.items():
        model = load_model(folder / "vqgan.yaml", folder / "vqgan.safetensors")
        for name, value in _tensors(demo, "encoder.").items():  # the encoder is frozen in every baseline
            assert torch.equal(model.state_dict()[name], value), (command, name)
        decoder = _tensors(model, "decoder.")
        assert any(not torch.equal(v, demo.state_dict()[k]) for k, v in decoder.items()), command
        codes = model.quantize.embedding.weight
        if command == "codebook-baseline":
            assert codes.shape == (2 * demo.quantize.n_e, demo.quantize.e_dim)
        else:
            assert torch.equal(codes, demo.quantize.embedding.weight), command


def test_quality_benchmark_table(baselines, tmp_path, capsys):
    quality = _script("benchmarks/quality.py")
    report = tmp_path / "quality.json"
    rc = quality.main([str(PHOTOS / "val"), "--views-per-image", "1", "--no-extras", "--no-progress", "--threads", "1",
                       "--decoder-baseline", str(baselines["decoder-baseline"]),
                       "--codebook-baseline", str(baselines["codebook-baseline"]),
                       "--decoder-control", str(baselines["decoder-control"]),
                       "--fdm-variant", f"again={ROOT / 'fdm' / 'demo' / 'assets' / 'fdm'}",
                       "--json", str(report)])
    assert rc == 0
    rows = {row["method"]: row for row in json.loads(report.read_text())["rows"]}
    assert list(rows) == ["VQGAN (plain)", "VQGAN + FDM (shipped)", "VQGAN + FDM (again)", "decoder fine-tuned on z_q",
                          "codebook doubled", "decoder fine-tuned on z (control)", "decoding z unquantized"]
    plain, shipped = rows["VQGAN (plain)"], rows["VQGAN + FDM (shipped)"]
    assert plain["psnr_gain"] == 0 and plain["feature_ratio"] == 1.0
    assert rows["VQGAN + FDM (again)"]["psnr"] == pytest.approx(shipped["psnr"])  # same FDM, same views
    assert 0 < shipped["feature_ratio"] < 1 and shipped["added_params"] > 0
    assert rows["codebook doubled"]["added_params"] == load_demo_vqgan().quantize.embedding.weight.numel()
    for name in ("decoder fine-tuned on z_q", "codebook doubled", "decoder fine-tuned on z (control)"):
        assert rows[name]["feature_ratio"] is None  # not comparable across codebooks and decoders
    assert rows["decoding z unquantized"]["psnr"] > plain["psnr"]
    table = capsys.readouterr().out
    assert "decoder fine-tuned on z (control)" in table and "8 views" in table
