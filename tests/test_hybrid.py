"""The hybrid: exact start, mixing rules, λ outside the optimiser, no collapse on a real task, telemetry, Trainer,
data parallelism, per-pattern method assignment, bad input."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch

from hybrid_peft import (
    BOFTConfig,
    HybridConfig,
    LoRAConfig,
    LoRAGAConfig,
    UnitaryConfig,
    attach,
    load_adapter,
    lora_ga_initialise,
    save_adapter,
    update_mixing,
)
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.errors import ConfigError
from hybrid_peft.methods.hybrid import HybridLayer, hybrid_layers
from hybrid_peft.methods.mixing import RULES, BranchNorms, ProtectRule, ShareRule, SigmoidRule, mixing_rule
from hybrid_peft.telemetry import MixingTelemetry, plot_mixing_heatmap, read_mixing_telemetry

from conftest import DATA, MODEL_FACTORIES, model_output, run_torchrun
from method_cases import random_batches


def hybrid_model(rule: str | None = "share", **settings) -> torch.nn.Module:  # noqa: ANN003
    """A hybrid with the paper's LoRA-GA start and a rule (``settings``: the rule's) with λ, 1 − λ gates (the
    default, a plain LoRA start and both branches at full strength, is tested in the conformance rows and below)."""
    config = HybridConfig(low_rank=LoRAGAConfig(rank=2), rule=mixing_rule(rule and {"name": rule, **settings}))
    model = attach(MODEL_FACTORIES["llama"](), config)
    lora_ga_initialise(model, random_batches())
    return model


def train_steps(model: torch.nn.Module, steps: int, telemetry: MixingTelemetry | None = None, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step, batch in enumerate(random_batches(steps, seed=11)):
        model(**batch).loss.backward()
        records = update_mixing(model)
        if telemetry is not None:
            telemetry.log(step, records)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("rule", [None, *sorted(RULES)])
def test_effective_weight_is_the_base_weight_at_step_zero(rule: str | None) -> None:
    original = MODEL_FACTORIES["llama"]()
    model = hybrid_model(rule)
    for name, layer in hybrid_layers(model).items():
        assert layer.lora_B0.abs().sum() > 0, "LoRA-GA must have initialised the low-rank branch"
        torch.testing.assert_close(layer.merged_weight(), original.get_submodule(name).weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_lambda_moves_without_moving_the_output_or_the_base(rule: str, input_ids: torch.Tensor) -> None:
    original = MODEL_FACTORIES["llama"]().eval()
    model = hybrid_model(rule).eval()
    expected = model_output(original, input_ids)
    torch.testing.assert_close(model_output(model, input_ids), expected, atol=1e-5, rtol=0)
    for layer in hybrid_layers(model).values():
        layer.mix.fill_(0.9)  # λ moves before any training
    # B A − B0 A0 = 0 at the start, whatever λ is, and the base weight is never offset
    torch.testing.assert_close(model_output(model, input_ids), expected, atol=1e-5, rtol=0)
    for name, layer in hybrid_layers(model).items():
        assert torch.equal(layer.base_weight, original.get_submodule(name).weight)


def test_the_gated_update_is_the_same_as_an_explicit_reference() -> None:
    model = hybrid_model("share")
    train_steps(model, 3)
    for name, layer in hybrid_layers(model).items():
        rotation = layer.rotation_matrix()
        update = layer.lora_B @ layer.lora_A - layer.lora_B0 @ layer.lora_A0
        reference = (
            layer.boft_scale[:, None] * (layer.base_weight @ rotation.T) + layer.mix * layer.lora_scaling * update
        )
        torch.testing.assert_close(layer.merged_weight(), reference, atol=1e-6, rtol=0, msg=name)
        assert (update.abs().max() > 0) and (float(layer.mix) != 0.5), "training should have moved B A and λ"


def test_the_default_hybrid_is_protect_with_max_gates_both_branches_at_full_strength_at_the_start() -> None:
    from hybrid_peft.run.loop import make_optimiser

    config = HybridConfig(low_rank=LoRAConfig(rank=2))
    assert config.rule == ProtectRule(gates="max") and type(config.low_rank) is LoRAConfig
    assert config.orthogonal.lr_scale == 0.3
    assert HybridConfig.from_dict({"rule.temperature": 2.0}).rule == ProtectRule(gates="max", temperature=2.0)
    assert HybridConfig.from_dict({"rule": "share"}).rule == ShareRule()  # a named rule starts from its own defaults
    model = attach(MODEL_FACTORIES["llama"](), config)
    layers = hybrid_layers(model)
    assert all(tuple(float(g) for g in layer.gates()) == (1.0, 1.0) for layer in layers.values())  # λ = 0.5
    fixed = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2), rule=None))
    assert not any("mix" in layer.adapter_state() for layer in hybrid_layers(fixed).values())  # no λ at all
    optimizer, schedule = make_optimiser(model, learning_rate=1e-2, weight_decay=0.0, steps=10, warmup_steps=0)
    before = hybrid_snapshot(model)
    for batch in random_batches(1, seed=3):
        model(**batch).loss.backward()
        update_mixing(model)
        optimizer.step()
    sizes = first_step_sizes(before, model)  # AdamW's first step moves each entry by its group's rate
    assert sizes["lora_B"] == pytest.approx(1e-2, rel=1e-3)
    assert sizes["boft_skew"] == pytest.approx(0.3e-2, rel=1e-3)


def first_step_sizes(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """The largest move of each kind of hybrid parameter since ``before`` (AdamW's first step moves every entry
    with a non-zero gradient by the learning rate, whatever the gradient's size)."""
    sizes: dict[str, float] = {}
    for name, p in model.named_parameters():
        if name in before:
            kind = name.rsplit(".", 1)[-1]
            sizes[kind] = max(sizes.get(kind, 0.0), float((p.detach() - before[name]).abs().max()))
    return sizes


def hybrid_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    kinds = ("lora_A", "lora_B", "boft_skew", "boft_scale")
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in kinds}


def test_mix_is_a_buffer_the_optimiser_never_sees() -> None:
    model = hybrid_model("share", mix_init=0.3)
    layer = next(iter(hybrid_layers(model).values()))
    assert all(p is not layer.mix for p in model.parameters())
    assert "mix" in dict(layer.named_buffers()) and "mix" in layer.adapter_state()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    seen = []  # λ before and after the optimiser's own update (its hooks run after the rule's global pre-step hook)
    optimizer.register_step_pre_hook(lambda *_: seen.append(float(layer.mix)))
    optimizer.register_step_post_hook(lambda *_: seen.append(float(layer.mix)))
    for batch in random_batches(3):
        model(**batch).loss.backward()
        optimizer.step()  # the rule sets λ before the step; the step itself must not move it
        optimizer.zero_grad()
    assert seen[0::2] == seen[1::2] and seen[0] != 0.3
    assert all(id(p) != id(layer.mix) for group in optimizer.param_groups for p in group["params"])


def test_share_rule_follows_the_gate_normalised_gradients() -> None:
    rule = ShareRule(ema=0.0, mix_min=0.01)
    # Same raw gradients, but the low-rank gate is small: dividing it out favours the low-rank branch.
    assert rule.update([0.2], [BranchNorms(1.0, 1.0)])[0] == pytest.approx(0.8)
    assert rule.update([0.5], [BranchNorms(3.0, 1.0)])[0] == pytest.approx(0.75)
    smoothed = ShareRule(ema=0.9)
    assert smoothed.update([0.5], [BranchNorms(3.0, 1.0)])[0] == pytest.approx(0.9 * 0.5 + 0.1 * 0.75)


def test_sigmoid_rule_sends_loud_layers_to_the_low_rank_branch() -> None:
    rule = SigmoidRule(temperature=0.5, ema=0.0)
    norms = [BranchNorms(4.0, 0.0), BranchNorms(1.0, 0.0)]
    loud, calm = rule.update([0.5, 0.5], norms)
    # log-norms 2·log 2 and 0, mean log 2: λ = σ(±log 2 / 0.5) = σ(±log 4) = 4/5 and 1/5.
    assert loud == pytest.approx(0.8) and calm == pytest.approx(0.2)
    smoothed = SigmoidRule(temperature=0.5, ema=0.9)
    loud, calm = smoothed.update([0.5, 0.5], norms)  # one step of the moving average
    assert loud == pytest.approx(0.9 * 0.5 + 0.1 * 0.8) and calm == pytest.approx(0.9 * 0.5 + 0.1 * 0.2)


def test_update_mixing_clamps_and_records() -> None:
    model = hybrid_model("sigmoid", temperature=1e-3, mix_min=0.1, ema=0.0)
    model(**random_batches(1)[0]).loss.backward()
    records = update_mixing(model)
    assert set(records) == set(hybrid_layers(model))
    values = [r["lambda"] for r in records.values()]
    assert min(values) >= 0.1 and max(values) <= 0.9
    assert {round(v, 6) for v in values} <= {0.1, 0.9, 0.5}, "τ→0 saturates the sigmoid, the clamp catches it"


def test_update_mixing_norms_match_each_gradient_by_hand() -> None:
    """The batched norms (one foreach pass over every layer) against each branch's RMS gradient norm by hand, with
    one layer's skew gradient missing (its branch must read 0, the layers after it unshifted), and the share rule's
    λ from them."""
    model = hybrid_model("share", ema=0.5)
    model(**random_batches(1)[0]).loss.backward()
    layers = hybrid_layers(model)
    missing = list(layers)[1]
    layers[missing].boft_skew.grad = None

    def rms(params: list[torch.nn.Parameter]) -> float:
        squares = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        return math.sqrt(squares / sum(p.numel() for p in params))

    before = {name: float(layer.mix) for name, layer in layers.items()}
    records = update_mixing(model)
    for name, layer in layers.items():
        low_rank, orthogonal = rms([layer.lora_A, layer.lora_B]), rms([layer.boft_skew])
        assert records[name]["grad_low_rank"] == pytest.approx(low_rank, rel=1e-9)
        assert records[name]["grad_orthogonal"] == pytest.approx(orthogonal, rel=1e-9)
        shares = low_rank / before[name], orthogonal / (1 - before[name])
        target = shares[0] / sum(shares)
        assert records[name]["lambda"] == pytest.approx(min(max(0.5 * before[name] + 0.5 * target, 0.05), 0.95))
        assert float(layer.mix) == pytest.approx(records[name]["lambda"])
    assert records[missing]["grad_orthogonal"] == 0.0
    assert all(records[n]["grad_orthogonal"] > 0 for n in layers if n != missing)


def test_update_mixing_before_backward_is_an_error() -> None:
    from hybrid_peft import HybridPeftError

    with pytest.raises(HybridPeftError, match="after loss.backward"):
        update_mixing(hybrid_model())


def test_save_load_keeps_lambda_and_outputs(input_ids: torch.Tensor, tmp_path) -> None:  # noqa: ANN001
    model = hybrid_model()
    train_steps(model, 4)
    model.eval()
    expected = model_output(model, input_ids)
    mixes = {n: float(m.mix) for n, m in hybrid_layers(model).items()}
    assert any(abs(v - 0.5) > 1e-4 for v in mixes.values()), "λ should have moved"
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(MODEL_FACTORIES["llama"]().eval(), tmp_path / "adapter")
    assert {n: float(m.mix) for n, m in hybrid_layers(fresh).items()} == mixes
    torch.testing.assert_close(model_output(fresh, input_ids), expected, atol=1e-5, rtol=0)


def test_per_pattern_assignment_unitary_attention_hybrid_mlp(input_ids: torch.Tensor, tmp_path) -> None:  # noqa: ANN001
    model = MODEL_FACTORIES["llama"]().eval()
    attach(model, UnitaryConfig())  # attention projections
    attach(model, HybridConfig(targets=["gate_proj", "up_proj", "down_proj"], low_rank=LoRAGAConfig(rank=2)))
    lora_ga_initialise(model, random_batches())
    kinds = {name.rsplit(".", 1)[-1]: type(layer).__name__ for name, layer in adapter_layers(model).items()}
    assert kinds == {
        "q_proj": "UnitaryLayer",
        "k_proj": "UnitaryLayer",
        "v_proj": "UnitaryLayer",
        "o_proj": "UnitaryLayer",
        "gate_proj": "HybridLayer",
        "up_proj": "HybridLayer",
        "down_proj": "HybridLayer",
    }
    train_steps(model, 2)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(MODEL_FACTORIES["llama"]().eval(), tmp_path / "adapter")
    torch.testing.assert_close(model_output(fresh, input_ids), model_output(model, input_ids), atol=1e-5, rtol=0)


def test_telemetry_jsonl_and_heatmap(tmp_path) -> None:  # noqa: ANN001
    model = hybrid_model()
    telemetry = MixingTelemetry(tmp_path / "mixing.jsonl")
    train_steps(model, 5, telemetry)
    rows = read_mixing_telemetry(tmp_path / "mixing.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert set(rows[-1]["layers"]) == set(hybrid_layers(model))
    assert {"lambda", "grad_low_rank", "grad_orthogonal"} == set(next(iter(rows[0]["layers"].values())))
    png = plot_mixing_heatmap(tmp_path / "mixing.jsonl", tmp_path / "mixing.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_telemetry_keeps_six_significant_digits(tmp_path) -> None:  # noqa: ANN001
    telemetry = MixingTelemetry(tmp_path / "mixing.jsonl")
    record = {
        "lambda": 0.5093457698822021,
        "grad_low_rank": 1.2345678912e-05,
        "grad_orthogonal": 0.0,
        "pressure": math.nan,
    }
    telemetry.log(0, {"model.layers.0.mlp.up_proj": record})
    (row,) = read_mixing_telemetry(tmp_path / "mixing.jsonl")
    logged = row["layers"]["model.layers.0.mlp.up_proj"]
    assert logged["lambda"] == 0.509346 and logged["grad_low_rank"] == 1.23457e-05 and logged["grad_orthogonal"] == 0.0
    assert math.isnan(logged["pressure"])


def test_hugging_face_trainer_callback(tmp_path) -> None:  # noqa: ANN001
    from transformers import Trainer, TrainingArguments

    from hybrid_peft import mixing_callback

    model = hybrid_model()
    steps = 3
    data = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in random_batches(8, seed=3)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=arguments, train_dataset=data, callbacks=[mixing_callback(tmp_path / "mixing.jsonl")]
    )
    trainer.train()
    rows = read_mixing_telemetry(tmp_path / "mixing.jsonl")
    assert len(rows) == steps
    assert any(abs(float(m.mix) - 0.5) > 1e-6 for m in hybrid_layers(model).values())


def test_the_trainer_callback_warns_when_the_optimiser_ignores_the_rotations_rate_and_parameter_groups_apply_it(
    tmp_path,  # noqa: ANN001
) -> None:
    from transformers import Trainer, TrainingArguments

    from hybrid_peft import mixing_callback, parameter_groups
    from hybrid_peft.adapters import rate_scales_not_applied

    data = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in random_batches(2, seed=3)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    plain = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2)))  # the rotation at 0.3×
    with pytest.warns(UserWarning, match=r"0\.3× \(applied 1×\).*parameter_groups\(model"):
        Trainer(model=plain, args=arguments, train_dataset=data, callbacks=[mixing_callback()]).train()

    model = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2)))
    warming = torch.optim.AdamW(parameter_groups(model, 1e-2))
    torch.optim.lr_scheduler.LambdaLR(warming, lambda step: step / 10)  # warm-up: every rate 0 at the start
    assert rate_scales_not_applied(warming, model) == {}
    plain_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert rate_scales_not_applied(plain_optimizer, model) == {0.3: pytest.approx(1.0)}
    groups = parameter_groups(model, 1e-2)
    assert [(g["lr"], g["lr_scale"]) for g in groups] == [(1e-2, 1.0), (pytest.approx(3e-3), 0.3)]
    rotations = {id(p) for layer in hybrid_layers(model).values() for p in (layer.boft_skew, layer.boft_scale)}
    assert {id(p) for p in groups[1]["params"]} == rotations  # the skew parameters and BOFT's output scale
    before = hybrid_snapshot(model)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=data, callbacks=[mixing_callback()], optimizers=(optimizer, None)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the multiple is applied: no warning
        trainer.train()
    sizes = first_step_sizes(before, model)  # AdamW's first step: each entry moves by its group's rate
    assert sizes["lora_B"] == pytest.approx(1e-2, rel=1e-3) and sizes["boft_skew"] == pytest.approx(3e-3, rel=1e-3)


@pytest.mark.slow
@pytest.mark.real_model
def test_share_rule_does_not_collapse_on_sst2() -> None:
    """MiniLM-L6 on SST-2, hybrid on every linear layer, share rule, 100 steps: λ stays strictly inside
    (λmin, 1 − λmin) in every layer and both branches' parameters have moved."""
    from hybrid_peft import load_model, load_tokenizer

    torch.manual_seed(0)
    lines = (DATA / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.split("\t") for line in lines[:800]]
    tokenizer = load_tokenizer("minilm-l6")
    model = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    config = HybridConfig(low_rank=LoRAGAConfig(rank=4), rule=ShareRule(mix_min=0.05))
    attach(model, config)
    for p in model.classifier.parameters():  # the new head trains fully
        p.requires_grad_(True)

    def batch(i: int) -> dict[str, torch.Tensor]:
        chunk = rows[(8 * i) % len(rows) : (8 * i) % len(rows) + 8]
        encoded = tokenizer([r[0] for r in chunk], padding=True, truncation=True, max_length=48, return_tensors="pt")
        encoded["labels"] = torch.tensor([int(r[1]) for r in chunk])
        return dict(encoded)

    lora_ga_initialise(model, [batch(i) for i in range(4)])
    start = {
        n: (layer.lora_A.detach().clone(), layer.boft_skew.detach().clone())
        for n, layer in hybrid_layers(model).items()
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for step in range(100):
        loss = model(**batch(step)).loss
        loss.backward()
        update_mixing(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, "the task should be learning"
    for name, layer in hybrid_layers(model).items():
        mix = float(layer.mix)
        assert config.rule.mix_min < mix < 1 - config.rule.mix_min, f"{name}: λ collapsed to {mix}"
        assert not torch.equal(layer.lora_A, start[name][0]), f"{name}: low-rank branch did not move"
        assert layer.boft_skew.abs().max() > 0, f"{name}: orthogonal branch did not move"


@pytest.mark.slow
def test_lambda_identical_across_two_data_parallel_processes(tmp_path) -> None:  # noqa: ANN001
    run_torchrun([str(Path(__file__).parent / "scripts" / "hybrid_ddp.py"), str(tmp_path)])
    rank0, rank1 = torch.load(tmp_path / "mix-rank0.pt"), torch.load(tmp_path / "mix-rank1.pt")
    assert rank0.shape == rank1.shape and rank0.shape[0] == 5
    assert torch.equal(rank0, rank1)
    assert (rank0[-1] - 0.5).abs().max() > 1e-4, "λ should have moved"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rule": {"name": "share", "mix_min": 0.0}}, "rule.mix_min:"),
        ({"rule": {"name": "share", "mix_min": 0.5}}, "rule.mix_min:"),
        ({"rule": {"name": "sigmoid", "mix_min": -0.1}}, "rule.mix_min:"),
        ({"rule": "vote"}, "rule: 'vote' is not one of"),
        ({"rule": {"name": "sigmoid", "temperature": 0.0}}, "rule.temperature:"),
        ({"rule": {"name": "share", "temperature": 1.0}}, r"rule 'share': unknown setting\(s\) \['temperature'\]"),
        ({"rule": {"name": "share", "mix_init": 0.99}}, "rule.mix_init:"),
        ({"rule": {"name": "share", "ema": 1.0}}, "rule.ema:"),
        ({"rule": {"name": "share", "gates": "min"}}, "rule.gates:"),
        ({"rule": "none", "rule.ema": 0.5}, "rule: settings"),
        ({"low_rank": "boft"}, "low_rank: a 'boft' config cannot be the low_rank part"),
        ({"low_rank": {"rank": 0}}, "low_rank: rank: must be >= 1"),
        ({"orthogonal": {"block_size": 0}}, "orthogonal: block_size/block_num"),
        ({"orthogonal": {"apply_to": "weight"}}, "orthogonal.apply_to"),
        ({"dropout": 0.1}, "dropout: both parts have it; write low_rank.dropout or orthogonal.dropout"),
        ({"gate": "step"}, r"unknown hybrid config field\(s\) \['gate'\]"),
        ({"spare.rank": 2}, "spare.rank: the hybrid has no part 'spare'"),
        ({"low_rank": {"rank": 2, "targets": ["q_proj"]}}, "low_rank: targets and exclude belong to the HybridConfig"),
    ],
)
def test_bad_hybrid_config(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{message}"):
        HybridConfig.from_dict(settings)


def test_the_config_reads_nested_dotted_and_bare_keys_and_round_trips() -> None:
    from hybrid_peft.config import AdapterConfig

    expected = HybridConfig(
        low_rank=LoRAGAConfig(rank=16, estimator="sketch"),
        orthogonal=BOFTConfig(block_size=8, lr_scale=0.3),
        rule=ShareRule(ema=0.8),
    )
    given = [
        {"low_rank": {"method": "lora-ga", "rank": 16, "estimator": "sketch"}, "orthogonal": {"block_size": 8},
         "rule": {"name": "share", "ema": 0.8}},
        {"low_rank": "lora-ga", "low_rank.rank": 16, "estimator": "sketch", "block_size": 8, "rule": "share",
         "rule.ema": 0.8},
        {"rule.ema": 0.8, "rule": "share", "rank": 16, "low_rank.method": "lora-ga", "low_rank.estimator": "sketch",
         "orthogonal.block_size": 8},
    ]  # fmt: skip
    for data in given:
        assert HybridConfig.from_dict(data) == expected
        assert AdapterConfig.from_dict({"method": "hybrid", **data}) == expected
    assert AdapterConfig.from_json(expected.to_json()) == expected
    assert HybridConfig(orthogonal=BOFTConfig(block_size=8)).orthogonal.lr_scale == 1.0  # a part keeps its own
    assert HybridConfig.from_dict({"orthogonal": {"block_size": 8}}).orthogonal.lr_scale == 0.3  # onto the default
    assert len(dataclasses.fields(HybridConfig)) <= 6


def test_layer_class_registered() -> None:
    from hybrid_peft.registry import get_method

    assert get_method("hybrid").layer_class is HybridLayer


def test_project_training_loop_applies_the_rule() -> None:
    from hybrid_peft.run.loop import make_optimiser, training_steps

    model = hybrid_model()
    batches = random_batches(4, seed=2)
    optimizer, schedule = make_optimiser(model, learning_rate=1e-2, weight_decay=0.0, steps=4, warmup_steps=0)
    results = list(training_steps(model, batches.__getitem__, optimizer, schedule, start=0, stop=4))
    assert [r.step for r in results] == [0, 1, 2, 3]
    assert all(set(r.mixing) == set(hybrid_layers(model)) for r in results)
    last = results[-1].mixing
    assert [last[name]["lambda"] for name in hybrid_layers(model)] == pytest.approx(
        [float(m.mix) for m in hybrid_layers(model).values()]
    )
    assert any(abs(float(m.mix) - 0.5) > 1e-6 for m in hybrid_layers(model).values())


# --- the options the hybrid's redesign measured (CHANGELOG.md) ---------------------------------------------------


def test_a_plain_lora_start_needs_no_gradient_estimate_and_starts_exactly(input_ids: torch.Tensor) -> None:
    original = MODEL_FACTORIES["llama"]().eval()
    model = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2))).eval()
    layers = hybrid_layers(model)
    assert not any(layer.needs_gradient_init for layer in layers.values())
    assert not any("lora_A0" in dict(layer.named_buffers()) for layer in layers.values())  # nothing frozen to store
    assert all(layer.low_rank_factors()[0].shape[0] == 2 for layer in layers.values())  # rank r, not 2r
    torch.testing.assert_close(model_output(model, input_ids), model_output(original, input_ids), atol=1e-6, rtol=0)
    train_steps(model, 2)
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())


def test_branch_rate_multipliers_become_optimiser_groups_and_survive_a_resume_at_a_new_rate(tmp_path) -> None:  # noqa: ANN001
    from hybrid_peft.run.loop import make_optimiser

    model = attach(
        MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2), orthogonal=BOFTConfig(lr_scale=10.0))
    )
    optimizer, _ = make_optimiser(model, learning_rate=1e-3, weight_decay=0.0, steps=4, warmup_steps=0)
    groups = {group["lr_scale"]: group for group in optimizer.param_groups}
    assert set(groups) == {1.0, 10.0} and groups[10.0]["lr"] == pytest.approx(1e-2)
    skews = {id(layer.boft_skew) for layer in hybrid_layers(model).values()}
    assert skews <= {id(p) for p in groups[10.0]["params"]}
    assert not skews & {id(p) for p in groups[1.0]["params"]}


def test_hybrid_unitary_composes_unitary_attention_and_the_hybrid_elsewhere(tiny_lm: str, tmp_path: Path) -> None:
    from hybrid_peft.run import TrainConfig, run_training

    config = TrainConfig(
        model=tiny_lm,
        task="humaneval",
        method="hybrid-unitary",
        adapter={"rank": 2, "block_size": 4},
        steps=2,
        batch_size=2,
        max_length=32,
        eval_examples=2,
        init_batches=1,
        generate=False,
        threads=1,
        output_dir=str(tmp_path / "run"),
    )
    assert config.learning_rate == pytest.approx(1e-3)  # the hybrid's default, for both parts
    run_training(config, progress=False)
    from hybrid_peft import load_model
    from hybrid_peft.serialization import read_adapter_config

    document = read_adapter_config(tmp_path / "run" / "adapter")
    methods = {entry["method"] for entry in document["configs"]}
    assert methods == {"unitary", "hybrid"}
    fresh = load_adapter(load_model(tiny_lm), tmp_path / "run" / "adapter")
    kinds = {name.rsplit(".", 1)[-1]: type(layer).__name__ for name, layer in adapter_layers(fresh).items()}
    assert kinds["q_proj"] == "UnitaryLayer" and kinds["down_proj"] == "HybridLayer"
    with pytest.raises(ConfigError, match="unitary part's targets"):
        TrainConfig(method="hybrid-unitary", adapter={"targets": ["q_proj"]})


def test_hybrid_unitary_trains_both_parts_at_the_run_rate_unless_the_unitary_part_sets_a_multiple(tiny_lm: str) -> None:
    from hybrid_peft import load_model
    from hybrid_peft.run import TrainConfig
    from hybrid_peft.run.loop import make_optimiser
    from hybrid_peft.run.trainees import trainee_for

    for unitary, scale in (({}, 1.0), ({"lr_scale": 10}, 10.0)):
        config = TrainConfig(model=tiny_lm, method="hybrid-unitary", adapter={"rank": 2, "unitary": unitary})
        model = load_model(tiny_lm)
        for adapter_config in trainee_for("hybrid-unitary").adapter_configs(config):
            attach(model, adapter_config)
        optimizer, _ = make_optimiser(model, learning_rate=2e-3, weight_decay=0.0, steps=4, warmup_steps=0)
        groups = {group["lr_scale"]: group for group in optimizer.param_groups}
        assert set(groups) == {1.0, 0.3, scale}  # the hybrid's low-rank branch, its rotation, the unitary part
        unitary_params = {
            id(p)
            for layer in adapter_layers(model).values()
            if type(layer).__name__ == "UnitaryLayer"
            for p in layer.parameters()
            if p.requires_grad
        }
        assert unitary_params and unitary_params <= {id(p) for p in groups[scale]["params"]}
        assert groups[scale]["lr"] == pytest.approx(2e-3 * scale)


def test_only_a_hybrid_with_a_rule_has_a_per_step_hook() -> None:
    """With the fixed hybrid (rule=None) the loop has nothing to run after backward: no gradient norms, no host read."""
    from hybrid_peft.adapters import after_backward_hooks

    fixed = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2), rule=None))
    assert after_backward_hooks(fixed) == []
    assert all(layer.rotation_factor() is None for layer in hybrid_layers(fixed).values())
    shared = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2), rule=ShareRule()))
    assert len(after_backward_hooks(shared)) == 1
