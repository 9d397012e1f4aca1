"""The command line: ``hybrid-peft info`` on a model folder, and its error path."""

from __future__ import annotations

import pytest

from hybrid_peft.cli import main

from conftest import tiny_gpt2, tiny_llama


def test_info_groups_modules_and_counts_parameters(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert main(["info", "--model", str(tmp_path / "llama"), "--targets", "q_proj,v_proj", "--set", "rank=2"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "v_proj" in out and "k_proj" not in out
    # 2 layers x (q: 2*(32+32), v: 2*(32+16)) = 448
    assert "4 modules matched; trainable parameters: 448 of" in out


def test_info_lists_every_module_of_a_gpt2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert main(["info", "--model", str(tmp_path / "gpt2"), "--all"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in out and "Conv1D" in out and "lm_head" not in out


def test_info_unknown_target_exits_with_message(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert main(["info", "--model", str(tmp_path / "llama"), "--targets", "qproj"]) == 2
    err = capsys.readouterr().err
    assert "unknown target module name(s) ['qproj']" in err and "q_proj" in err


def test_info_with_another_method_and_bad_setting(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    tiny_llama().save_pretrained(tmp_path / "llama")
    folder = str(tmp_path / "llama")
    assert main(["info", "--model", folder, "--method", "boft", "--set", "block_size=8", "--targets", "q_proj"]) == 0
    # 2 layers x (N=4 blocks x 28 free numbers + 32 scales) = 288
    assert "2 modules matched; trainable parameters: 288 of" in capsys.readouterr().out
    assert main(["info", "--model", folder, "--method", "boft", "--set", "block_size=5"]) == 2
    assert "block sizes that work" in capsys.readouterr().err
    assert main(["info", "--model", folder, "--set", "rank=0"]) == 2
    assert "rank: must be >= 1" in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("alias", "expected"), [("smollm2-135m", "210 modules matched"), ("minilm-l6", "37 modules matched")]
)
def test_info_on_aliases(alias: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", alias]) == 0
    assert expected in capsys.readouterr().out
