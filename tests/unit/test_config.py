"""Config: every recipe loads, overrides parse, typos name the nearest key, bad values say why."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fr_dist.train.config import Config, ConfigError, validate_against_dataset
from fr_dist.train.config_load import config_from_dict, field_info, format_help, load_config, save_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
SCRIPTS = [
    REPO / "launch" / "torchrun_single.sh",
    REPO / "launch" / "torchrun_multinode.sh",
    REPO / "launch" / "slurm" / "train.sbatch",
    REPO / "launch" / "slurm" / "bench.sbatch",
]


def err(overrides, path=None, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, **kw)
    return str(e.value)


# ----------------------------------------------------------------------------- recipes


def test_recipes_present():
    names = {p.stem for p in RECIPES}
    expected = {"demo_cpu", "demo_cpu_pfc"}
    for ds in ("ms1mv3_r50", "ms1mv3_r100", "glint360k_r100"):
        expected |= {f"{ds}_sf2", f"{ds}_pfc"}
    for g in (8, 16, 32):
        expected |= {f"wf42m_r50_sf2_{g}gpu", f"wf42m_r50_pfc_{g}gpu"}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    cfg = load_config(str(path), [], check_paths=False)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text())
    assert cfg.head.name == raw["head"]["name"]
    # the recipe's head matches its file name
    if "_sf2" in path.stem:
        assert cfg.head.name == "sphereface2"
    elif "_pfc" in path.stem:
        assert cfg.head.name == "partial_fc"


def test_recipe_hyperparameters():
    ms = load_config(str(REPO / "configs/ms1mv3_r50_pfc.yaml"), [], check_paths=False)
    assert ms.data.num_classes == 93431 and ms.data.batch_size == 128
    assert ms.head.partial_fc.margin == "arcface" and ms.head.partial_fc.sample_rate == 1.0
    assert ms.train.optimizer == "sgd" and ms.train.lr == 0.1 and ms.train.weight_decay == 5e-4
    assert ms.train.epochs == 20 and ms.train.schedule == "poly" and ms.model.name == "iresnet50"
    gl = load_config(str(REPO / "configs/glint360k_r100_pfc.yaml"), [], check_paths=False)
    assert gl.data.num_classes == 360232 and gl.model.name == "iresnet100"
    for g in (8, 16, 32):
        wf = load_config(str(REPO / f"configs/wf42m_r50_pfc_{g}gpu.yaml"), [], check_paths=False)
        assert wf.data.num_classes == 2059906
        assert wf.head.partial_fc.sample_rate == 0.2 and wf.head.partial_fc.margin == "cosface"
        sf = load_config(str(REPO / f"configs/wf42m_r50_sf2_{g}gpu.yaml"), [], check_paths=False)
        # twin recipes differ only in the head and the run directory
        a, b = wf.to_dict(), sf.to_dict()
        for d in (a, b):
            d.pop("head"), d.pop("output_dir")
        assert a == b


def test_demo_recipe_with_paths():
    # eval.bins lies under the synthetic out_dir, which is generated before training
    cfg = load_config(str(REPO / "configs/demo_cpu.yaml"), [])
    assert cfg.device == "cpu" and cfg.data.synthetic.generate
    assert cfg.model.name == "iresnet" and cfg.model.kwargs["layers"] == [1, 1, 1, 1]


def test_missing_eval_bin_is_reported():
    msg = err([], str(REPO / "configs/ms1mv3_r50_sf2.yaml"))
    assert "eval.bins" in msg and "lfw.bin" in msg


# ----------------------------------------------------------------------------- overrides


def test_override_types_and_nesting():
    cfg = load_config(
        None,
        [
            "train.lr=0.05",
            "train.epochs=3",
            "train.lr=1e-3",  # later wins; YAML 1.1 reads 1e-3 as a string: still a float
            "train.milestones=[8, 14.5]",
            "train.schedule=step",
            "train.betas=[0.8,0.99]",
            "train.nesterov=true",
            "train.head_lr=0.2",
            "data.flip=false",
            "data.batch_size=32",
            "head.sphereface2.m=0.3",
            "head.partial_fc.sample_rate=0.25",
            "model.kwargs.layers=[1,1,1,1]",
            "model.name=iresnet",
            "model.kwargs.width=8",
            "eval.bins=[]",
            "output_dir=2024-01-01",  # would be a YAML date: kept as the string
            "checkpoint.resume=auto",
            "deepspeed.config.zero_optimization.overlap_comm=true",
        ],
    )
    t = cfg.train
    assert t.lr == pytest.approx(1e-3) and isinstance(t.lr, float)
    assert t.epochs == 3 and isinstance(t.epochs, int)
    assert t.milestones == [8.0, 14.5] and t.betas == [0.8, 0.99]
    assert t.nesterov is True and t.head_lr == 0.2
    assert cfg.data.flip is False and cfg.data.batch_size == 32
    assert cfg.head.sphereface2.m == 0.3 and cfg.head.partial_fc.sample_rate == 0.25
    assert cfg.model.kwargs == {"layers": [1, 1, 1, 1], "width": 8}
    assert cfg.output_dir == "2024-01-01" and cfg.checkpoint.resume == "auto"
    assert cfg.deepspeed.config == {"zero_optimization": {"overlap_comm": True}}


def test_override_merges_into_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 0.2\n  epochs: 5\nhead:\n  sphereface2: {r: 30.0}\n")
    cfg = load_config(str(p), ["train.lr=0.3", "head.sphereface2.m=0.2", "train.head_lr=null"])
    assert cfg.train.lr == 0.3 and cfg.train.epochs == 5
    assert cfg.head.sphereface2.r == 30.0 and cfg.head.sphereface2.m == 0.2
    assert cfg.train.head_lr is None


def test_defaults_without_file():
    cfg = load_config(None, [])
    assert cfg == Config()


@pytest.mark.parametrize(
    "override",
    [
        "train.lr",
        "train.lr=abc",
        "train.lr=.nan",
        "train.lr=.inf",
        "data.batch_size=1.5",
        "data.flip=maybe",
        "train.betas=0.9",
        "train.betas=[0.9, x]",
    ],
)
def test_bad_override_values(override):
    msg = err([override])
    assert "train" in msg or "data" in msg


def test_null_only_where_optional():
    assert "null" in err(["train.lr=null"])
    assert load_config(None, ["train.head_weight_decay=null"]).train.head_weight_decay is None


# ----------------------------------------------------------------------------- typos


@pytest.mark.parametrize(
    "override,wrong,nearest",
    [
        ("train.lrr=0.1", "train.lrr", "train.lr"),
        ("trian.lr=0.1", "trian", "train"),
        ("head.sphereface2.lamb=0.5", "head.sphereface2.lamb", "head.sphereface2.lam"),
        (
            "head.partial_fc.sample_rat=0.5",
            "head.partial_fc.sample_rat",
            "head.partial_fc.sample_rate",
        ),
        (
            "data.synthetic.num_identity=5",
            "data.synthetic.num_identity",
            "data.synthetic.num_identities",
        ),
        ("lr=0.1", "'lr'", "train.lr"),  # a leaf key at the wrong level
        ("checkpoint.evry=10", "checkpoint.evry", "checkpoint.every"),
    ],
)
def test_typo_in_override_names_nearest_key(override, wrong, nearest):
    msg = err([override])
    assert wrong in msg and f"did you mean '{nearest}'" in msg, msg


def test_typo_in_yaml_names_file_and_path(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: 0.1\nhead:\n  sphereface2:\n    rr: 30\n")
    msg = err([], str(p))
    assert str(p) in msg and "head.sphereface2.rr" in msg and "'head.sphereface2.r'" in msg


def test_duplicate_yaml_key(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    msg = err([], str(p))
    assert "duplicate key 'lr'" in msg and "line 3" in msg


def test_structural_errors(tmp_path):
    assert "key.sub=value" in err(["train.lr"])
    assert "not a section" in err(["train.lr.x=1"])
    assert "mapping" in err(["train=3"])
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    assert "mapping" in err([], str(p))
    assert "not found" in err([], str(tmp_path / "nope.yaml"))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "override,words",
    [
        ("train.lr=-0.1", ["train.lr", "> 0"]),
        ("train.lr=0", ["train.lr", "> 0"]),
        ("head.partial_fc.sample_rate=0", ["sample_rate", "(0, 1]"]),
        ("head.partial_fc.sample_rate=1.5", ["sample_rate", "(0, 1]"]),
        ("data.batch_size=0", ["data.batch_size", ">= 1"]),
        ("train.grad_accum=0", ["train.grad_accum", ">= 1"]),
        ("deepspeed.zero_stage=4", ["deepspeed.zero_stage", "0, 1, 2 or 3"]),
        ("train.weight_decay=-1e-4", ["train.weight_decay", ">= 0"]),
        ("train.momentum=1.0", ["train.momentum", "[0, 1)"]),
        ("head.sphereface2.lam=1.0", ["head.sphereface2.lam", "(0, 1)"]),
        ("train.min_lr=2", ["train.min_lr", "fraction"]),
        ("model.dropout=1", ["model.dropout"]),
        ("train.milestones=[10,5]", ["train.milestones", "increasing"]),
        ("data.num_classes=-3", ["data.num_classes"]),
    ],
)
def test_impossible_values_say_why(override, words):
    msg = err([override])
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "override,near",
    [
        ("head.name=spherefac2", "sphereface2"),
        ("head.name=arcface", None),
        ("head.sphereface2.margin=D", None),
        ("head.partial_fc.margin=cosfac", "cosface"),
        ("train.optimizer=adam", "adamw"),
        ("train.schedule=cos", None),
        ("engine=deepspeeed", "deepspeed"),
        ("train.amp=fp8", None),
        ("device=gpu", None),
        ("data.loader=dally", "dali"),
        ("model.name=iresnet51", None),
    ],
)
def test_unknown_names_list_the_options(override, near):
    key, value = override.split("=")
    msg = err([override])
    assert key in msg and "is not one of" in msg
    if near:
        assert f"did you mean '{near}'" in msg, msg


def test_backbone_kwargs_checked_before_launch():
    msg = err(["model.name=iresnet", "model.kwargs.widht=8"])
    assert "widht" in msg
    assert "model.dropout" in err(["model.kwargs.dropout=0.2"])


def test_precision_rules():
    assert "bf16" in err(["device=cpu", "train.amp=fp16"])
    assert "choose one" in err(["deepspeed.fp16=true"])
    assert "CUDA" in err(["device=cpu", "engine=deepspeed", "deepspeed.bf16=false", "deepspeed.fp16=true"])
    load_config(None, ["train.amp=fp16"])  # device=auto: decided on the worker's device


def test_schedule_consistency():
    assert "milestones" in err(["train.schedule=step"])
    assert "nothing to train" in err(["train.epochs=0"])
    assert "warmup" in err(["train.max_steps=10", "train.warmup_steps=20"])


def test_resume_path_checked(tmp_path):
    assert "checkpoint.resume" in err([f"checkpoint.resume={tmp_path / 'missing'}"])
    cfg = load_config(None, [f"checkpoint.resume={tmp_path}"])
    assert cfg.checkpoint.resume == str(tmp_path)


# ----------------------------------------------------------------------------- dataset checks


def test_validate_against_dataset():
    cfg = load_config(None, ["data.num_classes=500"])
    validate_against_dataset(cfg, 500, 499)
    with pytest.raises(ConfigError) as e:
        validate_against_dataset(cfg, 1000, 999)
    msg = str(e.value)
    assert "data.num_classes=500" in msg and "999" in msg and ">= 1000" in msg
    with pytest.raises(ConfigError, match="labels up to 600"):
        validate_against_dataset(cfg, 500, 600)  # property says 500, labels go further
    validate_against_dataset(load_config(None, ["data.num_classes=2000"]), 1000, 999)  # larger K ok
    auto = load_config(None, [])
    validate_against_dataset(auto, 1000, 999)
    with pytest.raises(ConfigError, match="inconsistent"):
        validate_against_dataset(auto, 1000, 1000)


# ----------------------------------------------------------------------------- docs and round trip


def test_every_field_documented():
    docs = {i["key"]: i["doc"] for i in field_info(Config)}
    assert "train.lr" in docs and "head.partial_fc.sample_rate" in docs
    assert "checkpoint.resume" in docs and "deepspeed.zero_stage" in docs
    missing = [k for k, d in docs.items() if not d.strip()]
    assert not missing, f"fields without a docstring: {missing}"
    # every section documented too
    assert all(i["doc"] for i in field_info(Config, sections=True))


def test_format_help_lists_all_keys():
    text = format_help()
    for key in (i["key"] for i in field_info(Config)):
        assert f"  {key}:" in text
    from fr_dist.heads import list_heads

    assert "one of: ddp | deepspeed" in text and "one of: " + " | ".join(list_heads()) in text


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(
        str(REPO / "configs/demo_cpu_pfc.yaml"),
        ["train.milestones=[1, 2]", "train.head_lr=0.5", "output_dir=runs/x"],
    )
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert out.is_file() and not list(out.parent.glob(".*tmp*"))
    again = load_config(str(out), [])
    assert again == cfg
    assert config_from_dict(yaml.safe_load(out.read_text())) == cfg
    assert dataclasses.asdict(cfg) == cfg.to_dict()


# ----------------------------------------------------------------------------- launch scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    assert script.is_file(), script
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    r = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_train_sbatch_contract():
    text = (REPO / "launch/slurm/train.sbatch").read_text()
    for needle in (
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "scontrol show hostnames",
        "scontrol requeue",
        "checkpoint.resume=auto",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
    ):
        assert needle in text, needle
    multi = (REPO / "launch/torchrun_multinode.sh").read_text()
    for needle in (
        "rdzv-backend=c10d",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        "NCCL_SOCKET_IFNAME",
        "GLOO_SOCKET_IFNAME",
        "NCCL_IB_",
    ):
        assert needle in multi, needle


def test_usage_errors_of_launch_scripts():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    for script in SCRIPTS[:2]:
        r = subprocess.run([bash, str(script), "2"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(
        [bash, str(SCRIPTS[1]), "8", "--nnodes", "2", "--config", "x.yaml"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2 and "RDZV_ENDPOINT" in r.stderr
