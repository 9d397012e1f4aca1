"""The butterfly rotation's maths as free functions: BOFT's permutations, Cayley blocks, the grouped block
products, the memory-lean autograd functions (:class:`ButterflyRotate`, :class:`ScaledLinear`) and the plain
references the tests compare them with. The BOFT layer is in ``methods/boft.py``, the branch both BOFT and the hybrid
share in ``methods/rotations.py``.

The training path never builds a dense ``in×in`` matrix: each factor is an index gather plus one batched product of
its blocks (folded into dense groups about 16 wide, which the BLAS runs far faster than many b×b products),
consecutive gathers are folded into one, and a custom autograd function recomputes the intermediates in backward
instead of saving them (it keeps only ``x`` and the small grouped ``Q``). The dense ``M`` is built only for merging
and for the reference path the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_peft.errors import ConfigError


def _blocks_valid(features: int, block_size: int, butterfly_factors: int) -> bool:
    if block_size <= 0 or features % block_size:
        return False
    if butterfly_factors == 1:
        return True
    span = block_size * 2 ** (butterfly_factors - 1)
    return block_size % 2 == 0 and (features // block_size) % 2 == 0 and features % span == 0


def resolve_blocks(features: int, block_size: int, block_num: int, butterfly_factors: int) -> tuple[int, int]:
    """``(b, N)`` for a layer of ``features`` inputs, with PEFT's constraints; a clear error says what would work."""
    if block_num:
        if features % block_num:
            raise ConfigError(f"block_num: {block_num} does not divide the input width {features}")
        block_size = features // block_num
    if not _blocks_valid(features, block_size, butterfly_factors):
        valid = [d for d in range(1, min(features, 256) + 1) if _blocks_valid(features, d, butterfly_factors)]
        why = (
            f"{block_size} does not divide the input width {features}"
            if features % block_size
            else f"with {butterfly_factors} butterfly factors, b and N={features // block_size} must be even and "
            f"b·2^(m−1)={block_size * 2 ** (butterfly_factors - 1)} must divide {features}"
        )
        field = "block_num" if block_num else "block_size"
        suggestion = f"block sizes that work: {valid[:12]}" if valid else "use fewer butterfly_factors"
        raise ConfigError(f"{field}: {why}; {suggestion}")
    return block_size, features // block_size


def butterfly_permutation(features: int, blocks: int, half_block: int, butterfly_factors: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm``: within each of ``blocks`` chunks, reorder sub-blocks of ``half_block``
    features as evens then odds (the butterfly). Identity when ``butterfly_factors`` is 1."""
    if butterfly_factors == 1:
        return torch.arange(features)
    chunk = features // blocks
    groups = chunk // half_block
    order = torch.cat([torch.arange(0, groups, 2), torch.arange(1, groups, 2)])
    within = (order[:, None] * half_block + torch.arange(half_block)).reshape(-1)  # (chunk,)
    return (torch.arange(0, features, chunk)[:, None] + within).reshape(-1)


def butterfly_permutations(features: int, block_size: int, butterfly_factors: int) -> list[torch.Tensor]:
    """``perm_i`` for i = 0..m−1, where ``P_i[j, perm_i[j]] = 1`` as in PEFT."""
    block_num = features // block_size
    return [
        butterfly_permutation(features, block_num // 2**i, block_size // 2, butterfly_factors)
        for i in range(butterfly_factors)
    ]


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    matrix = torch.zeros(len(perm), len(perm))
    matrix[torch.arange(len(perm)), perm] = 1.0
    return matrix


def skew_symmetric(free: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(..., b(b−1)/2)`` free numbers -> ``(..., b, b)`` skew-symmetric matrices (upper triangle = ``free``)."""
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=free.device)
    upper = free.new_zeros(*free.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = free
    return upper - upper.transpose(-1, -2)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """``(I + K)⁻¹ (I − K)``: orthogonal for skew-symmetric ``K``; batched over leading dimensions."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew)


def block_multiply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x (T, N·b)`` times ``blockdiag(blocks)`` with ``blocks (N, b, b)``, as one batched product: the plain
    reference for the grouped products of :class:`ButterflyRotate` (which pass it dense groups of blocks)."""
    n, b, _ = blocks.shape
    return torch.bmm(x.view(-1, n, b).transpose(0, 1), blocks).transpose(0, 1).reshape(x.shape)  # (N,T,b)@(N,b,b)


# Blocks are multiplied in dense groups about this wide: a batched product of many tiny b×b matrices is bound by the
# per-matrix cost of the BLAS call, not by arithmetic; folding four 4×4 blocks into one 16×16 block-diagonal matrix
# does 4× the arithmetic in a quarter of the products and runs 2–4× faster on CPU, the rotation's forward and
# backward about 2× (benchmarks/block_product.py; 16 was the fastest width or within 10% of it at every layer width
# of the default models). The zeros between blocks contribute exact zeros.
GROUP_WIDTH = 16


def group_size(block_num: int, block_size: int, width: int | None = None) -> int:
    """How many consecutive ``block_size`` blocks to fold into one dense block: the largest divisor of
    ``block_num`` with ``group · block_size ≤ width`` (default :data:`GROUP_WIDTH`; 1 when blocks are that wide)."""
    largest = max((width or GROUP_WIDTH) // block_size, 1)
    return max(g for g in range(1, min(largest, block_num) + 1) if block_num % g == 0)


def group_blocks(blocks: torch.Tensor, group: int) -> torch.Tensor:
    """``(N, b, b)`` -> ``(N/G, G·b, G·b)``: each run of ``G`` consecutive blocks as one block-diagonal matrix."""
    n, b, _ = blocks.shape
    dense = blocks.new_zeros(n // group, group, b, group, b)
    dense.diagonal(dim1=1, dim2=3).copy_(blocks.view(n // group, group, b, b).permute(0, 2, 3, 1))
    return dense.view(n // group, group * b, group * b)


def ungroup_blocks(dense: torch.Tensor, group: int) -> torch.Tensor:
    """The diagonal ``b × b`` blocks of ``(N/G, G·b, G·b)`` as ``(N, b, b)``; inverse of :func:`group_blocks`."""
    groups, width, _ = dense.shape
    b = width // group
    diagonal = dense.view(groups, group, b, group, b).diagonal(dim1=1, dim2=3)  # (N/G, b, b, G)
    return diagonal.permute(0, 3, 1, 2).reshape(groups * group, b, b)


def butterfly_dense(rotations: torch.Tensor, perms: list[torch.Tensor]) -> torch.Tensor:
    """The dense ``M = M_{m−1} ··· M_0`` (``in × in``): for merging and for reference tests only."""
    factors = [
        permutation_matrix(perm).to(rotations)
        @ torch.block_diag(*rotations[i])
        @ permutation_matrix(perm).to(rotations).T
        for i, perm in enumerate(perms)
    ]
    dense = factors[0]
    for factor in factors[1:]:
        dense = factor @ dense
    return dense


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse


def gather_plan(perms: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Index gathers for ``x ↦ x M``: ``x M_i = (x[:, perm_i⁻¹] · blockdiag(Q_i))[:, perm_i]``, factors applied
    m−1 first. Gathers between two block products are folded into one; identities become ``None``.
    Returns ``m + 1`` entries: before the first product, between products, after the last."""
    order = list(reversed(range(len(perms))))
    plan: list[torch.Tensor] = [inverse_permutation(perms[order[0]])]
    for previous, following in zip(order, order[1:], strict=False):
        plan.append(perms[previous][inverse_permutation(perms[following])])
    plan.append(perms[order[-1]])
    return [None if torch.equal(idx, torch.arange(len(idx))) else idx for idx in plan]


def _gather(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(-1, index)


def butterfly_rotate_plain(x: torch.Tensor, rotations: torch.Tensor, plan: list[torch.Tensor | None]) -> torch.Tensor:
    """``x M`` with plain autograd (saves every intermediate); the reference for :class:`ButterflyRotate`."""
    m = rotations.shape[0]
    for step, i in enumerate(reversed(range(m))):
        x = block_multiply(_gather(x, plan[step]), rotations[i])
    return _gather(x, plan[m])


def group_factors(rotations: torch.Tensor) -> torch.Tensor:
    """``(m, N, b, b)`` blocks -> ``(m, N/G, G·b, G·b)``: each factor's blocks folded into the dense groups
    (:func:`group_size`, :func:`group_blocks`) that :class:`ButterflyRotate` multiplies by."""
    m, n, b, _ = rotations.shape
    group = group_size(n, b)
    return group_blocks(rotations.reshape(m * n, b, b), group).view(m, n // group, group * b, group * b)


def rotate(x: torch.Tensor, grouped: torch.Tensor, plan: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``x M`` for ``x (T, in)`` and the grouped blocks ``(m, N/G, G·b, G·b)``, without autograd: the forward maths of
    :class:`ButterflyRotate` and of the one-node butterfly layer (methods/fused.py)."""
    m = grouped.shape[0]
    for step, i in enumerate(reversed(range(m))):
        x = block_multiply(_gather(x, plan[step]), grouped[i])
    return _gather(x, plan[m])


def rotate_backward(
    x: torch.Tensor,
    grouped: torch.Tensor,
    plan: Sequence[torch.Tensor | None],
    grad: torch.Tensor,
    *,
    want_input: bool,
    want_blocks: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of :func:`rotate` for its input (a fresh tensor) and its grouped blocks (dense: every entry of
    each group), from ``x`` and the blocks alone: the intermediates are recomputed, not saved."""
    m, groups, width, _ = grouped.shape
    order = list(reversed(range(m)))
    # Recompute the input of each block product (the last product's output is not needed).
    inputs = [_gather(x, plan[0])]
    for step, i in enumerate(order[:-1]):
        inputs.append(_gather(block_multiply(inputs[-1], grouped[i]), plan[step + 1]))
    grad_grouped = torch.empty_like(grouped) if want_blocks else None
    g = _gather(grad, None if plan[m] is None else inverse_permutation(plan[m]))
    for step in reversed(range(m)):
        i = order[step]
        if grad_grouped is not None:  # Σ_t x_nᵀ g_n per dense group: (N/G, G·b, T) @ (N/G, T, G·b)
            torch.bmm(
                inputs[step].reshape(-1, groups, width).permute(1, 2, 0),
                g.reshape(-1, groups, width).transpose(0, 1),
                out=grad_grouped[i],
            )
        if step == 0 and not want_input:
            break  # x's gradient is not wanted: skip the last product
        g = block_multiply(g, grouped[i].transpose(-1, -2))
        if plan[step] is not None:
            g = _gather(g, inverse_permutation(plan[step]))
    return (g if want_input else None), grad_grouped


class ButterflyRotate(torch.autograd.Function):
    """``x M`` for ``x (T, in)`` and the grouped blocks ``(m, N/G, G·b, G·b)`` of :func:`group_factors`; saves only
    ``x`` and those blocks, recomputes the intermediates in backward. The gradient it returns for the groups is the
    dense one (every entry of each ``G·b × G·b`` group); :func:`group_blocks`' own backward, or the batched
    builder's, keeps the diagonal blocks. :func:`butterfly_rotate_plain` is the reference it is tested against."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grouped: torch.Tensor, *plan: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.plan = plan
        ctx.save_for_backward(x, grouped)  # the grouped blocks (in·G·b numbers per factor), not rebuilt in backward
        return rotate(x, grouped, plan)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, grouped = ctx.saved_tensors
        want_input, want_blocks = ctx.needs_input_grad[:2]
        grad_x, grad_grouped = rotate_backward(
            x, grouped, ctx.plan, grad, want_input=want_input, want_blocks=want_blocks
        )
        return (grad_x, grad_grouped, *([None] * len(ctx.plan)))


def scaled_linear_plain(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    low_rank_input: torch.Tensor | None = None,
    low_rank_weight: torch.Tensor | None = None,
    low_rank_scale: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """``y = (x W0ᵀ) ⊙ s + b [+ c · h Bᵀ]`` with plain autograd: the reference for :class:`ScaledLinear`."""
    out = F.linear(x.to(weight.dtype), weight).to(scale.dtype) * scale
    if bias is not None:
        out = out + bias.to(out.dtype)
    if low_rank_input is not None:
        out = out + low_rank_scale * F.linear(low_rank_input, low_rank_weight)
    return out


# Below this |s| the output-based recovery of x W0ᵀ loses precision, so the product itself is kept instead.
SMALL_SCALE = 1e-3


def _scaled_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    low_rank_input: torch.Tensor | None,
    low_rank_weight: torch.Tensor | None,
    low_rank_scale: torch.Tensor | float,
    keep_product: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:class:`ScaledLinear`'s forward maths: the output, the base product ``x W0ᵀ`` (None unless ``keep_product``:
    the output is then computed in the product's own storage) and ``c · B``."""
    product = F.linear(x.to(weight.dtype), weight).to(scale.dtype)
    if keep_product:
        out = product * scale if bias is None else torch.addcmul(bias.to(scale.dtype), product, scale)
    else:
        out = product.mul_(scale) if bias is None else torch.addcmul(bias.to(scale.dtype), product, scale, out=product)
        product = None
    scaled_weight = None
    if low_rank_input is not None:
        scaled_weight = low_rank_scale * low_rank_weight
        out.addmm_(low_rank_input, scaled_weight.T)  # out is ours: fused, no (T, out) temporary
    return out, product, scaled_weight


def keeps_product(scale: torch.Tensor, scale_trains: bool, small_scale: bool | None) -> bool:
    """Whether a scaled linear keeps ``x W0ᵀ`` for the scale's gradient rather than recovering it from the output:
    only where the scale trains and some ``|s|`` is below :data:`SMALL_SCALE` (read from the scale, a host read and a
    GPU sync, when the caller does not know)."""
    if not scale_trains:
        return False
    if small_scale is None:
        small_scale = bool((scale.abs() < SMALL_SCALE).any())
    return bool(small_scale)


class ScaledLinear(torch.autograd.Function):
    """:func:`scaled_linear_plain` for ``x (T, in)`` and a frozen ``W0``, saving the *output* ``y`` rather than the
    product ``z = x W0ᵀ`` that the scale's gradient needs. That gradient is a column sum, so it is recovered from
    ``y = s ⊙ z + b + c·h Bᵀ`` without rebuilding ``z``::

        ∂L/∂s = Σ_t g ⊙ z = (Σ_t g ⊙ y − b ⊙ Σ_t g − c · rowsum(B ⊙ gᵀh)) / s

    where ``gᵀh`` is the product B's gradient needs anyway: no (T, out) temporary beyond ``g ⊙ y``. When the next
    operation saves ``y`` too (an activation, a product, attention's values), the two share storage, so the scale
    costs no activation memory. The low-rank term is the hybrid's LoRA branch (``h = x Aᵀ``, ``c = λ·s_lora``, no
    gradient for ``c``); ``c`` is folded into the small ``B`` rather than applied to (T, out) tensors."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, low_rank_input, low_rank_weight, low_rank_scale, small_scale):  # noqa: ANN001, ANN205
        ctx.keep_product = keeps_product(scale, ctx.needs_input_grad[2], small_scale)
        out, product, scaled_weight = _scaled_output(
            x, weight, scale, bias, low_rank_input, low_rank_weight, low_rank_scale, ctx.keep_product
        )
        ctx.save_for_backward(weight, scale, bias, low_rank_input, scaled_weight, product if ctx.keep_product else out)
        ctx.low_rank_scale = low_rank_scale  # a number, or a scalar tensor without gradient
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        needs = ctx.needs_input_grad
        if needs[1]:
            raise RuntimeError("ScaledLinear needs a frozen base weight; use scaled_linear_plain to train it")
        grad_x, grad_scale, grad_bias, grad_input, grad_low_rank = scaled_linear_backward(
            grad,
            *ctx.saved_tensors,
            keep_product=ctx.keep_product,
            low_rank_scale=ctx.low_rank_scale,
            want=(needs[0], needs[2], needs[3], needs[4], needs[5]),
        )
        return grad_x, None, grad_scale, grad_bias, grad_input, grad_low_rank, None, None


def scaled_linear_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    low_rank_input: torch.Tensor | None,
    scaled_weight: torch.Tensor | None,
    saved: torch.Tensor,
    *,
    keep_product: bool,
    low_rank_scale: torch.Tensor | float,
    want: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """:class:`ScaledLinear`'s backward maths: the gradients for ``(x, s, b, h, B)`` where ``want`` says so, from
    what its forward saved (``saved`` is the output, or the product ``x W0ᵀ`` when ``keep_product``)."""
    want_x, want_scale, want_bias, want_input, want_weight = want
    grad_x = grad_scale = grad_bias = grad_input = grad_low_rank = None
    has_low_rank = low_rank_input is not None
    recover = want_scale and not keep_product  # the scale's gradient from the saved output
    # gᵀh (out, r): B's gradient, and the low-rank part of the output the scale's gradient must take out.
    grad_h_product = grad.T @ low_rank_input if has_low_rank and (want_weight or recover) else None
    grad_sum = grad.sum(0) if want_bias or (recover and bias is not None) else None
    buffer = None  # one (T, out) temporary, for g ⊙ y and then g ⊙ s
    if want_scale:
        sums = torch.promote_types(grad.dtype, torch.float32)  # at least fp32: bf16 loses the difference below
        buffer = torch.mul(grad, saved)
        column_sum = buffer.sum(0, dtype=sums)
        if recover:
            if bias is not None:
                column_sum = column_sum - bias.to(sums) * grad_sum.to(sums)
            if has_low_rank:
                column_sum = column_sum - (scaled_weight * grad_h_product).sum(1, dtype=sums)
            column_sum = column_sum / scale.to(sums)
        grad_scale = column_sum.to(scale.dtype)
    if want_x:
        scaled_grad = grad * scale if buffer is None else torch.mul(grad, scale, out=buffer)
        grad_x = (scaled_grad.to(weight.dtype) @ weight).to(grad.dtype)
    if want_bias:
        grad_bias = grad_sum.to(bias.dtype)
    if has_low_rank:
        if want_input:
            grad_input = grad @ scaled_weight  # (T, out) @ (out, r)
        if want_weight:
            grad_low_rank = low_rank_scale * grad_h_product
    return grad_x, grad_scale, grad_bias, grad_input, grad_low_rank


def scaled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    low_rank_input: torch.Tensor | None = None,
    low_rank_weight: torch.Tensor | None = None,
    low_rank_scale: torch.Tensor | float | None = None,
    small_scale: bool | None = None,
) -> torch.Tensor:
    """The fast path when the base weight is frozen, else the plain one (same maths). Where nothing needs a gradient
    (evaluation, generation) the fast path's forward runs alone: nothing saved, no host read. ``small_scale``:
    whether any ``|s|`` is below :data:`SMALL_SCALE`, if the caller knows (the rotation bank reads it for every
    layer at once); else the fast path reads it itself."""
    if weight.requires_grad:
        scale_term = 0.0 if low_rank_scale is None else low_rank_scale
        return scaled_linear_plain(x, weight, scale, bias, low_rank_input, low_rank_weight, scale_term)
    coefficient = low_rank_scale if low_rank_scale is not None else 0.0
    trains = (x, scale, bias, low_rank_input, low_rank_weight)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in trains)):
        return _scaled_output(x, weight, scale, bias, low_rank_input, low_rank_weight, coefficient)[0]
    return ScaledLinear.apply(x, weight, scale, bias, low_rank_input, low_rank_weight, coefficient, small_scale)


def multiplicative_dropout(rotations: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's BOFT dropout: in one random factor, replace ``int(p·N)`` random blocks by the identity."""
    m, n, b, _ = rotations.shape
    count = int(p * n)
    if count == 0:
        return rotations
    mask = torch.zeros(m, n, 1, 1, device=rotations.device, dtype=rotations.dtype)
    mask[torch.randint(0, m, (1,)).item(), torch.randperm(n, device=rotations.device)[:count]] = 1.0
    eye = torch.eye(b, device=rotations.device, dtype=rotations.dtype)
    return (1 - mask) * rotations + mask * eye


def register_gather_plan(module: nn.Module, perms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Store the gather plan of ``perms`` on ``module`` as non-persistent buffers ``_gather_0..m`` (derived from the
    shape, so never saved; they follow the module across devices). Returns ``perms``."""
    device = next(module.parameters()).device
    for k, index in enumerate(gather_plan(perms)):
        module.register_buffer(f"_gather_{k}", None if index is None else index.to(device), persistent=False)
    return perms


def reverse_plan(plan: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gather plan of ``Mᵀ``: the same gathers in reverse order, each inverted."""
    return [None if index is None else inverse_permutation(index) for index in reversed(plan)]


def boft_parameter_count(in_features: int, out_features: int, block_size: int, butterfly_factors: int) -> int:
    """Trainable numbers of one adapted ``in → out`` layer: the skew parts of ``m × in/b`` blocks and the scale."""
    return butterfly_factors * (in_features // block_size) * math.comb(block_size, 2) + out_features
