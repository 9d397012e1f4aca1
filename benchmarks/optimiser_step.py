"""AdamW's step alone, per implementation, over the trainable parameters of each method on the default model.

    python benchmarks/optimiser_step.py                          # SmolLM2-135M: full, lora, hybrid; 2 threads
    python benchmarks/optimiser_step.py --methods full --repeats 11

PyTorch's AdamW has three implementations: a loop of about ten operations per parameter (its default on CPU), the
same operations batched over all parameters (``foreach``, its default on CUDA) and one fused kernel. The recipe's
``make_optimiser`` picks the fused one wherever the parameters allow it (``tests/test_resources.py`` checks that it
steps like the loop). Gradients are random; the step's cost does not depend on their values. Prints one markdown
table: the median seconds of one ``optimizer.step()`` per implementation and its ratio to the loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMPLEMENTATIONS = {"loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def trainable_parameters(method: str, model_name: str) -> list:
    from hybrid_peft import HybridConfig, LoRAConfig, attach, load_model

    model = load_model(model_name)
    if method == "full":
        return [p.requires_grad_(True) for p in model.parameters()]
    config = {"lora": LoRAConfig(rank=8, alpha=16), "hybrid": HybridConfig()}[method]
    return [p for p in attach(model, config).parameters() if p.requires_grad]


def time_steps(params: list, options: dict, repeats: int) -> float:
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **options)
    for _ in range(2):  # the first step allocates the moments
        optimizer.step()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,lora,hybrid", help="comma-separated: full, lora, hybrid")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per implementation (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"AdamW's step on {args.model}, {args.threads} threads, median of {args.repeats}\n")
    columns = " | ".join(f"{name} s" for name in IMPLEMENTATIONS)
    print(f"| method | parameters | tensors | {columns} | fused × loop |")
    print("|---|---|---|" + "---|" * (len(IMPLEMENTATIONS) + 1))
    for method in args.methods.split(","):
        params = trainable_parameters(method, args.model)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        seconds = {name: time_steps(params, options, args.repeats) for name, options in IMPLEMENTATIONS.items()}
        cells = " | ".join(f"{seconds[name]:.4f}" for name in IMPLEMENTATIONS)
        count = sum(p.numel() for p in params)
        print(f"| {method} | {count:,} | {len(params)} | {cells} | {seconds['fused'] / seconds['loop']:.2f} |")


if __name__ == "__main__":
    main()
