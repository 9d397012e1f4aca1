"""Configs: frozen, JSON round trip, validation naming the bad field, unknown keys strict vs lenient."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybrid_peft import LoRAConfig
from hybrid_peft.config import AdapterConfig
from hybrid_peft.errors import ConfigError
from hybrid_peft.registry import available_methods, get_method


@given(
    rank=st.integers(1, 512),
    alpha=st.floats(0.01, 1e3, allow_nan=False),
    dropout=st.floats(0.0, 0.99),
    use_rslora=st.booleans(),
    targets=st.one_of(st.just("all-linear"), st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), min_size=1)),
)
def test_json_round_trip(rank: int, alpha: float, dropout: float, use_rslora: bool, targets) -> None:  # noqa: ANN001
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, targets=targets)
    text = config.to_json()
    assert json.loads(text)["method"] == "lora"
    assert AdapterConfig.from_json(text) == config
    assert LoRAConfig.from_json(text) == config


def test_config_is_frozen_and_hashable() -> None:
    config = LoRAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 4  # type: ignore[misc]
    assert hash(LoRAConfig(targets=["a", "b"])) == hash(LoRAConfig(targets=("a", "b")))
    assert config.replace(rank=4).rank == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"targets": []}, "targets"),
        ({"targets": ""}, "targets"),
        ({"targets": "q_proj("}, "targets"),
        ({"targets": 3}, "targets"),
        ({"exclude": [""]}, "exclude"),
    ],
)
def test_bad_fields_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        LoRAConfig(**kwargs)


def test_unknown_keys_strict_and_lenient() -> None:
    data = LoRAConfig(rank=4).to_dict() | {"future_option": 1}
    with pytest.raises(ConfigError, match="future_option"):
        AdapterConfig.from_dict(data)
    with pytest.warns(UserWarning, match="future_option"):
        assert AdapterConfig.from_dict(data, strict=False) == LoRAConfig(rank=4)


def test_method_dispatch_errors() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'.*lora"):
        AdapterConfig.from_dict({"method": "nope"})
    with pytest.raises(ConfigError, match="no 'method'"):
        AdapterConfig.from_dict({"rank": 4})
    assert "lora" in available_methods()
    assert get_method("lora").config_class is LoRAConfig


def test_scaling() -> None:
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=8, use_rslora=True).scaling == 2.0
