"""Task data readers, metrics and the code sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrid_peft import load_tokenizer
from hybrid_peft.errors import TaskDataError
from hybrid_peft.sandbox import run_python
from hybrid_peft.tasks import get_task
from hybrid_peft.tasks.base import classification_metrics, matthews_corrcoef
from hybrid_peft.tasks.glue import BUILTIN_SPECS, GlueSpec, read_glue_file
from hybrid_peft.tasks.gsm8k import final_number
from hybrid_peft.tasks.humaneval import check_program, load_humaneval, truncate_completion

from conftest import DATA


def test_classification_metrics_known_values() -> None:
    predictions, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    metrics = classification_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # binary MCC: (tp·tn − fp·fn)/sqrt(...) with tp=2, tn=2, fp=1, fn=1 -> 3/9
    assert metrics["mcc"] == pytest.approx((2 * 2 - 1 * 1) / 9)
    assert matthews_corrcoef([0, 0, 0], [0, 1, 0]) == 0.0  # undefined -> 0
    assert matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)


def test_gsm8k_final_number() -> None:
    assert final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_number("The answer is 18.") == "18"
    assert final_number("#### 5.0") == "5"
    assert final_number("no digits here") is None


@pytest.mark.parametrize(("name", "rows", "pair"), [("sst2", 48, False), ("mrpc", 24, True), ("cola", 30, False)])
def test_builtin_glue_dev_files(name: str, rows: int, pair: bool) -> None:
    task = get_task(name, data_dir=DATA)
    data = task.eval_rows()
    assert len(data) == rows
    assert (data[0]["text_pair"] is not None) is pair
    assert {r["label"] for r in data} == {0, 1}


def test_glue_errors_name_file_line_and_fix(tmp_path: Path) -> None:
    spec = GlueSpec("toy", "toy", ("sentence",), "label")
    path = tmp_path / "train.tsv"
    with pytest.raises(TaskDataError, match="does not exist"):
        read_glue_file(path, spec)
    path.write_text("")
    with pytest.raises(TaskDataError, match="is empty"):
        read_glue_file(path, spec)
    path.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(TaskDataError, match=r"no column\(s\) \['sentence'\]; its columns are \['text', 'label'\]"):
        read_glue_file(path, spec)
    path.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    with pytest.raises(TaskDataError, match=r"train.tsv:3: label '7' is not in the label set \['0', '1'\]"):
        read_glue_file(path, spec)
    path.write_text("sentence\tlabel\n")
    with pytest.raises(TaskDataError, match="no examples"):
        read_glue_file(path, spec)
    with pytest.raises(TaskDataError, match="unknown task 'sst3'"):
        get_task("sst3")


def test_glue_spec_file_and_truncation_warning(tmp_path: Path) -> None:
    (tmp_path / "data" / "toy").mkdir(parents=True)
    (tmp_path / "data" / "toy" / "train.tsv").write_text("a\tb\tgold\nhi\tthere\tyes\n" + "long " * 200 + "\tx\tno\n")
    spec = tmp_path / "toy.json"
    spec.write_text(
        '{"name": "toy", "folder": "toy", "text_columns": ["a", "b"], "label_column": "gold", "labels": ["no", "yes"]}'
    )
    task = get_task(f"glue-spec:{spec}", data_dir=tmp_path / "data")
    rows = task.train_rows()
    assert rows[0] == {"text": "hi", "text_pair": "there", "label": 1}
    with pytest.warns(UserWarning, match="longer than max_length=32"):
        batch = task.batch(load_tokenizer("minilm-l6"), rows, 32)
    assert batch["input_ids"].shape[1] <= 32 and batch["labels"].tolist() == [1, 0]
    assert BUILTIN_SPECS["cola"].header is False


def test_humaneval_sandbox_runs_solutions() -> None:
    problems = load_humaneval()
    assert len(problems) == 164
    assert run_python(check_program(problems[2], problems[2]["canonical_solution"])).passed
    wrong = run_python(check_program(problems[2], "    return 0\n"))
    assert not wrong.passed and wrong.reason == "failed"
    assert run_python("while True:\n    pass\n", timeout=1).reason == "timed out"
    blocked = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not blocked.passed and "Network is unreachable" in blocked.output
    assert not run_python("x = bytearray(8 << 30)\n", memory_mb=256).passed
    assert truncate_completion("    return x\n\n\ndef helper():\n    pass\n") == "    return x\n\n"


def test_xnli_few_shot_split_is_reproducible_and_disjoint() -> None:
    task = get_task("xnli", data_dir=DATA, examples_per_language=32)
    assert len(task.languages) == 15 and len(task.train_rows()) == 32 * 15
    again = get_task("xnli", data_dir=DATA, examples_per_language=32)
    assert task.train_rows() == again.train_rows()
    other_seed = get_task("xnli", data_dir=DATA, examples_per_language=32, seed=1)
    assert task.train_rows() != other_seed.train_rows()
    for language in ("fr", "sw"):
        train = {(r["text"], r["text_pair"]) for r in task.train_rows() if r["language"] == language}
        held_out = {(r["text"], r["text_pair"]) for r in task.eval_rows() if r["language"] == language}
        assert len(train) == 32 and not train & held_out
    with pytest.raises(TaskDataError, match="no XNLI file for language"):
        get_task("xnli", data_dir=DATA, languages=["xx"])


def test_flores_pairs_prompts_and_metrics() -> None:
    import torch

    task = get_task(
        "flores",
        data_dir=DATA,
        examples_per_language=32,
        eval_per_language=2,
        languages=["fra_Latn", "zho_Hans"],
    )
    assert len(task.train_rows()) == 64 and len(task.eval_rows()) == 4
    row = task.eval_rows()[0]
    assert task.prompt(row).startswith("Translate English to French.\nEnglish: ")
    assert task.prompt(row).endswith("\nFrench:")
    tokenizer = load_tokenizer("minilm-l6")
    batch = task.batch(tokenizer, task.train_rows()[:2], 64)
    assert (batch["labels"] != -100).any()

    class Echo(torch.nn.Module):  # "translates" by returning the reference: BLEU and chrF++ must be 100
        training = False

    import hybrid_peft.tasks.multilingual as multilingual

    original = multilingual.greedy_generate, multilingual.held_out_loss
    multilingual.greedy_generate = lambda model, tok, prompts, *a, **k: [" " + r["target"] for r in task.eval_rows()]
    multilingual.held_out_loss = lambda *a, **k: 0.0
    try:
        metrics = task.evaluate(Echo(), tokenizer, task.eval_rows())
    finally:
        multilingual.greedy_generate, multilingual.held_out_loss = original
    assert metrics["chrf++"] == pytest.approx(100.0) and metrics["bleu"] == pytest.approx(100.0)
    assert set(metrics) >= {"chrf++_fra_Latn", "bleu_zho_Hans"}


def test_xnli_evaluate_reports_per_language_accuracy() -> None:
    from hybrid_peft import load_model

    task = get_task("xnli", data_dir=DATA, eval_per_language=3, languages=["fr", "de"])
    model = load_model("minilm-l6", task="sequence-classification", num_labels=3)
    per_example: dict[str, list[float]] = {}
    metrics = task.evaluate(model, load_tokenizer("minilm-l6"), task.eval_rows(), per_example=per_example)
    assert set(metrics) == {"accuracy_de", "accuracy_fr", "accuracy", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    # each row's correctness and loss, for the bench's pairing by row: their means are the metrics
    assert len(per_example["accuracy"]) == len(per_example["loss"]) == len(task.eval_rows()) == 6
    assert sum(per_example["accuracy"]) / 6 == pytest.approx(metrics["accuracy"])
    assert sum(per_example["loss"]) / 6 == pytest.approx(metrics["loss"], rel=1e-5)


def test_length_sorted_evaluation_agrees_with_row_order_and_pads_less(tiny_lm: str, tiny_bert: str) -> None:
    """Evaluation batches rows by length: the held-out loss equals the loss of batches in row order (the plain
    reference), classification predictions come back in row order, and fewer padded tokens are run."""
    import transformers

    from hybrid_peft.tasks.base import (
        classification_batch,
        classify,
        held_out_loss,
        length_sorted_batches,
        mean_loss,
    )

    task = get_task("gsm8k", data_dir=DATA)
    rows = [{"question": "How many? " * n, "answer": "Add. " * (n % 4) + "#### 3"} for n in (1, 8, 2, 6, 3, 9, 1, 5)]
    tokenizer = load_tokenizer(tiny_lm)
    lm = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    in_order = [task.batch(tokenizer, rows[i : i + 3], 64) for i in range(0, len(rows), 3)]
    grouped = length_sorted_batches(task.batch, tokenizer, rows, 3, 64)
    assert sorted(i for chunk, _ in grouped for i in chunk) == list(range(len(rows)))
    for chunk, batch in grouped:  # each batch holds the rows its indices name
        for position, row in enumerate(chunk):
            alone = task.batch(tokenizer, [rows[row]], 64)["input_ids"][0]
            assert torch.equal(batch["input_ids"][position, : len(alone)], alone)
    padded = [sum(b["input_ids"].numel() for b in batches) for batches in (in_order, [b for _, b in grouped])]
    assert padded[1] < padded[0]
    assert held_out_loss(task, lm, tokenizer, rows, 3, 64) == pytest.approx(mean_loss(lm, in_order), rel=1e-5)

    sentences = [{"text": "word " * n, "text_pair": None, "label": n % 2} for n in (1, 9, 2, 7, 3, 12, 1)]
    bert_tokenizer = load_tokenizer(tiny_bert)
    bert = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    row_losses: list[float] = []
    predictions, loss = classify(bert, bert_tokenizer, sentences, 2, 32, row_losses)
    with torch.no_grad():
        one_by_one = [bert(**classification_batch(bert_tokenizer, [row], 32)) for row in sentences]
    assert predictions == [int(out.logits.argmax(-1)) for out in one_by_one]
    assert loss == pytest.approx(sum(float(out.loss) for out in one_by_one) / len(sentences), rel=1e-5)
    # each row's own loss, in the rows' order (they ran batched by length), and their mean is the loss returned
    assert row_losses == pytest.approx([float(out.loss) for out in one_by_one], rel=1e-5)
    assert sum(row_losses) / len(row_losses) == pytest.approx(loss, rel=1e-5)
    assert classify(bert, bert_tokenizer, sentences, 2, 32) == (predictions, loss)


@pytest.mark.parametrize("tokenizer_name", ["smollm2-135m", "minilm-l6"])
def test_greedy_generate_with_stop_strings_matches_full_decoding_cut_at_the_stop(tokenizer_name: str) -> None:
    """Stopping at a string is a speed-up only: each completion, cut at its first stop string, equals the full-length
    greedy completion cut there; a completion that stopped is shorter, one that never meets the string is whole."""
    import transformers

    from hybrid_peft.tasks.base import greedy_generate

    tokenizer = load_tokenizer(tokenizer_name)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = ["Question: what is 2 + 3?\nAnswer:", "The cat sat", "Translate: hello", "def f(x):"]
    full = greedy_generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=4)
    # a stop the first completion meets part-way (the text of its fourth word), plus one no completion meets
    words = full[0].split()
    assert len(words) >= 6, full[0]
    stop = (words[3], "\u2603never\u2603")
    stopped = greedy_generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=4, stop=stop)

    def cut(text: str) -> str:
        return text[: min((text.find(s) for s in stop if s in text), default=len(text))]

    assert [cut(s) for s in stopped] == [cut(f) for f in full]
    assert len(stopped[0]) < len(full[0]) and stopped[0].rstrip().endswith(stop[0])
    for f, s in zip(full, stopped, strict=True):
        if not any(x in f for x in stop):
            assert s == f
