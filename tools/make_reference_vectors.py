"""Write tests/golden/*.npz: SphereFace2 and Partial-FC vectors computed by the authors' own code.

    python tools/make_reference_vectors.py --opensphere DIR --insightface DIR [--out tests/golden]

DIR is a git repository (a clone, or a bare git directory such as the one ``git clone --mirror``
makes) of github.com/ydwen/opensphere and of github.com/deepinsight/insightface. The reference
files are read from the pinned commits (``--*-rev``) at run time, written to a temporary
package and imported from there; nothing of them is stored in this repository. They run
unmodified on CPU in float64; the only interventions are

* recorders that stand in for the module globals ``torch`` / ``F`` (OpenSphere) and wrap the
  margin callable (insightface) to capture intermediates (cosines, logits, BCE weights); they
  pass every call through unchanged;
* ``torch.Tensor.cuda`` -> identity inside the Partial-FC ranks, which run as real gloo process
  groups of 2 and 3 processes (one per rank) started by ``fr_dist.testing.spawn_gloo``.

The inputs (seeds, shapes) differ from ../shared/golden on purpose, so the two sets check the
implementation independently. The archives use the same array names and ``meta`` layout as
../shared/golden (see tests/golden/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

OPENSPHERE_REVS = {  # the three generations of the SphereFace2 head
    "main": "a679e82032455941932e23e3d3cbab6b8c07e3d4",  # opensphere/module/head/sphereface2.py
    "v2022": "032c31b8918fb7639d3b34ac7433bfd537c6c518",  # branch OpenSphere_v0, model/head/sphereface2.py
    "iclr21": "4d17308a644034b46907006fa85fe2a4ef8863f7",  # branch SphereFace2_ICLR21, sphereface2c.py
}
INSIGHTFACE_REV = "7fadd420c2351d0ffa8cac403421c1a3ed733365"
OS_FILES = {
    "main": ["opensphere/module/head/common.py", "opensphere/module/head/sphereface2.py"],
    "v2022": ["model/head/sphereface2.py"],
    "iclr21": ["model/head/sphereface2c.py"],
}
IF_FILES = ["recognition/arcface_torch/losses.py", "recognition/arcface_torch/partial_fc_v2.py"]

# SphereFace2 cases: the same five head configurations as ../shared/golden (tests/unit/test_golden.py
# keeps the table of the matching fr_dist arguments).
SF2_CASES = {
    "c1": dict(version="main", cls="SphereFace2", magn_type="C", g_detached=True,
               hp=dict(alpha=0.7, r=40.0, m=0.4, t=3.0, lw=50.0), note="main head, defaults"),
    "c2": dict(version="main", cls="SphereFace2", magn_type="C", g_detached=True,
               hp=dict(alpha=0.8, r=64.0, m=0.5, t=3.0, lw=50.0), note="main head, ms1m_iresnet100 values"),
    "c3": dict(version="v2022", cls="SphereFace2", magn_type="A", g_detached=True,
               hp=dict(magn_type="A", alpha=0.7, r=40.0, m=0.5, t=3.0, lw=10.0), note="v2022 head, additive angular"),
    "c4": dict(version="v2022", cls="SphereFace2", magn_type="M", g_detached=True,
               hp=dict(magn_type="M", alpha=0.7, r=40.0, m=1.7, t=3.0, lw=10.0),
               note="v2022 head, multiplicative angular"),
    "c5": dict(version="iclr21", cls="SphereFace2C", magn_type="C", g_detached=False,
               hp=dict(alpha=0.7, r=40.0, m=0.4, t=3.0, lw=10.0), note="ICLR21 branch, g not detached"),
}  # fmt: skip
PFC_MARGINS = {  # CombinedMarginLoss(s, m1, m2, m3); checked against losses.ArcFace / losses.CosFace too
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, cls="ArcFace", cls_kw=dict(s=64.0, margin=0.5)),
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.4, cls="CosFace", cls_kw=dict(s=64.0, m=0.4)),
}
SF2_SHAPE = dict(B=20, D=12, K=29, seed=20251)
PFC_SHAPE = dict(B_local=6, D=12, K=29, seed=20252, world_sizes=(2, 3))


# ----------------------------------------------------------------------------- reading the sources
def git_show(repo: Path, rev: str, path: str) -> tuple[str, str]:
    """(text of ``path`` at ``rev``, the full commit hash) from a clone or a bare git directory."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{repo}: git {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    return git("show", f"{commit}:{path}"), commit


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def import_package(files: dict[str, str], package: str, tmp: Path) -> dict:
    """Write ``files`` (name -> source) as package ``package`` under ``tmp`` and import each module."""
    d = tmp / package
    d.mkdir()
    (d / "__init__.py").write_text("")
    for name, text in files.items():
        (d / name).write_text(text)
    if str(tmp) not in sys.path:
        sys.path.insert(0, str(tmp))
    return {name: importlib.import_module(f"{package}.{Path(name).stem}") for name in files}


class Recorder:
    """Stands in for a module (``torch``, ``torch.nn.functional``); records the listed calls' args."""

    def __init__(self, real, record: dict):
        self._real, self._record, self.calls = real, record, {}

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in self._record:
            return attr

        def wrapped(*args, **kwargs):
            self.calls[name] = self._record[name](*args, **kwargs)
            return attr(*args, **kwargs)

        return wrapped


# ----------------------------------------------------------------------------- inputs
def normalize_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def features_for(rng, W: np.ndarray, y: np.ndarray, antipodal: int) -> np.ndarray:
    """x = scale * (c * normalize(W)[y] + noise): targets at every angle, one nearly antipodal."""
    B, D = len(y), W.shape[1]
    c = rng.uniform(-0.6, 3.0, B)
    c[antipodal] = -4.0
    noise = rng.normal(size=(B, D)) / np.sqrt(D)
    scale = rng.uniform(0.3, 5.0, B)
    return scale[:, None] * (c[:, None] * normalize_rows(W)[y] + noise)  # [B, D]


def sf2_inputs() -> dict:
    B, D, K, seed = (SF2_SHAPE[k] for k in ("B", "D", "K", "seed"))
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(K, D)) * rng.uniform(0.5, 2.0, (K, 1))
    y = rng.integers(0, K, B)
    y[[0, 1, 7]] = [0, K - 1, K - 1]  # both ends, a repeated class
    y[[3, 9, 11]] = y[5]  # a class three more times
    x = features_for(rng, W, y, antipodal=4)
    return dict(x=x, W_raw=W, y=y.astype(np.int64))


def shards(K: int, n: int) -> tuple[list, list]:
    """insightface's class_start / num_local per rank (recorded; the reference computes its own)."""
    num = [K // n + int(r < K % n) for r in range(n)]
    start = [K // n * r + min(r, K % n) for r in range(n)]
    return start, num


def pfc_inputs() -> dict:
    B, D, K, seed = (PFC_SHAPE[k] for k in ("B_local", "D", "K", "seed"))
    rng = np.random.default_rng(seed)
    out = dict(W=rng.normal(size=(K, D)) * rng.uniform(0.5, 2.0, (K, 1)) * 0.01)
    for n in PFC_SHAPE["world_sizes"]:
        r = np.random.default_rng([seed, n])
        N = n * B
        start, _ = shards(K, n)
        planted = [K - 1, K - 1, 0] + start[1:] + [s - 1 for s in start[1:]]  # ends, shard boundaries
        y = r.integers(0, K, N)
        pos = r.permutation(N)
        y[pos[: len(planted)]] = planted
        y[pos[len(planted)]] = y[pos[len(planted) + 1]]  # one more repeat
        out[f"ws{n}_x"] = features_for(r, out["W"], y, antipodal=int(pos[-1]))
        out[f"ws{n}_y"] = y.astype(np.int64)
    return out


# ----------------------------------------------------------------------------- SphereFace2
def run_sphereface2(repo: Path, revs: dict, tmp: Path) -> tuple[dict, dict]:
    inp = sf2_inputs()
    K, D = inp["W_raw"].shape
    heads, commits, sources = {}, {}, {}
    for version, files in OS_FILES.items():
        texts = {}
        for f in files:
            text, commits[version] = git_show(repo, revs[version], f)
            texts[Path(f).name] = text
            sources[f"{version}-{commits[version][:7]}/{f}"] = sha256(text)
        heads[version] = import_package(texts, f"_opensphere_{version}", tmp)[Path(files[-1]).name]
    arrays = dict(inp)
    meta_cases = {}
    W_used = None
    for case, spec in SF2_CASES.items():
        mod = heads[spec["version"]]
        rec_torch = Recorder(torch, {"zeros_like": lambda t, *a, **k: t.detach().clone()})  # one_hot from cos
        rec_f = Recorder(
            mod.F,
            {"binary_cross_entropy_with_logits": lambda z, target, weight=None, **k: (z.detach().clone(),
                                                                                     weight.detach().clone())},
        )  # fmt: skip
        mod.torch, mod.F = rec_torch, rec_f
        head = getattr(mod, spec["cls"])(D, K, **spec["hp"])
        kd = spec["version"] == "main"  # main: [K, D] rows; v2022 / ICLR: [D, K] columns
        w0 = torch.tensor(inp["W_raw"] if kd else inp["W_raw"].T.copy())
        with torch.no_grad():
            head.w.copy_(w0)
        b = head.b.detach().clone()
        x = torch.tensor(inp["x"], requires_grad=True)
        loss = head(x, torch.tensor(inp["y"]))
        loss.backward()
        mod.torch, mod.F = torch, torch.nn.functional
        wu = head.w.detach() if kd else head.w.detach().T
        dw = head.w.grad if kd else head.w.grad.T
        if W_used is None:
            W_used = wu.clone()
        np.testing.assert_allclose(wu.numpy(), W_used.numpy(), rtol=0, atol=1e-15)
        logits, weight = rec_f.calls["binary_cross_entropy_with_logits"]
        arrays.update({
            f"{case}_b": b.numpy(), f"{case}_loss": loss.detach().numpy(), f"{case}_dL_dx": x.grad.numpy(),
            f"{case}_dL_dW_used": dw.numpy().copy(), f"{case}_dL_db": head.b.grad.numpy(),
            f"{case}_cos_theta": rec_torch.calls["zeros_like"].numpy(), f"{case}_logits": logits.numpy(),
            f"{case}_bce_weight": weight.numpy(),
        })  # fmt: skip
        rev_file, commit = OS_FILES[spec["version"]][-1], commits[spec["version"]]
        meta_cases[case] = dict(
            description=f"opensphere {spec['note']} ({spec['cls']}, type {spec['magn_type']})",
            reference_file=f"{spec['version']}-{commit[:7]}/{rev_file}",
            commit=commit,
            hyperparameters=spec["hp"],
            magn_type=spec["magn_type"],
            g_detached=spec["g_detached"],
            weight_parameter_layout="[K,D] rows" if kd else "[D,K] columns; stored here transposed to [K,D]",
            b_init=float(b[0]),
            loss=float(loss.detach()),
        )
    arrays["W_used"] = W_used.numpy()
    _check_sf2_coverage(arrays)
    meta = dict(
        description="SphereFace2 vectors from the OpenSphere heads, run unmodified on CPU in float64",
        set="fr_dist (independent of ../shared/golden: other seed and shapes)",
        **{k: SF2_SHAPE[k] for k in ("B", "D", "K", "seed")},
        dtype="float64",
        torch_version=torch.__version__,
        input_generation="see sf2_inputs() in tools/make_reference_vectors.py; inputs are stored",
        conventions="as ../shared/golden/README.md section 1 (same array names and meanings)",
        cases=meta_cases,
        sha256_reference_files=sources,
    )
    return arrays, meta


def _check_sf2_coverage(a: dict) -> None:
    """The inputs reach the corners the tests are meant to see (clips active, classes repeated)."""
    cos, y = a["c3_cos_theta"], a["y"]
    theta_y = np.arccos(np.clip(cos[np.arange(len(y)), y], -1 + 1e-5, 1 - 1e-5))
    assert (theta_y + 0.5 > 3.14159).any(), "no A-margin target clipped at 3.14159"
    assert (theta_y * 1.7 > 3.14159).sum() >= 2, "M-margin clip active for fewer than 2 targets"
    assert np.bincount(y).max() >= 3 and {0, a["W_raw"].shape[0] - 1} <= set(y.tolist())


# ----------------------------------------------------------------------------- Partial FC
def _pfc_rank(rank, world, texts, x_all, y_all, W, margins):
    """One insightface rank: PartialFC_V2(CombinedMarginLoss) on this rank's rows, float64, CPU."""
    torch.set_default_dtype(torch.float64)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference calls .cuda() on CPU tensors
    warnings.filterwarnings("ignore", r".*torch\.cuda\.amp\.autocast", FutureWarning)  # its autocast(False)
    with tempfile.TemporaryDirectory() as tmp:
        mods = import_package(texts, "_insightface_arcface_torch", Path(tmp))
    losses, pfc_mod = mods["losses.py"], mods["partial_fc_v2.py"]
    B = x_all.shape[0] // world
    out = {}
    for name, mg in margins.items():
        for flavour in ("combined", "class"):
            if flavour == "combined":
                margin = losses.CombinedMarginLoss(mg["s"], mg["m1"], mg["m2"], mg["m3"])
            else:
                margin = getattr(losses, mg["cls"])(**mg["cls_kw"])
            seen = {}

            def recorded(logits, labels, margin=margin, seen=seen):
                seen["cos"] = logits.detach().clone()  # the margin edits its input in place
                res = margin(logits, labels)
                seen["logits"] = res.detach().clone()
                return res

            pfc = pfc_mod.PartialFC_V2(recorded, W.shape[1], W.shape[0], sample_rate=1.0, fp16=False)
            with torch.no_grad():
                pfc.weight.copy_(W[pfc.class_start : pfc.class_start + pfc.num_local])
            x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
            loss = pfc(x, y_all[rank * B : (rank + 1) * B].clone())
            loss.backward()
            out[(name, flavour)] = dict(
                loss=loss.detach(), dx=x.grad, dW=pfc.weight.grad, start=pfc.class_start,
                n=pfc.num_local, cos=seen["cos"], logits=seen["logits"],
            )  # fmt: skip
    return out


def run_partial_fc(repo: Path, rev: str) -> tuple[dict, dict]:
    from fr_dist.testing import spawn_gloo

    texts, files = {}, {}
    for f in IF_FILES:
        text, commit = git_show(repo, rev, f)
        texts[Path(f).name] = text
        files[Path(f).name] = sha256(text)
    inp = pfc_inputs()
    arrays = dict(inp)
    W = torch.tensor(inp["W"])
    K = W.shape[0]
    margins = PFC_MARGINS
    meta_cases = {}
    for n in PFC_SHAPE["world_sizes"]:
        x, y = torch.tensor(inp[f"ws{n}_x"]), torch.tensor(inp[f"ws{n}_y"])
        res = spawn_gloo(_pfc_rank, n, args=(texts, x, y, W, margins), timeout_s=300)
        start, num = shards(K, n)
        assert [r[("arcface", "combined")]["start"] for r in res] == start
        assert [r[("arcface", "combined")]["n"] for r in res] == num
        arrays[f"ws{n}_class_start"] = np.array(start, np.int64)
        arrays[f"ws{n}_num_local"] = np.array(num, np.int64)
        for name in margins:
            rs = [r[(name, "combined")] for r in res]
            for r in res:  # the same loss on every rank; losses.ArcFace / CosFace == CombinedMarginLoss
                torch.testing.assert_close(r[(name, "combined")]["loss"], rs[0]["loss"], rtol=0, atol=0)
                for k in ("loss", "dx", "dW", "cos", "logits"):
                    torch.testing.assert_close(
                        r[(name, "class")][k], r[(name, "combined")][k], rtol=0, atol=0
                    )
            pre = f"ws{n}_{name}"
            arrays[f"{pre}_loss"] = rs[0]["loss"].numpy()
            arrays[f"{pre}_dL_dx_raw"] = torch.cat([r["dx"] for r in rs]).numpy()  # [N, D], rank order
            arrays[f"{pre}_dL_dW"] = torch.cat([r["dW"] for r in rs]).numpy()  # [K, D], class order
            arrays[f"{pre}_cos"] = torch.cat([r["cos"] for r in rs], dim=1).numpy()  # [N, K]
            arrays[f"{pre}_logits"] = torch.cat([r["logits"] for r in rs], dim=1).numpy()  # [N, K]
            meta_cases[pre] = dict(
                world_size=n, margin=name, loss=float(rs[0]["loss"]), grad_x_factor=n,
                class_start=start, num_local=num,
            )  # fmt: skip
        cos = arrays[f"ws{n}_arcface_cos"][np.arange(len(y)), inp[f"ws{n}_y"]]
        assert (np.arccos(cos) + 0.5 > np.pi).any(), f"ws{n}: no ArcFace target wraps past pi"
        assert np.abs(arrays[f"ws{n}_arcface_cos"]).max() < 1, "the [-1, 1] clip would be active"
    meta = dict(
        description=(
            "Partial-FC (insightface PartialFC_V2, sample_rate=1.0, CombinedMarginLoss) vectors, run "
            "unmodified under torch.distributed gloo on CPU, one process per rank, float64. Only patch: "
            "torch.Tensor.cuda -> identity. losses.ArcFace / losses.CosFace give bit-identical results."
        ),
        set="fr_dist (independent of ../shared/golden: other seed and shapes)",
        **{k: PFC_SHAPE[k] for k in ("B_local", "D", "K", "seed")},
        dtype="float64",
        torch_version=torch.__version__,
        backend="gloo",
        reference_repo="github.com/deepinsight/insightface recognition/arcface_torch",
        reference_commit=commit,
        reference_files=files,
        margins={
            k: dict(
                s=v["s"],
                m1=v["m1"],
                m2=v["m2"],
                m3=v["m3"],
                ctor=f"CombinedMarginLoss({v['s']}, {v['m1']}, {v['m2']}, {v['m3']})",
            )
            for k, v in PFC_MARGINS.items()
        },  # fmt: skip
        input_generation="see pfc_inputs() in tools/make_reference_vectors.py; inputs are stored",
        conventions="as ../shared/golden/README.md section 2 (same array names and meanings)",
        world_sizes=list(PFC_SHAPE["world_sizes"]),
        cases=meta_cases,
    )
    return arrays, meta


def save(path: Path, arrays: dict, meta: dict) -> None:
    meta = dict(meta, array_names=sorted(arrays))
    np.savez_compressed(path, meta=np.array(json.dumps(meta, indent=1)), **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(arrays)} arrays)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--opensphere", type=Path, required=True, help="git clone / bare git dir of ydwen/opensphere"
    )
    p.add_argument("--insightface", type=Path, required=True, help="git clone / bare git dir of insightface")
    p.add_argument("--out", type=Path, default=REPO / "tests" / "golden")
    for k, v in OPENSPHERE_REVS.items():
        p.add_argument(f"--opensphere-{k}-rev", default=v, help=f"default {v[:7]}")
    p.add_argument("--insightface-rev", default=INSIGHTFACE_REV, help=f"default {INSIGHTFACE_REV[:7]}")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    revs = {k: getattr(a, f"opensphere_{k}_rev") for k in OPENSPHERE_REVS}
    torch.set_default_dtype(torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        save(a.out / "sphereface2_opensphere.npz", *run_sphereface2(a.opensphere, revs, Path(tmp)))
    save(a.out / "partial_fc_insightface.npz", *run_partial_fc(a.insightface, a.insightface_rev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
