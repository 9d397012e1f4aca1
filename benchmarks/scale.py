"""Training memory and step time at the published Llama shapes, measured beside ``hybrid-peft estimate``.

    python benchmarks/scale.py                     # Llama-3.2-1B, -3B, -3.1-8B shapes on this CPU: fp32, savings
    python benchmarks/scale.py --device cuda       # the GPU run: SmolLM2-135M, 1B, 3B shapes, bf16, every method,
                                                   # batch 8 × 512 tokens, 10 steps (under 10 minutes on an H200)
    python benchmarks/scale.py --shapes tiny --steps 2 --seq-len 16    # the reduced mode the tests run (seconds)

The models are Llama-shaped with random weights (``SHAPES``: the published configs of SmolLM2-135M, Llama-3.2-1B,
Llama-3.2-3B and Llama-3.1-8B; ``smollm2-135m`` is the real model from its package, whose step time and memory the
random ``smollm2`` shape reproduces without the package): each is written once, shard by shard in bf16
(never a whole fp32 copy), as an ordinary checkpoint folder under ``--cache-dir``, and every run loads it the way a
user's checkpoint loads (``load_model``, so ``nf4`` quantises while loading). Weights and compute are fp32 on a CPU
(``--dtype``; bf16 on a GPU): on the 2-core machine these figures come from, PyTorch's bf16 matmul in the backward
pass's layout (grad_out @ W) ran at a thirtieth of fp32's speed (0.28 against 38 GFLOP/s), although the CPU reports
avx512_bf16 and amx_bf16 (its flags do not predict it: time one step before choosing). A model too large for fp32
trains there with an NF4 base, which computes in fp32. Each (shape, method, mode) then runs in its own process, as
``benchmarks/estimate_check.py`` measures: the runtime's resident memory is read after imports,
the model is loaded and the adapter attached, the peak counter is reset and ``--steps`` AdamW steps of
``--batch-size`` × ``--seq-len`` tokens run through the project's training loop. Measured = peak RSS during training −
RSS before loading (on a GPU: the peak of ``torch.cuda.max_memory_allocated``); the step time is the median of the
steps after the first. Modes: ``plain`` (weights in ``--dtype``) and ``savings`` (``--quantise-base nf4
--gradient-checkpointing --loss-chunk-tokens 128``; full fine-tuning cannot train a quantised base, so its savings
are checkpointing and the chunked loss alone). A run whose estimate does not fit in the memory this machine has free
(``--memory-gb``, default: MemAvailable, or the GPU's memory) is not started and is marked "does not fit".

Prints (and with ``--output`` writes) a markdown table in the bench's format: per shape and mode, each method's
trainable parameters, the estimate, the runtime's fixed cost (see estimate_check.py), the measurement, their ratio,
the median step time and the memory as a multiple of full fine-tuning's (measured where full fine-tuning ran, else
from the estimates, marked "est."). Linux only (``/proc`` for the CPU's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from estimate_check import _status_kib  # the same measurement: VmRSS, VmHWM from /proc/self/status

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _llama(name: str) -> dict:
    """A published shape from ``hybrid-peft estimate``'s built-ins (one source of truth), as a LlamaConfig's fields."""
    from hybrid_peft.estimate import BUILTIN_ARCHITECTURES

    fields = {k: v for k, v in BUILTIN_ARCHITECTURES[name].items() if k != "model_type"}
    return fields | {"rope_theta": 500000.0, "max_position_embeddings": 131072}


SHAPES: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": True},
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                "rope_theta": 100000.0},  # SmolLM2-135M's published config
    "1b": _llama("llama-3.2-1b"),
    "3b": _llama("llama-3.2-3b"),
    "8b": _llama("llama-3.1-8b"),
}  # fmt: skip
REAL_MODELS = ("smollm2-135m",)
MODES = ("plain", "savings")
CHUNK_TOKENS = 128
SHARD_BYTES = 2 * 2**30


def write_random_checkpoint(shape: str, folder: Path, device: str = "cpu") -> Path:
    """A Llama of ``shape`` with random bf16 weights (N(0, 0.02); norms 1) as a sharded safetensors checkpoint in
    ``folder``; reused when complete. Built on the meta device, one tensor at a time: memory stays one shard. The
    random numbers are drawn on ``device`` (a GPU draws billions in a second; the CPU takes about a minute at 8B)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**SHAPES[shape], dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor_shape in shapes.items():
        nbytes = 2 * int(torch.Size(tensor_shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator(device).manual_seed(0)
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                drawn = torch.empty(shapes[name], dtype=torch.bfloat16, device=device)
                tensors[name] = drawn.normal_(0, 0.02, generator=generator).cpu()
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    done.touch()
    return folder


def worker(args: argparse.Namespace) -> None:
    """One (model, method, mode) run; prints ``RESULT {json}``."""
    import gc

    import torch

    from hybrid_peft import attach, load_model
    from hybrid_peft.adapters import initialise_adapters, parameter_counts
    from hybrid_peft.estimate import method_config
    from hybrid_peft.losses import ChunkedLossModel
    from hybrid_peft.run.loop import make_optimiser, training_steps

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    savings = args.mode == "savings"
    quantise = "nf4" if savings and args.method != "full" else None
    gc.collect()
    runtime_kib = _status_kib("VmRSS")
    placement = ({"device_map": {"": "cuda"}} if quantise else {"device": "cuda"}) if cuda else {}
    model = load_model(args.model, dtype=dtype, quantise=quantise, **placement)
    if savings:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.method != "full":
        attach(model, method_config(args.method, rank=args.rank, block_size=args.block_size))
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    with torch.no_grad():  # the runtime's fixed cost: first-use workspaces, the model's Python objects
        model.eval()(input_ids=torch.randint(5, vocab, (1, 8), device=device))
    gc.collect()
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    fixed_mb = (_status_kib("VmRSS") - runtime_kib - (0 if cuda else tensor_bytes / 1024)) / 1024
    ids = torch.randint(5, vocab, (args.batch_size, args.seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    initialise_adapters(model, lambda: [batch])  # a data-dependent start (LoRA-GA's), before the peak is reset
    optimiser, schedule = make_optimiser(model, learning_rate=1e-5, weight_decay=0.0, steps=args.steps, warmup_steps=0)
    trained = ChunkedLossModel(model, CHUNK_TOKENS) if savings else model
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
    seconds = []
    for result in training_steps(trained, lambda _: batch, optimiser, schedule, start=0, stop=args.steps):
        if cuda:
            torch.cuda.synchronize()
        seconds.append(result.seconds)
    if cuda:
        measured_mb = torch.cuda.max_memory_allocated() / 2**20
        fixed_mb = 0.0  # the allocator's count holds tensors only
    else:
        measured_mb = (_status_kib("VmHWM") - runtime_kib) / 1024
    trainable, _ = parameter_counts(model)
    step_s = statistics.median(seconds[1:] or seconds)
    print("RESULT " + json.dumps({"measured_mb": measured_mb, "fixed_mb": fixed_mb, "step_s": step_s,
                                  "trainable": trainable}), flush=True)  # fmt: skip


def available_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**20
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def estimated_mb(folder: str, method: str, mode: str, args: argparse.Namespace) -> tuple[float, int]:
    """``hybrid-peft estimate``'s peak (MB) and trainable count for the run, with the run's savings."""
    from hybrid_peft.estimate import estimate, load_architecture

    savings = mode == "savings"
    options = {"checkpointing": True, "loss_chunk_tokens": CHUNK_TOKENS} if savings else {}
    if savings and method != "full":
        options["quantised_base"] = 4
    result = estimate(load_architecture(folder), method, batch_size=args.batch_size, seq_len=args.seq_len,
                      dtype=args.dtype, rank=args.rank, block_size=args.block_size, attention="flash",
                      **options)  # fmt: skip
    return result.total / 2**20, result.trainable


def run_one(folder: str, method: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--model", folder, "--method", method, "--mode", mode,
               "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--block-size", str(args.block_size), "--threads", str(args.threads)]  # fmt: skip
    # Large blocks through mmap, so freed activations leave RSS (estimate_check.py says why).
    environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=args.timeout)
    found = re.findall(r"RESULT (\{[^}]*\})", completed.stdout)
    if completed.returncode != 0 or not found:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {completed.returncode}: {tail[0][:160]}"}
    return json.loads(found[-1])


def _gb(mb: float) -> str:
    return f"{mb / 1024:,.2f}"


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"batch {args.batch_size} × {args.seq_len} tokens, {args.dtype}, {args.device}, {args.threads} threads, "
        f"{args.steps} steps (step time: median after the first). savings = nf4 base + gradient checkpointing + loss "
        f"in chunks of {CHUNK_TOKENS} tokens (full fine-tuning: the last two).",
        "",
        "| shape | mode | method | trainable | estimate GB | fixed runtime GB | measured GB | (estimate + fixed) / "
        "measured | step s | memory × full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        full = next((r for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"]
                     and r["method"] == "full"), None)  # fmt: skip
        if "measured_mb" in row and full and "measured_mb" in full:
            ratio = f"{row['measured_mb'] / full['measured_mb']:.2f}"
        elif full:
            ratio = f"{row['estimate_mb'] / full['estimate_mb']:.2f} est."
        else:
            ratio = "–"
        if "measured_mb" in row:
            measured = _gb(row["measured_mb"])
            agreement = f"{(row['estimate_mb'] + row['fixed_mb']) / row['measured_mb']:.2f}"
            fixed, step = _gb(row["fixed_mb"]), f"{row['step_s']:.3f}"
        else:
            measured, agreement, fixed, step = row.get("status", "–"), "–", "–", "–"
        lines.append(
            f"| {row['shape']} | {row['mode']} | {row['method']} | {row['trainable']:,} | {_gb(row['estimate_mb'])} "
            f"| {fixed} | {measured} | {agreement} | {step} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", help="comma-separated, from " + ", ".join([*SHAPES, *REAL_MODELS])
                        + " (default: 1b,3b,8b on CPU; smollm2-135m,1b,3b on CUDA)")  # fmt: skip
    parser.add_argument("--methods", help="comma-separated (default: full,lora,hybrid,boft on CPU; on CUDA every "
                        "method: full,lora,lora-ga,boft,unitary,hybrid)")  # fmt: skip
    parser.add_argument("--modes", help=f"comma-separated, from {', '.join(MODES)} (default: both on CPU, plain on "
                        "CUDA)")  # fmt: skip
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                        help="weights' and compute dtype (default: float32 on CPU, bfloat16 on CUDA)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="training steps per run (default: 3 on CPU, 10 on CUDA)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 32 on CPU, 512 on CUDA)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory-gb", type=float, help="the memory a run may use (default: what is free now)")
    parser.add_argument("--cache-dir", default="runs/scale-models", help="where the random checkpoints are written")
    parser.add_argument("--output", help="also write the table (markdown) and the rows (JSON beside it) here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.steps = args.steps or (10 if cuda else 3)
    args.batch_size = args.batch_size or (8 if cuda else 1)
    args.seq_len = args.seq_len or (512 if cuda else 32)
    if args.worker:
        worker(args)
        return
    methods = (args.methods or ("full,lora,lora-ga,boft,unitary,hybrid" if cuda else
                                "full,lora,hybrid,boft")).split(",")  # fmt: skip
    shapes = (args.shapes or ("smollm2,1b,3b" if cuda else "1b,3b,8b")).split(",")
    modes = (args.modes or ("plain" if cuda else "plain,savings")).split(",")
    unknown = sorted({*shapes} - {*SHAPES, *REAL_MODELS}) + sorted({*modes} - {*MODES})
    if unknown:
        parser.error(f"unknown shape(s) or mode(s) {unknown}")
    budget_mb = args.memory_gb * 1024 if args.memory_gb else available_mb(args.device)
    rows = []
    for shape in shapes:
        if shape in REAL_MODELS:
            from hybrid_peft.models import resolve_model_path

            folder = str(resolve_model_path(shape))
        else:
            tick = time.perf_counter()
            folder = str(write_random_checkpoint(shape, Path(args.cache_dir) / f"llama-{shape}", args.device))
            print(f"{shape}: random checkpoint in {folder} ({time.perf_counter() - tick:.0f} s)", flush=True)
        for mode in modes:
            for method in methods:
                estimate_mb, trainable = estimated_mb(folder, method, mode, args)
                row = {"shape": shape, "mode": mode, "method": method, "trainable": trainable,
                       "estimate_mb": estimate_mb}  # fmt: skip
                if estimate_mb * 1.1 + 1024 > budget_mb:
                    row["status"] = f"does not fit ({_gb(budget_mb)} GB free)"
                else:
                    tick = time.perf_counter()
                    result = run_one(folder, method, mode, args)
                    row |= result if "error" not in result else {"status": "failed"}
                    if "error" in result:
                        print(f"  {shape} {mode} {method}: {result['error']}", flush=True)
                    row["wall_s"] = time.perf_counter() - tick
                rows.append(row)
                if args.output:  # after every run, so an interrupted measurement keeps what it measured
                    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
                print(f"  {shape} {mode} {method}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                                                                  f"{k}={v}" for k, v in row.items()
                                                                  if k not in ("shape", "mode", "method")),
                      flush=True)  # fmt: skip
    text = table(rows, args)
    print()
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
