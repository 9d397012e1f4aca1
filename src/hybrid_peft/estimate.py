"""``hybrid-peft estimate``: analytic peak training memory and FLOPs per step, full fine-tuning against each method.

    hybrid-peft estimate --model 70b --batch-size 8 --seq-len 2048 --dtype bfloat16 --zero 3 --world 8
    hybrid-peft estimate --model path/to/config.json --quantised-base 4

Memory per process, in bytes, for a decoder (Llama layout: q, k, v, o, gate, up, down) or an encoder (BERT layout)::

    weights      P_base · b_w            (linear weights at q/8 bytes with --quantised-base q)
    trainable    T · 4                   (adapters in fp32; full fine-tuning: the weights themselves)
    gradients    T · b_g                 (b_g = b_w for full fine-tuning, 4 for adapters)
    optimiser    T · 2 · b_g (AdamW m, v in the trained weights' dtype, as torch keeps them: no fp32 master copy)
    activations  tokens · (layers · a + logits)    a: what autograd keeps per token per layer (below)
    ZeRO         stage 1 divides the optimiser by --world, stage 2 also the gradients, stage 3 also the weights

Activations (see :func:`activation_elements`): per token per layer, the norm inputs, attention's q/k/v, the MLP's
nonlinearity, dropout masks where the config has dropout, and the input of every linear that has a trainable weight
or an adapter: a frozen linear without one keeps nothing. ``--attention math`` (what CPUs run) also keeps the score
matrix, and with attention dropout its mask and the dropped scores; it applies dropout as a product with a noise
tensor of the activations' width. ``--attention flash`` (fused GPU kernels) keeps none of the scores and 1-byte
masks. What each method adds is stated by its config, in its own file (``parameter_count``, ``frozen_count``,
``saved_per_token``, ``fixed_activations``, ``flops_per_token``, ``keeps_output``): LoRA keeps its rank-r projection,
BOFT's scaled linear the output in place of x W0ᵀ and its b×b blocks, the unitary adapter nothing (it is recomputed
in backward). Logits: 3·V fp32 values per token. Peak = weights + adapters + optimiser + the larger of
the activations (during backward) and twice the gradients (after it, with the optimiser's temporaries).
Adapters target what their config targets by default (``all-linear``; unitary: the attention projections).
FLOPs per step: 6·P_linear per token for full fine-tuning; with frozen weights the weight-gradient matmuls are
skipped, so 4·P_linear plus the adapter's own.

``benchmarks/estimate_check.py`` compares these numbers with measured peaks on the small default models.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_peft.config import ALL_LINEAR, AdapterConfig
from hybrid_peft.errors import ConfigError
from hybrid_peft.registry import available_methods, get_method, methods_in_registration_order
from hybrid_peft.targeting import name_matches

# Llama-class shapes (public configs): Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B (benchmarks/scale.py measures these),
# Llama-2-7B, Llama-2-70B, Llama-3.1-405B.
_LLAMA3 = {"num_key_value_heads": 8, "vocab_size": 128256, "model_type": "llama"}
BUILTIN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "tie_word_embeddings": True, **_LLAMA3},
    "llama-3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "tie_word_embeddings": True, **_LLAMA3},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "tie_word_embeddings": False, **_LLAMA3},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False, "model_type": "llama"},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False, "model_type": "llama"},
    "405b": {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "model_type": "llama"},
}  # fmt: skip
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
METHODS = ("full", *methods_in_registration_order())
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    decoder: bool  # Llama layout (gated MLP, LM head) or BERT layout (two-matrix MLP, classifier)
    positions: int = 0  # learned position embeddings (BERT layout)
    type_vocab: int = 0
    labels: int = 2
    hidden_dropout: bool = False  # dropout after attention and MLP (and the embeddings, BERT layout)
    attention_dropout: bool = False  # dropout on the attention probabilities

    @property
    def kv(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, in, out)`` of each linear layer in one block."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        if self.decoder:
            return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
                    ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]  # fmt: skip
        return [("query", h, h), ("key", h, h), ("value", h, h), ("attention.output", h, h),
                ("intermediate", h, i), ("output", i, h)]  # fmt: skip

    def linear_parameters(self) -> int:
        pooler = 0 if self.decoder else self.hidden * self.hidden + self.hidden
        return self.layers * sum(n * m + (0 if self.decoder else m) for _, n, m in self.linears()) + pooler

    def parameters(self) -> int:
        h = self.hidden
        if self.decoder:  # embeddings (+ untied LM head), two RMSNorms per layer and a final one
            return self.linear_parameters() + self.vocab * h * (1 if self.tied else 2) + self.layers * 2 * h + h
        embeddings = (self.vocab + self.positions + self.type_vocab) * h + 2 * h  # and their LayerNorm
        norms = self.layers * 2 * 2 * h
        classifier = h * self.labels + self.labels
        return self.linear_parameters() + embeddings + norms + classifier


def load_architecture(model: str) -> Architecture:
    """A built-in shape (``llama-3.2-1b``, ``llama-3.2-3b``, ``llama-3.1-8b``, ``7b``, ``70b``, ``405b``), a model alias
    or folder, or a ``config.json`` path."""
    if model.lower() in BUILTIN_ARCHITECTURES:
        data, name = BUILTIN_ARCHITECTURES[model.lower()], model.lower()
    else:
        path = Path(model)
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{model}: not a JSON model config ({exc})") from exc
        else:
            from hybrid_peft.models import resolve_model_path

            folder = Path(resolve_model_path(model))
            if not (folder / "config.json").is_file():
                raise ConfigError(
                    f"{model}: no config.json; pass a built-in shape ({', '.join(BUILTIN_ARCHITECTURES)}), a model "
                    "alias/folder or a config.json path"
                )
            data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        name = model
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size") if k not in data]
    if missing:
        raise ConfigError(f"{model}: the config lacks {missing}; is it a transformer language model config?")
    heads = data.get("num_attention_heads", 1)
    return Architecture(
        name=name,
        hidden=data["hidden_size"],
        intermediate=data["intermediate_size"],
        layers=data["num_hidden_layers"],
        heads=heads,
        kv_heads=data.get("num_key_value_heads") or heads,
        vocab=data["vocab_size"],
        tied=bool(data.get("tie_word_embeddings", data.get("model_type") != "llama")),
        decoder=data.get("model_type") not in ENCODER_TYPES,
        positions=data.get("max_position_embeddings", 0) if data.get("model_type") in ENCODER_TYPES else 0,
        type_vocab=data.get("type_vocab_size", 0),
        labels=len(data.get("id2label") or {}) or 2,
        hidden_dropout=bool(data.get("hidden_dropout_prob") or data.get("hidden_dropout") or 0),
        attention_dropout=bool(data.get("attention_probs_dropout_prob") or data.get("attention_dropout") or 0),
    )


def method_config(method: str, rank: int = 8, block_size: int = 4, butterfly_factors: int = 1) -> AdapterConfig:
    """The method's config with its defaults, ``rank``/``block_size``/``butterfly_factors`` where it has them. The
    config states the method's costs per adapted layer (``parameter_count``, ``flops_per_token``, ...)."""
    if method not in available_methods():
        raise ConfigError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    config_class = get_method(method).config_class
    names = config_class.option_names()
    options = {"rank": rank, "block_size": block_size, "butterfly_factors": butterfly_factors}
    return config_class.from_dict({k: v for k, v in options.items() if k in names})


def adapted_linears(arch: Architecture, config: AdapterConfig) -> list[tuple[str, int, int]]:
    """``(name, in, out)`` of the linears ``config``'s default targets adapt in one block (``all-linear``: every
    one; the unitary adapter: the attention projections)."""
    shapes = arch.linears()
    if config.targets == ALL_LINEAR:
        return shapes
    full_name = "model.layers.0.{}".format
    if isinstance(config.targets, str):
        pattern = re.compile(config.targets)
        return [s for s in shapes if pattern.fullmatch(full_name(s[0]))]
    return [s for s in shapes if any(name_matches(full_name(s[0]), entry) for entry in config.targets)]


def dropout_mask_elements(attention: str, dtype_bytes: int) -> float:
    """A dropout mask per element, in activation elements: a noise tensor of the activations' width on the math
    path (CPU), 1 byte with fused kernels."""
    return 1.0 if attention == "math" else 1.0 / dtype_bytes


def activation_elements(
    arch: Architecture,
    adapted: set[str],
    *,
    full: bool,
    seq_len: int,
    attention: str,
    dtype_bytes: int = 4,
    keeps_output: bool = False,
) -> float:
    """Elements (of the activation dtype) autograd keeps per token per layer. A linear keeps its input only when it
    has a trainable weight or an adapter (a frozen, unadapted linear needs only its weight in backward). With
    ``keeps_output`` (BOFT's and the hybrid's ScaledLinear, which keeps y to recover x W0ᵀ for the scale's
    gradient) an adapted linear also keeps its output where the next operation does not keep that same tensor:
    q, k and v (rotated, scaled or copied into heads before attention) and the two outputs that feed residual
    sums."""
    h, i = arch.hidden, arch.intermediate
    math_attention = attention == "math"
    mask = dropout_mask_elements(attention, dtype_bytes)
    scores = arch.heads * seq_len if math_attention else 0  # the softmax output; fused kernels keep O(T)
    if arch.attention_dropout:
        scores *= 3  # the probabilities, the mask and the dropped probabilities (the product with V needs them)
    hidden_masks = 2 * h * mask if arch.hidden_dropout else 0  # after attention and after the MLP
    if arch.decoder:
        if math_attention:  # q, k and v repeated to every query head, the probabilities
            attention_kept, o_input = 3 * h + scores, h
        else:  # q, k and v at their own (grouped) width and the output, which is also o_proj's input
            attention_kept, o_input = 2 * h + 2 * arch.kv, 0
        # two RMSNorm inputs, attention, SiLU input, act and up outputs; the norm outputs as well when the norm
        # weights are trained
        kept = 2 * h + attention_kept + 3 * i + (2 * h if full else 0) + hidden_masks
        inputs = {"q_proj": h, "o_proj": o_input, "gate_proj": h, "down_proj": i}
        shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # same input tensor
        # q and k are rotated (RoPE), v is transposed into heads; gate and up feed SiLU and the product, which keep
        # them
        unshared_outputs = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
    else:
        # two LayerNorm inputs, q, k, v, GELU input, dropout masks
        kept = 2 * h + 3 * h + scores + i + hidden_masks
        inputs = {"query": h, "attention.output": h, "intermediate": h, "output": i}
        shared = {"key": "query", "value": "query"}
        unshared_outputs = ("query", "key", "value", "attention.output", "output")  # GELU keeps "intermediate"
    needed = {shared.get(name, name) for name in adapted}
    if keeps_output:
        kept += sum(m for name, _, m in arch.linears() if name in adapted and name in unshared_outputs)
    return kept + sum(size for name, size in inputs.items() if name in needed)


def model_level_elements(arch: Architecture, *, full: bool, attention: str, dtype_bytes: int = 4) -> float:
    """Elements kept per token outside the blocks (besides the logits): the final RMSNorm's input (and, when its
    weight and the head are trained, its output and the head's input), or BERT's embedding LayerNorm input and
    dropout mask."""
    if arch.decoder:
        return arch.hidden * (3 if full else 1)
    mask = dropout_mask_elements(attention, dtype_bytes) if arch.hidden_dropout else 0.0
    return arch.hidden * (1 + mask)


@dataclass(frozen=True)
class Estimate:
    method: str
    trainable: int
    weights: float
    trainable_copy: float
    gradients: float
    optimiser: float
    activations: float
    flops: float

    @property
    def total(self) -> float:
        """The peak: during backward the activations are live while gradients are still being produced (each
        layer frees more activations than its gradients take), after it the gradients and the optimiser's
        temporaries (one more gradient-sized buffer) are live: whichever is larger."""
        return self.weights + self.trainable_copy + self.optimiser + max(self.activations, 2 * self.gradients)


def estimate(
    arch: Architecture,
    method: str,
    *,
    batch_size: int = 4,
    seq_len: int = 512,
    dtype: str = "bfloat16",
    rank: int = 8,
    block_size: int = 4,
    butterfly_factors: int = 1,
    zero: int = 0,
    world: int = 1,
    quantised_base: int | None = None,
    attention: str = "flash",
    checkpointing: bool = False,
    loss_chunk_tokens: int = 0,
) -> Estimate:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    if zero not in (0, 1, 2, 3) or world < 1:
        raise ConfigError("--zero takes 0, 1, 2 or 3 and --world at least 1")
    if attention not in ("flash", "math"):
        raise ConfigError(f"attention: 'flash' (fused kernels) or 'math' (materialised scores), not {attention!r}")
    if quantised_base is not None and method == "full":
        raise ConfigError("a quantised base cannot be fully fine-tuned; --quantised-base is for adapter methods")
    b = DTYPE_BYTES[dtype]
    total_params = arch.parameters()
    linear_params = arch.linear_parameters()
    tokens = batch_size * seq_len
    h = arch.hidden

    if quantised_base is not None:
        # 4-bit: one fp32 absolute maximum per block of 64 values (bitsandbytes' NF4), 4.5 bits a value; 8-bit: one
        # fp32 scale per row, negligible. The task head and embeddings stay at the base dtype.
        bits = quantised_base + (32 / 64 if quantised_base == 4 else 0)
        weights = linear_params * bits / 8 + (total_params - linear_params) * b
    else:
        weights = total_params * b
    config = None if method == "full" else method_config(method, rank, block_size, butterfly_factors)
    shapes = arch.linears() if config is None else adapted_linears(arch, config)
    adapted = {name for name, _, _ in shapes}
    per_token_layer = activation_elements(
        arch,
        adapted,
        full=config is None,
        seq_len=seq_len,
        attention=attention,
        dtype_bytes=b,
        keeps_output=config is not None and config.keeps_output,
    )
    fixed_activations = 0.0
    if config is None:
        trainable = total_params
        trainable_copy = 0.0  # the weights are the trainable parameters
        gradients = trainable * b
        optimiser = trainable * 2 * b  # the recipe trains 16-bit weights in place: m, v in 16-bit, no master
        flops = 6 * linear_params * tokens
    else:
        trainable = arch.layers * sum(config.parameter_count(n, m) for _, n, m in shapes)
        if not arch.decoder and config.targets == ALL_LINEAR:  # "all-linear" also adapts BERT's pooler
            trainable += config.parameter_count(h, h)
        trainable_copy = trainable * 4.0 + 4.0 * arch.layers * sum(config.frozen_count(n, m) for _, n, m in shapes)
        gradients = trainable * 4.0
        optimiser = trainable * 8.0
        # What the adapters keep for backward beyond the layer input (the output, for methods that keep it, is
        # counted in activation_elements); per step, what they keep whatever the batch (fp32).
        per_token_layer += sum(config.saved_per_token(n, m) for _, n, m in shapes)
        fixed_activations = 4.0 * arch.layers * sum(config.fixed_activations(n, m) for _, n, m in shapes)
        adapter_flops = 6 * tokens * arch.layers * sum(config.flops_per_token(n, m) for _, n, m in shapes)
        flops = 4 * linear_params * tokens + adapter_flops
    # Logits: the loss's log-softmax output, then the two vocabulary-sized gradients of the backward's first steps
    # (fp32), for every token, or for one chunk of tokens at a time with the chunked loss (recomputed in backward).
    logit_tokens = min(tokens, loss_chunk_tokens) if loss_chunk_tokens and arch.decoder else tokens
    logits = 3 * arch.vocab * 4 * logit_tokens if arch.decoder else 0
    outside = model_level_elements(arch, full=method == "full", attention=attention, dtype_bytes=b)
    # With checkpointing every block keeps only its input, and one block's activations live again in its backward.
    kept = arch.layers * h + per_token_layer if checkpointing else arch.layers * per_token_layer
    activations = tokens * (kept + outside) * b + logits + fixed_activations
    if zero >= 1:
        optimiser /= world
    if zero >= 2:
        gradients /= world
    if zero >= 3:
        weights /= world
        trainable_copy /= world
    return Estimate(method, trainable, weights, trainable_copy, gradients, optimiser, activations, flops)


def _gib(value: float) -> str:
    return f"{value / 2**30:,.2f}" if value < 2**40 else f"{value / 2**40:,.2f} Ti"


def estimate_table(arch: Architecture, methods: list[str], **options: Any) -> str:
    """A markdown table of every method's memory parts (GiB), total, FLOPs per step and ratios to full."""
    rows = [estimate(arch, m, **options) for m in methods]
    full = estimate(arch, "full", **{k: v for k, v in options.items() if k != "quantised_base"})
    lines = [
        f"{arch.name}: {arch.parameters() / 1e9:,.3f} B parameters ({arch.layers} layers, hidden {arch.hidden}, "
        f"MLP {arch.intermediate}, vocabulary {arch.vocab}); batch {options.get('batch_size', 4)} × "
        f"{options.get('seq_len', 512)} tokens, {options.get('dtype', 'bfloat16')}, ZeRO {options.get('zero', 0)} "
        f"over {options.get('world', 1)} process(es)"
        + (f", base quantised to {options['quantised_base']} bits" if options.get("quantised_base") else "")
        + (", activation checkpointing" if options.get("checkpointing") else "")
        + (f", loss chunks of {options['loss_chunk_tokens']} tokens" if options.get("loss_chunk_tokens") else ""),
        "",
        "| method | trainable | weights | adapter | gradients | optimiser | activations | peak GiB | × full "
        "| TFLOP/step | × full |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        lines.append(
            f"| {e.method} | {e.trainable:,} | {_gib(e.weights)} | {_gib(e.trainable_copy)} | {_gib(e.gradients)} | "
            f"{_gib(e.optimiser)} | {_gib(e.activations)} | {_gib(e.total)} | {e.total / full.total:.2f} | "
            f"{e.flops / 1e12:,.2f} | {e.flops / full.flops:.2f} |"
        )
    return "\n".join(lines)
