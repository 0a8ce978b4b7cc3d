"""Write tests/golden/<loss>_official.npz: the losses of issue 18 computed by their authors' own code.

    python tools/make_loss_vectors.py [--mirrors /work/.mirror] [--only adaface ...] [--out tests/golden]

Each loss has a module ``tools/loss_vectors/<loss>.py`` that names its official repository, the pinned
commit and the files it reads (``git show COMMIT:PATH`` of a clone or bare git directory under
``--mirrors/<owner>+<name>/repo``, or ``--repo <loss>=DIR``), imports them from a temporary package
(:func:`make_reference_vectors.import_package`; nothing of them is stored here), runs them unmodified on CPU in
float64 on the inputs of :func:`inputs` and returns arrays in fr_dist's conventions (the weight as
[K, D] rows, gradients w.r.t. the tensors fr_dist holds). The archive layout (read by tests/official.py):

    meta                       JSON: loss, hp (create_head keywords), cases {case: {K, N, D, batches}},
                               repository, commit, sha256 of every file read, torch version, notes
    <case>/W                   [K, D] the weight as fr_dist's head holds it (load_full_weight)
    <case>/b                   [] the bias in fr_dist's convention (binary losses only)
    <case>/x<t>, <case>/y<t>   [N, D] raw embeddings, [N] labels of batch t (t = 0, 1, ...)
    <case>/loss<t>             [] the loss the official training loop optimises on batch t
    <case>/dx<t>, <case>/dW<t> [N, D] dL/dx (raw embeddings), [K, D] dL/dW (fr_dist's weight)
    <case>/db<t>               [] dL/db (binary losses)
    <case>/state<t>/<name>     the loss's state buffers (fr_dist names) after batch t

Batches run one after another on the same module, gradients zeroed in between, no optimizer step.
Cases: ``k29`` (K = 29: uneven shards on W = 2, 3, 4) and ``k3`` (K = 3: an empty shard on W = 4).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_reference_vectors import git_show, import_package, save, sha256  # noqa: E402

LOSSES = ("sphereface", "adaface", "curricularface", "magface", "uniface")
N, D = 24, 12  # global batch divisible by W = 1..4; embedding size
CASES = {"k29": 29, "k3": 3}


def inputs(K: int, seed: int, batches: int = 2, norm_range=(0.3, 5.0)) -> dict:
    """Weight [K, D] (rows of different norms) and ``batches`` batches of raw embeddings [N, D] near their
    classes' rows at every angle (one nearly antipodal per batch), norms log-uniform in ``norm_range``,
    labels with both end classes and repeats (so every shard boundary and an empty-shard rank are hit)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(K, D)) * rng.uniform(0.5, 2.0, (K, 1))
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    out = dict(W=W)
    for t in range(batches):
        y = rng.integers(0, K, N)
        y[[0, 1, 7]] = [0, K - 1, K - 1]
        y[[3, 9, 11]] = y[5]
        c = rng.uniform(-0.6, 3.0, N)
        c[4] = -4.0
        direction = c[:, None] * Wn[y] + rng.normal(size=(N, D)) / np.sqrt(D)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lo, hi = np.log(norm_range[0]), np.log(norm_range[1])
        norms = np.exp(rng.uniform(lo, hi, N))
        out[f"x{t}"] = direction * norms[:, None]
        out[f"y{t}"] = y.astype(np.int64)
    return out


def read_sources(repo: Path, rev: str, files: list[str]) -> tuple[dict, str, dict]:
    """({basename: text}, commit, {path: sha256}) of ``files`` at ``rev``."""
    texts, shas, commit = {}, {}, None
    for path in files:
        text, commit = git_show(repo, rev, path)
        texts[Path(path).name] = text
        shas[path] = sha256(text)
    return texts, commit, shas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mirrors", default="/work/.mirror", help="folder of <owner>+<name>/repo git dirs")
    ap.add_argument("--repo", action="append", default=[], help="LOSS=DIR: that loss's repository")
    ap.add_argument("--only", nargs="*", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--out", default=str(REPO / "tests" / "golden"))
    args = ap.parse_args(argv)
    given = dict(r.split("=", 1) for r in args.repo)
    torch.set_default_dtype(torch.float64)
    for name in args.only:
        mod = importlib.import_module(f"loss_vectors.{name}")
        repo = Path(given.get(name) or Path(args.mirrors) / mod.REPOSITORY.replace("/", "+") / "repo")
        texts, commit, shas = read_sources(repo, mod.REV, mod.FILES)
        with tempfile.TemporaryDirectory() as tmp:
            modules = import_package(texts, f"official_{name}", Path(tmp))
            arrays, meta = mod.generate(modules)
        meta = dict(
            meta,
            loss=name,
            repository=f"https://github.com/{mod.REPOSITORY}",
            commit=commit,
            files=shas,
            torch=torch.__version__,
        )
        out = Path(args.out) / f"{name}_official.npz"
        save(out, {k: np.asarray(v) for k, v in arrays.items()}, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
