"""The main job on the offline defaults: a short real LoRA fine-tuning of SmolLM2-135M on HumanEval solutions.

It shows the whole library path end to end: load the default model offline, attach LoRA to every linear layer,
train, measure held-out loss before and after, save the adapter, load it onto a fresh base (same loss), and
export a merged checkpoint that plain ``transformers`` loads (same outputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid_peft.adapters import attach, parameter_counts
from hybrid_peft.export import save_merged
from hybrid_peft.methods.lora import LoRAConfig
from hybrid_peft.models import load_model, load_tokenizer
from hybrid_peft.serialization import load_adapter, save_adapter
from hybrid_peft.tasks.humaneval import humaneval_split
from hybrid_peft.training import fixed_batches, mean_loss, peak_rss_mb, shuffled_batches, train


@dataclass(frozen=True)
class DemoSettings:
    model: str = "smollm2-135m"
    steps: int = 30
    batch_size: int = 4
    max_length: int = 192
    learning_rate: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    threads: int = 2
    output_dir: str = "runs/demo"


def run_demo(settings: DemoSettings) -> dict[str, float]:
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    output = Path(settings.output_dir)
    started = time.perf_counter()

    print(f"[1/5] loading {settings.model} (offline) ...", flush=True)
    tokenizer = load_tokenizer(settings.model)
    model = load_model(settings.model)
    train_problems, held_out = humaneval_split()
    texts = [p["prompt"] + p["canonical_solution"] for p in train_problems]
    eval_texts = [p["prompt"] + p["canonical_solution"] for p in held_out]
    eval_batches = fixed_batches(tokenizer, eval_texts, 8, settings.max_length)
    loss_before = mean_loss(model, eval_batches)
    print(f"      held-out loss before fine-tuning: {loss_before:.4f} ({len(held_out)} HumanEval problems)")

    config = LoRAConfig(rank=settings.rank, alpha=settings.alpha, targets="all-linear")
    attach(model, config)
    trainable, total = parameter_counts(model)
    print(
        f"[2/5] LoRA r={config.rank} on all linear layers: {trainable:,} trainable of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )
    log = train(
        model,
        shuffled_batches(tokenizer, texts, settings.batch_size, settings.max_length, settings.seed),
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        warmup=5,
        description="[3/5] training",
    )
    loss_after = mean_loss(model, eval_batches)
    print(f"      held-out loss after fine-tuning:  {loss_after:.4f}")

    print(f"[4/5] saving the adapter to {output / 'adapter'} and reloading it onto a fresh base ...", flush=True)
    save_adapter(model, output / "adapter")
    reloaded = load_adapter(load_model(settings.model), output / "adapter")
    loss_reloaded = mean_loss(reloaded, eval_batches)
    del reloaded

    print(f"[5/5] exporting a merged checkpoint to {output / 'merged'} ...", flush=True)
    save_merged(model, output / "merged", tokenizer=tokenizer)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32)
    loss_merged = mean_loss(plain, eval_batches)

    results = {
        "held_out_loss_before": loss_before,
        "held_out_loss_after": loss_after,
        "held_out_loss_reloaded_adapter": loss_reloaded,
        "held_out_loss_merged_export": loss_merged,
        "median_step_s": log.median_step_s,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "trainable_parameters": trainable,
    }
    print("\nSummary")
    print(
        f"  model                         {settings.model}, LoRA r={settings.rank}, {settings.steps} steps of "
        f"{settings.batch_size}x<={settings.max_length} tokens"
    )
    print(
        f"  held-out loss                 {loss_before:.4f} -> {loss_after:.4f} "
        f"({100 * (loss_after - loss_before) / loss_before:+.1f}%)"
    )
    print(f"  reloaded adapter / merged     {loss_reloaded:.4f} / {loss_merged:.4f} (must equal the line above)")
    print(f"  median step                   {results['median_step_s']:.2f} s")
    print(f"  wall time                     {results['wall_s']:.1f} s")
    print(f"  peak RSS                      {results['peak_rss_mb']:.0f} MB")
    print(f"  outputs                       {output / 'adapter'}, {output / 'merged'}")
    if abs(loss_reloaded - loss_after) > 1e-4 or abs(loss_merged - loss_after) > 1e-3:
        raise RuntimeError("reloaded or merged model disagrees with the trained one; please report this bug")
    return results
