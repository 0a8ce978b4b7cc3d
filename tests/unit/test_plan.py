"""fr_dist.plan: hand-checked memory arithmetic, the published-record validation, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fr_dist import plan as P

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

# A bare profile: 1 GiB per device, 100 MiB overhead, round throughput figures.
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
    base = dict(gpus_per_node=2, nodes=1, backbone="none", amp="none", ddp_bucket_copy=False)
    base.update(kw)
    return P.PlanConfig(**base)


@pytest.mark.parametrize(
    "text,value",
    [
        ("100M", 100_000_000),
        ("1.5e8", 150_000_000),
        ("29M", 29_000_000),
        ("1.4M", 1_400_000),
        ("2K", 2_000),
        ("12345", 12_345),
        ("3B", 3_000_000_000),
        (7, 7),
    ],
)
def test_parse_count(text, value):
    assert P.parse_count(text) == value


def test_parse_count_rejects_garbage():
    with pytest.raises(ValueError):
        P.parse_count("many")


def test_sphereface2_fused_bf16_by_hand():
    # K=8000 on W=2 -> n=4000 rows; B=4 -> N=8 gathered rows; D=16; chunk 1000
    c = cfg(
        identities=8000,
        batch=4,
        dim=16,
        chunk_size=1000,
        head="sphereface2",
        proxy_dtype="bf16",
        fused_update=True,
        optimizer="sgd",
    )
    m = P.memory_breakdown(c, HW)
    assert m["proxies"] == 4000 * 16 * 2
    assert m["optimizer_state"] == 4000 * 16 * 2  # SGD momentum, bf16
    assert m["proxy_grad"] == 0  # the fused update never materialises dL/dW
    assert m["fp32_master"] == 0
    assert m["logit_block"] == 1000 * (4 * 8 * 4 + 3 * 16 * 4)  # 4 fp32 [N, c] + 3 fp32 [c, D]
    assert m["embeddings"] == 3 * 8 * 16 * 4
    assert m["comm_buffers"] == 8 * 17 * 4 + 4 * 16 * 4  # packed all-gather [N, D+1] + reduce-scatter out
    assert m["backbone_params"] == m["activations"] == 0
    assert m["framework_overhead"] == 100 * P.MiB
    assert m["total"] == sum(v for k, v in m.items() if k != "total")
    assert m["total"] == 128_000 + 128_000 + 320_000 + 1_536 + 800 + 100 * P.MiB


def test_sphereface2_variants_by_hand():
    base = cfg(identities=8000, batch=4, dim=16, chunk_size=1000, head="sphereface2", proxy_dtype="bf16")
    adam = P.memory_breakdown(dataclasses.replace(base, optimizer="adamw"), HW)
    assert adam["optimizer_state"] == 2 * 4000 * 16 * 2
    unfused = P.memory_breakdown(dataclasses.replace(base, fused_update=False), HW)
    assert unfused["proxy_grad"] == 4000 * 16 * 2
    master = P.memory_breakdown(dataclasses.replace(base, fp32_master=True), HW)
    assert master["fp32_master"] == 4000 * 16 * 4
    fp32 = P.memory_breakdown(dataclasses.replace(base, proxy_dtype="fp32"), HW)
    assert fp32["proxies"] == fp32["optimizer_state"] == 4000 * 16 * 4
    # the chunk never exceeds the shard: 500 classes -> logit block of 250 rows on W=2
    small = P.memory_breakdown(dataclasses.replace(base, identities=500), HW)
    assert small["logit_block"] == 250 * (4 * 8 * 4 + 3 * 16 * 4)


def test_uneven_shard_uses_the_busiest_rank():
    m = P.memory_breakdown(cfg(identities=1001, batch=4, dim=16, head="sphereface2", proxy_dtype="fp32"), HW)
    assert m["proxies"] == 501 * 16 * 4  # fr_dist.sharding: rank 0 owns ceil(1001 / 2)


def test_partial_fc_v2_by_hand():
    # K=1000 on W=2 -> n=500, rate 0.1 -> S=50 sampled classes, N=8, D=8
    c = cfg(identities=1000, batch=4, dim=8, head="partial_fc", sample_rate=0.1, pfc_impl="v2", amp="fp16")
    m = P.memory_breakdown(c, HW)
    assert m["proxies"] == m["optimizer_state"] == 500 * 8 * 4  # fp32 weight + SGD momentum
    assert m["proxy_grad"] == 500 * 8 * 4  # dense [n, D] from weight[index]'s backward
    assert m["sampled_copies"] == 50 * 8 * 4 * 5  # copy, normalised, fp16 cast + grad, fp32 grad, temp
    assert m["logit_block"] == int(50 * 8 * 4 * 4.5)
    full = P.memory_breakdown(dataclasses.replace(c, sample_rate=1.0), HW)
    assert full["sampled_copies"] == 500 * 8 * 4 * 4  # no weight[index] copy at rate 1
    assert full["logit_block"] == int(500 * 8 * 4 * 4.5)
    fp32 = P.memory_breakdown(dataclasses.replace(c, amp="none"), HW)
    assert fp32["sampled_copies"] == 50 * 8 * 4 * 4  # no fp16 copy / fp16 gradient (0.5 + 0.5)


def test_partial_fc_fr_dist_fused_by_hand():
    c = cfg(identities=1000, batch=4, dim=8, head="partial_fc", sample_rate=0.1, pfc_impl="fr_dist")
    m = P.memory_breakdown(c, HW)
    assert m["proxy_grad"] == 500 * 8 * 4  # dense, from weight[index]'s backward
    assert m["sampled_copies"] == 50 * 8 * 4 * 2  # weight[index] + its [S, D] gradient
    assert m["logit_block"] == 50 * 8 * 4  # one [N, S] block, softmax gradient made in place
    full = P.memory_breakdown(dataclasses.replace(c, sample_rate=1.0), HW)
    assert full["sampled_copies"] == 0 and full["logit_block"] == 500 * 8 * 4


def test_partial_fc_v1_has_no_dense_gradient():
    c = cfg(identities=1000, batch=4, dim=8, head="partial_fc", sample_rate=0.1, pfc_impl="v1")
    m = P.memory_breakdown(c, HW)
    assert m["proxy_grad"] == 50 * 8 * 4  # the sub-weight Parameter's [S, D] gradient only
    assert m["sampled_copies"] == 50 * 8 * 4 * 5
    assert m["logit_block"] == 50 * 8 * 4 * 10


def test_backbone_terms_by_hand():
    c = cfg(
        identities=1000,
        batch=3,
        dim=512,
        head="sphereface2",
        backbone="iresnet50",
        amp="bf16",
        ddp_bucket_copy=True,
    )
    m = P.memory_breakdown(c, HW)
    params = 43_590_848  # insightface r50 at D=512
    assert m["backbone_params"] == m["backbone_grads"] == m["backbone_optimizer"] == params * 4
    assert m["activations"] == 70_800_384 * 3 // 2  # measured fp32 bytes/image, halved by autocast
    assert m["comm_buffers"] == 6 * 513 * 4 + 3 * 512 * 4 + params * 4  # + DDP bucket copy
    adam = P.memory_breakdown(dataclasses.replace(c, optimizer="adamw"), HW)
    assert adam["backbone_optimizer"] == 2 * params * 4


def test_max_identities_is_the_boundary():
    c = cfg(identities=10, batch=16, dim=64, head="sphereface2", proxy_dtype="bf16")
    k = P.max_identities(c, HW)
    assert k > 0
    assert P.memory_breakdown(dataclasses.replace(c, identities=k), HW)["total"] <= HW.memory_bytes
    assert P.memory_breakdown(dataclasses.replace(c, identities=k + 1), HW)["total"] > HW.memory_bytes
    # bf16 + fused stores 4 bytes/element-row vs 12 for fp32 unfused: about 3x the classes
    k32 = P.max_identities(dataclasses.replace(c, proxy_dtype="fp32", fused_update=False), HW)
    assert 2.5 < k / k32 < 3.1


def test_step_time_terms():
    c = cfg(identities=100_000, batch=8, dim=32, head="partial_fc", sample_rate=1.0)
    t = P.step_time(c, HW)
    parts = ["classifier_compute", "memory_traffic", "comm_bandwidth", "comm_latency", "backbone_compute"]
    assert t["total"] == pytest.approx(sum(t[k] for k in parts))
    assert t["classifier_compute"] == pytest.approx(6 * 16 * 50_000 * 32 / 1e12)  # amp none: fp32, 1 TFLOP/s
    amp = P.step_time(dataclasses.replace(c, amp="fp16"), HW)
    assert amp["classifier_compute"] == pytest.approx(6 * 16 * 50_000 * 32 / 4e12)  # fp16 head GEMM
    assert t["comm_latency"] == pytest.approx(7 * 1e-5)  # gather, scatter, 2 scalars, 3 softmax
    assert t["softmax_allreduce"] > 0
    sf2 = P.step_time(dataclasses.replace(c, head="sphereface2"), HW)
    assert sf2["softmax_allreduce"] == 0 and sf2["comm_latency"] == pytest.approx(4e-5)
    one = P.step_time(dataclasses.replace(c, gpus_per_node=1), HW)
    assert one["comm_bandwidth"] == one["comm_latency"] == 0


def test_head_compute_dtype():
    c = cfg(identities=100_000, batch=8, dim=32, head="sphereface2", proxy_dtype="bf16", amp="bf16")
    gemm = 6 * 16 * 50_000 * 32
    # fr_dist's fused SphereFace2 upcasts bf16 proxies per chunk and multiplies in fp32
    assert P.step_time(c, HW)["classifier_compute"] == pytest.approx(gemm / 1e12)
    fast = P.step_time(dataclasses.replace(c, head_compute="bf16"), HW)
    assert fast["classifier_compute"] == pytest.approx(gemm / 4e12)


def test_softmax_share_point_found_for_the_head_alone():
    c = cfg(identities=1_000_000, batch=128, dim=512, head="partial_fc", gpus_per_node=8)
    sp = P.softmax_share_point(c, P.HARDWARE["h100-80gb"])
    ho = sp["head_only"]
    assert ho["world_size_above"] is not None or ho["identities_below"] is not None


def test_published_record_validation():
    """insightface's 8 x V100-32GB record: memory within 20% at 7 points, max K within 25% of 29M."""
    import plan_validation as V

    v = V.validation("v2")
    for r in v["memory"]:
        assert abs(r["error"]) <= 0.20, r
    assert abs(v["max_identities"]["error"]) <= 0.25, v["max_identities"]
    assert v["passed"]


def test_target_identities_per_gb_on_8x80gb():
    c = P.PlanConfig(
        head="sphereface2", proxy_dtype="bf16", fused_update=True, batch=128, backbone="iresnet50"
    )
    for name in ("h100-80gb", "a100-80gb"):
        hw = P.HARDWARE[name]
        k = P.max_identities(c, hw)
        assert k / (8 * 80) >= 0.4e6, (name, k)  # identities per nominal GB: >= 256M on 8 x 80 GB


def test_yaml_hardware(tmp_path):
    y = tmp_path / "box.yaml"
    y.write_text("base: h100-80gb\nmemory_gb: 40\nintra_busbw_gbps: 100\n")
    hw = P.load_hardware(str(y))
    assert hw.memory_bytes == 40 * 10**9 and hw.intra_busbw_gbps == 100 and hw.hbm_gbps == 3350.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory_gb: 40\nwarp_drive: 1\n")
    with pytest.raises(ValueError, match="warp_drive"):
        P.load_hardware(str(bad))


def test_cli_json_smoke():
    cmd = [
        sys.executable,
        "-m",
        "fr_dist.cli",
        "plan",
        "--identities",
        "100M",
        "--dim",
        "512",
        "--gpus-per-node",
        "8",
        "--nodes",
        "1",
        "--batch",
        "128",
        "--head",
        "sphereface2",
        "--hardware",
        "h100-80gb",
        "--proxy-dtype",
        "bf16",
        "--fused-update",
        "--sample-rate",
        "1.0",
        "--backbone",
        "iresnet50",
        "--json",
    ]
    p = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert isinstance(out["fits"], bool) and out["fits"]
    assert isinstance(out["max_identities"], int) and out["max_identities"] >= 256_000_000
    mem, st = out["memory_per_gpu"], out["step_time_s"]
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert st["total"] > 0 and set(out["heads"]) == {"sphereface2", "partial_fc"}


def test_cli_table_and_errors():
    from fr_dist.cli import main

    assert (
        main(
            [
                "plan",
                "--identities",
                "29M",
                "--head",
                "partial_fc",
                "--sample-rate",
                "0.1",
                "--hardware",
                "v100-32gb",
            ]
        )
        == 0
    )
    assert main(["plan", "--identities", "lots"]) == 2
    assert main(["plan", "--hardware", "no-such-gpu"]) == 2


def test_plan_validation_script_smoke(tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_validation.py"), "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    v = json.loads((tmp_path / "plan_validation.json").read_text())
    assert v["v2"]["passed"]
    assert (tmp_path / "plan_capacity.md").exists()


@pytest.mark.dist
def test_measure_cpu_profile():
    prof = P.measure_cpu_profile(2)
    assert prof["tflops"]["fp32"] > 0 and prof["intra_busbw_gbps"] > 0 and prof["intra_latency_s"] > 0
    hw = P.load_hardware("cpu", 2, prof)
    assert hw.tflops["fp32"] == prof["tflops"]["fp32"] and hw.memory_bytes > 0


@pytest.mark.dist
def test_plan_vs_measured_smoke(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "plan_vs_measured.py"),
            "--smoke",
            "--steps",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rep = json.loads((tmp_path / "plan_vs_measured.json").read_text())
    assert len(rep["points"]) == 2 and all(r["measured_step_s"] > 0 for r in rep["points"])
