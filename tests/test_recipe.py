"""The training recipe: exact resume, non-finite stop, full fine-tuning, classification heads, config files and
overrides, two processes under torchrun. Tiny random models with MiniLM's tokenizer keep it fast."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from hybrid_peft.errors import BatchDoesNotFitError, ConfigError, NonFiniteLossError
from hybrid_peft.run import RunSummary, TrainConfig, run_training
from hybrid_peft.run.before import SharedBefore
from hybrid_peft.run.loop import batch_indices
from hybrid_peft.run.recipe import Recipe

from conftest import run_torchrun, tiny_llama


def config_for(model: str, output: Path, **options) -> TrainConfig:  # noqa: ANN003
    base = {
        "model": model,
        "task": "humaneval",
        "steps": 6,
        "batch_size": 2,
        "max_length": 64,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        "eval_examples": 4,
        "generate": False,
        "output_dir": str(output),
        "threads": 2,
    }
    return TrainConfig.from_dict(base | options)


def losses(output: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (output / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize(("method", "adapter"), [("lora", {"dropout": 0.1}), ("hybrid", {"rank": 2})])
def test_resume_continues_exactly(tiny_lm: str, tmp_path: Path, method: str, adapter: dict) -> None:
    straight = config_for(tiny_lm, tmp_path / "straight", method=method, adapter=adapter)
    run_training(straight, progress=False)
    interrupted = config_for(tiny_lm, tmp_path / "resumed", method=method, adapter=adapter, save_every=3)
    run_training(interrupted, progress=False)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-000003"
    assert (checkpoint / "trainer_state.json").is_file()
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.partial")), "no half-written checkpoints"
    for name in ("adapter", "summary.json"):  # as if the run had died after step 3's checkpoint
        target = tmp_path / "resumed" / name
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink()
    summary = run_training(interrupted, resume=True, progress=False)
    assert summary.resumed_from_step == 3
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 6
    for name in ("summary.json", "report.md", "loss.png", "adapter/adapter_config.json"):
        assert (tmp_path / "resumed" / name).is_file(), name


@pytest.mark.slow
def test_a_lora_ga_start_counts_as_training_time_and_survives_resume(tiny_lm: str, tmp_path: Path) -> None:
    """LoRA-GA's gradient estimate replaces no step but costs time before step 1: the time-to-quality clock
    (``train_seconds`` of each evaluation) starts with it, and a resumed run keeps it."""
    from hybrid_peft.run.checkpoint import read_trainer_state

    output = tmp_path / "run"
    config = config_for(tiny_lm, output, method="lora-ga", adapter={"rank": 2}, eval_every=3, save_every=3)
    summary = run_training(config, progress=False)
    assert summary.start_seconds is not None and summary.start_seconds > 0
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    step_seconds = {r["step"]: r["seconds"] for r in records if "seconds" in r}
    evaluations = [r for r in records if "eval" in r and r["step"] > 0]
    assert [r["step"] for r in evaluations] == [3, 6]
    for record in evaluations:
        spent = sum(seconds for step, seconds in step_seconds.items() if step < record["step"])  # steps 0, 1, …
        assert record["train_seconds"] == pytest.approx(summary.start_seconds + spent, rel=1e-9)
    assert read_trainer_state(output / "checkpoints" / "step-000003").start_seconds == summary.start_seconds
    (output / "summary.json").unlink()
    resumed = run_training(config, resume=True, progress=False)
    assert resumed.resumed_from_step == 3 and resumed.start_seconds == summary.start_seconds


def test_non_finite_loss_stops_and_never_offers_a_bad_checkpoint(tiny_lm: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = config_for(tiny_lm, tmp_path / "run", learning_rate=1e30, save_every=1, steps=8)
    with pytest.raises(NonFiniteLossError, match=r"(training loss is (nan|inf)|weights became non-finite).*stopped"):
        run_training(config, progress=False)
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):
        assert (checkpoint / "trainer_state.json").is_file()
        if checkpoint.name.removeprefix("step-").isdigit():  # what --resume may pick: finite weights only
            tensors = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
            assert all(bool(t.isfinite().all()) for t in tensors.values()), checkpoint


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate"
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_a_batch_that_does_not_fit_names_the_fix(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    forward = transformers.LlamaForCausalLM.forward

    def out_of_memory_in_training(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.training:
            raise failure
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", out_of_memory_in_training)
    with pytest.raises(BatchDoesNotFitError, match=r"step 0: a batch of 2 × \d+ tokens does not fit in memory") as info:
        run_training(config_for(tiny_lm, tmp_path / "oom"), progress=False)
    assert "lower --batch-size or --max-length" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one message, no traceback wall

    def other_error(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.training:
            raise RuntimeError("shape mismatch")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", other_error)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not mistaken for memory
        run_training(config_for(tiny_lm, tmp_path / "other"), progress=False)


def test_full_fine_tuning_and_report(tiny_lm: str, tmp_path: Path) -> None:
    summary = run_training(
        config_for(tiny_lm, tmp_path / "full", method="full", steps=3, learning_rate=1e-3), progress=False
    )
    assert summary.trainable_parameters == summary.total_parameters
    assert RunSummary.read(tmp_path / "full") == summary, "the summary round-trips through summary.json"
    assert (tmp_path / "full" / "model" / "config.json").is_file()
    assert summary.after["loss"] < summary.before["loss"]
    report = (tmp_path / "full" / "report.md").read_text()
    assert "| loss |" in report and "loss.png" in report
    # Provenance: what produced the numbers, in the summary and the report.
    environment = summary.environment
    assert environment.torch == torch.__version__ and environment.threads >= 1
    assert environment.commit is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", environment.commit)
    assert f"torch {torch.__version__}" in report and environment.finished_at in report


def test_runs_from_one_base_model_share_the_evaluation_before_training(
    tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "before"
    first = run_training(config_for(tiny_lm, tmp_path / "lora", steps=2, before_cache=str(cache)), progress=False)
    (entry,) = cache.glob("*.json")
    assert json.loads(entry.read_text())["metrics"] == first.before
    evaluated: list[str] = []
    evaluate = Recipe.evaluate
    monkeypatch.setattr(
        Recipe, "evaluate", lambda self, label, *a, **k: evaluated.append(label) or evaluate(self, label, *a, **k)
    )
    # another method, rate and seed from the same base model, rows and options: read, not evaluated
    hybrid = {"method": "hybrid", "adapter": {"rank": 2}, "seed": 1, "learning_rate": 1e-3, "steps": 2}
    second = run_training(config_for(tiny_lm, tmp_path / "hybrid", **hybrid, before_cache=str(cache)))
    assert "before" not in evaluated and "after" in evaluated and second.before == first.before
    assert f"hybrid: the evaluation before training from {entry}" in capsys.readouterr().out
    assert json.loads((tmp_path / "hybrid" / "train_log.jsonl").read_text().splitlines()[0])["eval"] == first.before
    # what the run would have measured itself: every adapter starts as the base model
    own = run_training(config_for(tiny_lm, tmp_path / "own", **hybrid), progress=False)
    assert own.before == pytest.approx(first.before, rel=1e-5) and "before" in evaluated
    # other rows or evaluation options get an entry of their own
    evaluated.clear()
    run_training(
        config_for(tiny_lm, tmp_path / "short", steps=2, max_length=48, before_cache=str(cache)), progress=False
    )
    run_training(
        config_for(tiny_lm, tmp_path / "fewer", steps=2, eval_examples=3, before_cache=str(cache)), progress=False
    )
    assert evaluated.count("before") == 2 and len(list(cache.glob("*.json"))) == 3
    # an unreadable entry is evaluated again, with a warning, and replaced
    entry.write_text("{not json", encoding="utf-8")
    with pytest.warns(UserWarning, match="not a readable evaluation of this run's base model"):
        again = run_training(config_for(tiny_lm, tmp_path / "again", steps=2, before_cache=str(cache)), progress=False)
    assert again.before == first.before and json.loads(entry.read_text())["metrics"] == first.before
    # a classifier's new head is drawn from the seed: runs of one seed share, another seed's head is another model
    evaluated.clear()
    classifier = {"task": "sst2", "steps": 2, "eval_examples": 16, "before_cache": str(cache)}
    lora = run_training(config_for(tiny_lm, tmp_path / "sst2-lora", **classifier))
    assert "gets a new classification head" in capsys.readouterr().out  # a decoder read as a classifier
    boft = run_training(config_for(tiny_lm, tmp_path / "sst2-boft", method="boft", **classifier), progress=False)
    other = run_training(config_for(tiny_lm, tmp_path / "sst2-seed-1", seed=1, **classifier), progress=False)
    assert evaluated.count("before") == 2 and boft.before == lora.before != other.before


def test_the_shared_evaluation_is_keyed_by_the_base_models_weights(tmp_path: Path) -> None:
    config = TrainConfig.from_dict({"task": "humaneval", "output_dir": str(tmp_path / "run")})
    rows, texts = [{"prompt": "def f():", "completion": " return 1"}], ["general text"]

    def path(model: torch.nn.Module, rows: list = rows, texts: list | None = texts, **options) -> Path:  # noqa: ANN003
        changed = dataclasses.replace(config, **options)
        return SharedBefore.for_run(tmp_path, changed, model, rows, texts).path

    model = tiny_llama(0)
    assert path(model) == path(tiny_llama(0))  # the same weights, another copy
    assert path(tiny_llama(1)) != path(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    changed = path(model)
    assert changed != path(tiny_llama(0))
    assert len({changed, path(model, rows=rows * 2), path(model, texts=None), path(model, eval_batch_size=4),
                path(model, generate=False), path(model, dtype="bfloat16")}) == 6  # fmt: skip


def test_classification_task_trains_head_and_adapter(tiny_bert: str, tmp_path: Path) -> None:
    summary = run_training(
        config_for(tiny_bert, tmp_path / "sst2", task="sst2", steps=4, eval_examples=32), progress=False
    )
    assert set(summary.after) == {"accuracy", "f1", "mcc", "loss"}
    saved = json.loads((tmp_path / "sst2" / "adapter" / "adapter_config.json").read_text())
    assert saved["trained_base_parameters"] == ["classifier.weight", "classifier.bias"]


def test_config_file_with_overrides(tiny_lm: str, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"model": tiny_lm, "method": "lora", "adapter": {"rank": 2, "alpha": 4}, "steps": 50})
    )
    config = TrainConfig.from_file(path, {"steps": 2, "adapter": {"rank": 4}})
    assert config.steps == 2 and config.adapter == {"rank": 4, "alpha": 4}
    with pytest.raises(ConfigError, match="unknown training option.*stepz"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="rank: must be >= 1"):
        TrainConfig.from_dict({"adapter": {"rank": 0}})
    with pytest.raises(ConfigError, match="unknown method 'lorax'"):
        TrainConfig.from_dict({"method": "lorax"})
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.yaml")


def test_config_file_can_be_a_run_summary(tiny_lm: str, tmp_path: Path) -> None:
    """A recorded run's summary.json reruns it (or brackets it at another rate) without its run folder."""
    recorded = TrainConfig.from_dict({"model": tiny_lm, "method": "lora", "adapter": {"rank": 2}, "steps": 7})
    summary = {"config": recorded.to_dict(), "task": "gsm8k", "after": {"loss": 1.0}, "median_step_s": 0.1}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    config = TrainConfig.from_file(path, {"learning_rate": 1.5e-4, "output_dir": str(tmp_path / "bracket")})
    assert config.to_dict() == {
        **recorded.to_dict(),
        "learning_rate": 1.5e-4,
        "output_dir": str(tmp_path / "bracket"),
    }
    path.write_text(json.dumps({**summary, "config": ["not", "a", "mapping"]}))
    with pytest.raises(ConfigError, match="its 'config' must be a mapping"):
        TrainConfig.from_file(path)
    # a plain config that merely has an "after" key is still read as options (and its unknown key named)
    path.write_text(json.dumps({"after": 1}))
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) \['after'\]"):
        TrainConfig.from_file(path)


def test_cli_train_runs_and_reports_bad_options(tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hybrid_peft.cli import main

    arguments = [
        "train",
        "--model",
        tiny_lm,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "48",
        "--eval-examples",
        "2",
        "--no-generate",
        "--output-dir",
        str(tmp_path / "cli"),
        "--set",
        "rank=2",
    ]
    assert main(arguments) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["config"]["adapter"] == {"rank": 2}
    assert main(["train", "--model", tiny_lm, "--set", "rank=-1", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "rank: must be >= 1" in capsys.readouterr().err


def test_batches_are_a_pure_function_of_the_step() -> None:
    first = [batch_indices(s, 10, 3, seed=1) for s in range(7)]
    assert first == [batch_indices(s, 10, 3, seed=1) for s in range(7)]
    assert sorted(sum(first[:3], []) + [batch_indices(3, 10, 3, seed=1)[0]]) == list(range(10)), (
        "an epoch is a permutation"
    )
    rank0, rank1 = batch_indices(0, 10, 2, 0, rank=0, world=2), batch_indices(0, 10, 2, 0, rank=1, world=2)
    assert not set(rank0) & set(rank1), "ranks see different examples"


@pytest.mark.slow
def test_two_processes_train_in_sync_and_only_rank_zero_writes(tiny_lm: str, tmp_path: Path) -> None:
    output = tmp_path / "ddp"
    run_torchrun(
        [
            "-m",
            "hybrid_peft.cli",
            "train",
            "--model",
            tiny_lm,
            "--method",
            "hybrid",
            "--set",
            "rank=2",
            "--set",
            "rule=share",  # a per-step rule, so each step writes λ (the fixed hybrid, rule=none, writes none)
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--max-length",
            "48",
            "--eval-examples",
            "2",
            "--no-generate",
            "--threads",
            "1",
            "--output-dir",
            str(output),
        ]
    )
    summary = RunSummary.read(output)
    assert summary.processes == 2 and summary.ranks_in_sync is True
    assert len(losses(output)) == 4, "one log line per step: only rank 0 writes"
    assert len((output / "mixing.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("method", ["peft-lora", "peft-lora-ga", "peft-boft", "peft-oft", "peft-lora+oft"])
def test_peft_peers_train_through_the_same_recipe(tiny_lm: str, tmp_path: Path, method: str) -> None:
    options = {"block_size": 4} if method == "peft-boft" else {}
    ours = {
        "peft-lora": "lora",
        "peft-lora-ga": "lora-ga",
        "peft-boft": "boft",
        "peft-oft": "boft",
        "peft-lora+oft": "lora",
    }
    ours = ours[method]
    peer = run_training(
        config_for(tiny_lm, tmp_path / method, method=method, adapter=options, steps=3, init_batches=2),
        progress=False,
    )
    reference = run_training(
        config_for(tiny_lm, tmp_path / ours, method=ours, adapter=options, steps=3, init_batches=2), progress=False
    )
    assert 0 < peer.trainable_parameters < peer.total_parameters
    # Every peer starts as the base model on the same first batch: same before-metrics and the same first loss.
    assert peer.before["loss"] == pytest.approx(reference.before["loss"], rel=1e-6)
    assert losses(tmp_path / method)[0] == pytest.approx(losses(tmp_path / ours)[0], rel=1e-4)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / method))))
    saved = list((tmp_path / method / "adapter").iterdir())
    assert saved, "the peer's weights were not saved"


def test_peers_refuse_what_they_do_not_offer(tiny_lm: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option.*valid options are"):
        config_for(tiny_lm, tmp_path, method="peft-lora", adapter={"block_size": 4})
    with pytest.raises(ConfigError, match="--save-every, --merge, --fsdp"):
        config_for(tiny_lm, tmp_path, method="peft-boft", save_every=2)
    with pytest.raises(ConfigError, match="--resume is not offered"):
        run_training(config_for(tiny_lm, tmp_path, method="peft-lora"), resume=True, progress=False)
