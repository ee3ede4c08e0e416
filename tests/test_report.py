"""`fdm eval --report DIR` (fdm/evaluation/report.py): metrics.json agrees with evaluate_views, the page is self-contained and
works in headless Chromium (tests/chromium.py: images load, no console errors, the table sorts on a click, the
screenshot is not blank), and the report folder is refused, replaced or left alone as documented."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Subset

from chromium import Browser, find_chromium
from fdm import Dequantizer
from fdm.cli import main
from fdm.demo.model import ASSETS, load_demo_fdm, load_demo_vqgan
from fdm.demo.run import SAMPLE_IMAGES
from fdm.errors import MissingExtraError
from fdm.evaluation.comparison import evaluate_views
from fdm.evaluation.report import REPORT_FORMAT, write_report
from fdm.training.data import ImageFolderViews

pytest.importorskip("taming")

CROP, VIEWS_PER_IMAGE = 32, 2
EVAL = ["--crop", str(CROP), "--views-per-image", str(VIEWS_PER_IMAGE), "--batch-size", "4", "--no-extras",
        "--no-progress"]


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["eval", *argv])
    return code, out.getvalue(), err.getvalue()


def _photos(folder: Path) -> Path:
    folder.mkdir()
    for name in SAMPLE_IMAGES:
        shutil.copy(ASSETS / f"{name}.png", folder / f"{name}.png")
    return folder


def _assert_one_line_error(code: int, out: str, err: str, *phrases: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err + out, err
    assert lines[0].startswith("fdm eval: error: ") and all(p in lines[0] for p in phrases), lines[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report of the demo model on the three sample photos, with holes: (images folder, report folder, the
    JSON that the command printed)."""
    root = tmp_path_factory.mktemp("report")
    images = _photos(root / "images")
    code, out, err = _run(str(images), "--holes", "--json", "--report", str(root / "out" / "report"), *EVAL)
    assert code == 0, err
    return images, root / "out" / "report", json.loads(out)


def test_metrics_json_matches_evaluate_views(report):
    images, folder, printed = report
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["format"] == REPORT_FORMAT and "per_view" not in printed
    assert metrics["summary"]["settings"] == printed["settings"]  # the numbers the command printed
    assert set(printed["settings"]) == {"reconstruction", "inpainting (oracle)"}
    assert metrics["run"]["crop"] == CROP and metrics["run"]["model"] == "demo" and metrics["run"]["holes"] is True
    assert [p["name"] for p in metrics["photos"]] == sorted(f"{n}.png" for n in SAMPLE_IMAGES)
    assert [v["view"] for v in metrics["views"]] == list(range(len(SAMPLE_IMAGES) * VIEWS_PER_IMAGE))
    views = ImageFolderViews(images, crop_size=CROP, views_per_image=VIEWS_PER_IMAGE, scale_range=(1.0, 2.0))
    deq = Dequantizer(load_demo_vqgan(), load_demo_fdm())
    for photo in metrics["photos"]:
        assert photo["views"] == [VIEWS_PER_IMAGE * photo["photo"] + k for k in range(VIEWS_PER_IMAGE)]
        assert set(photo["settings"]) == {"reconstruction", "inpainting (oracle)"}
        alone = evaluate_views(deq, Subset(views, photo["views"]), extras=False, progress=False)
        expected, got = alone["settings"]["reconstruction"], photo["settings"]["reconstruction"]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float)
                                else {k: pytest.approx(v, abs=1e-4) for k, v in value.items()}), key
        assert sorted(photo["images"]) == ["change", "fdm", "original", "vq", "zoom"]
        with Image.open(folder / photo["images"]["vq"]) as tile:
            assert tile.size == (CROP, CROP)
    # the summary is the mean of the photos (each has the same number of views)
    for setting, summary in printed["settings"].items():
        mean = np.mean([p["settings"][setting]["psnr"]["fdm"] for p in metrics["photos"]])
        assert summary["psnr"]["fdm"] == pytest.approx(mean, abs=1e-4)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]


def test_page_is_self_contained(report):
    _, folder, _ = report
    parser = _Links()
    parser.feed((folder / "index.html").read_text())
    files = [link for link in parser.links if not link.startswith(("#", "data:"))]
    assert files and all("://" not in f and not f.startswith("/") and (folder / f).is_file() for f in files), files
    assert sorted(files) == sorted(p.name for p in folder.glob("*.png"))  # every PNG shown, nothing else linked
    assert not [a for tag, a in parser.tags if tag == "script" and "src" in a or tag == "link" and a["rel"] != "icon"]


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.skip("no chromium binary on PATH: apt-get install chromium (.ci/run installs it)")
    with Browser() as b:
        yield b


def test_console_errors_are_seen(browser, tmp_path):
    """The harness itself: a missing image and a console.error are reported (else 'no errors' proves nothing)."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><img src="missing.png"><script>console.error("boom")</script>')
    browser.open(page.as_uri())
    errors = browser.console_errors()
    assert any("boom" in e for e in errors) and any("missing.png" in e for e in errors), errors


def _column(browser, index: int) -> list:
    return browser.evaluate(f"[...document.querySelectorAll('#photos tbody tr')].map(r => r.cells[{index}].dataset.v)")


def test_report_in_chromium(report, browser):
    _, folder, _ = report
    browser.open((folder / "index.html").as_uri(), width=1280, height=900)
    # every image loads (lazy ones once scrolled to)
    images = browser.evaluate("""(async () => {
        for (const img of document.images) {
            img.scrollIntoView();
            if (!img.complete) await new Promise(done => { img.onload = img.onerror = done; setTimeout(done, 5000); });
        }
        window.scrollTo(0, 0);
        return [...document.images].map(img => [img.getAttribute("src"), img.complete, img.naturalWidth]);
    })()""")
    assert len(images) == 5 * len(SAMPLE_IMAGES)
    assert all(complete and width > 0 for _, complete, width in images), images
    assert browser.evaluate("document.querySelectorAll('svg rect').length") > 0  # the histograms
    # the table starts sorted by PSNR gain, descending; a click on a header sorts by that column, again: reversed
    headers = browser.evaluate("[...document.querySelectorAll('#photos th')].map(th => th.textContent)")
    gain, plain = headers.index("PSNR gain"), headers.index("PSNR VQ")
    assert browser.evaluate("document.querySelector('#photos th[aria-sort]').textContent") == "PSNR gain"
    before = [float(v) for v in _column(browser, gain)]
    assert before == sorted(before, reverse=True)
    names = _column(browser, 0)
    browser.click(f"#photos th:nth-child({plain + 1})")
    down = [float(v) for v in _column(browser, plain)]
    browser.click(f"#photos th:nth-child({plain + 1})")
    up = [float(v) for v in _column(browser, plain)]
    assert down == sorted(down, reverse=True) and up == sorted(up) and up != down
    browser.click("#photos th:nth-child(1)")
    assert _column(browser, 0) == sorted(names, key=str.lower, reverse=True)
    assert browser.console_errors() == []
    with Image.open(io.BytesIO(browser.screenshot())) as shot:
        pixels = np.asarray(shot.convert("L"), dtype=np.float64)
    assert pixels.shape == (900, 1280) and pixels.std() > 20, pixels.std()  # text, tables and photos, not blank


def test_stlpips_per_photo(tmp_path, monkeypatch):
    """With the eval extra, each photo shows its ST-LPIPS (FID, over the whole set only, left out here: slow)."""
    pytest.importorskip("stlpips_pytorch")

    def no_fid(device):
        raise MissingExtraError("FID left out by this test")

    monkeypatch.setattr("fdm.evaluation.comparison.load_fid", no_fid)
    views = ImageFolderViews(_photos(tmp_path / "images"), crop_size=CROP, views_per_image=1)
    deq = Dequantizer(load_demo_vqgan(), load_demo_fdm())
    summary = write_report(tmp_path / "report", deq, views, run={"model": "demo"}, progress=False)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(summary["settings"]["reconstruction"]["stlpips"]) == {"vq", "fdm"}
    assert all(0 < p["settings"]["reconstruction"]["stlpips"]["fdm"] < 1 for p in metrics["photos"])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "ST-LPIPS VQ" in page and "FID left out by this test" in page  # the note of the summary


def test_refuses_a_folder_that_is_no_report(tmp_path):
    images = _photos(tmp_path / "images")
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    _assert_one_line_error(*_run(str(images), "--report", str(target), *EVAL), str(target), "not empty")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    _assert_one_line_error(*_run(str(images), "--report", str(tmp_path / "file"), *EVAL), "is a file")
    _assert_one_line_error(*_run(str(images), "--report", str(images / "report"), *EVAL), "inside the image folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "images", "mine"]


def test_replaces_a_previous_report_and_a_failure_leaves_it(tmp_path):
    images = _photos(tmp_path / "images")
    target = tmp_path / "report"
    target.mkdir()  # an empty folder is accepted
    assert _run(str(images), "--report", str(target), *EVAL)[0] == 0
    # again, with the demo model named as any taming model is, and one view per photo
    taming = ["--model", "taming", "--config", str(ASSETS / "vqgan.yaml"), "--checkpoint",
              str(ASSETS / "vqgan.safetensors"), "--fdm", str(ASSETS / "fdm")]
    assert _run(str(images), "--report", str(target), *taming, *EVAL[:2], "--views-per-image", "1", *EVAL[4:])[0] == 0
    metrics = json.loads((target / "metrics.json").read_text())
    assert metrics["summary"]["views"] == len(SAMPLE_IMAGES)  # the second run's
    assert metrics["run"]["model"] == "taming" and metrics["run"]["fdm"] == str(ASSETS / "fdm")
    assert len(list(target.glob("*.png"))) == 5 * len(SAMPLE_IMAGES)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    (images / "zz-broken.png").write_bytes(b"not a png")  # read last, after the other photos' PNGs were written
    code, out, err = _run(str(images), "--report", str(target), *EVAL)
    assert code == 2 and "zz-broken.png" in err.splitlines()[-1] and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the previous report, untouched
    code, _, err = _run(str(images), "--report", str(tmp_path / "new" / "sub" / "report"), *EVAL)
    assert code == 2 and not (tmp_path / "new").exists(), err  # no half-written report, no folders made for it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "report"]  # no hidden partial folder either
