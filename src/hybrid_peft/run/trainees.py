"""What is trained, as one strategy per kind of trainee, so that the training loop never asks which kind it has:

============  =====================================================================================================
own adapter   hybrid-peft's methods (``lora``, ``lora-ga``, ``boft``, ``unitary``, ``hybrid``) and compositions of them
              (``hybrid-unitary``: unitary on attention, the hybrid on the rest): attached in place; a new
              classification head trains fully and is saved with the adapter; LoRA-GA (and the hybrid's low-rank
              branch) initialised from a gradient estimate; checkpoints and the result are adapter folders
full          full fine-tuning: every parameter trains; checkpoints are one safetensors file, the result a
              ``save_pretrained`` folder
PEFT peer     PEFT 0.21's own methods as baselines (``peft-lora`` ..., see ``peers.py``): wrapped by PEFT after the
              first evaluation; no checkpoints
============  =====================================================================================================

Each run goes through the same stages: ``attach`` (before the first evaluation), ``initialise`` (after it, with
the batches for a gradient estimate), or ``restore`` from a checkpoint instead of both; ``save_weights`` /
``load_weights`` for checkpoints; ``save_result`` at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from hybrid_peft import peers
from hybrid_peft.adapters import attach, initialise_adapters
from hybrid_peft.config import AdapterConfig
from hybrid_peft.errors import ConfigError
from hybrid_peft.export import save_merged
from hybrid_peft.losses import chunked_causal_lm_loss
from hybrid_peft.registry import available_methods
from hybrid_peft.serialization import load_adapter, save_adapter

if TYPE_CHECKING:
    from hybrid_peft.run.config import TrainConfig

FULL = "full"
Batches = Callable[[], list[dict[str, torch.Tensor]]]
CLASSIFIER_HEADS = ("classifier", "score")


class Trainee(Protocol):
    resumable: bool
    needs_model_state: bool  # saves the whole model's state (gathered whole first, when sharded)

    def default_learning_rate(self, config: TrainConfig) -> float: ...

    def validate(self, config: TrainConfig) -> None: ...

    def attach(self, model: nn.Module, config: TrainConfig, classifier: bool) -> nn.Module: ...

    def initialise(self, model: nn.Module, config: TrainConfig, classifier: bool, batches: Batches) -> nn.Module: ...

    def restore(self, model: nn.Module, checkpoint: Path) -> nn.Module: ...

    def save_weights(self, model: nn.Module, folder: Path, model_state: dict | None = None) -> None: ...

    def save_result(
        self, model: nn.Module, output_dir: Path, tokenizer: Any, model_state: dict | None = None
    ) -> None: ...

    def save_merged(self, model: nn.Module, output_dir: Path, tokenizer: Any) -> None: ...


def _head(model: nn.Module) -> str | None:
    return next((name for name in CLASSIFIER_HEADS if getattr(model, name, None) is not None), None)


class OwnAdapter:
    """One of hybrid-peft's methods, attached in place."""

    resumable = True
    needs_model_state = False

    def validate(self, config: TrainConfig) -> None:
        self.adapter_configs(config)  # the method name and its options, checked before any model loads

    def default_learning_rate(self, config: TrainConfig) -> float:
        return self.adapter_configs(config)[-1].default_learning_rate

    def adapter_configs(self, config: TrainConfig) -> list[AdapterConfig]:
        """The adapter(s) to attach, in order."""
        return [AdapterConfig.from_dict({"method": config.method, **config.adapter})]

    def attach(self, model: nn.Module, config: TrainConfig, classifier: bool) -> nn.Module:
        for adapter_config in self.adapter_configs(config):
            attach(model, adapter_config)
        head = _head(model) if classifier else None
        for p in getattr(model, head).parameters() if head else []:
            p.requires_grad_(True)  # a new head is trained fully and saved with the adapter
        return model

    def initialise(self, model: nn.Module, config: TrainConfig, classifier: bool, batches: Batches) -> nn.Module:
        chunked = (
            config.loss_chunk_tokens
        )  # a data-dependent start's backward then never builds the whole logits either
        loss_fn = (lambda m, batch: chunked_causal_lm_loss(m, batch, chunked)) if chunked else None
        return initialise_adapters(model, batches, loss_fn=loss_fn, progress=True)  # a bar on a terminal only

    def restore(self, model: nn.Module, checkpoint: Path) -> nn.Module:
        return load_adapter(model, checkpoint / "adapter", trainable=True)

    def save_weights(self, model: nn.Module, folder: Path, model_state: dict | None = None) -> None:
        save_adapter(model, folder / "adapter")

    def save_result(self, model: nn.Module, output_dir: Path, tokenizer: Any, model_state: dict | None = None) -> None:
        save_adapter(model, output_dir / "adapter")

    def save_merged(self, model: nn.Module, output_dir: Path, tokenizer: Any) -> None:
        save_merged(model, output_dir / "merged", tokenizer=tokenizer)


class UnitaryHybrid(OwnAdapter):
    """``hybrid-unitary``, the paper's whole system as one method: the unitary adapter (uRNN constraints) on the
    attention projections and the hybrid on every other linear layer (the MLP). The adapter options are the
    hybrid's, plus ``unitary: {...}`` for the unitary part. Both parts train at the run's rate; the unitary part's
    ``lr_scale`` sets a multiple of it (``unitary: {lr_scale: 3}``).

    Until 2026-12-07 the unitary part trained at 10× the run's rate, on the belief that orthogonal methods need about
    ten times LoRA's rate. Measured, the unitary adapter alone chose 1–3× LoRA's rate on the three tasks of
    BENCHMARKS.md (FLORES 1×, the math profile 1.1×, SST-2/SmolLM2 3×), and at 10× the composition's sweep had to
    pick a rate that suits the unitary part and starves the hybrid: on the math profile it chose 4.5e-4, a tenth of
    the hybrid's 4.5e-3, and learnt the least of every method there; at 1× it validated 0.8097 against 0.8391 (seed 0,
    at 4.5e-3). So the unitary part keeps its own default, 1; runs recorded at 10× keep it in their resolved options,
    and the research profiles that reproduce them pin it (``unitary: {lr_scale: 10}``)."""

    NAME = "hybrid-unitary"

    def adapter_configs(self, config: TrainConfig) -> list[AdapterConfig]:
        options = dict(config.adapter)
        unitary = options.pop("unitary", None) or {}
        if not isinstance(unitary, dict):
            raise ConfigError(
                f"{self.NAME}: 'unitary' takes the unitary adapter's options as a mapping, got {unitary!r}"
            )
        if "targets" in options and options["targets"] != "all-linear":
            raise ConfigError(
                f"{self.NAME}: the hybrid part takes every linear layer the unitary part leaves; set the unitary "
                "part's targets instead (adapter: {unitary: {targets: ...}})"
            )
        return [
            AdapterConfig.from_dict({"method": "unitary"} | unitary),
            AdapterConfig.from_dict({"method": "hybrid", **options}),
        ]


COMPOSITIONS: dict[str, type[OwnAdapter]] = {UnitaryHybrid.NAME: UnitaryHybrid}


class FullFineTuning:
    """Every parameter trains."""

    resumable = True
    needs_model_state = True
    WEIGHTS = "model.safetensors"
    # The rates the bench's sweeps chose : 6e-5 on MiniLM-L6 (22.7M parameters, SST-2);
    # 9e-5 (SST-2), 6e-5 (FLORES) and 1.8e-4 (GSM8K) on SmolLM2-135M. 1e-4 sits within a factor of two of each.
    # Nothing larger was measured: above 200M parameters the default is 3e-5, a usual rate for larger models.
    SMALL_MODEL_PARAMETERS = 200_000_000
    SMALL_MODEL_RATE, LARGE_MODEL_RATE = 1e-4, 3e-5

    def default_learning_rate(self, config: TrainConfig) -> float:
        from hybrid_peft.estimate import load_architecture

        try:
            parameters = load_architecture(config.model).parameters()
        except Exception:  # noqa: BLE001 - no readable config.json (say, a hub id offline): assume a larger model
            parameters = None
        small = parameters is not None and parameters <= self.SMALL_MODEL_PARAMETERS
        return self.SMALL_MODEL_RATE if small else self.LARGE_MODEL_RATE

    def validate(self, config: TrainConfig) -> None:
        if config.quantise_base is not None:
            raise ConfigError(
                "full fine-tuning trains every weight, and a quantised base is frozen: drop --quantise-base, or "
                "train an adapter on the quantised base (QLoRA)"
            )
        if config.adapter:  # refused rather than recorded as if they had been used
            raise ConfigError(
                f"--method full trains every weight and takes no method options, got {sorted(config.adapter)} "
                "(from --set or 'adapter:'); remove them"
            )

    def attach(self, model: nn.Module, config: TrainConfig, classifier: bool) -> nn.Module:
        return model

    def initialise(self, model: nn.Module, config: TrainConfig, classifier: bool, batches: Batches) -> nn.Module:
        return model

    def restore(self, model: nn.Module, checkpoint: Path) -> nn.Module:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(checkpoint / self.WEIGHTS)))
        return model

    def save_weights(self, model: nn.Module, folder: Path, model_state: dict | None = None) -> None:
        from safetensors.torch import save_file

        if model_state is None:
            model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # Tied weights (an LM head sharing the embeddings) are one tensor: safetensors wants each stored once.
        save_file({k: v.clone() for k, v in model_state.items()}, str(folder / self.WEIGHTS))

    def save_result(self, model: nn.Module, output_dir: Path, tokenizer: Any, model_state: dict | None = None) -> None:
        model.save_pretrained(output_dir / "model", state_dict=model_state)
        tokenizer.save_pretrained(output_dir / "model")

    def save_merged(self, model: nn.Module, output_dir: Path, tokenizer: Any) -> None:
        return None  # model/ is already a plain transformers checkpoint


class PeftPeer:
    """A PEFT baseline: the model is wrapped by PEFT once the first evaluation has run."""

    resumable = False
    needs_model_state = False

    def __init__(self, method: str) -> None:
        self.method = method

    def default_learning_rate(self, config: TrainConfig) -> float:
        return peers.PEER_LEARNING_RATES[self.method]

    def validate(self, config: TrainConfig) -> None:
        peers.peer_options(self.method, config.adapter)
        if config.save_every or config.merge or config.fsdp or config.quantise_base or config.loss_chunk_tokens:
            raise ConfigError(
                f"{self.method} is a PEFT baseline for benchmarks: --save-every, --merge, --fsdp, --quantise-base "
                "and --loss-chunk-tokens are offered for hybrid-peft's own methods (and full fine-tuning) only"
            )

    def attach(self, model: nn.Module, config: TrainConfig, classifier: bool) -> nn.Module:
        if classifier and _head(model) is None:
            raise ConfigError(f"{self.method}: the model has no 'classifier' or 'score' head to train")
        return model

    def initialise(self, model: nn.Module, config: TrainConfig, classifier: bool, batches: Batches) -> nn.Module:
        return peers.attach_peer(
            model, self.method, config.adapter, gradient_batches=batches, head=_head(model) if classifier else None
        )

    def restore(self, model: nn.Module, checkpoint: Path) -> nn.Module:
        raise ConfigError(f"--resume is not offered for the PEFT baseline {self.method}")

    def save_weights(self, model: nn.Module, folder: Path, model_state: dict | None = None) -> None:
        raise ConfigError(f"checkpoints are not offered for the PEFT baseline {self.method}")

    def save_result(self, model: nn.Module, output_dir: Path, tokenizer: Any, model_state: dict | None = None) -> None:
        peers.save_peer(model, output_dir / "adapter")

    def save_merged(self, model: nn.Module, output_dir: Path, tokenizer: Any) -> None:
        raise ConfigError(f"--merge is not offered for the PEFT baseline {self.method}")


def resolved_adapter_options(config: TrainConfig) -> list[dict[str, Any]] | None:
    """Every option of each adapter ``config`` attaches, its defaults filled in (:meth:`AdapterConfig.to_dict`, as
    saved with an adapter, so a recorded copy compares equal); None for methods with no adapter config of ours (full
    fine-tuning, the PEFT peers)."""
    trainee = trainee_for(config.method)
    if not isinstance(trainee, OwnAdapter):
        return None
    return [adapter.to_dict() for adapter in trainee.adapter_configs(config)]


def trainee_for(method: str) -> Trainee:
    """The strategy that trains ``method``; an unknown method is an error listing every method the recipe takes."""
    if method == FULL:
        return FullFineTuning()
    if peers.is_peer(method):
        return PeftPeer(method)
    if method in COMPOSITIONS:
        return COMPOSITIONS[method]()
    if method not in available_methods():
        raise ConfigError(f"unknown method {method!r}; choose one of {training_methods()}")
    return OwnAdapter()


def training_methods() -> list[str]:
    """Every ``--method`` the recipe accepts: hybrid-peft's adapters, ``full`` and the PEFT baselines."""
    return [*available_methods(), *COMPOSITIONS, FULL, *sorted(peers.PEER_DEFAULTS)]
