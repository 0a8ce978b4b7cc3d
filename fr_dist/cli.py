"""``fr-dist`` command line: train | eval | export | convert | data | config.

fr-dist train --config configs/demo_cpu.yaml output_dir=runs/demo train.max_steps=200
torchrun --nproc_per_node=2 -m fr_dist.cli train --config configs/demo_cpu.yaml
fr-dist eval --checkpoint runs/demo --bin data/synthetic/heldout.bin --json eval.json [--plot DIR]
fr-dist export runs/demo --torch backbone.pt --onnx backbone.onnx
fr-dist export runs/demo --arcface-torch OUT_DIR --world-size 8     # model.pt + checkpoint_gpu_{r}.pt
fr-dist convert --from arcface_torch SRC --config CFG OUT_RUN      # (or --from opensphere CKPT)
fr-dist data synth data/synthetic | data pack FOLDER OUT | data info PATH
fr-dist config --config configs/demo_cpu.yaml [overrides]   # print the resolved config
fr-dist config --help-keys                                  # every key with its doc
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fr_dist.convert.arcface_torch import read_arcface_torch
from fr_dist.convert.arcface_torch_write import export_arcface_torch
from fr_dist.convert.opensphere import read_opensphere
from fr_dist.convert.run import target_shape, write_run
from fr_dist.data import make_synthetic_dataset
from fr_dist.data.cli import add_data_commands
from fr_dist.doctor import add_arguments as add_doctor_arguments
from fr_dist.doctor import run_doctor
from fr_dist.errors import CheckpointError, ConfigError
from fr_dist.eval.cli import add_eval_arguments, run_eval_cli
from fr_dist.export import export
from fr_dist.plan.cli import add_plan_arguments, run_plan_cli
from fr_dist.train.config_load import format_help, load_config, path_problems
from fr_dist.train.run import run_training

__all__ = ["main"]


def _rank_from_env() -> tuple[int, int]:
    for r, lr in (("RANK", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_LOCALID")):
        if r in os.environ:
            return int(os.environ[r]), int(os.environ.get(lr, 0))
    return 0, 0


def prepare_data(cfg) -> None:
    """Generate the synthetic dataset if configured and missing (local rank 0; the others wait)."""
    syn = cfg.data.synthetic
    rec = Path(cfg.data.rec)
    if not syn.generate or rec.exists():
        return
    done = Path(syn.out_dir) / ".complete"
    _, local_rank = _rank_from_env()
    if local_rank == 0 and not done.exists():
        t0 = time.time()
        make_synthetic_dataset(
            syn.out_dir,
            num_identities=syn.num_identities,
            images_per_identity=syn.images_per_identity,
            heldout_identities=syn.heldout_identities,
            heldout_pairs=syn.heldout_pairs,
            seed=syn.seed,
        )
        done.write_text("ok\n")
        print(f"synthetic dataset written to {syn.out_dir} in {time.time() - t0:.1f}s", flush=True)
    deadline = time.time() + cfg.dist.rendezvous_timeout_s
    while not done.exists():  # local rank 0 generates; give up (clearly) if it died or hung
        if time.time() > deadline:
            raise SystemExit(
                f"fr-dist: waited {cfg.dist.rendezvous_timeout_s:g} s (dist.rendezvous_timeout_s) for local "
                f"rank 0 to write the synthetic dataset ({done} missing): check rank 0's log, or generate it "
                f"first with `fr-dist data synth {syn.out_dir}`"
            )
        time.sleep(0.5)


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)  # validated before any process group exists
    prepare_data(cfg)

    return run_training(cfg)


def cmd_config(args) -> int:
    if args.help_keys:
        print(format_help())
        return 0
    cfg = load_config(args.config, args.overrides, check_paths=False)
    for problem in path_problems(cfg):  # the data may not be there yet: say so, print anyway
        print(f"fr-dist: warning: {problem}", file=sys.stderr)
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def cmd_export(args) -> int:
    if args.world_size is not None and not args.arcface_torch:
        raise SystemExit("fr-dist export: --world-size goes with --arcface-torch OUT_DIR")
    if args.arcface_torch:
        world = args.world_size or 1
        folder, notes = export_arcface_torch(args.run, args.arcface_torch, world, step=args.step)
        print(f"wrote {args.arcface_torch}/model.pt + checkpoint_gpu_0..{world - 1}.pt (from {folder})")
        for note in notes:
            print(f"  - {note}")
    if args.torch or args.onnx or not args.arcface_torch:  # nothing asked: export() says what to give
        export(args.run, torch_out=args.torch, onnx_out=args.onnx, step=args.step)
    return 0


def cmd_convert(args) -> int:
    """Another tool's run -> an fr_dist run folder that ``fr-dist train ... checkpoint.resume=auto`` continues."""
    overrides = [*args.overrides, f"output_dir={args.out_run}"]
    cfg = load_config(args.config, overrides)
    prepare_data(cfg)
    k, d = target_shape(cfg)
    if args.source_format == "arcface_torch":
        imported = read_arcface_torch(args.src, num_classes=k, embedding_size=d)
    else:
        imported = read_opensphere(args.src)
    folder = write_run(imported, cfg, args.out_run)
    print(f"fr-dist convert: {imported.source}")
    for note in imported.notes:
        print(f"  - {note}")
    print(
        f"wrote {folder} (step {imported.step}, epoch {imported.epoch}); continue with:\n"
        f"  fr-dist train --config {args.config} output_dir={args.out_run} checkpoint.resume=auto"
    )
    return 0


def cmd_eval(args) -> int:
    return run_eval_cli(args)


def cmd_doctor(args) -> int:
    return run_doctor(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fr-dist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a backbone + sharded head (single process, torchrun or srun)")
    t.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo_cpu.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="print the resolved config or every key's documentation")
    c.add_argument("--config", default=None)
    c.add_argument("--help-keys", action="store_true")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("export", help="export a run's backbone to TorchScript-free .pt and/or ONNX")
    e.add_argument("run", help="run directory (uses its newest checkpoint) or a checkpoint folder")
    e.add_argument("--torch", default=None, help="write backbone state dict + config here")
    e.add_argument("--onnx", default=None, help="write an ONNX model (dynamic batch) here")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument(
        "--arcface-torch",
        default=None,
        metavar="OUT_DIR",
        help="write insightface arcface_torch's model.pt + checkpoint_gpu_{r}.pt (train_v2 resumes them)",
    )
    e.add_argument("--world-size", type=int, default=None, help="GPUs of the arcface_torch run (default 1)")
    e.set_defaults(func=cmd_export)

    cv = sub.add_parser(
        "convert", help="an arcface_torch / OpenSphere run -> an fr_dist run folder that resumes on any W"
    )
    cv.add_argument("--from", dest="source_format", required=True, choices=["arcface_torch", "opensphere"])
    cv.add_argument("src", help="arcface_torch's output folder, or OpenSphere's checkpoint file")
    cv.add_argument("--config", required=True, help="the fr_dist recipe the run continues with")
    cv.add_argument("out_run", help="the fr_dist run folder to write (output_dir of the resumed run)")
    cv.add_argument("overrides", nargs="*", help="dotted config overrides key.sub=value")
    cv.set_defaults(func=cmd_convert)

    v = sub.add_parser("eval", help="verification on .bin pair files and IJB-style templates")
    add_eval_arguments(v)  # --checkpoint --bin --ijb --json --batch-size --nfolds --plot
    v.set_defaults(func=cmd_eval)

    dr = sub.add_parser(
        "doctor", help="pre-flight: rendezvous address, interfaces, all-reduce/all-gather speed"
    )
    add_doctor_arguments(dr)
    dr.set_defaults(func=cmd_doctor)

    d = sub.add_parser("data", help="RecordIO tools: pack, info, synth")
    add_data_commands(d.add_subparsers(dest="data_command", required=True))

    pl = sub.add_parser("plan", help="cluster cost model: memory per GPU, largest K, step time")
    add_plan_arguments(pl)
    pl.set_defaults(func=run_plan_cli)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # config and data errors: one clear line, no traceback wall
        if isinstance(e, ConfigError):
            print(f"fr-dist: config error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, CheckpointError) and args.command in ("convert", "export"):
            print(f"fr-dist {args.command}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
