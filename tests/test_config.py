from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from mathprm.config import ConfigError, describe, load_config, parse_args, to_dict


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclasses.dataclass
class Cfg:
    name: str = "run"
    seed: int = 0
    temperature: float = 0.7
    method: Literal["math_shepherd", "omegaprm"] = "math_shepherd"
    limit: int | None = None
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["gsm8k"])
    lora: bool = False
    optim: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature: must be in [0, 2], got {self.temperature}")


def test_defaults_when_nothing_given():
    assert load_config(Cfg) == Cfg()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nmethod: omegaprm\noptim:\n  steps: 20\n")
    cfg = load_config(Cfg, path, ["seed=5", "optim.lr=0.01", "datasets=[math500, gsm8k]", "limit=7"])
    assert cfg.seed == 5 and cfg.method == "omegaprm"
    assert cfg.optim == Inner(lr=0.01, steps=20)
    assert cfg.datasets == ["math500", "gsm8k"] and cfg.limit == 7


def test_int_becomes_float_and_number_becomes_string():
    cfg = load_config(Cfg, None, ["temperature=1", "name=123"])
    assert cfg.temperature == 1.0 and isinstance(cfg.temperature, float)
    assert cfg.name == "123"


def test_null_override_for_optional():
    assert load_config(Cfg, None, ["limit=7", "limit=null"]).limit is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("seed=abc", "'seed'"),
        ("seed=1.5", "'seed'"),
        ("lora=maybe", "'lora'"),
        ("method=ppo", "'method'"),
        ("optim.steps=x", "'optim.steps'"),
        ("nope=1", "'nope'"),
        ("optim.nope=1", "'optim.nope'"),
        ("datasets={gsm8k: 1}", "'datasets'"),
        ("temperature=5", "temperature"),
        ("noequals", "key=value"),
    ],
)
def test_bad_override_names_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [override])
    assert needle in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Cfg, tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, tmp_path / "bad.yaml")


def test_parse_args_and_help(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 9\n")
    assert parse_args(Cfg, ["--config", str(path), "lora=true"]) == Cfg(seed=9, lora=True)
    assert parse_args(Cfg, [f"--config={path}"]).seed == 9
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_args(Cfg, ["stray"])
    with pytest.raises(ConfigError, match="temperature: float = 0.7"):
        parse_args(Cfg, ["--help"])
    assert "optim" in describe(Cfg)


def test_to_dict_round_trips():
    cfg = Cfg(seed=4, optim=Inner(steps=3))
    assert load_config(Cfg, None, [f"{k}={v}" for k, v in to_dict(cfg).items() if k != "optim" and v is not None]) == Cfg(seed=4)
    assert to_dict(cfg)["optim"] == {"lr": 1e-3, "steps": 3}


def test_list_fields_take_comma_separated_text_and_gnu_flags():
    assert load_config(Cfg, None, ["datasets=gsm8k"]).datasets == ["gsm8k"]
    assert load_config(Cfg, None, ["datasets=math500,gsm8k"]).datasets == ["math500", "gsm8k"]
    cfg = parse_args(Cfg, ["--datasets", "math500,arith:hard", "--seed=3", "--limit", "4"])
    assert (cfg.datasets, cfg.seed, cfg.limit) == (["math500", "arith:hard"], 3, 4)
    assert parse_args(Cfg, ["--optim.lr", "2e-3"]).optim.lr == 0.002  # YAML 1.1 reads 2e-3 as text
