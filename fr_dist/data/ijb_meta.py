"""IJB meta files (read / write), the layout insightface's ``eval_ijbc.py`` reads.

Layout (``<dir>/<prefix>_...``, whitespace separated, one row per face image):

* ``<prefix>_face_tid_mid.txt``: ``image_name template_id media_id``
* ``<prefix>_template_pair_label.txt``: ``template_id_1 template_id_2 label`` (1 genuine, 0 impostor)
* ``<prefix>_name_5pts_score.txt`` (optional): ``image_name x1 y1 ... x5 y5 faceness``

A malformed file raises :class:`~fr_dist.errors.DataFileError` (a ``ValueError``) naming the file
and line. Used by :mod:`fr_dist.eval.ijb` (evaluation) and :mod:`fr_dist.data.synthetic` (a synthetic
IJB-layout folder); no model code here.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fr_dist.errors import DataFileError

__all__ = ["ARCFACE_5PTS", "IJBMeta", "read_ijb_meta", "write_ijb_meta", "find_ijb_prefix"]

# insightface's 5-point landmark template for 112x112 crops (arcface ``src`` with x + 8)
ARCFACE_5PTS = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)


@dataclass
class IJBMeta:
    """Parsed IJB meta files; row ``i`` of the per-image arrays is image ``i`` (feature row i)."""

    image_names: list
    templates: np.ndarray  # [N] int64 template id per image
    medias: np.ndarray  # [N] int64 media id per image
    pair_t1: np.ndarray  # [P] int64
    pair_t2: np.ndarray  # [P] int64
    labels: np.ndarray  # [P] int64, 1 genuine / 0 impostor
    faceness: Optional[np.ndarray] = None  # [N] float32, from *_name_5pts_score.txt when present
    landmarks: Optional[np.ndarray] = None  # [N, 5, 2] float32, from the same file when present


# ----------------------------------------------------------------------------- files
_DECIMAL = re.compile(r"[+-]?[0-9]+", re.ASCII)  # what insightface's reader (np.loadtxt / int) reads


def _rows(path: Path, ncols: Optional[int], min_cols: int = 1) -> list:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataFileError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):  # as open() splits lines
        terms = line.split()
        if not terms:
            continue
        if (ncols is not None and len(terms) != ncols) or len(terms) < min_cols:
            want = ncols if ncols is not None else f">= {min_cols}"
            raise DataFileError(
                f"{path}:{lineno}: expected {want} fields, got {len(terms)}: {line.rstrip()!r:.200}"
            )
        rows.append((lineno, terms))
    return rows


def _int(path: Path, lineno: int, field: str, text: str) -> int:
    try:
        if not _DECIMAL.fullmatch(text):
            raise ValueError
        value = int(text)
    except ValueError:
        raise DataFileError(f"{path}:{lineno}: {field} {text!r:.40} is not an integer") from None
    if not -(1 << 63) <= value < 1 << 63:
        raise DataFileError(f"{path}:{lineno}: {field} {text} is out of the int64 range")
    return value


def _float(path: Path, lineno: int, field: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFileError(f"{path}:{lineno}: {field} {text!r:.40} is not a number") from None
    if not math.isfinite(value):
        raise DataFileError(f"{path}:{lineno}: {field} {text!r:.40} is not a finite number")
    return value


def _meta_dir(folder: Path, prefix: str) -> Path:
    if not (folder / f"{prefix}_face_tid_mid.txt").is_file() and (folder / "meta").is_dir():
        return folder / "meta"  # insightface layout: IJB_C/meta/ijbc_face_tid_mid.txt
    return folder


def read_ijb_meta(meta_dir, prefix: str) -> IJBMeta:
    """Read ``<meta_dir>/<prefix>_face_tid_mid.txt``, ``..._template_pair_label.txt`` and, when
    present, the faceness scores (last column of ``..._name_5pts_score.txt``).

    ``meta_dir`` may also be the dataset root holding ``meta/`` (insightface's layout).
    """
    folder = _meta_dir(Path(meta_dir), prefix)
    tid_mid = folder / f"{prefix}_face_tid_mid.txt"
    pair_file = folder / f"{prefix}_template_pair_label.txt"
    for p in (tid_mid, pair_file):
        if not p.is_file():
            raise FileNotFoundError(f"IJB meta file not found: {p}")
    names, templates, medias = [], [], []
    for lineno, (name, t, m) in _rows(tid_mid, 3):
        names.append(name)
        templates.append(_int(tid_mid, lineno, "template id", t))
        medias.append(_int(tid_mid, lineno, "media id", m))
    t1, t2, labels = [], [], []
    for lineno, (a, b, lab) in _rows(pair_file, 3):
        t1.append(_int(pair_file, lineno, "template id 1", a))
        t2.append(_int(pair_file, lineno, "template id 2", b))
        label = _int(pair_file, lineno, "label", lab)
        if label not in (0, 1):
            raise DataFileError(f"{pair_file}:{lineno}: label must be 0 or 1, got {label}")
        labels.append(label)
    faceness = landmarks = None
    score_file = folder / f"{prefix}_name_5pts_score.txt"
    if score_file.is_file():
        rows = _rows(score_file, None, min_cols=2)
        if len(rows) != len(names):
            raise DataFileError(
                f"{score_file}: {len(rows)} rows but {tid_mid.name} has {len(names)} (one row per image expected)"
            )
        values, points = [], []
        for lineno, terms in rows:
            values.append(_float(score_file, lineno, "faceness", terms[-1]))
            if len(terms) == 12:  # name, 5 (x, y) landmarks, score
                points.append([_float(score_file, lineno, "landmark", t) for t in terms[1:11]])
        faceness = np.asarray(values, dtype=np.float32)
        if len(points) == len(rows):
            landmarks = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)
    return IJBMeta(
        image_names=names,
        templates=np.asarray(templates, dtype=np.int64),
        medias=np.asarray(medias, dtype=np.int64),
        pair_t1=np.asarray(t1, dtype=np.int64),
        pair_t2=np.asarray(t2, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        faceness=faceness,
        landmarks=landmarks,
    )


def find_ijb_prefix(folder) -> str:
    """The ``<prefix>`` of the single ``<prefix>_face_tid_mid.txt`` in ``folder`` or ``folder/meta``."""
    folder = Path(folder)
    found = sorted(folder.glob("*_face_tid_mid.txt")) or sorted((folder / "meta").glob("*_face_tid_mid.txt"))
    if len(found) != 1:
        raise DataFileError(
            f"{folder}: expected one *_face_tid_mid.txt (here or in meta/), found {[f.name for f in found]}"
        )
    return found[0].name[: -len("_face_tid_mid.txt")]


def write_ijb_meta(
    out_dir,
    prefix: str,
    image_names: Sequence[str],
    identities: Sequence[int],
    images_per_template: int = 3,
    media_per_template: int = 2,
    max_impostor_pairs: int = 100_000,
    faceness: Optional[Sequence[float]] = None,
    seed: int = 0,
) -> dict:
    """Write IJB-layout meta files for images with known identities.

    Each identity's images (shuffled with ``seed``) are cut into templates of up to
    ``images_per_template`` images; a template's images are spread over up to
    ``media_per_template`` media (a media with several images is averaged first, like a video).
    Genuine pairs: every pair of templates of one identity; impostor pairs: every pair of
    templates of different identities, or ``max_impostor_pairs`` of them drawn uniformly.
    Rows of ``<prefix>_face_tid_mid.txt`` follow ``image_names`` order (feature row i = image i).

    Returns counts and the written paths.
    """
    names = [str(n) for n in image_names]
    ids = np.asarray(identities).ravel()
    if len(names) != ids.size:
        raise ValueError(f"{len(names)} image names but {ids.size} identity labels")
    for i, n in enumerate(names):
        if not n or any(c.isspace() for c in n):
            raise ValueError(
                f"image name {i} ({n!r}) is empty or has whitespace: IJB meta files are space separated"
            )
    if images_per_template < 1 or media_per_template < 1:
        raise ValueError("images_per_template and media_per_template must be >= 1")
    if faceness is not None and len(faceness) != len(names):
        raise ValueError(f"{len(faceness)} faceness scores for {len(names)} images")
    rng = np.random.default_rng(seed)

    template_of = np.zeros(len(names), dtype=np.int64)
    media_of = np.zeros(len(names), dtype=np.int64)
    template_identity: list = []  # index t -> identity of template id t + 1
    next_media = 1
    for ident in np.unique(ids):
        members = rng.permutation(np.flatnonzero(ids == ident))
        for start in range(0, members.size, images_per_template):
            chunk = members[start : start + images_per_template]
            template_identity.append(ident)
            template_of[chunk] = len(template_identity)  # template ids 1..T
            n_media = min(media_per_template, chunk.size)
            media_of[chunk] = next_media + np.arange(chunk.size) % n_media
            next_media += n_media
    template_identity = np.asarray(template_identity)
    n_templates = template_identity.size

    ti, tj = np.triu_indices(n_templates, k=1)  # all template pairs (i < j)
    same = template_identity[ti] == template_identity[tj]
    genuine = np.stack([ti[same], tj[same]], axis=1)
    impostor = np.stack([ti[~same], tj[~same]], axis=1)
    if impostor.shape[0] > max_impostor_pairs:
        impostor = impostor[np.sort(rng.choice(impostor.shape[0], max_impostor_pairs, replace=False))]
    if genuine.shape[0] == 0 or impostor.shape[0] == 0:
        raise ValueError(
            f"{genuine.shape[0]} genuine and {impostor.shape[0]} impostor pairs: need identities with "
            f">= {images_per_template + 1} images and at least two identities"
        )
    pairs = np.concatenate([genuine, impostor]) + 1  # template ids
    labels = np.r_[np.ones(len(genuine), dtype=np.int64), np.zeros(len(impostor), dtype=np.int64)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "face_tid_mid": out / f"{prefix}_face_tid_mid.txt",
        "template_pair_label": out / f"{prefix}_template_pair_label.txt",
        "name_5pts_score": out / f"{prefix}_name_5pts_score.txt",
    }
    paths["face_tid_mid"].write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, template_of, media_of))
    )
    paths["template_pair_label"].write_text("".join(f"{a} {b} {lab}\n" for (a, b), lab in zip(pairs, labels)))
    lmk = " ".join(f"{v:.4f}" for v in ARCFACE_5PTS.ravel())
    scores = np.ones(len(names)) if faceness is None else np.asarray(faceness, dtype=np.float64)
    paths["name_5pts_score"].write_text("".join(f"{n} {lmk} {s:.6f}\n" for n, s in zip(names, scores)))
    return {
        "images": len(names),
        "identities": int(np.unique(ids).size),
        "templates": int(n_templates),
        "media": int(next_media - 1),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
        "paths": {k: str(v) for k, v in paths.items()},
    }
