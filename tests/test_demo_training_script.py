"""examples/train_demo_model.py (stage 1b, phase 2 and the three phase-3 runs) and the benchmarks of docs/quality.md
(quality.py, detail_by_image.py) run end to end on tiny budgets and write what docs/quality.md reads: FDM folders that
change only what each run trains, and the tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("taming")
pytest.importorskip("stlpips_pytorch")  # the phase-3 runs use its shift-tolerant VGG16

from fdm import FDM  # noqa: E402
from fdm.demo.model import load_demo_vqgan  # noqa: E402
from fdm.io.decoder_weights import DECODER_WEIGHTS_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
pytestmark = [pytest.mark.skipif(not (PHOTOS / "train").is_dir(), reason="needs ../shared/data/photos"),
              pytest.mark.slow]  # four training runs and the benchmark: about 30 s on 2 cores

PHASE3 = ("fdm-addon", "fdm-joint", "decoder-only")


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
def runs(tmp_path_factory) -> dict[str, Path]:
    """Phase 2 (a small FDM), then each phase-3 run, for 2 steps on 8 views, as the script's CLI does it."""
    train = _script("examples/train_demo_model.py")
    out = tmp_path_factory.mktemp("runs")
    common = ["--steps", "2", "--views", "8", "--threads", "1"]
    train.main(["fdm", *common, "--batch", "4", "--hidden", "32", "--blocks", "2", "--out", str(out / "fdm-phase2")])
    for command in PHASE3:
        train.main([command, *common, "--batch", "2", "--fdm-dir", str(out / "fdm-phase2"), "--out",
                    str(out / command), "--work", str(out / "work")])
    return {"fdm-phase2": out / "fdm-phase2"} | {command: out / command for command in PHASE3}


def test_decoder_stage_trains_only_the_decoder_and_resumes(tmp_path):
    """Stage 1b changes the decoder alone (so a stage-2 FDM stays valid: same z, z_q and codebook fingerprint), and a
    run resumed from its checkpoint ends with the same weights as an uninterrupted one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fdm.demo.model import ASSETS

    train = _script("examples/train_demo_model.py")
    common = ["--vqgan-dir", str(ASSETS), "--steps", "3", "--batch", "2", "--crop", "32", "--threads", "1"]
    train.main(["vqgan-decoder", *common, "--out", str(tmp_path / "straight"), "--checkpoint-every", "0",
                "--checkpoint-dir", str(tmp_path / "none")])
    resumed = ["vqgan-decoder", *common, "--out", str(tmp_path / "resumed"), "--checkpoint-every", "2",
               "--checkpoint-dir", str(tmp_path / "checkpoints")]
    train.main(resumed)  # writes the step-2 checkpoint on the way
    (tmp_path / "resumed" / "vqgan.safetensors").unlink()
    train.main(resumed)  # starts from step 2
    shipped = load_file(str(ASSETS / "vqgan.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "vqgan.safetensors"))
    assert sorted(straight) == sorted(shipped)
    for key, value in shipped.items():
        assert torch.equal(straight[key], value) != key.startswith(("decoder.", "post_quant_conv.")), key
    resumed_weights = load_file(str(tmp_path / "resumed" / "vqgan.safetensors"))
    assert all(torch.equal(resumed_weights[key], value) for key, value in straight.items())
    with safe_open(str(tmp_path / "straight" / "vqgan.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["decoder_steps"] == "3" and meta["script"] == "examples/train_demo_model.py vqgan"


def test_decoder_stage_keeps_a_non_default_codebook(tmp_path):
    """Stage 1 with another codebook size (``--n-embed``, ``--embed-dim``), then stage 1b on it: the result keeps
    that codebook and loads through the library's taming loader."""
    from fdm.adapters.taming import load_model

    train = _script("examples/train_demo_model.py")
    tiny = ["--steps", "2", "--batch", "2", "--crop", "16", "--threads", "1", "--checkpoint-every", "0"]
    train.main(["vqgan", *tiny, "--warm-crop", "16", "--n-embed", "32", "--embed-dim", "8",
                "--out", str(tmp_path / "stage1"), "--checkpoint-dir", str(tmp_path / "none")])
    train.main(["vqgan-decoder", *tiny, "--vqgan-dir", str(tmp_path / "stage1"), "--out", str(tmp_path / "stage1b"),
                "--checkpoint-dir", str(tmp_path / "none")])
    model = load_model(tmp_path / "stage1b" / "vqgan.yaml", tmp_path / "stage1b" / "vqgan.safetensors")
    assert tuple(model.quantize.embedding.weight.shape) == (32, 8)


def test_decoder_stage_refuses_a_file_without_a_codebook(tmp_path):
    """Stage 1b names the missing codebook of a tampered stage-1 file and saves nothing."""
    from safetensors.torch import load_file, save_file

    from fdm.demo.model import ASSETS

    weights = load_file(str(ASSETS / "vqgan.safetensors"))
    del weights["quantize.embedding.weight"]
    (tmp_path / "tampered").mkdir()
    save_file(weights, str(tmp_path / "tampered" / "vqgan.safetensors"))
    train = _script("examples/train_demo_model.py")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        train.main(["vqgan-decoder", "--vqgan-dir", str(tmp_path / "tampered"), "--out", str(tmp_path / "out"),
                    "--steps", "1", "--threads", "1", "--checkpoint-every", "0", "--checkpoint-dir", str(tmp_path / "none")])
    assert not (tmp_path / "out").exists()


def test_phase3_runs_train_only_what_they_claim(runs):
    phase2 = FDM.from_pretrained(runs["fdm-phase2"])
    demo = load_demo_vqgan()
    decoder = {k: v for k, v in demo.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    for command in PHASE3:
        module = FDM.from_pretrained(runs[command])
        trains_decoder = command != "fdm-addon"
        assert (runs[command] / DECODER_WEIGHTS_NAME).is_file() == trains_decoder, command
        assert module.training_info["phase3"]["backbone"] == "st-vgg16"
        assert module.training_info["phase3"]["seconds"] > 0
        if trains_decoder:
            assert set(module.decoder_state) == set(decoder)
            assert any(not torch.equal(module.decoder_state[k], v) for k, v in decoder.items()), command
        if command == "decoder-only":  # an identity FDM, never trained
            z = torch.randn(1, module.channels, 4, 4)
            assert torch.equal(module(z), z)
        else:
            assert any(not torch.equal(a, b) for a, b in zip(module.state_dict().values(),
                                                               phase2.state_dict().values())), command


def test_quality_benchmark_table(runs, tmp_path, capsys):
    quality = _script("benchmarks/quality.py")
    report = tmp_path / "quality.json"
    rc = quality.main([str(PHOTOS / "val"), "--crop", "64", "--views-per-image", "1", "--timing-repeats", "1",
                       "--no-extras", "--no-progress", "--threads", "1",
                       "--phase2", str(runs["fdm-phase2"]), "--addon", str(runs["fdm-addon"]),
                       "--joint", str(runs["fdm-joint"]), "--decoder-only", str(runs["decoder-only"]),
                       "--json", str(report)])
    assert rc == 0
    rows = {row["method"]: row for row in json.loads(report.read_text())["rows"]}
    assert list(rows) == ["plain VQ", "phase-2 FDM", "add-on FDM", "FDM + decoder (paper)",
                          "decoder-only fine-tuning", "decode(z), the bound"]
    plain = rows["plain VQ"]
    assert plain["psnr_gain"] == 0 and plain["feature_ratio"] == 1.0 and plain["time_ratio"] == 1.0
    for name, run in (("phase-2 FDM", "fdm-phase2"), ("add-on FDM", "fdm-addon"), ("FDM + decoder (paper)", "fdm-joint")):
        module = FDM.from_pretrained(runs[run])
        assert rows[name]["added_params"] == sum(p.numel() for p in module.parameters())
        assert 0 < rows[name]["feature_ratio"] < 1.5 and rows[name]["time_ratio"] > 0 and rows[name]["train_s"] > 0
    assert rows["decoder-only fine-tuning"]["added_params"] == 0
    assert rows["decode(z), the bound"]["psnr"] > plain["psnr"]
    table = capsys.readouterr().out
    assert "decoder-only fine-tuning" in table and "8 views" in table


def test_detail_by_image_table(tmp_path, capsys):
    detail = _script("benchmarks/detail_by_image.py")
    report = tmp_path / "detail.json"
    assert detail.main([str(PHOTOS / "val"), "--sizes", "64", "--native", "64", "--threads", "1",
                        "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    photos = sorted(p.name for p in (PHOTOS / "val").iterdir())
    views = {(row["image"], row["view"]) for row in result["rows"]}
    assert views == ({(f"demo: {name}", "as shipped") for name in ("astronaut", "coffee", "chelsea")}
                     | {(name, view) for name in photos for view in ("whole, 64 px", "native, 64 px")})
    for row in result["rows"]:
        assert 10 < row["psnr_vq"] < 45 and 10 < row["psnr_fdm"] < 45 and 0 < row["stlpips_vq"] < 1
    worse = {row["image"] for row in result["rows"]} - {
        row["image"] for row in result["rows"] if row["stlpips_fdm"] <= row["stlpips_vq"]}
    assert sorted(worse) == result["worse_at_every_view"]
    assert "same way at every view" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        detail.main([str(PHOTOS / "val"), "--sizes", "63"])
