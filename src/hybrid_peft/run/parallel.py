"""How the processes of a run share the work, as one strategy per kind, so the loop and the recipe never ask which:

==========  ======================================================================================================
replicated  one process, or data parallel through ``accelerate`` (DDP): every process holds the whole model and
            gradients are averaged before the optimiser step (and before the hybrid's mixing rule)
sharded     PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, ``--fsdp``): every decoder block and then the
            model are sharded over the processes, parameters are gathered per block for its forward and backward,
            gradients are reduce-scattered (averaged); with CUDA bf16, a mixed-precision policy computes in bf16
            and reduces in fp32. On CPU (gloo) and CUDA (NCCL) alike
==========  ======================================================================================================

Both take the process group ``accelerate`` sets up under ``torchrun`` / ``accelerate launch``. Checkpoints are
written from a full view (:meth:`Parallelism.full_parameters`: the adapter's tensors gathered to every process)
and the optimiser state is saved and loaded through ``torch.distributed.checkpoint``'s full state dict, so a
checkpoint is the same whatever wrote it: a run can resume with FSDP or without, on another number of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_peft.errors import ConfigError
from hybrid_peft.run.checkpoint import validate_optimizer_state


class Parallelism:
    """Replicated: one process, or DDP through ``accelerate``."""

    sharded = False
    name = "replicated"

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        self.device = accelerator.device

    @property
    def distributed_type(self) -> str:
        return str(self.accelerator.distributed_type.value)

    @property
    def evaluates_on_every_process(self) -> bool:
        """Whether evaluation must run on every process (sharded parameters need every process's part)."""
        return False

    def shard(self, model: nn.Module) -> nn.Module:
        """Called before the optimiser is built."""
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Called after the optimiser is built; returns what the loop trains."""
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def mean(self, value: torch.Tensor) -> float:
        return self.accelerator.reduce(value.detach(), reduction="mean").item()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(params, max_norm)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(value.to(self.device))

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module) -> Iterator[None]:
        """Inside, every process holds the model's parameters whole (to save them, or to checksum them)."""
        yield

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser's full state keyed by parameter name, as ``torch.distributed.checkpoint`` writes it (on
        every process; a collective under FSDP)."""
        names = _parameter_names(model, optimizer)
        state = optimizer.state_dict()
        return {
            "state": {names[index]: values for index, values in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], step: int, where: Path
    ) -> None:
        """Load a checkpoint's name-keyed optimiser state, validated first against the parameters
        (:func:`~hybrid_peft.run.checkpoint.validate_optimizer_state`)."""
        names = _parameter_names(model, optimizer)
        validate_optimizer_state(state, _trained_parameters(model, optimizer), step, where)
        indices = {name: index for index, name in names.items()}
        optimizer.load_state_dict(
            {
                "state": {indices[name]: values for name, values in state["state"].items()},
                "param_groups": [{**g, "params": [indices[n] for n in g["params"]]} for g in state["param_groups"]],
            }
        )

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of the model whole, on the CPU (full fine-tuning's checkpoints and result)."""
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


class Sharded(Parallelism):
    """FSDP2: every decoder block, then the model, ``fully_shard``-ed over the processes."""

    sharded = True
    name = "fsdp"

    @property
    def distributed_type(self) -> str:
        return "FSDP2"

    @property
    def evaluates_on_every_process(self) -> bool:
        return True

    def shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world,))
        policy = MixedPrecisionPolicy()
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        block_classes = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
        if not blocks:
            raise ConfigError(
                f"--fsdp: {type(model).__name__} names no decoder block class (_no_split_modules), so there is "
                "nothing to shard block by block; train it without --fsdp"
            )
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # DTensor-aware: the norm covers every shard

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.unshard()
        try:
            yield
        finally:
            for module in sharded:
                module.reshard()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], step: int, where: Path
    ) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        validate_optimizer_state(state, _trained_parameters(model, optimizer), step, where)
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.contiguous() for k, v in state.items()}


def _trained_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's parameters by name (their full shapes, sharded or not)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The optimiser's parameter indices (its state dict's keys) and the parameters' names in ``model``."""
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    return {index: names[id(p)] for index, p in enumerate(ordered)}


def parallelism_for(fsdp: bool, accelerator: Any) -> Parallelism:
    """The strategy for a run; ``--fsdp`` outside a process group is an error that says how to launch."""
    if not fsdp:
        return Parallelism(accelerator)
    if "WORLD_SIZE" not in os.environ or not torch.distributed.is_initialized():
        raise ConfigError(
            "--fsdp shards the model over processes, and this is a plain single process: launch it with "
            "torchrun --nproc_per_node N -m hybrid_peft.cli train --fsdp ... (N processes on this machine; see the "
            "README for several machines)"
        )
    return Sharded(accelerator)
