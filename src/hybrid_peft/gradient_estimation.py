"""Estimating the mean gradient of frozen linear weights, for data-dependent initialisation (LoRA-GA).

For a linear layer ``y = x W0ᵀ`` the gradient of a batch is ``δᵀ x`` (``δ = ∂L/∂y``, ``(T, out)``; ``x`` ``(T, in)``).
Hooks on the target modules see ``x`` in forward and ``δ`` in backward, so no weight ever needs ``requires_grad``.

Two estimators, selected by name:

``exact``   accumulate ``G = Σ δᵀ x`` (``out × in``, fp32), as PEFT's ``preprocess_loraga`` does.
``sketch``  accumulate ``Y = Σ δᵀ (x Ω)`` (``out × k``) and ``Z = Σ (Ψ δᵀ) x`` (``l × in``), never forming ``G``, and
            recover its top singular triplets with the single-pass sketch of Tropp, Yurtsever, Udell & Cevher
            (2017, https://arxiv.org/abs/1609.00048): ``Q = orth(Y)``, ``X = (Ψ Q)⁺ Z``, ``G ≈ Q X``. Memory per
            layer is ``O((in + out)·k)`` instead of ``O(in·out)``; Ω and Ψ are Gaussian, seeded, and shared by all
            layers of the same width (so every data-parallel rank draws the same ones).

Under ``torch.distributed`` each rank accumulates over its own batches, then the accumulators (G, or Y and Z — much
smaller) are summed across ranks, so every rank ends with the same estimate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_peft.errors import HybridPeftError
from hybrid_peft.fileio import atomic_write_with
from hybrid_peft.layer import AdapterLayer, is_supported_base, linear_shape

ESTIMATORS = ("exact", "sketch")


# --- estimates --------------------------------------------------------------------------------------------------


@dataclass
class ExactGradient:
    """The full mean gradient ``G`` (``out × in``, fp32)."""

    total: torch.Tensor
    count: int = 0
    _singular: dict = field(default_factory=dict, repr=False, compare=False)

    def accumulate(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        self.total.addmm_(delta.T, x)  # (out, T) @ (T, in)

    def reduce(self) -> None:
        if _distributed():
            torch.distributed.all_reduce(self.total)

    def state(self) -> dict[str, torch.Tensor]:
        return {"total": self.total}

    def dense(self) -> torch.Tensor:
        return self.total / self.count

    def top_singular(self, k: int, svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U (out, k), S (k,), Vh (k, in))`` of the mean gradient (computed once per ``(k, svd)``)."""
        if (k, svd) not in self._singular:
            self._singular[k, svd] = truncated_svd(self.dense(), k, svd)
        return self._singular[k, svd]

    def state_bytes(self) -> int:
        return self.total.numel() * self.total.element_size()


@dataclass
class SketchGradient:
    """Single-pass sketch ``Y = G Ω``, ``Z = Ψ G`` of the summed gradient, plus the test matrices."""

    omega: torch.Tensor  # (in, k), shared by layers of the same input width
    psi: torch.Tensor  # (l, out), shared by layers of the same output width
    y: torch.Tensor  # (out, k)
    z: torch.Tensor  # (l, in)
    count: int = 0
    _singular: dict = field(default_factory=dict, repr=False, compare=False)

    def accumulate(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        self.y.addmm_(delta.T, x @ self.omega)  # (out, T) @ (T, k)
        self.z.addmm_(self.psi @ delta.T, x)  # (l, T) @ (T, in)

    def reduce(self) -> None:
        if _distributed():
            torch.distributed.all_reduce(self.y)
            torch.distributed.all_reduce(self.z)

    def state(self) -> dict[str, torch.Tensor]:
        return {"y": self.y, "z": self.z}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q (out, k), X (k, in))`` with ``Q X ≈`` the mean gradient, in float64: the recovery is small (k × in)
        and close singular values make the top vectors sensitive to rounding."""
        q, _ = torch.linalg.qr(self.y.double())
        core = torch.linalg.lstsq(self.psi.double() @ q, self.z.double()).solution  # (k, in)
        return q, core / self.count

    def dense(self) -> torch.Tensor:
        q, core = self.factors()
        return (q @ core).float()

    def top_singular(self, k: int, svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if k not in self._singular:
            q, core = self.factors()
            u, s, vh = torch.linalg.svd(core, full_matrices=False)
            self._singular[k] = (q @ u[:, :k]).float(), s[:k].float(), vh[:k].float()
        return self._singular[k]

    def state_bytes(self) -> int:
        """Bytes of this layer's accumulators plus its share of the (shared) test matrices."""
        own = self.y.numel() + self.z.numel()
        return (own + self.omega.numel() + self.psi.numel()) * self.y.element_size()


GradientEstimate = ExactGradient | SketchGradient


def truncated_svd(matrix: torch.Tensor, k: int, svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets. ``svd="lowrank"`` is PEFT's routine (``torch.svd_lowrank``, q = 2k, 4 iterations),
    randomised: with the same torch seed it reproduces PEFT's factors exactly."""
    matrix = matrix.float()
    if svd == "lowrank":
        u, s, v = torch.svd_lowrank(matrix, q=min(2 * k, min(matrix.shape)), niter=4)
        return u[:, :k], s[:k], v.T[:k]
    if svd != "exact":
        raise ValueError(f"svd must be 'exact' or 'lowrank', got {svd!r}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def sketch_size(rank: int, oversampling: int) -> tuple[int, int]:
    """``(k, l)``: sketch columns ``k = oversampling · 2r`` and co-range rows ``l = 2k + 1`` (Tropp et al.)."""
    k = oversampling * 2 * rank
    return k, 2 * k + 1


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --- the hooks ---------------------------------------------------------------------------------------------------


class _GradientTap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands ``δ`` to a callback. The ``anchor`` (a scalar that requires
    grad) puts the output in the autograd graph even when every weight is frozen."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor, callback: Callable) -> torch.Tensor:  # noqa: ANN001
        ctx.callback = callback
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        callback, ctx.callback = ctx.callback, None  # the node outlives backward; the captured input must not
        callback(grad)
        return grad, None, None


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    output = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise HybridPeftError(
            "the model returned no loss for a batch; include labels in each batch "
            "or pass loss_fn=(model, batch) -> loss"
        )
    return loss


def resolve_target_modules(model: nn.Module, targets: Iterable[str] | None) -> dict[str, nn.Module]:
    """The modules to estimate for: the given names, else every attached LoRA-GA (or other data-initialised) adapter."""
    if targets is None:
        modules = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer) and m.needs_gradient_init}
        if not modules:
            raise HybridPeftError(
                "no targets: attach a LoRAGAConfig first (attach(model, LoRAGAConfig(...))) or pass targets=[...]"
            )
        return modules
    modules = {}
    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise HybridPeftError(f"target {name!r} is not a module of {type(model).__name__}") from exc
        if not (isinstance(module, AdapterLayer) or is_supported_base(module)):
            raise HybridPeftError(f"target {name!r} is a {type(module).__name__}, not a linear layer")
        modules[name] = module
    return modules


def _width(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, AdapterLayer):
        return module.out_features, module.in_features
    return linear_shape(module)


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    targets: Iterable[str] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    estimator: str = "exact",
    rank: int = 8,
    oversampling: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, GradientEstimate]:
    """Mean gradient of ``loss_fn(model, batch)`` over ``batches`` w.r.t. each target's weight, without ever making
    a weight require grad. Returns ``{module name: estimate}``; the model's parameters and mode are left as they were.

    Args:
        batches: any iterable; each item is passed to ``loss_fn`` (default: ``model(**batch).loss``).
        targets: module names; default every attached adapter that wants a gradient initialisation (LoRA-GA).
        estimator: ``"exact"`` or ``"sketch"`` (see the module docstring).
        rank, oversampling: the sketch keeps ``k = oversampling · 2·rank`` columns (ignored by ``exact``).
        seed: seeds the sketch's Gaussian test matrices (identical on every data-parallel rank).
    """
    if estimator not in ESTIMATORS:
        raise HybridPeftError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
    modules = resolve_target_modules(model, targets)
    loss_fn = loss_fn or _default_loss
    device = next(model.parameters()).device
    k, rows = sketch_size(rank, oversampling)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    test_matrices: dict[tuple[str, int], torch.Tensor] = {}

    def test_matrix(kind: str, width: int, rows: int) -> torch.Tensor:
        # Drawn in a fixed order (sorted widths) from one seeded CPU generator: identical on every rank.
        if (kind, width) not in test_matrices:
            shape = (width, rows) if kind == "omega" else (rows, width)
            test_matrices[(kind, width)] = (torch.randn(shape, generator=generator) / math.sqrt(rows)).to(device)
        return test_matrices[(kind, width)]

    estimates: dict[str, GradientEstimate] = {}
    for name in sorted(modules, key=lambda n: _width(modules[n])):
        out_features, in_features = _width(modules[name])
        if estimator == "exact":
            estimates[name] = ExactGradient(torch.zeros(out_features, in_features, device=device))
        else:
            estimates[name] = SketchGradient(
                omega=test_matrix("omega", in_features, min(k, in_features)),
                psi=test_matrix("psi", out_features, min(rows, out_features)),
                y=torch.zeros(out_features, min(k, in_features), device=device),
                z=torch.zeros(min(rows, out_features), in_features, device=device),
            )
    estimates = {name: estimates[name] for name in modules}  # model order

    anchor = torch.zeros((), device=device, requires_grad=True)
    handles = []

    def make_hook(estimate: GradientEstimate):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            pending = [args[0].detach()]  # the layer's input, held only until its gradient arrives

            def on_backward(delta: torch.Tensor) -> None:
                x = pending.pop()
                estimate.accumulate(x.reshape(-1, x.shape[-1]).float(), delta.reshape(-1, delta.shape[-1]).float())

            return _GradientTap.apply(output, anchor, on_backward)

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(make_hook(estimates[name])))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    count = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)  # nothing but the taps needs a gradient
        model.train()
        iterator: Iterable[Any] = batches
        if progress:
            from tqdm.auto import tqdm

            # on a terminal only (disable=None), with an ETA; the number of batches is known when it is a list
            total = len(batches) if hasattr(batches, "__len__") else None
            iterator = tqdm(
                batches, desc=f"LoRA-GA: estimating gradients ({estimator})", unit="batch", total=total, disable=None
            )
        for batch in iterator:
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                    raise HybridPeftError(
                        "the loss does not require grad, so no gradient can be estimated: compute it from the model's "
                        "output without .detach(), .item() or torch.no_grad()"
                    )
                if not torch.isfinite(loss):
                    raise HybridPeftError(f"the loss of batch {count} is {loss.item()}; check the data and the model")
                loss.backward()
            del loss  # frees this batch's graph before the next forward
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise HybridPeftError("no batches: estimate_gradients needs at least one batch of training data")
    total = torch.tensor(float(count), device=device)
    if _distributed():
        torch.distributed.all_reduce(total)
    for name, estimate in estimates.items():
        estimate.reduce()
        estimate.count = int(total.item())
        if not all(torch.isfinite(t).all() for t in estimate.state().values()):
            raise HybridPeftError(f"{name}: the accumulated gradient is not finite (overflow or NaN in the data?)")
    return estimates


# --- cache -----------------------------------------------------------------------------------------------------


def save_estimates(estimates: dict[str, GradientEstimate], path: str | os.PathLike) -> None:
    """Write estimates atomically to a safetensors file (gradient cache)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    kinds = {}
    for name, estimate in estimates.items():
        kinds[name] = "exact" if isinstance(estimate, ExactGradient) else "sketch"
        for key, tensor in estimate.state().items():
            tensors[f"{name}::{key}"] = tensor.detach().cpu().contiguous()
        tensors[f"{name}::count"] = torch.tensor([estimate.count])
        if isinstance(estimate, SketchGradient):  # test matrices are shared by width: store each once
            tensors[f"omega::{estimate.omega.shape[0]}"] = estimate.omega.detach().cpu().contiguous()
            tensors[f"psi::{estimate.psi.shape[1]}"] = estimate.psi.detach().cpu().contiguous()
    metadata = {"kinds": ",".join(f"{n}={k}" for n, k in kinds.items())}
    atomic_write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_estimates(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, GradientEstimate]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        kinds = dict(item.split("=") for item in handle.metadata()["kinds"].split(","))
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    estimates: dict[str, GradientEstimate] = {}
    for name, kind in kinds.items():
        count = int(tensors[f"{name}::count"][0])
        if kind == "exact":
            estimates[name] = ExactGradient(tensors[f"{name}::total"], count)
        else:
            y, z = tensors[f"{name}::y"], tensors[f"{name}::z"]
            estimates[name] = SketchGradient(
                omega=tensors[f"omega::{z.shape[1]}"], psi=tensors[f"psi::{y.shape[0]}"], y=y, z=z, count=count
            )
    return estimates
