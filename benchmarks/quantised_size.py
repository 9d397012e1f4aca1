"""Bytes of the frozen base's linear weights in fp32, bf16, int8 and NF4, measured from the loaded models (the
packed weights plus what dequantising needs: NF4's per-block absolute maxima, int8's per-row scales), and of the
whole model (``get_memory_footprint``).

    python benchmarks/quantised_size.py --model smollm2-135m

Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def linear_bytes(model) -> int:  # noqa: ANN001
    from hybrid_peft.config import AdapterConfig
    from hybrid_peft.layer import quantisation_of
    from hybrid_peft.targeting import linear_candidates, select_targets

    candidates = linear_candidates(model)
    total = 0
    for name in select_targets(model, AdapterConfig.from_dict({"method": "lora", "targets": "all-linear"})):
        module = candidates[name]
        weight = module.weight
        total += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        if quantisation_of(module) == "int8":
            scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            total += scales.numel() * scales.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from hybrid_peft.models import load_model

    variants = {
        "fp32": {"dtype": torch.float32},
        "bf16": {"dtype": torch.bfloat16},
        "int8": {"quantise": "int8"},
        "nf4": {"quantise": "nf4"},
    }
    rows = []
    for name, options in variants.items():
        model = load_model(args.model, **options)
        rows.append((name, linear_bytes(model), model.get_memory_footprint()))
        del model
    fp32_linear, fp32_total = rows[0][1], rows[0][2]
    print(f"{args.model}: the linear layers adapters target and the base quantises (all-linear: every linear but the")
    print("task head, which stays at full precision), and the whole model")
    print()
    print("| base | linear weights MB | × fp32 | whole model MB | × fp32 |")
    print("|---|---|---|---|---|")
    for name, linear, total in rows:
        print(f"| {name} | {linear / 2**20:,.1f} | {linear / fp32_linear:.3f} | {total / 2**20:,.1f} | "
              f"{total / fp32_total:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
