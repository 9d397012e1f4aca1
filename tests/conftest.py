"""Shared fixtures: tiny random-weight models of the three layer layouts the library must handle."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

# Small synthetic data in the real files' layout (tests/data/make_fixtures.py): tests never need a data folder.
DATA = Path(__file__).resolve().parent / "data"
os.environ["HYBRID_PEFT_DATA"] = str(DATA)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()

VOCAB = 97


def tiny_llama(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (2, 12), generator=generator)


def model_output(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def save_tiny(model: transformers.PreTrainedModel, path) -> str:  # noqa: ANN001
    model.save_pretrained(path)
    return str(path)


def run_torchrun(arguments: list[str], timeout: int = 300):  # noqa: ANN201
    """``torchrun --standalone --nproc_per_node 2 <arguments>`` (gloo on CPU, one thread per process)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama with MiniLM's tokenizer (vocabulary 30522), saved as an ordinary model folder."""
    from hybrid_peft import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT classifier with MiniLM's tokenizer, saved as an ordinary model folder (a head included)."""
    from hybrid_peft import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
