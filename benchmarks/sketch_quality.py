"""How good is LoRA-GA's streaming sketch on real gradients? Error and subspace agreement per sketch size.

    python benchmarks/sketch_quality.py                      # SmolLM2-135M, all 210 linear layers, r=8

Computes the exact mean gradient of every linear layer over 8 GSM8K batches of 4x128, then for each oversampling
factor forms the single-pass sketch Y = GΩ, Z = ΨG (k = oversampling·2r columns, l = 2k+1 rows; identical to
streaming them, by linearity) and reports over all layers: the worst and median ratio of the sketch's rank-2r
error to the optimal rank-2r error, and the smallest principal cosine between the sketch's top-r right singular
subspace and the exact one (on layers with σ_r/σ_{r+1} ≥ 1.05, where that subspace is well defined) and the exact
top-2r one (all layers).
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--oversampling", default="2,4,8,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    import torch

    from hybrid_peft import LoRAGAConfig, attach, load_model
    from hybrid_peft.gradient_estimation import SketchGradient, estimate_gradients

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from lora_ga_init import gsm8k_batches

    batches = gsm8k_batches(args.model, args.data, 8, 4, 128)
    model = load_model(args.model)
    attach(model, LoRAGAConfig(rank=args.rank, targets="all-linear"))
    exact = {name: estimate.dense().double() for name, estimate in estimate_gradients(model, batches).items()}
    spectra = {name: torch.linalg.svd(g, full_matrices=False) for name, g in exact.items()}
    r = args.rank
    print(f"\n{args.model}, {len(exact)} linear layers, r={r}, exact mean gradient over 8 GSM8K batches of 4x128\n")
    print(
        "| oversampling | k | l | error / optimal: median | worst | min cosine, top-r (gap ≥ 5%) "
        "| min cosine vs top-2r |"
    )
    print("|---|---|---|---|---|---|---|")
    for oversampling in (int(v) for v in args.oversampling.split(",")):
        k = oversampling * 2 * r
        rows = 2 * k + 1
        generator = torch.Generator().manual_seed(args.seed)
        ratios, cosines_gap, cosines_2r = [], [], []
        for name, g in exact.items():
            out_features, in_features = g.shape
            omega = torch.randn(in_features, min(k, in_features), generator=generator, dtype=torch.float64)
            psi = torch.randn(min(rows, out_features), out_features, generator=generator, dtype=torch.float64)
            sketch = SketchGradient(omega=omega, psi=psi, y=g @ omega, z=psi @ g, count=1)
            u, s, vh = (t.double() for t in sketch.top_singular(2 * r))
            _, exact_s, exact_vh = spectra[name]
            ratios.append(float(torch.linalg.norm(g - (u * s) @ vh) / torch.linalg.norm(exact_s[2 * r :])))
            if exact_s[r - 1] / exact_s[r] >= 1.05:
                cosines_gap.append(float(torch.linalg.svdvals(exact_vh[:r] @ vh[:r].T).min()))
            cosines_2r.append(float(torch.linalg.svdvals(exact_vh[: 2 * r] @ vh[:r].T).min()))
        print(
            f"| {oversampling} | {k} | {rows} | {statistics.median(ratios):.3f} | {max(ratios):.3f} "
            f"| {min(cosines_gap):.3f} ({len(cosines_gap)} layers) | {min(cosines_2r):.3f} |"
        )


if __name__ == "__main__":
    main()
