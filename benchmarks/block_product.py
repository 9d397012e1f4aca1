"""Time of BOFT's block-diagonal product ``x · blockdiag(Q)`` with b×b blocks, as one batched product of the blocks
and with the blocks folded into dense groups of each width (what ``ButterflyRotate`` does, width 16 by default).

    python benchmarks/block_product.py                      # SmolLM2 and MiniLM layer widths, b = 4, 2 threads
    python benchmarks/block_product.py --tokens 512 --features 576,1536 --block-size 8

Prints one markdown table: the median time of the product (forward) and of ``ButterflyRotate`` forward + backward
at each group width, and its ratio to the ungrouped product. The grouped product does G times the arithmetic (the
zeros between blocks) in 1/G of the small matrix products; on CPU the per-product cost dominates.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hybrid_peft.methods import butterfly as boft


def median_ms(function: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rotate_forward_backward(x: torch.Tensor, rotations: torch.Tensor, upstream: torch.Tensor, group: int) -> None:
    """Grouping the blocks (and its backward) included, as a layer's forward and backward pay for it."""
    x, rotations = x.detach().requires_grad_(), rotations.detach().requires_grad_()
    m, n, b, _ = rotations.shape
    grouped = boft.group_blocks(rotations.reshape(m * n, b, b), group).view(m, n // group, group * b, group * b)
    boft.ButterflyRotate.apply(x, grouped, None, None).backward(upstream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="512,1024", help="comma-separated token counts T (default 512,1024)")
    parser.add_argument("--features", default="384,576,1536", help="comma-separated input widths")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--widths", default="4,8,16,32", help="group widths to time (the block size = ungrouped)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    b = args.block_size
    widths = [int(w) for w in args.widths.split(",")]

    print(f"\nx · blockdiag(Q), b = {b}, float32, {args.threads} threads, median of {args.repeats}\n")
    print("| T | in | group width | product ms | × ungrouped | rotate fwd+bwd ms | × ungrouped |")
    print("|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for tokens in (int(t) for t in args.tokens.split(",")):
        for features in (int(f) for f in args.features.split(",")):
            n = features // b
            x = torch.randn(tokens, features, generator=generator)
            upstream = torch.randn(tokens, features, generator=generator)
            blocks = boft.cayley(boft.skew_symmetric(torch.randn(n, b * (b - 1) // 2, generator=generator), b))
            reference = boft.block_multiply(x, blocks)
            rows = []
            for width in widths:
                group = boft.group_size(n, b, width)
                grouped = boft.group_blocks(blocks, group)
                torch.testing.assert_close(boft.block_multiply(x, grouped), reference, atol=1e-5, rtol=0)
                product = median_ms(lambda x=x, g=grouped: boft.block_multiply(x, g), args.repeats)
                rotate = median_ms(
                    lambda x=x, q=blocks[None], u=upstream, g=group: rotate_forward_backward(x, q, u, g), args.repeats
                )
                rows.append((group * b, product, rotate))
            _, base_product, base_rotate = rows[0]
            for width, product, rotate in rows:
                print(
                    f"| {tokens} | {features} | {width} | {product:.3f} | {product / base_product:.2f} "
                    f"| {rotate:.3f} | {rotate / base_rotate:.2f} |"
                )


if __name__ == "__main__":
    main()
