"""fr-dist plan and benchmarks/classifier.py know every registered loss (issue 18 items 4 and 7).

Registry-driven: the loss list is ``fr_dist.heads.list_heads()`` at collection time, and test-local dummy
losses (registered with monkeypatch on ``registry._LOSSES``, gone after the test) show that a new loss needs
no edit in the planner or the benchmark: its family's collectives, its ``extra_collectives`` and its
``norm_aware`` flag reach the plan, the printed table and the benchmark's configurations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fr_dist import plan as P
from fr_dist.heads import BinaryHead, SoftmaxHead, list_heads, registry
from fr_dist.heads.losses.partial_fc import MarginSoftmax
from fr_dist.heads.losses.sphereface2 import SphereFace2
from fr_dist.plan.losses import BINARY_SCALARS, SOFTMAX_ALLREDUCES
from fr_dist.train.config_load import load_config

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

LOSSES = list_heads()
SF2_RECIPE = ROOT / "configs" / "ms1mv3_r50_sf2.yaml"

# a bare profile (test_plan.py's): 1 GiB per device, round figures, latency 1e-5 s per collective
HW = P.Hardware(
    "test",
    P.GiB,
    {"fp32": 1.0, "fp16": 4.0, "bf16": 4.0},
    100.0,
    10.0,
    5.0,
    1e-5,
    2e-5,
    100 * P.MiB,
    gemm_efficiency=1.0,
    conv_efficiency=1.0,
    elementwise_efficiency=1.0,
)


def cfg(**kw) -> P.PlanConfig:
    base = dict(
        identities=100_000, batch=8, dim=32, gpus_per_node=2, nodes=1, backbone="none", amp="none",
        ddp_bucket_copy=False, chunk_size=8192, sf2_kernel="eager",
    )  # fmt: skip
    base.update(kw)
    return P.PlanConfig(**base)


# ----------------------------------------------------------------------------- test-local losses
class _ExtraSoftmax(MarginSoftmax):
    """A softmax loss declaring one more [N] all-reduce (as CurricularFace does)."""

    extra_collectives = ("dummy_extra",)


class _ExtraSoftmaxHead(SoftmaxHead):
    loss_cls = _ExtraSoftmax


class _NormBinary(SphereFace2):
    """A binary loss that says it reads the embedding norms."""

    norm_aware = True


class _NormBinaryHead(BinaryHead):
    loss_cls = _NormBinary


@pytest.fixture
def dummies(monkeypatch):
    """Register the two dummy losses for one test (registry._LOSSES restored afterwards)."""
    for name, cls in (("dummy_softmax", _ExtraSoftmaxHead), ("dummy_binary", _NormBinaryHead)):
        monkeypatch.setitem(registry._LOSSES, name, cls)
        monkeypatch.setattr(cls, "loss_name", name, raising=False)
    return ("dummy_softmax", "dummy_binary")


def _family(name: str) -> str:
    return registry.head_class(name).loss_cls.family


def _extras(name: str) -> tuple:
    return tuple(getattr(registry.head_class(name).loss_cls, "extra_collectives", ()))


def _check_plan(name: str) -> dict:
    """The plan of loss ``name`` at W = 2: the family's collectives plus the loss's extras, in the comm
    model and in the printed table."""
    c = cfg(head=name)
    res = P.plan(c, HW)
    N, D = c.world * c.batch, c.dim
    colls = res["collectives"]
    assert [(x["kind"], x["name"]) for x in colls[:2]] == [
        ("all_gather", "embeddings"),
        ("reduce_scatter", "grad_embeddings"),
    ]
    assert colls[0]["bytes"] == N * (D + 1) * 4 and colls[1]["bytes"] == N * D * 4
    per_sample = [x["name"] for x in colls if x["per_sample"]]
    extras = list(_extras(name))
    if _family(name) == "softmax":
        assert per_sample == list(SOFTMAX_ALLREDUCES) + extras
        assert res["step_time_s"]["softmax_allreduce"] > 0
    else:  # binary: no [N] all-reduce of its own, two one-element ones
        assert per_sample == extras
        assert [x["name"] for x in colls if x["kind"] == "all_reduce" and not x["per_sample"]] == list(
            BINARY_SCALARS
        )
        if not extras:
            assert res["step_time_s"]["softmax_allreduce"] == 0
    assert all(x["bytes"] == N * 4 for x in colls if x["per_sample"])
    assert [x["name"] for x in colls if x["extra"]] == extras
    assert P.n_allreduces(name) == len(per_sample)
    st = res["step_time_s"]
    assert st["comm_latency"] == pytest.approx(len(colls) * 1e-5)  # one latency per collective
    assert st["total"] > 0 and res["max_identities"] > 0 and res["loss"]["family"] == _family(name)
    mem = res["memory_per_gpu"]
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    table = P.format_table(P.side_by_side(c, HW))
    assert f"  {name}: all_gather embeddings" in table
    for extra in extras:
        assert f"all_reduce {extra} [{N}] (the loss's extra)" in table
    return res


@pytest.mark.parametrize("name", LOSSES)
def test_every_registered_loss_gets_a_family_correct_plan(name):
    _check_plan(name)
    # side by side: the loss first (unless a baseline), then the two baselines
    heads = list(P.side_by_side(cfg(head=name), HW))
    assert heads == ([] if name in P.BASELINES else [name]) + list(P.BASELINES)


def test_dummy_losses_reach_the_plan(dummies):
    soft, binary = dummies
    assert {soft, binary} <= set(P.HEADS)  # registered later than the planner's import: still known
    res = _check_plan(soft)
    _check_plan(binary)
    # the extra [N] all-reduce is counted: bandwidth, latency, the [N] share, memory, the notes
    c = cfg(head=soft)
    base = P.step_time(dataclasses.replace(c, head="partial_fc"), HW)
    more = P.step_time(c, HW)
    N, ring, bw = c.world * c.batch, 1 / 2, HW.intra_busbw_gbps * 1e9
    assert more["comm_bandwidth"] - base["comm_bandwidth"] == pytest.approx(N * 4 * 2 * ring / bw)
    assert more["comm_latency"] - base["comm_latency"] == pytest.approx(1e-5)
    assert more["softmax_allreduce"] - base["softmax_allreduce"] == pytest.approx(
        1e-5 + N * 4 * 2 * ring / bw
    )
    assert res["memory_per_gpu"]["loss_extras"] == N * 4  # its [N] buffer
    assert res["loss"]["extra_collectives"] == ["dummy_extra"]
    assert any("dummy_extra" in n for n in res["loss"]["notes"])
    # a norm-aware loss: its [N] norm vector is counted and said, and it costs no collective
    nb = P.plan(cfg(head=binary), HW)
    assert nb["loss"]["norm_aware"] and nb["memory_per_gpu"]["loss_extras"] == 16 * 4
    assert any(n.startswith("norm-aware") for n in nb["loss"]["notes"])
    assert not [x for x in nb["collectives"] if x["per_sample"]]
    assert "dummy_binary: norm-aware" in P.format_table(P.side_by_side(cfg(head=binary), HW))


@pytest.mark.parametrize("name", [n for n in LOSSES if _family(n) == "softmax"])
def test_chunked_online_softmax_is_planned(name):
    """The softmax family's chunked path (head.<loss>.chunk_size): an [N, c] logit block of 3 fp32 buffers
    instead of the [N, S] one, and the backward's recomputed cosines (4 GEMMs instead of 3)."""
    dense = cfg(head=name, pfc_impl="fr_dist")
    chunked = dataclasses.replace(dense, softmax_chunk=1000)
    n, N, D = 50_000, 16, 32
    negatives = bool(getattr(registry.head_class(name).loss_cls, "all_targets", None))
    assert P.memory_breakdown(dense, HW)["logit_block"] == int(n * N * 4 * (1 + (0.25 if negatives else 0)))
    # 3 [N, c] blocks + the [S] inverse norms and mask; a loss with the negatives stage (all_targets:
    # CurricularFace) 3.25 blocks more (measured: benchmarks/results/cpu2_202612/classifier_losses.md)
    blocks = 3 + (3.25 if negatives else 0)
    assert P.memory_breakdown(chunked, HW)["logit_block"] == int(1000 * N * 4 * blocks + n * 5)
    td, tc = P.step_time(dense, HW), P.step_time(chunked, HW)
    assert tc["classifier_compute"] == pytest.approx(td["classifier_compute"] * 8 / 6)
    assert tc["op_overhead"] > td["op_overhead"]  # the chunk loop's ops
    assert P.step_allocations(chunked) == [n * D * 4]  # no [N, S] block made afresh
    # insightface's heads have no chunked path: the option changes nothing there
    v2 = dataclasses.replace(dense, pfc_impl="v2")
    assert P.memory_breakdown(dataclasses.replace(v2, softmax_chunk=1000), HW) == P.memory_breakdown(v2, HW)


def test_norm_aware_and_state_are_read_from_the_loss_class():
    for d in P.describe_losses():
        cls = registry.head_class(d["name"]).loss_cls
        declared = getattr(cls, "norm_aware", None)
        if declared is not None:
            assert d["norm_aware"] == bool(declared)
        assert set(d["state"]) == set(cls().state())
        assert d["n_allreduces"] == (3 if d["family"] == "softmax" else 0) + len(d["extra_collectives"])
    assert not P.norm_aware("partial_fc") and not P.norm_aware("sphereface2")


def test_cli_accepts_and_lists_every_registered_loss(dummies, capsys):
    from fr_dist.cli import main

    assert main(["plan", "--list-heads", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(list_heads()) >= set(LOSSES) | set(dummies)
    assert listed["dummy_softmax"]["extra_collectives"] == ["dummy_extra"]
    for name in list_heads():
        assert main(["plan", "--head", name, "-K", "2M", "--gpus-per-node", "4", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["config"]["head"] == name and out["loss"]["family"] == _family(name)
        assert name in out["heads"] and set(P.BASELINES) <= set(out["heads"])
    assert main(["plan", "--head", "dummy_softmax", "-K", "2M"]) == 0
    text = capsys.readouterr().out
    assert "all_reduce dummy_extra" in text and "dummy_softmax [N] all-reduces (4, full step)" in text
    assert main(["plan", "--head", "arcfce"]) == 2
    err = capsys.readouterr().err
    assert "unknown head 'arcfce'" in err and all(n in err for n in list_heads())


def _recipes() -> dict[str, tuple[Path, list[str]]]:
    """Per registered loss: its configs/ms1mv3_r50_*.yaml recipe, or the SphereFace2 one with head.name."""
    found = {}
    for path in sorted((ROOT / "configs").glob("ms1mv3_r50_*.yaml")):
        name = load_config(str(path), check_paths=False).head.name
        found.setdefault(name, (path, []))
    return {n: found.get(n, (SF2_RECIPE, [f"head.name={n}"])) for n in LOSSES}


@pytest.mark.parametrize("name", LOSSES)
def test_recipe_of_every_loss_plans(name, capsys, monkeypatch, tmp_path):
    from fr_dist.cli import main

    monkeypatch.chdir(tmp_path)  # the recipe's data need not exist
    path, overrides = _recipes()[name]
    # the head's own section gives the options (a binary loss: its fused-pass keys, not sphereface2's)
    binary = _family(name) == "binary"
    section = f"head.{name if binary else 'sphereface2'}"
    softmax = f"head.{'partial_fc' if binary else name}"  # the chunked online softmax's section
    argv = ["plan", "--config", str(path), *overrides, f"{section}.chunk_size=1234"]
    argv += [f"{softmax}.chunk_size=2048", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["head"] == name and out["config"]["chunk_size"] == 1234
    assert out["config"]["softmax_chunk"] == 2048 and out["recipe"]["not_modeled"] == []
    assert [c["name"] for c in out["collectives"] if c["extra"]] == list(_extras(name))
    assert out["fits"] in (True, False) and out["step_time_s"]["total"] > 0


def test_dummy_loss_from_a_training_config(dummies):
    """plan_config_from_training reads only attributes: a recipe of a loss registered after the config
    assembly (here a namespace) plans with that loss's own section."""
    sections = {
        "dummy_binary": SimpleNamespace(
            chunk_size=512, proxy_dtype="fp32", fused_update=False, master_weights=False, kernel="eager",
            sample_rate=1.0, num_negatives=0,
        ),
        "sphereface2": SimpleNamespace(chunk_size=0, num_negatives=0),  # no other keys: the defaults
        "dummy_softmax": SimpleNamespace(sample_rate=0.5, chunk_size=None),
    }  # fmt: skip
    for head, want in (("dummy_binary", 512), ("dummy_softmax", 0)):
        training = SimpleNamespace(
            data=SimpleNamespace(num_classes=10_000, batch_size=16),
            model=SimpleNamespace(embedding_size=64, name="none"),
            train=SimpleNamespace(optimizer="sgd", amp="none"),
            head=SimpleNamespace(name=head, dtype="auto", **sections),
        )
        pc = P.plan_config_from_training(training, nodes=1, gpus_per_node=2)
        assert pc.head == head and pc.chunk_size == want and pc.identities == 10_000
        _check_plan(head)
    assert pc.sample_rate == 0.5


# ----------------------------------------------------------------------------- the classifier benchmark
def test_benchmark_configurations_are_registry_driven(dummies):
    """Every registered loss is a benchmark configuration by default: softmax once per chunk entry (dense
    and chunked), binary with the lean settings; a dummy registered now runs through run_config."""
    from benchmarks import classifier as C

    a = SimpleNamespace(
        losses=list_heads(), softmax_chunks=C.DEFAULT_SOFTMAX_CHUNKS, num_classes=[64], batch=4, dim=16,
        steps=1, warmup=0, sample_rate=1.0, lr=0.1, sf2_opts=dict(C.LEAN_BINARY), log=False, no_memory=True,
    )  # fmt: skip
    got = {}
    for c in C._configs(a):
        got.setdefault(c["head_name"], []).append(c["chunk"])
    assert set(got) == set(list_heads())
    for name, chunks in got.items():
        assert chunks == ([None, 8192] if _family(name) == "softmax" else [None]), name
    for name in dummies:
        r = C.run_config(0, 1, name, K=64, batch=4, dim=16, steps=1, warmup=0, sample_rate=1.0, lr=0.1,
                         chunk=32 if _family(name) == "softmax" else None, sf2_opts=C.LEAN_BINARY)  # fmt: skip
        assert r["family"] == _family(name) and r["step_time_s"] > 0 and r["peak_step_bytes"] > 0
        assert r["fused_update"] == (_family(name) == "binary")
        assert C.path(r) == ("chunked 32" if _family(name) == "softmax" else "fused_update=True")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.dist
def test_benchmark_smoke_runs_every_registered_loss(tmp_path):
    """``--smoke`` (one spawned group of 2 ranks): every registered loss, softmax dense and chunked, binary
    with the fused update; the [N] all-reduces fr_dist.comm counted are the plan's; the markdown table."""
    out = tmp_path / "classifier.json"
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.classifier", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    want = {(n, c) for n in LOSSES for c in ((None, 300) if _family(n) == "softmax" else (None,))}
    assert {(r["head"], r["chunk"]) for r in results} == want
    for r in results:
        name, N, D = r["head"], r["world_size"] * r["batch_per_rank"], r["dim"]
        assert r["world_size"] == 2 and r["family"] == _family(name)
        assert r["step_time_s"] > 0 and r["gemm3_time_s"] > 0 and r["peak_step_bytes"] > 0
        assert r["ratio_to_gemm3"] == pytest.approx(r["step_time_s"] / r["gemm3_time_s"])
        if _family(name) == "binary":
            assert r["fused_update"] and r["head_options"]["fused_update"] is True
        # the measured collectives are the plan's: names and sizes of the [N] all-reduces, gather, scatter
        comm = r["comm_per_step"]
        measured = {k.split("/", 1)[1]: v for k, v in comm.items() if k.startswith("all_reduce/")}
        plan = P.step_collectives(name, N, D)
        planned_vec = {c["name"]: c["bytes"] for c in plan if c["per_sample"]}
        assert {k: v["bytes"] for k, v in measured.items() if v["bytes"] >= N * 4} == planned_vec, name
        assert all(v["calls"] == 1 for k, v in measured.items() if k in planned_vec)
        assert comm["all_gather/embeddings"]["calls"] == comm["reduce_scatter/grad_embeddings"]["calls"] == 1
        assert comm["reduce_scatter/grad_embeddings"]["bytes"] == N * D * 4
    table = out.with_suffix(".md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| loss")]
    assert len(rows) == len(results)
    assert all(any(line.startswith(f"| {n} | {_family(n)} |") for line in rows) for n in LOSSES)
    if _has_matplotlib():
        assert out.with_suffix(".png").stat().st_size > 0
