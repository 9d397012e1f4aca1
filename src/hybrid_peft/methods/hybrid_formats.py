"""The hybrid's adapter files of earlier formats, converted to today's config and tensors on load (called through
:meth:`HybridConfig.upgrade_saved` by ``serialization``'s one converter).

Format versions 1–4 stored the hybrid flat (28 fields: LoRA-GA's, BOFT's and the mix's side by side); version 5 stores
it as parts (``low_rank``, ``orthogonal``, ``rule``). Fields a version did not store take the defaults it was written
under (:data:`FLAT_DEFAULTS`). What each old option becomes, with the same outputs:

- ``rule`` ``share``/``sigmoid``: the same rule, with its settings and each layer's λ.
- ``rule="fixed"`` (and any rule under ``gate="step"``, whose λ never reached the forward pass): no rule. The gates
  of each layer's λ are folded into the weights, B (and B0) times g_lr and the skew parameters times g_orth, so the
  output is unchanged; at the version-4 default (λ = 0.5, max gates) both are 1.
- ``gate="branch"`` with a LoRA start (B0 A0 = 0, so no base offset): the same function as today's.
- ``gate="branch"`` with a LoRA-GA start put B0 A0 inside the rotation; refused, with the way to merge it instead.
- ``mix_init_from``, ``gate="step"``'s step split and ``low_rank_lr_scale``/``orthogonal_lr_scale`` were training
  options: the first two are gone (a warning says so), the scales become the parts' ``lr_scale``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from hybrid_peft.errors import ConfigError

# The flat fields' defaults when each version was written ({field: value}); a version stores every field it had.
_V4_DEFAULTS: dict[str, Any] = {
    "rank": 8, "alpha": 16.0, "dropout": 0.0, "use_rslora": False, "direction": "ArB2r", "scale": "stable",
    "gamma": 16.0, "estimator": "exact", "oversampling": 16, "svd": "exact", "seed": 0, "block_size": 4,
    "block_num": 0, "butterfly_factors": 1, "boft_dropout": 0.0, "rule": "fixed", "mix_init": 0.5, "mix_min": 0.05,
    "ema": 0.9, "temperature": 1.0, "gate": "update", "start": "lora", "gate_norm": "max", "mix_init_from": "constant",
    "low_rank_lr_scale": 1.0, "orthogonal_lr_scale": 0.3,
}  # fmt: skip
_CHANGED: dict[int, dict[str, Any]] = {  # {first version with today's default: {field: the default before it}}
    2: {"gate": "branch"},
    3: {"start": "lora-ga"},
    4: {"rule": "share", "gate_norm": "sum", "orthogonal_lr_scale": 1.0},
}
LORA_FIELDS = ("rank", "alpha", "dropout", "use_rslora")
LORA_GA_FIELDS = ("direction", "scale", "gamma", "estimator", "oversampling", "svd", "seed")


def flat_with_defaults(data: dict[str, Any], version: int) -> dict[str, Any]:
    """A flat (format 1–4) hybrid config with every field, each missing one at the default of its version."""
    defaults = dict(_V4_DEFAULTS)
    for changed_in, before in _CHANGED.items():
        if version < changed_in:
            defaults.update(before)
    return defaults | data


def upgrade_hybrid(
    data: dict[str, Any], version: int, tensors: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, Any]:
    """Today's hybrid config from a flat one of format ``version`` (< 5), converting ``tensors`` in place."""
    if version >= 5:
        return data
    flat = flat_with_defaults(data, version)
    lora_ga = flat["start"] == "lora-ga"
    if flat["gate"] == "branch" and lora_ga:
        raise ConfigError(
            f"this hybrid adapter (format version {version}) gates the whole low-rank branch over a base offset "
            "(gate='branch' with a LoRA-GA start), which this version no longer computes. Merge it into its base with "
            "hybrid-peft 0.1 (the version that wrote it: any commit before adapter format 5): load_adapter, then "
            "hybrid_peft.save_merged(model, folder), and use the merged model; or train it again"
        )
    lost = [f"{k}={flat[k]!r}" for k, v in (("gate", "step"), ("mix_init_from", "gradient")) if flat[k] == v]
    if lost:
        warnings.warn(
            f"hybrid adapter of format version {version}: {', '.join(lost)} no longer exist(s); it loads with the same "
            "outputs, but further training follows today's hybrid",
            stacklevel=3,
        )
    keeps_rule = flat["rule"] in ("share", "sigmoid") and flat["gate"] != "step"
    low_rank = {"method": "lora-ga" if lora_ga else "lora", "lr_scale": flat["low_rank_lr_scale"]}
    low_rank |= {k: flat[k] for k in LORA_FIELDS + (LORA_GA_FIELDS if lora_ga else ())}
    orthogonal = {k: flat[k] for k in ("block_size", "block_num", "butterfly_factors")}
    orthogonal |= {"method": "boft", "dropout": flat["boft_dropout"], "lr_scale": flat["orthogonal_lr_scale"]}
    rule = None
    if keeps_rule:
        rule = {"name": flat["rule"], "gates": flat["gate_norm"]}
        rule |= {
            k: flat[k] for k in ("mix_init", "mix_min", "ema") + (("temperature",) if flat["rule"] == "sigmoid" else ())
        }
    for state in (tensors or {}).values():
        _convert_tensors(state, flat, keeps_rule)
    upgraded = {k: data[k] for k in ("targets", "exclude") if k in data}
    return upgraded | {"method": "hybrid", "low_rank": low_rank, "orthogonal": orthogonal, "rule": rule}


@torch.no_grad()
def _convert_tensors(state: dict[str, torch.Tensor], flat: dict[str, Any], keeps_rule: bool) -> None:
    state.pop("mix_start", None)  # λ0 of the branch gate's base offset: no longer used
    mix = state.pop("mix", None) if not keeps_rule else None
    if keeps_rule or mix is None:
        return
    if flat["gate"] == "step":  # λ only split the optimiser's step: both branches ran at full strength
        return
    low_rank, orthogonal = mix.double(), 1 - mix.double()
    if flat["gate_norm"] == "max":
        larger = torch.maximum(low_rank, orthogonal)
        low_rank, orthogonal = low_rank / larger, orthogonal / larger
    for name, gate in (("lora_B", low_rank), ("lora_B0", low_rank), ("boft_skew", orthogonal)):
        if name in state:
            state[name] = (state[name].double() * gate).to(state[name].dtype)
