"""Recipes are a base plus overlays plus what differs, and resolve exactly as before the split.

tests/fixtures/recipes_resolved/<recipe>.json is every recipe's resolved config as the loader
before the split (one self-contained YAML per recipe) produced it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fr_dist import cli
from fr_dist.train.config import ConfigError
from fr_dist.train.config_load import _merge, _read_recipe, load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
FIXTURES = REPO / "tests" / "fixtures" / "recipes_resolved"


def _dump(d: dict) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"  # 2 and 2.0 differ here


def test_every_recipe_has_its_fixture():
    assert {p.stem for p in RECIPES} == {p.stem for p in FIXTURES.glob("*.json")}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_as_before(path):
    got = _dump(load_config(str(path), [], check_paths=False).to_dict())
    assert got == (FIXTURES / f"{path.stem}.json").read_text()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_states_only_what_differs(path):
    """Each recipe has defaults, and no value of its own repeats what they already set."""
    *defaults, (_, own) = _read_recipe(path)
    assert defaults, f"{path.name} has no defaults"
    base: dict = {}
    for _, d in defaults:
        base = _merge(base, d)

    def repeats(mine, theirs, key=""):
        for k, v in mine.items():
            if isinstance(v, dict) and isinstance(theirs.get(k), dict):
                yield from repeats(v, theirs[k], f"{key}{k}.")
            elif k in theirs and theirs[k] == v:
                yield f"{key}{k}"

    assert not list(repeats(own, base)), path.name


def _write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_merge_in_order_relative_to_each_file(tmp_path):
    _write(tmp_path, "base/a.yaml", "defaults: [../more/b.yaml]\ntrain: {lr: 0.2, epochs: 3}\n")
    _write(tmp_path, "more/b.yaml", "train: {lr: 0.3, momentum: 0.5}\nseed: 7\n")
    _write(tmp_path, "c.yaml", "train: {epochs: 4}\n")
    recipe = _write(tmp_path, "r/recipe.yaml", "defaults: [../base/a.yaml, ../c.yaml]\nseed: 9\n")
    cfg = load_config(str(recipe), ["train.epochs=5"])
    # b < a (a names b first), then c, then the recipe, then the overrides
    assert cfg.train.lr == 0.2 and cfg.train.momentum == 0.5
    assert cfg.train.epochs == 5 and cfg.seed == 9
    assert "defaults" not in cfg.to_dict()


def test_defaults_errors_name_the_file(tmp_path):
    recipe = _write(tmp_path, "r.yaml", "defaults: [missing.yaml]\n")
    msg = str(pytest.raises(ConfigError, load_config, str(recipe)).value)
    assert "missing.yaml not found" in msg and "r.yaml" in msg

    _write(tmp_path, "loop_a.yaml", "defaults: [loop_b.yaml]\n")
    _write(tmp_path, "loop_b.yaml", "defaults: [loop_a.yaml]\n")
    assert "cycle" in str(pytest.raises(ConfigError, load_config, str(tmp_path / "loop_a.yaml")).value)

    bad = _write(tmp_path, "overlay.yaml", "train: {lrr: 0.1}\n")
    recipe = _write(tmp_path, "uses_overlay.yaml", "defaults: [overlay.yaml]\ntrain: {lr: 0.2}\n")
    msg = str(pytest.raises(ConfigError, load_config, str(recipe)).value)
    assert msg.startswith(str(bad)) and "did you mean 'train.lr'" in msg

    _write(tmp_path, "dup.yaml", "seed: 1\nseed: 2\n")
    recipe = _write(tmp_path, "uses_dup.yaml", "defaults: [dup.yaml]\n")
    assert "duplicate key 'seed'" in str(pytest.raises(ConfigError, load_config, str(recipe)).value)
    recipe = _write(tmp_path, "not_a_list.yaml", "defaults: {a: 1}\n")
    assert "list of YAML files" in str(pytest.raises(ConfigError, load_config, str(recipe)).value)


def test_config_command_prints_a_recipe_before_its_data_exists(capsys):
    recipe = str(REPO / "configs" / "ms1mv3_r50_sf2.yaml")  # eval.bins under data/ms1mv3: absent
    assert cli.main(["config", "--config", recipe, "train.lr=0.2"]) == 0
    out, err = capsys.readouterr()
    assert "output_dir: runs/ms1mv3_r50_sf2" in out and "lr: 0.2" in out
    assert err.count("warning: eval.bins:") == 3 and "lfw.bin does not exist" in err
    # training still refuses before anything starts
    assert cli.main(["train", "--config", recipe]) == 2
    assert "config error: eval.bins: data/ms1mv3/lfw.bin does not exist" in capsys.readouterr().err
