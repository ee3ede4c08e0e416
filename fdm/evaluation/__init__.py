"""Measuring an FDM: :mod:`fdm.evaluation.comparison` (reconstruction without and with FDM, averaged over images),
:mod:`fdm.evaluation.metrics` (PSNR, SSIM, feature error ratio, FID, ST-LPIPS), :mod:`fdm.evaluation.report`
(``fdm eval --report``'s HTML page) and :mod:`fdm.evaluation.figures` (the labelled comparison figures of the
report and of ``fdm demo``)."""

from fdm.evaluation.comparison import Comparison, compare, evaluate_views, mean_metrics, measured_image

__all__ = ["Comparison", "compare", "evaluate_views", "mean_metrics", "measured_image"]
