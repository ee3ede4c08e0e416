"""`fdm eval --report DIR`: a self-contained HTML page of FDM's effect on every photo of an evaluation.

:func:`write_report` runs :func:`fdm.evaluation.evaluate_views` once and, as each batch comes, saves the first view
of every photo as PNG files: original | plain VQ | with FDM | where FDM is closer to the original (green) or farther
(magenta) | a nearest-neighbour zoom of the region where the two reconstructions differ most. Then it writes
``index.html`` (the run's settings, the summary table of the text output, a histogram of the per-view PSNR gains as
inline SVG, a table of the photos that sorts by a click on a header, the photos) and ``metrics.json`` (the settings,
the summary, each photo's mean over its views, each view). The page loads nothing from the network and runs no
script beyond the few lines that sort the table.

The report is built in a hidden folder beside ``DIR`` and moved into place once complete, so a failed run leaves
``DIR`` as it was. ``DIR`` may be new, empty, or a previous report (``index.html`` and a ``metrics.json`` written
here), which is then replaced as a whole; any other folder is refused (:func:`check_report_dir`).
"""

from __future__ import annotations

import html
import json
import math
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from fdm.dequantizer import Dequantizer
from fdm.errors import UsageError
from fdm.evaluation.comparison import Comparison, evaluate_views, mean_metrics
from fdm.evaluation.figures import error_change_map, outline, worst_region, zoom
from fdm.images import image_grid, to_pil

__all__ = ["REPORT_FORMAT", "check_report_dir", "summary_rows", "write_report"]

#: The ``format`` field of a report's metrics.json: what marks a folder as a previous report.
REPORT_FORMAT = "fdm-eval-report/1"
_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "stlpips": "ST-LPIPS"}
_DIGITS = {"psnr": 2, "ssim": 4, "stlpips": 4, "feature_ratio": 3}
_LOWER_IS_BETTER = {"stlpips", "feature_ratio"}
_TILES = (("original", "original"), ("vq", "plain VQ"), ("fdm", "with FDM"),
          ("change", "FDM closer (green) or farther (magenta); yellow: the zoomed region"),
          ("zoom", "enlarged (nearest neighbour) where the reconstructions differ most: original | plain VQ | "
                   "with FDM"))


def check_report_dir(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` if a report may be written there: a new folder, an empty one, or a
    previous report (replaced as a whole).

    Raises:
        UsageError: ``path`` is a file, or a folder that holds other things than a previous report.
    """
    path = Path(path)
    expected = "expected a new folder, an empty one or a previous report (index.html and metrics.json of fdm eval)"
    if path.exists() and not path.is_dir():
        raise UsageError(f"report folder {path} is a file; {expected}.")
    if path.is_dir() and any(path.iterdir()) and not _is_report(path):
        raise UsageError(f"report folder {path} is not empty and holds no previous report; {expected}.")
    return path


def _is_report(path: Path) -> bool:
    """Whether ``path`` holds index.html and a metrics.json of :data:`REPORT_FORMAT`."""
    try:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: a crafted, deeply nested file
        return False
    return (path / "index.html").is_file() and isinstance(metrics, dict) and metrics.get("format") == REPORT_FORMAT


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(setting, metric, without FDM, with FDM)`` text rows of a :func:`~fdm.evaluation.evaluate_views` report:
    the table `fdm eval` prints and the report page shows."""
    rows = []
    for setting, metrics in report["settings"].items():
        for name, value in metrics.items():
            if name == "feature_ratio":
                rows.append((setting, "feature error", f"{1.0:.3f}", f"{value:.3f}"))
            elif name == "psnr_continuous":
                rows.append((setting, "psnr decode(z)", f"{value:.4f}", "(bound)"))
            else:
                rows.append((setting, name, f"{value['vq']:.4f}", f"{value['fdm']:.4f}"))
    return rows


def write_report(
    directory: str | Path,
    dequantizer: Dequantizer,
    views: Dataset,
    *,
    run: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate ``views`` once (:func:`~fdm.evaluation.evaluate_views`) and write the HTML report to ``directory``.

    Args:
        directory: the report folder (see :func:`check_report_dir`); made with its parents.
        dequantizer: base model + FDM.
        views: the views; a photo's views are consecutive, ``views.views_per_image`` of them (1 without that
            attribute), e.g. :class:`fdm.training.ImageFolderViews`.
        run: the settings to show on the page and save in metrics.json (model, folder, crop...).
        **options: keyword arguments of :func:`~fdm.evaluation.evaluate_views` (``batch_size``, ``holes``...).

    Returns:
        The :func:`~fdm.evaluation.evaluate_views` report (means over all views, without the per-view records).

    Raises:
        UsageError: ``directory`` is refused by :func:`check_report_dir` or cannot be created.
    """
    target = check_report_dir(directory)
    created = next((p for p in reversed(target.absolute().parents) if not p.exists()), None)
    staging = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    try:
        try:
            staging.mkdir(parents=True)  # with the user's umask, unlike tempfile.mkdtemp (0700)
        except OSError as err:
            raise UsageError(f"report folder {target}: cannot write in {target.parent} "
                             f"({err.strerror or err}).") from err
        images = _PhotoImages(staging, getattr(views, "views_per_image", 1))
        report = evaluate_views(dequantizer, views, per_view=True, on_batch=images, **options)
        per_view = report.pop("per_view")
        photos = _photos(per_view, images.files)
        document = {"format": REPORT_FORMAT, "run": run or {}, "summary": report, "photos": photos, "views": per_view}
        (staging / "metrics.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
        (staging / "index.html").write_text(_page(run or {}, report, photos, per_view, images.display),
                                            encoding="utf-8")
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)  # only the folders made above, now empty
        raise
    return report


class _PhotoImages:
    """``on_batch`` callback of :func:`~fdm.evaluation.evaluate_views`: saves the first view of each photo, in the
    reconstruction setting, as PNG files in ``folder``; ``files[photo]`` maps a tile (:data:`_TILES`) to its name."""

    def __init__(self, folder: Path, views_per_image: int):
        self.folder, self.per_image = folder, views_per_image
        self.files: dict[int, dict[str, str]] = {}
        self.display = 0  # width in CSS pixels of a view tile on the page

    def __call__(self, setting: str, indices: range, result: Comparison) -> None:
        if setting != "reconstruction":
            return
        for b, index in enumerate(indices):
            if index % self.per_image == 0:
                self.files[index // self.per_image] = self._save(index // self.per_image, result, b)

    def _save(self, photo: int, result: Comparison, b: int) -> dict[str, str]:
        x, vq, fdm = result.x[b].cpu(), result.vq[b].cpu(), result.fdm[b].cpu()
        side = max(4, min(x.shape[-2:]) // 4)  # a quarter of the view, enlarged 4x or more (to >= 128 px)
        corner, enlarged = worst_region(vq, fdm, side), side * max(4, math.ceil(128 / side))
        tiles = {"original": to_pil(x), "vq": to_pil(vq), "fdm": to_pil(fdm),
                 "change": outline(error_change_map(x, vq, fdm), corner, side),
                 "zoom": image_grid([[zoom(t, corner, side, enlarged) for t in (x, vq, fdm)]])}
        self.display = max(self.display, x.shape[-1] * math.ceil(128 / x.shape[-1]))  # whole multiples: crisp
        files = {}
        for name, tile in tiles.items():
            files[name] = f"photo{photo:04d}-{name}.png"
            tile.save(self.folder / files[name])
        return files


def _photos(per_view: list[dict[str, Any]], files: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    """One record per photo: its name, view indices, the mean of its views' metrics per setting, its image files."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for view in per_view:
        groups.setdefault(view["image"], []).append(view)
    return [{"photo": photo, "name": views[0]["name"] or f"image {photo}", "views": [v["view"] for v in views],
             "settings": {s: mean_metrics([v["settings"][s] for v in views]) for s in views[0]["settings"]},
             "images": files.get(photo, {})} for photo, views in groups.items()]


def _publish(staging: Path, target: Path) -> None:
    """Move the finished report ``staging`` to ``target``, replacing an empty folder or a previous report there."""
    if not target.exists():
        staging.rename(target)
        return
    previous = target.parent / f".{target.name}.previous-{secrets.token_hex(4)}"
    target.rename(previous)
    try:
        staging.rename(target)
    except BaseException:
        previous.rename(target)
        raise
    shutil.rmtree(previous)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _gain(metrics: dict[str, Any], metric: str) -> float:
    return metrics[metric]["fdm"] - metrics[metric]["vq"]


def _tone(metric: str, change: float) -> str:
    """CSS class of a change of ``metric``: ``good``, ``bad`` or ``same``."""
    better = -change if metric in _LOWER_IS_BETTER else change
    return "good" if better > 0 else "bad" if better < 0 else "same"


def _columns(settings: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """The photo table's metric columns: ``(title, setting, metric, part)``, part ``vq``, ``fdm``, ``gain`` or
    ``value`` (the feature ratio); the inpainting setting shows gains only."""
    columns = []
    for setting, metrics in settings.items():
        prefix, parts = ("", ("vq", "fdm", "gain")) if setting == "reconstruction" else ("inpainting ", ("gain",))
        for metric in ("psnr", "ssim", "stlpips"):
            if metric in metrics:
                titles = {"vq": "VQ", "fdm": "FDM", "gain": "gain" if metric not in _LOWER_IS_BETTER else "change"}
                columns += [(f"{prefix}{_LABELS[metric]} {titles[p]}", setting, metric, p) for p in parts]
        columns.append((f"{prefix}feature ratio", setting, "feature_ratio", "value"))
    return columns


def _cell(metrics: dict[str, Any], metric: str, part: str) -> str:
    """A ``<td>`` of the photo table, its exact value in ``data-v`` (what the sort reads)."""
    digits = _DIGITS[metric]
    if part == "value":
        value, text, tone = metrics[metric], f"{metrics[metric]:.{digits}f}", _tone(metric, metrics[metric] - 1)
    elif part == "gain":
        value = _gain(metrics, metric)
        text, tone = f"{value:+.{digits}f}", _tone(metric, value)
    else:
        value, text, tone = metrics[metric][part], f"{metrics[metric][part]:.{digits}f}", ""
    return f'<td data-v="{value!r}" class="num {tone}">{text}</td>'


def _round_step(span: float, parts: int) -> float:
    """A round step (1, 2 or 5 times a power of ten) that cuts ``span`` into about ``parts`` pieces."""
    raw = span / parts
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def _histogram(gains: Sequence[float], title: str) -> str:
    """Inline SVG histogram of PSNR gains (dB): bins with an edge at 0, green above it, magenta below."""
    width, height, left, bottom, top = 420, 220, 40, 36, 26
    lo, hi = min(min(gains), 0.0), max(max(gains), 0.0)
    span = max(hi - lo, 0.1)
    step = _round_step(span, min(40, max(8, math.ceil(math.sqrt(len(gains))))))  # bin width
    first, last = math.floor(lo / step + 1e-9), max(math.ceil(hi / step - 1e-9), math.floor(lo / step + 1e-9) + 1)
    lo, hi = first * step, last * step
    counts = [0] * (last - first)
    for g in gains:
        counts[min(len(counts) - 1, max(0, math.floor((g - lo) / step + 1e-9)))] += 1
    plot_w, plot_h = width - left - 24, height - top - bottom
    base = top + plot_h
    x_of = lambda v: left + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}"><text x="{left}" y="16" class="t">{_e(title)}</text>']
    for i, count in enumerate(counts):
        x0, h = x_of(lo + i * step), plot_h * count / max(counts)
        colour = "#1a9641" if lo + (i + 0.5) * step > 0 else "#c0379c"
        parts.append(f'<rect x="{x0:.1f}" y="{base - h:.1f}" width="{max(x_of(lo + step) - x_of(lo) - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="{colour}"><title>{count} views</title></rect>')
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#444"/>'
                 f'<line x1="{x_of(0):.1f}" y1="{top}" x2="{x_of(0):.1f}" y2="{base}" stroke="#444" '
                 f'stroke-dasharray="4 3"/>')
    tick = _round_step(hi - lo, 5)
    decimals = max(0, -math.floor(math.log10(tick) + 1e-9))
    for k in range(math.ceil(lo / tick - 1e-9), math.floor(hi / tick + 1e-9) + 1):
        label = f"{k * tick:+.{decimals}f}" if k else "0"
        parts.append(f'<text x="{x_of(k * tick):.1f}" y="{base + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{max(counts)}</text>'
                 f'<text x="{left - 6}" y="{base}" text-anchor="end">0</text>'
                 f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">PSNR gain with FDM (dB)</text>'
                 "</svg>")
    return "".join(parts)


def _metrics_line(setting: str, metrics: dict[str, Any]) -> str:
    """One photo's metrics in a setting, as a line of HTML."""
    items = []
    for metric in ("psnr", "ssim", "stlpips"):
        if metric in metrics:
            d, change = _DIGITS[metric], _gain(metrics, metric)
            items.append(f'{_LABELS[metric]} {metrics[metric]["vq"]:.{d}f} &rarr; {metrics[metric]["fdm"]:.{d}f} '
                         f'(<span class="{_tone(metric, change)}">{change:+.{d}f}</span>)')
    items.append(f'feature error ratio {metrics["feature_ratio"]:.3f}')
    return f"<p><b>{_e(setting)}</b>: " + " &middot; ".join(items) + "</p>"


def _photo_section(photo: dict[str, Any], display: int) -> str:
    """One photo's section: its name, its metrics per setting, its tiles (views shown ``display`` pixels wide)."""
    size = f'width="{display}" height="{display}" '
    figures = "".join(
        f'<figure><img src="{_e(photo["images"][name])}" alt="{_e(caption)}" loading="lazy" '
        f'{"" if name == "zoom" else size}class="{name}"><figcaption>{_e(caption)}</figcaption></figure>'
        for name, caption in _TILES if name in photo["images"])
    lines = "".join(_metrics_line(s, m) for s, m in photo["settings"].items())
    views = len(photo["views"])
    return (f'<section id="photo-{photo["photo"]}"><h3>{_e(photo["name"])}</h3>{lines}'
            f'<p class="note">mean of {views} view{"s" if views > 1 else ""}; images: its first view</p>'
            f'<div class="tiles">{figures}</div></section>')


def _page(run: dict[str, Any], report: dict[str, Any], photos: list[dict[str, Any]],
          per_view: list[dict[str, Any]], display: int) -> str:
    """The whole index.html."""
    settings_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e('none' if v is None else v)}</td></tr>"
                            for k, v in run.items())
    summary = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in summary_rows(report))
    notes = "".join(f'<p class="note">note: {_e(n)}</p>' for n in report["notes"])
    histograms = "".join(
        _histogram([_gain(v["settings"][s], "psnr") for v in per_view], f"{s}: {len(per_view)} views")
        for s in report["settings"])
    columns = _columns(photos[0]["settings"])
    default = next(i for i, c in enumerate(columns) if c[1:] == ("reconstruction", "psnr", "gain")) + 1
    ordered = sorted(photos, key=lambda p: -_gain(p["settings"]["reconstruction"], "psnr"))
    head = '<th data-col="0">photo</th>' + "".join(
        f'<th data-col="{i + 1}"{" aria-sort=descending" if i + 1 == default else ""}>{_e(c[0])}</th>'
        for i, c in enumerate(columns))
    body = "".join(
        f'<tr><td data-v="{_e(p["name"])}"><a href="#photo-{p["photo"]}">{_e(p["name"])}</a></td>'
        + "".join(_cell(p["settings"][s], m, part) for _, s, m, part in columns) + "</tr>" for p in ordered)
    sections = "".join(_photo_section(p, display) for p in photos)
    title = f"fdm eval report: {run.get('folder', f'{len(photos)} photos')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>{_CSS}</style></head>
<body><h1>{_e(title)}</h1>
<p>Reconstruction of {report["views"]} views of {len(photos)} photos by the base VQ model, without and with FDM.
Green: FDM is better; magenta: worse.</p>
<div class="row"><div><h2>Settings</h2><table class="run">{settings_rows}</table></div>
<div><h2>Summary</h2><table><thead><tr><th>setting</th><th>metric</th><th>without FDM</th><th>with FDM</th></tr>
</thead><tbody>{summary}</tbody></table>{notes}
<h2>PSNR gain per view</h2>{histograms}</div></div>
<h2>Photos</h2><p class="note">Mean over each photo's views. Click a header to sort.</p>
<div class="wide"><table id="photos"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>
<h2>Each photo</h2>{sections}
<script>{_SORT}</script></body></html>
"""


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.run th{background:#f4f4f4}
#photos th{cursor:pointer;background:#f4f4f4}#photos th[aria-sort=descending]::after{content:" \\25BC"}
#photos th[aria-sort=ascending]::after{content:" \\25B2"}.wide{overflow-x:auto}
.good{color:#1a7f37}.bad{color:#b0208c}.note{color:#666}section{margin:1.5em 0;border-top:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:0 2.5em}.row .note{max-width:26em}.tiles{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:16em}img{image-rendering:pixelated;height:auto}
svg text{font-size:12px}svg text.t{font-weight:bold}"""

_SORT = """for (const th of document.querySelectorAll("#photos th")) th.addEventListener("click", () => {
  const col = Number(th.dataset.col), down = th.getAttribute("aria-sort") !== "descending";
  for (const other of th.parentNode.children) other.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", down ? "descending" : "ascending");
  const key = row => { const v = row.cells[col].dataset.v; return col ? Number(v) : v.toLowerCase(); };
  const order = (a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (down ? -1 : 1);
  const body = th.closest("table").tBodies[0];
  body.append(...[...body.rows].sort(order));
});"""

