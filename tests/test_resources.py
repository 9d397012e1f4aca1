"""The savings people come for, each against its plain reference: a quantised frozen base (nf4, int8) for every
method, activation checkpointing, a bf16 base, and the chunked causal-LM loss."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

from hybrid_peft import HybridPeftError, attach, load_adapter, merge, save_adapter, save_merged
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.errors import ConfigError, ModelLoadError
from hybrid_peft.layer import dequantised_weight, quantisation_of
from hybrid_peft.losses import chunked_causal_lm_loss
from hybrid_peft.models import load_model
from hybrid_peft.run import TrainConfig, run_training

from conftest import VOCAB, tiny_llama
from method_cases import METHOD_CASES, perturb_adapters, prepare, random_batches

pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*kernels.*")

QUANTISABLE_CASES = ["lora", "lora-ga-exact", "boft-m1", "unitary", "hybrid-share"]


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama whose layers are wide enough for bitsandbytes' 64-value blocks."""
    folder = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def dequantised_copy(quantised: torch.nn.Module, path: str) -> torch.nn.Module:
    """A plain fp32 model holding the quantised model's dequantised weights: the reference for its quantised path."""
    reference = load_model(path)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantised.named_modules():
            if quantisation_of(module):
                modules[name].weight.copy_(dequantised_weight(module))
    return reference


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("case", QUANTISABLE_CASES)
def test_every_method_on_a_quantised_base(wide_llama: str, mode: str, case: str, tmp_path: Path) -> None:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    model = load_model(wide_llama, quantise=mode)
    # (bitsandbytes repacks 4-bit weights for the CPU on a first forward, and unpacks them to about 1e-4: compare
    # values, not bytes)
    packed = {n: dequantised_weight(m) for n, m in model.named_modules() if quantisation_of(m)}
    reference = dequantised_copy(model, wide_llama)
    for target in (model, reference):
        attach(target, METHOD_CASES[case])
    prepare(case, model)
    perturb_adapters(model, seed=3, scale=0.1)
    quantised_layers = adapter_layers(model)
    for name, layer in adapter_layers(reference).items():  # the same adapter (LoRA-GA: the offset re-applied)
        layer.load_adapter_state({k: v.detach().clone() for k, v in quantised_layers[name].adapter_state().items()})
    # The quantised path (the base layer's own kernel; LoRA-GA's offset kept in the adapter) computes what the
    # plain path computes on the dequantised weights.
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=3e-2, rtol=0)
    for name, module in model.named_modules():
        if name in packed:
            base = getattr(module, "base_layer", module)
            torch.testing.assert_close(
                dequantised_weight(base), packed[name], atol=1e-3, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
            )
    # It trains: gradients reach every adapter parameter of an adapted layer.
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for layer in adapter_layers(model).values() for _, p in layer.adapter_named_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # The adapter loads onto the unquantised base (its fingerprints pass) and computes the same function there.
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    plain = load_adapter(dequantised_copy(load_model(wide_llama, quantise=mode), wide_llama), tmp_path / "adapter")
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), atol=3e-2, rtol=0)
    load_adapter(load_model(wide_llama), tmp_path / "adapter")  # the original fp32 base: accepted too


def test_merging_a_quantised_base_writes_a_dequantised_model(wide_llama: str, tmp_path: Path) -> None:
    ids = torch.randint(0, VOCAB, (2, 12))
    model = attach(load_model(wide_llama, quantise="nf4"), METHOD_CASES["hybrid-share"])
    prepare("hybrid-share", model)
    perturb_adapters(model, seed=1, scale=0.1)
    model.eval()
    with pytest.raises(HybridPeftError, match="quantised.*save_merged writes a merged model with the base dequantised"):
        merge(model)
    with pytest.warns(UserWarning, match="dequantised"):
        save_merged(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(quantisation_of(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=3e-2, rtol=0)


def test_quantised_base_refusals(wide_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="full fine-tuning trains every weight.*quantised"):
        TrainConfig(method="full", quantise_base="nf4", model=wide_llama)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"needs bitsandbytes.*pip install 'hybrid-peft\[quant\]'"):
        load_model(wide_llama, quantise="nf4")


@pytest.mark.parametrize("case", ["lora", "boft-m1", "unitary", "hybrid-share", "lora-ga-exact"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(case: str) -> None:
    batches = random_batches(1, seed=4)
    results = []
    for checkpointing in (False, True):
        model = attach(tiny_llama(), METHOD_CASES[case])
        prepare(case, model)
        perturb_adapters(model, seed=2, scale=0.1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**batches[0]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    assert torch.equal(loss_plain, loss_checkpointed)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["lora", "boft-m1", "hybrid-share"])
def test_a_bf16_base_trains_fp32_adapters_close_to_fp32(case: str) -> None:
    batch = random_batches(1, seed=6)[0]
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        model = attach(tiny_llama().to(dtype), METHOD_CASES[case])
        prepare(case, model)
        perturb_adapters(model, seed=2, scale=0.1)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in trainable), "adapters train in fp32 on any base"
        optimiser = torch.optim.AdamW(trainable, lr=1e-3)
        loss = model(**batch).loss
        loss.backward()
        optimiser.step()
        assert all(s.dtype == torch.float32 for state in optimiser.state.values() for s in state.values())
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


@pytest.mark.parametrize("case", ["full", "hybrid-share"])
def test_the_fused_optimiser_steps_like_the_plain_adamw(case: str) -> None:
    """make_optimiser's AdamW (fused kernel where the parameters allow it) against PyTorch's plain per-parameter
    loop with the same groups and rates: the same parameters after three steps of training."""
    from hybrid_peft.run.loop import fused_optimiser_supported, make_optimiser, training_steps

    torch.set_num_threads(1)
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = tiny_llama()
        if case == "full":
            model.requires_grad_(True)
        else:
            prepare(case, attach(model, METHOD_CASES[case]))
        optimizer, schedule = make_optimiser(model, learning_rate=1e-2, weight_decay=0.01, steps=3, warmup_steps=1)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        assert fused_optimiser_supported(params) and optimizer.defaults["fused"]
        if not fused:
            optimizer.defaults["fused"] = None
            for group in optimizer.param_groups:
                group["fused"] = None  # the plain loop, same groups and schedule
        batches = random_batches(3, seed=5)
        list(training_steps(model, batches.__getitem__, optimizer, schedule, start=0, stop=3))
        models.append(model)
    fused_model, plain_model = models
    moved = 0
    for (name, fast), plain in zip(fused_model.named_parameters(), plain_model.parameters(), strict=True):
        if fast.requires_grad:
            torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-5, msg=name)
            moved += 1
    assert moved > 0
    assert not fused_optimiser_supported([torch.nn.Parameter(torch.zeros(2, dtype=torch.int32), requires_grad=False)])


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_the_chunked_loss_equals_the_models_own(chunk: int) -> None:
    model = attach(tiny_llama(), METHOD_CASES["lora"])
    perturb_adapters(model, seed=2, scale=0.1)
    model.train()
    ids = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(8))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt: no targets there
    labels[2, 10:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    chunked = chunked_causal_lm_loss(model, batch, chunk)
    hook.remove()
    assert sum(seen) == int((labels[:, 1:] != -100).sum()), "only positions with a target reach the vocabulary"
    assert max(seen) <= chunk
    chunked.backward()
    grads_chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    plain = model(**batch).loss
    plain.backward()
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads_chunked[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_recipe_combines_the_savings(tmp_path: Path) -> None:
    from hybrid_peft import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    common = {"model": str(tmp_path / "lm"), "task": "gsm8k", "method": "lora", "adapter": {"rank": 2}, "steps": 3,
              "batch_size": 2, "max_length": 32, "eval_examples": 2, "generate": False}  # fmt: skip
    with pytest.raises(ConfigError, match="vocabulary"):
        run_training(
            TrainConfig(**common | {"task": "sst2", "loss_chunk_tokens": 8, "output_dir": str(tmp_path / "x")})
        )
    summary = run_training(
        TrainConfig(**common, quantise_base="nf4", gradient_checkpointing=True, loss_chunk_tokens=8,
                    output_dir=str(tmp_path / "run")),
        progress=False,
    )  # fmt: skip
    assert summary.after["loss"] < summary.before["loss"] + 1.0 and summary.final_loss is not None
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    bf16 = run_training(TrainConfig(**common, dtype="bfloat16", output_dir=str(tmp_path / "bf16")), progress=False)
    assert bf16.config.dtype == "bfloat16"


def test_a_run_too_large_for_memory_stops_with_the_estimate_and_what_would_fit(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hybrid_peft.run import memory
    from hybrid_peft.run.memory import RunDoesNotFitError, check_fits

    config = TrainConfig(model="smollm2-135m", task="gsm8k", method="lora", batch_size=8, max_length=2048)
    needed = check_fits(config, available=2**40)
    assert needed is not None and needed > 2**30
    saving = TrainConfig(model="smollm2-135m", task="gsm8k", method="lora", batch_size=8, max_length=2048,
                         quantise_base="nf4", gradient_checkpointing=True, loss_chunk_tokens=1024)  # fmt: skip
    with_savings = check_fits(saving, available=2**40)
    assert with_savings < needed / 3
    advice = "add --quantise-base nf4 --gradient-checkpointing --loss-chunk-tokens 1024 \\(estimated to fit\\)"
    with pytest.raises(RunDoesNotFitError, match=r"needs about [\d.]+ GiB .* but [\d.]+ GiB are available: " + advice):
        check_fits(config, available=int(with_savings * 1.05))
    with pytest.raises(RunDoesNotFitError, match="lower --batch-size or --max-length"):
        check_fits(config, available=2**20)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**16)  # 64 KiB: even the tiny model does not fit
    run = TrainConfig(model=tiny_lm, task="humaneval", steps=1, max_length=48, generate=False, eval_examples=1,
                      output_dir=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(RunDoesNotFitError, match="HYBRID_PEFT_SKIP_FIT_CHECK"):
        run_training(run, progress=False)
    assert not (tmp_path / "run" / "train_log.jsonl").exists(), "refused before loading or training anything"
    monkeypatch.setenv("HYBRID_PEFT_SKIP_FIT_CHECK", "1")
    assert run_training(run, progress=False).final_loss is not None


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_lora_ga_start_is_the_same_with_activation_checkpointing(estimator: str) -> None:
    from hybrid_peft import LoRAGAConfig, lora_ga_initialise

    starts = []
    for checkpointing in (False, True):
        model = attach(tiny_llama(), LoRAGAConfig(rank=2, estimator=estimator))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora_ga_initialise(model, random_batches(2, seed=9))
        starts.append({n: layer.lora_A0.clone() for n, layer in adapter_layers(model).items()})
    for name, a0 in starts[0].items():
        torch.testing.assert_close(starts[1][name], a0, atol=1e-5, rtol=1e-4, msg=name)
