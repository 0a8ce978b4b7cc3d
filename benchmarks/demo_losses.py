"""Every loss's CPU demo side by side: held-out accuracy, VAL@FAR=1e-3, images/s, and one ROC figure.

For every loss of the registry (``fr_dist.heads.list_heads()``) with a CPU demo recipe
(``configs/demo_cpu_<loss>.yaml``; ``configs/demo_cpu.yaml`` for sphereface2, ``configs/demo_cpu_pfc.yaml``
for partial_fc; a loss without one is skipped, said so) it reads the run folder of a finished demo:

* ``results.json`` (written by the training's end): the final verification of each held-out set
  (10-fold accuracy +- std, VAL@FAR=1e-3, AUC, EER), the steps and the wall time;
* ``metrics.jsonl``: images/s = the median of the logged ``images_per_s`` (global, all ranks; an
  exponential moving average over steps) after the first log line (start-up);
* the held-out ROC: the points the final verification wrote with ``eval.plot_dir``
  (``<plot_dir>/<set>_roc.json``, :mod:`fr_dist.eval.plot`), else recomputed from the run's newest
  checkpoint with the eval code (``verify_bin(..., roc=True)``, flip protocol, the run's eval set).

and writes ``demo_losses.json`` (the rows, with the ROC points), ``demo_losses.md`` (the README table:
loss | recipe | accuracy | VAL@FAR=1e-3 | images/s) and ``demo_losses.png`` (every loss's ROC on one
log-FAR figure; needs matplotlib) into ``benchmarks/results/<hardware>_<yyyymm>/`` (``--out``).

    python -m benchmarks.demo_losses                       # the recipes' own run folders (runs/demo_*)
    python -m benchmarks.demo_losses --runs runs/a runs/b  # these run folders (loss from their config.yaml)
    python -m benchmarks.demo_losses --run                 # first train the demos whose folder has no
                                                           # results.json: make demo DEMO_CONFIG=<recipe>
    python -m benchmarks.demo_losses --smoke               # CI: 2 fake runs in a temp folder, seconds

``--run`` trains one demo at a time with the command ``make demo`` runs (2 gloo ranks); ``--run-args``
adds training overrides (e.g. ``train.max_steps=50`` for a quick look; the table is then not the
README's). A run folder is never re-trained: delete it to measure again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from benchmarks._common import args_record, host_facts, write_json_atomic
from fr_dist.heads import list_heads

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_RECIPES = {"sphereface2": "configs/demo_cpu.yaml", "partial_fc": "configs/demo_cpu_pfc.yaml"}
"""The two demos that predate the ``demo_cpu_<loss>.yaml`` naming."""
SMOKE_LOSSES = ("sphereface2", "partial_fc")


def recipe_for(loss: str) -> Optional[str]:
    """The CPU demo recipe of ``loss`` (a path relative to the repository root), or None."""
    rel = SPECIAL_RECIPES.get(loss, f"configs/demo_cpu_{loss}.yaml")
    return rel if (ROOT / rel).is_file() else None


def recipe_output_dir(recipe: str) -> Path:
    """The run folder a recipe trains into (its resolved ``output_dir``, relative to the root)."""
    from fr_dist.train.config_load import load_config

    return _rooted(load_config(str(ROOT / recipe), check_paths=False).output_dir)


def _rooted(p) -> Path:
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


def run_demo(recipe: str, run_dir: Path, run_args: str = "") -> None:
    """``make demo DEMO_CONFIG=<recipe>`` (the Makefile's command), into ``run_dir``."""
    demo_args = f"output_dir={run_dir} {run_args}".strip()
    cmd = ["make", "-C", str(ROOT), "demo", f"DEMO_CONFIG={recipe}", f"DEMO_ARGS={demo_args}"]
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def median_images_per_s(metrics: Path) -> Optional[float]:
    """The median logged ``images_per_s`` of a run, its first log line (start-up) left out."""
    if not metrics.is_file():
        return None
    rates = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "images_per_s" in rec:
            rates.append(float(rec["images_per_s"]))
    rates = rates[1:] if len(rates) > 1 else rates
    return float(np.median(rates)) if rates else None


def _roc_from_json(run: Path, cfg: dict, name: str) -> Optional[dict]:
    plot_dir = (cfg.get("eval") or {}).get("plot_dir")
    found = [run / plot_dir / f"{name}_roc.json"] if plot_dir else []
    found = [p for p in found if p.is_file()] or sorted(run.glob(f"**/{name}_roc.json"))
    return json.loads(found[0].read_text()) if found else None


def _roc_from_checkpoint(run: Path, cfg: dict, name: str) -> tuple[dict, dict]:
    """(ROC points, verification result) of the run's newest checkpoint on its eval set ``name``."""
    from fr_dist.eval.verification import verify_bin
    from fr_dist.export import load_backbone_from_checkpoint

    ev = cfg.get("eval") or {}
    bins = [_rooted(b) for b in ev.get("bins") or [] if Path(b).stem == name]
    if not bins:
        raise FileNotFoundError(f"{run}: the eval set {name} is not in its config's eval.bins")
    model, _ = load_backbone_from_checkpoint(run)
    r = verify_bin(
        model, bins[0], batch_size=int(ev.get("batch_size", 128)), nfolds=int(ev.get("nfolds", 10)), roc=True
    )
    res = r["flip"]
    return res.pop("roc"), res


def read_run(run: Path, recipe: Optional[str]) -> dict:
    """One table row from a finished run folder (raises FileNotFoundError when it is not one)."""
    run = Path(run)
    if not (run / "results.json").is_file():
        raise FileNotFoundError(f"{run}: no results.json (the demo has not finished there)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    results = json.loads((run / "results.json").read_text())
    sets = results.get("eval") or {}
    ev_bins = [Path(b).stem for b in (cfg.get("eval") or {}).get("bins") or []]
    name = next(iter(sets), None) or (ev_bins[0] if ev_bins else None)
    if name is None:
        raise FileNotFoundError(f"{run}: no verification set in results.json nor in eval.bins")
    roc, source = _roc_from_json(run, cfg, name), "eval.plot_dir json"
    res = sets.get(name)
    if roc is None:
        roc, recomputed = _roc_from_checkpoint(run, cfg, name)
        source = "checkpoint"
        res = res or recomputed
    return dict(
        loss=cfg["head"]["name"],
        recipe=recipe,
        run=str(run),
        set=name,
        accuracy=res["accuracy"],
        accuracy_std=res["accuracy_std"],
        val_at_far_1e3=res["val_at_far_1e-3"],
        auc=res.get("auc"),
        eer=res.get("eer"),
        images_per_s=median_images_per_s(run / "metrics.jsonl"),
        images_per_s_final=results.get("images_per_s"),
        steps=results.get("step"),
        wall_s=results.get("wall_s"),
        roc_source=source,
        roc={k: roc[k] for k in ("far", "tar", "num_positive", "num_negative", "tar_at_far")},
    )


def collect(runs: Optional[list], run: bool, run_args: str) -> tuple[list, list]:
    """(rows, skipped) over the registry's losses, in registry order."""
    given: dict = {}
    for d in runs or []:
        d = Path(d)
        cfg_file = d / "config.yaml"
        loss = yaml.safe_load(cfg_file.read_text())["head"]["name"] if cfg_file.is_file() else None
        given.setdefault(loss, []).append(d)
    rows, skipped = [], []
    for loss in list_heads():
        recipe = recipe_for(loss)
        if recipe is None:
            msg = f"no CPU demo recipe (configs/demo_cpu_{loss}.yaml)"
            print(f"{loss}: {msg}: skipped")
            skipped.append(dict(loss=loss, reason=msg))
            continue
        dirs = given.get(loss, []) if runs else [recipe_output_dir(recipe)]
        if run and not runs and not (dirs[0] / "results.json").is_file():
            run_demo(recipe, dirs[0], run_args)
        if not dirs:
            skipped.append(dict(loss=loss, reason="no run folder among --runs"))
            print(f"{loss}: no run folder among --runs: skipped")
        for d in dirs:
            try:
                rows.append(read_run(d, recipe))
            except FileNotFoundError as e:
                print(f"{loss}: {e}: skipped (train it with --run, or give --runs)")
                skipped.append(dict(loss=loss, reason=str(e)))
    for loss in sorted(set(given) - set(list_heads()), key=str):
        print(f"{given[loss]}: head {loss!r} is not a registered loss: skipped")
    return rows, skipped


def markdown(rows: list) -> str:
    """The README table."""
    lines = ["| loss | recipe | accuracy (10-fold) | VAL@FAR=1e-3 | images/s |", "|---|---|---|---|---|"]
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] is not None else "-"
        lines.append(
            f"| {r['loss']} | `{r['recipe']}` | {r['accuracy']:.3f} +- {r['accuracy_std']:.3f} "
            f"| {r['val_at_far_1e3']:.3f} | {ips} |"
        )
    sets = sorted({r["set"] for r in rows})
    lines.append("")
    lines.append(
        f"Held-out set: {', '.join(sets)}; images/s: median of the run's logged images_per_s (all ranks together)."
    )
    return "\n".join(lines) + "\n"


def figure(rows: list, png: Path) -> Optional[Path]:
    """Every row's ROC on one figure (None, said, where matplotlib is missing)."""
    from fr_dist.eval.plot import plot_roc

    curves = []
    for r in rows:
        legend = f"{r['loss']}: acc {r['accuracy']:.3f}, VAL@FAR=1e-3 {r['val_at_far_1e3']:.3f}"
        curves.append(dict(r["roc"], label=r["loss"], legend=legend))
    sets = ", ".join(sorted({r["set"] for r in rows}))
    try:
        plot_roc(curves, png, title=f"CPU demos, held-out ROC ({sets}, flip protocol)")
    except ImportError as e:
        print(f"no figure: {e}")
        return None
    print(f"plot: {png}")
    return png


def make_smoke_runs(root: Path) -> list:
    """Two fake finished demo runs (no training): one with its ROC JSON (``eval.plot_dir``), one with only
    a checkpoint of a tiny untrained backbone (the ROC recomputed), on a 20-pair .bin; their folders."""
    import torch

    from fr_dist.data import make_synthetic_dataset
    from fr_dist.eval.plot import write_roc
    from fr_dist.eval.verification import roc_points
    from fr_dist.models import create_backbone

    data = root / "data"
    make_synthetic_dataset(
        data, num_identities=2, images_per_identity=4, heldout_identities=4, heldout_pairs=20, seed=0,
        workers=1, progress=False,
    )  # fmt: skip
    spec = dict(
        name="iresnet",
        embedding_size=8,
        input_size=112,
        kwargs=dict(layers=[1, 1, 1, 1], width=4, stem_stride=2),
    )
    rng = np.random.default_rng(0)
    runs = []
    for i, loss in enumerate(SMOKE_LOSSES):
        run = root / f"demo_{loss}"
        run.mkdir(parents=True)
        cfg = dict(
            output_dir=str(run), head=dict(name=loss), model=dict(spec, dropout=0.0),
            eval=dict(bins=[str(data / "heldout.bin")], batch_size=16, nfolds=10, plot_dir="roc" if i == 0 else None),
        )  # fmt: skip
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        lines = [dict(step=10 * (k + 1), images_per_s=100.0 + 10 * k + i, loss=5.0 - k) for k in range(5)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        res = dict(accuracy=0.9 - 0.05 * i, accuracy_std=0.02, threshold=1.2, auc=0.95, eer=0.1, pairs=20)
        res["val_at_far_1e-3"] = 0.5
        (run / "results.json").write_text(
            json.dumps(dict(step=50, images_per_s=140.0, wall_s=1.0, eval=dict(heldout=res)))
        )
        if i == 0:  # the points the final verification writes with eval.plot_dir
            labels = np.arange(20) % 2 == 0
            scores = rng.normal(size=20) + 2.0 * labels
            write_roc(
                run / "roc", "heldout", dict(res, roc=roc_points(labels, scores)), run.name, figure=False
            )
        else:  # a checkpoint only: the benchmark recomputes the ROC with the eval code
            ck = run / "checkpoints" / "50"
            ck.mkdir(parents=True)
            torch.manual_seed(0)
            torch.save(create_backbone(spec).state_dict(), ck / "backbone.pt")
            (ck / "config.yaml").write_text(yaml.safe_dump(cfg))
            (ck / "meta.json").write_text(json.dumps(dict(step=50)))
        runs.append(run)
    return runs


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, default=None, metavar="DIR",
                   help="finished demo run folders (default: each recipe's output_dir)")  # fmt: skip
    p.add_argument("--run", action="store_true",
                   help="train (make demo DEMO_CONFIG=<recipe>) the demos whose run folder has no results.json")  # fmt: skip
    p.add_argument("--run-args", default="", help="extra training overrides for --run (space separated)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON here, .md and .png beside it (default benchmarks/results/cpu<N>_<yyyymm>/demo_losses.json)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="2 fake runs in a temp folder (CI, seconds)")
    a = p.parse_args(argv)
    if a.smoke and (a.runs or a.run):
        p.error("--smoke makes its own runs: no --runs / --run")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.smoke:  # the fake runs beside --out (or in a new temp folder)
        tmp = a.out.parent / "demo_losses_smoke" if a.out else Path(tempfile.mkdtemp(prefix="demo_losses_"))
        a.runs = make_smoke_runs(tmp)
        a.out = a.out or tmp / "demo_losses.json"
    if a.out is None:
        a.out = (
            ROOT
            / "benchmarks"
            / "results"
            / f"cpu{os.cpu_count()}_{datetime.date.today():%Y%m}"
            / "demo_losses.json"
        )
    rows, skipped = collect(a.runs, a.run, a.run_args)
    if not rows:
        print("no finished demo run found: nothing written", file=sys.stderr)
        return 1
    write_json_atomic(a.out, dict(host=host_facts(), args=args_record(a), rows=rows, skipped=skipped))
    md = a.out.with_suffix(".md")
    md.write_text(markdown(rows))
    print(md.read_text(), end="")
    png = figure(rows, a.out.with_suffix(".png"))
    print(f"wrote {a.out}, {md}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
