"""The butterfly layer's whole training step in one autograd function: rotate, the scaled base product and the
low-rank branch, for BOFT and the hybrid::

    y = s ⊙ ((x M) W0ᵀ) + b  [+ c · (x Aᵀ) Bᵀ]

Composed from :class:`~hybrid_peft.methods.butterfly.ButterflyRotate`, a low-rank ``F.linear`` and
:class:`~hybrid_peft.methods.butterfly.ScaledLinear` (:func:`butterfly_linear_composed`, the reference the tests
hold it to), one forward pass is three autograd nodes per layer, and backward adds the two gradients of ``x``
(through the rotation and through ``A``) in a separate (tokens × width) pass. On a 135M model with every linear
layer adapted that is 630 nodes and 210 such passes a step, at sizes where a node's bookkeeping costs about as much
as its arithmetic. :class:`ButterflyLinear` is one node: it saves what the three saved (``x``, the grouped blocks,
``h = x Aᵀ`` and the output), runs the same maths (the same helper functions), and accumulates ``A``'s share of
``x``'s gradient into the rotation's in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hybrid_peft.methods.butterfly import (
    ButterflyRotate,
    _scaled_output,
    keeps_product,
    rotate,
    rotate_backward,
    scaled_linear,
    scaled_linear_backward,
)


class ButterflyLinear(torch.autograd.Function):
    """``s ⊙ ((x M) W0ᵀ) + b [+ c · (x Aᵀ) Bᵀ]`` for ``x (T, in)``, a frozen ``W0`` and the grouped blocks of ``M``;
    ``A``/``B`` may be None (BOFT). Saves ``x``, the blocks, ``h`` and the output (or ``x M W0ᵀ`` where a scale is
    small, as :class:`~hybrid_peft.methods.butterfly.ScaledLinear` does); recomputes the rotation in backward."""

    @staticmethod
    def forward(ctx, x, grouped, weight, scale, bias, lora_a, lora_b, coefficient, small_scale, *plan):  # noqa: ANN001, ANN205
        ctx.keep_product = keeps_product(scale, ctx.needs_input_grad[3], small_scale)
        low_rank_input = None if lora_a is None else F.linear(x, lora_a)  # (T, r)
        out, product, scaled_weight = _scaled_output(
            rotate(x, grouped, plan), weight, scale, bias, low_rank_input, lora_b, coefficient, ctx.keep_product
        )  # the rotated input is not kept: backward recomputes it from x where the blocks need it
        ctx.plan, ctx.coefficient = plan, coefficient
        saved = product if ctx.keep_product else out
        ctx.save_for_backward(x, grouped, weight, scale, bias, lora_a, low_rank_input, scaled_weight, saved)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, grouped, weight, scale, bias, lora_a, low_rank_input, scaled_weight, saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if needs[2]:
            raise RuntimeError("ButterflyLinear needs a frozen base weight; use butterfly_linear_composed to train it")
        has_low_rank = lora_a is not None
        want_rotated = needs[0] or needs[1]
        want_input = has_low_rank and (needs[0] or needs[5])
        grad_rotated, grad_scale, grad_bias, grad_input, grad_b = scaled_linear_backward(
            grad, weight, scale, bias, low_rank_input, scaled_weight, saved,
            keep_product=ctx.keep_product, low_rank_scale=ctx.coefficient,
            want=(want_rotated, needs[3], needs[4], want_input, needs[6]),
        )  # fmt: skip
        grad_x = grad_grouped = grad_a = None
        if want_rotated:
            grad_x, grad_grouped = rotate_backward(
                x, grouped, ctx.plan, grad_rotated, want_input=needs[0], want_blocks=needs[1]
            )
        if has_low_rank:
            if needs[5]:
                grad_a = grad_input.T @ x  # (r, T) @ (T, in)
            if needs[0]:
                grad_x.addmm_(grad_input, lora_a)  # the rotation's gradient is a fresh tensor: added in place
        return grad_x, grad_grouped, None, grad_scale, grad_bias, grad_a, grad_b, None, None, *([None] * len(ctx.plan))


def butterfly_linear_composed(
    x: torch.Tensor,
    grouped: torch.Tensor,
    plan: Sequence[torch.Tensor | None],
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    coefficient: torch.Tensor | float = 0.0,
    small_scale: bool | None = None,
) -> torch.Tensor:
    """The same maths as three autograd nodes (rotation, low-rank projection, scaled linear): the reference
    :class:`ButterflyLinear` is tested against, and the path for a trainable base weight."""
    rotated = ButterflyRotate.apply(x, grouped, *plan)
    low_rank_input = None if lora_a is None else F.linear(x, lora_a)
    return scaled_linear(rotated, weight, scale, bias, low_rank_input, lora_b, coefficient, small_scale)


def butterfly_linear(
    x: torch.Tensor,
    grouped: torch.Tensor,
    plan: Sequence[torch.Tensor | None],
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    coefficient: torch.Tensor | float = 0.0,
    small_scale: bool | None = None,
) -> torch.Tensor:
    """``s ⊙ ((x M) W0ᵀ) + b [+ c · (x Aᵀ) Bᵀ]`` for ``x (T, in)``: one autograd node when the base weight is frozen
    (:class:`ButterflyLinear`), the composed reference when it trains, and the forward maths alone where nothing
    needs a gradient (evaluation, generation: nothing saved, no host read)."""
    if weight.requires_grad:
        return butterfly_linear_composed(
            x, grouped, plan, weight, scale, bias, lora_a, lora_b, coefficient, small_scale
        )
    inputs = (x, grouped, scale, bias, lora_a, lora_b)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        low_rank_input = None if lora_a is None else F.linear(x, lora_a)
        return _scaled_output(rotate(x, grouped, plan), weight, scale, bias, low_rank_input, lora_b, coefficient)[0]
    return ButterflyLinear.apply(x, grouped, weight, scale, bias, lora_a, lora_b, coefficient, small_scale, *plan)
