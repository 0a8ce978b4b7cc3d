"""``fr-dist data ...`` sub-commands: ``pack``, ``info``, ``synth``.

``add_data_commands(subparsers)`` registers them on an argparse sub-parsers object; each parser
sets ``func`` so that ``args.func(args)`` runs it (returns an exit code).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from fr_dist.data.pack import pack_folder
from fr_dist.data.recordio import open_recordio
from fr_dist.data.synthetic import demo_dataset_spec, make_synthetic_dataset

__all__ = ["add_data_commands", "cmd_pack", "cmd_info", "cmd_synth", "dataset_info"]


def _size(text: str) -> tuple[int, int]:
    parts = [int(x) for x in text.lower().replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W or N, got {text!r}")
    return parts[0], parts[1]


def cmd_pack(args) -> int:
    res = pack_folder(
        args.src,
        args.out,
        layout=args.layout,
        shuffle=args.shuffle,
        seed=args.seed,
        name=args.name,
        image_size=args.resize,
        quality=args.quality,
        check=not args.no_check,
        skip_bad=args.skip_bad,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(json.dumps(res, indent=1))
    return 0


def _histogram(counts: np.ndarray) -> list[dict]:
    """Images-per-identity histogram in power-of-two buckets [lo, hi)."""
    if counts.size == 0:
        return []
    edges = [0, 1]
    while edges[-1] <= counts.max():
        edges.append(edges[-1] * 2)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = int(((counts >= lo) & (counts < hi)).sum())
        if n:
            out.append({"images": f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}", "identities": n})
    return out


def dataset_info(path, check: bool = False, decode: bool = False) -> dict:
    """Summary of a RecordIO dataset: layout, images, identities, per-identity histogram."""
    rec = open_recordio(path, check_labels=False)
    if rec.layout == "insightface" and rec.identity_keys:
        counts = np.array([e - s for s, e in (rec.id_range(i) for i in range(len(rec.identity_keys)))])
    else:
        labels = rec.labels()
        counts = np.bincount(labels, minlength=rec.num_classes) if labels.size else np.zeros(0, int)
    info = {
        "path": str(rec.path),
        "layout": rec.layout,
        "records": len(rec.keys),
        "images": rec.num_images,
        "num_classes": rec.num_classes,
        "identities_with_images": int((counts > 0).sum()),
        "image_size": list(rec.image_size) if rec.image_size else None,
        "index_rebuilt": rec.index_rebuilt,
        "images_per_identity": {
            "min": int(counts.min()) if counts.size else 0,
            "median": float(np.median(counts)) if counts.size else 0.0,
            "mean": float(counts.mean()) if counts.size else 0.0,
            "max": int(counts.max()) if counts.size else 0,
        },
        "histogram": _histogram(counts),
    }
    if check or decode:
        rec.check_labels = True
        info["check"] = rec.check(decode=decode, skip_bad=True)
    return info


def cmd_info(args) -> int:
    info = dataset_info(args.path, check=args.check, decode=args.decode)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0 if not info.get("check", {}).get("bad") else 1
    print(f"{info['path']}: {info['layout']} layout, {info['records']} records")
    print(f"  images      {info['images']}")
    print(f"  identities  {info['num_classes']} ({info['identities_with_images']} with images)")
    if info["image_size"]:
        print(f"  image size  {info['image_size'][0]}x{info['image_size'][1]} (property)")
    s = info["images_per_identity"]
    print(f"  images/identity  min {s['min']}  median {s['median']:g}  mean {s['mean']:.2f}  max {s['max']}")
    width = max([len(b["images"]) for b in info["histogram"]] + [6])
    top = max([b["identities"] for b in info["histogram"]] + [1])
    for b in info["histogram"]:
        bar = "#" * max(1, round(40 * b["identities"] / top))
        print(f"    {b['images']:>{width}} images: {b['identities']:>8}  {bar}")
    if "check" in info:
        c = info["check"]
        print(f"  check: {c['checked']} image records, {c['bad']} bad")
        for e in c["errors"]:
            print(f"    {e}")
        return 1 if c["bad"] else 0
    return 0


def cmd_synth(args) -> int:
    meta = make_synthetic_dataset(
        args.out,
        num_identities=args.num_ids,
        images_per_identity=args.images_per_id,
        heldout_identities=args.heldout_ids,
        heldout_pairs=args.heldout_pairs,
        seed=args.seed,
        layout=args.layout,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(json.dumps(meta, indent=1))
    return 0


def add_data_commands(subparsers) -> None:
    """Register ``pack``, ``info`` and ``synth`` on ``subparsers`` (from ``add_subparsers()``)."""
    p = subparsers.add_parser("pack", help="image folder (one sub-folder per identity) -> RecordIO")
    p.add_argument("src", help="folder with one sub-folder of images per identity")
    p.add_argument("out", help="output folder (train.rec, train.idx, property)")
    p.add_argument("--layout", choices=["insightface", "flat"], default="insightface")
    p.add_argument("--shuffle", action="store_true", help="shuffle the record order (see docs)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--name", default="train", help="file stem (default: train)")
    p.add_argument("--resize", type=_size, default=None, metavar="H,W", help="resize + re-encode JPEG")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--no-check", action="store_true", help="do not decode images before packing")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable images (counted)")
    p.add_argument("--workers", type=int, default=4, help="reader threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pack)

    i = subparsers.add_parser("info", help="layout, images, identities, images-per-identity histogram")
    i.add_argument("path", help="train.rec or its folder")
    i.add_argument("--check", action="store_true", help="read every image record and check its label")
    i.add_argument("--decode", action="store_true", help="also decode every image (implies --check)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    d = demo_dataset_spec()
    s = subparsers.add_parser("synth", help="write the synthetic face-identity dataset")
    s.add_argument("out", help="output folder (train.rec/.idx, property, heldout.bin)")
    s.add_argument("--num-ids", type=int, default=d["num_identities"], help="training identities")
    s.add_argument("--images-per-id", type=int, default=d["images_per_identity"])
    s.add_argument("--heldout-ids", type=int, default=d["heldout_identities"], help="identities kept out")
    s.add_argument("--heldout-pairs", type=int, default=d["heldout_pairs"], help="pairs in heldout.bin")
    s.add_argument("--seed", type=int, default=d["seed"])
    s.add_argument("--layout", choices=["insightface", "flat"], default="insightface")
    s.add_argument("--workers", type=int, default=None, help="processes (default: cores, max 8)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)


def main(argv=None) -> int:  # ``python -m fr_dist.data.cli ...`` (the fr-dist CLI wires the same)
    ap = argparse.ArgumentParser(prog="fr-dist data")
    add_data_commands(ap.add_subparsers(dest="data_command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
