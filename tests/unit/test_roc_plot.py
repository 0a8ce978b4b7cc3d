"""ROC figures: the curve points (fr_dist.eval.verification.roc_points) against a hand-computed case and a
brute force, TAR@FAR against insightface's VAL@FAR, the quoted FARs a set cannot resolve left unmarked, and
``fr-dist eval --plot`` / ``eval.plot_dir`` writing the PNG + JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fr_dist.eval.verification import (
    QUOTED_FARS,
    evaluate_pairs,
    far_label,
    resolvable_fars,
    roc_points,
    tar_at_far_on_roc,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURE_V1 = REPO / "tests" / "fixtures" / "ckpt_v1"  # a tiny iresnet checkpoint (8-d), as the eval tests use
# the conftest's tiny_data: 6 held-out identities -> 40 pairs (20 genuine, 20 impostor: only FAR 1e-1 resolved)
TINY_DATA = dict(num_identities=2, images_per_identity=4, heldout_identities=6, heldout_pairs=40, seed=3)

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:  # the figures need it (an extra); the math and the error message do not
    HAS_MPL = False
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed (pip install matplotlib)")


def _brute_tar_at_far(labels, scores, far: float) -> float:
    """Highest TAR over every threshold (accept score >= t) whose FAR is <= far."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    best = 0.0
    for t in np.r_[np.inf, np.unique(s)]:
        acc = s >= t
        if np.sum(acc & ~y) / np.sum(~y) <= far:
            best = max(best, np.sum(acc & y) / np.sum(y))
    return float(best)


# ----------------------------------------------------------------------------- the math
def test_roc_points_hand_computed():
    # by decreasing score: P P N P N N N N N N N N N (3 genuine, 10 impostor)
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]
    labels = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    r = roc_points(labels, scores)
    # (0,0) first; the collinear points after (FAR 0.1, TAR 1) dropped as sklearn does
    assert r["far"] == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.1, 1.0], abs=1e-15)
    assert r["tar"] == pytest.approx([0.0, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0], abs=1e-15)
    assert r["threshold"] == [None, 0.95, 0.9, 0.8, 0.7, -0.2]
    assert (r["num_positive"], r["num_negative"]) == (3, 10)
    assert r["tar_at_far"] == {"1e-1": 1.0}  # 10 impostors resolve FAR 0.1 only
    assert tar_at_far_on_roc(r["far"], r["tar"], 0.0) == pytest.approx(2 / 3)
    assert tar_at_far_on_roc(r["far"], r["tar"], 0.05) == pytest.approx(2 / 3)  # one false accept is 0.1
    json.dumps(r)  # plain JSON values (no inf threshold)


def test_tar_at_far_is_the_best_threshold_not_above_the_far_and_survives_thinning():
    rng = np.random.default_rng(1)
    labels = rng.random(3000) < 0.3
    scores = np.round(rng.normal(size=labels.size) + 1.5 * labels, 2)  # ties across the classes
    full = roc_points(labels, scores)
    thin = roc_points(labels, scores, max_points=40)
    assert len(thin["far"]) <= 40 < len(full["far"])
    assert set(full["tar_at_far"]) == {far_label(f) for f in (1e-3, 1e-2, 1e-1)}  # 2,1xx impostors
    for f in (0.0, 5e-4, 1e-3, 3e-3, 1e-2, 0.05, 1e-1, 0.5, 1.0):
        want = _brute_tar_at_far(labels, scores, f)
        assert tar_at_far_on_roc(full["far"], full["tar"], f) == pytest.approx(want, abs=1e-12), f
    assert thin["tar_at_far"] == full["tar_at_far"]  # the thinned curve keeps the points at the grid FARs


def _pairs_with_sq_distances(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in 2-D whose squared L2 distance is ``d`` (= 2 - 2 cos): [N, 2] each."""
    cos = 1.0 - np.asarray(d, dtype=np.float64) / 2.0
    e1 = np.tile([1.0, 0.0], (len(d), 1))
    e2 = np.stack([cos, np.sqrt(np.clip(1 - cos**2, 0, None))], axis=1)
    return e1, e2


def test_tar_at_far_agrees_with_val_at_far():
    """insightface's VAL@FAR=1e-3 with one fold (threshold chosen and applied on all pairs) is the pooled
    ROC's TAR@FAR=1e-3 when no distance lies between two of its 0.001-spaced thresholds' grid points
    (distances on the grid's midpoints); with 10 folds it is close."""
    rng = np.random.default_rng(2)
    neg = 1.0 + (rng.choice(3000, 2000, replace=False) + 0.5) * 1e-3  # distinct, in [1, 4)
    pos = (rng.integers(0, 1500, 1000) + 0.5) * 1e-3  # [0, 1.5): overlaps the impostors
    d = np.r_[pos, neg]
    issame = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    order = rng.permutation(d.size)
    e1, e2 = _pairs_with_sq_distances(d[order])
    one = evaluate_pairs(e1, e2, issame[order], nfolds=1, roc=True)
    tar = one["roc"]["tar_at_far"]["1e-3"]
    assert 0.3 < tar < 0.95  # a non-trivial operating point
    assert tar == pytest.approx(one["val_at_far_1e-3"], abs=1e-12)
    assert one["roc"]["num_negative"] == 2000
    ten = evaluate_pairs(e1, e2, issame[order], nfolds=10)
    assert ten["val_at_far_1e-3"] == pytest.approx(tar, abs=0.05)
    assert "roc" not in ten  # only when asked


def test_resolvable_fars_stop_at_one_over_the_impostor_count():
    assert resolvable_fars(1000) == [1e-3, 1e-2, 1e-1]  # 1 / 1000 itself is resolved: one false accept
    assert resolvable_fars(999) == [1e-2, 1e-1]
    assert resolvable_fars(10**6) == list(QUOTED_FARS)
    assert resolvable_fars(9) == [] and resolvable_fars(0) == []


# ----------------------------------------------------------------------------- the figure
@needs_mpl
def test_unresolvable_far_points_are_not_marked(tmp_path):
    from fr_dist.eval.plot import plot_roc

    rng = np.random.default_rng(3)
    curves = []
    for label, n_neg in (("small", 500), ("large", 20000)):
        y = np.r_[np.ones(500, bool), np.zeros(n_neg, bool)]
        s = rng.normal(size=y.size) + 2.0 * y
        curves.append(dict(roc_points(y, s), label=label))
    marked = plot_roc(curves, tmp_path / "two.png", title="two sets")
    assert set(marked["small"]) == {"1e-2", "1e-1"}  # 1/500 = 2e-3: 1e-3 and below are not resolved
    assert set(marked["large"]) == {"1e-4", "1e-3", "1e-2", "1e-1"}
    assert marked["large"]["1e-2"] == pytest.approx(curves[1]["tar_at_far"]["1e-2"])
    (one,) = plot_roc(curves[:1], tmp_path / "one.png").values()
    assert set(one) == {"1e-2", "1e-1"}
    from PIL import Image

    assert Image.open(tmp_path / "two.png").size == (640, 480)


@needs_mpl
def test_fr_dist_eval_plot_writes_png_and_json(tiny_data, tmp_path, capsys):
    from PIL import Image

    from fr_dist.eval.cli import main

    out, js = tmp_path / "roc", tmp_path / "eval.json"
    argv = ["--checkpoint", str(FIXTURE_V1), "--bin", str(tiny_data / "heldout.bin"), "--json", str(js)]
    assert main(argv + ["--plot", str(out), "--batch-size", "16"]) == 0
    assert "heldout_roc.png" in capsys.readouterr().out
    with Image.open(out / "heldout_roc.png") as im:
        assert im.format == "PNG" and im.size == (640, 480)
    curve = json.loads((out / "heldout_roc.json").read_text())
    sets = json.loads(js.read_text())["sets"]
    res = sets["heldout"]
    assert "roc" not in res and "roc" not in res["noflip"]  # the points live in the ROC JSON only
    assert (curve["num_positive"], curve["num_negative"]) == (20, 20)
    assert len(curve["far"]) == len(curve["tar"]) >= 2 and curve["far"][0] == 0.0 and curve["far"][-1] == 1.0
    assert curve["metrics"]["accuracy"] == res["accuracy"]
    assert f"{res['accuracy']:.4f}" in curve["title"] and "heldout" in curve["title"]
    assert f"VAL@FAR=1e-3 {res['val_at_far_1e-3']:.4f}" in curve["legend"]
    assert curve["tar_at_far"].keys() == {"1e-1"}  # 20 impostors: 1e-2 and below not resolved, not marked
    assert curve["tar_at_far"]["1e-1"] == pytest.approx(tar_at_far_on_roc(curve["far"], curve["tar"], 0.1))


def test_fr_dist_eval_has_the_plot_option():
    """``fr-dist eval`` takes its arguments from fr_dist.eval.cli.add_eval_arguments (--plot included)."""
    from fr_dist.cli import build_parser

    args = build_parser().parse_args(["eval", "--checkpoint", "c", "--bin", "a.bin", "--plot", "figs"])
    assert args.plot == "figs"


@needs_mpl
def test_verification_callback_writes_the_roc(tiny_data, tmp_path):
    import torch

    from fr_dist.eval.callback import VerificationCallback
    from fr_dist.export import load_backbone_from_checkpoint

    model, _ = load_backbone_from_checkpoint(FIXTURE_V1)
    cfg = SimpleNamespace(
        bins=[str(tiny_data / "heldout.bin")],
        batch_size=16,
        flip=True,
        nfolds=10,
        keep_best=False,
        plot_dir="roc",
    )
    run = tmp_path / "run"
    results, _ = VerificationCallback(cfg, torch.device("cpu"), run)(model)
    assert "roc" not in results["heldout"]  # results.json / checkpoints keep scalars only
    curve = json.loads((run / "roc" / "heldout_roc.json").read_text())
    assert curve["metrics"]["accuracy"] == pytest.approx(results["heldout"]["accuracy"])
    assert curve["label"] == "run" and (run / "roc" / "heldout_roc.png").stat().st_size > 0
    cfg.plot_dir = None  # off: no figures
    VerificationCallback(cfg, torch.device("cpu"), tmp_path / "off")(model)
    assert not (tmp_path / "off" / "roc").exists()


def test_missing_matplotlib_is_a_clear_error(tiny_data, tmp_path, monkeypatch, capsys):
    import torch

    from fr_dist.errors import ConfigError
    from fr_dist.eval.callback import VerificationCallback
    from fr_dist.eval.cli import main
    from fr_dist.eval.plot import require_matplotlib

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        require_matplotlib()
    argv = ["--checkpoint", str(FIXTURE_V1), "--bin", str(tiny_data / "heldout.bin"), "--plot", str(tmp_path)]
    assert main(argv) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    cfg = SimpleNamespace(bins=[], batch_size=16, flip=True, nfolds=10, keep_best=False, plot_dir="roc")
    with pytest.raises(ConfigError, match=r"eval\.plot_dir=roc.*pip install matplotlib"):
        VerificationCallback(cfg, torch.device("cpu"), tmp_path)
