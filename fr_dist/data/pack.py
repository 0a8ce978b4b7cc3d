"""Pack an image folder (one sub-folder per identity) into RecordIO (``fr-dist data pack``).

Labels are assigned 0..K-1 in sorted sub-folder order (empty sub-folders are skipped); the
mapping is written to ``<name>.classes.txt``. JPEG/PNG bytes are stored as they are (lossless,
fast); with ``image_size`` every image is decoded, resized when needed and re-encoded as JPEG
(``quality``). ``check`` decodes every image first so that a broken file fails the pack (or is
skipped and counted with ``skip_bad``) instead of the training run.

Order: ``shuffle=False`` keeps sorted identities and sorted file names. ``shuffle=True``: flat
layout shuffles all images; insightface layout keeps each identity contiguous (the layout needs
it) and shuffles the identity order and the images within each identity. Deterministic from
``seed``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from fr_dist.data.image import decode_image, encode_jpeg, resize_to
from fr_dist.data.recordio import write_dataset, write_property

__all__ = ["IMAGE_EXTENSIONS", "scan_image_folder", "pack_folder"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def scan_image_folder(root) -> tuple[list[str], list[tuple[int, Path]]]:
    """(class names, [(label, file)]) of ``root/<identity>/<image>``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    names, items = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            log.warning("%s: no images (%s), skipped", d, "/".join(IMAGE_EXTENSIONS))
            continue
        label = len(names)
        names.append(d.name)
        items += [(label, f) for f in files]
    if not items:
        raise ValueError(f"{root}: no identity sub-folders with images ({', '.join(IMAGE_EXTENSIONS)})")
    return names, items


def _order(items: list, layout: str, shuffle: bool, seed: int) -> list:
    if not shuffle:
        return items
    rng = np.random.default_rng([int(seed), 0xAC])
    if layout == "flat":
        return [items[i] for i in rng.permutation(len(items))]
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(it[0], []).append(it)
    out = []
    for label in rng.permutation(sorted(groups)):
        g = groups[int(label)]
        out += [g[i] for i in rng.permutation(len(g))]
    return out


def pack_folder(
    src,
    out_dir,
    layout: str = "insightface",
    shuffle: bool = False,
    seed: int = 0,
    name: str = "train",
    image_size: Optional[tuple[int, int]] = None,
    quality: int = 95,
    check: bool = True,
    skip_bad: bool = False,
    workers: int = 4,
    progress: bool = True,
) -> dict:
    """Pack ``src`` into ``out_dir/<name>.rec/.idx`` + ``property``; returns a summary dict."""
    if layout not in ("insightface", "flat"):
        raise ValueError(f"unknown layout {layout!r}; known: flat, insightface")
    names, items = scan_image_folder(src)
    items = _order(items, layout, shuffle, seed)
    size: list = [tuple(image_size)] if image_size else []
    bad: list[str] = []

    def load(item):
        label, f = item
        data = f.read_bytes()
        if not (check or image_size):
            return label, data, None
        try:
            img = decode_image(data)
        except Exception as e:
            return label, None, f"{f}: cannot decode ({e})"
        if image_size:
            img = resize_to(img, image_size)
            data = encode_jpeg(img, quality)
        return label, data, img.shape[:2]

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):
            return x

    def loaded(ex):  # bounded read-ahead: chunks of 1024 files, in order
        for lo in range(0, len(items), 1024):
            yield from ex.map(load, items[lo : lo + 1024])

    def stream():
        with ThreadPoolExecutor(max(1, workers)) as ex:
            for label, data, shape in tqdm(
                loaded(ex),
                total=len(items),
                desc=f"pack {Path(src).name}",
                disable=not progress,
            ):
                if data is None:
                    if not skip_bad:
                        raise ValueError(shape)  # the message
                    bad.append(shape)
                    log.warning("skipping bad image (%d so far): %s", len(bad), shape)
                    continue
                if shape is not None:
                    if not size:
                        size.append(tuple(shape))
                    elif tuple(shape) != size[0] and not image_size:
                        log.warning("image size %s differs from the first image's %s", shape, size[0])
                yield label, data

    out = Path(out_dir)
    # property needs the image size: take it from the first image (checked/decoded or sniffed)
    if not size and not check:
        size.append(tuple(decode_image(items[0][1].read_bytes()).shape[:2]))
    written = {"n": 0}

    def counted():
        for it in stream():
            written["n"] += 1
            yield it

    rec = write_dataset(out, counted(), len(names), (112, 112), layout=layout, name=name)
    h, w = size[0] if size else (112, 112)
    write_property(out, len(names), h, w)  # the real size, known once the images are read
    (out / f"{name}.classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(names)))
    return {
        "rec": str(rec),
        "idx": str(rec.with_suffix(".idx")),
        "layout": layout,
        "classes": len(names),
        "images": written["n"],
        "skipped": len(bad),
        "image_size": [h, w],
        "shuffled": bool(shuffle),
    }
