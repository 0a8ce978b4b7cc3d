"""``fr-dist plan``: plan a training recipe (``--config``) or a configuration given by flags.

    fr-dist plan --config configs/ms1mv3_r50_sf2.yaml --hardware h100 data.num_classes=2M
    fr-dist plan --config configs/ms1mv3_r50_sf2.yaml --nodes 4 --batch-size 256 --json
    fr-dist plan --num-classes 100M --embedding-size 512 --gpus-per-node 8 --head sphereface2 \\
        --proxy-dtype bf16 --fused-update --hardware h100-80gb
    fr-dist plan --config configs/ms1mv3_r50_curricularface.yaml --nodes 2
    fr-dist plan --list-heads

``--head`` takes every loss of the registry (fr_dist.heads.list_heads(); an unknown name is an error that
lists them); the plan is its family's (memory, step time, collectives) plus the loss's own
``extra_collectives``, printed with the head's collectives and its notes, beside the two baselines
(SphereFace2, Partial FC).

With ``--config`` the recipe gives every input it has (``fr_dist.plan.config.RECIPE_KEYS``); a flag given
explicitly overrides it. A flag named after the training key it mirrors keeps its older planner name as
an alias (``--num-classes`` / ``--identities``, ``--embedding-size`` / ``--dim``, ``--batch-size`` /
``--batch``, ``--master-weights`` / ``--fp32-master``, ``--kernel`` / ``--sf2-kernel``, ``--head-dtype`` /
``--head-compute``, ``--model`` / ``--backbone``). The world size is not a recipe key: ``--nodes`` x
``--gpus-per-node``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fr_dist.heads import list_heads
from fr_dist.plan.config import (
    RECIPE_KEYS,
    PlanConfig,
    choices,
    parse_count,
    plan_config_from_training,
    recipe_notes,
)
from fr_dist.plan.hardware import HARDWARE, SHORT_NAMES, load_hardware
from fr_dist.plan.losses import describe_losses
from fr_dist.plan.measure import measure_cpu_profile
from fr_dist.plan.report import format_table, side_by_side
from fr_dist.train.config_load import load_config

__all__ = ["add_plan_arguments", "run_plan_cli", "main"]

_FIELDS = [f.name for f in dataclasses.fields(PlanConfig)]


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="RECIPE", help="training recipe (YAML) to plan")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the recipe, as for fr-dist train: data.batch_size=256",
    )
    from_recipe = {field: key for key, field in RECIPE_KEYS.items()}
    defaults = PlanConfig()

    def option(field: str, *flags: str, default_text: str | None = None, **kw) -> None:
        """A flag for PlanConfig ``field``: None unless given (then the recipe's value or the default)."""
        if "action" not in kw and "choices" not in kw and choices(field):
            kw["choices"] = choices(field)
        default = default_text or str(getattr(defaults, field))
        if field in from_recipe:
            key = from_recipe[field].format(
                head="<head.name>", binary="<binary head>", softmax="<softmax head>"
            )
            default = f"the recipe's {key}, else {default}"
        kw["help"] = f"{kw.get('help', '')} (default: {default})".lstrip()
        p.add_argument(*flags, dest=field, default=None, **kw)

    option(
        "identities",
        "--num-classes",
        "--identities",
        "-K",
        metavar="K",
        help="classes K: 100M, 1.5e8, 29M, 2K, 12345",
    )
    option("dim", "--embedding-size", "--dim", type=int, metavar="D", help="embedding size D")
    option("gpus_per_node", "--gpus-per-node", type=int, metavar="G")
    option("nodes", "--nodes", type=int, metavar="N")
    option("batch", "--batch-size", "--batch", type=int, metavar="B", help="images per GPU per step")
    option(
        "head",
        "--head",
        metavar="NAME",
        choices=None,  # checked against the registry when planned: the error lists the known names
        help=f"loss (registry name): {', '.join(list_heads())}",
    )
    p.add_argument(
        "--list-heads",
        action="store_true",
        help="list every registered loss: family, extra collectives, state",
    )
    option("sample_rate", "--sample-rate", type=float, metavar="RATE", help="negative-class sample rate")
    option(
        "chunk_size",
        "--chunk-size",
        type=int,
        metavar="C",
        help="SphereFace2 classes per chunk (0: as the head picks)",
    )
    option(
        "softmax_chunk",
        "--softmax-chunk",
        type=int,
        metavar="C",
        help="softmax family (fr_dist head): classes per chunk of the online softmax (0: materialised block)",
    )
    option("proxy_dtype", "--proxy-dtype", help="SphereFace2 proxy storage")
    option("fused_update", "--fused-update", action="store_true", help="SphereFace2: update inside the pass")
    p.add_argument("--no-fused-update", dest="fused_update", action="store_false", default=None)
    option(
        "fp32_master",
        "--master-weights",
        "--fp32-master",
        action="store_true",
        help="SphereFace2 fp32 master",
    )
    p.add_argument("--no-master-weights", dest="fp32_master", action="store_false", default=None)
    option("optimizer", "--optimizer")
    option("amp", "--amp", help="backbone autocast")
    option(
        "backbone",
        "--model",
        "--backbone",
        metavar="NAME",
        help="backbone registry name, or 'none' for the head alone",
    )
    option(
        "head_amp",
        "--no-head-amp",
        action="store_false",
        default_text="on",
        help="without --head-dtype: head GEMMs in fp32 instead of under autocast",
    )
    option("pfc_impl", "--pfc-impl", default_text="v2; fr_dist with --config", help="Partial FC buffer model")
    option("head_compute", "--head-dtype", "--head-compute", help="head GEMMs (auto: see --no-head-amp)")
    option("sf2_kernel", "--kernel", "--sf2-kernel", help="SphereFace2 chunk's elementwise part")
    known = sorted(HARDWARE) + sorted(SHORT_NAMES) + ["cpu"]
    p.add_argument("--hardware", default="h100-80gb", help=f"{known} or a YAML file (default: h100-80gb)")
    p.add_argument(
        "--measure", action="store_true", help="cpu profile: time a GEMM and gloo collectives here"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def plan_inputs(a) -> tuple[PlanConfig, dict | None]:
    """The PlanConfig of parsed arguments ``a`` (the recipe's, overridden by the flags given) and, with
    ``--config``, what the recipe was: {config, overrides, not_modeled}."""
    explicit = {f: getattr(a, f) for f in _FIELDS if getattr(a, f, None) is not None}
    if "identities" in explicit:
        explicit["identities"] = parse_count(explicit["identities"])
    overrides = list(getattr(a, "overrides", None) or [])
    if not getattr(a, "config", None):
        if overrides:
            raise ValueError(f"the overrides {overrides} need --config RECIPE")
        cfg = PlanConfig(**explicit)
        cfg.validate()
        return cfg, None

    training = load_config(a.config, overrides, check_paths=False)
    cfg = plan_config_from_training(training, **explicit)
    return cfg, dict(config=a.config, overrides=overrides, not_modeled=recipe_notes(training))


def _list_heads(as_json: bool) -> int:
    rows = describe_losses()
    if as_json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        extra = ", ".join(r["extra_collectives"]) or "-"
        state = ", ".join(r["state"]) or "-"
        print(
            f"{r['name']:16s} {r['family']:8s} [N] all-reduces {r['n_allreduces']} (extra: {extra}); "
            f"norm-aware {'yes' if r['norm_aware'] else 'no'}; state {state}"
        )
    return 0


def run_plan_cli(a) -> int:
    if getattr(a, "list_heads", False):
        return _list_heads(a.json)
    try:
        cfg, recipe = plan_inputs(a)
        measured = None
        if a.measure:
            if a.hardware != "cpu":
                print("fr-dist plan: --measure applies to --hardware cpu; using cpu", file=sys.stderr)
                a.hardware = "cpu"
            measured = measure_cpu_profile(max(2, cfg.gpus_per_node))
            if not a.json:
                print("measured cpu profile: " + json.dumps(measured["measured"]))
        hw = load_hardware(a.hardware, cfg.gpus_per_node, measured)
    except ValueError as e:
        print(f"fr-dist plan: {e}", file=sys.stderr)
        return 2
    for note in recipe["not_modeled"] if recipe else ():
        print(f"fr-dist plan: not modeled: {note}", file=sys.stderr)
    res = side_by_side(cfg, hw)
    if a.json:
        out = dict(res[cfg.head])
        out["heads"] = {h: {k: v for k, v in r.items() if k not in ("hardware",)} for h, r in res.items()}
        if recipe:
            out["recipe"] = recipe
        if measured:
            out["measured_profile"] = measured
        print(json.dumps(out, default=float))
    else:
        if recipe:
            print(f"recipe {recipe['config']}" + "".join(f" {o}" for o in recipe["overrides"]))
        print(format_table(res))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fr-dist plan", description=__doc__.split("\n\n")[0])
    add_plan_arguments(p)
    return run_plan_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
