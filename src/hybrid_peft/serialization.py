"""Saving and loading adapters.

An adapter directory holds two files::

    adapter_model.safetensors   every adapter tensor, keyed "<module name>.<tensor name>"
    adapter_config.json         format version, library version, the config(s), which module uses which config,
                                the base model's identity (name + per-module weight fingerprint) and the
                                sha256 of the weights file

Both are written atomically, weights first. The checksum ties them together: a truncated, corrupt or mismatched
weights file is reported as such instead of loading garbage. The fingerprint stops an adapter from being loaded
silently onto another base model.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hybrid_peft.adapters import adapter_layers, attach_state, detach, fingerprint_weight, wrap_modules
from hybrid_peft.config import AdapterConfig
from hybrid_peft.errors import AdapterFileError, BaseModelMismatchError, ConfigError, HybridPeftError
from hybrid_peft.fileio import atomic_write_text, atomic_write_with, sha256_file
from hybrid_peft.layer import linear_weight, quantisation_of
from hybrid_peft.registry import available_methods, get_method
from hybrid_peft.targeting import linear_candidates
from hybrid_peft.version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_NAME = "hybrid-peft-adapter"
# 2: the hybrid's gate defaults to 'update' (version-1 files meant 'branch'); 3: its low-rank branch starts as plain
# LoRA by default (version-2 files meant 'lora-ga'); 4: its default is both branches at full strength (rule 'fixed',
# gate_norm 'max', the rotation at 0.3× the rate; version-3 files meant 'share', 'sum' and 1.0); 5: the hybrid's
# config is made of parts (low_rank, orthogonal, rule). Older files are converted on load (saved_configs).
FORMAT_VERSION = 5
TRAINED_PREFIX = "trained_base::"

# Two fingerprints agree when every sampled value is within this fraction of the sample's largest magnitude:
# loose enough for the same model in bf16 vs fp32, far too tight for two different models to pass.
FINGERPRINT_TOLERANCE = 2e-2
QUANTISED_FINGERPRINT_TOLERANCE = 0.25


def model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write every attached adapter of ``model`` to ``directory`` (created if needed). Returns the directory."""
    layers = adapter_layers(model)
    if not layers:
        raise HybridPeftError("the model has no adapters attached; call attach(model, config) first")
    state = attach_state(model)
    directory = Path(directory)
    configs: list[AdapterConfig] = []
    modules: dict[str, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if layer.config not in configs:
            configs.append(layer.config)
        modules[name] = configs.index(layer.config)
        for local, tensor in layer.adapter_state().items():
            tensors[f"{name}.{local}"] = tensor.detach().to("cpu").contiguous()
    # Parameters trained outside the adapters (e.g. a new classification head), like PEFT's modules_to_save.
    adapter_ids = {id(t) for layer in layers.values() for t in layer.adapter_state().values()}
    trained_base = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    for name in trained_base:
        tensors[f"{TRAINED_PREFIX}{name}"] = model.get_parameter(name).detach().to("cpu").contiguous()
    atomic_write_with(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    fingerprint = state.base_fingerprint if state is not None else {}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "hybrid_peft_version": __version__,
        "configs": [c.to_dict() for c in configs],
        "modules": modules,
        "trained_base_parameters": trained_base,
        "base_model": {
            "name_or_path": model_name(model),
            "class": type(model).__name__,
            "fingerprint": {name: fingerprint[name] for name in modules if name in fingerprint},
            "quantised": {name: layers[name].quantised for name in modules if layers[name].quantised},
        },
        "weights_sha256": sha256_file(directory / WEIGHTS_NAME),
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(document, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, checked for shape."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise AdapterFileError(f"adapter directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: {directory!s} is not a hybrid-peft adapter directory")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(
            f"{path} is not valid JSON ({exc}); the file is corrupt, save the adapter again"
        ) from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        hint = " (it looks like a PEFT adapter: load it with peft.PeftModel)" if "peft_type" in document else ""
        raise AdapterFileError(f"{path} is not a hybrid-peft adapter config{hint}")
    expected_types = {
        "format_version": int,
        "configs": list,
        "modules": dict,
        "weights_sha256": str,
        "trained_base_parameters": list,
    }
    for key, kind in expected_types.items():
        value = document.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise AdapterFileError(
                f"{path}: {key!r} should be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}; the file "
                "was edited or is corrupt, save the adapter again"
            )
    if not all(isinstance(c, dict) for c in document.get("configs", [])):
        raise AdapterFileError(f"{path}: every entry of 'configs' should be a mapping; save the adapter again")
    modules = document.get("modules", {})
    if not all(isinstance(i, int) and 0 <= i < len(document.get("configs", [])) for i in modules.values()):
        raise AdapterFileError(f"{path}: 'modules' should map module names to config indices; save the adapter again")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} has format version {document['format_version']}, newer than this hybrid-peft "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade hybrid-peft"
        )
    for key in ("configs", "modules", "weights_sha256"):
        if key not in document:
            raise AdapterFileError(f"{path} has no {key!r} entry; the file is corrupt, save the adapter again")
    return document


def saved_configs(
    directory: str | os.PathLike,
    document: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> list[AdapterConfig]:
    """The adapter configs saved in ``directory``, in today's form: a file of an older format version goes through
    its methods' converters (``AdapterConfig.upgrade_saved``), which also convert ``tensors`` (the file's weights,
    changed in place) where the old form computed the same function from other values."""
    document = document if document is not None else read_adapter_config(directory)
    path = Path(directory) / CONFIG_NAME
    version = document.get("format_version", 1)
    configs = []
    for index, data in enumerate(document["configs"]):
        if version < FORMAT_VERSION and isinstance(data, dict) and data.get("method") in available_methods():
            modules = [name for name, i in document["modules"].items() if i == index]
            try:
                data = _upgrade(data, version, modules, tensors)
            except ConfigError as exc:
                raise AdapterFileError(f"{path}: {exc}") from exc
        try:
            configs.append(AdapterConfig.from_dict(data, strict=False))
        except (ConfigError, TypeError) as exc:
            raise AdapterFileError(f"{path} holds an invalid config: {exc}") from exc
    return configs


def _upgrade(
    data: dict[str, Any], version: int, modules: list[str], tensors: dict[str, torch.Tensor] | None
) -> dict[str, Any]:
    """One config of format ``version`` and the weights of the modules using it, converted to today's format."""
    config_class = get_method(data["method"]).config_class
    if tensors is None:
        return config_class.upgrade_saved(dict(data), version)
    states = {m: {k[len(m) + 1 :]: v for k, v in tensors.items() if k.startswith(m + ".")} for m in modules}
    upgraded = config_class.upgrade_saved(dict(data), version, states)
    for module, state in states.items():
        for key in [k for k in tensors if k.startswith(module + ".")]:
            del tensors[key]
        tensors.update({f"{module}.{local}": tensor for local, tensor in state.items()})
    return upgraded


def _read_weights(directory: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing; the adapter directory is incomplete")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise AdapterFileError(
            f"{path} does not match {CONFIG_NAME} (sha256 {actual[:12]}... != {expected_sha256[:12]}...): the weights "
            "file is truncated, corrupt or from another save; restore it or save the adapter again"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path} could not be read as safetensors ({exc}); the file is corrupt") from exc
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(
            f"{path} holds non-finite values (inf or NaN) in {bad[0]}{' and others' if len(bad) > 1 else ''}: it was "
            "saved from a run that diverged; use an earlier checkpoint's adapter, or train again at a lower rate"
        )
    return tensors


def _fingerprints_agree(saved: dict, current: dict, quantised: bool = False) -> bool:
    """Same shape and the same sampled values: to 2% of their largest (bf16 rounding passes); where either side
    is quantised, to 25% and with a correlation of at least 0.9 (4-bit rounding passes, another model does not)."""
    if list(saved["shape"]) != list(current["shape"]):
        return False
    a, b = saved["sample"], current["sample"]
    if len(a) != len(b) or not all(math.isfinite(y) for y in b):
        return False
    scale = max([abs(v) for v in a] + [1e-12])
    tolerance = QUANTISED_FINGERPRINT_TOLERANCE if quantised else FINGERPRINT_TOLERANCE
    if not all(abs(x - y) <= tolerance * scale for x, y in zip(a, b, strict=True)):
        return False
    return not quantised or _correlation(a, b) >= 0.9


def _correlation(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / norm if norm else 1.0


def check_base_model(model: nn.Module, document: dict[str, Any]) -> None:
    """Raise :class:`BaseModelMismatchError` unless ``model`` is the base the adapter in ``document`` was made for."""
    base = document.get("base_model", {})
    saved_name = base.get("name_or_path")
    candidates = linear_candidates(model)
    missing = [name for name in document["modules"] if name not in candidates]
    if missing:
        raise BaseModelMismatchError(
            f"this adapter was made for {saved_name!r} ({base.get('class')}); {type(model).__name__} "
            f"({model_name(model)!r}) has no linear layer named {missing[:3]}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            + ". Load it onto the base model it was trained on"
        )
    mismatched = []
    saved_quantised = base.get("quantised") or {}
    for name, saved in base.get("fingerprint", {}).items():
        current = fingerprint_weight(linear_weight(candidates[name]))
        quantised = bool(saved_quantised.get(name) or quantisation_of(candidates[name]))
        if not _fingerprints_agree(saved, current, quantised):
            mismatched.append((name, saved["shape"], current["shape"]))
    if mismatched:
        name, saved_shape, shape = mismatched[0]
        detail = (
            f"shape {shape} where the adapter expects {saved_shape}"
            if saved_shape != shape
            else "different weight values"
        )
        raise BaseModelMismatchError(
            f"this adapter was made for base model {saved_name!r}, but {len(mismatched)} target module(s) of "
            f"{model_name(model)!r} differ (first: {name}: {detail}). Load it onto the base model it was trained on, "
            "or pass check_base=False if you are sure (e.g. a fine-tuned copy of that base)"
        )


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", as the Hub spells repositories


def resolve_adapter_directory(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local folder of an adapter: ``source`` itself when it is a folder, else the snapshot of the Hugging Face
    Hub repository ``source`` ("org/name"), downloaded or, offline (``HF_HUB_OFFLINE=1``), taken from the cache."""
    path = Path(source)
    if path.is_dir() or not HUB_REPO_ID.match(str(source)):
        return path / subfolder if subfolder else path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    files = [CONFIG_NAME, WEIGHTS_NAME]
    try:
        snapshot = snapshot_download(
            str(source),
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[f"{subfolder}/{name}" for name in files] if subfolder else files,
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise AdapterFileError(
            f"{str(source)!r} is neither a folder nor a Hugging Face Hub repository this machine can reach or has "
            f"cached ({type(exc).__name__}: {exc}). Pass the adapter's folder, or download the repository first "
            "(huggingface-cli download org/name) where the Hub is reachable"
        ) from exc
    return Path(snapshot) / subfolder if subfolder else Path(snapshot)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    trainable: bool = False,
    check_base: bool = True,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``model`` (in place) and load its weights.

    ``directory`` is a folder :func:`save_adapter` wrote, or a Hugging Face Hub repository id ("org/name") holding
    one (at ``revision``, in ``subfolder``), resolved as PEFT's ``from_pretrained`` does: downloaded into the Hub
    cache (``cache_dir``), or read from it when ``HF_HUB_OFFLINE=1``.

    Args:
        trainable: leave the adapter's parameters requiring grad (to continue training); by default inference.
        check_base: refuse to load onto a base model whose target weights differ from the one it was saved with.
    """
    directory = resolve_adapter_directory(directory, revision=revision, subfolder=subfolder, cache_dir=cache_dir)
    document = read_adapter_config(directory)
    if adapter_layers(model):
        raise HybridPeftError("the model already has adapters attached; call detach(model) before loading another")
    tensors = _read_weights(directory, document["weights_sha256"])
    configs = saved_configs(directory, document, tensors)
    if check_base:
        check_base_model(model, document)
    by_config: dict[int, list[str]] = {}
    for name, index in document["modules"].items():
        by_config.setdefault(int(index), []).append(name)
    trained_base = document.get("trained_base_parameters", [])
    parameters = dict(model.named_parameters())
    for name in trained_base:
        key = f"{TRAINED_PREFIX}{name}"
        if name not in parameters or key not in tensors or parameters[name].shape != tensors[key].shape:
            raise AdapterFileError(
                f"{directory}: the trained base parameter {name} does not fit this model (missing or another shape)"
            )
    try:
        for index, names in by_config.items():
            wrap_modules(model, names, configs[index])
        for name, layer in adapter_layers(model).items():
            prefix = name + "."
            layer.load_adapter_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            for _, p in layer.adapter_named_parameters():
                p.requires_grad_(trainable)
        with torch.no_grad():
            for name in trained_base:
                parameters[name].copy_(tensors[f"{TRAINED_PREFIX}{name}"])
                parameters[name].requires_grad_(trainable)
    except (KeyError, ValueError, IndexError) as exc:
        detach(model)
        raise AdapterFileError(f"{directory} does not fit this model: {exc}") from exc
    return model
