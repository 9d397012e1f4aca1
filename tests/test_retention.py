"""Retention (forgetting) and the bench's paired comparisons: the general-text loss before and after training, the
paired t-interval against LoRA, and the learn–forget plot."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

from hybrid_peft import LoRAConfig, attach, load_tokenizer
from hybrid_peft.bench import BenchRow, markdown_table, paired_differences
from hybrid_peft.bench.plots import learn_forget_plots, method_style
from hybrid_peft.bench.rows import paired_difference
from hybrid_peft.errors import ConfigError
from hybrid_peft.run.retention import retention_loss, retention_texts

from conftest import DATA, VOCAB, tiny_bert_classifier, tiny_gpt2


def test_the_retention_text_comes_from_flores_english_else_pythons_docs_else_a_file(tmp_path: Path) -> None:
    passages, where = retention_texts("auto", "sst2", str(DATA), 5)
    english = (DATA / "flores" / "devtest" / "eng_Latn.devtest").read_text(encoding="utf-8").splitlines()
    assert where == "FLORES-200 English devtest" and passages == [line.strip() for line in english if line.strip()][:5]
    passages, where = retention_texts("auto", "flores", str(DATA), 5)  # FLORES's own evaluation holds those lines
    assert where.startswith("Python's documentation") and len(passages) == 5
    assert all(200 <= len(p) <= 1000 and ">>>" not in p for p in passages)
    passages, _ = retention_texts("auto", "sst2", str(tmp_path), 3)  # a data folder without FLORES
    assert len(passages) == 3
    text = tmp_path / "general.txt"
    text.write_text("first passage\n\nsecond passage\n", encoding="utf-8")
    assert retention_texts(str(text), "sst2", None, 10) == (["first passage", "second passage"], "general.txt")
    lines = tmp_path / "general.jsonl"
    lines.write_text(json.dumps({"text": "a line"}) + "\n", encoding="utf-8")
    assert retention_texts(str(lines), "sst2", None, 10)[0] == ["a line"]
    assert retention_texts("none", "sst2", None, 10) is None and retention_texts("auto", "sst2", None, 0) is None
    with pytest.raises(ConfigError, match="retention_data: 'missing.txt' is not a file"):
        retention_texts("missing.txt", "sst2", None, 10)


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return load_tokenizer("minilm-l6")


def tiny_decoder(tokenizer: transformers.PreTrainedTokenizerBase, kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, num_labels=2,
    )  # fmt: skip
    kinds = {"causal": transformers.LlamaForCausalLM, "classifier": transformers.LlamaForSequenceClassification}
    return kinds[kind](config).eval()


def test_retention_loss_is_the_causal_lm_loss_per_token_and_reads_a_classifier_through_its_tied_head(
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    texts = ["the cat sat on the mat", "a longer sentence about the weather and the sea", "short"]
    model = tiny_decoder(tokenizer, "causal")
    total, count = 0.0, 0
    for text in texts:  # by hand, one unpadded passage at a time
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    batched = retention_loss(model, tokenizer, texts, max_length=64, batch_size=2)  # padded batches
    assert batched == pytest.approx(total / count, rel=1e-5)
    classifier = tiny_decoder(tokenizer, "classifier")
    classifier.config.architectures = ["LlamaForSequenceClassification"]  # as saving it writes
    classifier.model.load_state_dict(model.model.state_dict())  # the same backbone; the tied head is its embedding
    assert retention_loss(classifier, tokenizer, texts, max_length=64, batch_size=2) == pytest.approx(batched, rel=1e-5)
    attach(classifier, LoRAConfig(rank=2))  # adapters in the backbone change what it scores once they are trained
    for name, p in classifier.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.5)
    assert retention_loss(classifier, tokenizer, texts, max_length=64, batch_size=2) != pytest.approx(batched)
    assert retention_loss(tiny_bert_classifier(), tokenizer, texts, max_length=64, batch_size=2) is None  # encoder
    import peft  # PEFT's models, the mixed LoRA+OFT one included, are scored through the model they wrap

    plain = tiny_decoder(tokenizer, "classifier")
    plain.model.load_state_dict(model.model.state_dict())
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")
    oft = peft.OFTConfig(oft_block_size=4, target_modules=["v_proj"], task_type="SEQ_CLS")
    mixed = peft.get_peft_model(plain, lora, adapter_name="low_rank", mixed=True)
    mixed.add_adapter("orthogonal", oft)
    mixed.set_adapter(["low_rank", "orthogonal"])
    assert retention_loss(mixed, tokenizer, texts, max_length=64, batch_size=2) == pytest.approx(batched, rel=1e-4)
    gpt2 = tiny_gpt2()  # another family (its final norm in the base model, a separate head): the model's own loss
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        expected = float(gpt2(input_ids=ids, labels=ids).loss)
    scored = retention_loss(gpt2, _FixedTokenizer(ids), ["any"], max_length=64, batch_size=1)
    assert scored == pytest.approx(expected, rel=1e-5)


class _FixedTokenizer:
    """Hands back the given ids for any text (a tokenizer for a model with a tiny vocabulary)."""

    padding_side = "left"

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __call__(self, texts: list[str], **_: object) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids)}


def test_the_recipe_records_the_retention_loss_before_and_after(tiny_lm: str, tmp_path: Path) -> None:
    from hybrid_peft.run import RunSummary, TrainConfig, run_training

    config = TrainConfig(
        model=tiny_lm, task="humaneval", method="lora", steps=2, batch_size=2, max_length=32, eval_examples=2,
        generate=False, threads=1, output_dir=str(tmp_path / "run"), learning_rate=5e-2, retention_examples=4,
    )  # fmt: skip
    run_training(config, progress=False)
    summary = RunSummary.read(tmp_path / "run")
    assert summary.before["retention_loss"] > 0 and summary.after["retention_loss"] > 0
    assert summary.after["retention_loss"] != summary.before["retention_loss"]  # training moved it
    run_training(dataclasses.replace(config, output_dir=str(tmp_path / "none"), retention_data="none"), progress=False)
    assert "retention_loss" not in RunSummary.read(tmp_path / "none").after


def row(method: str, seed: int, metric: float, before: float = 0.5, retention: float = 0.0) -> BenchRow:
    recipe = "full" if method == "full" else "lora"
    return BenchRow("sst2", method, seed, "ok", recipe, "m", "sst2", "accuracy", 1e-3, metric_before=before,
                    metric=metric, retention_before=2.0, retention_after=2.0 + retention)  # fmt: skip


def test_paired_differences_to_lora_with_a_t_interval_across_seeds() -> None:
    difference = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) · sd / √n
    assert (difference.mean, difference.low, difference.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert difference.verdict == "level"
    rows = [row("lora", s, m, retention=f) for s, (m, f) in enumerate([(0.80, 0.03), (0.82, 0.04), (0.81, 0.05)])]
    rows += [row("ahead", s, m, retention=f) for s, (m, f) in enumerate([(0.82, 0.01), (0.84, 0.02), (0.83, 0.03)])]
    rows += [row("level", s, m) for s, m in enumerate([0.81, 0.81, 0.81])]  # +0.01, −0.01, 0
    rows += [row("one-seed", 5, 0.9)]  # no seed in common with LoRA: left out
    metric = paired_differences(rows)["sst2"]
    assert set(metric) == {"ahead", "level"}
    assert metric["ahead"].mean == pytest.approx(0.02) and metric["ahead"].verdict == "above"
    assert metric["level"].verdict == "level" and metric["level"].seeds == 3
    forgetting = paired_differences(rows, "forgetting")["sst2"]
    assert forgetting["ahead"].verdict == "below" and forgetting["ahead"].mean == pytest.approx(-0.02)
    table = markdown_table(SimpleNamespace(name="t", sweep=None, references=("lora",)), rows)
    ahead = next(line for line in table.splitlines() if line.startswith("| ahead |"))
    assert "**+0.0200 [+0.0200, +0.0200]**" in ahead and "**-0.0200 [-0.0200, -0.0200]**" in ahead
    level = next(line for line in table.splitlines() if line.startswith("| level |"))
    assert "+0.0000 [-0.0248, +0.0248]" in level  # 4.303 · 0.01 / √3 = 0.0248: the resolution, covering 0


def test_a_further_reference_gets_its_own_paired_table() -> None:
    """``references: [lora, hybrid]``: the main table pairs with LoRA, a second table per task with the hybrid."""
    rows = [row("lora", s, m, retention=0.05) for s, m in enumerate([0.80, 0.82, 0.81])]
    rows += [row("hybrid", s, m, retention=0.06) for s, m in enumerate([0.81, 0.83, 0.82])]
    rows += [row("protect", s, m, retention=0.02) for s, m in enumerate([0.81, 0.83, 0.82])]  # = hybrid, forgets less
    table = markdown_table(SimpleNamespace(name="t", sweep=None, references=("lora", "hybrid")), rows)
    assert "Δ vs lora [95% CI]" in table and "### sst2: paired to hybrid" in table
    versus = table.split("### sst2: paired to hybrid")[1].splitlines()
    protect = next(line for line in versus if line.startswith("| protect |"))
    assert protect.startswith("| protect | +0.0000 [+0.0000, +0.0000] |")  # level in accuracy with the hybrid
    assert protect.endswith("| **-0.0400 [-0.0400, -0.0400]** | – |")  # forgets 0.04 less (no rows recorded)
    assert next(line for line in versus if line.startswith("| lora |")).startswith("| lora | **-0.0100")
    assert not any(line.startswith("| hybrid |") for line in versus)  # not paired with itself
    single = markdown_table(SimpleNamespace(name="t", sweep=None, references=("lora",)), rows)
    assert "paired to" not in single
    # The printed summary pairs the metric, or the held-out loss where a (loss-only) bench measured no metric.
    from hybrid_peft.bench.tables import terminal_summary

    plan = SimpleNamespace(name="t", sweep=None, references=("lora", "hybrid"))
    protect = next(line for line in terminal_summary(plan, rows).splitlines() if line.strip().startswith("protect"))
    assert "+0.0100 [+0.0100, +0.0100]" in protect and "-0.0300 [-0.0300, -0.0300]" in protect
    losses = [dataclasses.replace(r, metric=None, held_out_loss=2.0 + (r.method == "lora") * 0.1) for r in rows]
    assert "### sst2: paired to hybrid" in markdown_table(plan, losses)  # a loss-only task is paired too
    summary = terminal_summary(plan, losses).splitlines()
    assert "held-out loss" in summary[1]
    assert "-0.1000 [-0.1000, -0.1000]" in next(line for line in summary if line.strip().startswith("hybrid"))


def test_paired_differences_by_example_bootstrap_over_rows_of_the_recorded_scores(tmp_path: Path) -> None:
    from hybrid_peft.bench.rows import bootstrap_difference, paired_example_differences

    # 200 rows: the method gets 20 more right than LoRA on each seed (+0.10), or the same number (other rows).
    def scored(method: str, seed: int, correct: list[float]) -> BenchRow:
        folder = tmp_path / f"{method}-{seed}"
        folder.mkdir()
        document = {"evaluation": "after", "rows": len(correct), "scores": {"accuracy": correct}}
        (folder / "eval_examples.json").write_text(json.dumps(document))
        return dataclasses.replace(row(method, seed, sum(correct) / len(correct)), folder=str(folder))

    lora = [[float(i % 2) for i in range(200)] for _ in range(3)]
    ahead = [[1.0 if i < 40 else float(i % 2) for i in range(200)] for _ in range(3)]  # rows 0..39: 20 more right
    swapped = [[float((i + 1) % 2) for i in range(200)] for _ in range(3)]  # as many right, other rows
    rows = [scored("lora", s, lora[s]) for s in range(3)] + [scored("ahead", s, ahead[s]) for s in range(3)]
    rows += [scored("swapped", s, swapped[s]) for s in range(3)]
    rows += [row("unscored", s, 0.5) for s in range(3)]  # runs without the file: no example comparison
    table = paired_example_differences(rows)["sst2"]
    assert set(table) == {"ahead", "swapped"}
    assert table["ahead"].mean == pytest.approx(0.10) and table["ahead"].verdict == "above"
    assert table["ahead"].low == pytest.approx(0.10 - 1.96 * math.sqrt(0.1 * 0.9 / 200), abs=0.01)  # ≈ binomial
    assert table["swapped"].mean == pytest.approx(0.0) and table["swapped"].verdict == "level"
    assert table["swapped"].high - table["swapped"].low > 0.2  # every row differs: a wide interval around 0
    again = bootstrap_difference(ahead, lora)
    assert (again.low, again.high) == (table["ahead"].low, table["ahead"].high)  # a fixed seed: reproducible
    markdown = markdown_table(SimpleNamespace(name="t", sweep=None, references=("lora",)), rows)
    line = next(line for line in markdown.splitlines() if line.startswith("| ahead |"))
    assert f"**+0.1000 [{table['ahead'].low:+.4f}, {table['ahead'].high:+.4f}]** (3 seeds)" in line
    assert "Δ by example [95% CI]" in markdown
    (Path(rows[3].folder) / "eval_examples.json").write_text(json.dumps({"scores": {"accuracy": lora[0]}}))
    assert paired_example_differences(rows)["sst2"]["ahead"].mean == pytest.approx(2 * 0.10 / 3)  # read again


def weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def test_held_out_and_retention_losses_per_row_are_each_rows_own_and_average_to_the_whole(
    tiny_lm: str, tokenizer: transformers.PreTrainedTokenizerBase
) -> None:
    """Each row's loss per token, recorded for pairing runs row by row, is the loss of that row scored alone, and the
    rows' token-weighted mean is the batched loss the run reports (held-out task rows and general-text passages)."""
    from hybrid_peft import load_model
    from hybrid_peft.losses import ChunkedLossModel
    from hybrid_peft.tasks import get_task
    from hybrid_peft.tasks.base import held_out_loss

    model = load_model(tiny_lm)
    task = get_task("gsm8k", data_dir=str(Path(__file__).parent / "data"))
    rows = task.eval_rows()[:5]
    per_row: dict[str, list[float]] = {}
    whole = held_out_loss(task, model, tokenizer, rows, 2, 48, per_row)
    assert whole == pytest.approx(held_out_loss(task, model, tokenizer, rows, 2, 48))  # unchanged by recording
    losses, tokens = per_row["loss"], per_row["loss_tokens"]
    assert len(losses) == len(tokens) == 5 and all(t > 0 for t in tokens)
    assert weighted_mean(losses, tokens) == pytest.approx(whole, rel=1e-5)
    for i in (0, 3):  # in the rows' order, though batched by length
        assert losses[i] == pytest.approx(held_out_loss(task, model, tokenizer, rows[i : i + 1], 1, 48), rel=1e-5)
    chunked: dict[str, list[float]] = {}
    assert held_out_loss(task, ChunkedLossModel(model, 8), tokenizer, rows, 2, 48, chunked) == pytest.approx(whole)
    assert chunked == {}  # a loss-only model has no rows to record

    texts = ["the cat sat on the mat", "a longer sentence about the weather and the sea", "short one"]
    passages: dict[str, list[float]] = {}
    batched = retention_loss(model, tokenizer, texts, max_length=64, batch_size=2, per_example=passages)
    assert batched == pytest.approx(retention_loss(model, tokenizer, texts, max_length=64, batch_size=2), rel=1e-6)
    for i, text in enumerate(texts):
        alone = retention_loss(model, tokenizer, [text], max_length=64, batch_size=1)
        assert passages["retention_loss"][i] == pytest.approx(alone, rel=1e-5)
        assert passages["retention_tokens"][i] == len(tokenizer(text)["input_ids"]) - 1
    assert weighted_mean(passages["retention_loss"], passages["retention_tokens"]) == pytest.approx(batched, rel=1e-5)


def test_losses_and_forgetting_are_paired_row_by_row_weighted_by_tokens(tmp_path: Path) -> None:
    """The held-out loss and forgetting get a bootstrap over rows too, from each row's loss per token weighted by
    its tokens (the runs' own means); forgetting only between runs that started from the same model."""
    from hybrid_peft.bench.rows import bootstrap_difference, paired_example_differences
    from hybrid_peft.bench.tables import terminal_summary

    tokens = [float(10 + i % 7) for i in range(120)]

    def scored(method: str, seed: int, shift: float, before: float = 2.0) -> BenchRow:
        folder = tmp_path / f"{method}-{seed}"
        folder.mkdir()
        noise = [0.05 * ((i * 7 + seed) % 5 - 2) for i in range(120)]  # the same rows, a little noise per seed
        losses = [1.0 + 0.01 * (i % 3) + n + shift for i, n in enumerate(noise)]
        scores = {"loss": losses, "loss_tokens": tokens, "retention_loss": [2.1 + shift] * 60,
                  "retention_tokens": [20.0] * 60}  # fmt: skip
        (folder / "eval_examples.json").write_text(json.dumps({"evaluation": "after", "scores": scores}))
        mean = weighted_mean(losses, tokens)
        return dataclasses.replace(
            row(method, seed, 0.5), folder=str(folder), metric=None, held_out_loss=mean, retention_before=before,
            retention_after=2.1 + shift,
        )  # fmt: skip

    rows = [scored("lora", s, 0.0) for s in range(3)] + [scored("better", s, -0.02) for s in range(3)]
    rows += [scored("other-base", s, -0.02, before=2.5) for s in range(3)]  # another starting model: not paired
    loss = paired_example_differences(rows, measure="held_out_loss")["sst2"]
    assert loss["better"].mean == pytest.approx(-0.02) and loss["better"].verdict == "below"
    assert loss["better"].high < 0 and loss["better"].seeds == 3
    forgetting = paired_example_differences(rows, measure="forgetting")["sst2"]
    assert set(forgetting) == {"better"} and forgetting["better"].mean == pytest.approx(-0.02)
    assert "sst2" not in paired_example_differences(rows)  # no accuracy recorded per row: no metric pairing
    # weights: a row with more tokens counts more, as in the run's mean over tokens
    weighted = bootstrap_difference([[1.0, 0.0]], [[0.0, 0.0]], weights=[3.0, 1.0])
    assert weighted.mean == pytest.approx(0.75) and bootstrap_difference([[1.0, 0.0]], [[0.0, 0.0]]).mean == 0.5
    plan = SimpleNamespace(name="t", sweep=None, references=("lora",))
    better = next(line for line in terminal_summary(plan, rows).splitlines() if line.strip().startswith("better"))
    assert better.count("[") == 4  # seeds and rows, for the held-out loss and for forgetting
    table = markdown_table(plan, rows)
    assert "Δ loss by example [95% CI]" in table and "Δ forgetting by example [95% CI]" in table


def test_the_recipe_records_each_evaluation_rows_score_and_loss_after_training(tiny_bert: str, tmp_path: Path) -> None:
    from hybrid_peft.run import RunSummary, TrainConfig, run_training

    fixture = Path(__file__).parent / "data"
    config = TrainConfig(
        model=tiny_bert, task="sst2", data_dir=str(fixture), method="lora", steps=2, batch_size=2, max_length=32,
        eval_examples=6, threads=1, output_dir=str(tmp_path / "run"), learning_rate=1e-2,
    )  # fmt: skip
    run_training(config, progress=False)
    document = json.loads((tmp_path / "run" / "eval_examples.json").read_text())
    scores = document["scores"]["accuracy"]
    assert document["evaluation"] == "after" and len(scores) == document["rows"] == 6
    assert set(scores) <= {0.0, 1.0}
    after = RunSummary.read(tmp_path / "run").after
    assert sum(scores) / len(scores) == pytest.approx(after["accuracy"])
    losses = document["scores"]["loss"]  # each sentence's loss, so the held-out loss pairs by row too
    assert len(losses) == 6 and "loss_tokens" not in document["scores"]  # a sentence is one row: equal weights
    assert sum(losses) / len(losses) == pytest.approx(after["loss"], rel=1e-5)


def test_the_recipe_records_each_rows_loss_and_each_passages_retention_after_training(
    tiny_lm: str, tmp_path: Path
) -> None:
    from hybrid_peft.run import RunSummary, TrainConfig, run_training

    config = TrainConfig(
        model=tiny_lm, task="gsm8k", data_dir=str(Path(__file__).parent / "data"), method="lora", steps=2,
        batch_size=2, max_length=48, eval_examples=4, generate=False, threads=1, output_dir=str(tmp_path / "run"),
        learning_rate=1e-2, retention_examples=6,
    )  # fmt: skip
    run_training(config, progress=False)
    scores = json.loads((tmp_path / "run" / "eval_examples.json").read_text())["scores"]
    after = RunSummary.read(tmp_path / "run").after
    for name, weights, rows in (("loss", "loss_tokens", 4), ("retention_loss", "retention_tokens", 6)):
        assert len(scores[name]) == len(scores[weights]) == rows
        assert weighted_mean(scores[name], scores[weights]) == pytest.approx(after[name], rel=1e-5)


def test_the_learn_forget_plot_has_a_point_per_method_and_seed(tmp_path: Path) -> None:
    rows = [row("lora", s, 0.8 + 0.01 * s, retention=0.02) for s in range(3)]
    rows += [row("full", s, 0.85, retention=0.08) for s in range(3)]
    rows += [BenchRow("mrpc", "lora", 0, "ok", "lora", "minilm", "mrpc", "f1", 1e-3, metric_before=0.5, metric=0.7)]
    (path,) = learn_forget_plots(rows, method_style(rows), tmp_path)
    assert path.name == "learn_forget.png" and path.stat().st_size > 1000
    assert learn_forget_plots(rows[-1:], method_style(rows), tmp_path) == []  # no retention measured: no plot
    # a loss-only run (no metric measured): what it learnt is the fall of its held-out loss
    loss_only = dataclasses.replace(rows[0], metric=None, metric_before=None, loss_before=3.0, held_out_loss=2.5)
    assert loss_only.learnt == (pytest.approx(0.5), "fall of the held-out loss (before − after)")
    assert rows[0].learnt[0] == pytest.approx(0.3) and rows[-1].learnt[0] == pytest.approx(0.2)
    (path,) = learn_forget_plots([loss_only], method_style([loss_only]), tmp_path)
    assert path.stat().st_size > 1000
