"""fr-dist plan --config RECIPE: the planner's inputs are the training config's, flags override them."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fr_dist import plan as P
from fr_dist.heads import list_heads
from fr_dist.plan.config import choices, recipe_notes
from fr_dist.train.config_load import load_config

ROOT = Path(__file__).resolve().parents[2]
SF2 = str(ROOT / "configs" / "ms1mv3_r50_sf2.yaml")
PFC = str(ROOT / "configs" / "wf42m_r50_pfc_8gpu.yaml")


def _plan_json(capsys, *argv) -> dict:
    from fr_dist.cli import main

    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _recipe_inputs(cfg) -> dict:
    """What the recipe says, key by key, written out (not read through RECIPE_KEYS)."""
    sf2 = cfg.head.sphereface2
    return dict(
        identities=cfg.data.num_classes,
        dim=cfg.model.embedding_size,
        batch=cfg.data.batch_size,
        backbone=cfg.model.name,
        optimizer=cfg.train.optimizer,
        amp=cfg.train.amp,
        head=cfg.head.name,
        head_compute=cfg.head.dtype,
        sample_rate=getattr(cfg.head, cfg.head.name).sample_rate,
        chunk_size=sf2.chunk_size,
        proxy_dtype=sf2.proxy_dtype,
        fused_update=sf2.fused_update,
        fp32_master=sf2.master_weights,
        sf2_kernel=sf2.kernel,
        # the softmax family's chunked online softmax: the recipe's softmax head, else Partial FC's (null: 0)
        softmax_chunk=(cfg.head.partial_fc.chunk_size or 0),
    )


def test_cli_plans_the_recipe_without_its_data(tmp_path):
    """The acceptance command, run where the recipe's data/ms1mv3 does not exist."""
    assert not (tmp_path / "data").exists()
    p = subprocess.run(
        [sys.executable, "-m", "fr_dist.cli", "plan", "--config", SF2, "--hardware", "h100", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    cfg = load_config(SF2, check_paths=False)
    want = _recipe_inputs(cfg)
    assert {k: out["config"][k] for k in want} == want
    # the recipe differs from the planner's defaults (K = 1M, bf16 fused proxies, fp16 amp, ...): the
    # values came from it
    defaults = P.PlanConfig()
    assert want["identities"] == 93_431  # MS1MV3
    assert sum(want[k] != getattr(defaults, k) for k in want) >= 3, want
    assert out["config"]["pfc_impl"] == "fr_dist" and out["hardware"]["name"] == "h100-80gb"
    assert out["recipe"]["config"] == SF2 and out["fits"] is True


def test_every_recipe_key_reaches_the_plan():
    for path, overrides in (
        (
            SF2,
            [
                "head.sphereface2.sample_rate=0.25",
                "head.sphereface2.chunk_size=4096",
                "train.optimizer=adamw",
            ],
        ),
        (SF2, ["head.sphereface2.proxy_dtype=bf16", "head.sphereface2.fused_update=true", "head.dtype=bf16"]),
        (
            SF2,
            [
                "head.sphereface2.proxy_dtype=bf16",
                "head.sphereface2.fused_update=true",
                "head.sphereface2.master_weights=true",
                "head.sphereface2.kernel=eager",
                "model.embedding_size=256",
            ],
        ),
        (PFC, ["train.amp=none", "model.name=iresnet100", "head.partial_fc.chunk_size=4096"]),
    ):
        cfg = load_config(path, overrides, check_paths=False)
        pc = P.plan_config_from_training(cfg, nodes=2, gpus_per_node=4)
        assert {k: getattr(pc, k) for k in _recipe_inputs(cfg)} == _recipe_inputs(cfg), overrides
        assert (pc.nodes, pc.gpus_per_node, pc.pfc_impl) == (2, 4, "fr_dist")
    assert pc.head == "partial_fc" and pc.sample_rate == 0.2 and pc.identities == 2_059_906
    assert pc.softmax_chunk == 4096
    assert set(P.RECIPE_KEYS.values()) == set(_recipe_inputs(cfg))  # the table maps each of them


def test_trailing_overrides_as_for_train(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = _plan_json(capsys, "--config", SF2, "data.batch_size=256", "head.sphereface2.sample_rate=0.5")
    assert out["config"]["batch"] == 256 and out["config"]["sample_rate"] == 0.5
    assert out["recipe"]["overrides"] == ["data.batch_size=256", "head.sphereface2.sample_rate=0.5"]


def test_explicit_flags_override_the_recipe(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    new = _plan_json(
        capsys, "--config", SF2, "--num-classes", "2M", "--batch-size", "64", "--proxy-dtype", "bf16",
        "--fused-update", "--head-dtype", "bf16", "--nodes", "2", "--pfc-impl", "v2",
    )["config"]  # fmt: skip
    assert (new["identities"], new["batch"], new["proxy_dtype"], new["fused_update"]) == (
        2_000_000,
        64,
        "bf16",
        True,
    )
    assert (new["head_compute"], new["nodes"], new["pfc_impl"]) == ("bf16", 2, "v2")
    assert new["dim"] == 512 and new["amp"] == "bf16"  # not given: still the recipe's
    # the planner's older flag names are aliases of the training-named ones
    old = _plan_json(capsys, "--config", SF2, "--identities", "1M", "--batch", "32", "--dim", "256")["config"]
    assert (old["identities"], old["batch"], old["dim"]) == (1_000_000, 32, 256)
    # a flag beats the recipe's override of the same input too
    both = _plan_json(capsys, "--config", SF2, "--batch-size", "16", "data.batch_size=256")["config"]
    assert both["batch"] == 16


def test_without_a_recipe_the_flags_and_defaults_are_unchanged(capsys):
    out = _plan_json(capsys, "--identities", "1M", "--hardware", "h100-80gb")
    assert out["config"] == P.plan(P.PlanConfig(), P.HARDWARE["h100-80gb"])["config"]
    assert "recipe" not in out


def test_recipe_errors_are_one_line(capsys, monkeypatch, tmp_path):
    from fr_dist.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--config", SF2, "train.batch_size=256"]) == 2  # data.batch_size is the key
    assert "data.batch_size" in capsys.readouterr().err
    # data.num_classes=0 (read from the dataset) leaves K to a flag
    assert main(["plan", "--config", SF2, "data.num_classes=0"]) == 2
    assert "--num-classes" in capsys.readouterr().err
    assert main(["plan", "data.batch_size=256"]) == 2  # overrides without a recipe
    assert "--config" in capsys.readouterr().err
    cfg = load_config(SF2, ["data.num_classes=0"], check_paths=False)
    assert P.plan_config_from_training(cfg, identities=5000).identities == 5000


def test_num_negatives_is_the_sample_rate_it_amounts_to():
    cfg = load_config(SF2, ["head.sphereface2.num_negatives=1000"], check_paths=False)
    pc = P.plan_config_from_training(cfg, nodes=1, gpus_per_node=8)
    assert pc.sample_rate == pytest.approx(1000 / -(-93_431 // 8))


def test_what_the_plan_does_not_model_is_said():
    cfg = load_config(SF2, ["model.activation_checkpointing=true"], check_paths=False)
    assert [n.split("=")[0] for n in recipe_notes(cfg)] == ["model.activation_checkpointing"]
    assert recipe_notes(load_config(SF2, check_paths=False)) == []


def test_choices_are_the_literal_hints_beside_the_fields():
    # head: every registered loss (the registry, not a Literal of two names)
    assert choices("head") == P.HEADS == tuple(list_heads())
    assert {"sphereface2", "partial_fc"} <= set(P.HEADS)
    assert choices("pfc_impl") == P.PFC_IMPLS and choices("identities") is None
    for field, bad in (("head", "arcface"), ("proxy_dtype", "int8"), ("sf2_kernel", "cuda"), ("amp", "fp8")):
        with pytest.raises(ValueError, match=field):
            P.PlanConfig(**{field: bad}).validate()
    for field, bad in (("sample_rate", 0.0), ("sample_rate", 1.5), ("batch", 0), ("chunk_size", -1)):
        with pytest.raises(ValueError, match=field):
            P.PlanConfig(**{field: bad}).validate()


def test_short_hardware_names():
    assert P.load_hardware("h100") == P.HARDWARE["h100-80gb"]
    assert P.load_hardware("v100") == P.HARDWARE["v100-32gb"]


def test_the_planner_imports_no_test_helper():
    for path in sorted((ROOT / "fr_dist" / "plan").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("fr_dist.testing") for n in names), path
    assert max(len(p.read_text().splitlines()) for p in (ROOT / "fr_dist" / "plan").glob("*.py")) <= 500
