"""Procedural face-identity dataset, written as RecordIO + a held-out verification ``.bin``.

Each identity is a parametric cartoon "face" drawn with OpenCV: head ellipse and chin, skin
tone, ears, hair colour/style/hairline, eyes (spacing, height, size, shape, iris colour), brows
(thickness, slant), nose (length, width), mouth (width, height, curve, lip colour), optional
glasses and beard, 2-4 identity marks (moles/scars: position, size, colour) and a striped
collar (stripe angle, period, two colours). Each image of an identity redraws it under random
nuisance: pose (rotation, scale, shift, a small yaw-like shift of the inner features),
expression (mouth curve, eye opening), lighting (gain, colour cast, offset, gradient),
background colour and texture, optional blur and occluder, sensor noise; then JPEG q90.

Identity is visible but varies: raw-pixel nearest neighbours verify held-out pairs poorly
(~0.6), while a small CNN learns an embedding that verifies identities it never saw. The
held-out identities (``heldout.bin``) come from the same distribution with other parameters.

Deterministic: identity ``i``'s parameters are a pure function of (seed, i); image ``j`` of it a
pure function of (seed, i, j). Generation runs in ``workers`` processes (forkserver) and streams
into the RecordIO writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from fr_dist.data.ijb_meta import write_ijb_meta
from fr_dist.data.image import encode_jpeg
from fr_dist.data.pairs import sample_pairs, write_bin
from fr_dist.data.recordio import write_dataset

__all__ = [
    "SIZE",
    "demo_dataset_spec",
    "identity_params",
    "render_face",
    "render_image",
    "make_synthetic_dataset",
]

SIZE = 112
JPEG_QUALITY = 90


def demo_dataset_spec() -> dict:
    """kwargs of :func:`make_synthetic_dataset` for the README demo (``configs/demo_cpu.yaml``)."""
    return dict(
        num_identities=1000,
        images_per_identity=16,
        heldout_identities=200,
        heldout_pairs=1000,
        seed=1234,
    )


def _colour(r: np.random.Generator, lo: float = 0, hi: float = 255) -> np.ndarray:
    return r.uniform(lo, hi, 3)


def identity_params(seed: int, identity: int) -> dict:
    """The drawing parameters of ``identity`` (pure function of seed and identity)."""
    r = np.random.default_rng([int(seed), int(identity), 0])
    skin = np.array([r.uniform(40, 200), r.uniform(60, 215), r.uniform(90, 240)])  # B, G, R-ish
    hair = _colour(r, 0, 230)
    return dict(
        skin=skin[::-1].copy(),  # drawn as RGB
        head_ax=(r.uniform(27, 37), r.uniform(35, 45)),
        chin=r.uniform(0.6, 1.0),
        ear=r.uniform(4, 9),
        hair=hair,
        hair_style=int(r.integers(0, 3)),  # 0 cap, 1 cap + long sides, 2 crew cut (thin)
        hairline=r.uniform(-32, -16),
        eye_dx=r.uniform(10, 19),
        eye_y=r.uniform(-12, -3),
        eye_r=r.uniform(3.0, 6.5),
        eye_aspect=r.uniform(0.5, 1.0),
        iris=_colour(r),
        brow_w=int(r.integers(1, 4)),
        brow=r.uniform(-0.6, 0.6),
        nose_len=r.uniform(7, 19),
        nose_w=r.uniform(3, 9),
        mouth_w=r.uniform(7, 19),
        mouth_y=r.uniform(14, 25),
        mouth_curve=r.uniform(-5, 5),
        mouth_h=r.uniform(2, 6),
        lips=_colour(r),
        glasses=(r.random() < 0.3, _colour(r, 0, 200), int(r.integers(0, 2))),
        beard=(r.random() < 0.25, r.uniform(0.4, 0.9)),
        marks=[
            (r.uniform(-24, 24), r.uniform(-22, 30), r.uniform(2, 5), _colour(r))
            for _ in range(int(r.integers(2, 5)))
        ],
        collar=(r.uniform(0, np.pi), r.uniform(4, 10), _colour(r), _colour(r)),
    )


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_NOISE_BANK = np.random.default_rng(0x5EED).standard_normal(1 << 20).astype(np.float32)


def _stripe_mask(angle: float, period: float) -> np.ndarray:
    """uint8 [SIZE, SIZE] (0 / 255): alternate stripes of width ``period`` at ``angle``."""
    phase = _XX * np.float32(np.cos(angle) / period) + _YY * np.float32(np.sin(angle) / period)
    return ((np.floor(phase).astype(np.int32) & 1) * 255).astype(np.uint8)


_BG_STRIPES = [
    _stripe_mask(a, per) for a in np.linspace(0, np.pi, 16, endpoint=False) for per in (6, 10, 14, 20)
]


def _collar(p: dict) -> np.ndarray:
    """The identity's striped collar texture (float32 [SIZE, SIZE, 3]), cached in ``p``."""
    if "_collar" not in p:
        angle, period, c0, c1 = p["collar"]
        tex = np.empty((SIZE, SIZE, 3), np.float32)
        tex[:] = c0
        tex[_stripe_mask(angle, period).astype(bool)] = c1
        p["_collar"] = tex
    return p["_collar"]


def _col(a) -> tuple:
    return tuple(float(v) for v in a)


def render_face(p: dict, rng: np.random.Generator) -> np.ndarray:
    """One 112x112 RGB uint8 image of identity ``p`` under random nuisance factors."""
    import cv2

    c = SIZE / 2
    # background: random colour, weak random stripes
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = rng.uniform(0, 255, 3)
    if rng.random() < 0.5:
        mask = _BG_STRIPES[int(rng.integers(len(_BG_STRIPES)))]
        cv2.add(img, _col(rng.uniform(-30, 30, 3)) + (0.0,), dst=img, mask=mask)

    yaw = rng.uniform(-3, 3)  # inner features shift sideways a little

    def pt(x, y, inner=True, dy=0):
        return int(round(c + x + (yaw if inner else 0))), int(round(c + y)) - dy

    skin, hair = p["skin"], p["hair"]
    ax = (int(p["head_ax"][0]), int(p["head_ax"][1]))
    # collar / shoulders with the identity's stripes
    collar = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(collar, pt(0, 62, False), (46, 20), 0, 0, 360, 255, -1)
    cv2.copyTo(_collar(p), collar, img)
    # neck, long hair behind the head, ears
    cv2.rectangle(img, pt(-10, 20, False), pt(10, 46, False), _col(skin * 0.85), -1)
    if p["hair_style"] == 1:
        cv2.ellipse(img, pt(0, 6, False), (ax[0] + 6, ax[1] + 4), 0, 180, 360, _col(hair), -1)
        cv2.rectangle(img, pt(-ax[0] - 6, 4, False), pt(ax[0] + 6, 24, False), _col(hair), -1)
    for sx in (-1, 1):
        ear = (int(p["ear"]), int(p["ear"] * 1.6))
        cv2.ellipse(img, pt(sx * ax[0], 0, False), ear, 0, 0, 360, _col(skin * 0.9), -1)
    # head: upper ellipse + chin ellipse
    cv2.ellipse(img, pt(0, 4, False), ax, 0, 180, 360, _col(skin), -1)
    cv2.ellipse(img, pt(0, 4, False), (ax[0], int(ax[1] * p["chin"])), 0, 0, 180, _col(skin), -1)
    cv2.rectangle(img, pt(-ax[0], 2, False), pt(ax[0], 6, False), _col(skin), -1)
    # hair cap: the top of the head ellipse above the hairline (a thin band for style 2)
    cut = int(round(c + p["hairline"]))
    top = max(0, cut - 11) if p["hair_style"] == 2 else 0
    band = img[top:cut]  # a view: drawing is clipped to these rows
    cv2.ellipse(band, pt(0, 4, False, top), (ax[0] + 2, ax[1] + 2), 0, 180, 360, _col(hair), -1)
    if p["beard"][0]:  # lower face below the mouth
        b = int(c + p["mouth_y"] - 4)
        chin = (ax[0], int(ax[1] * p["chin"]))
        cv2.ellipse(img[b:], pt(0, 4, False, b), chin, 0, 0, 180, _col(hair * p["beard"][1]), -1)
    # eyes, brows, glasses
    open_ = rng.uniform(0.7, 1.1)
    er = p["eye_r"]
    for sx in (-1, 1):
        ex, ey = sx * p["eye_dx"], p["eye_y"]
        axes = (int(er + 2), max(1, int((er + 2) * p["eye_aspect"] * open_)))
        cv2.ellipse(img, pt(ex, ey), axes, 0, 0, 360, (245.0, 245.0, 245.0), -1)
        iris_r = max(1, int(er * min(1.0, p["eye_aspect"] * open_ + 0.2)))
        cv2.circle(img, pt(ex, ey), iris_r, _col(p["iris"]), -1)
        cv2.circle(img, pt(ex, ey), max(1, int(er / 2.5)), (10.0, 10.0, 10.0), -1)
        b0 = pt(ex - 7, ey - er - 5 - sx * p["brow"] * 4)
        b1 = pt(ex + 7, ey - er - 5 + sx * p["brow"] * 4)
        cv2.line(img, b0, b1, _col(hair * 0.6), p["brow_w"] + 1)
        if p["glasses"][0]:
            r_ = int(er + 5)
            if p["glasses"][2] == 0:
                cv2.circle(img, pt(ex, ey), r_, _col(p["glasses"][1]), 2)
            else:
                cv2.rectangle(
                    img,
                    pt(ex - r_, ey - r_ + 2),
                    pt(ex + r_, ey + r_ - 2),
                    _col(p["glasses"][1]),
                    2,
                )
    if p["glasses"][0]:
        bridge = p["eye_dx"] - er - 5
        cv2.line(img, pt(-bridge, p["eye_y"]), pt(bridge, p["eye_y"]), _col(p["glasses"][1]), 2)
    # nose, mouth, marks
    nose = np.array(
        [pt(0, p["eye_y"] + 4), pt(-p["nose_w"], p["nose_len"]), pt(p["nose_w"], p["nose_len"])],
        np.int32,
    )
    cv2.fillPoly(img, [nose], _col(skin * 0.75))
    mw, my = p["mouth_w"], p["mouth_y"]
    mc = p["mouth_curve"] + rng.uniform(-2, 2)
    mouth = np.array([pt(-mw, my), pt(0, my + mc), pt(mw, my), pt(0, my + mc + p["mouth_h"])], np.int32)
    cv2.fillPoly(img, [mouth], _col(p["lips"]))
    for mx, my_, mr, mcol in p["marks"]:
        cv2.circle(img, pt(mx, my_), int(mr), _col(mcol), -1)

    # pose: rotation, scale, shift
    M = cv2.getRotationMatrix2D((c, c), rng.uniform(-10, 10), rng.uniform(0.92, 1.08))
    M[:, 2] += rng.uniform(-5, 5, 2)
    img = cv2.warpAffine(img, M, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # lighting: gain with a colour cast, offset, directional gradient
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.93, 1.07, 3)
    cv2.multiply(img, _col(gain) + (1.0,), dst=img)
    ramp = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32) * np.float32(rng.uniform(-20, 20))
    ramp += np.float32(rng.uniform(-12, 12))
    img += ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    if rng.random() < 0.15:  # occluder (hand, microphone...)
        x0, y0 = rng.integers(0, SIZE - 16, 2)
        w, h = rng.integers(10, 28, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    # sensor noise: a random window of a fixed Gaussian bank (fast, still deterministic)
    off = int(rng.integers(0, _NOISE_BANK.size - img.size))
    noise = _NOISE_BANK[off : off + img.size].reshape(img.shape)
    cv2.scaleAdd(noise, float(rng.uniform(2, 8)), img, dst=img)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_image(seed: int, identity: int, index: int, params: Optional[dict] = None) -> bytes:
    """JPEG bytes of image ``index`` of ``identity`` (pure function of the three)."""
    p = params if params is not None else identity_params(seed, identity)
    rng = np.random.default_rng([int(seed), int(identity), 1, int(index)])
    return encode_jpeg(render_face(p, rng), quality=JPEG_QUALITY)


def _identity_images(args) -> list:
    seed, identity, n = args
    p = identity_params(seed, identity)
    return [render_image(seed, identity, j, p) for j in range(n)]


def _render_list(args) -> list:
    seed, todo = args
    return [render_image(seed, ident, j) for ident, j in todo]


def _pool(workers: int):
    """A process pool started from a forkserver (spawn where there is none), or None for 1.

    Not ``fork``: OpenCV's thread pool does not survive a fork, so a forked child drawing with
    cv2 deadlocks when this process already used cv2 (e.g. rendered or resized something).
    """
    import multiprocessing as mp

    if workers <= 1:
        return None
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(workers, initializer=_init_worker)


def _init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def make_synthetic_dataset(
    out_dir,
    num_identities: int = 1000,
    images_per_identity: int = 16,
    heldout_identities: int = 200,
    heldout_pairs: int = 1000,
    seed: int = 1234,
    layout: str = "insightface",
    workers: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Write ``train.rec/.idx/property`` (identities 0..N-1), ``heldout.bin`` and ``synthetic.json``.

    ``heldout.bin`` holds ``heldout_pairs`` pairs (ceil half genuine) from identities
    N .. N+heldout_identities-1, never in train.rec, each with ``images_per_identity`` candidate
    images. Returns the paths and the generation metadata.
    """
    if num_identities < 1 or images_per_identity < 1:
        raise ValueError("need at least one identity and one image per identity")
    if heldout_pairs and (heldout_identities < 2 or images_per_identity < 2):
        raise ValueError("held-out pairs need >= 2 held-out identities and >= 2 images per identity")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):
            return x

    pool = _pool(workers)
    try:
        jobs = [(seed, i, images_per_identity) for i in range(num_identities)]
        it = pool.imap(_identity_images, jobs, chunksize=8) if pool else map(_identity_images, jobs)
        it = tqdm(
            it,
            total=num_identities,
            desc="synthetic identities",
            disable=not progress,
            mininterval=2,
        )

        def items():
            for ident, imgs in enumerate(it):
                for b in imgs:
                    yield ident, b

        rec = write_dataset(out, items(), num_identities, (SIZE, SIZE), layout=layout)

        bin_path = None
        if heldout_pairs:
            held = np.arange(num_identities, num_identities + heldout_identities)
            labels = np.repeat(held, images_per_identity)  # virtual image i = (labels[i], i % k)
            pairs = sample_pairs(labels, heldout_pairs, seed=seed)
            need = sorted({i for a, b, _ in pairs for i in (a, b)})
            todo = [(int(labels[i]), i % images_per_identity) for i in need]
            chunks = [todo[k : k + 64] for k in range(0, len(todo), 64)]
            rendered = (
                pool.map(_render_list, [(seed, ch) for ch in chunks])
                if pool
                else [_render_list((seed, ch)) for ch in chunks]
            )
            enc = dict(zip(need, [b for ch in rendered for b in ch]))
            bins = [enc[i] for a, b, _ in pairs for i in (a, b)]
            bin_path = out / "heldout.bin"
            write_bin(bin_path, bins, [s for _, _, s in pairs])
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    if pool is not None:
        pool.close()
        pool.join()
    meta = dict(
        rec=str(rec),
        idx=str(rec.with_suffix(".idx")),
        property=str(out / "property"),
        bin=str(bin_path) if bin_path else None,
        num_identities=num_identities,
        images_per_identity=images_per_identity,
        num_images=num_identities * images_per_identity,
        heldout_identities=heldout_identities,
        heldout_pairs=heldout_pairs,
        seed=seed,
        layout=layout,
        image_size=[SIZE, SIZE],
        jpeg_quality=JPEG_QUALITY,
    )
    (out / "synthetic.json").write_text(json.dumps(meta, indent=1))
    return meta


def make_synthetic_ijb(
    out_dir,
    num_identities: int = 50,
    images_per_identity: int = 6,
    first_identity: int = 10**6,
    seed: int = 1234,
    prefix: str = "synth",
    images_per_template: int = 3,
) -> dict:
    """An IJB-layout folder from held-out synthetic identities (never in a training set that uses
    identities below ``first_identity``): ``loose_crop/*.jpg`` + ``meta/<prefix>_face_tid_mid.txt``
    and ``meta/<prefix>_template_pair_label.txt`` (genuine and impostor template pairs)."""
    out = Path(out_dir)
    (out / "loose_crop").mkdir(parents=True, exist_ok=True)
    names, ids = [], []
    for i in range(num_identities):
        ident = first_identity + i
        params = identity_params(seed, ident)
        for j in range(images_per_identity):
            name = f"{ident}_{j}.jpg"
            (out / "loose_crop" / name).write_bytes(render_image(seed, ident, j, params))
            names.append(name)
            ids.append(ident)
    meta = write_ijb_meta(
        out / "meta", prefix, names, ids, images_per_template=images_per_template, seed=seed
    )
    return dict(folder=str(out), prefix=prefix, images=len(names), meta=meta)
