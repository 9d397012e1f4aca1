"""Check ``hybrid-peft estimate`` against measured training memory on the small default models.

    python benchmarks/estimate_check.py                       # SmolLM2-135M and MiniLM-L6, batch 4 × 128, fp32, CPU
    python benchmarks/estimate_check.py --fsdp 2 --models smollm2-135m   # FSDP2 over 2 processes vs --zero 3 --world 2
    python benchmarks/estimate_check.py --models smollm2-135m --methods lora --modes plain,nf4,checkpointing,chunked,all

Each (model, method) runs in its own process: imports, then the runtime's resident memory is read; the model is
loaded and the adapter attached; the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and three
AdamW training steps run. Measured = peak RSS during training − RSS before the model was loaded: weights, adapter,
gradients, optimiser states and activations, which the estimate models, plus the runtime's fixed cost, which it
does not: the model's Python objects, the allocator's and the math libraries' workspaces. The check measures that
fixed cost on its own: RSS after the model is loaded, the adapter attached and one no-grad forward of 8 tokens has
run, less the bytes of its parameters and buffers (on a GPU the CUDA context plays this part). Workers run with
MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed activations to the system and RSS follows live tensors.

Prints a markdown table: the estimate, the runtime's fixed cost, the measurement, and the ratios of the estimate
alone and of the estimate plus the fixed cost to the measurement (target: within 15%). The estimate uses the
attention CPUs run: PyTorch's fused kernel for the decoder, the materialised scores for BERT (the fused CPU kernel
does not take attention dropout). With ``--fsdp N`` each worker is N processes under ``torchrun`` (gloo) whose model
is sharded with FSDP2 (every decoder block, then the model) before the peak counter is reset; each process
measures its own peak, the table shows the largest, and the estimate is ``--zero 3 --world N``. ``--modes`` measures
the resource savings (causal LMs): ``nf4`` (a 4-bit base), ``checkpointing`` (activation checkpointing), ``chunked``
(the loss in chunks of 128 tokens), ``all`` (the three together), against the estimate's matching options. Linux
only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("plain", "nf4", "checkpointing", "chunked", "all")
CHUNK_TOKENS = 128


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    import gc

    import torch

    from hybrid_peft import attach, load_model
    from hybrid_peft.adapters import initialise_adapters
    from hybrid_peft.estimate import method_config
    from hybrid_peft.losses import ChunkedLossModel
    from hybrid_peft.run.loop import make_optimiser, training_steps

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classify = args.model == "minilm-l6"
    gc.collect()
    runtime_kib = _status_kib("VmRSS")
    mode = args.mode or "plain"
    quantise = "nf4" if mode in ("nf4", "all") else None
    model = load_model(args.model, task="sequence-classification" if classify else "causal-lm", quantise=quantise,
                       **({"num_labels": 2} if classify else {}))  # fmt: skip
    if mode in ("checkpointing", "all"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunk = CHUNK_TOKENS if mode in ("chunked", "all") else 0
    if args.method != "full":  # the registry's config, as the estimate builds it
        attach(model, method_config(args.method, rank=args.rank, block_size=args.block_size))
    vocab = model.config.vocab_size
    sharded = None
    if args.fsdp:
        from accelerate import Accelerator

        from hybrid_peft.run.parallel import parallelism_for

        sharded = parallelism_for(True, Accelerator(cpu=True))
        model = sharded.shard(model)  # the full copies are released: each process keeps its shard
    with torch.no_grad():  # the runtime's fixed cost: first-use workspaces, the model's Python objects
        model.eval()(input_ids=torch.randint(5, vocab, (1, 8)))
    gc.collect()
    local = [getattr(t, "to_local", lambda t=t: t)() for t in [*model.parameters(), *model.buffers()]]
    tensor_bytes = sum(t.numel() * t.element_size() for t in local)
    fixed_kib = _status_kib("VmRSS") - runtime_kib - tensor_bytes / 1024
    ids = torch.randint(5, vocab, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.randint(0, 2, (args.batch_size,)) if classify else ids.clone()
    initialise_adapters(model, lambda: [batch])  # a data-dependent start (LoRA-GA's), before the peak is reset
    steps = 3
    optimiser, schedule = make_optimiser(model, learning_rate=1e-5, weight_decay=0.0, steps=steps, warmup_steps=0)
    trained = ChunkedLossModel(model, chunk) if chunk else model
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    # The project's one training loop, as the recipe runs it (methods' hooks included).
    for _ in training_steps(trained, lambda _: batch, optimiser, schedule, start=0, stop=steps, parallel=sharded):
        pass
    peak_kib = _status_kib("VmHWM")
    print("RESULT " + json.dumps({"measured_mb": (peak_kib - runtime_kib) / 1024, "fixed_mb": fixed_kib / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    from hybrid_peft.registry import methods_in_registration_order

    methods = ["full", *methods_in_registration_order()]
    parser.add_argument("--methods", default=",".join(methods), help="comma-separated (default: every method)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fsdp", type=int, default=0, help="shard over N processes with FSDP2 (estimate: ZeRO 3)")
    parser.add_argument("--modes", default="plain", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from hybrid_peft.estimate import estimate, load_architecture

    sharding = f", FSDP2 over {args.fsdp} processes (largest per-process peak)" if args.fsdp else ""
    print(f"batch {args.batch_size} × {args.seq_len}, float32, CPU, {args.threads} threads, median of {args.repeats}"
          f"{sharding}")  # fmt: skip
    print()
    print("| model | method | mode | estimate MB | fixed runtime MB | measured MB | estimate / measured "
          "| (estimate + fixed) / measured |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    runs = [(m, method, mode) for m in args.models.split(",") for method in args.methods.split(",")
            for mode in args.modes.split(",")]  # fmt: skip
    for model, method, mode in runs:
        arch = load_architecture(model)
        measured, fixed = [], []
        for _ in range(args.repeats):
            command = [__file__, "--worker", "--model", model, "--method", method,
                       "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                       "--rank", str(args.rank), "--block-size", str(args.block_size),
                       "--threads", str(args.threads), "--mode", mode]  # fmt: skip
            if args.fsdp:
                launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.fsdp)]
                command = [sys.executable, *launcher, *command, "--fsdp", str(args.fsdp)]
            else:
                command = [sys.executable, *command]
            # Large blocks through mmap, so freed activations leave RSS: glibc otherwise keeps them in its heap
            # and RSS reports retained memory rather than live tensors (about +500 MB on SmolLM2 at 4 × 128).
            environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
            results = [json.loads(found) for found in re.findall(r"RESULT (\{[^}]*\})", output)]  # per process
            largest = max(results, key=lambda r: r["measured_mb"])  # one per process
            measured.append(largest["measured_mb"])
            fixed.append(largest["fixed_mb"])
        value, runtime = statistics.median(measured), statistics.median(fixed)
        options = {"zero": 3, "world": args.fsdp} if args.fsdp else {}
        options |= {"quantised_base": 4} if mode in ("nf4", "all") else {}
        options |= {"checkpointing": True} if mode in ("checkpointing", "all") else {}
        options |= {"loss_chunk_tokens": CHUNK_TOKENS} if mode in ("chunked", "all") else {}
        guess = estimate(arch, method, batch_size=args.batch_size, seq_len=args.seq_len, dtype="float32",
                         rank=args.rank, block_size=args.block_size, **options,
                         attention="flash" if arch.decoder else "math").total / 2**20  # fmt: skip
        print(
            f"| {model} | {method} | {mode} | {guess:,.0f} | {runtime:,.0f} | {value:,.0f} | {guess / value:.2f} "
            f"| {(guess + runtime) / value:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
