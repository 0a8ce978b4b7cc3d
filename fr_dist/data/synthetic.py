"""Procedural face-identity dataset, written as insightface-layout RecordIO + a held-out ``.bin``.

Each identity is a parametric "face": head shape and skin tone, hair colour and hairline, eye
spacing/height/size/iris colour, brow slant, nose length/width, mouth width/height/curve and
colour, and three identity-specific marks (position, size, colour). Each image of an identity
redraws it under a random pose (rotation, shift, scale), lighting (gain, bias, colour cast),
background, sensor noise, blur and occasional occluder, then JPEG-encodes it. Identity is
visible in the image but varies, so raw-pixel matching performs poorly while a small CNN learns
embeddings that verify held-out identities (never in train.rec) well.

Deterministic: every image is a pure function of (seed, identity, image index).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from fr_dist.data.image import encode_jpeg
from fr_dist.data.recordio import write_dataset

__all__ = ["identity_params", "render_face", "make_synthetic_dataset", "demo_dataset_spec"]

SIZE = 112


def demo_dataset_spec() -> dict:
    """Sizes of the README demo set."""
    return dict(num_identities=1000, images_per_identity=16, heldout_identities=200, heldout_pairs=1000)


def identity_params(seed: int, identity: int) -> dict:
    r = np.random.default_rng([seed, identity, 0])
    return dict(
        skin=r.uniform(60, 230, 3),
        head_ax=(r.uniform(28, 40), r.uniform(36, 48)),
        hair=r.uniform(0, 255, 3),
        hairline=r.uniform(-30, -14),
        eye_dx=r.uniform(11, 20),
        eye_y=r.uniform(-12, -2),
        eye_r=r.uniform(3.0, 7.0),
        iris=r.uniform(0, 255, 3),
        brow=r.uniform(-0.5, 0.5),
        nose_len=r.uniform(8, 20),
        nose_w=r.uniform(3, 9),
        mouth_w=r.uniform(8, 20),
        mouth_y=r.uniform(14, 26),
        mouth_curve=r.uniform(-6, 6),
        lips=r.uniform(0, 255, 3),
        marks=[(r.uniform(-25, 25), r.uniform(-25, 30), r.uniform(2, 6), r.uniform(0, 255, 3)) for _ in range(3)],
    )


def render_face(p: dict, rng: np.random.Generator) -> np.ndarray:
    """One 112x112 RGB uint8 image of identity ``p`` under random nuisance factors."""
    import cv2

    bg = rng.uniform(0, 255, 3)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = bg
    c = SIZE / 2

    def pt(x, y):
        return int(round(c + x)), int(round(c + y))

    ax = (int(p["head_ax"][0]), int(p["head_ax"][1]))
    cv2.ellipse(img, pt(0, 4), (ax[0] + 3, ax[1] + 3), 0, 180, 360, tuple(p["hair"].tolist()), -1)  # hair
    cv2.ellipse(img, pt(0, 4), ax, 0, 0, 360, tuple(p["skin"].tolist()), -1)  # face
    cv2.rectangle(img, pt(-ax[0], -ax[1] + 4), pt(ax[0], p["hairline"]), tuple(p["hair"].tolist()), -1)
    cv2.ellipse(img, pt(0, 4), ax, 0, 0, 360, tuple((p["skin"] * 0.8).tolist()), 1)
    for sx in (-1, 1):
        ex, ey = sx * p["eye_dx"], p["eye_y"]
        cv2.circle(img, pt(ex, ey), int(p["eye_r"] + 2), (250, 250, 250), -1)
        cv2.circle(img, pt(ex, ey), max(1, int(p["eye_r"])), tuple(p["iris"].tolist()), -1)
        cv2.circle(img, pt(ex, ey), max(1, int(p["eye_r"] / 2.5)), (10, 10, 10), -1)
        b0 = pt(ex - 7, ey - p["eye_r"] - 5 - sx * p["brow"] * 4)
        b1 = pt(ex + 7, ey - p["eye_r"] - 5 + sx * p["brow"] * 4)
        cv2.line(img, b0, b1, tuple((p["hair"] * 0.6).tolist()), 2)
    nose = np.array([pt(0, 0), pt(-p["nose_w"], p["nose_len"]), pt(p["nose_w"], p["nose_len"])], np.int32)
    cv2.fillPoly(img, [nose], tuple((p["skin"] * 0.75).tolist()))
    mw, my, mc = p["mouth_w"], p["mouth_y"], p["mouth_curve"]
    mouth = np.array([pt(-mw, my), pt(0, my + mc), pt(mw, my), pt(0, my + mc + 4)], np.int32)
    cv2.fillPoly(img, [mouth], tuple(p["lips"].tolist()))
    for mx, my_, mr, mcol in p["marks"]:
        cv2.circle(img, pt(mx, my_), int(mr), tuple(mcol.tolist()), -1)

    # pose: rotation, scale, shift
    ang = rng.uniform(-12, 12)
    scale = rng.uniform(0.9, 1.1)
    M = cv2.getRotationMatrix2D((c, c), ang, scale)
    M[:, 2] += rng.uniform(-6, 6, 2)
    img = cv2.warpAffine(img, M, (SIZE, SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(bg.tolist()))
    # lighting: gain, bias, colour cast, gradient
    gain = rng.uniform(0.7, 1.3)
    cast = rng.uniform(0.85, 1.15, 3)
    grad = np.linspace(rng.uniform(-25, 25), rng.uniform(-25, 25), SIZE, dtype=np.float32)
    img = img * gain * cast + rng.uniform(-25, 25) + (grad[None, :, None] if rng.random() < 0.5 else grad[:, None, None])
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.25:  # occluder
        x0, y0 = rng.integers(0, SIZE - 20, 2)
        w, h = rng.integers(12, 35, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    img = img + rng.normal(0, rng.uniform(3, 10), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _image(seed: int, identity: int, index: int, params: dict) -> bytes:
    rng = np.random.default_rng([seed, identity, 1, index])
    return encode_jpeg(render_face(params, rng), quality=90)


def make_synthetic_dataset(out_dir, num_identities: int = 1000, images_per_identity: int = 16,
                           heldout_identities: int = 200, heldout_pairs: int = 1000, seed: int = 1234,
                           layout: str = "insightface") -> dict:
    """Write ``train.rec/.idx/property`` (identities 0..N-1) and ``heldout.bin`` (other identities)."""
    from fr_dist.data.pairs import write_bin

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x

    def items():
        for ident in tqdm(range(num_identities), desc="synthetic identities", mininterval=5):
            p = identity_params(seed, ident)
            for j in range(images_per_identity):
                yield ident, _image(seed, ident, j, p)

    rec = write_dataset(out, items(), num_identities, (SIZE, SIZE), layout=layout)
    # held-out pairs: identities num_identities .. num_identities + heldout - 1
    rng = np.random.default_rng([seed, 2])
    held = np.arange(num_identities, num_identities + heldout_identities)
    params = {int(i): identity_params(seed, int(i)) for i in held}
    bins, issame = [], []
    for k in range(heldout_pairs):
        same = k % 2 == 0
        a = int(rng.choice(held))
        b = a if same else int(rng.choice(held[held != a]))
        bins += [_image(seed, a, 1000 + 2 * k, params[a]), _image(seed, b, 1001 + 2 * k, params[b])]
        issame.append(same)
    bin_path = out / "heldout.bin"
    write_bin(bin_path, bins, issame)
    meta = dict(rec=str(rec), bin=str(bin_path), num_identities=num_identities,
                images_per_identity=images_per_identity, heldout_identities=heldout_identities,
                heldout_pairs=heldout_pairs, seed=seed)
    return meta


def heldout_images(out_dir) -> tuple[list, list]:
    """The held-out pairs' encoded images and truth (for tests and tools)."""
    with open(Path(out_dir) / "heldout.bin", "rb") as f:
        return pickle.load(f)
