"""``fr-dist eval``: verification table + JSON for a run, a checkpoint folder or an exported ``.pt``.

    fr-dist eval --checkpoint runs/demo_sf2 --bin data/synthetic/heldout.bin --json eval.json
    torchrun --nproc_per_node=8 -m fr_dist.cli eval --checkpoint runs/r100 --bin lfw.bin cfp_fp.bin agedb_30.bin
    fr-dist eval --checkpoint runs/demo_sf2 --bin data/synthetic/heldout.bin --plot runs/demo_sf2/roc

Under torchrun every rank embeds a slice of each set (results gathered); rank 0 prints and writes.
``--plot DIR`` writes each set's ROC (flip protocol) as ``DIR/<set>_roc.png`` with its curve points in
``DIR/<set>_roc.json`` (:mod:`fr_dist.eval.plot`; needs matplotlib). ``python -m fr_dist.eval.cli`` takes
the same arguments as ``fr-dist eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fr_dist.data.pairs import read_bin
from fr_dist.errors import CheckpointError
from fr_dist.eval.ijb import evaluate_ijb_folder
from fr_dist.eval.plot import require_matplotlib, write_roc
from fr_dist.eval.verification import format_table, verify_bin
from fr_dist.export import load_backbone_from_checkpoint
from fr_dist.runtime import init_distributed, shutdown

__all__ = ["run_eval_cli", "add_eval_arguments", "format_table", "main"]


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``fr-dist eval``."""
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or exported .pt")
    p.add_argument("--bin", nargs="*", default=[], help="insightface .bin pair files")
    p.add_argument("--ijb", default=None, help="IJB-layout folder (meta/ + features or images)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument(
        "--plot",
        default=None,
        metavar="DIR",
        help="write each set's ROC here: DIR/<set>_roc.png (TAR vs log FAR) + DIR/<set>_roc.json (the points)",
    )


def check_pair_file(path) -> None:
    """Refuse a pair set that cannot be evaluated: unreadable/unsafe, or with one class only
    (all genuine or all impostor pairs: AUC / EER / thresholds are undefined)."""
    _, issame = read_bin(path)  # restricted unpickler: raises ValueError naming the file
    same = sum(issame)
    if not issame:
        raise ValueError(f"{path}: no pairs")
    if same in (0, len(issame)):
        kind = "genuine (same identity)" if same else "impostor (different identities)"
        raise ValueError(
            f"{path}: all {len(issame)} pairs are {kind}; verification needs both genuine and impostor "
            "pairs (accuracy/AUC/EER are undefined on one class)"
        )


def run_eval_cli(args) -> int:
    if not args.bin and not args.ijb:
        print("fr-dist eval: give --bin FILES and/or --ijb DIR", file=sys.stderr)
        return 2
    plot_dir = getattr(args, "plot", None)
    if plot_dir:
        try:
            require_matplotlib()
        except ImportError as e:  # before any embedding: the figures were asked for
            print(f"fr-dist eval: --plot: {e}", file=sys.stderr)
            return 2
    for b in args.bin:
        if not Path(b).is_file():
            print(f"fr-dist eval: {b} not found", file=sys.stderr)
            return 2
        try:
            check_pair_file(b)
        except ValueError as e:
            print(f"fr-dist eval: {e}", file=sys.stderr)
            return 2
    env, device = init_distributed()
    code = 0
    try:
        model, spec = load_backbone_from_checkpoint(args.checkpoint)
        model = model.to(device)
        results: dict = {}
        curves: dict = {}  # set name -> result with its ROC points (flip protocol)
        for b in args.bin:
            r = verify_bin(
                model, b, device=device, batch_size=args.batch_size, nfolds=args.nfolds, roc=bool(plot_dir)
            )
            name = r.pop("name")
            r["noflip"].pop("roc", None)
            roc = r["flip"].pop("roc", None)
            if roc is not None:
                curves[name] = dict(r["flip"], roc=roc)
            results[name] = dict(r["flip"], noflip=r["noflip"])
        if args.ijb:
            results["ijb"] = evaluate_ijb_folder(model, args.ijb, device=device, batch_size=args.batch_size)
            roc = results["ijb"].pop("roc", None)  # the points stay out of the results JSON
            if plot_dir and roc is not None:
                curves[str(results["ijb"].get("prefix") or "ijb")] = dict(results["ijb"], roc=roc)
            elif plot_dir and env.is_main:
                print("fr-dist eval: --plot: the IJB evaluation returned no ROC points: no IJB figure")
        if env.is_main:
            print(format_table(results))
            label = Path(str(args.checkpoint).rstrip("/")).name or str(args.checkpoint)
            for name, r in curves.items():
                png, js = write_roc(plot_dir, name, r, label)
                print(f"wrote {png} and {js}")
            if "ijb" in results:
                print(
                    "IJB TAR@FAR: "
                    + ", ".join(f"{k}={v:.4f}" for k, v in results["ijb"].items() if k.startswith("tar"))
                )
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(
                    json.dumps(dict(checkpoint=str(args.checkpoint), model=spec, sets=results), indent=1)
                )
                print(f"wrote {args.json}")
    except Exception as e:
        if isinstance(e, CheckpointError):  # refused / damaged checkpoint: the message says it all
            print(f"fr-dist eval: {e}", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
        code = 1
    if env.world_size > 1:
        shutdown(code)
    return code


def main(argv=None) -> int:
    """``python -m fr_dist.eval.cli ARGS``: ``fr-dist eval ARGS``."""
    p = argparse.ArgumentParser(prog="fr-dist eval", description=__doc__.split("\n")[0])
    add_eval_arguments(p)
    return run_eval_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
