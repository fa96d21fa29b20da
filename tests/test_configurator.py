"""configurator.py: nanoGPT's override semantics (type of the default enforced, unknown keys refused) and fields
that may be unset (`kind | None`)."""
from dataclasses import dataclass

import pytest

from configurator import parse_config


@dataclass
class Config:
    name: str = "run"
    steps: int = 10
    lr: float = 1e-3
    compile: bool = False
    n_l: int | None = None
    drop_question: bool | None = None


def test_overrides_keep_the_type_of_the_default():
    cfg, positional = parse_config(Config(), ["--steps=20", "--lr=1", "--compile=True", "--name=x", "a.csv"])
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.name, positional) == (20, 1.0, True, "x", ["a.csv"])
    assert type(cfg.lr) is float
    with pytest.raises(ValueError, match="steps must be int"):
        parse_config(Config(), ["--steps=1.5"])
    with pytest.raises(ValueError, match="unknown config key 'stepz'"):
        parse_config(Config(), ["--stepz=1"])


def test_an_optional_field_takes_its_kind_or_none():
    cfg, _ = parse_config(Config(), ["--n_l=64", "--drop_question=False"])
    assert (cfg.n_l, cfg.drop_question) == (64, False)
    cfg, _ = parse_config(Config(n_l=8, drop_question=True), ["--n_l=None", "--drop_question=None"])
    assert (cfg.n_l, cfg.drop_question) == (None, None)
    with pytest.raises(ValueError, match="not a valid int"):
        parse_config(Config(), ["--n_l=sixty"])
    with pytest.raises(ValueError, match="drop_question must be True or False"):
        parse_config(Config(), ["--drop_question=yes"])


def test_a_config_file_sets_fields_and_may_unset_one(tmp_path):
    path = tmp_path / "run.py"
    path.write_text("steps = 3\nn_l = None\n")
    cfg, _ = parse_config(Config(n_l=4), [str(path), "--lr=0.5"])
    assert (cfg.steps, cfg.n_l, cfg.lr) == (3, None, 0.5)
