"""ROC figures: TAR against FAR on a log FAR axis, the quoted FARs a set resolves marked.

The numbers come from :func:`fr_dist.eval.verification.roc_points` (one home for the ROC math); this
module only draws them and writes them. :func:`write_roc` puts a set's curve points in
``<dir>/<set>_roc.json`` and its figure beside it (``<set>_roc.png``); :func:`plot_roc` draws one
figure from any number of such JSON files' contents again (regenerate a figure, overlay several runs:
``plot_roc([json.loads(p.read_text()) for p in paths], "roc.png")``).

matplotlib is not a dependency of fr_dist: it is imported here, when a figure is drawn, and its
absence is an ImportError that says ``pip install matplotlib``. The figure is drawn on matplotlib's
``Figure`` directly (Agg canvas, no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from fr_dist.eval.verification import far_label, resolvable_fars, tar_at_far_on_roc

__all__ = ["require_matplotlib", "plot_roc", "write_roc", "roc_texts", "FIGSIZE", "DPI"]

FIGSIZE = (6.4, 4.8)
"""Figure size in inches (matplotlib's default): 640 x 480 pixels at :data:`DPI`."""
DPI = 100


def require_matplotlib():
    """``matplotlib.figure.Figure``, or an ImportError naming the fix (``pip install matplotlib``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "ROC figures (fr-dist eval --plot, eval.plot_dir) need matplotlib, which is not installed: "
            "pip install matplotlib"
        ) from e
    return Figure


def plot_roc(
    curves: Sequence[dict],
    png,
    title: Optional[str] = None,
    figsize=FIGSIZE,
    dpi: int = DPI,
) -> dict:
    """Draw ``curves`` on one log-FAR ROC figure and save it as ``png``; returns ``{label: {far: TAR}}``,
    the points marked on each curve.

    Each curve is a :func:`~fr_dist.eval.verification.roc_points` dict (``far``, ``tar``,
    ``num_negative``) with a ``label`` and optionally a ``legend`` text (e.g. ``VAL@FAR=1e-3 0.880``).
    A curve is drawn as the TAR reachable at each FAR (steps), from the left edge of the axis (the
    power of 10 below the smallest ``1 / num_negative``; FAR 0 sits there) to FAR 1. On it, the quoted FARs the curve's set
    resolves (``far >= 1 / num_negative``) are marked, with their TAR written beside them when the
    figure has one curve; the others are not marked (the set cannot measure them).
    """
    Figure = require_matplotlib()
    if not curves:
        raise ValueError("plot_roc: no curves")
    smallest = min(1.0 / max(int(c["num_negative"]), 1) for c in curves)
    left = 10.0 ** math.floor(math.log10(smallest) - 1e-9)  # a decade boundary below 1 / num_negative
    if left >= smallest:
        left /= 10.0
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_subplot()
    marked: dict = {}
    for c in curves:
        label = str(c.get("label", ""))
        far = [max(float(x), left) for x in c["far"]]  # FAR 0 drawn at the left edge of the log axis
        (line,) = ax.plot(
            far, c["tar"], drawstyle="steps-post", linewidth=1.5, label=c.get("legend") or label
        )
        points = {}
        for f in resolvable_fars(int(c["num_negative"])):
            tar = tar_at_far_on_roc(c["far"], c["tar"], f)
            points[far_label(f)] = tar
            ax.plot([f], [tar], marker="o", markersize=5, color=line.get_color(), linestyle="none")
            if len(curves) == 1:
                ax.annotate(f"{tar:.3f}", (f, tar), textcoords="offset points", xytext=(4, -12), fontsize=8)
        marked[label] = points
    for f in sorted({f for c in curves for f in resolvable_fars(int(c["num_negative"]))}):
        ax.axvline(f, color="0.8", linewidth=0.8, linestyle=":", zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(left, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}")
    fig.savefig(tmp, dpi=dpi, format="png")  # temp file + rename: never half a figure
    os.replace(tmp, png)
    return marked


def roc_texts(name: str, result: dict, label: str) -> tuple[str, str]:
    """(title, legend) of a set's figure: the set and its 10-fold accuracy; the label and VAL@FAR=1e-3
    (:func:`~fr_dist.eval.verification.evaluate_pairs` results), or for a set without accuracy (IJB) its
    AUC and TAR@FAR=1e-3."""
    if "accuracy" in result:
        title = f"{name}: 10-fold accuracy {result['accuracy']:.4f} +- {result['accuracy_std']:.4f}"
        return title, f"{label}: VAL@FAR=1e-3 {result['val_at_far_1e-3']:.4f}"
    title = f"{name}: AUC {result['auc']:.4f}" if "auc" in result else name
    tar = result.get("tar_at_far_1e-3")
    return title, f"{label}: TAR@FAR=1e-3 {tar:.4f}" if tar is not None else label


def write_roc(out_dir, name: str, result: dict, label: str, figure: bool = True) -> tuple[Path, Path]:
    """A set's ROC: ``out_dir/<name>_roc.json`` (its ``roc`` points, label, title, legend and the
    result's scalar metrics) and ``out_dir/<name>_roc.png`` drawn from them (not with ``figure=False``);
    returns (png, json).

    ``result`` is an evaluation result with its ``roc`` (``evaluate_pairs(..., roc=True)``, or IJB's).
    The JSON is written first, so the points are kept where matplotlib is missing (ImportError then).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title, legend = roc_texts(name, result, label)
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    curve = dict(set=name, label=label, title=title, legend=legend, metrics=metrics, **result["roc"])
    png, js = out_dir / f"{name}_roc.png", out_dir / f"{name}_roc.json"
    tmp = js.with_name(f".{js.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(curve, indent=1) + "\n")
    os.replace(tmp, js)
    if figure:
        plot_roc([curve], png, title=title)
    return png, js
