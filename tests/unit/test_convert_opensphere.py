"""fr_dist.convert.opensphere (OpenSphere's current and 2022 layouts) and fr_dist.convert.across (a softmax
classifier into a SphereFace2 / UniFace head and back, the bias in closed form), on fixtures written by
tools/make_opensphere_fixture.py (OpenSphere's save code followed, a tiny iresnet)."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fr_dist.convert import ImportedRun
from fr_dist.convert.across import adapt_to_head, binary_stationary_bias, mean_pairwise_cosine
from fr_dist.convert.opensphere import read_opensphere
from fr_dist.errors import CheckpointError, ConfigError
from fr_dist.heads.losses.sphereface2 import SphereFace2, SphereFace2Config
from fr_dist.heads.losses.uniface import UniFace
from fr_dist.models import create_backbone

REPO = Path(__file__).resolve().parents[2]
K, D, STEPS = 10, 8, 2


def _tool():
    spec = importlib.util.spec_from_file_location(
        "make_opensphere_fixture", REPO / "tools" / "make_opensphere_fixture.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """{name: project folder}: SphereFace2 in both layouts, ArcFace and CocoLoss (w [D, K]) current."""
    tool, root = _tool(), tmp_path_factory.mktemp("opensphere")
    kw = dict(classes=K, dim=D, steps=STEPS)
    tool.write_current(root / "sf2", **kw)
    tool.write_2022(root / "sf2_2022", **kw)
    tool.write_current(root / "arc", head="ArcFace", **kw)
    tool.write_current(root / "coco", head="CocoLoss", **kw)
    return root


def _load(p):
    return torch.load(p, weights_only=True)


def test_current_ckpt_carries_rows_bias_step_and_momentum_by_name(fx):
    run = read_opensphere(fx / "sf2")  # the project folder: its newest ckpt
    ck = _load(fx / "sf2" / "checkpoint" / f"ckpt_{STEPS}.pth")
    assert run.head_kind == "sphereface2" and run.step == STEPS and run.epoch == 1
    assert torch.equal(run.weight, ck["model"]["head"]["w"]) and run.weight.shape == (K, D)
    assert torch.equal(run.bias, ck["model"]["head"]["b"])
    assert run.head_hparams == dict(lam=0.7, r=40.0, m=0.4, t=3.0, lw=50.0, margin="C")
    assert run.backbone_arch == "iresnet_tiny"
    net = create_backbone("iresnet_tiny", embedding_size=D)
    net.load_state_dict(run.backbone, strict=True)  # OpenSphere's iresnet keys are fr_dist's
    # momentum: optimizer index i of group 0 is the i-th named parameter, group 1 is (w, b)
    names = [n for n, _ in net.named_parameters()]
    state, groups = ck["optimizer"]["state"], ck["optimizer"]["param_groups"]
    assert set(run.backbone_momentum) == set(names)
    for i, n in zip(groups[0]["params"], names):
        assert torch.equal(run.backbone_momentum[n], state[i]["momentum_buffer"])
    assert torch.equal(run.weight_momentum, state[groups[1]["params"][0]]["momentum_buffer"])
    assert any("features.weight is trained by OpenSphere" in n for n in run.notes)


def test_model_file_is_weights_only(fx):
    run = read_opensphere(fx / "sf2" / "checkpoint" / f"model_{STEPS}.pth")
    full = read_opensphere(fx / "sf2" / "checkpoint" / f"ckpt_{STEPS}.pth")
    assert torch.equal(run.weight, full.weight) and torch.equal(run.bias, full.bias)
    assert run.backbone_momentum is None and run.weight_momentum is None
    assert (run.step, run.epoch) == (STEPS, 0)


def test_2022_layout_strips_module_and_transposes_w(fx):
    models = fx / "sf2_2022" / "models"
    head = _load(models / f"head_{STEPS}.pth")
    assert head["module.w"].shape == (D, K)
    for p in (fx / "sf2_2022", models / f"backbone_{STEPS}.pth", models / f"head_{STEPS}.pth"):
        run = read_opensphere(p)
        assert torch.equal(run.weight, head["module.w"].t()) and torch.equal(run.bias, head["module.b"])
        assert not any(k.startswith("module.") for k in run.backbone) and run.step == STEPS
        assert run.backbone_momentum is None and run.head_hparams["margin"] == "C"
        create_backbone("iresnet_tiny", embedding_size=D).load_state_dict(run.backbone, strict=True)


def test_softmax_heads_and_transposed_cocoloss(fx):
    arc = read_opensphere(fx / "arc")
    assert arc.head_kind == "softmax" and arc.bias is None and arc.weight.shape == (K, D)
    coco = read_opensphere(fx / "coco")
    ck = _load(fx / "coco" / "checkpoint" / f"ckpt_{STEPS}.pth")
    state, groups = ck["optimizer"]["state"], ck["optimizer"]["param_groups"]
    assert torch.equal(coco.weight, ck["model"]["head"]["w"].t())
    assert torch.equal(coco.weight_momentum, state[groups[1]["params"][0]]["momentum_buffer"].t())


def test_no_config_infers_orientation(fx, tmp_path):
    shutil.copytree(fx / "coco", tmp_path / "coco")
    (tmp_path / "coco" / "config.yml").unlink()
    run = read_opensphere(tmp_path / "coco")
    assert torch.equal(run.weight, read_opensphere(fx / "coco").weight)
    assert any("read as [D, K]" in n for n in run.notes) and any("no config.yml" in n for n in run.notes)


class Carried:  # pickled by reference: a file holding it carries code
    pass


def _ckpt(fx):
    return _load(fx / "sf2" / "checkpoint" / f"ckpt_{STEPS}.pth")


def test_refusals(fx, tmp_path):
    def refused(path, match):
        with pytest.raises(CheckpointError, match=match):
            read_opensphere(path)

    torch.save({"step": 1, "model": Carried()}, tmp_path / "ckpt_1.pth")
    refused(tmp_path / "ckpt_1.pth", "weights_only")
    ck = _ckpt(fx)
    torch.save(ck, tmp_path / "model_3.pth")
    refused(tmp_path / "model_3.pth", "holds keys .*model_\\{step\\}.pth holds")
    torch.save(ck["model"], tmp_path / "ckpt_4.pth")
    refused(tmp_path / "ckpt_4.pth", "holds keys")
    torch.save(ck, tmp_path / "ckpt_5.pth")
    refused(tmp_path / "ckpt_5.pth", "its step is 2, its name says 5")
    (tmp_path / "x").mkdir()
    torch.save({"module.w": torch.zeros(D, K)}, tmp_path / "x" / "head_7.pth")
    refused(tmp_path / "x" / "head_7.pth", "backbone_7.pth: missing")
    refused(tmp_path / "x" / "weights.pth", "not an OpenSphere file name")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no OpenSphere checkpoint")
    bad_w = {"backbone": ck["model"]["backbone"], "head": {"w": torch.zeros(K, D + 1)}}
    torch.save(bad_w, tmp_path / "model_6.pth")
    refused(tmp_path / "model_6.pth", r"w is \[10, 9\] but the backbone's embedding size is 8")
    simple = {"backbone": ck["model"]["backbone"], "head": {"bias": torch.zeros(1)}}
    torch.save(simple, tmp_path / "model_8.pth")
    refused(tmp_path / "model_8.pth", "proxy-free")
    sfnet = {f"layer1.0.conv1.{p}": torch.zeros(4) for p in ("weight", "bias")}
    sfnet["fc.weight"] = torch.zeros(D, 4)
    torch.save({"backbone": sfnet, "head": {"w": torch.zeros(K, D)}}, tmp_path / "model_9.pth")
    refused(tmp_path / "model_9.pth", "SFNet")


def test_refusals_against_config(fx, tmp_path):
    proj = tmp_path / "p"
    shutil.copytree(fx / "sf2", proj)
    cfg = (proj / "config.yml").read_text()
    (proj / "config.yml").write_text(cfg.replace(f"subj_num: {K}", "subj_num: 93431"))
    with pytest.raises(CheckpointError, match="w has 10 classes, config.yml's subj_num is 93431"):
        read_opensphere(proj)
    (proj / "config.yml").write_text(cfg.replace("type: iresnet_tiny", "type: iresnet18"))
    with pytest.raises(CheckpointError, match=r"config.yml names iresnet18 \(layers \[2, 2, 2, 2\]"):
        read_opensphere(proj)
    (proj / "config.yml").write_text(cfg.replace("type: iresnet_tiny", "type: sfnet20"))
    with pytest.raises(CheckpointError, match="backbone sfnet20 is OpenSphere's SFNet"):
        read_opensphere(proj)


def test_optimizer_that_does_not_line_up_is_not_carried(fx, tmp_path):
    ck = _ckpt(fx)
    ck["optimizer"]["param_groups"] = ck["optimizer"]["param_groups"][:1]
    (tmp_path / "checkpoint").mkdir()
    torch.save(ck, tmp_path / "checkpoint" / f"ckpt_{STEPS}.pth")
    run = read_opensphere(tmp_path)
    assert run.backbone_momentum is None and run.weight_momentum is None
    assert any("momentum NOT carried" in n for n in run.notes)


# ----------------------------------------------------------------------------- across heads


def _softmax_run(k=K, d=D, seed=0) -> ImportedRun:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g) * 0.3
    return ImportedRun(
        source="test",
        backbone={"fc.weight": torch.zeros(d, 4)},
        weight=w,
        head_kind="softmax",
        backbone_momentum={"fc.weight": torch.ones(d, 4)},
        weight_momentum=torch.ones(k, d),
        step=7,
    )


@pytest.mark.parametrize("margin,m", [("C", 0.4), ("A", 0.5), ("M", 1.5)])
def test_softmax_to_sphereface2_and_back(margin, m):
    src = _softmax_run()
    hp = dict(lam=0.8, r=32.0, m=m, t=3.0, lw=50.0, margin=margin)
    sf2 = adapt_to_head(src, "sphereface2", hp)
    assert sf2.head_kind == "sphereface2" and sf2.weight_momentum is None and sf2.step == 7
    assert torch.allclose(sf2.weight.norm(dim=1), torch.ones(K))
    assert torch.allclose(sf2.weight, F.normalize(src.weight, dim=1))
    # at target cos 0 the closed form is OpenSphere's initial bias
    assert float(sf2.bias) == pytest.approx(SphereFace2(**hp).initial_bias(K), rel=1e-6)
    assert "softmax classifier -> sphereface2 head: rows normalised, bias b = " in sf2.notes[-1]
    assert "from the closed form" in sf2.notes[-1] and "row momentum dropped" in sf2.notes[-1]
    assert sf2.backbone_momentum is src.backbone_momentum  # the backbone's is kept
    back = adapt_to_head(sf2, "partial_fc")
    assert back.head_kind == "softmax" and back.bias is None
    assert torch.allclose(back.weight, F.normalize(src.weight, dim=1))
    assert "sphereface2 head -> partial_fc (softmax) head: rows normalised; its bias" in back.notes[-1]
    assert src.head_kind == "softmax" and src.weight_momentum is not None  # the input is not changed


def _sf2_logits(c_y, c_n, lam, r, m, t):
    g = lambda u: 2 * ((u + 1) / 2) ** t - 1  # noqa: E731
    return r * (g(c_y) - m), r * (g(c_n) + m)  # SphereFace2-C target and negative logits without b


def test_sphereface2_bias_is_stationary_at_the_rows_cosines():
    src = _softmax_run(k=50, d=6, seed=3)
    src.weight += 0.5  # rows with a clearly positive mean cosine
    c_bar = mean_pairwise_cosine(src.weight)
    w = F.normalize(src.weight.double(), dim=1)
    brute = ((w @ w.t()).sum() - 50) / (50 * 49)
    assert c_bar == pytest.approx(float(brute), rel=1e-9) and c_bar > 0.3
    lam, r, m, t = 0.7, 40.0, 0.4, 3.0
    out = adapt_to_head(src, "sphereface2", SphereFace2Config(lam=lam, r=r, m=m, t=t), target_cos=0.6)
    a_y, a_n = _sf2_logits(0.6, 0.6 * c_bar, lam, r, m, t)
    b = torch.tensor(float(out.bias), dtype=torch.float64, requires_grad=True)
    loss = lam * F.softplus(-(a_y + b)) + (1 - lam) * 49 * F.softplus(a_n + b)
    (grad,) = torch.autograd.grad(loss, b)
    assert abs(float(grad)) < 1e-5
    assert "target cos 0.6" in out.notes[-1]


def test_uniface_bias_closed_form():
    src = _softmax_run(k=1000, d=16, seed=1)
    m, s, l = 0.4, 64.0, 1.0  # noqa: E741
    out = adapt_to_head(src, "uniface", {"m": m, "s": s, "l": l, "chunk_size": 0})  # other keys ignored
    L = l * (1000 - 1)
    assert float(out.bias) == pytest.approx(math.log(L - 1), abs=1e-5)  # c = 0: exp(-s m) is negligible
    for c_y in (0.3, 0.7):
        c_n = c_y * mean_pairwise_cosine(src.weight)
        a_y, a_n = s * (c_y - m), s * c_n  # z = a - b
        root = (
            (L - 1) * math.exp(a_n)
            + math.sqrt((L - 1) ** 2 * math.exp(2 * a_n) + 4 * L * math.exp(a_n + a_y))
        ) / 2
        got = binary_stationary_bias(UniFace(m, s, l), 1000, c_y, c_n)
        assert got == pytest.approx(math.log(root), rel=1e-9)
        assert float(adapt_to_head(src, "uniface", {"m": m}, target_cos=c_y).bias) == pytest.approx(
            got, rel=1e-6
        )


def test_same_kind_kept_binary_to_binary_and_errors():
    src = _softmax_run()
    same = adapt_to_head(src, "partial_fc")
    assert same.weight is src.weight and same.weight_momentum is src.weight_momentum
    sf2 = adapt_to_head(src, "sphereface2")
    sf2.weight_momentum = torch.ones(K, D)
    kept = adapt_to_head(sf2, "sphereface2")
    assert torch.equal(kept.bias, sf2.bias) and kept.weight_momentum is sf2.weight_momentum
    sf2.head_hparams = {"lam": 0.7, "r": 40.0}
    told = adapt_to_head(sf2, "sphereface2", {"lam": 0.8, "r": 40.0})
    assert told.notes[-1].endswith("the source trained with lam=0.7 (now 0.8)")
    uf = adapt_to_head(sf2, "uniface")
    assert uf.head_kind == "uniface" and uf.weight_momentum is None
    assert "sphereface2 head -> uniface head: rows normalised, bias b = " in uf.notes[-1]
    assert float(adapt_to_head(src, "sphereface2", bias=1.5).bias) == 1.5
    with pytest.raises(ConfigError, match="unknown head"):
        adapt_to_head(src, "sphereface3")
    with pytest.raises(ConfigError, match="head.sphereface2"):
        adapt_to_head(src, "sphereface2", {"lam": 1.5})
