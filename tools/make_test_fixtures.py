"""Write tests/fixtures/rec_fr_dist/: an insightface-layout RecordIO set written by fr_dist's writer.

    python tools/make_test_fixtures.py [--out tests/fixtures/rec_fr_dist]

The same shape as ../shared/fixtures/mxnet_rec (which real MXNet 1.9.1 wrote), so every test that
reads a RecordIO fixture runs on a fresh clone: 20 identities, 200 images of 112 x 112 (here
8..12 per identity instead of 10 each), ``train.rec`` / ``train.idx`` / ``property`` from
``fr_dist.data.write_dataset``, a 20-pair ``pairs.bin`` (10 genuine, 10 impostor) from
``fr_dist.data.pairs.write_bin`` holding copies of train.rec's JPEG bytes, and ``fixture.json``
listing, from the generator's side (not read back through fr_dist's reader), every key's label,
the identity ranges and each pair's truth. Images: fr_dist's synthetic faces
(``fr_dist.data.synthetic.render_face``), JPEG quality 40 to keep the folder under 500 KB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from fr_dist.data.image import encode_jpeg
from fr_dist.data.pairs import sample_pairs, write_bin
from fr_dist.data.recordio import write_dataset
from fr_dist.data.synthetic import identity_params, render_face

REPO = Path(__file__).resolve().parents[1]
SEED = 20253
IDENTITIES = 20
IMAGES = 200
SIZE = (112, 112)
PAIRS = 20
QUALITY = 40


def image_counts(rng) -> list[int]:
    """20 counts in 8..12 summing to 200 (uneven identity ranges)."""
    counts = np.full(IDENTITIES, IMAGES // IDENTITIES)
    for _ in range(12):
        a, b = rng.choice(IDENTITIES, 2, replace=False)
        if counts[a] < 12 and counts[b] > 8:
            counts[a] += 1
            counts[b] -= 1
    assert counts.sum() == IMAGES and counts.min() >= 8 and counts.max() <= 12
    return counts.tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "rec_fr_dist")
    a = p.parse_args(argv)
    out = a.out
    rng = np.random.default_rng(SEED)
    counts = image_counts(rng)
    items = []  # (label, jpeg) grouped by identity, identities in label order: keys 1..200
    for ident, n in enumerate(counts):
        params = identity_params(SEED, ident)
        for j in range(n):
            img = render_face(params, np.random.default_rng([SEED, ident, 1, j]))  # [112, 112, 3] RGB
            items.append((ident, encode_jpeg(img, quality=QUALITY)))
    write_dataset(out, items, num_classes=IDENTITIES, image_size=SIZE)
    labels = [label for label, _ in items]
    pairs = sample_pairs(labels, PAIRS, seed=SEED)
    bins = [items[k][1] for i, j, _ in pairs for k in (i, j)]  # pair p -> images 2p, 2p+1
    write_bin(out / "pairs.bin", bins, [same for _, _, same in pairs])

    ends = np.cumsum(counts) + 1  # image keys start at 1
    id_ranges = [[int(e - n), int(e)] for e, n in zip(ends, counts)]
    n_img, first_id = len(items), len(items) + 1
    meta = {
        "description": (
            "insightface-layout RecordIO fixture written by fr_dist's own writer (tools/make_test_fixtures.py): "
            "fr_dist.data.write_dataset for train.rec/train.idx/property, fr_dist.data.pairs.write_bin for "
            "pairs.bin (JPEG bytes copied from train.rec); images are fr_dist synthetic faces, cv2 JPEG "
            f"quality {QUALITY} from a BGR array. Same layout as ../shared/fixtures/mxnet_rec."
        ),
        "identities": IDENTITIES,
        "image_size": list(SIZE),
        "num_images": n_img,
        "image_counts": counts,
        "train_rec": {
            "files": ["train.rec", "train.idx"],
            "record0": {
                "key": 0,
                "flag": 2,
                "label": [first_id, first_id + IDENTITIES],
                "note": "label[0]=first identity-record key (= N+1), label[1]=end of identity records",
            },
            "image_keys": [1, n_img],
            "image_record": {"flag": 0, "label": "float(identity)", "id": "= key"},
            "identity_record_keys": [first_id, first_id + IDENTITIES - 1],
            "identity_record": {"flag": 2, "label": "[start_key, end_key)"},
            "id_ranges": id_ranges,
            "label_per_key": {str(k): label for k, label in enumerate(labels, start=1)},
        },
        "property": f"{IDENTITIES},{SIZE[0]},{SIZE[1]}",
        "pairs_bin": {
            "file": "pairs.bin",
            "format": "pickle protocol 4 of (bins, issame_list): images 2i and 2i+1 form pair i",
            "num_pairs": len(pairs),
            "num_same": sum(s for _, _, s in pairs),
            "num_diff": sum(not s for _, _, s in pairs),
            "issame": [bool(s) for _, _, s in pairs],
            "pairs": [
                {
                    "pair": p,
                    "bin_index": [2 * p, 2 * p + 1],
                    "key_a": i + 1,
                    "key_b": j + 1,
                    "label_a": labels[i],
                    "label_b": labels[j],
                    "issame": bool(s),
                }
                for p, (i, j, s) in enumerate(pairs)
            ],
            "source": "JPEG bytes copied unchanged from train.rec records key_a/key_b",
        },
        "generator": {"script": "tools/make_test_fixtures.py", "seed": SEED, "jpeg_quality": QUALITY},
        "sha256": {
            f: hashlib.sha256((out / f).read_bytes()).hexdigest()
            for f in ("train.rec", "train.idx", "property", "pairs.bin")
        },
    }
    (out / "fixture.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {n_img} images, {IDENTITIES} identities, {len(pairs)} pairs, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
