"""Reproduce the golden vectors (OpenSphere SphereFace2, insightface Partial FC) in float64.

Each test runs on tests/golden (tools/make_reference_vectors.py) and on ../shared/golden when present.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference import margin_softmax_loss, sphereface2_loss

from fr_dist.heads import PartialFCHead, SphereFace2Head, sphereface2_bias_init
from fr_dist.testing import spawn_gloo

RTOL = 1e-9
SF2_CASES = {
    "c1": dict(lam=0.7, r=40.0, m=0.4, t=3.0, lw=50.0, margin="C", grad="detached"),
    "c2": dict(lam=0.8, r=64.0, m=0.5, t=3.0, lw=50.0, margin="C", grad="detached"),
    "c3": dict(lam=0.7, r=40.0, m=0.5, t=3.0, lw=10.0, margin="A", grad="detached"),
    "c4": dict(lam=0.7, r=40.0, m=1.7, t=3.0, lw=10.0, margin="M", grad="detached"),
    "c5": dict(lam=0.7, r=40.0, m=0.4, t=3.0, lw=10.0, margin="C", grad="exact"),
}


def close(actual, expected, rtol=RTOL, atol=1e-12):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


@pytest.fixture(scope="module")
def sf2(golden_dir):
    d = np.load(golden_dir / "sphereface2_opensphere.npz")
    return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def pfc(golden_dir):
    d = np.load(golden_dir / "partial_fc_insightface.npz")
    return {k: d[k] for k in d.files}


def test_sf2_meta_matches_our_case_table(sf2):
    meta = json.loads(str(sf2["meta"]))
    for case, hp in SF2_CASES.items():
        m = meta["cases"][case]
        assert m["magn_type"] == hp["margin"]
        assert m["g_detached"] == (hp["grad"] == "detached")
        assert m["hyperparameters"]["alpha"] == hp["lam"]


@pytest.mark.parametrize("case", sorted(SF2_CASES))
def test_sf2_bias_init(sf2, case):
    hp = SF2_CASES[case]
    K = sf2["W_raw"].shape[0]
    b = sphereface2_bias_init(K, hp["lam"], hp["r"], hp["m"], hp["t"], hp["margin"])
    close(b, sf2[f"{case}_b"][0])


@pytest.mark.parametrize("case", sorted(SF2_CASES))
def test_sf2_head_reproduces_golden(sf2, case):
    hp = SF2_CASES[case]
    x = torch.tensor(sf2["x"], requires_grad=True)
    y = torch.tensor(sf2["y"])
    K, D = sf2["W_raw"].shape
    head = SphereFace2Head(D, K, **hp).double()
    head.load_full_weight(torch.tensor(sf2["W_raw"]))
    with torch.no_grad():
        head.bias.copy_(torch.tensor(sf2[f"{case}_b"]))
    loss = head(x, y)
    loss.backward()
    close(loss, sf2[f"{case}_loss"])
    close(head.weight, sf2["W_used"])  # re-projected in place, as OpenSphere
    close(x.grad, sf2[f"{case}_dL_dx"])
    close(head.weight.grad, sf2[f"{case}_dL_dW_used"])
    close(head.bias.grad, sf2[f"{case}_dL_db"])


@pytest.mark.parametrize("case", sorted(SF2_CASES))
def test_sf2_dense_reference_reproduces_golden(sf2, case):
    hp = SF2_CASES[case]
    x = torch.tensor(sf2["x"], requires_grad=True)
    W = torch.tensor(sf2["W_used"], requires_grad=True)
    b = torch.tensor(sf2[f"{case}_b"], requires_grad=True)
    loss = sphereface2_loss(x, W, torch.tensor(sf2["y"]), b, **hp)
    loss.backward()
    close(loss, sf2[f"{case}_loss"])
    close(x.grad, sf2[f"{case}_dL_dx"])
    close(W.grad, sf2[f"{case}_dL_dW_used"])
    close(b.grad, sf2[f"{case}_dL_db"])


def _pfc_rank(rank, world, x_all, y_all, W, margin, kw):
    torch.set_default_dtype(torch.float64)
    B = x_all.shape[0] // world
    # world size factor: the golden dL_dx_raw carries insightface's x world-size convention
    head = PartialFCHead(W.shape[1], W.shape[0], margin=margin, embedding_grad_scale=world, **kw).double()
    head.load_full_weight(W)
    x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    loss = head(x, y_all[rank * B : (rank + 1) * B])
    loss.backward()
    return dict(loss=loss.detach(), dx=x.grad, dW=head.weight.grad, start=head.class_start, n=head.num_local)


PFC_KW = {
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.4),
}


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_pfc_sharded_reproduces_golden(pfc, world):
    x, y, W = (torch.tensor(pfc[k]) for k in (f"ws{world}_x", f"ws{world}_y", "W"))
    for margin, kw in PFC_KW.items():
        res = spawn_gloo(_pfc_rank, world, args=(x, y, W, margin, kw))
        pre = f"ws{world}_{margin}"
        assert [r["start"] for r in res] == list(pfc[f"ws{world}_class_start"])
        assert [r["n"] for r in res] == list(pfc[f"ws{world}_num_local"])
        for r in res:
            close(r["loss"], pfc[f"{pre}_loss"])
        close(torch.cat([r["dx"] for r in res]), pfc[f"{pre}_dL_dx_raw"])
        close(torch.cat([r["dW"] for r in res]), pfc[f"{pre}_dL_dW"])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_pfc_dense_reference_reproduces_golden(pfc, world, margin):
    pre = f"ws{world}_{margin}"
    x = torch.tensor(pfc[f"ws{world}_x"], requires_grad=True)
    W = torch.tensor(pfc["W"], requires_grad=True)
    loss = margin_softmax_loss(x, W, torch.tensor(pfc[f"ws{world}_y"]), margin=margin, **PFC_KW[margin])
    loss.backward()
    close(loss, pfc[f"{pre}_loss"])
    close(x.grad * world, pfc[f"{pre}_dL_dx_raw"])
    close(W.grad, pfc[f"{pre}_dL_dW"])


def test_pfc_single_process_head_reproduces_golden(pfc):
    """World size 1 head on the ws2 global batch equals the golden (x grad divided by the factor 2)."""
    for margin, kw in PFC_KW.items():
        pre = f"ws2_{margin}"
        x = torch.tensor(pfc["ws2_x"], requires_grad=True)
        K, D = pfc["W"].shape
        head = PartialFCHead(D, K, margin=margin, **kw).double()
        head.load_full_weight(torch.tensor(pfc["W"]))
        loss = head(x, torch.tensor(pfc["ws2_y"]))
        loss.backward()
        close(loss, pfc[f"{pre}_loss"])
        close(x.grad * 2, pfc[f"{pre}_dL_dx_raw"])
        close(head.weight.grad, pfc[f"{pre}_dL_dW"])
