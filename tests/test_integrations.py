"""Training with the tools people use (TRL's SFTTrainer and DPOTrainer, transformers' Trainer, a loop under
``accelerate launch``) and sharing the result (an adapter from a Hub-style folder, a merged checkpoint that loads
without hybrid-peft). README's "Use it with TRL, the Trainer and accelerate" is copied from these tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from hybrid_peft import (
    BOFTConfig,
    HybridConfig,
    HybridPeftCallback,
    LoRAConfig,
    LoRAGAConfig,
    ShareRule,
    UnitaryConfig,
    attach,
    detach,
    load_adapter,
    parameter_groups,
    save_adapter,
    save_merged,
)
from hybrid_peft.adapters import adapter_layers, adapter_parameters
from hybrid_peft.errors import AdapterFileError
from hybrid_peft.telemetry import read_mixing_telemetry

from method_cases import perturb_adapters

trl = pytest.importorskip("trl")

# A ChatML-like template for the test tokenizer (MiniLM's, which has none); real chat models bring their own.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
)
METHODS = {
    "lora": LoRAConfig(rank=2, alpha=4.0, targets="all-linear"),
    "lora-ga": LoRAGAConfig(rank=2, alpha=4.0, targets="all-linear"),
    "boft": BOFTConfig(block_size=4, targets="all-linear"),
    "unitary": UnitaryConfig(targets="all-linear"),
    "hybrid": HybridConfig(targets="all-linear", low_rank=LoRAConfig(rank=2, alpha=4.0)),
    "hybrid-paper": HybridConfig(targets="all-linear", low_rank=LoRAGAConfig(rank=2, alpha=4.0), rule=ShareRule()),
}
IDS = torch.tensor([[3, 17, 256, 1000, 42, 7, 99, 5]])
ON_CPU = {  # every trainer here: 3 steps of 4 examples on the CPU, no reports, no bars (SFTConfig defaults to bf16)
    "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "bf16": False, "use_cpu": True,
    "report_to": "none", "disable_tqdm": True,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def chat_tokenizer(folder: str) -> AutoTokenizer:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_data(count: int = 16):  # noqa: ANN201
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"what is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{2 * i}"},
                ]
            }
            for i in range(count)
        ]
    )


def preference_data(count: int = 8):  # noqa: ANN201
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"what is {i} plus {i}?"}],
                "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
                "rejected": [{"role": "assistant", "content": f"{2 * i + 1}"}],
            }
            for i in range(count)
        ]
    )


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_only_adapters_trained(model: torch.nn.Module, base: dict[str, torch.Tensor], before: dict) -> None:
    """Some adapter parameter moved, and with the adapters detached the model is the base it started from (a
    LoRA-GA start's offset of the base weight included)."""
    after = {name: p.detach() for name, p in adapter_parameters(model).items()}
    assert any(not torch.equal(after[name], before[name]) for name in after), "no adapter parameter changed"
    detached = snapshot(detach(model))
    assert detached.keys() == base.keys()
    for name, value in base.items():
        torch.testing.assert_close(detached[name], value, atol=1e-6, rtol=0, msg=f"{name} changed")


class RecordStart(TrainerCallback):
    """Added after HybridPeftCallback: what the model computes and holds once the data-dependent start has run."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        self.output = logits(model)
        self.adapters = {name: p.detach().clone() for name, p in adapter_parameters(model).items()}
        model.train()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trl_sft_trainer_trains_each_method_and_the_adapter_reloads(method: str, tiny_lm: str, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    base, base_output = snapshot(model), logits(model)
    # --- README: TRL's SFTTrainer ---
    attach(model, METHODS[method])  # e.g. HybridConfig(targets="all-linear")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path / "sft"), save_steps=3, max_length=32, **ON_CPU),
        train_dataset=chat_data(),  # {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
        processing_class=chat_tokenizer(tiny_lm),
        optimizers=(torch.optim.AdamW(parameter_groups(model, 1e-2)), None),  # each part at its lr_scale
        callbacks=[HybridPeftCallback(init_batches=2, telemetry_path=tmp_path / "mixing.jsonl")],  # module docstring
    )
    # --- README end: then trainer.train() and save_adapter(model, "out/adapter") ---
    start = RecordStart()
    trainer.add_callback(start)
    trainer.train()
    save_adapter(model, tmp_path / "adapter")
    trained = logits(model)
    torch.testing.assert_close(start.output, base_output, atol=1e-5, rtol=0)  # every start leaves outputs as they were

    layers = adapter_layers(model).values()
    if any(layer.needs_gradient_init for layer in layers):
        assert all(layer.initialised for layer in layers), "the callback ran the data-dependent start"
        assert any(p.abs().sum() > 0 for name, p in start.adapters.items() if name.endswith("lora_B"))
    if getattr(METHODS[method], "rule", None) is not None:
        assert len(read_mixing_telemetry(tmp_path / "mixing.jsonl")) == 3  # the rule ran before every optimiser step
    else:
        assert not (tmp_path / "mixing.jsonl").exists()  # no per-step hook without a rule

    for folder in (tmp_path / "adapter", tmp_path / "sft" / "checkpoint-3" / "adapter"):  # the callback's, at the save
        fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), folder)
        torch.testing.assert_close(logits(fresh), trained, atol=1e-5, rtol=0)
    assert_only_adapters_trained(model, base, start.adapters)


@pytest.mark.parametrize("method", ["lora", "hybrid"])
def test_trl_dpo_trainer_trains_lora_and_the_hybrid_against_the_start_as_reference(
    method: str, tiny_lm: str, tmp_path: Path
) -> None:
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    base = snapshot(model)
    # --- README: TRL's DPOTrainer ---
    attach(model, METHODS[method])
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(tmp_path / "dpo"),
            save_strategy="no",
            logging_steps=1,
            precompute_ref_log_probs=True,  # the adapters start as the identity: the reference is the model itself
            **ON_CPU,
        ),
        train_dataset=preference_data(),  # {"prompt": [...], "chosen": [...], "rejected": [...]}
        processing_class=chat_tokenizer(tiny_lm),
        optimizers=(torch.optim.AdamW(parameter_groups(model, 1e-2)), None),
        callbacks=[HybridPeftCallback()],
    )
    # --- README end ---
    before = {name: p.detach().clone() for name, p in adapter_parameters(model).items()}
    trainer.train()
    logged = [row for row in trainer.state.log_history if "rewards/margins" in row]
    assert len(logged) == 3
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert logged[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-6)
    assert_only_adapters_trained(model, base, before)


def test_transformers_trainer_runs_the_lora_ga_start_and_the_adapter_reloads(tiny_lm: str, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    base = snapshot(model)
    ids = torch.randint(5, 1000, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    # --- README: transformers' Trainer ---
    attach(model, LoRAGAConfig(rank=2, targets="all-linear"))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "trainer"),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            use_cpu=True,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        ),
        train_dataset=data,
        optimizers=(torch.optim.AdamW(parameter_groups(model, 1e-2)), None),
        callbacks=[HybridPeftCallback(init_batches=2)],  # LoRA-GA's start on the first 2 batches
    )
    # --- README end ---
    start = RecordStart()
    trainer.add_callback(start)
    trainer.train()
    assert all(layer.initialised for layer in adapter_layers(model).values())
    save_adapter(model, tmp_path / "adapter")
    trained = logits(model)
    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), trained, atol=1e-5, rtol=0)
    assert_only_adapters_trained(model, base, start.adapters)


def test_trainer_resumed_from_a_checkpoint_keeps_the_trained_start(tiny_lm: str, tmp_path: Path) -> None:
    """The callback runs the data-dependent start on a fresh run only: on resume the Trainer restores the trained
    adapter (and the offset base) from the checkpoint, and starting again would overwrite them."""
    from trl import SFTConfig, SFTTrainer

    def trainer_for(model: torch.nn.Module, steps: int, seen: list) -> Trainer:
        class Record(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
                seen.append({name: p.detach().clone() for name, p in adapter_parameters(model).items()})

        return SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=str(tmp_path / "sft"), save_steps=2, max_length=32, **(ON_CPU | {"max_steps": steps})
            ),
            train_dataset=chat_data(),
            processing_class=chat_tokenizer(tiny_lm),
            optimizers=(torch.optim.AdamW(parameter_groups(model, 1e-2)), None),
            callbacks=[HybridPeftCallback(init_batches=2), Record()],
        )

    first = attach(AutoModelForCausalLM.from_pretrained(tiny_lm), METHODS["lora-ga"])
    trainer_for(first, 2, []).train()
    saved = {name: p.detach().clone() for name, p in adapter_parameters(first).items()}

    resumed = attach(AutoModelForCausalLM.from_pretrained(tiny_lm), METHODS["lora-ga"])
    seen: list = []
    trainer_for(resumed, 3, seen).train(resume_from_checkpoint=str(tmp_path / "sft" / "checkpoint-2"))
    for name, value in saved.items():  # at train begin the resumed model holds the checkpoint's trained adapter
        torch.testing.assert_close(seen[0][name], value, atol=0, rtol=0)


@pytest.mark.slow
def test_accelerate_launch_trains_on_two_cpu_processes_to_one_adapter(tiny_lm: str, tmp_path: Path) -> None:
    script = Path(__file__).parent / "scripts" / "accelerate_loop.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), tiny_lm, str(tmp_path),
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [load_file(tmp_path / f"adapter-rank{r}" / "adapter_model.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:  # the same start (estimates summed), the same averaged gradients, the same λ
        torch.testing.assert_close(ranks[0][name], ranks[1][name], atol=1e-6, rtol=0, msg=name)
    assert any(name.endswith("lora_A0") and ranks[0][name].abs().sum() > 0 for name in ranks[0])  # the start ran
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "adapter")
    assert len(adapter_layers(model)) == len({name.rsplit(".", 1)[0] for name in ranks[0]})


@pytest.mark.parametrize("method", ["hybrid", "unitary"])
def test_merged_export_loads_where_hybrid_peft_cannot_be_imported(method: str, tiny_lm: str, tmp_path: Path) -> None:
    """For the methods PEFT has no format for, the merged checkpoint is the export: plain transformers loads it (so
    does any server that loads transformers checkpoints) in a process where ``import hybrid_peft`` fails."""
    model = attach(AutoModelForCausalLM.from_pretrained(tiny_lm), METHODS[method])
    perturb_adapters(model)
    expected = logits(model)
    save_merged(model, tmp_path / "merged", tokenizer=chat_tokenizer(tiny_lm))
    assert "hybrid" not in (tmp_path / "merged" / "config.json").read_text()
    program = (
        "import sys; sys.modules['hybrid_peft'] = None\n"  # any import of hybrid_peft now raises ImportError
        "import torch, transformers\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        "transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
        f"torch.save(model(input_ids=torch.tensor({IDS.tolist()})).logits.detach(), sys.argv[2])\n"
    )
    out = tmp_path / "logits.pt"
    completed = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "merged"), str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), expected, atol=1e-5, rtol=0)


def hub_snapshot(cache: Path, repo_id: str, source: Path, subfolder: str | None = None) -> Path:
    """Lay ``source`` out in a Hugging Face Hub cache as ``snapshot_download`` leaves a downloaded repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot / subfolder if subfolder else snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_load_adapter_resolves_a_hub_repository_from_the_cache_offline(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = attach(AutoModelForCausalLM.from_pretrained(tiny_lm), METHODS["hybrid"])
    perturb_adapters(model)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    hub_snapshot(tmp_path / "hub", "org/tiny-hybrid", tmp_path / "adapter")
    hub_snapshot(tmp_path / "hub", "org/adapters", tmp_path / "adapter", subfolder="sst2")

    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), "org/tiny-hybrid", cache_dir=tmp_path / "hub")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=0)
    fresh = load_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_lm), "org/adapters", subfolder="sst2", cache_dir=tmp_path / "hub"
    )
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=0)
    with pytest.raises(AdapterFileError, match="neither a folder nor a Hugging Face Hub repository"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), "org/missing", cache_dir=tmp_path / "hub")
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), str(tmp_path / "no" / "such" / "adapter"))
