"""``fr-dist eval``: verification table + JSON for a run, a checkpoint folder or an exported ``.pt``.

    fr-dist eval --checkpoint runs/demo_sf2 --bin data/synthetic/heldout.bin --json eval.json
    torchrun --nproc_per_node=8 -m fr_dist.cli eval --checkpoint runs/r100 --bin lfw.bin cfp_fp.bin agedb_30.bin

Under torchrun every rank embeds a slice of each set (results gathered); rank 0 prints and writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fr_dist.data.pairs import read_bin
from fr_dist.errors import CheckpointError
from fr_dist.eval.ijb import evaluate_ijb_folder
from fr_dist.eval.verification import format_table, verify_bin
from fr_dist.export import load_backbone_from_checkpoint
from fr_dist.runtime import init_distributed, shutdown

__all__ = ["run_eval_cli", "format_table"]


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
        for b in args.bin:
            r = verify_bin(model, b, device=device, batch_size=args.batch_size, nfolds=args.nfolds)
            name = r.pop("name")
            results[name] = dict(r["flip"], noflip=r["noflip"])
        if args.ijb:
            results["ijb"] = evaluate_ijb_folder(model, args.ijb, device=device, batch_size=args.batch_size)
        if env.is_main:
            print(format_table(results))
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
