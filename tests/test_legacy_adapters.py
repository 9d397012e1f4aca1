"""Hybrid adapter files of every earlier format (tests/data/legacy_adapters, written by the versions that wrote those
formats with make_legacy_adapters.py) load to the outputs those versions computed, or are refused saying how to
convert them."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hybrid_peft import load_adapter, save_adapter
from hybrid_peft.errors import AdapterFileError
from hybrid_peft.methods.hybrid import hybrid_layers
from hybrid_peft.methods.lora_ga import LoRAGAConfig
from hybrid_peft.methods.mixing import ShareRule, SigmoidRule
from hybrid_peft.serialization import FORMAT_VERSION

FILES = Path(__file__).parent / "data" / "legacy_adapters"
REFUSED = ("v1-default", "v4-branch-lora-ga")
CONVERTIBLE = sorted(p.name for p in FILES.iterdir() if p.is_dir() and p.name not in REFUSED)


def base_and_expected(folder: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    saved = load_file(str(folder / "expected.safetensors"))
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    model.load_state_dict({k[len("base.") :]: v for k, v in saved.items() if k.startswith("base.")})
    return model, saved["x"], saved["y"]


def test_a_file_of_each_earlier_version_is_here() -> None:
    versions = {int(p.name.split("-")[0][1:]) for p in FILES.iterdir() if p.is_dir()}
    assert versions == set(range(1, FORMAT_VERSION))


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_an_earlier_file_loads_to_the_outputs_its_version_computed(name: str, tmp_path: Path) -> None:
    model, x, expected = base_and_expected(FILES / name)
    with pytest.warns(UserWarning, match="no longer exist") if name in ("v4-step", "v4-gradient-mix") else _nothing():
        load_adapter(model, FILES / name / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path / "again")  # and it saves in today's format, to the same outputs
    fresh, _, _ = base_and_expected(FILES / name)
    load_adapter(fresh, tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "low_rank", "rule"),
    [
        ("v2-default", LoRAGAConfig, ShareRule),  # the share rule with sum gates and a LoRA-GA start
        ("v3-default", type(None), ShareRule),  # format 3 made the LoRA start the default
        ("v3-lora-start", type(None), ShareRule),
        ("v4-default", type(None), type(None)),  # both branches at full strength: no rule
        ("v4-sigmoid-max", type(None), SigmoidRule),
        ("v4-fixed-sum", LoRAGAConfig, type(None)),  # λ's gates folded into B and the skew
        ("v4-step", type(None), type(None)),
    ],
)
def test_each_old_option_becomes_a_part_or_a_rule(name: str, low_rank: type, rule: type) -> None:
    model, _, _ = base_and_expected(FILES / name)
    with pytest.warns(UserWarning) if name == "v4-step" else _nothing():
        load_adapter(model, FILES / name / "adapter")
    config = next(iter(hybrid_layers(model).values())).config
    assert isinstance(config.rule, rule)
    assert isinstance(config.low_rank, LoRAGAConfig) == (low_rank is LoRAGAConfig)
    if name.startswith(("v2", "v3")):  # one rate for both branches before format 4
        assert (config.low_rank.lr_scale, config.orthogonal.lr_scale, config.rule.gates) == (1.0, 1.0, "sum")
    if name == "v4-sigmoid-max":
        assert config.rule.gates == "max" and config.orthogonal.lr_scale == 0.3
        assert [float(m.mix) for m in hybrid_layers(model).values()] == pytest.approx([0.3, 0.7])


@pytest.mark.parametrize("name", REFUSED)
def test_the_branch_gate_over_a_lora_ga_start_is_refused_with_the_way_to_merge_it(name: str) -> None:
    model, _, _ = base_and_expected(FILES / name)
    with pytest.raises(AdapterFileError, match=r"gate='branch' with a LoRA-GA start.*save_merged"):
        load_adapter(model, FILES / name / "adapter")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None
