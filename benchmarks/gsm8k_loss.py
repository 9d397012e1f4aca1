"""Does LoRA-GA close the gap to full fine-tuning? Training loss on GSM8K after N steps, same seed, same batches.

    python benchmarks/gsm8k_loss.py                     # SmolLM2-135M, 50 steps of 4x128, LoRA / LoRA-GA / full
    python benchmarks/gsm8k_loss.py --steps 100 --methods lora,lora-ga

Learning-rate rule (the same for every method): AdamW, 10% linear warm-up then cosine decay, peak learning rate
``--lr`` for adapters and ``--lr / 10`` for full fine-tuning. LoRA-GA (and the hybrid, whose low-rank branch is LoRA-GA)
estimate their gradients on 8 batches that are then also the first training batches; the hybrid applies its
``share`` rule after every backward pass. Each method runs in its own process. Reports the mean training loss of the
last 10 steps and the held-out loss on GSM8K test questions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from itertools import islice

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("lora", "lora-ga", "hybrid", "full")


def tokenize_lm(tokenizer, texts: list[str], max_length: int) -> dict:  # noqa: ANN001
    """Causal-LM batch: labels are the input ids, with padding masked out of the loss."""
    batch = tokenizer(texts, max_length=max_length, truncation=True, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def shuffled_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, seed: int = 0):  # noqa: ANN001, ANN201
    """Endless batches: each epoch is a fresh seeded shuffle of ``texts``."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(len(texts)), len(texts))
        indices, order = order[:batch_size], order[batch_size:]
        yield tokenize_lm(tokenizer, [texts[i] for i in indices], max_length)


def fixed_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:  # noqa: ANN001
    return [tokenize_lm(tokenizer, texts[i : i + batch_size], max_length) for i in range(0, len(texts), batch_size)]


def worker(args: argparse.Namespace) -> None:
    import torch

    from hybrid_peft import (
        HybridConfig,
        LoRAConfig,
        LoRAGAConfig,
        attach,
        load_model,
        load_tokenizer,
        lora_ga_initialise,
    )
    from hybrid_peft.run.loop import make_optimiser, training_steps
    from hybrid_peft.run.provenance import peak_rss_mb
    from hybrid_peft.tasks.base import mean_loss
    from hybrid_peft.tasks.gsm8k import gsm8k_text, load_gsm8k

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    train_texts = [gsm8k_text(r) for r in load_gsm8k("train", args.data)]
    test_texts = [gsm8k_text(r) for r in load_gsm8k("test", args.data)[: args.eval_examples]]
    eval_batches = fixed_batches(tokenizer, test_texts, 8, args.seq_len)
    model = load_model(args.model)
    tick = time.perf_counter()
    init_s = 0.0
    if args.worker == "full":
        lr = args.lr / 10
    else:
        lr = args.lr
        configs = {
            "lora": lambda: LoRAConfig(rank=args.rank, alpha=2 * args.rank),
            "lora-ga": lambda: LoRAGAConfig(rank=args.rank, alpha=2 * args.rank),
            "hybrid": lambda: HybridConfig(low_rank=LoRAConfig(rank=args.rank, alpha=2 * args.rank)),
        }
        attach(model, configs[args.worker]())
        if args.worker in ("lora-ga", "hybrid"):
            init_batches = list(
                islice(shuffled_batches(tokenizer, train_texts, args.batch_size, args.seq_len, args.seed), 8)
            )
            lora_ga_initialise(model, init_batches)
            init_s = time.perf_counter() - tick
    before = mean_loss(model, eval_batches)
    batches = list(
        islice(shuffled_batches(tokenizer, train_texts, args.batch_size, args.seq_len, args.seed), args.steps)
    )
    optimizer, schedule = make_optimiser(
        model, learning_rate=lr, weight_decay=0.0, steps=args.steps, warmup_steps=max(1, args.steps // 10)
    )
    results = list(training_steps(model, batches.__getitem__, optimizer, schedule, start=0, stop=args.steps))
    losses = [r.loss for r in results]
    result = {
        "method": args.worker,
        "lr": lr,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_loss": losses[0],
        "last10_loss": sum(losses[-10:]) / len(losses[-10:]),
        "held_out_before": before,
        "held_out_after": mean_loss(model, eval_batches),
        "median_step_s": statistics.median(r.seconds for r in results),
        "init_s": init_s,
        "peak_rss_mb": peak_rss_mb(),
        "losses": losses,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="folder holding gsm8k/ (default: shared/data nearby)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak adapter learning rate (full FT uses lr/10)")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write all results (with per-step losses) here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    keys = ["model", "steps", "batch_size", "seq_len", "rank", "lr", "eval_examples", "seed", "threads"]
    keys += ["data"] if args.data else []
    results = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--worker", method] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys
        ]
        print(f"running {method} ...", file=sys.stderr, flush=True)
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode or not lines:
            print(f"{method} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][7:]))
    print(
        f"\n{args.model}, GSM8K train, {args.steps} steps of {args.batch_size}x{args.seq_len}, seed {args.seed}, "
        f"AdamW warm-up+cosine, held-out = first {args.eval_examples} GSM8K test examples\n"
    )
    print(
        "| method | peak lr | trainable | first-step loss | mean loss, last 10 steps | held-out before → after "
        "| median step s | init s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['first_loss']:.3f} | {r['last10_loss']:.3f} "
            f"| {r['held_out_before']:.3f} → {r['held_out_after']:.3f} | {r['median_step_s']:.2f} | {r['init_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
