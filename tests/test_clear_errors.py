"""Bad input gets one clear error that names the problem and the fix (or, for a diverging run, a warning)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from hybrid_peft import LoRAConfig, attach, save_adapter
from hybrid_peft.errors import AdapterFileError, ConfigError, HybridPeftError, TaskDataError
from hybrid_peft.run import TrainConfig, run_training
from hybrid_peft.serialization import CONFIG_NAME, load_adapter
from hybrid_peft.tasks import get_task
from hybrid_peft.tasks.glue import GlueSpec, read_glue_file

from conftest import tiny_llama


def config_for(model: str, output: Path, **options) -> TrainConfig:  # noqa: ANN003
    base = {
        "model": model,
        "task": "humaneval",
        "steps": 3,
        "batch_size": 2,
        "max_length": 48,
        "warmup_steps": 1,
        "eval_examples": 2,
        "generate": False,
        "output_dir": str(output),
        "threads": 2,
    }
    return TrainConfig.from_dict(base | options)


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_bytes("sentence\tlabel\ngood\t1\nna\xefve\t0\n".encode("latin-1"))
    with pytest.raises(TaskDataError, match=r"train.tsv:3 is not UTF-8 text.*iconv"):
        read_glue_file(path, GlueSpec("toy", "toy", ("sentence",), "label"))
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_bytes(b'{"question": "q", "answer": "\xff"}\n')
    with pytest.raises(TaskDataError, match=r"train.jsonl:1 is not UTF-8"):
        get_task("gsm8k", data_dir=tmp_path).train_rows()


def test_empty_json_lines_files(tmp_path: Path) -> None:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    with pytest.raises(TaskDataError, match="has no examples"):
        get_task("gsm8k", data_dir=tmp_path).train_rows()
    pytest.importorskip("datasets")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("")
    (folder / "validation.jsonl").write_text('{"sentence": "fine", "label": 1}\n')
    with pytest.raises(TaskDataError, match=r"train.jsonl is empty"):
        get_task("sst2", dataset=str(folder)).train_rows()


def test_a_headerless_spec_must_number_its_columns() -> None:
    with pytest.raises(TaskDataError, match=r"header: false.*numbered.*\['sentence', 'label'\]"):
        GlueSpec("toy", "toy", ("sentence",), "label", header=False)
    assert GlueSpec("toy", "toy", (3,), 1, header=False).text_columns == (3,)


def test_a_full_disk_names_the_folder_and_how_to_continue(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hybrid_peft.run.checkpoint as checkpoint

    def no_space(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device", "training_state.safetensors")

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    with pytest.raises(HybridPeftError, match=r"no space left on the device holding .*run.*--resume"):
        run_training(config_for(tiny_lm, tmp_path / "run", save_every=1), progress=False)

    from safetensors import SafetensorError

    def no_space_in_safetensors(*args, **kwargs) -> None:  # noqa: ANN002, ANN003 - its Rust writer's report
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')  # fmt: skip

    monkeypatch.setattr(checkpoint, "save_file", no_space_in_safetensors)
    with pytest.raises(HybridPeftError, match=r"no space left on the device holding .*--resume"):
        run_training(config_for(tiny_lm, tmp_path / "run2", save_every=1), progress=False)


def test_max_length_beyond_the_models_positions(tiny_lm: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--max-length 300 is beyond the 256 positions.*--max-length 256"):
        run_training(config_for(tiny_lm, tmp_path / "run", max_length=300), progress=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format_version", "2", r"'format_version' should be an int, got '2'"),
        ("configs", {"method": "lora"}, r"'configs' should be a list"),
        ("modules", {"model.layers.0.self_attn.q_proj": "0"}, r"'modules' should map module names"),
    ],
)
def test_adapter_configs_with_wrong_types(tmp_path: Path, field: str, value: object, message: str) -> None:
    save_adapter(attach(tiny_llama(), LoRAConfig(rank=2)), tmp_path / "adapter")
    path = tmp_path / "adapter" / CONFIG_NAME
    document = json.loads(path.read_text())
    document[field] = value
    path.write_text(json.dumps(document))
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_options_a_method_would_ignore_are_refused(tiny_lm: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--method full .* takes no method options, got \['rank'\]"):
        config_for(tiny_lm, tmp_path, method="full", adapter={"rank": 8})
    with pytest.raises(ConfigError, match=r"unknown lora config field\(s\) \['block_size'\]"):
        config_for(tiny_lm, tmp_path, method="lora", adapter={"block_size": 4})


def test_a_rank_larger_than_the_layer_is_refused() -> None:
    model = tiny_llama()  # k_proj and v_proj are 32 -> 16
    with pytest.raises(ConfigError, match=r"k_proj: rank 20 is larger than the layer \(16×32\)"):
        attach(model, LoRAConfig(rank=20))
    assert not any("lora" in n for n, _ in model.named_parameters()), "a refused attach leaves the model untouched"


def test_a_diverging_loss_gets_a_warning(tiny_bert: str, tmp_path: Path) -> None:
    run = config_for(tiny_bert, tmp_path / "run", task="sst2", learning_rate=1e6, batch_size=8, steps=4)
    with pytest.warns(UserWarning, match=r"over 100× the first step's.*diverging.*--learning-rate \(now 1e\+06\)"):
        summary = run_training(run, progress=False)
    assert summary.final_loss > 100  # finite, and far above the first step's ~0.69


def _bad_model_folders(root: Path, tiny_lm: str) -> dict[str, tuple[str, str]]:
    """A model source per case, and the words its one-line error must hold."""
    import shutil

    empty = root / "empty"
    empty.mkdir()
    a_file = root / "weights.safetensors"
    a_file.write_bytes(b"not a model")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(Path(tiny_lm) / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    remote_code = root / "remote-code"
    shutil.copytree(tiny_lm, remote_code)
    config = json.loads((remote_code / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote_code / "config.json").write_text(json.dumps(config))
    return {
        "missing path": (str(root / "no" / "such" / "model"), "no model folder at"),
        "empty name": ("", "no model given"),
        "a file": (str(a_file), "is a file"),
        "no config.json": (str(empty), "has no config.json"),
        "only pickled weights": (str(pickled), "only as pickles"),
        "auto_map": (str(remote_code), "auto_map"),
        "offline hub id": ("someone/not-cached-here", "could not load"),
    }


def test_a_bad_model_source_is_one_line_naming_the_fix(
    tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from hybrid_peft.cli import main

    for case, (model, words) in _bad_model_folders(tmp_path, tiny_lm).items():
        for task in ("causal-lm", "auto"):  # auto reads the model's config first
            code = main(["info", "--model", model, "--task", task])
            err = capsys.readouterr().err.strip()
            assert code == 2 and err.startswith("error: "), (case, task, err)
            assert words in err or task == "auto" and "could not read the config" in err, (case, task, err)
            assert "\n" not in err and "Traceback" not in err, (case, task, err)


def test_an_output_folder_that_cannot_be_written_is_one_line(tiny_lm: str, tmp_path: Path) -> None:
    import os

    common = {"model": tiny_lm, "task": "humaneval", "steps": 1, "batch_size": 2, "max_length": 48, "threads": 1,
              "eval_examples": 2, "generate": False}  # fmt: skip
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output in (a_file / "run", tmp_path / ("x" * 300)):  # below a file; a name too long for the file system
        with pytest.raises(HybridPeftError, match="cannot write the run's folder .* choose another --output-dir"):
            run_training(TrainConfig(**common, output_dir=str(output)), progress=False)
    if os.geteuid() != 0:  # root writes to read-only folders anyway
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        with pytest.raises(HybridPeftError, match="cannot write the run's folder"):
            run_training(TrainConfig(**common, output_dir=str(read_only / "run")), progress=False)
