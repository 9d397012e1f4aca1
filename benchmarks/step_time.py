"""Training-step time and peak memory of each method on the default model, each method in its own process.

    python benchmarks/step_time.py                       # SmolLM2-135M, 4x128, all linear layers, 2 threads
    python benchmarks/step_time.py --methods peft-lora,boft --steps 8
    python benchmarks/step_time.py --device cuda --dtype bfloat16
    python benchmarks/step_time.py --methods lora,hybrid --profile 3   # and where each method's time goes
    python benchmarks/step_time.py --paired lora,hybrid --steps 40      # both in one process, steps alternated
    python benchmarks/step_time.py --paired lora,hybrid --without rotation   # what the rotation costs (timing only)
    python benchmarks/step_time.py --paired lora,hybrid --native-blocks      # the rotation's products in C++

Prints one markdown table: trainable parameters, median step time (forward + backward + AdamW step), its ratio to
PEFT LoRA r=8 measured in the same run, and peak memory (process peak RSS on CPU, peak allocated on CUDA) with its
ratio. Use ratios, not absolute seconds: machines are noisy. ``--profile N`` profiles N more steps of each method
(first process only, after the timed ones) and prints its operators by self time.

``--paired A,B`` answers "how much slower is B than A" on a noisy machine: both models live in one process and
their training steps alternate (A, B, A, B, ...), so a slow spell of the machine hits both alike; it prints each
method's median step and the median of the per-pair ratios B/A with a 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _ours(config_factory: Callable[[], object]) -> Callable:
    def build(model):  # noqa: ANN001, ANN202
        from hybrid_peft import attach

        return attach(model, config_factory())

    return build


def _peft(config_factory: Callable[[], object]) -> Callable:
    def build(model):  # noqa: ANN001, ANN202
        import peft

        return peft.get_peft_model(model, config_factory())

    return build


def _hybrid_unitary(model):  # noqa: ANN001, ANN202
    """The recipe's ``hybrid-unitary``: the unitary adapter on attention, the hybrid on the other linear layers."""
    from hybrid_peft import HybridConfig, UnitaryConfig, attach

    attach(model, UnitaryConfig(lr_scale=10.0))
    return attach(model, HybridConfig())  # rank 8, alpha 16, block size 4


def method_builders() -> dict[str, Callable]:
    """Every registered method at the estimate's settings (rank 8, block size 4: ``estimate.method_config``), the
    bench's hybrid variants under the bench's names and options, full fine-tuning and PEFT's LoRA and BOFT."""
    from hybrid_peft import BOFTConfig, HybridConfig, UnitaryConfig
    from hybrid_peft.estimate import method_config
    from hybrid_peft.registry import methods_in_registration_order

    def peft_lora():  # noqa: ANN202
        import peft

        return peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")

    def peft_boft():  # noqa: ANN202
        import peft

        return peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules="all-linear")

    paper = {"rank": 8, "alpha": 16, "low_rank": "lora-ga", "orthogonal.lr_scale": 1.0}  # as the bench's variants
    builders = {
        method: _ours(lambda method=method: method_config(method, rank=8, block_size=4))
        for method in methods_in_registration_order()
    }
    return builders | {
        "full": lambda model: model,
        "peft-lora": _peft(peft_lora),
        "peft-boft": _peft(peft_boft),
        "boft-m2": _ours(lambda: BOFTConfig(block_size=4, butterfly_factors=2)),
        "unitary-all-linear": _ours(lambda: UnitaryConfig(targets="all-linear")),
        "hybrid-share": _ours(lambda: HybridConfig.from_dict({**paper, "rule": "share"})),
        "hybrid-sigmoid": _ours(lambda: HybridConfig.from_dict({**paper, "rule": "sigmoid"})),
        "hybrid-fixed": _ours(lambda: HybridConfig(rule=None)),  # no rule: no λ, no per-step work
        "hybrid-protect-max": _ours(lambda: HybridConfig.from_dict({"rule": {"name": "protect", "gates": "max"}})),
        "hybrid-unitary": _hybrid_unitary,
    }


DEFAULT_METHODS = "peft-lora,lora,boft,boft-m2,unitary,hybrid,hybrid-fixed,hybrid-share,hybrid-sigmoid,peft-boft,full"


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepared(method: str, args: argparse.Namespace, steps: int) -> tuple:
    """``method`` on the model in training mode, its data-dependent start run (outside any timing), and ``steps``
    random batches (the same for every method)."""
    import torch

    from hybrid_peft import load_model
    from hybrid_peft.adapters import initialise_adapters

    torch.manual_seed(0)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    model = method_builders()[method](model).train()
    if method == "full":
        model.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
        batches.append({"input_ids": ids, "labels": ids})
    initialise_adapters(model, lambda: batches[:2])  # LoRA-GA's start, for example
    return model, batches


def worker(args: argparse.Namespace) -> None:
    import torch

    from hybrid_peft.run.loop import make_optimiser, training_steps

    torch.set_num_threads(args.threads)
    model, batches = prepared(args.worker, args, args.warmup + args.steps + args.profile)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # The project's one training loop (the methods' hooks run as in training).
    optimizer, schedule = make_optimiser(
        model, learning_rate=1e-5, weight_decay=0.0, steps=len(batches), warmup_steps=0
    )
    timed = args.warmup + args.steps
    results = list(training_steps(model, batches.__getitem__, optimizer, schedule, start=0, stop=timed))
    times = [r.seconds for r in results[args.warmup :]]
    profile = ""
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        on_gpu = args.device.startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with torch_profile(activities=activities) as profiler:
            list(training_steps(model, batches.__getitem__, optimizer, schedule, start=timed, stop=len(batches)))
        sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"  # on a GPU: by kernel time
        profile = profiler.key_averages().table(sort_by=sort_by, row_limit=25 if on_gpu else 15)
    result = {
        "method": args.worker,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "peak_mb": peak_memory_mb(args.device),
        "loss": results[-1].loss,
        "profile": profile,
    }
    print("RESULT " + json.dumps(result), flush=True)


WITHOUT = ("rotation", "scale")


def leave_out(parts: list[str]) -> None:
    """Where the butterfly layer's time goes (``--without``): skip its rotation (the identity in place of ``x M``,
    zero gradients for the blocks) or its per-output scale (the plain product, zero gradients for ``s``) in the
    one-node layer of methods/fused.py. The model is then no longer BOFT or the hybrid: for timing only."""
    import torch
    import torch.nn.functional as F

    from hybrid_peft.methods import fused

    if "rotation" in parts:
        fused.rotate = lambda x, grouped, plan: x

        def no_rotation_backward(x, grouped, plan, grad, *, want_input, want_blocks):  # noqa: ANN001, ANN202
            return (grad if want_input else None), (torch.zeros_like(grouped) if want_blocks else None)

        fused.rotate_backward = no_rotation_backward
    if "scale" in parts:

        def unscaled(x, weight, scale, bias, low_rank_input, low_rank_weight, coefficient, keep_product=False):  # noqa: ANN001, ANN202
            out = F.linear(x, weight, bias)
            scaled_weight = None if low_rank_input is None else coefficient * low_rank_weight
            if scaled_weight is not None:
                out.addmm_(low_rank_input, scaled_weight.T)
            return out, out if keep_product else None, scaled_weight

        def unscaled_backward(grad, weight, scale, bias, low_rank_input, scaled_weight, saved, *, keep_product,  # noqa: ANN001, ANN202
                              low_rank_scale, want):  # fmt: skip
            want_x, want_scale, want_bias, want_input, want_weight = want
            return (
                grad @ weight if want_x else None,
                torch.zeros_like(scale) if want_scale else None,
                grad.sum(0) if want_bias else None,
                grad @ scaled_weight if want_input else None,
                low_rank_scale * (grad.T @ low_rank_input) if want_weight else None,
            )

        fused._scaled_output, fused.scaled_linear_backward = unscaled, unscaled_backward


def use_native_blocks() -> None:
    """``--native-blocks``: the rotation's block products (forward, the input's gradient, the blocks' gradient) by
    ``native_blocks.cpp``, one pass over the (tokens × features) tensor each and the 4 × 4 blocks ungrouped, in
    place of PyTorch's batched product of dense 16-wide groups with its layout copies. The same maths (checked
    here against the PyTorch path before timing); CPU float32, one butterfly factor. Needs a C++ compiler."""
    from pathlib import Path

    import torch
    from torch.utils.cpp_extension import load

    from hybrid_peft.methods import butterfly, fused

    source = Path(__file__).with_name("native_blocks.cpp")
    native = load("hybrid_peft_bench_blocks", [str(source)], extra_cflags=["-O3"])
    original_rotate, original_backward = fused.rotate, fused.rotate_backward

    def served(grouped, plan):  # noqa: ANN001, ANN202
        return grouped.shape[0] == 1 and all(index is None for index in plan) and grouped.dtype == torch.float32

    def rotate(x, grouped, plan):  # noqa: ANN001, ANN202
        if not served(grouped, plan):
            return original_rotate(x, grouped, plan)
        return native.block_product(x.contiguous(), grouped[0].contiguous(), False)

    def rotate_backward(x, grouped, plan, grad, *, want_input, want_blocks):  # noqa: ANN001, ANN202
        if not served(grouped, plan):
            return original_backward(x, grouped, plan, grad, want_input=want_input, want_blocks=want_blocks)
        grad, width = grad.contiguous(), grouped.shape[-1]
        blocks = native.block_product_grad(x.contiguous(), grad, width)[None] if want_blocks else None
        return (native.block_product(grad, grouped[0].contiguous(), True) if want_input else None), blocks

    generator = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 48, 576, generator=generator).unbind()
    skew = torch.randn(144, 6, generator=generator)
    grouped = butterfly.cayley(butterfly.skew_symmetric(skew, 4))[None]  # (1, N, 4, 4)
    plan = [None, None]
    torch.testing.assert_close(rotate(x, grouped, plan), original_rotate(x, grouped, plan), atol=1e-5, rtol=0)
    for got, expected in zip(
        rotate_backward(x, grouped, plan, grad, want_input=True, want_blocks=True),
        original_backward(x, grouped, plan, grad, want_input=True, want_blocks=True),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    butterfly.GROUP_WIDTH = 1  # the blocks ungrouped: the kernel multiplies 4 × 4 blocks directly
    fused.rotate, fused.rotate_backward = rotate, rotate_backward


def paired(args: argparse.Namespace) -> None:
    """Two methods in one process, their steps alternated; the ratio of each adjacent pair of steps."""
    import random

    import torch

    from hybrid_peft.run.loop import make_optimiser, training_steps

    torch.set_num_threads(args.threads)
    if args.without:
        leave_out(args.without.split(","))
    if args.native_blocks:
        use_native_blocks()
    names = [m.strip() for m in args.paired.split(",")]
    if len(names) != 2 or any(n not in method_builders() for n in names):
        raise SystemExit(f"--paired takes two methods, e.g. lora,hybrid; choose from {sorted(method_builders())}")
    total = args.warmup + args.steps
    runs = []
    for name in names:
        model, batches = prepared(name, args, total)
        optimizer, schedule = make_optimiser(model, learning_rate=1e-5, weight_decay=0.0, steps=total, warmup_steps=0)
        runs.append(training_steps(model, batches.__getitem__, optimizer, schedule, start=0, stop=total))
    times: list[list[float]] = [[], []]
    for step in range(total):
        order = (0, 1) if step % 2 == 0 else (1, 0)  # alternate who goes first
        for index in order:
            result = next(runs[index])
            if step >= args.warmup:
                times[index].append(result.seconds)
    ratios = [b / a for a, b in zip(*times, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choice(ratios) for _ in ratios) for _ in range(2000))  # bootstrap over pairs
    low, high = medians[int(0.025 * len(medians))], medians[int(0.975 * len(medians)) - 1]
    print(
        f"\n{args.model}, batch {args.batch_size}x{args.seq_len}, {args.device} {args.dtype}, {args.threads} threads, "
        f"{args.steps} alternated steps of each after {args.warmup} warm-up, one process"
        + (
            f"; the butterfly layers without their {args.without.replace(',', ' and ')} (timing only)"
            if args.without
            else ""
        )
        + ("; the rotation's block products in C++ (benchmarks/native_blocks.cpp)" if args.native_blocks else "")
        + "\n"
    )
    print(f"| method | step s (median) | × {names[0]} (median of pair ratios) | 95% interval |")
    print("|---|---|---|---|")
    print(f"| {names[0]} | {statistics.median(times[0]):.3f} | 1.00 | |")
    ratio = statistics.median(ratios)
    print(f"| {names[1]} | {statistics.median(times[1]):.3f} | {ratio:.3f} | {low:.3f}–{high:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=1, help="processes per method, interleaved (median reported)")
    parser.add_argument("--baseline", default="peft-lora", help="method the ratios are relative to")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--profile", type=int, default=0, help="profile N more steps per method and print the top ops")
    parser.add_argument("--paired", help="two methods, e.g. lora,hybrid: one process, steps alternated, paired ratio")
    parser.add_argument(
        "--without",
        help="with --paired, for timing only: leave the butterfly layer's rotation and/or scale out "
        f"(comma-separated, from {', '.join(WITHOUT)}), to see what each costs",
    )
    parser.add_argument(
        "--native-blocks",
        action="store_true",
        help="with --paired: the butterfly rotation's block products by benchmarks/native_blocks.cpp (a C++ kernel "
        "built on the spot, the same maths) instead of PyTorch's batched products",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.without and (not args.paired or set(args.without.split(",")) - set(WITHOUT)):
        parser.error(f"--without takes {', '.join(WITHOUT)} (comma-separated) and needs --paired")
    if args.native_blocks and (not args.paired or args.device != "cpu" or args.dtype != "float32"):
        parser.error("--native-blocks needs --paired, and runs on --device cpu with --dtype float32")
    if args.paired:
        paired(args)
        return
    if args.worker:
        worker(args)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(method_builders()))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(method_builders())}")
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):  # interleaved, so slow drifts of the machine hit every method alike
        for method in methods:
            command = (
                [sys.executable, __file__, "--worker", method]
                + [
                    f"--{key.replace('_', '-')}={value}"
                    for key, value in vars(args).items()
                    if key in ("model", "batch_size", "seq_len", "steps", "warmup", "threads", "device", "dtype")
                ]
                + [f"--profile={args.profile if repeat == 0 else 0}"]
            )
            print(f"running {method} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                print(f"{method} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
                continue
            runs.setdefault(method, []).append(json.loads(lines[-1][len("RESULT ") :]))
    results = []
    for method_runs in runs.values():  # median over processes of each process's median step
        merged = dict(method_runs[0])
        for key in ("median_step_s", "peak_mb"):
            merged[key] = statistics.median(r[key] for r in method_runs)
        merged["min_step_s"] = min(r["min_step_s"] for r in method_runs)
        merged["max_step_s"] = max(r["max_step_s"] for r in method_runs)
        results.append(merged)

    baseline = next((r for r in results if r["method"] == args.baseline), None)
    memory = "peak allocated MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(
        f"\n{args.model}, batch {args.batch_size}x{args.seq_len}, all linear layers, {args.device} {args.dtype}, "
        f"{args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up, "
        f"median over {args.repeats} process(es) per method\n"
    )
    print(
        f"| method | trainable params | step s (median) | min–max s | × {args.baseline} "
        f"| {memory} | × {args.baseline} |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        time_ratio = f"{r['median_step_s'] / baseline['median_step_s']:.2f}" if baseline else "n/a"
        memory_ratio = f"{r['peak_mb'] / baseline['peak_mb']:.2f}" if baseline else "n/a"
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['median_step_s']:.2f} "
            f"| {r['min_step_s']:.2f}–{r['max_step_s']:.2f}"
            f" | {time_ratio} | {r['peak_mb']:.0f} | {memory_ratio} |"
        )
    for r in results:
        if r.get("profile"):
            print(f"\n### {r['method']}: {args.profile} profiled steps, operators by self CPU time\n\n{r['profile']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
