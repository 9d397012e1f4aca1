"""LoRA-GA initialisation cost: our exact and sketch estimators against PEFT's ``preprocess_loraga``.

    python benchmarks/lora_ga_init.py                     # SmolLM2-135M, all linear layers, r=8, 8 batches of 4x128
    python benchmarks/lora_ga_init.py --data ../shared/data

Each variant runs in its own process (so peak RSS is its own): wall time of the whole initialisation (gradient
estimation + SVD + offset), peak RSS, and the bytes held by the estimator's own state. A second table gives the
estimator state per layer, analytically, for the layer shapes of 7B/70B/405B-class models, and the all-reduce
volume under data parallelism (the sketch all-reduces Y and Z, not G).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("peft", "exact", "sketch")
LARGE_SHAPES = {  # (out, in) of the largest MLP projection of each class
    "7B (4096x11008)": (11008, 4096),
    "70B (8192x28672)": (28672, 8192),
    "405B (16384x53248)": (53248, 16384),
}


def gsm8k_batches(model_name: str, data: str | None, count: int, batch_size: int, seq_len: int) -> list[dict]:
    from hybrid_peft import load_tokenizer
    from hybrid_peft.tasks.gsm8k import gsm8k_text, load_gsm8k

    tokenizer = load_tokenizer(model_name)
    rows = load_gsm8k("train", data)[: count * batch_size]
    batches = []
    for i in range(0, len(rows), batch_size):
        texts = [gsm8k_text(r) for r in rows[i : i + batch_size]]
        batch = tokenizer(texts, max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(dict(batch))
    return batches


def worker(args: argparse.Namespace) -> None:
    import torch

    from hybrid_peft import LoRAGAConfig, attach, load_model
    from hybrid_peft.gradient_estimation import estimate_gradients
    from hybrid_peft.methods.lora_ga import apply_lora_ga_factors, lora_ga_factors_for

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = gsm8k_batches(args.model, args.data, args.batches, args.batch_size, args.seq_len)
    model = load_model(args.model)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state_bytes = 0
    tick = time.perf_counter()
    if args.worker == "peft":
        import peft

        # preprocess_loraga runs before get_peft_model, so it cannot expand "all-linear": name the layers.
        from hybrid_peft.targeting import select_targets

        names = sorted({n.rsplit(".", 1)[-1] for n in select_targets(model, LoRAGAConfig(targets="all-linear"))})
        config = peft.LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=names,
            init_lora_weights="lora_ga",
            lora_ga_config=peft.LoraGAConfig(direction="ArB2r", scale="stable"),
        )

        def train_step() -> None:
            for batch in batches:
                model(**batch).loss.backward()

        peft.preprocess_loraga(model, config, train_step)
        state_bytes = sum(m._peft_loraga_grad.numel() * 4 for m in model.modules() if hasattr(m, "_peft_loraga_grad"))
        peft.get_peft_model(model, config)
    else:
        attach(model, LoRAGAConfig(rank=args.rank, alpha=2 * args.rank, estimator=args.worker, svd=args.svd))
        estimates = estimate_gradients(model, batches, estimator=args.worker, rank=args.rank)
        seen: set[int] = set()
        for estimate in estimates.values():  # shared test matrices are counted once
            for tensor in [*estimate.state().values(), *[getattr(estimate, a, None) for a in ("omega", "psi")]]:
                if tensor is not None and tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    state_bytes += tensor.numel() * tensor.element_size()
        apply_lora_ga_factors(model, lora_ga_factors_for(model, estimates))
    wall = time.perf_counter() - tick
    result = {
        "variant": args.worker,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before,
        "state_mb": state_bytes / 2**20,
    }
    print("RESULT " + json.dumps(result), flush=True)


def state_table(rank: int, oversampling: int) -> list[str]:
    from hybrid_peft.gradient_estimation import sketch_size

    k, rows = sketch_size(rank, oversampling)
    lines = [
        f"\nEstimator state per layer, fp32, r={rank}, sketch k={k}, l={rows} (Ω and Ψ counted in full for this layer; "
        "they are shared by all layers of the same width)\n",
        "| layer | exact G MB | sketch Y+Z MB | + Ω, Ψ MB | sketch / exact | all-reduce: exact MB | sketch MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, (out_features, in_features) in LARGE_SHAPES.items():
        exact = out_features * in_features * 4 / 2**20
        accumulators = (out_features * k + rows * in_features) * 4 / 2**20
        tests = (in_features * k + rows * out_features) * 4 / 2**20
        lines.append(
            f"| {label} | {exact:,.1f} | {accumulators:,.1f} | {tests:,.1f} | {(accumulators + tests) / exact:.3f} "
            f"| {exact:,.1f} | {accumulators:,.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="folder holding gsm8k/train.jsonl (default: shared/data nearby)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--svd", default="exact", choices=["exact", "lowrank"], help="SVD of our exact estimator")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (the median is reported)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    passthrough = ["model", "rank", "batches", "batch_size", "seq_len", "threads", "svd"] + (
        ["data"] if args.data else []
    )
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--worker", variant] + [
                f"--{key.replace('_', '-')}={getattr(args, key)}" for key in passthrough
            ]
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode or not lines:
                print(f"{variant} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
                continue
            results.setdefault(variant, []).append(json.loads(lines[-1][7:]))

    def median(variant: str, key: str) -> float:
        values = sorted(r[key] for r in results[variant])
        return values[len(values) // 2]

    print(
        f"\n{args.model}, all linear layers, r={args.rank}, {args.batches} GSM8K batches of {args.batch_size}x"
        f"{args.seq_len}, {args.threads} threads, median of {args.repeats} run(s) per variant\n"
    )
    print("| variant | init wall s | × PEFT | peak RSS MB | × PEFT | estimator state MB |")
    print("|---|---|---|---|---|---|")
    for variant in results:
        ratio_time = median(variant, "wall_s") / median("peft", "wall_s") if "peft" in results else float("nan")
        ratio_rss = (
            median(variant, "peak_rss_mb") / median("peft", "peak_rss_mb") if "peft" in results else float("nan")
        )
        print(
            f"| {variant} | {median(variant, 'wall_s'):.1f} | {ratio_time:.2f} | {median(variant, 'peak_rss_mb'):.0f} "
            f"| {ratio_rss:.2f} | {median(variant, 'state_mb'):.1f} |"
        )
    from hybrid_peft import LoRAGAConfig

    print("\n".join(state_table(args.rank, LoRAGAConfig().oversampling)))


if __name__ == "__main__":
    main()
