"""LoRA-GA: parity with PEFT's preprocess_loraga, the sketch's exactness and quality, data parallelism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybrid_peft import HybridPeftError, LoRAGAConfig, attach, detach, export_peft, lora_ga_initialise
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.gradient_estimation import ExactGradient, SketchGradient, estimate_gradients, load_estimates
from hybrid_peft.methods.lora_ga import lora_ga_factors

from conftest import DATA, MODEL_FACTORIES, model_output, run_torchrun
from method_cases import random_batches

peft = pytest.importorskip("peft")


def assert_equal_up_to_sign(ours: torch.Tensor, reference: torch.Tensor, dim: int, atol: float) -> None:
    """Each slice along ``dim`` (a singular vector) equals the reference or its negative."""
    for a, b in zip(ours.unbind(dim), reference.unbind(dim), strict=True):
        assert min((a - b).abs().max(), (a + b).abs().max()) <= atol


def test_factors_match_peft_preprocess_loraga(input_ids: torch.Tensor) -> None:
    """PEFT variant + exact estimator on the same batches: A0, B0 equal PEFT's to 1e-4 up to sign. Rank 8 on
    a model whose layers are at most 32 wide makes PEFT's svd_lowrank(q = 4r) exact, so both SVDs agree."""
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    batches = random_batches(3)

    reference_model = MODEL_FACTORIES["llama"]()
    lora_config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=targets,
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16),
    )

    def train_step() -> None:
        for batch in batches:
            reference_model(**batch).loss.backward()

    peft.preprocess_loraga(reference_model, lora_config, train_step)
    reference = peft.get_peft_model(reference_model, lora_config).eval()
    reference_modules = dict(reference.base_model.model.named_modules())

    ours = attach(MODEL_FACTORIES["llama"](), LoRAGAConfig(rank=8, alpha=16, scale="peft", targets=targets)).eval()
    lora_ga_initialise(ours, batches)
    layers = adapter_layers(ours)
    assert len(layers) == 8
    for name, layer in layers.items():
        peft_layer = reference_modules[name]
        assert_equal_up_to_sign(layer.lora_A0, peft_layer.lora_A["default"].weight, dim=0, atol=1e-4)
        assert_equal_up_to_sign(layer.lora_B0, peft_layer.lora_B["default"].weight, dim=1, atol=1e-4)
    # Both start exactly at the base model.
    base = model_output(MODEL_FACTORIES["llama"](), input_ids)
    torch.testing.assert_close(model_output(ours, input_ids), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(model_output(reference, input_ids), base, atol=1e-5, rtol=0)


def test_exact_estimate_equals_autograd_mean_gradient() -> None:
    batches = random_batches(3)
    model = MODEL_FACTORIES["llama"]()
    estimates = estimate_gradients(model, batches, targets=["model.layers.0.mlp.up_proj"])
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
    torch.testing.assert_close(estimates["model.layers.0.mlp.up_proj"].dense(), weight.grad / 3, atol=1e-6, rtol=1e-5)


def test_sketch_accumulators_are_exact_projections_of_the_gradient() -> None:
    """Streaming Y = Σ δᵀ(xΩ), Z = Σ (Ψδᵀ)x equal G Ω and Ψ G of the exact summed gradient."""
    batches = random_batches(3)
    targets = ["model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    exact = estimate_gradients(MODEL_FACTORIES["llama"](), batches, targets=targets)
    sketch = estimate_gradients(
        MODEL_FACTORIES["llama"](), batches, targets=targets, estimator="sketch", rank=1, oversampling=4
    )
    for name in targets:
        g = exact[name].total
        s = sketch[name]
        assert isinstance(s, SketchGradient)
        torch.testing.assert_close(s.y, g @ s.omega, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.z, s.psi @ g, atol=1e-5, rtol=1e-4)


def test_sketch_recovers_a_low_rank_gradient_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(40, 6, generator=generator) @ torch.randn(6, 30, generator=generator)
    omega = torch.randn(30, 16, generator=generator)
    psi = torch.randn(33, 40, generator=generator)
    sketch = SketchGradient(omega=omega, psi=psi, y=g @ omega, z=psi @ g, count=1)
    torch.testing.assert_close(sketch.dense(), g, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.real_model
def test_sketch_quality_on_real_smollm2_gradients() -> None:
    """Default sketch (k = 16·2r, r = 8) on real gradients (GSM8K text, 8 batches of 4×128), every target layer:
    ‖G − Ĝ‖_F ≤ 1.10 · ‖G − G_2r‖_F, and the sketch's top-r right singular subspace agrees with the exact one
    (smallest principal cosine ≥ 0.9). Where σ_r ≈ σ_{r+1} (gap under 5%) the exact top-r subspace is itself
    ill-defined, so there the sketch's top-r subspace must lie inside the exact top-2r one instead.
    Linearity makes Y = GΩ, Z = ΨG from the exact G identical to streaming them (tested above), so one pass suffices."""
    from hybrid_peft import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    lines = (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:32]
    texts = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in lines]
    batches = []
    for i in range(0, 32, 4):
        batch = tokenizer(texts[i : i + 4], max_length=128, truncation=True, padding="max_length", return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(dict(batch))
    model = load_model("smollm2-135m")
    config = LoRAGAConfig(rank=8, targets="all-linear", estimator="sketch")
    attach(model, config)
    exact = estimate_gradients(model, batches)
    r = config.rank
    k = config.oversampling * 2 * r
    generator = torch.Generator().manual_seed(1)
    for name, estimate in exact.items():
        g = estimate.dense().double()
        out_features, in_features = g.shape
        omega = torch.randn(in_features, k, generator=generator, dtype=torch.float64)
        psi = torch.randn(2 * k + 1, out_features, generator=generator, dtype=torch.float64)
        sketch = SketchGradient(omega=omega, psi=psi, y=g @ omega, z=psi @ g, count=1)
        u, s, vh = (t.double() for t in sketch.top_singular(2 * r))
        _, exact_s, exact_vh = torch.linalg.svd(g, full_matrices=False)
        ratio = float(torch.linalg.norm(g - (u * s) @ vh) / torch.linalg.norm(exact_s[2 * r :]))
        assert ratio <= 1.10, f"{name}: sketch error {ratio:.3f}x the optimal rank-{2 * r} error"
        well_separated = exact_s[r - 1] / exact_s[r] >= 1.05
        reference = exact_vh[:r] if well_separated else exact_vh[: 2 * r]
        cosine = float(torch.linalg.svdvals(reference @ vh[:r].T).min())
        assert cosine >= 0.9, f"{name}: top-{r} subspace cosine {cosine:.3f} (well separated: {bool(well_separated)})"


def test_stable_scale_and_directions() -> None:
    u = torch.linalg.qr(torch.randn(16, 4))[0]
    vh = torch.linalg.qr(torch.randn(12, 4))[0].T
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    a0, b0 = lora_ga_factors(u, s, vh, 2, scale="stable", gamma=16)
    zeta = 16**0.25 / 4
    torch.testing.assert_close(a0, zeta * vh[:2])
    torch.testing.assert_close(b0, zeta * u[:, 2:4])
    a0, b0 = lora_ga_factors(u, s, vh, 2, scale="peft", gamma=16)
    torch.testing.assert_close(a0, vh[:2])
    torch.testing.assert_close(b0, zeta * u[:, 2:4] * s[2:4])
    a0, b0 = lora_ga_factors(u, s, vh, 2, direction="A2rBr", scale="unit")
    torch.testing.assert_close(a0, vh[2:4])
    with pytest.raises(HybridPeftError, match="needs 2r = 6"):
        lora_ga_factors(u, s, vh, 3)


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_peft_loads_exported_lora_ga_on_unmodified_base(estimator: str, input_ids: torch.Tensor, tmp_path) -> None:  # noqa: ANN001
    model = attach(MODEL_FACTORIES["llama"](), LoRAGAConfig(rank=2, estimator=estimator)).eval()
    lora_ga_initialise(model, random_batches())
    with torch.no_grad():  # train a little (by hand) so that A, B differ from A0, B0
        for layer in adapter_layers(model).values():
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path / "peft").eval()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(model, input_ids), atol=1e-5, rtol=0)


def test_detach_restores_the_offset_base() -> None:
    reference = MODEL_FACTORIES["llama"]().state_dict()
    model = attach(MODEL_FACTORIES["llama"](), LoRAGAConfig(rank=2))
    lora_ga_initialise(model, random_batches())
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.base_layer.weight, reference["model.layers.0.self_attn.q_proj.weight"]
    ), "the base weight should carry the offset"
    detach(model)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_gradient_cache_round_trip(estimator: str, tmp_path) -> None:  # noqa: ANN001
    model = attach(MODEL_FACTORIES["llama"](), LoRAGAConfig(rank=2, estimator=estimator))
    first = lora_ga_initialise(model, random_batches(), cache_file=tmp_path / "grads.safetensors")
    assert (tmp_path / "grads.safetensors").is_file()
    again = attach(MODEL_FACTORIES["llama"](), LoRAGAConfig(rank=2, estimator=estimator))
    second = lora_ga_initialise(again, [], cache_file=tmp_path / "grads.safetensors")  # no data needed now
    for name, (a0, b0) in first.items():
        torch.testing.assert_close(second[name][0], a0)
        torch.testing.assert_close(second[name][1], b0)
    loaded = load_estimates(tmp_path / "grads.safetensors")
    assert all(isinstance(e, ExactGradient if estimator == "exact" else SketchGradient) for e in loaded.values())


def test_estimator_state_is_small_for_the_sketch() -> None:
    model = MODEL_FACTORIES["llama"]()
    names = ["model.layers.0.mlp.gate_proj"]
    exact = estimate_gradients(model, random_batches(1), targets=names)
    sketch = estimate_gradients(model, random_batches(1), targets=names, estimator="sketch", rank=1, oversampling=2)
    assert sketch[names[0]].state_bytes() < exact[names[0]].state_bytes()


def test_bad_input() -> None:
    model = attach(MODEL_FACTORIES["llama"](), LoRAGAConfig(rank=2))
    with pytest.raises(HybridPeftError, match="no batches"):
        lora_ga_initialise(model, [])
    with pytest.raises(HybridPeftError, match="does not require grad"):
        lora_ga_initialise(model, random_batches(1), loss_fn=lambda m, b: m(**b).loss.detach())
    with pytest.raises(HybridPeftError, match="is nan"):
        lora_ga_initialise(model, random_batches(1), loss_fn=lambda m, b: m(**b).loss * float("nan"))

    def finite_loss_with_nan_gradient(m: torch.nn.Module, b: dict) -> torch.Tensor:
        logits = m(**b).logits
        return (logits - logits.detach()).abs().sqrt().sum() + m(**b).loss  # d sqrt|0| = 0·∞ = NaN

    with pytest.raises(HybridPeftError, match="not finite"):
        estimate_gradients(model, random_batches(1), loss_fn=finite_loss_with_nan_gradient)
    with pytest.raises(HybridPeftError, match="unknown estimator"):
        estimate_gradients(model, random_batches(1), estimator="magic")
    with pytest.raises(HybridPeftError, match="attach a LoRAGAConfig"):
        estimate_gradients(MODEL_FACTORIES["llama"](), random_batches(1))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n), "flags restored"


@pytest.mark.slow
def test_two_process_data_parallel_gives_identical_init(tmp_path) -> None:  # noqa: ANN001
    """torchrun (gloo, 2 CPU processes), each rank on different batches: A0, B0 and the offset base weights are
    identical on both ranks and equal a single process on all batches."""
    run_torchrun([str(Path(__file__).parent / "scripts" / "lora_ga_ddp.py"), str(tmp_path)])
    for estimator in ("exact", "sketch"):
        rank0 = torch.load(tmp_path / f"{estimator}-rank0.pt")
        rank1 = torch.load(tmp_path / f"{estimator}-rank1.pt")
        single = torch.load(tmp_path / f"{estimator}-single.pt")
        assert rank0.keys() == rank1.keys() == single.keys() and rank0
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{estimator}: {key} differs between ranks"
            torch.testing.assert_close(rank0[key], single[key], atol=1e-5, rtol=1e-4, msg=f"{estimator}: {key}")
